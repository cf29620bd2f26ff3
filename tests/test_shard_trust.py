"""Issue 19: the shard store trusts nothing it did not check.

* one writer per directory (two processes on one directory, same and different params): the second fails
  at once naming the first, or waits for it; both results verify; no committed set mixes two runs; nobody
  deletes a live writer's temporaries; the commit re-hashes what it lists;
* readers that notice a rewrite (generation id, inode and size recorded at open);
* manifests that cannot point outside and whose every field is type-checked, shards checked against the
  schema on first open (dtype, shape, ragged offsets, content key), from ``verify``, ``info``, ``show`` and
  the reader alike;
* entry points that print one line (CLI, ``python -m stages.*``), lone surrogates, booleans as numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from grounding import config as C
from grounding.cli import app
from grounding.data.builder import DatasetBuilder
from grounding.data.schema import CanonicalDataset, DataError, ImageRecord
from grounding.shards import Manifest, ShardError, ShardSet, ShardWriter, file_sha256, verify_shard_set
from grounding.shards.generation import file_generation, generation_of
from grounding.shards.lock import LOCK_FILE, DirLock, LockHeld

sys.path.insert(0, str(Path(__file__).parent))
from _writer_proc import row, spec, write_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).parent / "_writer_proc.py"
runner = CliRunner()


# ---- 1. one writer per directory ------------------------------------------------------------------------------
def _start(out: Path, count: Path, key: str, sleep_s: float, wait: bool = False, n: int = 16) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(HELPER), str(out), str(n), "4", str(sleep_s), str(count), key, "wait" if wait else "-"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until_locked_by(out: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if json.loads((out / LOCK_FILE).read_text() or "{}").get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first writer never took the lock")


def _one_run(out: Path, key: str) -> None:
    """The committed set in ``out`` verifies and every shard in it is this run's (key, generation)."""
    report = verify_shard_set(out)
    assert report.ok, report.problems
    m = Manifest.load(out)
    assert m.stage_key == key and m.generation == generation_of(key)
    assert all(file_generation(out / s.file) == m.generation for s in m.shards)
    s = ShardSet(out)
    for k in s.keys:
        np.testing.assert_array_equal(s.get(k)["embedding"], row(int(k[3:]))["embedding"].astype(np.float16))


@pytest.mark.parametrize("second_key", ["test-key", "other-key"], ids=["same-params", "different-params"])
def test_second_writer_fails_at_once_naming_the_first(tmp_path: Path, second_key: str) -> None:
    out, count = tmp_path / "s", tmp_path / "count"
    first = _start(out, count, "test-key", 0.15)
    _until_locked_by(out, first)
    second = _start(out, count, second_key, 0.0)
    _, err = second.communicate(timeout=60)
    assert second.returncode != 0
    assert f"another writer is writing this shard set: pid {first.pid} on host" in err and "_writer_proc.py" in err
    assert "--wait" in err
    assert first.wait(timeout=120) == 0, first.communicate()  # the first was not disturbed (temporaries kept)
    _one_run(out, "test-key")
    assert not (out / LOCK_FILE).exists()  # removed by its holder on release


@pytest.mark.parametrize("second_key", ["test-key", "other-key"], ids=["same-params", "different-params"])
def test_second_writer_waits_then_finds_or_replaces_the_set(tmp_path: Path, second_key: str) -> None:
    out, count = tmp_path / "s", tmp_path / "count"
    first = _start(out, count, "test-key", 0.1)
    _until_locked_by(out, first)
    second = _start(out, count, second_key, 0.0, wait=True)
    _, err2 = second.communicate(timeout=120)
    assert first.wait(timeout=120) == 0 and second.returncode == 0, err2
    assert f"waiting for pid {first.pid}" in err2
    computed = [int(x) for x in count.read_text().split()]
    # same params: the second finds the first's set complete (a cache hit); different: it rewrites it whole
    assert computed == ([16, 0] if second_key == "test-key" else [16, 16])
    _one_run(out, second_key)


def test_lock_is_released_by_the_os_when_the_holder_is_killed(tmp_path: Path) -> None:
    out, count = tmp_path / "s", tmp_path / "count"
    first = _start(out, count, "test-key", 0.2)
    _until_locked_by(out, first)
    first.kill()
    first.wait()
    assert (out / LOCK_FILE).exists()  # a stale file, no lock: the next writer takes it over
    write_set(out, n=16)
    _one_run(out, "test-key")


