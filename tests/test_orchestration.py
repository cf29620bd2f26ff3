"""DVC and Prefect share one cache, both ways; a param change reruns only the affected stages; `dvc exp run
-S` works; Dask fan-out is byte-identical to the serial run; a served deployment runs through a real Prefect
server on 127.0.0.1 and its shard sets verify (slow tests, run by CI).

The DVC/Prefect scenario runs on one tiny copy of the project (module fixtures, in this order): the flow
makes the refclip-teacher stages; `dvc repro` finds every one up to date; a no-op repro; keep_ratio changes
and DVC reruns yolo-anchors and its downstream stages; the flow then reuses all of them; `dvc exp run`."""

from __future__ import annotations

import hashlib
import json
import os
import re
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


#: The refclip-teacher deployment's stages (the DVC target refclip-export and its upstream stages).
CHAIN = ("prepare", "bootstrap-yolo", "yolo-anchors", "refclip-train", "refclip-pseudo", "refclip-export")
#: What a change of teachers.yolo.keep_ratio must rerun: yolo-anchors and everything downstream of it.
AFFECTED = {"yolo-anchors", "refclip-train", "refclip-pseudo", "refclip-export"}


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


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
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
    env.pop("PREFECT_API_URL", None)  # only the server a test names
    return {**env, **extra}


#: Files a run writes into the checkout that are not project source; never copied into a test project.
RUN_STATE = frozenset({"dvc.lock"})


def copy_project(repo: Path, overrides: list[str]) -> Path:
    """The checkout's files (tracked and untracked, not ignored) copied to ``repo``, params overridden, and
    committed to a fresh git repository (``dvc exp run`` needs a commit)."""
    from grounding.config import apply_override

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if f in RUN_STATE:
            continue  # the user's own repro state (e.g. after `make demo`): the copy starts from none
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    for o in overrides:
        apply_override(doc, o)
    (repo / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "test project"], cwd=repo, check=True)
    return repo


def dvc(repo: Path, *args: str) -> str:
    """Run ``dvc ARGS`` in ``repo``; its output, stderr interleaved (the stages' own log lines are there)."""
    r = subprocess.run(["dvc", *args], cwd=repo, env=env_with_venv(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=400)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout}"
    return r.stdout


def ran(log: str) -> list[str]:
    """The stages ``dvc repro`` ran (``Running stage 'x'``), in order."""
    return re.findall(r"Running stage '([^']+)'", log)


def stage_logs(log: str) -> dict[str, str]:
    """``stage -> its part of the dvc repro log`` (from its ``Running stage`` line to the next one)."""
    parts = re.split(r"Running stage '([^']+)'", log)
    return dict(zip(parts[1::2], parts[2::2]))


def out_paths(repo: Path, names: tuple[str, ...]) -> list[Path]:
    """Every out, metric and plot dvc.yaml declares for the stages ``names``."""
    doc = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    dataset = yaml.safe_load((repo / "params.yaml").read_text())["dataset"]["name"]
    paths = []
    for n in names:
        for kind in ("outs", "metrics", "plots"):
            for o in doc[n].get(kind, []):
                paths.append(repo / (next(iter(o)) if isinstance(o, dict) else o).replace("${dataset.name}", dataset))
    return paths


