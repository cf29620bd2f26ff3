"""Known errors: the ones every entry point (``grounding``, ``python -m stages.*``, the Prefect tasks) turns
into one line naming the file or key and the fix, with exit code 2 for bad parameters and 1 otherwise.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from grounding.config import ConfigError
from grounding.data.schema import DataError
from grounding.shards.manifest import ShardError
from grounding.shards.writer import ItemFailed


class WeightsError(ConfigError):
    """A weights file named in the params that cannot be used (unsafe pickle, not a state dict, wrong
    architecture). The message names the file, the params key and what to do."""


KNOWN: tuple[type[BaseException], ...] = (ConfigError, DataError, ShardError, ItemFailed, OSError)


def is_known(e: BaseException) -> bool:
    return isinstance(e, KNOWN)


def one_line(e: BaseException, where: str = "") -> tuple[str, int]:
    """``(message, exit code)`` for a known error: one line (a multi-line message is joined with "; ")."""
    msg = "; ".join(s.strip() for s in str(e).splitlines() if s.strip()) or type(e).__name__
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):  # disk full, I/O error
        msg += " (committed shards are kept; rerun to resume)"
    return (f"{where}: {msg}" if where else msg), (2 if isinstance(e, ConfigError) else 1)


def torch_reason(e: BaseException) -> str:
    """The reason in a ``torch.load(weights_only=True)`` failure, without torch's advice to reload unsafely."""
    text = " ".join(str(e).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation", 1)[0]
        text = text.split(" Please use `torch.serialization", 1)[0]
    return text.strip()[:200]


def load_weights(path: str | os.PathLike[str], key: str, fix: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` of a weights file named by params ``key`` (or, for a model a
    stage trained, its name with ``fix`` saying what to do); refusals and damaged files become
    :class:`WeightsError` (never an unsafe fallback)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: weights file {p} does not exist (weights are local files, never downloaded)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only loading runs no code; any failure means an unusable file
        raise WeightsError(f"{key}: {p} cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: "
                           f"{torch_reason(e)}); "
                           + (fix or f"save a plain state_dict from a trusted environment and point {key} at it")) from None
