"""The manifest of a shard set: schema, provenance and the list of shards. Written last (commit point)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2  # 2: shards carry a content address (``content_key``) instead of the set's stage key
MIN_FORMAT_VERSION = 1  # version-1 sets (no content addresses) still read and verify
MANIFEST = "manifest.json"
LEVELS = ("image", "sentence", "region", "class")


class ShardError(RuntimeError):
    """A shard set that is missing, incomplete, corrupted or of an unsupported format."""


@dataclass(frozen=True)
class FieldSpec:
    """One field of a shard set.

    ``shape`` is the per-row shape; a ``ragged`` field has a variable leading dimension in front of it
    (e.g. ``boxes`` with ``shape=(4,)``, ``ragged=True`` holds a ``(K, 4)`` array per row).
    """

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    ragged: bool = False
    meaning: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name == "key":
            raise ValueError(f"invalid field name {self.name!r}")
        np.dtype(self.dtype)  # raises TypeError on an unknown dtype
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 0 for s in self.shape):
            raise ValueError(f"field {self.name}: negative dimension in {self.shape}")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: name, rows, first/last key, sha256 and size in bytes, input items covered, and its
    content address (``content_key``, format 2; empty in version-1 sets, see
    :func:`grounding.shards.keys.shard_key`)."""

    file: str
    rows: int
    first_key: str | None
    last_key: str | None
    sha256: str
    size: int
    item_start: int
    item_count: int
    content_key: str = ""


@dataclass
class Manifest:
    """Everything needed to trust and read a shard set (see DESIGN.md §3)."""

    stage: str
    stage_key: str
    level: str
    fields: list[FieldSpec]
    shards: list[ShardInfo]
    teacher: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    rows_per_shard: int = 0
    package_version: str = ""
    format_version: int = FORMAT_VERSION
    content_base: str = ""  # dataset-independent part of the key when shards are addressed by item content

    @property
    def n_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field {name!r}; fields are {[f.name for f in self.fields]}")

    def to_json(self) -> str:
        doc = asdict(self)
        doc["n_rows"] = self.n_rows
        return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest") -> "Manifest":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShardError(f"{source}: not valid JSON ({e})") from None
        version = doc.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < MIN_FORMAT_VERSION:
            raise ShardError(f"{source}: no format_version; not a grounding shard set manifest")
        if version > FORMAT_VERSION:
            raise ShardError(
                f"{source}: shard set format version {version} is newer than this grounding supports "
                f"({FORMAT_VERSION}); upgrade grounding to read it"
            )
        try:
            doc.pop("n_rows", None)
            doc["fields"] = [FieldSpec(**{**f, "shape": tuple(f["shape"])}) for f in doc["fields"]]
            doc["shards"] = [ShardInfo(**s) for s in doc["shards"]]
            return cls(**doc)
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{source}: malformed manifest ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise ShardError(f"{directory}: no {MANIFEST} (not a shard set, or its run did not finish)")
        return cls.from_json(path.read_text(encoding="utf-8"), source=str(path))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Atomically write ``manifest.json`` (temp file, fsync, rename, fsync of the directory)."""
        path = Path(directory) / MANIFEST
        atomic_write_bytes(path, self.to_json().encode("utf-8"))
        return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename inside it is durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
