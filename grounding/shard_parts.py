"""Fan-out parts of a shard-set stage (:func:`shard_part`): a light module (no numpy, torch or h5py), so the
engine can ask :func:`in_part` on its cache-hit path without importing the shard writer."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_PART: ContextVar[tuple[int, int] | None] = ContextVar("grounding_shard_part", default=None)


@contextmanager
def shard_part(part: int, n_parts: int) -> Iterator[None]:
    """Within this context, shard-set stages write only shards ``i`` with ``i % n_parts == part`` and do
    not commit (fan-out: run every part, then run the stage once more outside the context to commit;
    the result is byte-identical to a serial run because shard contents depend only on their items)."""
    if not 0 <= part < n_parts:
        raise ValueError(f"part {part} not in [0, {n_parts})")
    token = _PART.set((part, n_parts))
    try:
        yield
    finally:
        _PART.reset(token)


def in_part() -> bool:
    """True inside :func:`shard_part` (a part writes some shards and commits nothing)."""
    return _PART.get() is not None
