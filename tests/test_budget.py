"""`make demo` runs params.yaml's small budget; `make demo-full` the same stages with params-full.yaml on top."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grounding import config as C
from grounding.overlay import main, overrides, read_overlay

ROOT = Path(__file__).resolve().parents[1]


def test_overlay_flattens_to_set_words(tmp_path: Path) -> None:
    f = tmp_path / "o.yaml"
    f.write_text("seed: 1\nteachers:\n  yolo:\n    bootstrap: {epochs: 6}\nstudents:\n  rec: {lr_drop: [15, 18]}\n"
                 "refclip: {checkpoint: null, rnn: lstm}\n")
    assert overrides(read_overlay(f)) == ["seed=1", "teachers.yolo.bootstrap.epochs=6", "students.rec.lr_drop=[15,18]",
                                          "refclip.checkpoint=null", "refclip.rnn=lstm"]
    f.write_text("teachers: {clip: {prompts: ['a photo of a {}']}}\n")
    with pytest.raises(C.ConfigError, match="teachers.clip.prompts: value .* has spaces"):
        overrides(read_overlay(f))
    with pytest.raises(C.ConfigError, match="overlay file not found"):
        read_overlay(tmp_path / "missing.yaml")
    assert main([str(tmp_path / "missing.yaml")]) == 2


def test_full_overlay_only_raises_the_budget() -> None:
    """Every key of params-full.yaml exists in params.yaml and differs from it (no leftovers); both
    validate; the full budget is at least the small one for each epoch / step count."""
    small = C.load(ROOT / "params.yaml")
    words = overrides(read_overlay(ROOT / "params-full.yaml"))
    full = C.load(ROOT / "params.yaml", words)
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    for w in words:
        key, value = w.split("=", 1)
        node = doc
        for k in key.split("."):
            assert isinstance(node, dict) and k in node, f"params-full.yaml: {key} is not a key of params.yaml"
            node = node[k]
        assert yaml.safe_load(value) != node, f"params-full.yaml: {key} equals params.yaml's value"
    assert full.dataset.name != small.dataset.name  # the two demos' outputs side by side
    pairs = [(small.teachers.clip.max_crops_per_image, full.teachers.clip.max_crops_per_image),
             (small.teachers.yolo.bootstrap.epochs, full.teachers.yolo.bootstrap.epochs),
             (small.teachers.clip.bootstrap.steps, full.teachers.clip.bootstrap.steps),
             (small.refclip.epochs, full.refclip.epochs), (small.students.rec.epochs, full.students.rec.epochs),
             (small.students.pbrec.epochs, full.students.pbrec.epochs),
             (small.students.nce_distill.steps, full.students.nce_distill.steps)]
    assert all(s < f for s, f in pairs), pairs


def test_make_demo_full_runs_grounding_demo_with_the_overlay() -> None:
    """`make -n demo-full` (dry run): `grounding demo` with params-full.yaml's words, then ls and the report."""
    r = subprocess.run(["make", "-n", "-o", ".venv/.installed", "demo-full"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    demo = next(ln for ln in lines if "grounding demo" in ln)
    assert "$(.venv/bin/python -m grounding.overlay params-full.yaml)" in demo
    assert any("grounding report data -o report" in ln for ln in lines)
    words = subprocess.run([sys.executable, "-m", "grounding.overlay", "params-full.yaml"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert shlex.split(words)[::2] == ["--set"] * len(overrides(read_overlay(ROOT / "params-full.yaml")))
    small = subprocess.run(["make", "-n", "-o", ".venv/.installed", "demo"], cwd=ROOT, capture_output=True, text=True)
    assert "dvc repro" in small.stdout and "params-full" not in small.stdout  # make demo: params.yaml as it is
