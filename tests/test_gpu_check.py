"""benchmarks/gpu_check.sh (issue 25): fails fast and clearly without a GPU, and its CPU dry run
(``GROUNDING_GPU_CHECK_DEVICE=cpu``: the same steps, tiny models, 8 images) runs every pipeline stage and
the throughput measurements and writes the JSON the README table is made from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VENV": str(Path(sys.executable).parents[1]),
            **extra}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the no-GPU message cannot be seen")
def test_without_a_gpu_it_fails_fast_with_a_clear_message() -> None:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU visible to torch" in proc.stderr and "GROUNDING_GPU_CHECK_DEVICE=cpu" in proc.stderr


def test_a_missing_venv_names_make_install(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=_env(VENV=str(tmp_path)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "run 'make install' first" in proc.stderr


@pytest.mark.slow
def test_cpu_dry_run_covers_every_stage_and_writes_the_table(tmp_path: Path) -> None:
    from gpu_check_table import tables

    from grounding import stages

    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget-s", "900"],
                          env=_env(GROUNDING_GPU_CHECK_DEVICE="cpu"), capture_output=True, text=True, timeout=1200)
    assert out.is_file(), proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["stages"]] == list(stages.PIPELINE)
    bad = [r for r in doc["stages"] + doc["throughput"] if r["status"] != "ok"]
    assert not bad and proc.returncode == 0, bad
    assert [r["name"] for r in doc["throughput"]] == ["frcnn", "fcos", "yolo", "clip"]
    assert all(r["ratio"] > 0 for r in doc["throughput"])
    md = tables(doc)
    assert "| student-bicm |" in md and "| stage ÷ bare |" in md
