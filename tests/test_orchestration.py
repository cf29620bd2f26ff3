"""DVC and Prefect share one cache; Dask fan-out is byte-identical to the serial run; a served deployment
runs through a real Prefect server on 127.0.0.1 (slow tests, run by CI)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


#: Small settings for orchestration tests: the point is the wiring, not the teachers' quality.
FAST = ["teachers.yolo.bootstrap.epochs=1", "refclip.epochs=2", "refclip.hidden=32", "refclip.word_dim=16",
        "refclip.heads=2"]


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.iterdir())}


def small_params(path: Path, out: Path, **extra: object) -> Path:
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["dataset"]["synthetic"]["n_images"] = 12
    doc["progress"] = False
    doc["shards"]["rows_per_shard"] = 4
    doc["paths"] = {k: str(out / k) for k in ("prepared", "teachers", "students", "metrics", "models")}
    doc.update(extra)
    path.write_text(yaml.safe_dump(doc))
    return path


def env_with_venv(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture(scope="module")
def prefect_backend():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def test_dvc_repro_then_prefect_reuses_everything(tmp_path: Path, prefect_backend, monkeypatch) -> None:
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    from grounding.config import apply_override

    doc = yaml.safe_load((repo / "params.yaml").read_text())
    for o in ["dataset.synthetic.n_images=12", "progress=false", *FAST]:
        apply_override(doc, o)
    (repo / "params.yaml").write_text(yaml.safe_dump(doc))
    env = env_with_venv()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    first = subprocess.run(["dvc", "repro", "refclip-export"], cwd=repo, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    second = subprocess.run(["dvc", "repro", "refclip-export"], cwd=repo, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "up to date" in second.stdout, second.stdout
    shard_dirs = [repo / "data" / "teachers" / s / "synthetic" for s in ("yolo-anchors", "refclip-pseudo")]
    before = [mtimes(d) for d in shard_dirs]

    from pipelines.flow import grounding_flow

    monkeypatch.chdir(repo)
    out = grounding_flow(target="refclip-teacher", params_file="params.yaml")
    assert Path(out["refclip-pseudo"]) == Path("data/teachers/refclip-pseudo/synthetic")
    assert [mtimes(d) for d in shard_dirs] == before  # Prefect reused what DVC made: nothing rewritten


def test_fan_out_on_dask_is_byte_identical(tmp_path: Path, prefect_backend) -> None:
    from pipelines.flow import grounding_flow

    serial = grounding_flow(target="gt-boxes", params_file=str(small_params(tmp_path / "s.yaml", tmp_path / "s")))
    fanned = grounding_flow(target="gt-boxes", params_file=str(small_params(tmp_path / "f.yaml", tmp_path / "f")),
                            fan_out=2)
    a, b = Path(serial["gt-boxes"]), Path(fanned["gt-boxes"])
    assert len([p for p in b.glob("shard-*.h5")]) == 3  # 12 images, 4 rows per shard: several parts
    assert digests(a) == digests(b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "prefect server exited early"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout}s")


def test_served_deployment_runs_through_a_local_server(tmp_path: Path) -> None:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = env_with_venv(PREFECT_HOME=str(tmp_path / "prefect-home"))
    server = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serve = None
    try:
        _wait_healthy(api, server)
        client_env = {**env, "PREFECT_API_URL": api}
        serve = subprocess.Popen([sys.executable, "-m", "pipelines.serve"], cwd=ROOT, env=client_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        params = small_params(tmp_path / "p.yaml", tmp_path / "out")
        deadline = time.time() + 120
        while True:  # wait until serve has registered the deployments
            ls = subprocess.run([str(VENV_BIN / "prefect"), "deployment", "ls"], env=client_env,
                                capture_output=True, text=True)
            if "grounding/all" in ls.stdout.replace("\n", "") or "all" in ls.stdout:
                break
            assert time.time() < deadline and serve.poll() is None, ls.stdout + ls.stderr
            time.sleep(2)
        run = subprocess.run([str(VENV_BIN / "prefect"), "deployment", "run", "grounding/refclip-teacher",
                              "--param", f"params_file={params}", "--param", f"overrides={json.dumps(FAST)}",
                              "--watch", "--watch-timeout", "500"],
                             env=client_env, capture_output=True, text=True, timeout=560)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Completed" in run.stdout
        assert (tmp_path / "out" / "teachers" / "refclip-pseudo" / "synthetic" / "manifest.json").exists()
        assert (tmp_path / "out" / "teachers" / "refclip-export" / "synthetic" / "simrec" / "synthetic.json").exists()
    finally:
        for p in (serve, server):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
