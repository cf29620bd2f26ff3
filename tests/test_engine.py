"""The stage engine (issue 18): one record per stage decides currency; `run` returns (path, key, hit);
`status` runs nothing; a stale upstream does not stale its downstream when it rewrites the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_cli_status_reports_without_running(tmp_path: Path) -> None:
    sets = [f"--set={s}" for s in _sets(tmp_path)]
    res = CliRunner().invoke(app, ["status", "prepare", "gt-boxes", *sets])
    assert res.exit_code == 1 and "prepare\tstale\tnever run" in res.output and "gt-boxes\tstale\tinput" in res.output
    assert not (tmp_path / "prepared").exists()
    assert CliRunner().invoke(app, ["run", "gt-boxes", *sets]).exit_code == 0
    res = CliRunner().invoke(app, ["status", "prepare", "gt-boxes", *sets])
    assert res.exit_code == 0 and res.output.count("\tcurrent\t") == 2, res.output


def test_dvc_yaml_command_prints_the_committed_file() -> None:
    res = CliRunner().invoke(app, ["dvc-yaml"])
    assert res.exit_code == 0 and res.output == (ROOT / "dvc.yaml").read_text()
