"""Full verification of a shard set: manifest, sha256 and size of every shard, schema and row counts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from grounding.shards.keys import file_sha256
from grounding.shards.manifest import Manifest, ShardError, ShardInfo
from grounding.shards.validate import shard_problems


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
    try:
        with h5py.File(file, "r") as f:
            keys = [k.decode("utf-8") for k in f["key"][()]]
            problems.extend(shard_problems(f, m, shard, keys))  # size: checked above
            dup = seen.intersection(keys)
            if dup:
                problems.append(f"{name}: keys also in another shard: {sorted(dup)[:3]}")
            seen.update(keys)
    except (OSError, KeyError, ValueError, UnicodeDecodeError) as e:
        problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
    return problems
