"""Wrong input at every entry point (issue 24 item 6), case by case: one line, a non-zero exit, never a
traceback, never a silent success. Each row: how it is run (``cli``: the `grounding` app in process;
``proc``: a real process from the repository root), the command, the exit code, a text that must appear in the
one line. ``{ws}`` is the workspace (a 12-image synthetic dataset with its gt-boxes set), ``{sets}`` the
params overrides pointing there, ``{free}`` a free 127.0.0.1 port nothing listens on."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grounding.cli import app

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ["anchor_probe.py", "class_probs_topk.py", "clip_throughput.py", "ddp_ablation.py", "ddp_steps.py",
              "demo_time.py", "dvc_noop.py", "engine_hit_path.py", "export_loaders.py", "gpu_check.py",
              "gpu_check_table.py", "incremental.py", "kill_resume.py", "orchestration_overhead.py",
              "pbrec_overfit.py", "peers.py", "published_loaders.py", "rec_overfit.py", "refclip_compare.py",
              "refclip_probe.py", "refclip_train_speed.py", "scale.py", "shard_io.py", "student_step.py",
              "suite.py", "tables.py", "teacher_throughput.py", "thread_forward_probe.py", "wordnet_labels.py"]
PY = sys.executable
HELP = "benchmark-help"  # row id prefix of the benchmark scripts' --help rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("entry")
    sets = ["--params", str(ROOT / "params.yaml"), "--set", "dataset.synthetic.n_images=12",
            *(x for k in ("prepared", "teachers", "students", "metrics", "models")
              for x in ("--set", f"paths.{k}={tmp}/{k}")), "--set", "progress=false"]
    res = CliRunner().invoke(app, ["run", "gt-boxes", *sets])  # prepare + gt-boxes, default 1024 rows per shard
    assert res.exit_code == 0, res.output
    (tmp / "a-file").write_text("not a directory\n")
    (tmp / "bad.yaml").write_text("seed: [1\n")
    return {"ws": str(tmp), "sets": shlex.join(sets), "gt": str(tmp / "teachers" / "gt-boxes" / "synthetic")}


# (id, how, command, exit code, text in the one line)
CASES = [
    ("student-without-teacher-set", "cli", "run student-rec-pseudo --no-deps {sets}", 1,
     "stage student-rec-pseudo: needs the shard set of refclip-pseudo at"),
    ("stage-module-without-teacher-set", "proc",
     "{py} -m stages.student_rec_pseudo dataset.synthetic.n_images=12 paths.prepared={ws}/prepared "
     "paths.teachers={ws}/teachers paths.students={ws}/students paths.metrics={ws}/metrics progress=false", 1,
     "needs the shard set of refclip-pseudo"),
    ("stage-module-help", "proc", "{py} -m stages.gt_boxes --help", 0, "usage: python -m stages.gt_boxes"),
    ("set-that-is-not-yaml", "cli", "run gt-boxes {sets} --set teachers.clip.prompts=[1", 2,
     "override 'teachers.clip.prompts=[1': '[1' is not valid YAML"),
    ("params-file-that-is-not-yaml", "cli", "run gt-boxes --params {ws}/bad.yaml", 2, "bad.yaml: not valid YAML"),
    ("stage-error-inside-demo", "cli", "demo {sets} --set paths.prepared={ws}/a-file", 1,
     "stage prepare: [Errno 20] Not a directory"),
    ("render-to-unwritable-path", "cli", "shards render {gt} syn000001 -o {ws}/a-file/x.png", 1,
     "cannot write the picture"),
    ("export-from-a-set-without-pseudo-boxes", "cli", "export pseudo --from {gt} -o {ws}/export {sets}", 1,
     "shard set of stage gt-boxes (image level) holds no pseudo-box"),
    ("export-unknown-pseudo-split", "cli",
     "export pseudo --from {gt} --pseudo-split tain -o {ws}/export {sets}", 2,
     "--pseudo-split tain: no such split in dataset 'synthetic'; its splits are testA, testB, train, val"),
    ("shards-ls-missing-directory", "cli", "shards ls {ws}/nonexistent", 1, "nonexistent: no such directory"),
    ("shards-ls-a-file", "cli", "shards ls {ws}/a-file", 1, "a-file: no such directory"),
    ("rows-per-shard-on-an-existing-set", "proc",
     "{py} -m grounding.cli run gt-boxes --no-deps {sets} --set shards.rows_per_shard=64", 0,
     "is up to date and keeps its layout of 1024 rows per shard; shards.rows_per_shard=64 applies to sets "
     "written from now on"),
    ("suite-collect-only-with-nothing-collected", "proc",
     "{py} benchmarks/suite.py --collect-only --out-dir {ws}/no-benchmark-outputs", 1,
     "nothing collected: no output of"),
    ("serve-help", "proc", "{py} -m pipelines.serve --help", 0, "usage: python -m pipelines.serve"),
    ("serve-without-api-url", "proc", "env -u PREFECT_API_URL {py} -m pipelines.serve", 1,
     "PREFECT_API_URL is not set"),
    ("serve-before-the-server-answers", "proc",
     "env PREFECT_API_URL=http://127.0.0.1:{free}/api {py} -m pipelines.serve --wait 2", 1,
     "no Prefect server answered http://127.0.0.1:{free}/api/health within 2 s"),
    ("prefect-down-with-no-server", "cli", "prefect down --home {ws}/no-prefect-home", 1,
     "no server started by `grounding prefect up`"),
    *(pytest.param(f"{HELP}-{b}", "proc", f"{{py}} benchmarks/{b} --help", 0, "usage:",
                   marks=pytest.mark.slow, id=f"{HELP}-{b}")  # each imports torch: ~5-20 s
      for b in BENCHMARKS),
]


def _run(how: str, command: str) -> tuple[int, str]:
    if how == "cli":
        res = CliRunner().invoke(app, shlex.split(command))
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        return res.exit_code, res.output
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    r = subprocess.run(shlex.split(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("case, how, command, code, text",
                         [pytest.param(*c, id=c[0]) if type(c) is tuple else c for c in CASES])
def test_entry_point(ws: dict[str, str], case: str, how: str, command: str, code: int, text: str) -> None:
    fill = {**ws, "py": PY, "free": str(free_port())}
    command, text = command.format(**fill), text.format(**fill)
    results = [ROOT / "benchmarks" / n for n in ("results.md", "results.json")]
    before = [hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None for p in results]
    t0 = time.monotonic()
    got, out = _run(how, command)
    assert "Traceback" not in out, out
    assert got == code, out
    lines = [ln for ln in out.splitlines() if text in ln]
    assert len(lines) == 1, out  # the text in one line, not wrapped over several
    if code:
        assert lines[0].startswith("error:"), out
    if case == "export-from-a-set-without-pseudo-boxes":
        assert "refclip-pseudo" in lines[0] and not Path(ws["ws"], "export").exists()  # nothing written
    if case == "rows-per-shard-on-an-existing-set":
        assert len(list(Path(ws["gt"]).glob("shard-*.h5"))) == 1  # the layout kept, as the notice says
    if case == "suite-collect-only-with-nothing-collected":
        assert [hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None for p in results] == before
    if case == "serve-help":
        assert time.monotonic() - t0 < 60  # printed help and returned; started no server


@pytest.mark.slow
def test_prefect_up_waits_for_health_then_down_stops_it(tmp_path: Path) -> None:
    """`grounding prefect up` on a free 127.0.0.1 port: returns only once /api/health answers, prints the
    exports; `down` stops the server (nothing listens on the port after)."""
    from grounding.prefect_server import is_healthy

    port = free_port()
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cli = [PY, "-m", "grounding.cli", "prefect"]
    try:
        up = subprocess.run([*cli, "up", "--port", str(port), "--home", str(home), "--timeout", "240"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        url = f"http://127.0.0.1:{port}/api"
        assert up.stdout.strip() == f"export PREFECT_API_URL={url} PREFECT_HOME={home.resolve()}"
        assert is_healthy(url)  # up returned after the health endpoint answered
        again = subprocess.run([*cli, "up", "--home", str(home)], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=120)  # already running: the same server, no second one
        assert again.returncode == 0 and again.stdout == up.stdout, again.stdout + again.stderr
    finally:
        down = subprocess.run([*cli, "down", "--home", str(home)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
    assert down.returncode == 0 and "stopped the Prefect server" in down.stdout, down.stdout + down.stderr
    assert not is_healthy(url)


def test_every_benchmark_script_has_a_help_row() -> None:
    assert BENCHMARKS == sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def test_bad_inputs_doc_counts_follow_the_case_table() -> None:
    """docs/bad_inputs.md's entry-point counts are this file's: cases = CASES + the Prefect up/down test, the
    benchmark `--help` rows = BENCHMARKS, tests = CASES + this file's other tests, the groups add up."""
    section = (ROOT / "docs" / "bad_inputs.md").read_text().split("## Entry points (issue 24)")[1].split("\n## ")[0]
    cases = len(CASES) + 1
    tests = len(CASES) + sum(1 for n in globals() if n.startswith("test_") and n != "test_entry_point")
    assert f"Cases tried {cases}, caught {cases}" in section
    assert f"({tests} tests; the {len(BENCHMARKS)} benchmark `--help` rows" in section
    groups = re.findall(r"^\| [^|\n]+ \| (\d+) \| (\d+) \|$", section, re.M)
    assert sum(int(t) for t, _ in groups) == cases and all(t == c for t, c in groups), groups
    assert f"the {len(BENCHMARKS)} benchmark scripts | {len(BENCHMARKS) + 2} |" in section
