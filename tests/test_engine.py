"""The stage engine (issue 18): one record per stage decides currency; `run` returns (path, key, hit);
`status` runs nothing; a stale upstream does not stale its downstream when it rewrites the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grounding import config as C
from grounding import stages
from grounding.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _sets(tmp: Path) -> list[str]:
    return ["dataset.synthetic.n_images=6", f"paths.prepared={tmp}/prepared", f"paths.teachers={tmp}/teachers",
            f"paths.metrics={tmp}/metrics", f"paths.models={tmp}/models", "progress=false"]


def test_run_status_and_one_record(tmp_path: Path) -> None:
    p = C.load(str(ROOT / "params.yaml"), _sets(tmp_path))
    assert stages.status("gt-boxes", p).reason.startswith("input ")  # prepare has not run
    first = stages.run("gt-boxes", p)  # runs the producer of its missing input (prepare) first
    assert not first.hit and first.path == p.teacher_dir("gt-boxes") and len(first.key) == 64
    assert stages.status("prepare", p).current and stages.status("gt-boxes", p).current
    record = json.loads(stages.record_path(stages.get("gt-boxes"), p).read_text())
    assert record["key"] == first.key and record["outputs"][str(first.path)].startswith("shards:")
    again = stages.run("gt-boxes", p, deps=False)
    assert again == (first.path, first.key, True)
    # a param of the stage changes its key: stale; the other stages stay current
    other = C.load(str(ROOT / "params.yaml"), [*_sets(tmp_path), "shards.rows_per_shard=2"])
    st = stages.status("gt-boxes", other)
    assert not st.current and st.reason == "code, params or inputs changed" and st.key != first.key
    assert stages.status("prepare", other).current
    # an output changed behind the engine's back: stale, and a rerun restores it
    (first.path / "manifest.json").unlink()
    assert stages.status("gt-boxes", p).reason.startswith("output ")
    assert not stages.run("gt-boxes", p).hit and stages.status("gt-boxes", p).current


def test_upstream_rerun_with_the_same_bytes_keeps_downstream_current(tmp_path: Path) -> None:
    p = C.load(str(ROOT / "params.yaml"), _sets(tmp_path))
    stages.run("gt-boxes", p)
    dataset = p.prepared_dir() / "dataset.json"
    before = (dataset.read_bytes(), dataset.stat().st_mtime_ns)
    stages.record_path(stages.get("prepare"), p).unlink()  # prepare must rerun; it rewrites the same dataset
    assert not stages.status("prepare", p).current and stages.status("gt-boxes", p).current
    assert not stages.run("prepare", p).hit and stages.run("gt-boxes", p).hit
    # the engine alone decides: the compute regenerated the dataset (no inner "up to date" check), same bytes
    assert dataset.stat().st_mtime_ns != before[1] and dataset.read_bytes() == before[0]


def test_real_data_prepare_is_current_until_its_user_files_change(tmp_path: Path) -> None:
    """A real dataset's `prepare` keys on its user files (root, image_root: relative path, size, mtime of
    every file), so a second run is a hit; an edited annotation or an added image makes it stale, restoring
    the file makes it current again; `dvc_yaml(params)` makes the same paths deps of `prepare`."""
    import os

    from fixtures import formats

    from grounding.dvcgen import dvc_yaml

    fx = formats.make_refcoco(tmp_path / "fixture")
    p = C.load(str(ROOT / "params.yaml"), [*_sets(tmp_path), "dataset.format=refcoco", "dataset.name=mini",
                                           f"dataset.root={fx['root']}", f"dataset.image_root={fx['image_root']}",
                                           "dataset.options.dataset=refcoco", "dataset.options.split_by=unc"])
    first = stages.run("prepare", p)
    assert not first.hit and stages.run("prepare", p).hit
    instances = fx["root"] / "refcoco" / "instances.json"
    before, st = instances.read_bytes(), instances.stat()
    instances.write_bytes(before.replace(b'"area"', b'"area" ', 1))
    assert stages.status("prepare", p).reason == "code, params or inputs changed"
    instances.write_bytes(before)
    os.utime(instances, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stages.status("prepare", p).current
    extra = fx["image_root"] / "COCO_train2014_000000000099.jpg"
    shutil.copyfile(next(fx["image_root"].iterdir()), extra)
    assert not stages.status("prepare", p).current
    extra.unlink()
    assert stages.status("prepare", p).current
    prepare = dvc_yaml(p).split("\n  prepare:\n", 1)[1].split("\n    params:", 1)[0]
    assert f"    - {fx['root']}" in prepare.splitlines() and f"    - {fx['image_root']}" in prepare.splitlines()
    assert str(fx["root"]) not in dvc_yaml() and dvc_yaml(C.load(str(ROOT / "params.yaml"))) == dvc_yaml()


@pytest.mark.parametrize("stage, param", [("refclip-train", "refclip.word_vectors"),
                                          ("refclip-pseudo", "refclip.checkpoint"),
                                          ("student-epmvg", "students.epmvg.bert_path"),
                                          ("student-rec-pseudo", "students.rec.backbone_weights"),
                                          ("student-nce-distill", "students.nce_distill.glove_path")])
def test_a_local_file_named_by_a_param_is_in_the_key(tmp_path: Path, stage: str, param: str) -> None:
    """Editing in place a file a param names (same path, so the same params) makes the stage's key change."""
    f = tmp_path / "local.bin"
    f.write_bytes(b"first")
    p = C.load(str(ROOT / "params.yaml"), [*_sets(tmp_path), f"{param}={f}"])
    before, _ = stages.stage_key(stage, p)
    assert before != stages.stage_key(stage, C.load(str(ROOT / "params.yaml"), _sets(tmp_path)))[0]
    f.write_bytes(b"second, longer")
    assert stages.stage_key(stage, p)[0] != before


