"""Content addresses: canonical, type-tagged hashing of stage inputs.

``stage_key = sha256(canonical(stage, code_version, teacher_identity, params, input_keys))``. Values are
tagged with their type (``1`` and ``1.0`` and ``"1"`` hash differently), mappings are sorted, and
anything that cannot be hashed faithfully raises ``TypeError`` (never a random key).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from pathlib import Path, PurePath
from types import ModuleType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

KEY_SCHEME = "grounding-key-v1"


def tagged(value: Any) -> Any:
    """A JSON-able, type-tagged form of ``value``; raises ``TypeError`` for unsupported types."""
    if value is None:
        return ["none"]
    if isinstance(value, bool | np.bool_):
        return ["bool", bool(value)]
    if isinstance(value, int | np.integer):
        return ["int", int(value)]
    if isinstance(value, float | np.floating):
        v = float(value)
        return ["float", repr(v) if math.isfinite(v) else str(v)]
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, bytes):
        return ["bytes", hashlib.sha256(value).hexdigest()]
    if isinstance(value, PurePath):
        raise TypeError(
            f"cannot key on a path ({value}): hash the file's content and key on the digest instead"
        )
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        return ["ndarray", arr.dtype.str, list(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest()]
    if hasattr(value, "model_dump"):  # pydantic models
        return ["model", type(value).__name__, tagged(value.model_dump(mode="json"))]
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"cannot key on a mapping with non-string key {k!r}")
        return ["dict", [[k, tagged(value[k])] for k in sorted(value)]]
    if isinstance(value, list | tuple):
        return ["list", [tagged(v) for v in value]]
    raise TypeError(f"cannot compute a content key for a value of type {type(value).__name__}: {value!r:.80}")


def digest(value: Any) -> str:
    """sha256 hex digest of the canonical tagged form of ``value``."""
    payload = json.dumps([KEY_SCHEME, tagged(value)], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def stage_key(
    stage: str,
    code_version: str,
    teacher: Mapping[str, Any] | None,
    params: Mapping[str, Any],
    inputs: Mapping[str, str],
) -> str:
    """The key of one stage run: same key means same output bytes.

    Args:
        stage: stage name (``"clip-image"``).
        code_version: digest of the stage's source (:func:`code_version`).
        teacher: teacher identity (library, version, config, weights sha256), or ``None``.
        params: the parameters that affect the outputs.
        inputs: ``name -> key`` of every input (dataset fingerprint, upstream stage keys).
    """
    return digest({"stage": stage, "code": code_version, "teacher": teacher or {}, "params": dict(params),
                   "inputs": dict(inputs)})


def content_base(
    stage: str,
    code_version: str,
    teacher: Mapping[str, Any] | None,
    params: Mapping[str, Any],
    inputs: Mapping[str, str],
    item_inputs: Iterable[str] = ("dataset",),
) -> str:
    """The dataset-independent part of a stage key: as :func:`stage_key` without the inputs named in
    ``item_inputs`` (those whose effect on each row the per-item content hashes capture, by default the
    dataset fingerprint). Hashed with each shard's items into its content address (:func:`shard_key`)."""
    drop = set(item_inputs)
    return digest({"scheme": "content-base", "stage": stage, "code": code_version, "teacher": teacher or {},
                   "params": dict(params), "inputs": {k: v for k, v in inputs.items() if k not in drop},
                   "item_inputs": sorted(drop)})


def shard_key(base: str, item_start: int, keys: Sequence[str], item_hashes: Sequence[str] | None) -> str:
    """Content address of one shard: ``base`` (the stage key, or a :func:`content_base` when per-item
    hashes are known), its item range and its members' keys and content hashes. Two shards with the same
    address hold the same bytes, whichever dataset they were written for."""
    if item_hashes is not None and len(item_hashes) != len(keys):
        raise ValueError(f"{len(item_hashes)} item hashes for {len(keys)} keys")
    return digest({"scheme": "shard", "base": base, "item_start": int(item_start), "keys": list(keys),
                   "item_hashes": None if item_hashes is None else list(item_hashes)})


def code_version(modules: Iterable[str | ModuleType]) -> str:
    """sha256 over the source bytes of the given modules (by import name): changing the code of a
    stage changes its key, so a stale cache can never be reused after an edit."""
    h = hashlib.sha256()
    for mod in sorted({m if isinstance(m, str) else m.__name__ for m in modules}):
        module = importlib.import_module(mod)
        src = getattr(module, "__file__", None)
        if src is None:
            raise TypeError(f"module {mod} has no source file to hash")
        h.update(mod.encode() + b"\0" + Path(src).read_bytes() + b"\0")
    return h.hexdigest()


def file_sha256(path: str | PurePath, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file (weights files are keyed by content, never by path or mtime)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