def test_same_process_second_writer_and_shared_parts(tmp_path: Path) -> None:
    out = tmp_path / "s"
    keys = [f"img{i:05d}" for i in range(8)]
    w = ShardWriter(out, spec(4), keys, progress=False)
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        ShardWriter(out, spec(4), keys, progress=False)
    with pytest.raises(LockHeld):  # a fan-out part never runs beside a full writer
        ShardWriter(out, spec(4), keys, progress=False, shards=[1])
    w.close()
    a = ShardWriter(out, spec(4), keys, progress=False, shards=[0])
    b = ShardWriter(out, spec(4), keys, progress=False, shards=[1])  # parts share the lock
    with pytest.raises(LockHeld):
        ShardWriter(out, spec(4), keys, progress=False)
    a.close()
    b.close()


def test_temporaries_of_others_are_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    foreign = out / "shard-00000.h5.tmp-1"  # e.g. a part of another fan-out run, writing beside us
    foreign.write_bytes(b"partial")
    keys = [f"img{i:05d}" for i in range(8)]
    with ShardWriter(out, spec(4), keys, progress=False, shards=[0]) as w:  # a part (shared lock)
        for k in w.todo():
            w.add(k, row(int(k[3:])))
    assert foreign.exists()
    write_set(out, n=8)  # the exclusive writer: no other writer is alive, so the temporary is a dead one's
    assert not foreign.exists()


def test_commit_rehashes_every_shard(tmp_path: Path) -> None:
    write_set(tmp_path / "other", n=8, key="other-key")
    out = tmp_path / "s"
    keys = [f"img{i:05d}" for i in range(8)]
    with pytest.raises(ShardError, match=r"shard-00000\.h5: changed on disk since this writer wrote it"):
        with ShardWriter(out, spec(4), keys, progress=False) as w:
            for k in w.todo():
                w.add(k, row(int(k[3:])))
                if k == "img00005":  # another process swaps in its own shard 0 behind our back
                    shutil.copyfile(tmp_path / "other" / "shard-00000.h5", out / "shard-00000.h5")
    assert not (out / "manifest.json").exists()


