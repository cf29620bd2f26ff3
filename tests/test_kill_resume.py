"""Kill/resume trials (benchmarks/kill_resume.py): a real teacher stage SIGKILLed at chosen moments, the
partial set refused by every reader, the rerun byte-identical to an uninterrupted run. CI runs 3 trials
(during a shard rename, during the manifest write, while a shard's HDF5 file is half written); the
20-trial run and its result are in docs/bad_inputs.md."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kill_resume.py"


def _module():
    spec = importlib.util.spec_from_file_location("kill_resume", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["kill_resume"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_trial_plan_is_seeded_and_covers_the_required_fault_points() -> None:
    kr = _module()
    points = [("dataset", "shard-00000.h5:key"), ("rename-shard", "shard-00000.h5"),
              ("renamed-shard", "shard-00000.h5"), ("manifest-half", "manifest.json"),
              ("rename-manifest", "manifest.json")]
    a = kr.plan_trials(20, random.Random(0), points, 10.0, 2.0)
    b = kr.plan_trials(20, random.Random(0), points, 10.0, 2.0)
    assert [(t.kind, t.target) for t in a] == [(t.kind, t.target) for t in b]
    kinds = [t.kind for t in a]
    for k in set(kr.REQUIRED):
        assert kinds.count(k) >= list(kr.REQUIRED).count(k)
    assert [t.kind for t in kr.plan_trials(3, random.Random(0), points, 10.0, 2.0)].count("time") == 0


@pytest.mark.slow
def test_three_kills_then_resume_byte_identical(tmp_path: Path) -> None:
    out = tmp_path / "kill_resume.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--trials", "3", "--images", "8", "--rows-per-shard", "2",
                          "--rerun", "library", "--no-check-driver", "--json", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert (summary["passed"], summary["trials"]) == (3, 3) and res.stdout.strip().endswith("3/3")
    assert {r["kind"] for r in summary["records"]} == {"rename-shard", "manifest-half", "dataset"}
    for r in summary["records"]:
        assert not r["after_kill"]["manifest"] and r["after_kill"]["reader"].startswith("ShardError")
