"""Per-shard checks run once when a shard is first opened (by ``ShardSet`` and by ``verify``), never per row.

:func:`shard_problems` compares an open shard with what its manifest promises: format version, content
key (or, format 1, the set's stage key), generation, row count and key range, and for each field of the
schema that it is stored as the schema says (fixed dataset or ragged ``values`` + ``offsets`` group) with
the schema's dtype and shape, ragged offsets starting at 0, non-decreasing and ending at the number of
values. :class:`ShardIdentity` is what a reader records about a shard file when it checks it (device,
inode, size, generation), so that a later open of the same name can tell whether the file was replaced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from grounding.shards.generation import read_generation
from grounding.shards.manifest import Manifest, ShardInfo


@dataclass(frozen=True)
class ShardIdentity:
    """The file a reader checked: ``(st_dev, st_ino, st_size)`` and the generation in its user block."""

    dev: int
    ino: int
    size: int
    generation: str | None


def identity(f: h5py.File) -> ShardIdentity:
    """Identity of the file behind an open h5py handle (its own descriptor: no second open by name)."""
    fd = f.id.get_vfd_handle()
    st = os.fstat(fd)
    return ShardIdentity(st.st_dev, st.st_ino, st.st_size, read_generation(fd))


def shard_problems(f: h5py.File, m: Manifest, shard: ShardInfo, keys: list[str],
                   ident: ShardIdentity | None = None) -> list[str]:
    """Everything about shard ``f`` (keys already read) that differs from manifest ``m``; [] when it matches."""
    name, out, attrs = shard.file, [], f.attrs
    version = attrs.get("format_version")
    if not isinstance(version, (int, np.integer)) or int(version) != m.format_version:
        out.append(f"{name}: format_version {version!r}, manifest says {m.format_version}")
    if m.format_version >= 2:  # shards carry their content address, not the set's key
        key = attrs.get("content_key")
        if not shard.content_key or key != shard.content_key:
            out.append(f"{name}: content key {key!r}, manifest says {shard.content_key!r} (a shard of another set?)")
    elif attrs.get("stage_key") != m.stage_key:
        out.append(f"{name}: written for stage key {attrs.get('stage_key')!r}, not {m.stage_key}")
    if m.format_version >= 3:
        gen = (ident or identity(f)).generation
        if gen != m.generation:
            out.append(f"{name}: generation {gen}, manifest says {m.generation} (a shard of another write of the set)")
    if ident is not None and ident.size != shard.size:
        out.append(f"{name}: size {ident.size} bytes, manifest says {shard.size}")
    if len(keys) != shard.rows:
        out.append(f"{name}: {len(keys)} keys, manifest says {shard.rows}")
    if keys and (keys[0] != shard.first_key or keys[-1] != shard.last_key):
        out.append(f"{name}: key range {keys[0]}..{keys[-1]}, manifest says {shard.first_key}..{shard.last_key}")
    for spec in m.fields:
        obj = f.get(spec.name)
        if obj is None:
            out.append(f"{name}: field {spec.name} missing")
        elif spec.ragged:
            if not isinstance(obj, h5py.Group) or "values" not in obj or "offsets" not in obj:
                out.append(f"{name}: field {spec.name} is not stored as ragged values + offsets, but the schema "
                           f"says ragged")
                continue
            vals, offs = obj["values"], obj["offsets"]
            if vals.dtype != spec.np_dtype or vals.shape[1:] != spec.shape:
                out.append(f"{name}: {spec.name} values {vals.dtype}{vals.shape}, schema {spec.dtype}(K, {spec.shape})")
            out.extend(_offset_problems(name, spec.name, offs, len(keys), vals.shape[0] if vals.ndim else 0))
        elif not isinstance(obj, h5py.Dataset):
            out.append(f"{name}: field {spec.name} is stored as ragged, but the schema says fixed {spec.shape}")
        elif obj.dtype != spec.np_dtype or obj.shape != (len(keys), *spec.shape):
            out.append(f"{name}: {spec.name} is {obj.dtype}{obj.shape}, schema {spec.dtype}{(len(keys), *spec.shape)}")
    return out


def _offset_problems(shard: str, field: str, offs: h5py.Dataset, rows: int, n_values: int) -> list[str]:
    if offs.dtype.kind not in "iu" or offs.shape != (rows + 1,):
        return [f"{shard}: {field} offsets are {offs.dtype}{offs.shape}, expected int64({rows + 1},)"]
    o = offs[()]
    if o[0] != 0 or o[-1] != n_values or (rows and np.any(np.diff(o) < 0)):
        return [f"{shard}: {field} offsets are inconsistent with {n_values} values (must start at 0, never "
                f"decrease, end at {n_values}; got {o[0]}..{o[-1]})"]
    return []
