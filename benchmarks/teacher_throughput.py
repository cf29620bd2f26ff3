"""Teacher throughput: a caching stage's images/s against the bare model's images/s on pre-decoded tensors,
measured side by side in one run, per teacher: ``--repeats`` rounds (default 3) of bare then stage (the
order alternating; the bare forward runs in a second thread, as the stage's forward does: ``in_thread`` in
clip_throughput.py), the ratio of each round, and their median. Goal: stage / bare >= 0.9 (decoding and
letterboxing run in DataLoader workers, writing overlaps the next batch's forward: grounding/overlap.py).

Detector part (``frcnn``, ``fcos``, ``yolo``): the bare model is ``Detector.forward`` (model + its own
postprocessing) over letterboxed canvases prepared beforehand, batch by batch as the stage batches; the
stage is the full ``<teacher>`` stage (decode + letterbox in workers, forward, conversion to rows, HDF5
shards) into a temporary directory, over the same images, with the detector the bench built (its build
and weight hashing are a fixed cost per run, not throughput; the clip part passes its teacher the same way).

CLIP part (``clip``): the ``clip-image`` stage end to end against the bare forward on pre-decoded tensors,
ViT-B-32 with random weights on 480-640 px synthetic JPEGs (``benchmarks/clip_throughput.py``, which also
runs alone with more options). Other teachers add a ``bench_<name>`` function and an entry in
:data:`BENCHES`.

    python benchmarks/teacher_throughput.py [--only frcnn,fcos,yolo,clip] [--set dataset.synthetic.n_images=40]
        [--random-weights] [--real-sizes] [--repeats 3] [--clip-images 32]

``--real-sizes``: ResNet-50 FPN Faster R-CNN and FCOS (torchvision, random weights) instead of the tiny
bootstrapped ones (implies ``--random-weights``); CLIP is ViT-B-32 either way.

Needs the prepared dataset (``grounding run prepare``); uses the configured/bootstrapped weights, or
random tiny ones with ``--random-weights`` (throughput does not depend on what the weights learnt).
Writes ``benchmarks/out/teacher_throughput.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from grounding import config as C
from grounding.data.images import load_rgb
from grounding.data.schema import CanonicalDataset
from grounding.runtime import resolve_device
from grounding import stages
from grounding.teachers.detectors import TEACHERS, letterbox_image
from grounding.teachers.detectors.stage import build_detector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clip_throughput import clip_throughput, side_by_side  # noqa: E402


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


@contextlib.contextmanager
def _prebuilt(det: object) -> Iterator[None]:
    """``run_detector_stage`` gets ``det`` from ``build_detector`` while inside."""
    import grounding.teachers.detectors.stage as D

    real = D.build_detector
    D.build_detector = lambda *a, **k: det  # type: ignore[assignment]
    try:
        yield
    finally:
        D.build_detector = real


def _rounds(bare: Callable[[], float], stage: Callable[[int], float], repeats: int) -> dict:
    """``repeats`` side-by-side rounds of the bare forward and the stage (seconds each; order alternated):
    per round stage/bare images/s (= bare s / stage s), their median, and the seconds."""
    tb, ts = side_by_side(bare, stage, repeats)
    ratios = [b / s for b, s in zip(tb, ts)]
    return {"ratios": [round(r, 3) for r in ratios], "ratio": round(float(statistics.median(ratios)), 3),
            "bare_seconds": [round(t, 2) for t in tb], "stage_seconds": [round(t, 2) for t in ts],
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def bench_detector(teacher: str, params: C.Params, random_weights: bool, workdir: Path, repeats: int = 3) -> dict:
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

    def bare() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for b in batches:
                det.forward(b.to(det.device))
            sync()
            return time.perf_counter() - t0

    def stage(i: int) -> float:
        out = workdir / f"{teacher}-stage-{i}"  # a fresh directory each round: a committed set is a cache hit
        t0 = time.perf_counter()
        with _prebuilt(det):  # the model built above, as the clip bench passes its teacher: the stage's fixed
            run_detector_stage(params, teacher, out_dir=out)  # cost (building a ResNet-50) is not throughput
        dt = time.perf_counter() - t0
        shutil.rmtree(out)
        return dt

    r = _rounds(bare, stage, repeats)
    n = len(canvases)
    return {"teacher": teacher, "arch": getattr(cfg, "arch", None), "images": n, "batch_size": cfg.batch_size,
            "num_workers": cfg.num_workers, "input_size": det.input_size, "device": str(det.device),
            "bare_images_per_s": round(n / statistics.median(r["bare_seconds"]), 2),
            "stage_images_per_s": round(n / statistics.median(r["stage_seconds"]), 2), **r}


def bench_clip(params: C.Params, random_weights: bool, workdir: Path, repeats: int = 3, images: int = 64) -> dict:
    """``clip-image`` stage vs bare forward, ViT-B-32 random weights (see ``clip_throughput.py``)."""
    r = clip_throughput(model="ViT-B-32", n_images=images, batch_size=params.teachers.clip.batch_size,
                        num_workers=params.teachers.clip.num_workers, repeats=repeats, workdir=workdir / "clip",
                        device=params.device)
    return {"teacher": "clip", "arch": "ViT-B-32", **r, "ratio": r["ratio_median"]}


#: name -> benchmark ``(params, random weights, workdir, repeats, clip images)``; each returns a dict with at
#: least ``ratio`` (the median over the rounds).
BENCHES: dict[str, Callable[[C.Params, bool, Path, int, int], dict]] = {
    **{t: (lambda params, rw, wd, rep, _, t=t: bench_detector(t, params, rw, wd, rep)) for t in TEACHERS},
    "clip": lambda params, rw, wd, rep, n: bench_clip(params, rw, wd, rep, n),
}
REAL_SIZES = ["teachers.frcnn.arch=fasterrcnn_resnet50_fpn", "teachers.fcos.arch=fcos_resnet50_fpn"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {list(BENCHES)}")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], help="params override, e.g. device=cpu")
    ap.add_argument("--random-weights", action="store_true", help="random tiny weights (no bootstrap needed)")
    ap.add_argument("--real-sizes", action="store_true", help="ResNet-50 FPN Faster R-CNN / FCOS, random weights")
    ap.add_argument("--repeats", type=int, default=3, help="side-by-side rounds (the median ratio is reported)")
    ap.add_argument("--clip-images", type=int, default=64, help="synthetic JPEGs of the clip benchmark")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/teacher_throughput.json"))
    a = ap.parse_args()
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {list(BENCHES)}")
    params = C.load(a.params, ["progress=false", *(REAL_SIZES if a.real_sizes else []), *a.set])
    results = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="teacher-bench-") as tmp:
        for name in names:
            r = BENCHES[name](params, a.random_weights or a.real_sizes, Path(tmp), a.repeats, a.clip_images)
            results.append(r)
            print(f"| {name:6s} {r.get('arch') or '':24s} | bare {r['bare_images_per_s']:7.2f} img/s | stage "
                  f"{r['stage_images_per_s']:7.2f} img/s | ratio median {r['ratio']:.3f} of {r.get('ratios')} "
                  f"| load {r.get('load_avg_1m')} |", flush=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg_start": round(load0, 2), "load_avg_end": round(os.getloadavg()[0], 2),
            "repeats": a.repeats}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