def test_a_failure_never_leaves_an_empty_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, spec(4), ["a", "b"], progress=False):
            raise RuntimeError("killed")
    assert not out.exists()
    ds = CanonicalDataset("\udcff", tmp_path, [ImageRecord("1", "a.jpg", 4, 4, "0")], [])
    with pytest.raises(UnicodeEncodeError):  # a name that cannot be stored: nothing left behind
        ds.save(tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


# ---- 2. readers that notice ----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["other-params", "extension-kept-shards"])
def test_reader_opened_before_a_rewrite_raises(tmp_path: Path, how: str) -> None:
    out = tmp_path / "s"
    write_set(out, n=12)
    s = ShardSet(out)
    first = s.get("img00000")  # shard 0 opened before the rewrite
    if how == "other-params":
        write_set(out, n=12, key="other-key")
    else:  # shard 1 is kept by inode and re-stamped in place with the new generation
        m = Manifest.load(out)
        (out / "manifest.json").unlink()
        doc = json.loads(m.to_json())
        doc.pop("n_rows")
        write_set(out, n=12, key="other-key")
    with pytest.raises(ShardError, match=rf"{out}: shard-00001\.h5 changed since this reader opened the set "
                                         rf"\(generation {generation_of('test-key')} -> {generation_of('other-key')}"):
        s.get("img00004")
    np.testing.assert_array_equal(s.get("img00000")["embedding"], first["embedding"])  # the old file, still open
    assert len(ShardSet(out)) == 12  # a fresh reader sees the new set


# ---- 3. manifests that cannot point outside ------------------------------------------------------------------
def _resign(out: Path, doc: dict) -> None:
    """Write ``doc`` as the manifest with every shard's sha256 and size recomputed (a consistent forgery)."""
    for s in doc["shards"]:
        f = out / s["file"]
        if f.is_file() and f.parent == out:
            s["sha256"], s["size"] = file_sha256(f), f.stat().st_size
    (out / "manifest.json").write_text(json.dumps(doc))


def _tamper(case: str, out: Path, tmp_path: Path) -> None:
    doc = json.loads((out / "manifest.json").read_text())
    outside = tmp_path / "x.h5"
    shutil.copyfile(out / "shard-00000.h5", outside)
    if case == "parent-path":
        doc["shards"][0]["file"] = "../x.h5"
    elif case == "absolute-path":
        doc["shards"][0]["file"] = str(outside)
    elif case in ("string-size", "bool-rows"):
        if case == "string-size":
            doc["shards"][0]["size"] = str(doc["shards"][0]["size"])
        else:
            doc["shards"][0]["rows"] = True
        (out / "manifest.json").write_text(json.dumps(doc))
        return
    elif case == "ragged-flag-flipped":
        doc["fields"][0]["ragged"] = True
        _resign(out, doc)
        return
    elif case == "dtype-changed":
        doc["fields"][0]["dtype"] = "float32"
    elif case == "shape-changed":
        doc["fields"][0]["shape"] = [8]
    elif case == "offsets-re-signed":
        with h5py.File(out / "shard-00001.h5", "r+") as f:
            offs = f["boxes/offsets"]
            offs[-1] = offs[-1] + 5  # ends past the values
    elif case == "shard-from-another-set":
        write_set(tmp_path / "other", n=10, key="other-key")
        shutil.copyfile(tmp_path / "other" / "shard-00001.h5", out / "shard-00001.h5")
    elif case == "generation-edited":
        doc["generation"] = "0" * 32
    else:
        raise AssertionError(case)
    _resign(out, doc)


TAMPER = {  # case -> what the named error says
    "parent-path": r"shards\[0\]\.file '\.\./x\.h5' is not shard-00000\.h5",
    "absolute-path": r"shards\[0\]\.file '/.*x\.h5' is not shard-00000\.h5",
    "string-size": r"shards\[0\]\.size is str",
    "bool-rows": r"shards\[0\]\.rows is bool",
    "ragged-flag-flipped": r"shard-00000\.h5: field embedding is not stored as ragged values \+ offsets",
    "dtype-changed": r"shard-00000\.h5: embedding is float16\(4, 16\), schema float32",
    "shape-changed": r"shard-00000\.h5: embedding is float16\(4, 16\), schema float16\(4, 8\)",
    "offsets-re-signed": r"shard-00001\.h5: boxes offsets are inconsistent with \d+ values",
    "shard-from-another-set": r"shard-00001\.h5: content key .* \(a shard of another set\?\)",
    "generation-edited": r"shard-00000\.h5: generation [0-9a-f]{32}, manifest says 0{32}",
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_manifest_is_a_named_error_everywhere(tmp_path: Path, case: str) -> None:
    import re

    out = tmp_path / "s"
    write_set(out)
    _tamper(case, out, tmp_path)
    want = TAMPER[case]
    with pytest.raises(ShardError, match=want):
        ShardSet(out)
    report = verify_shard_set(out)
    assert any(re.search(want, p) for p in report.problems), report.problems
    for args in (["shards", "info", str(out)], ["shards", "show", str(out), "img00004"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
        assert re.search(want, " ".join(res.output.split())), res.output
    res = runner.invoke(app, ["shards", "verify", str(out)])
    assert res.exit_code == 1 and "FAIL" in res.output


def test_previous_format_2_still_reads(tmp_path: Path) -> None:
    """Format-2 sets (no generation, no user block) still read and verify; writers rewrite them as format 3."""
    out = tmp_path / "s"
    write_set(out)
    doc = json.loads((out / "manifest.json").read_text())
    doc["format_version"] = 2
    doc.pop("generation")
    for s in doc["shards"]:
        with h5py.File(out / s["file"], "r+") as f:
            f.attrs["format_version"] = 2
    _resign(out, doc)
    assert verify_shard_set(out).ok
    assert ShardSet(out).manifest.format_version == 2 and len(ShardSet(out)) == 10
    m = write_set(out)
    assert m.format_version == 3 and verify_shard_set(out).ok


def test_fields_are_type_checked(tmp_path: Path) -> None:
    out = tmp_path / "s"
    write_set(out)
    doc = json.loads((out / "manifest.json").read_text())
    doc["fields"][1]["ragged"] = "yes"
    (out / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ShardError, match=r"fields\[1\]\.ragged is str 'yes', expected bool"):
        ShardSet(out)


# ---- 4. entry points, text, params ---------------------------------------------------------------------------
def test_lone_surrogate_is_a_per_item_error(tmp_path: Path) -> None:
    try:
        from fixtures import formats as F
    except ImportError:
        from tests.fixtures import formats as F
    from grounding.data.simrec import read_simrec

    data = F.simrec_data()
    data["val"][0]["refs"] = ["the dog \ud800 on the left", "the cat"]
    paths = F.make_simrec(tmp_path, data)
    with pytest.raises(DataError, match=r"ref refcoco/1/0: text is not valid Unicode \(lone surrogate U\+D800 at "
                                        r"character 8\)"):
        read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco")
    ds = read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco", on_error="skip")
    why = {e["item"]: e["reason"] for e in ds.errors}
    assert "not valid Unicode" in why["ref refcoco/1/0"] and "refcoco/1/1" in {r.ref_id for r in ds.refs}
    ds.save(tmp_path / "prepared")  # the rest is stored
    assert CanonicalDataset.load(tmp_path / "prepared").fingerprint() == ds.fingerprint()
    b = DatasetBuilder("t", tmp_path, on_error="skip")
    b.add_image(ImageRecord("1", "a.jpg", 10, 10, "0"))
    assert not b.add_ref(ref_id="r\udcff", image_id="1", text="a dog", split="train", box=None)
    assert b.errors[0]["item"] == "ref r\\udcff"  # recorded storably
    with pytest.raises(ValueError, match="not valid Unicode"):
        ShardWriter(tmp_path / "w", spec(4), ["a\ud800"], progress=False)


@pytest.mark.parametrize("override, key", [
    ("shards.rows_per_shard=true", "shards.rows_per_shard"), ("seed=false", "seed"),
    ("students.rec.lr_drop=[true]", "students.rec.lr_drop"), ("refclip.lr=true", "refclip.lr"),
    ("refclip.visual_mlp=true", "refclip.visual_mlp"),
], ids=["int", "int-false", "list-of-int", "float", "literal-int"])
def test_booleans_are_not_numbers(override: str, key: str) -> None:
    with pytest.raises(C.ConfigError, match=rf"{key}: Value error, a boolean .* is not a number"):
        C.load(ROOT / "params.yaml", [override])
    assert C.load(ROOT / "params.yaml", ["progress=false", "shards.rows_per_shard=3"]).shards.rows_per_shard == 3


def test_stage_entry_point_prints_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    from stages import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        main("gt-boxes", ["shards.rows_per_shard=true"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: stage gt-boxes: ") and "shards.rows_per_shard" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_run_names_the_writer_holding_the_output(tmp_path: Path) -> None:
    sets = ["--params", str(ROOT / "params.yaml"), "--set", "dataset.synthetic.n_images=6",
            "--set", f"paths.prepared={tmp_path}/prepared", "--set", f"paths.teachers={tmp_path}/teachers",
            "--set", "progress=false"]
    assert runner.invoke(app, ["run", "prepare", *sets]).exit_code == 0
    out = tmp_path / "teachers" / "gt-boxes" / "synthetic"
    lock = DirLock(out).acquire()  # another writer (its own open file: flock conflicts within one process too)
    try:
        res = runner.invoke(app, ["run", "gt-boxes", "--no-deps", *sets])
    finally:
        lock.release()
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    line = " ".join(res.output.split())
    assert f"stage gt-boxes: {out}: another writer is writing this shard set: pid {os.getpid()}" in line
    res = runner.invoke(app, ["run", "gt-boxes", "--no-deps", "--wait", *sets])
    assert res.exit_code == 0, res.output


class NotATensor:
    """An arbitrary class in a checkpoint (what a full pickled model holds)."""


def test_weight_refusals_are_known_errors(tmp_path: Path) -> None:
    import torch

    from grounding import errors
    from grounding.students.rec import build_backbone
    from grounding.teachers.detectors import load_checkpoint

    bad = tmp_path / "pickled.pt"
    torch.save({"model": NotATensor()}, bad)  # needs unpickling a class: refused by weights_only
    with pytest.raises(errors.WeightsError, match="weights_only") as e:
        load_checkpoint(bad)
    assert errors.is_known(e.value) and errors.one_line(e.value)[1] == 2
    with pytest.raises(errors.WeightsError, match=r"backbone_weights: .*pickled\.pt: torch.load\(weights_only=True\) refused.*grounding weights import"):
        build_backbone(18, str(bad))


@pytest.mark.slow
def test_prefect_flow_fails_with_one_line(tmp_path: Path) -> None:
    """A known error in a Prefect task ends the flow in a Failed state carrying the one-line message."""
    import yaml
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.flow import grounding_flow

    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["dataset"]["synthetic"]["n_images"] = 6
    doc["progress"] = False
    doc["paths"] = {k: str(tmp_path / k) for k in ("prepared", "teachers", "students", "metrics", "models")}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(doc))
    with prefect_test_harness(server_startup_timeout=180):
        st = grounding_flow(target="gt-boxes", params_file=str(params), overrides=["seed=true"], return_state=True)
        assert st.is_failed() and "seed: Value error, a boolean" in st.message and "\n" not in st.message
        lock = DirLock(tmp_path / "teachers" / "gt-boxes" / "synthetic").acquire()
        try:
            st = grounding_flow(target="gt-boxes", params_file=str(params), return_state=True)
        finally:
            lock.release()
        assert st.is_failed() and st.message.startswith("stage gt-boxes: ") and f"pid {os.getpid()}" in st.message
        st = grounding_flow(target="gt-boxes", params_file=str(params), return_state=True)
        assert st.is_completed()


def test_a_forked_child_does_not_hold_or_release_the_parents_lock(tmp_path: Path) -> None:
    out = tmp_path / "s"
    lock = DirLock(out).acquire()
    pid = os.fork()
    if pid == 0:  # child: its copy of the lock is inert
        code = 0 if lock.fd is None else 1
        lock.release()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0 and (out / LOCK_FILE).exists()
    with pytest.raises(LockHeld):  # still held by this process
        DirLock(out).acquire()
    lock.release()
    DirLock(out).acquire().release()
