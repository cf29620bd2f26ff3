"""Probe: the same ResNet-50 forward timed in the Python main thread and in a second thread of the same
process (issue 23 item 4: the teacher stages run their forward in a producer thread, grounding/overlap.py,
and the bare forward of ``teacher_throughput.py`` runs in the main thread). Random weights, ``--batches``
batches of 2 images at 224 px after one warm-up batch; prints seconds for each.

    python benchmarks/thread_forward_probe.py [--batches 3]   # compare with OMP_NUM_THREADS=1
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
import torchvision


def timed(model: torch.nn.Module, x: torch.Tensor, batches: int) -> float:
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(batches):
            model(x)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, x = torchvision.models.resnet50().eval(), torch.rand(2, 3, 224, 224)
    main_s = timed(model, x, a.batches)
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(timed(model, x, a.batches)))
    t.start()
    t.join()
    print(f"torch threads {torch.get_num_threads()}: main thread {main_s:.2f} s, second thread {out[0]:.2f} s "
          f"({main_s / out[0]:.1f}x)")


if __name__ == "__main__":
    main()
