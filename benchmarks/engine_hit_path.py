"""The engine's cache-hit path: a fresh process asking ``grounding.stages.run`` (and ``status``) for stages
that are current. Builds ``prepare`` and ``gt-boxes`` on a tiny synthetic set in a temporary directory, then
times, in fresh processes (interpreter start and imports included), ``run`` of both stages (each a hit) and
``status`` of both, median of ``--repeats``.

    python benchmarks/engine_hit_path.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """import sys
from grounding import config, stages
p = config.load('params.yaml', sys.argv[2:])
names = ['prepare', 'gt-boxes']
if sys.argv[1] == 'build':
    [stages.run(n, p) for n in names]
elif sys.argv[1] == 'run':
    assert all(stages.run(n, p, deps=False).hit for n in names)
else:
    assert all(stages.status(n, p).current for n in names)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="engine-hit-"))
    sets = ["dataset.synthetic.n_images=6", "progress=false",
            *(f"paths.{k}={tmp / k}" for k in ("prepared", "teachers", "students", "metrics", "models"))]
    try:
        subprocess.run([sys.executable, "-c", SCRIPT, "build", *sets], cwd=ROOT, check=True)
        out = {}
        for mode in ("run", "status"):
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", SCRIPT, mode, *sets], cwd=ROOT, check=True)
                runs.append(round(time.perf_counter() - t0, 2))
            out[f"cached_{mode}_s"] = statistics.median(runs)
            out[f"cached_{mode}_runs_s"] = runs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["loadavg"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
