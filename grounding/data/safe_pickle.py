"""Loading user pickles without running their code.

``refs(unc).p`` files of the ``refer`` toolkit are plain pickles of lists of dicts; TransVG split files are
``torch.save``-d lists of tuples. Neither needs any class to be rebuilt, so neither is ever opened with plain
:func:`pickle.load` (which imports and calls whatever global the file names, e.g. ``os.system``):

* :func:`load_pickle` uses a restricted unpickler that refuses every global except a few inert builtin
  containers (``set``, ``frozenset``, ``complex``, ``bytearray``) that old pickle protocols reach by name, and
  ``_codecs.encode`` limited to latin-1 (how protocols < 3 write ``bytes``), replaced by a checked stand-in;
* :func:`load_torch_list` uses ``torch.load(weights_only=True)`` and never falls back to unsafe unpickling.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from grounding.data.schema import DataError

#: The only globals a user pickle may name: inert builtin containers (protocols 0-2 build sets via REDUCE).
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray")}
)


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode`` that only rebuilds bytes from a latin-1 string (nothing else)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise DataError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` allows only :data:`SAFE_GLOBALS`."""

    def __init__(self, file: Any, source: str, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle hook
        key = ("builtins" if module == "__builtin__" else module, name)  # Python 2 / protocol < 3 spelling
        if key in SAFE_GLOBALS:
            return super().find_class(*key)
        if key == ("_codecs", "encode"):  # how protocols < 3 spell a bytes object: encode(str, "latin1")
            return _latin1_bytes
        raise DataError(
            f"refusing to import {module}.{name} from {self._source}: this pickle names a global, and only "
            f"plain containers and scalars are accepted (a data file never needs code; it may be malicious)"
        )


def load_pickle(path: str | os.PathLike[str], *, encoding: str = "utf-8") -> Any:
    """Load a pickle holding only plain containers/scalars (dict, list, tuple, str, bytes, int, float, ...).

    ``encoding`` decodes Python 2 ``str`` objects (the ``refer`` toolkit's pickles were written by Python 2);
    UTF-8 keeps non-ASCII sentences intact. Any global other than :data:`SAFE_GLOBALS` raises
    :class:`DataError` naming the file and the refused ``module.name``; nothing in the file is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pickle file is missing")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, str(path), encoding=encoding).load()
        except DataError:
            raise
        except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, MemoryError, OverflowError, RecursionError) as e:
            raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


def _torch_refusal_reason(message: str) -> str:
    """The informative part of torch's weights-only refusal ("Unsupported global: GLOBAL numpy...")."""
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". Please use")[0]
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[0] if lines else "weights-only load failed"


def load_torch_list(path: str | os.PathLike[str]) -> list[Any]:
    """Load a TransVG-style ``.pth`` split file (a list of tuples) with ``torch.load(weights_only=True)``.

    Files written by older builders may hold numpy arrays (or other objects) that the weights-only loader
    refuses; then a :class:`DataError` says so and how to convert the file once, in an environment where the
    file is trusted. There is deliberately no fallback to unsafe unpickling.
    """
    import torch  # local: torch is heavy and only TransVG files need it

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file is missing")
    try:
        rows = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = _torch_refusal_reason(str(e))
        raise DataError(
            f"{path}: torch.load(weights_only=True) refused this file ({first}). It holds objects other than "
            f"plain lists/tuples/str/numbers/tensors, typically numpy arrays written by an older split builder. "
            f"grounding never unpickles such files unsafely. If you trust the file, convert it once to plain "
            f"lists with: python -c \"import sys, torch, numpy as np; "
            f"rows = torch.load(sys.argv[1], weights_only=False); torch.save([tuple(v.tolist() if "
            f"isinstance(v, (np.ndarray, np.generic)) else v for v in r) for r in rows], sys.argv[2])\" "
            f"{path} {path.with_suffix('.plain.pth')} then put the .plain.pth file in place of the original "
            f"(keep a backup) and read again"
        ) from e
    except Exception as e:  # noqa: BLE001 - weights_only loading runs no code; any failure means a bad file
        # (a damaged archive or pickle stream surfaces as RuntimeError, EOFError, IndexError, KeyError, ...)
        raise DataError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from e
    if not isinstance(rows, (list, tuple)):
        raise DataError(f"{path}: expected a list of rows, found {type(rows).__name__}")
    return list(rows)
