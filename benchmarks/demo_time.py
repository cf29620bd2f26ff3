"""Time `make demo` (after install) on a fresh copy of the project and keep the metrics it produced.

The checkout's files (tracked and untracked, not ignored: no data, no models) are copied to a temporary
directory, ``params.yaml`` there gets the budget (``--budget small``: as committed; ``full``: with
``params-full.yaml`` applied, what ``make demo-full`` runs) and any ``--set``, and then the Makefile's own
``demo`` recipe runs there (``make -o .venv/.installed demo``: the install step is skipped, the venv is this
one). Every Python process of the run (``dvc repro``'s stage commands, ``grounding demo``, the report)
appends its wall and CPU seconds (its own and its reaped children's, e.g. DataLoader workers) to a log
through a ``sitecustomize`` on ``PYTHONPATH``, so the per-stage table is the stages as DVC ran them,
imports included. The 1-minute load average is sampled every 5 s (other jobs on the machine inflate wall
seconds, not CPU seconds).

Written to ``--out`` (JSON): total wall seconds of the recipe, per command and per stage wall / CPU
seconds, load average (start, end, mean, max), the budget's overrides, the machine and torch environment,
every ``data/metrics`` file, the teachers' val/train recall (``grounding.teachers.detectors.recall``) and
the bootstraps' sidecar provenance. ``benchmarks/tables.py`` builds the README's demo tables from it.

    python benchmarks/demo_time.py --out benchmarks/results/demo-seed0.json
    python benchmarks/demo_time.py --seed 1 --out benchmarks/results/demo-seed1.json
    python benchmarks/demo_time.py --budget full --out benchmarks/results/demo-full-seed0.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from orchestration_overhead import copy_repo  # noqa: E402  (same copy of the checkout)

#: Records one line per Python process: argv, wall and CPU seconds (self + reaped children).
SITECUSTOMIZE = '''\
import atexit, json, os, resource, sys, time
_t0 = time.time()
def _record():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    rec = {"argv": sys.argv, "start": _t0, "wall_s": time.time() - _t0,
           "cpu_s": s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime, "pid": os.getpid()}
    with open(os.environ["DEMO_TIME_LOG"], "a") as f:
        f.write(json.dumps(rec) + "\\n")
if os.environ.get("DEMO_TIME_LOG"):
    atexit.register(_record)
'''


def seed_overrides(seed: int) -> list[str]:
    """Training seed ``seed`` everywhere a training draws from one; the synthetic data stays generator seed 0
    (``prepare`` would otherwise draw the images from ``seed`` too)."""
    if seed == 0:
        return []
    return [f"seed={seed}", "dataset.synthetic.seed=0",
            *(f"students.{s}.seeds=[{seed}]" for s in ("rec", "epmvg", "pbrec"))]


def budget_overrides(budget: str) -> list[str]:
    """The params of ``budget``: ``small`` = params.yaml as committed; ``full`` = with params-full.yaml."""
    if budget == "small":
        return []
    from grounding.overlay import overrides, read_overlay

    return overrides(read_overlay(ROOT / "params-full.yaml"))


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``every`` seconds until stopped."""

    def __init__(self, every: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self._stop_ev = every, [], threading.Event()

    def run(self) -> None:
        while not self._stop_ev.is_set():
            self.samples.append(loadavg()[0])
            self._stop_ev.wait(self.every)

    def stop(self) -> dict[str, float]:
        self._stop_ev.set()
        self.join()
        s = self.samples or [loadavg()[0]]
        return {"mean_1min": round(sum(s) / len(s), 2), "max_1min": max(s), "samples": len(s)}


def loadavg() -> list[float]:
    """``/proc/loadavg``'s 1, 5 and 15-minute figures."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def stage_rows(records: list[dict]) -> list[dict]:
    """One row per ``python -m stages.<name>`` process, in start order: stage, wall and CPU seconds."""
    rows = []
    for r in sorted(records, key=lambda r: r["start"]):
        argv = r["argv"]
        if argv and argv[0].endswith(".py") and "/stages/" in argv[0].replace(os.sep, "/"):
            name = Path(argv[0]).stem.replace("_", "-")
            rows.append({"stage": name, "wall_s": round(r["wall_s"], 1), "cpu_s": round(r["cpu_s"], 1)})
    return rows


def collect(repo: Path) -> dict:
    """Metrics of the demo in ``repo`` (run inside it): metrics files, teachers' recall, bootstrap sidecars."""
    from grounding import config as C
    from grounding.data.schema import CanonicalDataset
    from grounding.shards import ShardSet
    from grounding.teachers.detectors.recall import proposal_recall

    p = C.load(repo / "params.yaml")
    metrics = {str(f.relative_to(repo / p.paths.metrics)): json.loads(f.read_text())
               for f in sorted((repo / p.paths.metrics).rglob("*.json"))}
    ds = CanonicalDataset.load(repo / p.prepared_dir())
    recall = {}
    for stage in ("frcnn-proposals", "fcos-points", "yolo-anchors"):
        with ShardSet(repo / p.teacher_dir(stage)) as shards:
            recall[stage] = {split: proposal_recall(shards, ds, split) for split in ("train", "val")}
    sidecars = {f.parent.name: json.loads(f.read_text()).get("provenance", {})
                for f in sorted((repo / p.paths.models / "bootstrap").glob(f"*/{p.dataset.name}.pt.json"))}
    return {"metrics": metrics, "recall": recall, "bootstraps": sidecars, "dataset": p.dataset.name,
            "images": len(ds.images), "sentences": len(ds.refs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=("small", "full"), default="small",
                    help="small: params.yaml as committed (make demo); full: + params-full.yaml (make demo-full)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the synthetic images stay seed 0)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override key=value")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    ap.add_argument("--resume", help="a kept temporary directory whose `make demo` stopped after its stages: "
                    "rerun the recipe there (DVC finds every stage done) and write the results; its stage seconds "
                    "are the first attempt's, the wall seconds the first attempt's span plus the rerun")
    ap.add_argument("--collect", help=argparse.SUPPRESS)  # internal: print collect(DIR) as JSON
    args = ap.parse_args()
    if args.collect:
        print(json.dumps(collect(Path(args.collect))))
        return

    sets = [*budget_overrides(args.budget), *seed_overrides(args.seed), "progress=false", *args.sets]
    if args.resume:
        tmp, first = Path(args.resume), Path(args.resume) / "processes.jsonl"
        repo, hook = tmp / "repo", tmp / "hook"
        earlier = [json.loads(ln) for ln in first.read_text().splitlines()]
        span = max(r["start"] + r["wall_s"] for r in earlier) - min(r["start"] for r in earlier)
        log = tmp / "processes-resume.jsonl"
        log.unlink(missing_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="demo-time-"))
        repo = copy_repo(tmp / "repo", sets)
        os.symlink(Path(sys.executable).parents[1], repo / ".venv")  # the installed venv: no install step timed
        hook = tmp / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        log, earlier, span = tmp / "processes.jsonl", [], 0.0
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{hook}", "DEMO_TIME_LOG": str(log),
           "DVC_NO_ANALYTICS": "1"}
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the demo as a user runs it
        env.pop(v, None)
    print(f"demo in {repo} ({args.budget} budget, seed {args.seed}); load {loadavg()}", flush=True)
    load0, sampler = loadavg(), LoadSampler()
    sampler.start()
    t0 = time.time()
    r = subprocess.run(["make", "-o", ".venv/.installed", "demo"], cwd=repo, env=env, capture_output=True,
                       text=True)
    wall = time.time() - t0 + span
    load = {"start": load0, "end": loadavg(), **sampler.stop()}
    if r.returncode:
        raise SystemExit(f"make demo failed after {wall:.0f} s (kept {tmp}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    records = [*earlier, *(json.loads(ln) for ln in log.read_text().splitlines())]
    stages = stage_rows(earlier or records)
    commands = [{"argv": [Path(r["argv"][0]).name, *r["argv"][1:3]], "wall_s": round(r["wall_s"], 1),
                 "cpu_s": round(r["cpu_s"], 1)} for r in sorted(records, key=lambda r: r["start"])
                if "/stages/" not in r["argv"][0].replace(os.sep, "/")]
    got = subprocess.run([sys.executable, str(repo / "benchmarks" / "demo_time.py"), "--out", "-", "--collect",
                          str(repo)], cwd=repo, env={**env, "DEMO_TIME_LOG": ""}, capture_output=True, text=True)
    if got.returncode:
        raise SystemExit(f"collecting the metrics failed (kept {tmp}):\n{got.stderr[-4000:]}")
    from grounding.environment import training_environment

    result = {
        "budget": args.budget, "seed": args.seed, "overrides": sets,
        "command": "python benchmarks/demo_time.py " + " ".join(sys.argv[1:]),
        # the checkout's params.yaml before the overrides: results of one budget share it (benchmarks/tables.py)
        "params_sha256": hashlib.sha256((Path(__file__).resolve().parents[1] / "params.yaml").read_bytes()).hexdigest(),
        "make_demo_wall_s": round(wall, 1),
        "resumed": (f"the first `make demo` stopped after its stages ({span:.0f} s); rerun with --resume, "
                    "load sampled during the rerun only") if args.resume else None,
        "stages_wall_s": round(sum(s["wall_s"] for s in stages), 1),
        "stages_cpu_s": round(sum(s["cpu_s"] for s in stages), 1),
        "load_average": load, "stages": stages, "commands": commands,
        "environment": training_environment(), **json.loads(got.stdout),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(min([t0, *(r["start"] for r in earlier)]))),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"make demo: {wall:.0f} s wall, stages {result['stages_cpu_s']:.0f} CPU s, load {load}; wrote {out}")
    for s in stages:
        print(f"  {s['stage']:<22} {s['wall_s']:>8.1f} s  {s['cpu_s']:>8.1f} CPU s")
    if args.keep:
        print(f"kept {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
