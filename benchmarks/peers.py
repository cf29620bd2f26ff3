"""The shard store side by side with the formats a user would pick instead (issue 23).

The same rows are written and read by ``ShardSet`` (HDF5 shards), a raw ``np.memmap`` (one file per field,
ragged fields as values + offsets), plain h5py (one file, contiguous datasets, offsets loaded once),
Hugging Face ``datasets`` (Arrow, ``with_format("numpy")``), LitData (``optimize`` + ``StreamingDataset`` on
a local directory), webdataset (tar shards of ``.npy`` members) and zarr v3 (one array per field, ~1 MiB
chunks, no compression: the data are random and no other peer compresses). Three workloads:

* ``fixed``: a 512-d float16 embedding per image;
* ``yolo``: ragged YOLO cells, K x 1024 float16 + K x 4 float32 boxes per image, K uniform in 9..25 (mean 17);
* ``regions``: 100 x 1024 float16 features + 100 x 1601 float32 class probabilities + 100 x 4 boxes per image.

Figures, all measured in one run, side by side (peers alternated, so machine load hits all alike):

* random single-row reads/s: every field of one row at a random position, each field an array the caller
  owns, through one bound-method call per read (the arguments are prepared before the clock starts). The
  peers read by position; ShardSet by row id (``get_row``: keys resolved once, as ShardDataset does) and, as
  a second row, by key (``ShardSet.get``: a str dict lookup per read), measured against a second baseline
  row, ``np.memmap (by key)``, doing the same lookup (a ``{key: position}`` dict) a user of raw memmaps
  needs. LitData returns views into the chunk it holds in memory: copied here. The np.memmap baseline is a
  plain ndarray view of the map with offsets as a Python list, the fastest a user can write. Best of
  ``--passes`` timed passes (alternating the peer order) after a warm-up pass, each pass capped at
  ``--read-cap`` s;
* shuffled epoch rows/s through ``DataLoader(num_workers=2, batch_size=32)`` (each batch packed into one
  tensor per field in the workers, the same collate for every peer; best of ``--epochs`` alternated
  rounds): ShardSet with :class:`ShardLocalSampler`, LitData with ``shuffle=True``, webdataset with
  shard shuffle + a 1000-sample buffer, the others with a global random permutation; an epoch still running
  after ``--epoch-cap`` s is stopped and reported as partial;
* write MB/s (payload bytes / wall time of the write) and bytes on disk.

Every figure also as a ratio to ``np.memmap``. Prints a markdown table and writes ``benchmarks/out/peers.json``.
Peers not installed (``pip install -e .[bench]``) are listed as such.

    python benchmarks/peers.py [--scale 1.0] [--workloads fixed,yolo,regions]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from grounding.shards import FieldSpec, ShardSet, ShardSetSpec, ShardWriter
from grounding.shards.torch import ShardLocalSampler

Row = dict[str, np.ndarray]
# name -> (dtype, per-value shape, ragged)
WORKLOADS: dict[str, dict[str, tuple[str, tuple[int, ...], bool]]] = {
    "fixed": {"embedding": ("float16", (512,), False)},
    "yolo": {"cells": ("float16", (1024,), True), "boxes": ("float32", (4,), True)},
    "regions": {"features": ("float16", (1024,), True), "class_probs": ("float32", (1601,), True),
                "boxes": ("float32", (4,), True)},
}
KEY_BASELINE, KEY_SHARDSET = "np.memmap (by key)", "ShardSet.get (by key)"
WORKLOAD_RAGGED = {f: rg for w in WORKLOADS.values() for f, (_, _, rg) in w.items()}
ROWS = {"fixed": 20_000, "yolo": 2_000, "regions": 200}
ROWS_PER_SHARD = {"fixed": 4096, "yolo": 512, "regions": 64}


def make_rows(workload: str, n: int, seed: int = 0) -> list[Row]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = {"fixed": 0, "yolo": int(rng.integers(9, 26)), "regions": 100}[workload]
        row = {}
        for name, (dt, shape, ragged) in WORKLOADS[workload].items():
            row[name] = rng.random(((k,) if ragged else ()) + shape, dtype=np.float32).astype(dt)
        out.append(row)
    return out


def key_of(i: int) -> str:
    """The key of row ``i`` (ShardSet's keys; the ``{key: position}`` index of np.memmap (by key))."""
    return f"img{i:07d}"


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def collate(batch: list[Any], names: tuple[str, ...]) -> dict[str, Any]:
    """One tensor per field and batch (fixed fields stacked, ragged ones concatenated + ``<field>_lengths``),
    so the worker-to-main transfer is a few shared-memory tensors per batch, the same for every peer."""
    rows = [b["s"] if "s" in b else b for b in batch]
    out: dict[str, Any] = {"n": len(rows)}
    for n in names:
        arrs = [np.asarray(r[n]) for r in rows]
        if all(a.shape == arrs[0].shape for a in arrs) and not WORKLOAD_RAGGED.get(n, False):
            out[n] = torch.from_numpy(np.stack(arrs))
        else:
            out[n] = torch.from_numpy(np.concatenate(arrs))
            out[f"{n}_lengths"] = torch.tensor([len(a) for a in arrs])
    return out


# ---- peers -------------------------------------------------------------------------------------------
class Peer:
    """One storage format: ``write`` rows into ``d``, then ``get(i)`` and ``loader(...)`` read them."""

    name = ""
    random_access = True

    def __init__(self, workload: str, d: Path) -> None:
        self.workload, self.d, self.spec = workload, d, WORKLOADS[workload]

    def write(self, rows: list[Row]) -> None: ...

    def open(self) -> None: ...

    def get(self, i: int) -> Row: ...

    def random_reader(self) -> tuple[Callable[[Any], Row], Callable[[int], Any]]:
        """``(read, arg)``: the timed loop calls ``read(arg(i))`` with ``arg(i)`` prepared before the clock."""
        return self.get, _same

    def loader(self, n: int, names: tuple[str, ...], seed: int) -> Iterable[Any]:
        return DataLoader(_MapDS(self, n), batch_size=32, shuffle=True, num_workers=2,
                          collate_fn=functools.partial(collate, names=names),
                          generator=torch.Generator().manual_seed(seed))


def _same(i: int) -> int:
    return i


class _MapDS(Dataset):
    def __init__(self, peer: Peer, n: int) -> None:
        self.peer, self.n = peer, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Row:
        return self.peer.get(i)


class MemmapPeer(Peer):
    name = "np.memmap"

    def write(self, rows: list[Row]) -> None:
        self.d.mkdir(parents=True)
        for f, (dt, shape, ragged) in self.spec.items():
            arrs = [r[f] for r in rows]
            (np.concatenate(arrs) if ragged else np.stack(arrs)).tofile(self.d / f"{f}.bin")
            if ragged:
                np.save(self.d / f"{f}.offsets.npy", np.concatenate([[0], np.cumsum([len(a) for a in arrs])]))

    def open(self) -> None:
        self.maps: dict[str, tuple[np.ndarray, list[int] | None]] = {}
        for f, (dt, shape, ragged) in self.spec.items():
            mm = np.memmap(self.d / f"{f}.bin", dtype=dt, mode="r").view(np.ndarray)  # no memmap overhead
            self.maps[f] = (mm.reshape(-1, *shape),
                            np.load(self.d / f"{f}.offsets.npy").tolist() if ragged else None)

        mm, o = next(iter(self.maps.values()))
        self.index = {key_of(i): i for i in range(len(mm) if o is None else len(o) - 1)}

    def get(self, i: int) -> Row:
        return {f: np.array(mm[o[i]:o[i + 1]] if o is not None else mm[i]) for f, (mm, o) in self.maps.items()}

    def get_by_key(self, key: str) -> Row:
        """:meth:`get` after the ``{key: position}`` lookup a user of raw memmaps needs."""
        i = self.index[key]
        return {f: np.array(mm[o[i]:o[i + 1]] if o is not None else mm[i]) for f, (mm, o) in self.maps.items()}


class ShardSetPeer(Peer):
    name = "ShardSet"

    def write(self, rows: list[Row]) -> None:
        fields = tuple(FieldSpec(f, dt, shape, ragged=ragged) for f, (dt, shape, ragged) in self.spec.items())
        spec = ShardSetSpec(stage="bench", stage_key="bench", level="image", fields=fields,
                            rows_per_shard=ROWS_PER_SHARD[self.workload])
        self.keys = [key_of(i) for i in range(len(rows))]
        with ShardWriter(self.d, spec, self.keys, progress=False) as w:
            for i, k in enumerate(w.todo()):
                w.add(k, rows[i])

    def open(self) -> None:
        self.s = ShardSet(self.d)
        self.fields = list(self.spec)
        self.rids = [self.s.row_id(k) for k in self.keys]  # keys resolved once, as ShardDataset does

    def get(self, i: int) -> Row:
        return self.s.get_row(self.rids[i])

    def random_reader(self) -> tuple[Callable[[Any], Row], Callable[[int], Any]]:
        return self.s.get_row, self.rids.__getitem__  # every field, as every peer reads

    def loader(self, n: int, names: tuple[str, ...], seed: int) -> Iterable[Any]:
        ds = _RowIdDS(self.s, self.rids, self.fields)  # numpy rows like every peer (ShardDataset adds tensors)
        return DataLoader(ds, batch_size=32, num_workers=2, sampler=ShardLocalSampler(self.s, buffer=1024, seed=seed),
                          collate_fn=functools.partial(collate, names=names))


class _RowIdDS(Dataset):
    """ShardSet rows by position; batches through ``get_rows`` (grouped by shard and file offset)."""

    def __init__(self, s: ShardSet, rids: list[int], fields: list[str]) -> None:
        self.s, self.rids, self.fields = s, rids, fields

    def __len__(self) -> int:
        return len(self.rids)

    def __getitem__(self, i: int) -> Row:
        return self.s.get_row(self.rids[i], self.fields)

    def __getitems__(self, idx: list[int]) -> list[Row]:
        return self.s.get_rows([self.rids[i] for i in idx], self.fields)


class H5pyPeer(Peer):
    name = "h5py (plain)"

    def write(self, rows: list[Row]) -> None:
        self.d.mkdir(parents=True)
        with h5py.File(self.d / "data.h5", "w") as f:
            for name, (dt, shape, ragged) in self.spec.items():
                arrs = [r[name] for r in rows]
                if ragged:
                    f[f"{name}/values"] = np.concatenate(arrs)
                    f[f"{name}/offsets"] = np.concatenate([[0], np.cumsum([len(a) for a in arrs])])
                else:
                    f[name] = np.stack(arrs)

    def open(self) -> None:
        self.f, self.ds = None, {}

    def _open(self) -> None:
        self.f = h5py.File(self.d / "data.h5", "r")
        for name, (dt, shape, ragged) in self.spec.items():
            self.ds[name] = ((self.f[f"{name}/values"], self.f[f"{name}/offsets"][()].tolist()) if ragged
                             else (self.f[name], None))

    def get(self, i: int) -> Row:
        if self.f is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._open()
        return {f: v[o[i]:o[i + 1]] if o is not None else v[i] for f, (v, o) in self.ds.items()}

    _pid = -1


class HFPeer(Peer):
    name = "HF datasets (Arrow)"

    def write(self, rows: list[Row]) -> None:
        import datasets

        feats = {}
        for f, (dt, shape, ragged) in self.spec.items():
            feats[f] = datasets.Array2D(shape=(None, shape[0]), dtype=dt) if ragged else \
                datasets.Sequence(datasets.Value(dt), length=shape[0])
        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_generator(_gen, gen_kwargs={"rows": rows}, features=datasets.Features(feats),
                                             cache_dir=str(self.d / "cache"), keep_in_memory=False)
        ds.save_to_disk(str(self.d / "saved"))
        shutil.rmtree(self.d / "cache")  # the saved copy is what is read (and counted)

    def open(self) -> None:
        import datasets

        self.ds = datasets.load_from_disk(str(self.d / "saved")).with_format("numpy")

    def get(self, i: int) -> Row:
        return self.ds[i]


def _gen(rows: list[Row]) -> Iterable[Row]:
    yield from rows


_LIT_ROWS: list[Row] = []


def _lit_fn(i: int) -> Row:
    return _LIT_ROWS[i]


class LitDataPeer(Peer):
    name = "LitData"

    def write(self, rows: list[Row]) -> None:
        import litdata

        global _LIT_ROWS
        _LIT_ROWS = rows
        litdata.optimize(fn=_lit_fn, inputs=list(range(len(rows))), output_dir=str(self.d), chunk_bytes="64MB",
                         num_workers=1, verbose=False, start_method="fork")
        _LIT_ROWS = []

    def open(self) -> None:
        import litdata

        self.ds = litdata.StreamingDataset(str(self.d))

    def get(self, i: int) -> Row:  # views into the chunk LitData holds in memory: copied like every peer's row
        return {k: np.array(v) for k, v in self.ds[i].items()}

    def loader(self, n: int, names: tuple[str, ...], seed: int) -> Iterable[Any]:
        import litdata

        ds = litdata.StreamingDataset(str(self.d), shuffle=True, seed=seed)
        return DataLoader(ds, batch_size=32, num_workers=2, collate_fn=functools.partial(collate, names=names))


class WebDatasetPeer(Peer):
    name = "webdataset (tar)"
    random_access = False

    def write(self, rows: list[Row]) -> None:
        import webdataset as wds

        self.d.mkdir(parents=True)
        per = max(1, -(-len(rows) // 8))  # 8 tar shards: both workers get some
        with wds.ShardWriter(str(self.d / "shard-%05d.tar"), maxcount=per, verbose=0) as w:
            for i, r in enumerate(rows):
                w.write({"__key__": f"{i:07d}", **{f"{f}.npy": a for f, a in r.items()}})

    def loader(self, n: int, names: tuple[str, ...], seed: int) -> Iterable[Any]:
        import webdataset as wds

        urls = sorted(str(p) for p in self.d.glob("*.tar"))
        ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False).shuffle(1000).decode()
              .map(_wds_row))
        return DataLoader(ds, batch_size=32, num_workers=2, collate_fn=functools.partial(collate, names=names))


def _wds_row(s: dict[str, Any]) -> Row:
    return {k[:-4]: v for k, v in s.items() if k.endswith(".npy")}


class ZarrPeer(Peer):
    name = "zarr v3"

    def write(self, rows: list[Row]) -> None:
        import zarr

        g = zarr.open_group(str(self.d), mode="w")
        for f, (dt, shape, ragged) in self.spec.items():
            arrs = [r[f] for r in rows]
            data = np.concatenate(arrs) if ragged else np.stack(arrs)
            per_chunk = max(1, 2**20 // (int(np.prod(shape)) * np.dtype(dt).itemsize))  # ~1 MiB chunks
            g.create_array(f"{f}/values" if ragged else f, data=data, chunks=(per_chunk, *shape), compressors=None)
            if ragged:
                g.create_array(f"{f}/offsets", data=np.concatenate([[0], np.cumsum([len(a) for a in arrs])]),
                               compressors=None)

    def open(self) -> None:
        import zarr

        g = zarr.open_group(str(self.d), mode="r")
        self.arrs = {f: (g[f"{f}/values"], g[f"{f}/offsets"][:].tolist()) if ragged else (g[f], None)
                     for f, (dt, shape, ragged) in self.spec.items()}

    def get(self, i: int) -> Row:
        return {f: a[o[i]:o[i + 1]] if o is not None else a[i] for f, (a, o) in self.arrs.items()}


PEERS: list[tuple[type[Peer], str | None]] = [  # (peer, module it needs)
    (MemmapPeer, None), (ShardSetPeer, None), (H5pyPeer, None), (HFPeer, "datasets"), (LitDataPeer, "litdata"),
    (WebDatasetPeer, "webdataset"), (ZarrPeer, "zarr"),
]


def _installed(mod: str | None) -> str | None:
    if mod is None:
        return None
    try:
        m = __import__(mod)
        return f"{mod} {getattr(m, '__version__', '?')}"
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"not installed ({type(e).__name__})"


def timed_reads(get: Callable[[Any], Row], args: list[Any], cap_s: float) -> float:
    """Reads/s of ``get(a)`` over ``args`` (stopping after ``cap_s`` seconds)."""
    t0 = time.perf_counter()
    done = 0
    for j in range(0, len(args), 256):
        for a in args[j:j + 256]:
            get(a)
        done = min(j + 256, len(args))
        if time.perf_counter() - t0 > cap_s:
            break
    return done / (time.perf_counter() - t0)


class _KeyReader:
    """A second row of the random-read table: the same files read by key."""

    def __init__(self, name: str, read: Callable[[str], Row]) -> None:
        self.name, self.read = name, read

    def random_reader(self) -> tuple[Callable[[Any], Row], Callable[[int], Any]]:
        return self.read, key_of


def timed_epoch(loader: Iterable[Any], n: int, cap_s: float) -> tuple[float, int, bool]:
    """(rows/s, rows seen, complete) of one pass through ``loader`` (worker start-up included)."""
    t0 = time.perf_counter()
    seen = 0
    it = iter(loader)
    for batch in it:
        seen += batch["n"]
        if time.perf_counter() - t0 > cap_s:
            break
    dt = time.perf_counter() - t0
    del it
    return seen / dt, seen, seen >= n


def run_workload(workload: str, n: int, work: Path, reads: int, passes: int, read_cap: float, epoch_cap: float,
                 epochs: int = 2, seed: int = 0, only: set[str] | None = None, epoch_stat: str = "best",
                 pass_reads: int = 5000) -> dict[str, Any]:
    rows = make_rows(workload, n, seed)
    payload = sum(a.nbytes for r in rows for a in r.values())
    names = tuple(WORKLOADS[workload])
    peers: list[Peer] = []
    res: dict[str, dict[str, Any]] = {}
    for cls, mod in PEERS:
        if only and cls.name not in only and cls is not MemmapPeer:
            continue
        info = _installed(mod)
        res[cls.name] = {"version": info}
        if info is not None and info.startswith("not installed"):
            continue
        p = cls(workload, work / f"{workload}-{cls.__name__}")
        t0 = time.perf_counter()
        p.write(rows)
        dt = time.perf_counter() - t0
        res[cls.name].update(write_MB_per_s=payload / 2**20 / dt, write_s=dt, bytes_on_disk=dir_bytes(p.d))
        if p.random_access:
            p.open()
            for i in (0, n // 2, n - 1):  # the rows read are the rows written
                got = p.get(i)
                for f in names:
                    np.testing.assert_array_equal(np.asarray(got[f]), rows[i][f], err_msg=f"{cls.name} {f} row {i}")
        peers.append(p)
    del rows
    order = np.random.default_rng(seed + 1).integers(0, n, size=reads).tolist()
    ra: list[Any] = [p for p in peers if p.random_access]
    mm = next(p for p in peers if isinstance(p, MemmapPeer))
    ss = next((p for p in peers if isinstance(p, ShardSetPeer)), None)
    if ss is not None:  # also by key: a str dict lookup per read (random keys: cache misses), against the same
        ra.insert(ra.index(mm) + 1, _KeyReader(KEY_BASELINE, mm.get_by_key))  # lookup done on raw memmaps
        ra.insert(ra.index(ss) + 1, _KeyReader(KEY_SHARDSET, ss.s.get))
        for r in ra[1:]:
            res.setdefault(r.name, {"version": None})
    readers = {p.name: p.random_reader() for p in ra}
    args = {name: [arg(i) for i in order] for name, (_, arg) in readers.items()}
    for name, (read, _) in readers.items():  # warm-up pass: page cache, lazy opens
        timed_reads(read, args[name], read_cap)
    best: dict[str, float] = {p.name: 0.0 for p in ra}
    per = max(1, min(pass_reads, reads))
    for k in range(passes):  # short passes, alternated, best kept: a load spike costs a pass, not the figure
        lo = (k * per) % max(1, reads - per + 1)
        for p in (ra if k % 2 == 0 else ra[::-1]):
            read = readers[p.name][0]
            best[p.name] = max(best[p.name], timed_reads(read, args[p.name][lo:lo + per], read_cap))
    for p in ra:
        res[p.name]["random_reads_per_s"] = best[p.name]
    for k in range(epochs):  # best of ``epochs`` alternated rounds (epoch k uses seed + k)
        for p in (peers if k % 2 == 0 else peers[::-1]):
            r = res[p.name]
            r.setdefault("random_reads_per_s", None)
            if "epoch_error" in r:
                continue
            try:
                rate, seen, complete = timed_epoch(p.loader(n, names, seed + k), n, epoch_cap)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run the epoch is reported, not fatal
                r["epoch_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                continue
            r.setdefault("epoch_rounds", []).append(rate)
            if rate > r.get("epoch_best", 0.0):
                r.update(epoch_best=rate, epoch_rows=seen, epoch_complete=complete)
    for r in res.values():
        if r.get("epoch_rounds"):
            r["epoch_rows_per_s"] = float(np.median(r["epoch_rounds"])) if epoch_stat == "median" else r["epoch_best"]
    base = res["np.memmap"]
    for r in res.values():
        for fig in ("random_reads_per_s", "epoch_rows_per_s", "write_MB_per_s", "bytes_on_disk"):
            if r.get(fig) and base.get(fig):
                r[f"{fig}_vs_memmap"] = r[fig] / base[fig]
    if KEY_SHARDSET in res:  # by key against the memmap read by key (the same lookup); the lookup's own cost
        kb = res[KEY_BASELINE]["random_reads_per_s"]
        res[KEY_SHARDSET]["random_reads_per_s_vs_memmap"] = res[KEY_SHARDSET]["random_reads_per_s"] / kb
        res[KEY_BASELINE]["lookup_cost_vs_memmap"] = kb / base["random_reads_per_s"]
        res[KEY_BASELINE]["random_reads_per_s_vs_memmap"] = 1.0
    if "ShardSet" in res:  # H19's per-shard checks: what opening the set costs with and without them
        d = work / f"{workload}-ShardSetPeer"
        t = {}
        for c in (True, False, True, False):
            t0 = time.perf_counter()
            ShardSet(d, check=c).close()
            t.setdefault(c, []).append(time.perf_counter() - t0)
        res["ShardSet"]["open_checked_s"], res["ShardSet"]["open_unchecked_s"] = min(t[True]), min(t[False])
    return {"rows": n, "payload_MB": payload / 2**20, "reads": reads, "peers": res}


def table(r: dict[str, Any]) -> str:
    def fmt(v: float | None, ratio: float | None, unit: str = "") -> str:
        if v is None:
            return "n/a"
        return f"{v:,.0f}{unit} ({ratio:.2f})" if ratio is not None else f"{v:,.0f}{unit}"

    lines = [f"Peers benchmark ({r['machine']}); ratios to np.memmap in brackets (the by-key rows: to np.memmap "
             f"(by key)); one run; random reads: best of {r.get('passes', '?')} alternated passes of "
             f"{r.get('pass_reads', '?')} reads; epoch: {r.get('epoch_stat', 'best')} of {r.get('epochs', 1)} "
             f"alternated rounds.", ""]
    for w, wr in r["workloads"].items():
        desc = ", ".join(f"{f} {dt} {'K x ' if rg else ''}{' x '.join(map(str, sh))}"
                         for f, (dt, sh, rg) in WORKLOADS[w].items())
        lines += [f"**{w}** ({wr['rows']:,} rows, {wr['payload_MB']:.0f} MB payload; {desc})",
                  "", "| peer | random reads/s | shuffled epoch rows/s (DataLoader, 2 workers) | write MB/s | "
                  "MB on disk |", "|---|---:|---:|---:|---:|"]
        for name, p in wr["peers"].items():
            if p.get("version", "") and str(p["version"]).startswith("not installed"):
                lines.append(f"| {name} | {p['version']} | | | |")
                continue
            rr = ("n/a (no random access)" if p.get("random_reads_per_s") is None
                  else fmt(p["random_reads_per_s"], p.get("random_reads_per_s_vs_memmap")))
            if "write_MB_per_s" not in p:  # a second way of reading the same files (by key: vs np.memmap by key)
                if "lookup_cost_vs_memmap" in p:
                    rr += f"; {p['lookup_cost_vs_memmap']:.2f} of np.memmap by position"
                lines.append(f"| {name} | {rr} | | | |")
                continue
            if "epoch_error" in p:
                ep = f"failed: {p['epoch_error']}"
            else:
                ep = fmt(p["epoch_rows_per_s"], p.get("epoch_rows_per_s_vs_memmap"))
                if not p["epoch_complete"]:
                    ep += f" partial: {p['epoch_rows']:,} rows in {r['epoch_cap']:.0f} s"
            wr_ = f"{p['write_MB_per_s']:,.0f} ({p['write_MB_per_s_vs_memmap']:.2f})"
            mb = f"{p['bytes_on_disk'] / 2**20:,.1f} ({p['bytes_on_disk_vs_memmap']:.2f})"
            lines.append(f"| {name} | {rr} | {ep} | {wr_} | {mb} |")
        s = wr["peers"].get("ShardSet", {})
        if "open_checked_s" in s:
            lines += ["", f"Opening the ShardSet with its per-shard checks: {s['open_checked_s'] * 1e3:.0f} ms, "
                          f"without: {s['open_unchecked_s'] * 1e3:.0f} ms (best of 2 each)."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every workload's row count")
    ap.add_argument("--workloads", default="fixed,yolo,regions")
    ap.add_argument("--reads", type=int, default=100_000, help="random positions drawn (passes take slices)")
    ap.add_argument("--pass-reads", type=int, default=5000, help="random reads per timed pass")
    ap.add_argument("--passes", type=int, default=20, help="timed passes per peer, alternated (best kept)")
    ap.add_argument("--read-cap", type=float, default=0.5, help="seconds per read pass")
    ap.add_argument("--epochs", type=int, default=2, help="alternated epoch rounds (best kept)")
    ap.add_argument("--epoch-stat", choices=("best", "median"), default="best", help="of the epoch rounds")
    ap.add_argument("--only", default="", help="comma-separated peer names (np.memmap always runs), e.g. "
                                               "'ShardSet,h5py (plain)'")
    ap.add_argument("--epoch-cap", type=float, default=15.0, help="seconds before an epoch is cut short")
    ap.add_argument("--out", default="benchmarks/out/peers.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="peers_"))
    r: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
                   f"Python {platform.python_version()}, numpy {np.__version__}, h5py {h5py.__version__}, "
                   f"torch {torch.__version__}",
        "epoch_cap": a.epoch_cap, "epochs": a.epochs, "epoch_stat": a.epoch_stat, "read_cap": a.read_cap, "passes": a.passes, "pass_reads": a.pass_reads, "workloads": {}}
    try:
        for w in a.workloads.split(","):
            n = max(8, int(ROWS[w] * a.scale))
            r["workloads"][w] = run_workload(w, n, work, a.reads, a.passes, a.read_cap, a.epoch_cap, a.epochs,
                                             only=set(a.only.split(",")) if a.only else None,
                                             epoch_stat=a.epoch_stat, pass_reads=a.pass_reads)
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["load_average_end"] = os.getloadavg()[0]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(r, indent=1) + "\n")
    print(table(r))


if __name__ == "__main__":
    main()
