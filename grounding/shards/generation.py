"""The generation id of a shard set (format 3): which write of the set a manifest and each shard belong to.

It is derived from the set's stage key (same key, same generation: the bytes stay deterministic and a
resumed run keeps the shards of the killed one), written into the manifest and into the first
:data:`USERBLOCK` bytes of every shard file: the HDF5 *user block*, which HDF5 skips, so the id can be
re-stamped in place when a shard is kept or copied into a set of another generation (incremental
extension) without touching the HDF5 structure. A kept shard then has the same bytes as the one a
from-scratch run writes. A reader compares the id of each shard it opens with its manifest's and refuses
to mix rows of two writes of the set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from grounding.shards.keys import digest

USERBLOCK = 512  # bytes reserved at the start of each shard file (HDF5 user block: a power of 2, >= 512)
MAGIC = b"grounding shard\n"
_LINE = re.compile(rb"generation=([0-9a-f]{32})\n")


def generation_of(stage_key: str) -> str:
    """The generation id (32 hex digits) of the set written under ``stage_key``."""
    return digest({"scheme": "generation", "stage_key": stage_key})[:32]


def userblock(generation: str) -> bytes:
    """The :data:`USERBLOCK` bytes that carry ``generation``."""
    if not re.fullmatch(r"[0-9a-f]{32}", generation):
        raise ValueError(f"generation {generation!r} is not 32 hex digits")
    return (MAGIC + b"generation=" + generation.encode("ascii") + b"\n").ljust(USERBLOCK, b"\0")


def read_generation(fd: int) -> str | None:
    """The generation stamped in the file open at ``fd`` (None when it carries none: format < 3)."""
    head = os.pread(fd, USERBLOCK, 0)
    if not head.startswith(MAGIC):
        return None
    m = _LINE.match(head, len(MAGIC))
    return m.group(1).decode("ascii") if m else None


def file_generation(path: str | os.PathLike[str]) -> str | None:
    """:func:`read_generation` of a file by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_generation(fd)
    finally:
        os.close(fd)


def stamp(path: Path, generation: str) -> bool:
    """Write ``generation`` into the user block of ``path`` in place (fsynced); False when already there."""
    block = userblock(generation)
    fd = os.open(path, os.O_RDWR)
    try:
        head = os.pread(fd, USERBLOCK, 0)
        if head == block:
            return False
        if not head.startswith(MAGIC):  # no user block: writing here would destroy the HDF5 superblock
            raise ValueError(f"{path}: no grounding user block to stamp (a shard of format < 3?)")
        os.pwrite(fd, block, 0)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)
