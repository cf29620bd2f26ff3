"""How far 2 gloo processes land from 1 on ``student-rec-pseudo`` (tests/test_ddp.py's tiny set) as built,
and with one of the two ingredients of the match switched off: the loss weight
(``distributed.local_weight``) or global-batch BatchNorm (``distributed.global_batchnorm``). Prints the
largest and the median (over weight tensors) of ``max |w2 - w1|`` of the raw student.

    PYTHONPATH=. python benchmarks/ddp_ablation.py [exact] [no-weight] [no-bn]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
STAGE = "student-rec-pseudo"


def _worker(rank: int, world: int, port: int, p, root: str, mode: str) -> None:  # noqa: ANN001
    import test_ddp as T

    from grounding import distributed as D

    if mode == "no-bn":
        D.global_batchnorm = lambda m, d: m
    if mode == "no-weight":
        D.local_weight = lambda a, b: 1.0
    T._worker(rank, world, port, STAGE, p, root)


def main() -> None:
    import test_ddp as T

    from grounding import stages
    from grounding.data.schema import CanonicalDataset
    from grounding.students import common as C

    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known = ["exact", "no-weight", "no-bn"]
    ap.add_argument("modes", nargs="*", help=f"which runs, of {known} (default: all three)")
    modes = ap.parse_args().modes or known
    if set(modes) - set(known):
        ap.error(f"unknown mode(s) {sorted(set(modes) - set(known))}; known: {known}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = T._student_params(tmp, *T.REC_SETS)
        stages.run("prepare", base)
        T._stand_in_teachers(base, CanonicalDataset.load(base.prepared_dir()))
        one = T._student_params(tmp, *T.REC_SETS, *T._outputs(tmp, "one"))
        stages.run(STAGE, one)
        sa = torch.load(C.model_path(one, STAGE), weights_only=True)["raw_state_dict"]
        for mode in modes:
            two = T._student_params(tmp, *T.REC_SETS, *T._outputs(tmp, mode))
            try:
                mp.spawn(_worker, args=(2, T._free_port(), two, str(tmp / "none"), mode), nprocs=2, join=True)
            except Exception as e:  # noqa: BLE001 - a mode that cannot train is a result too
                print(f"{mode:10s} failed: {str(e).strip().splitlines()[-1][:160]}")
                continue
            sb = torch.load(C.model_path(two, STAGE), weights_only=True)["raw_state_dict"]
            diff = sorted(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point())
            print(f"{mode:10s} max {diff[-1]:.2e}  median {diff[len(diff) // 2]:.2e}")


if __name__ == "__main__":
    main()
