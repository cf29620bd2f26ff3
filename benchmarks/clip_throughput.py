"""CLIP teacher throughput: the ``clip-image`` stage end to end (read, decode, preprocess in DataLoader
workers, forward, HDF5 write) against the bare model forward on pre-decoded tensors, same model, same batch
size, measured side by side in one run (interleaved ``--repeats`` times). Goal: stage / bare >= 0.9.

    python benchmarks/clip_throughput.py [--model ViT-B-32] [--images 128] [--batch-size 32]
        [--num-workers 1] [--repeats 2]

Random weights (throughput does not depend on what the weights learnt); images from the synthetic
generator at 480-640 px JPEG (COCO-like sizes), generated into a temporary directory. Writes
``benchmarks/out/clip_throughput.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import threading
from pathlib import Path
from typing import Any, Callable

import torch


def in_thread(fn: Callable[[], float]) -> float:
    """``fn()`` run in a new (non-main) thread, its result or its exception returned here. The stages run
    their forward in a producer thread (grounding/overlap.py), and on some machines the same forward in the
    Python main thread is several times slower (``benchmarks/thread_forward_probe.py``): the bare forward
    runs in the same kind of thread, so the ratio compares like with like."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # re-raised in the caller
            out.append(e)

    t = threading.Thread(target=target, name="bare-forward")
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def side_by_side(bare: Callable[[], float], stage: Callable[[int], float], repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` rounds of ``bare()`` (in a second thread: :func:`in_thread`) and
    ``stage(round)``, side by side, the order alternating (bare first in even rounds), so a load change hits
    both alike."""
    t_bare, t_stage = [], []
    for i in range(repeats):
        if i % 2 == 0:
            t_bare.append(in_thread(bare))
            t_stage.append(stage(i))
        else:
            t_stage.append(stage(i))
            t_bare.append(in_thread(bare))
    return t_bare, t_stage


def clip_throughput(model: str = "ViT-B-32", n_images: int = 128, batch_size: int = 32, num_workers: int = 1,
                    repeats: int = 2, workdir: Path | None = None, min_size: int = 480, max_size: int = 640,
                    device: str = "auto") -> dict[str, Any]:
    """Measure images/s of the bare forward and of the ``clip-image`` stage body on ``device`` (``auto``:
    CUDA when present); returns the figures."""
    from grounding.runtime import resolve_device
    from grounding import config as C
    from grounding.data import synthetic
    from grounding.data.images import load_rgb
    from grounding.teachers import clip as T

    work = Path(workdir or tempfile.mkdtemp(prefix="clip_tp_"))
    try:
        ds = synthetic.generate(synthetic.SyntheticConfig(n_images=n_images, seed=0, min_size=min_size,
                                                          max_size=max_size), work / "prepared" / "synthetic",
                                progress=False)
        ds.save(work / "prepared" / "synthetic")
        params = C.from_dict({
            "device": device, "progress": False,
            "paths": {k: str(work / k) for k in ("prepared", "teachers", "students", "metrics", "models")},
            "teachers": {"clip": {"model": model, "batch_size": batch_size, "num_workers": num_workers}},
        })
        spec = T.model_spec(params.teachers.clip)
        torch.manual_seed(0)
        dev = resolve_device(device)
        net = T.create_model(spec).requires_grad_(False).to(dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        teacher = T.ClipTeacher(spec, T.teacher_identity(spec, "fp32", "random-init-seed-0"), dev,
                                None, extra={"weights_file": "random"}, prebuilt=net)
        tf = T.transform_of(spec.preprocess)
        t0 = time.perf_counter()
        pre = [tf(load_rgb(ds.image_root, im)) for im in ds.images]  # pre-decoded, outside the timing
        decode_s = time.perf_counter() - t0  # what the stage's decoding worker must do on the same cores
        batches = [torch.stack(pre[i:i + batch_size]) for i in range(0, len(pre), batch_size)]
        T.encode_images(teacher, batches[0])  # warm-up (allocator, kernels)

        def bare() -> float:
            t0 = time.perf_counter()
            for b in batches:
                T.encode_images(teacher, b)
            sync()
            return time.perf_counter() - t0

        def stage(i: int) -> float:
            out = work / "teachers" / f"clip-image-{i}"
            t0 = time.perf_counter()
            T.write_clip_image(params, teacher, ds, out)
            dt = time.perf_counter() - t0
            shutil.rmtree(out)
            return dt

        t_bare, t_stage = side_by_side(bare, stage, repeats)
        ratios = [b / s for b, s in zip(t_bare, t_stage)]
        bare_ips = n_images * repeats / sum(t_bare)
        stage_ips = n_images * repeats / sum(t_stage)
        return {
            "model": model, "device": str(dev), "images": n_images, "image_sizes": [min_size, max_size], "batch_size": batch_size,
            "num_workers": num_workers, "repeats": repeats, "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "machine": platform.processor() or platform.machine(),
            "bare_images_per_s": round(bare_ips, 2), "stage_images_per_s": round(stage_ips, 2),
            "ratio": round(stage_ips / bare_ips, 3), "ratios": [round(r, 3) for r in ratios],
            "ratio_median": round(statistics.median(ratios), 3),
            "bare_seconds": [round(t, 2) for t in t_bare], "stage_seconds": [round(t, 2) for t in t_stage],
            "decode_seconds": round(decode_s, 2),
            # on a CPU-only machine decoding shares the cores with the forward: perfect overlap of the two
            # then takes bare + decode / cores at best, so this is the highest reachable ratio there
            "ratio_ceiling_shared_cores": round(statistics.median(t_bare) / (statistics.median(t_bare)
                                                + decode_s / (os.cpu_count() or 1)), 3) if dev.type == "cpu" else None,
        }
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def table(r: dict[str, Any]) -> str:
    return "\n".join([
        f"| CLIP {r['model']} on {r['device']}, batch {r['batch_size']}, {r['num_workers']} worker(s), {r['torch_threads']} threads | images/s |",
        "|---|---|",
        f"| bare forward on pre-decoded tensors | {r['bare_images_per_s']} |",
        f"| clip-image stage end to end | {r['stage_images_per_s']} |",
        f"| ratio (goal >= 0.9) | {r['ratio']} |",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    ap.add_argument("--out", default="benchmarks/out/clip_throughput.json")
    a = ap.parse_args()
    r = clip_throughput(a.model, a.images, a.batch_size, a.num_workers, a.repeats, device=a.device)
    print(f"device: {r['device']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(r, indent=1) + "\n")
    print(table(r))


if __name__ == "__main__":
    main()
