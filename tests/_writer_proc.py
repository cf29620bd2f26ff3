"""Subprocess used by the resume test: writes a deterministic shard set, optionally slowly.

usage: python tests/_writer_proc.py OUT_DIR N_ITEMS ROWS_PER_SHARD SLEEP_S COUNT_FILE [KEY [wait]]
Appends the number of rows it computed to COUNT_FILE when it finishes. KEY (default ``test-key``) is the
set's stage key (two keys: two runs with different params); ``wait``: wait for another writer of OUT_DIR
instead of failing at once (the race tests in tests/test_shard_trust.py).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from grounding.shards import FieldSpec, ShardSetSpec, ShardWriter

FIELDS = (
    FieldSpec("embedding", "float16", (16,), meaning="test vector"),
    FieldSpec("boxes", "float32", (4,), ragged=True, meaning="test boxes"),
    FieldSpec("label", "int32", (), meaning="test label"),
)


def row(i: int) -> dict[str, np.ndarray]:
    """Deterministic row of item ``i``."""
    rng = np.random.default_rng(i)
    k = i % 4
    xy = rng.uniform(0, 100, size=(k, 2)).astype(np.float32)
    return {"embedding": rng.standard_normal(16).astype(np.float32),
            "boxes": np.concatenate([xy, xy + 5], axis=1), "label": np.int32(i % 7)}


def spec(rows_per_shard: int, key: str = "test-key") -> ShardSetSpec:
    return ShardSetSpec(stage="test", stage_key=key, level="image", fields=FIELDS, rows_per_shard=rows_per_shard,
                        params={"n": 1}, inputs={"dataset": "abc"})


def write_set(out, n: int = 10, rps: int = 4, key: str = "test-key"):
    """A committed set of ``n`` rows (keys ``img00000...``, ``rps`` rows a shard) at ``out``; its manifest."""
    keys = [f"img{i:05d}" for i in range(n)]
    with ShardWriter(out, spec(rps, key), keys, progress=False) as w:
        for k in w.todo():
            w.add(k, row(int(k[3:])))
    assert w.manifest is not None
    return w.manifest


def main() -> None:
    out, n, rps, sleep_s, count_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    key = sys.argv[6] if len(sys.argv) > 6 else "test-key"
    wait = len(sys.argv) > 7 and sys.argv[7] == "wait"
    keys = [f"img{i:05d}" for i in range(n)]
    computed = 0
    with ShardWriter(out, spec(rps, key), keys, progress=False, wait=wait) as w:
        for k in w.todo():
            time.sleep(sleep_s)
            w.add(k, row(int(k[3:])))
            computed += 1
    with open(count_file, "a") as f:
        f.write(f"{computed}\n")


if __name__ == "__main__":
    main()