def snapshot(repo: Path, names: tuple[str, ...] = CHAIN) -> dict[str, tuple[int, str]]:
    """``file -> (mtime_ns, sha256)`` of every file under the outs of ``names`` (all must exist)."""
    snap = {}
    for p in out_paths(repo, names):
        assert p.exists(), f"{p} missing"
        for f in sorted([p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]):
            snap[str(f.relative_to(repo))] = (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    return snap


#: The flow run in a subprocess in the copy, so it runs the copy's code (the stage keys hash it) even while
#: the checkout is being edited; its task logs go to the output, the outputs dict to the last line.
FLOW = ("import json, sys\nfrom pipelines.flow import grounding_flow\n"
        "print('FLOW-OUTPUT', json.dumps(grounding_flow(target=sys.argv[1], params_file='params.yaml')))")


def run_flow(repo: Path, api_url: str, target: str = "refclip-teacher") -> tuple[dict[str, str], dict[str, str]]:
    """The ``grounding`` flow run in ``repo`` against the API at ``api_url``: its outputs and, per stage,
    what its task reported (``cache hit`` or ``ran``)."""
    env = env_with_venv(PREFECT_API_URL=api_url, PREFECT_HOME=str(repo.parent / "prefect-home"))
    r = subprocess.run([sys.executable, "-c", FLOW, target], cwd=repo, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0 and "FLOW-OUTPUT" in r.stdout, r.stdout
    out = json.loads(r.stdout.rsplit("FLOW-OUTPUT", 1)[1])
    reports = {m[0]: m[1] for m in re.findall(r"([\w-]+): (cache hit|ran) ", r.stdout)}
    return out, reports


@pytest.fixture(scope="module")
def prefect_backend():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # a loaded CI machine starts it slowly
        yield PREFECT_API_URL.value()  # a temporary server on 127.0.0.1


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, prefect_backend: str) -> Path:
    """A tiny copy of the project whose refclip-teacher stages were made by the Prefect flow (no DVC yet)."""
    repo = copy_project(tmp_path_factory.mktemp("orchestration") / "repo",
                        ["dataset.synthetic.n_images=12", "progress=false", *FAST])
    out, reports = run_flow(repo, prefect_backend)
    assert set(out) == set(CHAIN)
    assert reports == {s: "ran" for s in CHAIN}  # a fresh copy: every task computes (no false cache hit)
    assert not (repo / "dvc.lock").exists()
    return repo


@pytest.fixture(scope="module")
def dvc_after_prefect(project: Path) -> dict:
    """``dvc repro refclip-export`` on the outputs the flow made (DVC has no lock file: it runs every stage)."""
    before = snapshot(project)
    log = dvc(project, "repro", "refclip-export")
    return {"repo": project, "before": before, "log": log, "after": snapshot(project)}


@pytest.fixture(scope="module")
def dvc_param_change(project: Path, dvc_after_prefect: dict) -> dict:
    """After the repro: a no-op repro, then teachers.yolo.keep_ratio changed and ``dvc status`` + repro."""
    noop = dvc(project, "repro", "refclip-export")
    from grounding.config import apply_override

    doc = yaml.safe_load((project / "params.yaml").read_text())
    apply_override(doc, "teachers.yolo.keep_ratio=0.3")
    (project / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    status = subprocess.run(["dvc", "status", "--json", "--with-deps", "refclip-export"], cwd=project,
                            env=env_with_venv(), capture_output=True, text=True, check=True).stdout
    return {"noop": noop, "status": json.loads(status), "status_text": status,
            "repro": dvc(project, "repro", "refclip-export")}


def test_prefect_then_dvc_reuses_everything(dvc_after_prefect: dict) -> None:
    """Flow first, then DVC: DVC runs each command, each stage's key check returns at once, no file changes."""
    log = dvc_after_prefect["log"]
    assert ran(log) == list(CHAIN), log
    for stage, part in stage_logs(log).items():  # the stage's own key check found its output up to date
        out = out_paths(dvc_after_prefect["repo"], (stage,))[0].relative_to(dvc_after_prefect["repo"])
        assert any("up to date" in line and str(out) in line for line in part.splitlines()), \
            f"{stage} did not report a cache hit for {out}:\n{part}"
    assert dvc_after_prefect["after"] == dvc_after_prefect["before"]  # mtime and sha256 of every file


def test_second_repro_is_a_no_op(dvc_param_change: dict) -> None:
    noop = dvc_param_change["noop"]
    assert ran(noop) == [] and "Data and pipelines are up to date" in noop, noop


def test_param_change_reruns_only_the_affected_stages(dvc_param_change: dict) -> None:
    """keep_ratio is a yolo-anchors param (not a bootstrap-yolo one): DVC sees yolo-anchors changed, and
    repro reruns it and its downstream stages only."""
    assert set(dvc_param_change["status"]) == {"yolo-anchors"}, dvc_param_change["status_text"]
    log = dvc_param_change["repro"]
    assert set(ran(log)) == AFFECTED, log


def test_dvc_then_prefect_reuses_everything(project: Path, dvc_param_change: dict, prefect_backend: str) -> None:
    """DVC made yolo-anchors and its downstream stages (keep_ratio changed); the flow's every task reports a
    cache hit and no file under the outs changes."""
    before = snapshot(project)
    out, reports = run_flow(project, prefect_backend)
    assert Path(out["refclip-pseudo"]) == Path("data/teachers/refclip-pseudo/synthetic")
    assert reports == {s: "cache hit" for s in CHAIN}
    assert snapshot(project) == before  # mtime and sha256 of every file


def test_dvc_exp_run_with_a_param(project: Path, dvc_param_change: dict) -> None:
    log = dvc(project, "exp", "run", "-S", "teachers.yolo.keep_ratio=0.2", "refclip-export")
    assert set(ran(log)) == AFFECTED, log
    manifest = json.loads((project / "data/teachers/yolo-anchors/synthetic/manifest.json").read_text())
    assert manifest["params"]["keep_ratio"] == 0.2
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=project, env=env_with_venv(),
                                      capture_output=True, text=True, check=True).stdout)
    exps = [r for base in shown for e in (base.get("experiments") or []) for r in e["revs"]]
    assert [r["data"]["params"]["params.yaml"]["data"]["teachers"]["yolo"]["keep_ratio"] for r in exps] == [0.2]


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
        export = tmp_path / "out" / "teachers" / "refclip-export" / "synthetic" / "simrec"
        assert (export / "anns" / "refcoco.json").exists() and (export / "masks" / "refcoco").is_dir()
        sets = sorted(str(m.parent) for m in (tmp_path / "out" / "teachers").glob("*/synthetic/manifest.json"))
        assert {Path(s).parent.name for s in sets} == {"yolo-anchors", "refclip-pseudo"}
        verify = subprocess.run([str(VENV_BIN / "grounding"), "shards", "verify", *sets], env=env,
                                capture_output=True, text=True, timeout=120)
        assert verify.returncode == 0 and verify.stdout.count("OK") == len(sets), verify.stdout + verify.stderr
    finally:
        for p in (serve, server):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
