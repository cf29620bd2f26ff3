"""The bootstraps record what can still make CPU training differ across machines (torch, CPU ISA, BLAS /
oneDNN, threads) in their sidecar's provenance, and that record never enters the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grounding import config as C
from grounding import environment, stages
from grounding.runtime import torch_threads

SHOW = """PyTorch built with:
  - GCC 13.3
  - Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build 20240605 for Intel(R) 64 architecture applications
  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71049cd69a3df32adcccb623b12cd7baa22)
  - OpenMP 201511 (a.k.a. OpenMP 4.5)
  - CPU capability usage: AVX2
  - Build settings: BLAS_INFO=open, BUILD_TYPE=Release, LAPACK_INFO=open, USE_MKL=OFF, USE_MKLDNN=ON, USE_OPENMP=ON,
"""


def test_config_summary_keeps_the_cpu_maths_lines_and_settings() -> None:
    s = environment.config_summary(SHOW)
    assert s["libraries"] == [
        "Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build 20240605 for Intel(R) 64 architecture "
        "applications", "Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71049cd69a3df32adcccb623b12cd7baa22)",
        "OpenMP 201511 (a.k.a. OpenMP 4.5)", "CPU capability usage: AVX2"]
    assert s["build"] == {"BLAS_INFO": "open", "LAPACK_INFO": "open", "USE_MKL": "OFF", "USE_MKLDNN": "ON",
                          "USE_OPENMP": "ON"}


def test_training_environment_reads_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with torch_threads(1):
        env = environment.training_environment()
    assert env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == 1 and env["thread_env"] == {"OMP_NUM_THREADS": "1"}
    assert env["config"] == environment.config_summary(torch.__config__.show())
    json.dumps(env)  # JSON types only: it goes into a sidecar


def _world(root: Path) -> dict:
    from test_clip import make_doc, write_config

    doc = make_doc(root, write_config(root / "micro-clip-test.json"))
    doc["teachers"]["clip"].update(pretrained=None, bootstrap={"steps": 2, "batch_size": 4, "threads": 1})
    doc["teachers"]["frcnn"] = {"bootstrap": {"epochs": 1, "batch_size": 4}, "input_size": 128}
    stages.run("prepare", C.from_dict(doc))
    return doc


@pytest.mark.parametrize("stage", ["bootstrap-clip", "bootstrap-frcnn"])
def test_bootstrap_records_environment_outside_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       stage: str) -> None:
    """Each bootstrap's sidecar holds the environment of its training; a machine that reports another
    environment (other torch build, ISA, BLAS, threads) finds the same key and reuses the artefact."""
    params = C.from_dict(_world(tmp_path))
    first = stages.run(stage, params)
    weights = first.path
    assert not first.hit
    side = json.loads(Path(str(weights) + ".json").read_text())
    env = side["provenance"]["environment"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["torch"] == torch.__version__
    assert {"libraries", "build"} <= set(env["config"]) and env["threads"] >= 1
    if stage == "bootstrap-clip":
        assert env["threads"] == 1  # read inside the bootstrap's torch_threads(teachers.clip.bootstrap.threads)
    mtime = weights.stat().st_mtime_ns
    other = {**env, "cpu_capability": "NO AVX", "threads": 64, "torch": "0.0"}
    for mod in ("grounding.teachers.bootstrap", "grounding.teachers.clip_bootstrap"):
        monkeypatch.setattr(f"{mod}.training_environment", lambda: other)
    again = stages.run(stage, params)
    assert again.hit and again.path == weights and weights.stat().st_mtime_ns == mtime  # same key: reused
    assert json.loads(Path(str(weights) + ".json").read_text())["key"] == side["key"]
