"""`grounding demo`'s closing table: rows, seconds, cache hit or computed, headline figure per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grounding import config as C
from grounding import stages
from grounding.cli import app
from grounding.summary import headline, timed_run

ROOT = Path(__file__).resolve().parents[1]


def _sets(tmp: Path) -> list[str]:
    return [f"dataset.synthetic.n_images=6", f"paths.prepared={tmp}/prepared", f"paths.teachers={tmp}/teachers",
            f"paths.metrics={tmp}/metrics", "progress=false"]


def test_timed_run_computed_then_cache_hit(tmp_path: Path) -> None:
    p = C.load(str(ROOT / "params.yaml"), _sets(tmp_path))
    stages.run("prepare", p)
    first = timed_run("gt-boxes", p, stages.run)
    assert first.status == "computed" and first.rows == 6 and first.seconds >= 0
    again = timed_run("gt-boxes", p, stages.run)
    assert again.status == "cache hit" and again.rows == 6 and again.out == first.out


def test_headline_from_metrics_files(tmp_path: Path) -> None:
    p = C.load(str(ROOT / "params.yaml"), _sets(tmp_path))
    m = tmp_path / "metrics"
    m.mkdir()
    (m / "student-x.json").write_text(json.dumps({"acc50": {"testA": 0.5, "val": 0.238}}))
    (m / "refclip.json").write_text(json.dumps({"refclip": {"train": {"acc": 0.3}, "val": {"acc": 0.299}}}))
    (m / "clip.json").write_text(json.dumps({"text_to_image_r5": 0.512, "text_to_image_r5_chance": 0.1}))
    assert headline("student-x", p, tmp_path) == "Acc@0.5 val 23.8 %"
    assert headline("refclip-pseudo", p, tmp_path) == "pseudo-box Acc@0.5 val 29.9 %"
    assert headline("clip-eval", p, tmp_path).startswith("text→image R@5 0.512")
    assert headline("student-missing", p, tmp_path) == "-"
    (m / "student-bad.json").write_text("{not json")
    assert headline("student-bad", p, tmp_path) == "-"


def test_demo_ends_with_one_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages, "PIPELINE", ("prepare", "gt-boxes"))
    args = ["demo", "--params", str(ROOT / "params.yaml"), "--render-dir", str(tmp_path / "demo")]
    for s in _sets(tmp_path):
        args += ["--set", s]
    runner = CliRunner()
    for expect in ("computed", "cache hit"):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        out = res.output
        for col in ("stage", "rows", "seconds", "cache", "headline"):
            assert col in out
        gt_line = next(line for line in out.splitlines() if "gt-boxes" in line and "│" in line)
        assert expect in gt_line and " 6 " in gt_line
        assert "total" in out
