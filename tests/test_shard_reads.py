"""Issue 23: ragged fields read through memory maps, get_many, batched DataLoader fetch, shard-local sampler."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from grounding.shards import ShardError, ShardSet, ShardWriter
from grounding.shards.torch import ShardDataset, ShardLocalSampler

sys.path.insert(0, str(Path(__file__).parent))
from _writer_proc import row, spec  # noqa: E402


def write(out: Path, n: int = 23, rps: int = 5) -> list[str]:
    keys = [f"img{i:05d}" for i in range(n)]
    with ShardWriter(out, spec(rps), keys, progress=False) as w:
        for k in w.todo():
            w.add(k, row(int(k[3:])))
    return keys


def test_ragged_rows_are_two_slices_of_mapped_values(tmp_path: Path) -> None:
    keys = write(tmp_path / "s")
    s = ShardSet(tmp_path / "s")
    for i, k in enumerate(keys):  # every row, across shard boundaries, including empty rows (i % 4 == 0)
        got = s.get(k)
        np.testing.assert_array_equal(got["boxes"], row(i)["boxes"])
        assert got["boxes"].shape == (i % 4, 4) and got["boxes"].dtype == np.float32
    assert all(s._memmap(si, "boxes") is not None for si in range(len(s.manifest.shards)))
    # the readers are built once per shard and field: reading again adds none
    n = sum(len(r) for r in s._maps.values())
    for k in keys:
        s.get(k)
    assert sum(len(r) for r in s._maps.values()) == n == len(s.manifest.shards) * 3


def test_get_many_keeps_the_order_given(tmp_path: Path) -> None:
    keys = write(tmp_path / "s")
    s = ShardSet(tmp_path / "s")
    order = list(np.random.default_rng(1).permutation(len(keys)))
    picked = [keys[i] for i in order] + [keys[3]]  # repeats are allowed
    rows = s.get_many(picked, ["boxes", "label"])
    assert len(rows) == len(picked)
    for k, r in zip(picked, rows):
        assert set(r) == {"boxes", "label"}
        np.testing.assert_array_equal(r["boxes"], s.get(k)["boxes"])
        assert int(r["label"]) == int(k[3:]) % 7
    rids = [s.row_id(k) for k in picked]
    assert [ShardSet.shard_of(r) for r in rids] == [s.locate(k)[0] for k in picked]
    for k, r, rr in zip(picked, rids, s.get_rows(rids)):
        np.testing.assert_array_equal(rr["boxes"], s.get_row(r)["boxes"])
        np.testing.assert_array_equal(rr["embedding"], s.get(k)["embedding"])
    with pytest.raises(KeyError, match="nope"):
        s.get_many([keys[0], "nope"])
    with pytest.raises(KeyError, match="nope"):
        s.row_id("nope")
    with pytest.raises(KeyError, match="no field 'bogus'"):
        s.get_many([keys[0]], ["bogus"])


def test_replaced_shard_is_still_refused_by_the_mapped_reader(tmp_path: Path) -> None:
    keys = write(tmp_path / "s")
    s = ShardSet(tmp_path / "s")  # checked at open, shards not yet opened
    write(tmp_path / "s2")
    victim = tmp_path / "s" / s.manifest.shards[1].file
    (tmp_path / "s2" / victim.name).replace(victim)  # same bytes, another inode: still another file
    s.get(keys[0])  # shard 0 untouched
    with pytest.raises(ShardError, match="changed since this reader opened"):
        s.get(keys[6])


def test_dataloader_batches_go_through_get_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = write(tmp_path / "s")
    ds = ShardDataset({"s": tmp_path / "s"})
    calls: list[int] = []
    real = ShardSet.get_rows

    def spy(self: ShardSet, ids, fields=None):  # noqa: ANN001
        calls.append(len(ids))
        return real(self, ids, fields)

    monkeypatch.setattr(ShardSet, "get_rows", spy)
    dl = DataLoader(ds, batch_size=4, collate_fn=ds.collate, num_workers=0,
                    sampler=ShardLocalSampler(ds, buffer=3, seed=0))
    seen = []
    for b in dl:
        seen.extend(b["key"])
        for k, boxes in zip(b["key"], b["s"]["boxes"]):
            torch.testing.assert_close(boxes, torch.from_numpy(row(int(k[3:]))["boxes"]))
    assert sorted(seen) == keys and calls == [4, 4, 4, 4, 4, 3]


def test_sampler_epochs_are_seeded_permutations_that_stay_shard_local(tmp_path: Path) -> None:
    keys = write(tmp_path / "s", n=200, rps=40)
    ds = ShardDataset({"s": tmp_path / "s"})
    shard = ds.shard_of()
    a, b = ShardLocalSampler(ds, buffer=16, seed=7), ShardLocalSampler(ds, buffer=16, seed=7)
    e0, e1 = list(a), list(a)
    assert sorted(e0) == sorted(e1) == list(range(len(keys)))  # the same rows every epoch, each once
    assert e0 != e1 and e0 == list(b) and e1 == list(b)  # new order per epoch; same seed, same orders
    assert list(ShardLocalSampler(ds, buffer=16, seed=8)) != e0
    b.set_epoch(0)
    assert list(b) == e0
    # shard-local: a window of 16 consecutive samples touches about two of the 5 shards (a buffered index may
    # linger, so not always); a global shuffle touches nearly all 5
    def spread(order: list[int]) -> float:
        return float(np.mean([len({shard[i] for i in order[j:j + 16]}) for j in range(len(order) - 16)]))

    assert spread(e0) < 2.6 and spread(list(np.random.default_rng(0).permutation(len(keys)))) > 4
    # and the shard order itself is shuffled across epochs / seeds
    firsts = {shard[list(ShardLocalSampler(ds, buffer=1, seed=s))[0]] for s in range(20)}
    assert len(firsts) > 1
    with pytest.raises(ValueError, match="buffer"):
        ShardLocalSampler(ds, buffer=0)


def test_sampler_with_two_workers_reads_every_row_once(tmp_path: Path) -> None:
    keys = write(tmp_path / "s", n=60, rps=16)
    ds = ShardDataset({"s": tmp_path / "s"}, fields={"s": ["boxes"]})
    dl = DataLoader(ds, batch_size=8, collate_fn=ds.collate, num_workers=2,
                    sampler=ShardLocalSampler(ds, buffer=8, seed=3))
    seen = [k for b in dl for k in b["key"]]
    assert sorted(seen) == keys


def test_sampler_sources_agree(tmp_path: Path) -> None:
    write(tmp_path / "s", n=30, rps=7)
    s = ShardSet(tmp_path / "s")
    ds = ShardDataset({"s": s})
    shard = [s.locate(k)[0] for k in s.keys]
    orders = [list(ShardLocalSampler(src, buffer=4, seed=2)) for src in (ds, s, shard)]
    assert orders[0] == orders[1] == orders[2] and sorted(orders[0]) == list(range(30))


def _h5py_row(path: Path, s: ShardSet, key: str) -> dict[str, np.ndarray]:
    """The row of ``key`` read through h5py alone (the reference the mapped reader must equal)."""
    import h5py

    si, ri = s.locate(key)
    out = {}
    with h5py.File(path / s.manifest.shards[si].file, "r") as f:
        for name, spec_ in s.fields.items():
            if spec_.ragged:
                lo, hi = f[name]["offsets"][ri:ri + 2]
                out[name] = f[name]["values"][lo:hi]
            else:
                out[name] = f[name][ri]
    return out


def test_every_read_path_equals_h5py_for_fixed_and_ragged_fields(tmp_path: Path) -> None:
    keys = write(tmp_path / "s", n=23, rps=5)
    s = ShardSet(tmp_path / "s")
    order = [keys[i] for i in np.random.default_rng(4).permutation(len(keys))] + [keys[0], keys[0]]
    many, many_sel = s.get_many(order), s.get_many(order, ("label", "boxes"))
    rows_ = s.get_rows([s.row_id(k) for k in order])
    for j, k in enumerate(order):
        ref = _h5py_row(tmp_path / "s", s, k)
        for got in (s.get(k), s.get_row(s.row_id(k)), many[j], rows_[j], s[k]):
            assert list(got) == list(s.fields)  # every field, in schema order
            for name in s.fields:
                assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape
                np.testing.assert_array_equal(got[name], ref[name])
        for got in (s.get(k, ["boxes"]), s.get_row(s.row_id(k), ("boxes",))):
            assert list(got) == ["boxes"]
            np.testing.assert_array_equal(got["boxes"], ref["boxes"])
        assert list(many_sel[j]) == ["label", "boxes"] and many_sel[j]["label"] == ref["label"]
    got = s.get(keys[7])  # copies: writing one changes nothing stored
    got["embedding"][:] = 0
    got["boxes"][:] = 0
    np.testing.assert_array_equal(s.get(keys[7])["boxes"], row(7)["boxes"])
    assert got["embedding"].flags.writeable and np.any(s.get(keys[7])["embedding"] != 0)


def test_a_forked_child_reopens_its_own_maps_and_reads_the_same_rows(tmp_path: Path) -> None:
    import multiprocessing as mp

    keys = write(tmp_path / "s", n=23, rps=5)
    s = ShardSet(tmp_path / "s")
    parent = {k: s.get(k) for k in keys}  # every shard opened and mapped in the parent
    parent_fds = {si: f.id.get_vfd_handle() for si, f in s._files.items()}
    assert all(h is not None for h in s._hot)

    def child(q) -> None:  # noqa: ANN001
        fresh = all(h is None for h in s._hot) and not s._files and not s._sel  # forgotten at fork
        rows_ = {k: s.get(k) for k in keys}
        fds = {si: f.id.get_vfd_handle() for si, f in s._files.items()}
        q.put((fresh, {k: {n: (a.tobytes(), a.shape) for n, a in r.items()} for k, r in rows_.items()}, fds))

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    fresh, rows_, fds = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0 and fresh
    assert sorted(fds) == sorted(parent_fds)  # the child opened every shard itself
    for k in keys:
        for n in s.fields:
            raw, shape = rows_[k][n]
            assert shape == parent[k][n].shape and raw == parent[k][n].tobytes()
    assert all(h is not None for h in s._hot)  # the parent's readers are untouched


def test_dataloader_workers_after_a_parent_read_get_the_rows_through_get_rows(tmp_path: Path) -> None:
    keys = write(tmp_path / "s", n=40, rps=6)
    ds = ShardDataset({"s": tmp_path / "s"})
    ds[0]  # the parent maps shard 0 before the workers fork
    dl = DataLoader(ds, batch_size=5, collate_fn=ds.collate, num_workers=2,
                    sampler=ShardLocalSampler(ds, buffer=4, seed=1))
    seen = {}
    for b in dl:
        for k, boxes, emb in zip(b["key"], b["s"]["boxes"], b["s"]["embedding"]):
            seen[k] = (boxes, emb)
    assert sorted(seen) == keys
    for k, (boxes, emb) in seen.items():
        r = row(int(k[3:]))
        torch.testing.assert_close(boxes, torch.from_numpy(r["boxes"]))
        torch.testing.assert_close(emb, torch.from_numpy(r["embedding"].astype(np.float16)))
