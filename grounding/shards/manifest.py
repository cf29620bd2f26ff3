"""The manifest of a shard set: schema, provenance and the list of shards. Written last (commit point)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING as dataclass_missing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 3  # 3: a generation id in the manifest and in each shard's user block (grounding.shards.generation)
# 2: shards carry a content address (``content_key``) instead of the set's stage key
MIN_FORMAT_VERSION = 1  # version-1 and -2 sets (no content addresses / no generation) still read and verify
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
    generation: str = ""  # format 3: id of this write of the set, also in every shard (see generation.py)

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
        if not isinstance(doc, dict):
            raise ShardError(f"{source}: malformed manifest (a JSON object expected, got {type(doc).__name__})")
        try:
            doc.pop("n_rows", None)
            check_manifest_doc(doc)
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


SHARD_NAME = re.compile(r"shard-(\d{5,})\.h5")  # the only file names a manifest may list (inside the set)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOP_TYPES: dict[str, tuple[type, ...]] = {
    "stage": (str,), "stage_key": (str,), "level": (str,), "fields": (list,), "shards": (list,),
    "teacher": (dict,), "params": (dict,), "inputs": (dict,), "extra": (dict,), "errors": (list,),
    "rows_per_shard": (int,), "package_version": (str,), "format_version": (int,), "content_base": (str,),
    "generation": (str,),
}
_FIELD_TYPES: dict[str, tuple[type, ...]] = {"name": (str,), "dtype": (str,), "shape": (list,), "ragged": (bool,),
                                             "meaning": (str,)}
_SHARD_TYPES: dict[str, tuple[type, ...]] = {
    "file": (str,), "rows": (int,), "first_key": (str, type(None)), "last_key": (str, type(None)),
    "sha256": (str,), "size": (int,), "item_start": (int,), "item_count": (int,), "content_key": (str,),
}


def _typed(where: str, doc: dict, types: dict[str, tuple[type, ...]], required: set[str]) -> None:
    """Each key of ``doc`` is known and of its type (a JSON ``true`` is not an integer); required keys exist."""
    for k, v in doc.items():
        want = types.get(k)
        if want is None:
            raise ValueError(f"{where}: unknown key {k!r}")
        if (isinstance(v, bool) and bool not in want) or not isinstance(v, want):
            raise TypeError(f"{where}.{k} is {type(v).__name__} {v!r:.60}, expected "
                            + " or ".join("null" if t is type(None) else t.__name__ for t in want))
    missing = required - set(doc)
    if missing:
        raise KeyError(f"{where}: missing {sorted(missing)}")


def check_manifest_doc(doc: dict) -> None:
    """Type-check a parsed manifest before anything is built from it: every key known and of its JSON type,
    shard ``i`` named ``shard-NNNNN.h5`` (``i`` in five or more digits: nothing outside the set can be
    named), sizes and counts non-negative, sha256 and content keys hex. Raises ``TypeError``/``ValueError``."""
    version = doc["format_version"]
    required = {f.name for f in fields(Manifest) if f.default is dataclass_missing and
                f.default_factory is dataclass_missing}
    _typed("manifest", doc, _TOP_TYPES, required | ({"generation"} if version >= 3 else set()))
    if version >= 3 and not re.fullmatch(r"[0-9a-f]{32}", doc["generation"]):
        raise ValueError(f"manifest.generation {doc['generation']!r:.60} is not 32 hex digits")
    for i, f in enumerate(doc["fields"]):
        if not isinstance(f, dict):
            raise TypeError(f"fields[{i}] is {type(f).__name__}, expected an object")
        _typed(f"fields[{i}]", f, _FIELD_TYPES, {"name", "dtype", "shape"})
        if any(isinstance(d, bool) or not isinstance(d, int) for d in f["shape"]):
            raise TypeError(f"fields[{i}].shape {f['shape']!r:.60} is not a list of integers")
    seen: set[str] = set()
    for i, s in enumerate(doc["shards"]):
        if not isinstance(s, dict):
            raise TypeError(f"shards[{i}] is {type(s).__name__}, expected an object")
        _typed(f"shards[{i}]", s, _SHARD_TYPES, set(_SHARD_TYPES) - ({"content_key"} if version < 2 else set()))
        m = SHARD_NAME.fullmatch(s["file"])
        if m is None or int(m.group(1)) != i or s["file"] in seen:
            raise ValueError(f"shards[{i}].file {s['file']!r:.80} is not shard-{i:05d}.h5 (a manifest names its "
                             f"shards by position, inside the set)")
        seen.add(s["file"])
        for k in ("rows", "size", "item_start", "item_count"):
            if s[k] < 0:
                raise ValueError(f"shards[{i}].{k} is negative ({s[k]})")
        if s["rows"] > s["item_count"]:
            raise ValueError(f"shards[{i}]: {s['rows']} rows for {s['item_count']} items")
        if not _HEX64.fullmatch(s["sha256"]):
            raise ValueError(f"shards[{i}].sha256 {s['sha256']!r:.80} is not 64 hex digits")
        if version >= 2 and not _HEX64.fullmatch(s.get("content_key", "")):
            raise ValueError(f"shards[{i}].content_key {s.get('content_key')!r:.80} is not 64 hex digits")


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
