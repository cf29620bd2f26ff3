"""The GPU check of issue 25 (run by ``benchmarks/gpu_check.sh``): on one CUDA GPU, within a time budget,

1. every stage of the pipeline (``grounding.stages.PIPELINE``: the teacher caches' CUDA paths, RefCLIP and
   the five students) on a 64-image synthetic set, with ResNet-50-size detectors (torchvision
   ``fasterrcnn_resnet50_fpn`` / ``fcos_resnet50_fpn``, SimREC's darknet YOLOv3 at full width) and CLIP
   ViT-B-32, all with random weights (throughput and code paths do not depend on what weights learnt),
   one epoch of each student and of RefCLIP with ``train.precision`` bf16;
2. each detector stage's and ``clip-image``'s images/s against its bare forward
   (``benchmarks/teacher_throughput.py``'s measurements, same weights).

Writes ``benchmarks/out/gpu_check.json`` (``benchmarks/gpu_check_table.py`` makes the README table of it).
``GROUNDING_GPU_CHECK_DEVICE=cpu``: the same steps on CPU with tiny models and 8 images (a dry run that
tests/test_gpu_check.py runs, so the script is exercised without a GPU). A failing step is recorded with
its error and the check goes on; a step that would start after the budget is recorded as skipped.

    python benchmarks/gpu_check.py [--budget-s 450] [--out benchmarks/out/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DEVICE_ENV = "GROUNDING_GPU_CHECK_DEVICE"
#: (GPU, CPU dry run): images, detector archs, darknet width, CLIP model, student trunk overrides
FULL = {"images": 64, "frcnn": "fasterrcnn_resnet50_fpn", "fcos": "fcos_resnet50_fpn", "yolo_width": 1.0,
        "clip": "ViT-B-32", "fcos_size": 512, "trunk": []}
DRY = {"images": 8, "frcnn": "tiny", "fcos": "tiny", "yolo_width": 0.125, "clip": "grounding-tiny-clip", "fcos_size": 128,
       "trunk": ["input_size=64", "depth=10", "width=0.25", "d_model=16", "text_layers=1", "fusion_layers=1",
                 "visual_layers=1", "heads=2", "batch_images=4", "max_len=8"]}


def _random_clip(model: str, path: Path) -> Path:
    """A random-init open_clip ``model`` state dict at ``path`` (seed 0)."""
    from grounding import config as C
    from grounding.teachers import clip as T

    torch.manual_seed(0)
    spec = T.model_spec(C.from_dict({"teachers": {"clip": {"model": model}}}).teachers.clip)
    torch.save(T.create_model(spec).state_dict(), path)
    return path


def overrides(work: Path, size: dict[str, Any], device: str) -> list[str]:
    """The ``--set`` list of the check: paths under ``work``, random weights (written there), bf16, 1 epoch."""
    from grounding import config as C
    from teacher_throughput import _random_weights

    base = [f"dataset.synthetic.n_images={size['images']}", "progress=false", f"device={device}",
            f"teachers.clip.device={device}",
            *(f"paths.{k}={work / k}" for k in ("prepared", "teachers", "students", "models", "metrics")),
            f"teachers.frcnn.arch={size['frcnn']}", f"teachers.fcos.arch={size['fcos']}",
            f"teachers.yolo.width_multiple={size['yolo_width']}", f"teachers.clip.model={size['clip']}",
            f"teachers.fcos.input_size={size['fcos_size']}",
            # the detectors' classes (every synthetic class), not gt-boxes' (8 images may lack one)
            "teachers.clip.classes_from=frcnn-proposals"]
    p = C.load(None, base)
    weights = work / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    base += [f"teachers.{t}.weights={_random_weights(p, t, weights)}" for t in ("frcnn", "fcos", "yolo")]
    base.append(f"teachers.clip.pretrained={_random_clip(size['clip'], weights / 'clip-random.pt')}")
    trunk = [f"students.{s}.{t}" for s in ("rec", "epmvg", "pbrec") for t in ["epochs=1", *size["trunk"]]]
    pbrec = [f"students.pbrec.input_size={size['fcos_size']}", "students.pbrec.visual_stride=32",
             "students.pbrec.random_resize=[]"]  # PBREC's tokens are the FCOS P5 points one to one
    return [*base, "train.precision=bf16", *trunk, *pbrec, "refclip.epochs=1", "refclip.batch_size=16",
            "students.nce_distill.steps=20", "students.bicm.kam_epochs=1"]


def _step(results: list[dict[str, Any]], deadline: float, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
    """Run ``fn`` unless past ``deadline``; append ``{name, seconds, status, error?, ...fn's figures}``."""
    if time.monotonic() > deadline:
        results.append({"name": name, "status": "skipped (time budget)"})
        return
    t0 = time.perf_counter()
    try:
        extra = fn() or {}
        row = {"name": name, "status": "ok", **extra}
    except Exception as e:  # noqa: BLE001 - every failure is recorded and the check goes on
        row = {"name": name, "status": "failed", "error": f"{type(e).__name__}: {str(e)[:400]}",
               "where": traceback.format_exc(limit=3)[-600:]}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    results.append(row)
    print(f"{name:24s} {row['status']:8s} {row['seconds']:7.1f} s {row.get('error', '')}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=450, help="no step starts after this many seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_check.json")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    a = ap.parse_args()
    device = os.environ.get(DEVICE_ENV, "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a machine "
              f"with one, or set {DEVICE_ENV}=cpu for the tiny CPU dry run", file=sys.stderr)
        return 2
    size = FULL if device == "cuda" else DRY
    start = time.monotonic()
    deadline = start + a.budget_s
    from grounding import config as C
    from grounding import stages

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = a.work or Path(tmp)
        sets = overrides(work, size, device)
        params = C.load(None, sets)
        stage_rows: list[dict[str, Any]] = []
        for name in stages.PIPELINE:
            _step(stage_rows, deadline, name, lambda name=name: {"output": str(stages.run(name, params).path)})
        tp_rows: list[dict[str, Any]] = []
        from teacher_throughput import bench_detector

        for teacher in ("frcnn", "fcos", "yolo"):
            _step(tp_rows, deadline, teacher,
                  lambda t=teacher: bench_detector(t, params, False, work / "throughput"))
        from clip_throughput import clip_throughput

        cp = params.teachers.clip
        _step(tp_rows, deadline, "clip", lambda: clip_throughput(
            model=size["clip"], n_images=size["images"], batch_size=cp.batch_size, num_workers=cp.num_workers,
            repeats=2, workdir=work / "clip-tp", device=device))
    doc = {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
           "torch": torch.__version__, "python": platform.python_version(), "images": size["images"],
           "models": {k: size[k] for k in ("frcnn", "fcos", "yolo_width", "clip")}, "precision": "bf16",
           "budget_s": a.budget_s, "total_s": round(time.monotonic() - start, 1),
           "stages": stage_rows, "throughput": tp_rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0 if all(r["status"] == "ok" for r in stage_rows + tp_rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
