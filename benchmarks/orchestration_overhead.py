"""Orchestration overhead: what DVC and Prefect cost when there is nothing to do.

On a temporary copy of the repository (tracked and untracked files, not the data), with small-dataset
overrides, the whole main job (flow target ``all`` = ``grounding.stages.PIPELINE``, teachers and students;
DVC gets the same stages: no targets when they are all of dvc.yaml, else as explicit targets) is run once by
``dvc repro``; then measured:

* ``first_run_s``: that first ``dvc repro`` (every stage computes);
* ``noop_dvc_repro_s``: ``dvc repro`` again (nothing changed: DVC checks deps and params, runs nothing);
  median of ``--repeats`` runs;
* ``cached_flow_first_call_s``: the Prefect flow ``grounding`` (``--target``, default ``all``) run
  in-process on the same outputs, its first call, which includes starting the ephemeral API server
  (127.0.0.1 only, temporary ``PREFECT_HOME``); every task is a cache hit (the stage key in each manifest);
* ``cached_flow_s``: further calls of the same flow (server up), median of ``--repeats``;
* ``cached_grounding_run_s``: a fresh process running every stage of the target through the engine
  (``grounding.stages.run``, what ``grounding run`` does per stage; process start and imports included), and
  ``grounding_status_s``: ``grounding status`` of every stage (a fresh process); medians of ``--repeats``.

Ratios are against the first run. No traffic leaves the machine: DVC analytics and update checks are off
(``.dvc/config`` and ``DVC_NO_ANALYTICS``), Prefect analytics off, its API is the local ephemeral server.

    python benchmarks/orchestration_overhead.py [--n-images 24] [--repeats 3] [--target all] [--keep]

Writes ``benchmarks/out/orchestration_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

#: Small-dataset settings (the figures are about orchestration, not the teachers).
SMALL = ["progress=false", "teachers.frcnn.bootstrap.epochs=1", "teachers.fcos.bootstrap.epochs=1",
         "teachers.yolo.bootstrap.epochs=1", "teachers.clip.bootstrap.steps=20", "refclip.epochs=2",
         "refclip.hidden=32", "refclip.word_dim=16", "refclip.heads=2"]


def copy_repo(dest: Path, overrides: list[str]) -> Path:
    """The checkout's files (not ignored ones: no data, no models) in ``dest``, params overridden, in git."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    sys.path.insert(0, str(dest))  # the in-process flow imports the copy's code (same code keys as DVC's runs)
    from grounding.config import apply_override
    import yaml

    doc = yaml.safe_load((dest / "params.yaml").read_text())
    for o in overrides:
        apply_override(doc, o)
    (dest / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return dt, r.stdout + r.stderr


def machine() -> str:
    import dvc
    import prefect
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, CPython "
            f"{platform.python_version()}, dvc {dvc.__version__}, prefect {prefect.__version__}, "
            f"torch {torch.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-images", type=int, default=24, help="synthetic images (the demo has 240)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", default="all", help="flow target (a deployment name or a stage); DVC gets its "
                    "stages (as explicit targets unless they are all of dvc.yaml; default all: the main job, "
                    "stages.PIPELINE)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "orchestration_overhead.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="orchestration-overhead-"))
    os.environ.update({"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "DVC_NO_ANALYTICS": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
                       "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",  # a subprocess server bound to 127.0.0.1
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"})
    os.environ.pop("PREFECT_API_URL", None)  # the flow talks to its own ephemeral server on 127.0.0.1
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    try:
        repo = copy_repo(tmp / "repo", [f"dataset.synthetic.n_images={args.n_images}", *SMALL])
        from pipelines.flow import grounding_flow, stages_for

        targets = stages_for(args.target)
        from grounding.stages import STAGES

        # every stage of dvc.yaml: no targets (the same stages; DVC re-parses dvc.yaml + dvc.lock once per
        # explicit target, which made the no-op run grow as stages^2, docs/engine.md)
        dvc_targets = [] if set(targets) == set(STAGES) else list(targets)
        first, _ = timed(["dvc", "repro", *dvc_targets], repo, env)
        print(f"first dvc repro ({len(targets)} stages): {first:.1f} s", flush=True)
        noop = []
        for _ in range(args.repeats):
            dt, log = timed(["dvc", "repro", *dvc_targets], repo, env)
            assert "Running stage" not in log, log
            noop.append(dt)
        print(f"no-op dvc repro: {statistics.median(noop):.2f} s (runs {[round(x, 2) for x in noop]})", flush=True)

        run_all = ("import sys\nfrom grounding import config, stages\np = config.load('params.yaml')\n"
                   "hits = [stages.run(n, p, deps=False).hit for n in sys.argv[1:]]\n"
                   "assert all(hits), hits")
        engine = [timed([sys.executable, "-c", run_all, *targets], repo, env)[0] for _ in range(args.repeats)]
        status = [timed([sys.executable, "-m", "grounding.cli", "status"], repo, env)[0] for _ in range(args.repeats)]
        print(f"cached grounding run (engine, fresh process): {statistics.median(engine):.2f} s "
              f"(runs {[round(x, 2) for x in engine]}); grounding status: {statistics.median(status):.2f} s", flush=True)

        cwd = os.getcwd()
        os.chdir(repo)
        try:
            before = {p: p.stat().st_mtime_ns for d in ("data", "models") for p in (repo / d).rglob("*")
                      if p.is_file()}
            flow = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                grounding_flow(target=args.target, params_file="params.yaml")
                flow.append(time.perf_counter() - t0)
            after = {p: p.stat().st_mtime_ns for d in ("data", "models") for p in (repo / d).rglob("*")
                     if p.is_file()}
        finally:
            os.chdir(cwd)
        rewritten = sorted(str(p.relative_to(repo)) for p in after if after[p] != before.get(p))
        if rewritten:  # reported, not fatal: a stage that rewrites an output on a cache hit is a finding
            print(f"WARNING: the cached flow rewrote {len(rewritten)} files: {rewritten[:10]}", flush=True)
        print(f"cached flow: first call {flow[0]:.2f} s (with ephemeral server start), then "
              f"{statistics.median(flow[1:]):.2f} s (runs {[round(x, 2) for x in flow[1:]]})", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "flow_target": args.target, "dvc_targets": targets, "n_stages": len(targets), "n_images": args.n_images,
        "overrides": SMALL,
        "first_run_s": round(first, 2),
        "noop_dvc_repro_s": round(statistics.median(noop), 2), "noop_dvc_repro_runs_s": [round(x, 2) for x in noop],
        "cached_flow_first_call_s": round(flow[0], 2),
        "cached_flow_s": round(statistics.median(flow[1:]), 2), "cached_flow_runs_s": [round(x, 2) for x in flow[1:]],
        "files_rewritten_by_cached_flow": rewritten,
        "cached_grounding_run_s": round(statistics.median(engine), 2), "cached_grounding_run_runs_s": [round(x, 2) for x in engine],
        "grounding_status_s": round(statistics.median(status), 2),
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "ratio_noop_dvc_vs_first": round(statistics.median(noop) / first, 4),
        "ratio_cached_flow_vs_first": round(statistics.median(flow[1:]) / first, 4),
        "ratio_cached_flow_first_call_vs_first": round(flow[0] / first, 4),
        "machine": machine(),
        "command": "python benchmarks/orchestration_overhead.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
