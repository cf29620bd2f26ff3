"""Known errors: the ones every entry point (``grounding``, ``python -m stages.*``, the Prefect tasks) turns
into one line naming the file or key and the fix, with exit code 2 for bad parameters and 1 otherwise.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from grounding.config import ConfigError
from grounding.data.schema import DataError
from grounding.shards.manifest import ShardError
from grounding.shards.writer import ItemFailed
from grounding.weights import WeightsError, load_weights_file

__all__ = ["KNOWN", "WeightsError", "is_known", "load_weights", "one_line"]


KNOWN: tuple[type[BaseException], ...] = (ConfigError, DataError, ShardError, ItemFailed, OSError)


def is_known(e: BaseException) -> bool:
    return isinstance(e, KNOWN)


def one_line(e: BaseException, where: str = "") -> tuple[str, int]:
    """``(message, exit code)`` for a known error: one line (a multi-line message is joined with "; ")."""
    msg = "; ".join(s.strip() for s in str(e).splitlines() if s.strip()) or type(e).__name__
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):  # disk full, I/O error
        msg += " (committed shards are kept; rerun to resume)"
    if where.startswith("stage ") and msg.startswith(where[len("stage "):] + ":"):
        where = "stage"  # the message names the stage already: "stage x: x: ..." reads as "stage x: ..."
    return (f"{where} {msg}" if where == "stage" else f"{where}: {msg}" if where else msg), \
        (2 if isinstance(e, ConfigError) else 1)


def load_weights(path: str | os.PathLike[str], key: str, fix: str | None = None) -> Any:
    """:func:`grounding.weights.load_weights_file` of a weights file named by params ``key`` (or, for a model
    a stage trained, its name with ``fix`` saying what to do); refusals and damaged files become
    :class:`WeightsError` prefixed with ``key`` (never an unsafe fallback)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: weights file {p} does not exist (weights are local files, never downloaded)")
    try:
        return load_weights_file(p)
    except WeightsError as e:
        raise WeightsError(f"{key}: {e}" + (f"; {fix}" if fix else "")) from None
