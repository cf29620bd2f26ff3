"""Teacher throughput: a caching stage's images/s against the bare model's images/s on pre-decoded tensors,
measured side by side in one run, per teacher. Goal: stage / bare >= 0.9 (decoding overlaps the model in
DataLoader workers; shard writing is cheap).

Detector part (``frcnn``, ``fcos``, ``yolo``): the bare model is ``Detector.forward`` (model + its own
postprocessing) over letterboxed canvases prepared beforehand, batch by batch as the stage batches; the
stage is the full ``<teacher>`` stage (decode + letterbox in workers, forward, conversion to rows, HDF5
shards) into a temporary directory, over the same images.

CLIP part (``clip``): the ``clip-image`` stage end to end against the bare forward on pre-decoded tensors,
ViT-B-32 with random weights on 480-640 px synthetic JPEGs (``benchmarks/clip_throughput.py``, which also
runs alone with more options). Other teachers add a ``bench_<name>`` function and an entry in
:data:`BENCHES`.

    python benchmarks/teacher_throughput.py [--only frcnn,fcos,yolo,clip] [--set dataset.synthetic.n_images=40]
        [--random-weights]

Needs the prepared dataset (``grounding run prepare``); uses the configured/bootstrapped weights, or
random tiny ones with ``--random-weights`` (throughput does not depend on what the weights learnt).
Writes ``benchmarks/out/teacher_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from grounding import config as C
from grounding.data.images import load_rgb
from grounding.data.schema import CanonicalDataset
from grounding.runtime import resolve_device
from grounding import stages
from grounding.teachers.detectors import TEACHERS, letterbox_image
from grounding.teachers.detectors.stage import build_detector


def _random_weights(params: C.Params, teacher: str, out: Path) -> Path:
    from grounding.data.synthetic import CLASSES
    from grounding.teachers.detectors import save_checkpoint

    torch.manual_seed(0)
    n, cfg = len(CLASSES), getattr(params.teachers, teacher)
    if teacher == "frcnn":
        from grounding.teachers.detectors.torchvision_rcnn import build_faster_rcnn

        model, meta = build_faster_rcnn(cfg.arch, n + 1, input_size=cfg.input_size), {"arch": cfg.arch}
    elif teacher == "fcos":
        from grounding.teachers.detectors.fcos import build_fcos

        model, meta = build_fcos(cfg.arch, n, input_size=cfg.input_size), {"arch": cfg.arch}
    elif cfg.backend == "darknet":
        from grounding.teachers.detectors.darknet import DarknetConfig, DarknetYolo

        model, meta = DarknetYolo(DarknetConfig(cfg.width_multiple, n)), {}
    else:
        from grounding.teachers.detectors.yolo import import_ultralytics, model_config

        import_ultralytics(params)
        from ultralytics.nn.tasks import DetectionModel

        mc = model_config(cfg.config, n, cfg.depth_multiple, cfg.width_multiple)
        model, meta = DetectionModel(cfg=mc, nc=n, verbose=False), {"config": mc}
    path = out / f"{teacher}-random.pt"
    save_checkpoint(path, model.state_dict(), classes=list(CLASSES), **meta)
    return path


def bench_detector(teacher: str, params: C.Params, random_weights: bool, workdir: Path) -> dict:
    """Bare-model and stage images/s of one detector teacher over the prepared dataset."""
    from grounding.teachers.detectors.stage import run_detector_stage

    weights = _random_weights(params, teacher, workdir) if random_weights else stages.run(f"bootstrap-{teacher}", params).path
    doc_teachers = getattr(params.teachers, teacher).model_dump(mode="json") | {"weights": str(weights)}
    params = params.model_copy(update={"teachers": params.teachers.model_copy(
        update={teacher: type(getattr(params.teachers, teacher)).model_validate(doc_teachers)})})
    cfg = getattr(params.teachers, teacher)
    det = build_detector(teacher, params, weights, device=resolve_device(params.device))
    ds = CanonicalDataset.load(params.prepared_dir())
    canvases = [letterbox_image(load_rgb(ds.image_root, im), det.input_size, det.pad_rgb)[0] for im in ds.images]
    batches = [torch.stack(canvases[i:i + cfg.batch_size]) for i in range(0, len(canvases), cfg.batch_size)]
    sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        det.forward(batches[0].to(det.device))  # warm-up
        sync()
        t0 = time.perf_counter()
        for b in batches:
            det.forward(b.to(det.device))
        sync()
        bare = len(canvases) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    run_detector_stage(params, teacher, out_dir=workdir / f"{teacher}-stage")
    stage = len(canvases) / (time.perf_counter() - t0)
    return {"teacher": teacher, "images": len(canvases), "batch_size": cfg.batch_size,
            "num_workers": cfg.num_workers, "input_size": det.input_size, "device": str(det.device),
            "bare_images_per_s": round(bare, 2), "stage_images_per_s": round(stage, 2),
            "ratio": round(stage / bare, 3)}


def bench_clip(params: C.Params, random_weights: bool, workdir: Path) -> dict:
    """``clip-image`` stage vs bare forward, ViT-B-32 random weights (see ``clip_throughput.py``)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from clip_throughput import clip_throughput

    r = clip_throughput(model="ViT-B-32", n_images=64, batch_size=params.teachers.clip.batch_size,
                        num_workers=params.teachers.clip.num_workers, repeats=2, workdir=workdir / "clip",
                        device=params.device)
    return {"teacher": "clip", **r}


#: name -> benchmark; each returns a dict with at least ``ratio``.
BENCHES: dict[str, Callable[[C.Params, bool, Path], dict]] = {
    **{t: (lambda params, rw, wd, t=t: bench_detector(t, params, rw, wd)) for t in TEACHERS},
    "clip": bench_clip,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {list(BENCHES)}")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], help="params override, e.g. device=cpu")
    ap.add_argument("--random-weights", action="store_true", help="random tiny weights (no bootstrap needed)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/teacher_throughput.json"))
    a = ap.parse_args()
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {list(BENCHES)}")
    params = C.load(a.params, ["progress=false", *a.set])
    results = []
    with tempfile.TemporaryDirectory(prefix="teacher-bench-") as tmp:
        for name in names:
            r = BENCHES[name](params, a.random_weights, Path(tmp))
            results.append(r)
            print(f"| {name:6s} | bare {r['bare_images_per_s']:7.2f} img/s | stage {r['stage_images_per_s']:7.2f} img/s "
                  f"| ratio {r['ratio']:.3f} |", flush=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