def test_cli_status_reports_without_running(tmp_path: Path) -> None:
    sets = [f"--set={s}" for s in _sets(tmp_path)]
    res = CliRunner().invoke(app, ["status", "prepare", "gt-boxes", *sets])
    assert res.exit_code == 1 and "prepare\tstale\tnever run" in res.output and "gt-boxes\tstale\tinput" in res.output
    assert not (tmp_path / "prepared").exists()
    assert CliRunner().invoke(app, ["run", "gt-boxes", *sets]).exit_code == 0
    res = CliRunner().invoke(app, ["status", "prepare", "gt-boxes", *sets])
    assert res.exit_code == 0 and res.output.count("\tcurrent\t") == 2, res.output


# ---- inputs whose stage a param names ---------------------------------------------------------------------------
def _crops(tmp: Path, *extra: str) -> C.Params:
    """clip-crops' params (a 2-step CLIP bootstrap) with ``extra`` overrides."""
    return C.load(str(ROOT / "params.yaml"), [*_sets(tmp), "teachers.clip.bootstrap.steps=2",
                                               "teachers.clip.bootstrap.batch_size=4", *extra])


def test_an_input_named_by_a_param_is_the_set_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """teachers.clip.crops_from=gt-boxes (oracle crops): clip-crops' upstream, `run` and key follow gt-boxes, not
    the default frcnn-proposals set: recomputing gt-boxes stales it, the default set appearing does not."""
    from grounding.data import gt_stage

    default, oracle = _crops(tmp_path), _crops(tmp_path, "teachers.clip.crops_from=gt-boxes")
    crops = stages.get("clip-crops")
    assert crops.needs == ("prepare", "bootstrap-clip", "frcnn-proposals")  # the static DAG: the defaults
    assert crops.upstream(oracle) == ("prepare", "bootstrap-clip", "gt-boxes")
    assert stages.plan(["clip-crops"], oracle) == ["prepare", "bootstrap-clip", "gt-boxes", "clip-crops"]
    first = stages.run("clip-crops", oracle)  # deps="missing": produces gt-boxes, the set it reads
    assert not first.hit and stages.status("gt-boxes", oracle).current
    assert not default.teacher_dir("frcnn-proposals").exists() and stages.status("clip-crops", oracle).current
    frcnn = "{teachers}/frcnn-proposals/{dataset}"
    assert stages.status("clip-crops", default).missing == (frcnn,)
    # a complete shard set appears at the default's path: the default's key sees it, the oracle one does not
    shutil.copytree(oracle.teacher_dir("gt-boxes"), default.teacher_dir("frcnn-proposals"))
    assert stages.stage_key("clip-crops", default)[1][frcnn].startswith("shards:")
    assert stages.run("clip-crops", oracle, deps=False) == (first.path, first.key, True)
    # gt-boxes recomputed with other content (other code: another manifest key) stales clip-crops
    monkeypatch.setattr(gt_stage, "code_version", lambda module: "other code")
    stages.record_path(stages.get("gt-boxes"), oracle).unlink()
    assert not stages.run("gt-boxes", oracle, deps=False).hit
    st = stages.status("clip-crops", oracle)
    assert not st.current and st.reason == "code, params or inputs changed" and st.key != first.key


