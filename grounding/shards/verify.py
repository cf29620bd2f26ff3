"""Full verification of a shard set: manifest, sha256 and size of every shard, schema and row counts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from grounding.shards.keys import file_sha256
from grounding.shards.manifest import Manifest, ShardError, ShardInfo


@dataclass
class VerifyReport:
    """``ok`` is True when ``problems`` is empty; ``checked`` counts shards hashed."""

    path: Path
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard_set(path: str | os.PathLike[str], *, progress: bool = False) -> VerifyReport:
    """Check everything the manifest promises; never raises for a bad set, reports instead."""
    path = Path(path)
    report = VerifyReport(path)
    try:
        m = Manifest.load(path)
    except ShardError as e:
        report.problems.append(str(e))
        return report
    shards = m.shards
    if progress:
        from tqdm.auto import tqdm

        shards = tqdm(shards, desc=f"verify {path.name}", unit="shard")
    seen: set[str] = set()
    expected_start = 0
    for shard in shards:
        file = path / shard.file
        if shard.item_start != expected_start:
            report.problems.append(f"{shard.file}: covers items from {shard.item_start}, expected {expected_start}")
        expected_start = shard.item_start + shard.item_count
        if not file.is_file():
            report.problems.append(f"{shard.file}: missing")
            continue
        size = file.stat().st_size
        if size != shard.size:
            report.problems.append(f"{shard.file}: size {size} bytes, manifest says {shard.size}")
        digest = file_sha256(file)
        report.checked += 1
        if digest != shard.sha256:
            report.problems.append(f"{shard.file}: sha256 {digest[:12]}… differs from manifest {shard.sha256[:12]}…")
            continue  # content is not what was written: do not trust anything inside
        report.problems.extend(_check_shard(file, m, shard, seen))
        report.rows += shard.rows
    return report


def _check_shard(file: Path, m: Manifest, shard: ShardInfo, seen: set[str]) -> list[str]:
    problems: list[str] = []
    name = file.name
    rows, first, last = shard.rows, shard.first_key, shard.last_key
    try:
        with h5py.File(file, "r") as f:
            if int(f.attrs.get("format_version", -1)) != m.format_version:
                problems.append(f"{name}: format_version {f.attrs.get('format_version')!r}, "
                                f"manifest says {m.format_version}")
            if m.format_version >= 2:  # shards carry their content address, not the set's key
                if not shard.content_key or f.attrs.get("content_key") != shard.content_key:
                    problems.append(f"{name}: content key {f.attrs.get('content_key')!r}, "
                                    f"manifest says {shard.content_key!r}")
            elif f.attrs.get("stage_key") != m.stage_key:
                problems.append(f"{name}: written for stage key {f.attrs.get('stage_key')!r}, not {m.stage_key}")
            keys = [k.decode("utf-8") for k in f["key"][()]]
            if len(keys) != rows:
                problems.append(f"{name}: {len(keys)} keys, manifest says {rows}")
            if keys and (keys[0] != first or keys[-1] != last):
                problems.append(f"{name}: key range {keys[0]}..{keys[-1]}, manifest says {first}..{last}")
            dup = seen.intersection(keys)
            if dup:
                problems.append(f"{name}: keys also in another shard: {sorted(dup)[:3]}")
            seen.update(keys)
            for spec in m.fields:
                if spec.name not in f:
                    problems.append(f"{name}: field {spec.name} missing")
                    continue
                if spec.ragged:
                    g = f[spec.name]
                    vals, offs = g["values"], g["offsets"][()]
                    if vals.dtype != spec.np_dtype or vals.shape[1:] != spec.shape:
                        problems.append(f"{name}: {spec.name} values {vals.dtype}{vals.shape}, "
                                        f"schema {spec.dtype}(K, {spec.shape})")
                    if len(offs) != len(keys) + 1 or (len(offs) and (offs[0] != 0 or offs[-1] != vals.shape[0]
                                                                      or np.any(np.diff(offs) < 0))):
                        problems.append(f"{name}: {spec.name} offsets are inconsistent with {vals.shape[0]} values")
                else:
                    d = f[spec.name]
                    if d.dtype != spec.np_dtype or d.shape != (len(keys), *spec.shape):
                        problems.append(f"{name}: {spec.name} is {d.dtype}{d.shape}, "
                                        f"schema {spec.dtype}{(len(keys), *spec.shape)}")
    except (OSError, KeyError, ValueError) as e:
        problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
    return problems
