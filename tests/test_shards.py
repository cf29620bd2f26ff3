"""Shard store: round trip, determinism, resume after a kill, verification, errors, torch Dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from grounding.shards import (
    FieldSpec,
    ItemFailed,
    Manifest,
    ShardError,
    ShardSet,
    ShardSetSpec,
    ShardWriter,
    digest,
    stage_key,
    verify_shard_set,
)
from grounding.shards.torch import ShardDataset

sys.path.insert(0, str(Path(__file__).parent))
from _writer_proc import FIELDS, row, spec, write_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]




def file_digests(d: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_round_trip_fixed_and_ragged(tmp_path: Path) -> None:
    m = write_set(tmp_path / "s", n=10, rps=4)
    assert [s.rows for s in m.shards] == [4, 4, 2]
    s = ShardSet(tmp_path / "s")
    assert s.keys == [f"img{i:05d}" for i in range(10)]  # storage order = input order
    for i in (0, 3, 4, 9):
        got, want = s.get(f"img{i:05d}"), row(i)
        assert got["embedding"].dtype == np.float16
        np.testing.assert_array_equal(got["embedding"], want["embedding"].astype(np.float16))
        np.testing.assert_array_equal(got["boxes"], want["boxes"])
        assert got["boxes"].shape == (i % 4, 4)
        assert int(got["label"]) == i % 7
    col = s.column("label")
    np.testing.assert_array_equal(col, np.arange(10) % 7)
    assert [len(b) for b in s.column("boxes")] == [i % 4 for i in range(10)]
    with pytest.raises(KeyError, match="img99999"):
        s.get("img99999")


def test_fixed_fields_are_memory_mapped(tmp_path: Path) -> None:
    write_set(tmp_path / "s")
    s = ShardSet(tmp_path / "s")
    s.get("img00001")
    mapped = s._memmap(0, "embedding")
    assert mapped is not None and not mapped.flags.writeable  # a read-only view of the file, no copy
    assert s._memmap(0, "label") is not None
    boxes = s._memmap(0, "boxes")  # ragged values are mapped too (issue 23); offsets loaded once per shard
    assert boxes is not None and not boxes.flags.writeable and boxes.shape == (0 + 1 + 2 + 3, 4)
    got = s.get("img00003")["boxes"]
    np.testing.assert_array_equal(got, row(3)["boxes"])
    assert got.flags.writeable and not np.shares_memory(got, boxes)  # a copy, safe to keep


def test_two_runs_give_identical_bytes(tmp_path: Path) -> None:
    write_set(tmp_path / "a")
    write_set(tmp_path / "b")
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")


def test_complete_set_is_not_rewritten(tmp_path: Path) -> None:
    write_set(tmp_path / "s")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    keys = [f"img{i:05d}" for i in range(10)]
    w = ShardWriter(tmp_path / "s", spec(4), keys, progress=False)
    assert w.complete and list(w.todo()) == []
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()} == before


def test_stale_key_replaces_the_set(tmp_path: Path) -> None:
    write_set(tmp_path / "s", key="old")
    m = write_set(tmp_path / "s", key="new")
    assert Manifest.load(tmp_path / "s").stage_key == "new" == m.stage_key
    assert verify_shard_set(tmp_path / "s").ok


def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path) -> None:
    n, rps = 40, 5
    ref_dir, out, counts = tmp_path / "ref", tmp_path / "out", tmp_path / "counts.txt"
    script = str(ROOT / "tests" / "_writer_proc.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, script, str(ref_dir), str(n), str(rps), "0", str(counts)], check=True, env=env)
    proc = subprocess.Popen([sys.executable, script, str(out), str(n), str(rps), "0.05", str(counts)], env=env)
    deadline = time.time() + 60
    while not (out / "shard-00002.h5").exists():  # let three shards finish, then kill mid-run
        assert time.time() < deadline and proc.poll() is None, "writer finished or stalled before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardSet(out)  # an uncommitted set is never read as valid
    subprocess.run([sys.executable, script, str(out), str(n), str(rps), "0", str(counts)], check=True, env=env)
    assert file_digests(out) == file_digests(ref_dir)
    first, resumed = (int(x) for x in counts.read_text().split())
    assert first == n and resumed <= n - 3 * rps  # the rerun computed only the missing shards


def test_partial_and_foreign_files_are_discarded_on_resume(tmp_path: Path) -> None:
    write_set(tmp_path / "ref")
    out = tmp_path / "out"
    write_set(out)
    (out / "manifest.json").unlink()
    (out / "shard-00001.h5").write_bytes(b"garbage, as after a crash mid-copy")
    (out / "shard-00002.h5.tmp-123").write_bytes(b"partial")
    write_set(out)
    assert file_digests(out) == file_digests(tmp_path / "ref")


def test_verify_catches_a_flipped_byte(tmp_path: Path) -> None:
    write_set(tmp_path / "s")
    assert verify_shard_set(tmp_path / "s").ok
    shard = tmp_path / "s" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_shard_set(tmp_path / "s")
    assert not report.ok and "shard-00001.h5: sha256" in report.problems[0]


def test_verify_catches_missing_shard_and_bad_counts(tmp_path: Path) -> None:
    write_set(tmp_path / "s")
    (tmp_path / "s" / "shard-00002.h5").unlink()
    assert any("missing" in p for p in verify_shard_set(tmp_path / "s").problems)
    write_set(tmp_path / "t")
    doc = json.loads((tmp_path / "t" / "manifest.json").read_text())
    doc["shards"][0]["rows"] = 3
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(doc))
    assert any("4 keys, manifest says 3" in p for p in verify_shard_set(tmp_path / "t").problems)


def test_newer_manifest_version_is_a_clear_error(tmp_path: Path) -> None:
    write_set(tmp_path / "s")
    doc = json.loads((tmp_path / "s" / "manifest.json").read_text())
    doc["format_version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ShardError, match="format version 99 is newer"):
        ShardSet(tmp_path / "s")
    assert "newer" in verify_shard_set(tmp_path / "s").problems[0]


def test_skip_policy_records_errors_and_keeps_partition(tmp_path: Path) -> None:
    keys = [f"img{i:05d}" for i in range(10)]
    sp = ShardSetSpec(stage="test", stage_key="k", level="image", fields=FIELDS, rows_per_shard=4, on_error="skip")
    with ShardWriter(tmp_path / "s", sp, keys, progress=False) as w:
        for k in w.todo():
            if k in ("img00001", "img00006"):
                w.skip(k, "corrupt image")
            else:
                w.add(k, row(int(k[3:])))
    m = Manifest.load(tmp_path / "s")
    assert [e["item"] for e in m.errors] == ["img00001", "img00006"]
    assert m.errors[0]["reason"] == "corrupt image"
    assert [s.rows for s in m.shards] == [3, 3, 2] and [s.item_count for s in m.shards] == [4, 4, 2]
    assert "img00001" not in ShardSet(tmp_path / "s")
    assert verify_shard_set(tmp_path / "s").ok


def test_fail_policy_raises_and_keeps_finished_shards(tmp_path: Path) -> None:
    keys = [f"img{i:05d}" for i in range(10)]
    with pytest.raises(ItemFailed, match="img00006.*truncated"):
        with ShardWriter(tmp_path / "s", spec(4), keys, progress=False) as w:
            for k in w.todo():
                if k == "img00006":
                    w.skip(k, "truncated file")
                w.add(k, row(int(k[3:])))
    assert (tmp_path / "s" / "shard-00000.h5").exists()
    assert not (tmp_path / "s" / "manifest.json").exists()
    w2 = ShardWriter(tmp_path / "s", spec(4), keys, progress=False)
    assert list(w2.todo())[0] == "img00004"  # the finished shard is kept for the rerun


def test_writer_rejects_out_of_order_and_bad_rows(tmp_path: Path) -> None:
    keys = ["a", "b"]
    w = ShardWriter(tmp_path / "s", spec(4), keys, progress=False)
    with pytest.raises(ShardError, match="out of order: got 'b', expected 'a'"):
        w.add("b", row(1))
    bad = row(0)
    bad["embedding"] = np.zeros(3)
    with pytest.raises(ShardError, match=r"shape \(3,\), expected \(16,\)"):
        w.add("a", bad)
    with pytest.raises(ShardError, match="missing fields"):
        w.add("a", {"embedding": np.zeros(16)})
    with pytest.raises(ValueError, match="duplicate item key"):
        ShardWriter(tmp_path / "t", spec(4), ["a", "a"], progress=False)


def test_empty_item_list_commits_an_empty_set(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "s", spec(4), [], progress=False):
        pass
    s = ShardSet(tmp_path / "s")
    assert len(s) == 0 and verify_shard_set(tmp_path / "s").ok


def test_stage_key_is_type_tagged_and_order_free() -> None:
    base = stage_key("s", "c", {"m": "x"}, {"a": 1, "b": 2.0}, {"d": "f"})
    assert base == stage_key("s", "c", {"m": "x"}, {"b": 2.0, "a": 1}, {"d": "f"})
    assert base != stage_key("s", "c", {"m": "x"}, {"a": 1.0, "b": 2.0}, {"d": "f"})
    assert base != stage_key("s", "c2", {"m": "x"}, {"a": 1, "b": 2.0}, {"d": "f"})
    assert base != stage_key("s", "c", {"m": "x"}, {"a": 1, "b": 2.0}, {"d": "g"})
    assert digest([1, "1"]) != digest(["1", 1])
    assert digest(np.arange(3)) != digest(np.arange(3).astype(np.float32))
    with pytest.raises(TypeError, match="path"):
        digest({"w": Path("weights.pt")})
    with pytest.raises(TypeError, match="object"):
        digest(object())


def _write_joined(tmp_path: Path) -> tuple[Path, Path]:
    img_dir, sent_dir = tmp_path / "img", tmp_path / "sent"
    write_set(img_dir, n=6, rps=4)
    sp = ShardSetSpec(stage="sent", stage_key="k", level="sentence",
                      fields=(FieldSpec("text_emb", "float16", (8,)),), rows_per_shard=3)
    keys = [f"ref{i}" for i in range(12)]
    with ShardWriter(sent_dir, sp, keys, progress=False) as w:
        for k in w.todo():
            w.add(k, {"text_emb": np.full(8, int(k[3:]), np.float32)})
    return img_dir, sent_dir


def test_torch_dataset_joins_sets_under_two_workers(tmp_path: Path) -> None:
    img_dir, sent_dir = _write_joined(tmp_path)
    ref_to_img = {f"ref{i}": f"img{i // 2:05d}" for i in range(12)}
    ds = ShardDataset({"sent": sent_dir, "img": img_dir}, key_maps={"img": ref_to_img})
    ds[0]  # open HDF5 handles in the parent first: the forked workers must not reuse them
    loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=ds.collate, shuffle=False)
    seen = []
    for batch in loader:
        assert batch["sent"]["text_emb"].shape[1:] == (8,)
        assert isinstance(batch["img"]["boxes"], list)  # ragged stays a list
        for j, key in enumerate(batch["key"]):
            i = int(key[3:])
            assert batch["sent"]["text_emb"][j, 0].item() == i
            want = torch.from_numpy(row(i // 2)["embedding"].astype(np.float16))
            assert torch.equal(batch["img"]["embedding"][j], want)
            assert batch["img"]["boxes"][j].shape == (i // 2 % 4, 4)
            seen.append(key)
    assert seen == ds.keys


def test_torch_dataset_reports_missing_join(tmp_path: Path) -> None:
    img_dir, sent_dir = _write_joined(tmp_path)
    with pytest.raises(KeyError, match="ref0.*no row in set 'img'"):
        ShardDataset({"sent": sent_dir, "img": img_dir}, key_maps={"img": {"ref0": "nope"}})


def test_fan_out_parts_then_commit_equals_serial(tmp_path: Path) -> None:
    write_set(tmp_path / "serial", n=10, rps=3)
    keys = [f"img{i:05d}" for i in range(10)]
    out = tmp_path / "parts"
    for part in ([0, 2], [1, 3]):  # two workers, disjoint shards
        with ShardWriter(out, spec(3), keys, progress=False, shards=part) as w:
            assert {keys.index(k) // 3 for k in w.todo()} == set(part)
            for k in w.todo():
                w.add(k, row(int(k[3:])))
        assert not (out / "manifest.json").exists()  # parts never commit
    with pytest.raises(ShardError, match="cannot commit"):
        ShardWriter(out, spec(3), keys, progress=False, shards=[0]).commit()
    with ShardWriter(out, spec(3), keys, progress=False) as w:
        assert list(w.todo()) == []  # everything was written by the parts
    assert file_digests(out) == file_digests(tmp_path / "serial")
