"""Shard I/O benchmark: write throughput, and random single-row reads of 512-d float16 rows through
``ShardSet.get`` (by key) against a plain ``np.memmap`` of the same data read by the same keys (a
``{key: row}`` dict first, as its user needs) and one ``.npy`` file per row, plus plain h5py row indexing,
all measured side by side in one run. Prints a markdown table of ratios and
writes ``benchmarks/out/shard_io.json``.

It also measures what the reader's trust checks cost (issue 19: per-shard schema / offsets / content key /
generation checks when a set is opened, identity check when a shard file is opened): the same random reads
through ``ShardSet(path)`` and ``ShardSet(path, check=False)``, alternated over ``--rounds`` rounds (median,
and best),
both warm (files already open) and cold (open the set, then read: every shard is checked and opened).

    python benchmarks/shard_io.py [--rows 200000] [--reads 20000] [--dim 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from grounding.shards import FieldSpec, ShardSet, ShardSetSpec, ShardWriter


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def check_cost(path: Path, keys: list[str], order: np.ndarray, rounds: int) -> dict:
    """Seconds (median and best of ``rounds``) of the same random reads with and without the reader's
    checks, alternated; ``open``: opening the set alone (where all the per-shard checks run)."""
    def cold(check: bool) -> float:
        t0 = time.perf_counter()
        s = ShardSet(path, check=check)
        for i in order:
            s.get(keys[i])
        t = time.perf_counter() - t0
        s.close()
        return t

    warm_sets = {c: ShardSet(path, check=c) for c in (True, False)}
    for s in warm_sets.values():
        for i in order:
            s.get(keys[i])

    def warm(check: bool) -> float:
        s = warm_sets[check]
        t0 = time.perf_counter()
        for i in order:
            s.get(keys[i])
        return time.perf_counter() - t0

    def opening(check: bool) -> float:
        t0 = time.perf_counter()
        ShardSet(path, check=check).close()
        return time.perf_counter() - t0

    out: dict[str, float] = {}
    for name, fn in (("warm", warm), ("cold", cold), ("open", opening)):
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds):
            for c in ((True, False) if r % 2 == 0 else (False, True)):
                times[c].append(fn(c))
        for stat, f in (("", np.median), ("best_", np.min)):
            out[f"{name}_{stat}checked_s"] = float(f(times[True]))
            out[f"{name}_{stat}unchecked_s"] = float(f(times[False]))
            out[f"{name}_{stat}cost"] = out[f"{name}_{stat}checked_s"] / out[f"{name}_{stat}unchecked_s"] - 1
    for s in warm_sets.values():
        s.close()
    return out


def bench(rows: int, reads: int, dim: int, rows_per_shard: int, per_file_rows: int, workdir: Path,
          rounds: int = 5) -> dict:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((rows, dim)).astype(np.float16)
    keys = [f"r{i:07d}" for i in range(rows)]
    spec = ShardSetSpec(stage="bench", stage_key="bench", level="image",
                        fields=(FieldSpec("embedding", "float16", (dim,)),), rows_per_shard=rows_per_shard)

    def write() -> None:
        with ShardWriter(workdir / "shards", spec, keys, progress=False) as w:
            for i, k in enumerate(w.todo()):
                w.add(k, {"embedding": data[i]})

    t_write = _timed(write)
    mb = data.nbytes / 2**20

    raw = workdir / "raw.f16"
    data.tofile(raw)
    mm = np.memmap(raw, dtype=np.float16, mode="r", shape=data.shape)
    per_file = workdir / "npy"
    per_file.mkdir()
    for i in range(per_file_rows):  # one .npy per row (only as many as the reads touch)
        np.save(per_file / f"{i}.npy", data[i])

    order = rng.integers(0, rows, size=reads)
    order_pf = rng.integers(0, per_file_rows, size=reads)
    s = ShardSet(workdir / "shards")
    s.get(keys[0])  # open files outside the timed loops
    h5 = [h5py.File(workdir / "shards" / sh.file, "r")["embedding"] for sh in s.manifest.shards]

    index = {k: i for i, k in enumerate(keys)}  # the key -> row lookup a user of a raw memmap needs too

    def r_memmap() -> None:
        for i in order:
            np.array(mm[index[keys[i]]])

    def r_shardset() -> None:
        for i in order:
            s.get(keys[i])

    def r_h5py() -> None:
        for i in order:
            h5[i // rows_per_shard][i % rows_per_shard]

    def r_files() -> None:
        for i in order_pf:
            np.load(per_file / f"{i}.npy")

    for fn in (r_memmap, r_shardset, r_files):  # warm the page cache for every layout alike
        fn()
    times = {name: _timed(fn) for name, fn in
             (("memmap", r_memmap), ("shardset", r_shardset), ("h5py", r_h5py), ("npy_per_row", r_files))}
    # check that the rows read are the rows written
    np.testing.assert_array_equal(s.get(keys[123])["embedding"], data[123])
    rate = {k: reads / v for k, v in times.items()}
    checks = check_cost(workdir / "shards", keys, order, rounds)
    return {
        "checks": checks, "rounds": rounds,
        "rows": rows, "dim": dim, "reads": reads, "rows_per_shard": rows_per_shard,
        "write_MB_per_s": mb / t_write, "write_rows_per_s": rows / t_write,
        "reads_per_s": rate,
        "ratio_shardset_vs_memmap": rate["shardset"] / rate["memmap"],
        "ratio_shardset_vs_npy_per_row": rate["shardset"] / rate["npy_per_row"],
        "ratio_h5py_vs_memmap": rate["h5py"] / rate["memmap"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
                   f"{platform.python_version()}, h5py {h5py.__version__}, numpy {np.__version__}",
    }


def table(r: dict) -> str:
    m = r["reads_per_s"]
    return "\n".join([
        f"Shard I/O: {r['rows']:,} rows of {r['dim']}-d float16, {r['reads']:,} random single-row reads "
        f"({r['machine']})",
        "",
        "| layout | random reads/s | vs memmap |",
        "|---|---:|---:|",
        f"| np.memmap of one raw file | {m['memmap']:,.0f} | 1.00 |",
        f"| `ShardSet.get` (memmap view into HDF5) | {m['shardset']:,.0f} | {r['ratio_shardset_vs_memmap']:.2f} |",
        f"| plain h5py row indexing | {m['h5py']:,.0f} | {r['ratio_h5py_vs_memmap']:.2f} |",
        f"| one .npy file per row | {m['npy_per_row']:,.0f} | {m['npy_per_row'] / m['memmap']:.2f} |",
        "",
        f"`ShardSet.get` vs one .npy per row: {r['ratio_shardset_vs_npy_per_row']:.1f}x. "
        f"Write: {r['write_MB_per_s']:.0f} MB/s ({r['write_rows_per_s']:,.0f} rows/s) through `ShardWriter`.",
        "",
        f"Reader checks (median of {r['rounds']} alternated rounds; best of them in brackets): "
        f"{r['reads']:,} random reads warm {r['checks']['warm_checked_s']:.3f} s vs "
        f"{r['checks']['warm_unchecked_s']:.3f} s without ({r['checks']['warm_cost']:+.1%} "
        f"[{r['checks']['warm_best_cost']:+.1%}]); open the set + the reads {r['checks']['cold_checked_s']:.3f} s vs "
        f"{r['checks']['cold_unchecked_s']:.3f} s ({r['checks']['cold_cost']:+.1%} "
        f"[{r['checks']['cold_best_cost']:+.1%}]); opening alone {r['checks']['open_checked_s'] * 1e3:.1f} ms vs "
        f"{r['checks']['open_unchecked_s'] * 1e3:.1f} ms ({r['checks']['open_cost']:+.1%} "
        f"[{r['checks']['open_best_cost']:+.1%}]).",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--reads", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rows-per-shard", type=int, default=16_384)
    ap.add_argument("--per-file-rows", type=int, default=20_000, help="rows written as .npy files")
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds of the check-cost timing")
    ap.add_argument("--out", default="benchmarks/out/shard_io.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shard_io_"))
    try:
        r = bench(a.rows, a.reads, a.dim, a.rows_per_shard, min(a.per_file_rows, a.rows), work, a.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(r, indent=1) + "\n")
    print(table(r))


if __name__ == "__main__":
    main()