def test_a_null_param_leaves_its_input_out(tmp_path: Path) -> None:
    """teachers.wordnet.classes_from: null (the synthetic classes) reads no detector set; a stage name adds it."""
    wordnet = stages.get("wordnet-labels")
    p = C.load(str(ROOT / "params.yaml"), _sets(tmp_path))
    assert wordnet.bound_inputs(p) == (stages.PREP,) and wordnet.needs == ("prepare",)
    named = C.load(str(ROOT / "params.yaml"), [*_sets(tmp_path), "teachers.wordnet.classes_from=gt-boxes"])
    assert wordnet.upstream(named) == ("prepare", "gt-boxes")
    assert list(stages.stage_key("wordnet-labels", named)[1]) == [stages.PREP, "{teachers}/gt-boxes/{dataset}"]


@pytest.mark.parametrize("value", ["refclip-psuedo", "student-pbrec", "prepare"])
def test_a_param_naming_no_teacher_stage_is_a_one_line_error(tmp_path: Path, value: str) -> None:
    """A typo, a student or the prepared dataset as ``students.rec.pseudo_from``: ConfigError naming the param
    and the teacher stages, from status, run and plan alike; `grounding status` prints it and exits 2."""
    p = C.load(str(ROOT / "params.yaml"), [*_sets(tmp_path), f"students.rec.pseudo_from={value}"])
    for call in (lambda: stages.status("student-rec-pseudo", p), lambda: stages.run("student-rec-pseudo", p),
                 lambda: stages.plan(["evaluate"], p)):
        with pytest.raises(C.ConfigError, match=rf"^students\.rec\.pseudo_from: '{value}' is not a teacher stage "
                           r"\(.*\); teacher stages are .*\brefclip-pseudo\b") as e:
            call()
        known = str(e.value).split("teacher stages are ")[1].split(", ")
        assert "\n" not in str(e.value) and "gt-boxes" in known and "prepare" not in known
        assert not [k for k in known if k.startswith("student-")]
    res = CliRunner().invoke(app, ["status", "student-rec-pseudo", f"--set=students.rec.pseudo_from={value}",
                                   *(f"--set={s}" for s in _sets(tmp_path))])
    assert res.exit_code == 2 and "students.rec.pseudo_from" in res.output, res.output
    assert not (tmp_path / "prepared").exists()


def test_dvc_yaml_command_prints_the_committed_file() -> None:
    res = CliRunner().invoke(app, ["dvc-yaml"])
    assert res.exit_code == 0 and res.output == (ROOT / "dvc.yaml").read_text()
