"""Optimizer steps per second of ``student-rec-pseudo`` and ``refclip-train`` on 1 vs N gloo processes (CPU).

Same tiny sets and stand-in teachers as tests/test_ddp.py, more epochs; each stage runs on 1 process and
then on N (torch.multiprocessing, gloo, 1 torch thread a process), both with the same global batch. A step
is one global batch (every rank steps once); steps/s is counted on rank 0 between its first and last
optimizer step (process start, data loading, evaluation and writing are left out). On a machine with
fewer free cores than N no speed-up is expected: the point is that the N-process path runs and what it
costs (collectives, the gathered RefCLIP embeddings, global BatchNorm).

    PYTHONPATH=. python benchmarks/ddp_steps.py [--nproc 2] [--epochs 6] [--out benchmarks/out/ddp_steps.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _timed(rank: int, world: int, port: int, stage: str, p, q) -> None:  # noqa: ANN001
    """Run ``stage`` as rank ``rank`` of ``world`` and put rank 0's (steps, seconds) on ``q``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from grounding import distributed as D
    from grounding import runtime as R
    from grounding import stages

    stamps: list[float] = []
    step = R.scaled_step

    def counted(*a, **k):  # noqa: ANN002, ANN003, ANN202
        step(*a, **k)
        stamps.append(time.perf_counter())

    R.scaled_step = counted
    if world > 1:
        D.init_from_env(torch.device("cpu"))
    try:
        R.run_on_ranks(stage, lambda: stages.run(stage, p))
    finally:
        D.shutdown()
    if rank == 0:
        q.put((len(stamps) - 1, stamps[-1] - stamps[0]))


def measure(stage: str, p, world: int) -> dict[str, float]:  # noqa: ANN001
    """Steps/s of ``stage`` with params ``p`` on ``world`` processes (fresh output paths each time)."""
    from test_ddp import _free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_timed, args=(world, _free_port(), stage, p, q), nprocs=world, join=True,
                       start_method="spawn")
    steps, seconds = q.get()
    return {"processes": world, "steps": steps, "seconds": round(seconds, 3), "steps_per_s": round(steps / seconds, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "ddp_steps.json"))
    a = ap.parse_args()
    from test_ddp import REC_SETS, REFCLIP_SETS, _outputs
    from test_refclip import _darknet_anchors
    from test_students_rec import _params as student_params
    from test_students_rec import _stand_in_teachers

    from grounding import config, stages
    from grounding.data.schema import CanonicalDataset

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rec = lambda tag: student_params(tmp / "rec", *REC_SETS, f"students.rec.epochs={a.epochs}",  # noqa: E731
                                         *_outputs(tmp / "rec", tag))
        base = rec("base")
        stages.run("prepare", base)
        _stand_in_teachers(base, CanonicalDataset.load(base.prepared_dir()))
        rc = lambda tag: config.load(None, ["progress=false", f"paths.prepared={tmp}/rc/prepared",  # noqa: E731
                                            f"paths.teachers={tmp}/rc/teachers", *REFCLIP_SETS,
                                            f"refclip.epochs={2 * a.epochs}", *_outputs(tmp / "rc", tag)])
        stages.run("prepare", rc("base"))
        _darknet_anchors(rc("base"), CanonicalDataset.load(rc("base").prepared_dir()))
        for stage, make in (("student-rec-pseudo", rec), ("refclip-train", rc)):
            got = [measure(stage, make(f"n{n}"), n) for n in (1, a.nproc)]
            rows.append({"stage": stage, "one": got[0], "n": got[1],
                         "ratio_n_over_1": round(got[1]["steps_per_s"] / got[0]["steps_per_s"], 3)})
            print(json.dumps(rows[-1]), flush=True)
    doc = {"command": f"PYTHONPATH=. python benchmarks/ddp_steps.py --nproc {a.nproc} --epochs {a.epochs}",
           "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
           "cpus": os.cpu_count(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
