"""Tiny teachers for the embedded synthetic default: small detectors trained from scratch, in-pipeline.

With no ``teachers.<name>.weights`` in the params, the detector stages use a tiny teacher trained here on
the GT boxes of the synthetic *train* split (the synthetic world is the project's oracle; real datasets
must name real weights). Stages ``bootstrap-frcnn``, ``bootstrap-fcos``, ``bootstrap-yolo`` write
``<paths.models>/bootstrap/<teacher>/<dataset>.pt`` through :func:`grounding.artefacts.write_artefact`; the
key (in its sidecar) covers the dataset fingerprint, architecture, training params, seed, library versions and the code of
this module and every library module it imports (derived); the stage engine trains only when the stage is stale. CPU runs are deterministic for a fixed
seed (torch deterministic algorithms, single-process data loading).

Weights files are ``{"format": "grounding-detector-v1", arch/config, classes, "state_dict"}`` (the
darknet YOLO: a plain state dict in the published key layout, class names in the sidecar's provenance) and
load with ``torch.load(weights_only=True)``; the teacher identity hashes the file actually written.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from grounding.artefacts import write_artefact
from grounding.codeset import code_version
from grounding.config import ConfigError, Params
from grounding.data.gt import gt_regions
from grounding.data.images import load_rgb
from grounding.data.schema import CanonicalDataset
from grounding.environment import training_environment
from grounding.progress import progress_bar
from grounding.runtime import optimizer_step, seed_everything
from grounding.shards.keys import digest
from grounding.teachers.detectors import bootstrap_path  # noqa: F401 - where the stage writes

log = logging.getLogger(__name__)

BOOTSTRAP_TEACHERS = ("frcnn", "fcos", "yolo")




def detector_classes(ds: CanonicalDataset) -> list[str]:
    """Class list of a bootstrapped detector: the synthetic world's classes (stable order)."""
    from grounding.data.synthetic import CLASSES

    return list(CLASSES)


def colour_shape_samples(ds: CanonicalDataset, samples: list[tuple[str, np.ndarray, np.ndarray]],
                         ) -> tuple[list[str], list[tuple[str, np.ndarray, np.ndarray]]]:
    """Relabel shape-class samples as ``"<colour> <shape>"`` classes (colour-major within each shape), the
    colour read back from the synthetic generator (image ``i`` is regenerated from its own seed and its
    objects matched to the GT boxes exactly). Only for the synthetic dataset."""
    from grounding.data import synthetic as S

    cfg = S.SyntheticConfig(**ds.source["config"])
    classes = [f"{c} {s}" for s in S.CLASSES for c in S.COLOUR_NAMES]
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for image_id, boxes, _ in samples:
        colour_of = {tuple(np.float32(o.box).tolist()): f"{o.colour} {o.cls}"
                     for o in S.synthesize_image(cfg, S.index_of(image_id)).objects}
        labels = [index[colour_of[tuple(b)]] for b in boxes.tolist()]
        out.append((image_id, boxes, np.asarray(labels, dtype=np.int64)))
    return classes, out


def train_samples(ds: CanonicalDataset, classes: list[str], split: str = "train"
                  ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(image_id, boxes (K, 4) float32 xyxy original pixels, labels (K,) int64 into classes)`` for the
    images of ``split`` that have at least one GT box."""
    in_split = {r.image_id for r in ds.refs if r.split == split}
    out = []
    for image_id, reg in gt_regions(ds, classes):
        if image_id in in_split and len(reg["boxes"]) and (reg["labels"] >= 0).all():
            out.append((image_id, reg["boxes"], reg["labels"].astype(np.int64)))
    return out


def bootstrap_key(params: Params, teacher: str, ds: CanonicalDataset) -> str:
    """Key of the tiny teacher: everything that shapes the weights file."""
    cfg = getattr(params.teachers, teacher)
    darknet = teacher == "yolo" and cfg.backend == "darknet"
    libs = ("torch", "torchvision", "ultralytics") if teacher == "yolo" and not darknet else ("torch", "torchvision")
    if darknet:
        import cv2

        arch: dict[str, Any] = {"backend": "darknet", "width_multiple": cfg.width_multiple, "opencv": cv2.__version__}
    elif teacher == "yolo":
        arch = {"config": cfg.config, "depth_multiple": cfg.depth_multiple, "width_multiple": cfg.width_multiple}
    else:
        arch = {"arch": cfg.arch}
    return digest({
        "teacher": teacher, **arch, "input_size": cfg.input_size, "bootstrap": cfg.bootstrap, "seed": params.seed,
        "dataset": ds.fingerprint(), "libraries": {lib: md.version(lib) for lib in libs},
        "code": code_version(__name__),  # derived: this module and all it imports
    })


def bootstrap(params: Params, teacher: str) -> Path:
    """Train the tiny ``teacher`` on the synthetic train split; returns the weights file."""
    if teacher not in BOOTSTRAP_TEACHERS:
        raise KeyError(f"no bootstrap for {teacher!r}; teachers are {BOOTSTRAP_TEACHERS}")
    if params.dataset.format != "synthetic":
        raise ConfigError(f"teachers.{teacher}.weights is required for dataset format {params.dataset.format!r}: "
                          "tiny teachers are bootstrapped only for the synthetic dataset")
    ds = CanonicalDataset.load(params.prepared_dir(), refs=False)  # the key needs only the fingerprint
    key = bootstrap_key(params, teacher, ds)
    train: Callable[[Params, CanonicalDataset, Path, str], dict[str, Any]] = (
        (_train_darknet if params.teachers.yolo.backend == "darknet" else _train_yolo) if teacher == "yolo"
        else _train_torchvision)
    provenance: dict[str, Any] = {"teacher": teacher, "dataset": ds.name, "dataset_fingerprint": ds.fingerprint(),
                                  "seed": params.seed}

    def build(tmp: Path) -> None:
        provenance["environment"] = training_environment()  # a record only: not in the key
        t0 = time.perf_counter()
        full = CanonicalDataset.load(params.prepared_dir())
        provenance.update(train(params, full, tmp, teacher) | {"train_seconds": round(time.perf_counter() - t0, 1)})
        log.info("bootstrap-%s: trained in %.0f s", teacher, provenance["train_seconds"])

    return write_artefact(bootstrap_path(params, teacher), key, build, provenance)


# ---- torchvision (Faster R-CNN, FCOS) ------------------------------------------------------------------------
def _train_torchvision(params: Params, ds: CanonicalDataset, out: Path, teacher: str) -> dict[str, Any]:
    """Train a torchvision Faster R-CNN or FCOS (AdamW, warm-up + cosine, horizontal flips) on letterboxed
    canvases of the train split; writes the weights file ``out``."""
    from grounding.imaging import IMAGENET_MEAN, letterbox_image
    from grounding.teachers.detectors import save_checkpoint

    cfg = getattr(params.teachers, teacher)
    boot = cfg.bootstrap
    size = boot.input_size or cfg.input_size
    classes = detector_classes(ds)
    gen = seed_everything(params.seed)
    model = _build_torchvision(teacher, cfg.arch, len(classes), size)
    index = ds.image_index
    canvases, targets = [], []
    for image_id, boxes, labels in train_samples(ds, classes):
        canvas, lb = letterbox_image(load_rgb(ds.image_root, index[image_id]), size, IMAGENET_MEAN)
        canvases.append(canvas)
        targets.append((torch.from_numpy(lb.forward(boxes)),
                        torch.from_numpy(labels + (1 if teacher == "frcnn" else 0))))
    if not canvases:
        raise ConfigError(f"bootstrap-{teacher}: the train split of {ds.name} has no GT boxes to train on")
    steps_per_epoch = math.ceil(len(canvases) / boot.batch_size)
    total = steps_per_epoch * boot.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=boot.lr, weight_decay=1e-4)
    warmup = min(50, total // 4 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    losses: list[float] = []
    bar = progress_bar(boot.epochs * len(canvases), f"bootstrap-{teacher}", unit="img", enabled=params.progress)
    for _epoch in range(boot.epochs):
        order = torch.randperm(len(canvases), generator=gen).tolist()
        for b in range(steps_per_epoch):
            idx = order[b * boot.batch_size:(b + 1) * boot.batch_size]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            imgs, tgts = [], []
            for i, f in zip(idx, flip.tolist()):
                img, (boxes, labels) = canvases[i], targets[i]
                if f:  # horizontal flip of the canvas and its boxes (x -> size - x)
                    img = img.flip(-1)
                    boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
                imgs.append(img)
                tgts.append({"boxes": boxes, "labels": labels})
            loss = sum(model(imgs, tgts).values())
            losses.append(optimizer_step(loss, model, opt, sched, clip=10.0))
            bar.update(len(idx))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    save_checkpoint(out, model.state_dict(), library="torchvision", arch=cfg.arch, classes=classes,
                    input_size=size)
    return {"arch": cfg.arch, "input_size": size, "epochs": boot.epochs, "steps": total,
            "train_images": len(canvases), "final_loss": round(float(np.mean(losses[-steps_per_epoch:])), 4)}


def _build_torchvision(teacher: str, arch: str, n_classes: int, size: int) -> torch.nn.Module:
    if teacher == "frcnn":
        from grounding.teachers.detectors.torchvision_rcnn import build_faster_rcnn

        return build_faster_rcnn(arch, n_classes + 1, input_size=size)
    from grounding.teachers.detectors.fcos import build_fcos

    return build_fcos(arch, n_classes, input_size=size)


# ---- ultralytics (YOLOv3) ----------------------------------------------------------------------------------
def _write_yolo_dataset(ds: CanonicalDataset, classes: list[str], samples: list[tuple[str, np.ndarray, np.ndarray]],
                        root: Path) -> Path:
    """``samples`` in ultralytics' layout (images/ symlinks, labels/ ``cls cx cy w h`` normalised);
    returns the data yaml (val = train: validation is switched off)."""
    import yaml

    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    index = ds.image_index
    for image_id, boxes, lab in samples:
        rec = index[image_id]
        src = (ds.image_root / rec.path).resolve()
        dst = images / f"{image_id}{src.suffix}"
        if not dst.exists():
            os.symlink(src, dst)
        w, h = rec.width, rec.height
        lines = [f"{c} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
                 f"{(b[3] - b[1]) / h:.6f}" for b, c in zip(boxes.tolist(), lab.tolist())]
        (labels / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root.resolve()), "train": "images/train", "val": "images/train",
                                    "names": dict(enumerate(classes))}))
    return data


def _train_yolo(params: Params, ds: CanonicalDataset, out: Path, teacher: str = "yolo") -> dict[str, Any]:
    """Train the scaled YOLOv3 with ultralytics' own trainer (offline, no plots, no validation) in a
    temporary work dir beside ``out``; writes its state dict to ``out``."""
    import shutil
    import tempfile

    import yaml

    from grounding.teachers.detectors import save_checkpoint
    from grounding.teachers.detectors.yolo import model_config, offline_ultralytics

    cfg = params.teachers.yolo
    boot = cfg.bootstrap
    classes = detector_classes(ds)
    samples = train_samples(ds, classes)
    if boot.labels == "colour-shape":
        classes, samples = colour_shape_samples(ds, samples)
    seed_everything(params.seed)
    work = Path(tempfile.mkdtemp(prefix="yolo-", dir=out.parent))
    try:
        offline_ultralytics(work / "config")
        from ultralytics import YOLO

        data = _write_yolo_dataset(ds, classes, samples, work / "data")
        model_yaml = work / "model.yaml"
        arch = model_config(cfg.config, len(classes), cfg.depth_multiple, cfg.width_multiple)
        model_yaml.write_text(yaml.safe_dump(arch))
        model = YOLO(str(model_yaml), task="detect")
        _yolo_progress(model, boot.epochs * len(samples), params.progress)
        model.train(data=str(data), epochs=boot.epochs, imgsz=boot.input_size or cfg.input_size,
                    batch=boot.batch_size, lr0=boot.lr, optimizer="AdamW", workers=0, device="cpu",
                    seed=params.seed, deterministic=True, plots=False, val=False, amp=False, pretrained=False,
                    project=str((work / "runs").resolve()), name="train", exist_ok=True, verbose=False,
                    cache=False, save=True, close_mosaic=max(1, boot.epochs // 5),
                    # a short run: ultralytics' defaults would accumulate gradients up to a nominal batch of
                    # 64 and spend >= 100 iterations warming up, i.e. the whole run, so the model never trains
                    nbs=boot.batch_size, warmup_epochs=0)
        # the final EMA weights: last.pt (ultralytics reloads best.pt, which without validation is an early epoch)
        from ultralytics.nn.tasks import load_checkpoint as load_ultralytics_checkpoint

        trained, _ = load_ultralytics_checkpoint(model.trainer.last)  # our own file, written just now
        save_checkpoint(out, trained.float().state_dict(), library="ultralytics", config=arch,
                        classes=classes, input_size=boot.input_size or cfg.input_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"config": cfg.config, "depth_multiple": cfg.depth_multiple, "width_multiple": cfg.width_multiple,
            "input_size": boot.input_size or cfg.input_size, "epochs": boot.epochs, "labels": boot.labels,
            "classes": len(classes)}


def _yolo_progress(model: Any, total: int, enabled: bool) -> None:
    """One bar over the whole ultralytics run (images, rows/s, ETA), fed by its batch callbacks."""
    bar = progress_bar(total, "bootstrap-yolo", unit="img", enabled=enabled)
    seen = {"epoch": -1, "n": 0}

    def on_batch_end(trainer: Any) -> None:
        n_epoch = len(trainer.train_loader.dataset)
        if trainer.epoch != seen["epoch"]:
            seen.update(epoch=trainer.epoch, n=0)
            bar.total = trainer.epochs * n_epoch  # the images ultralytics actually loaded
        step = min(trainer.batch_size, n_epoch - seen["n"])
        seen["n"] += step
        bar.update(step)

    model.add_callback("on_train_batch_end", on_batch_end)
    model.add_callback("on_train_end", lambda trainer: bar.close())


# ---- darknet (SimREC's YOLOv3) --------------------------------------------------------------------------------
def _train_darknet(params: Params, ds: CanonicalDataset, out: Path, teacher: str = "yolo") -> dict[str, Any]:
    """Train the width-scaled SimREC YOLOv3 (:mod:`grounding.teachers.detectors.darknet_train`) on SimREC
    canvases of the train split; writes a plain state dict in the published key layout to ``out`` (the file
    users' ``yolov3_coco.pth`` is; the class names go in the sidecar's provenance)."""
    from grounding.teachers.detectors.darknet import DarknetConfig
    from grounding.teachers.detectors.darknet_stage import normalise, original_to_canvas_xyxy, simrec_letterbox
    from grounding.teachers.detectors.darknet_train import train_darknet

    cfg = params.teachers.yolo
    boot = cfg.bootstrap
    size = boot.input_size or cfg.input_size
    classes = detector_classes(ds)
    samples = train_samples(ds, classes)
    if boot.labels == "colour-shape":
        classes, samples = colour_shape_samples(ds, samples)
    if not samples:
        raise ConfigError(f"bootstrap-yolo: the train split of {ds.name} has no GT boxes to train on")
    gen = seed_everything(params.seed)
    index = ds.image_index
    canvases, targets = [], []
    for image_id, boxes, labels in samples:
        canvas, lb = simrec_letterbox(load_rgb(ds.image_root, index[image_id]), size)
        canvases.append(normalise(canvas[None])[0])
        targets.append((torch.from_numpy(original_to_canvas_xyxy(boxes, lb)), torch.from_numpy(labels)))
    net = DarknetConfig(float(cfg.width_multiple), len(classes))
    model, stats = train_darknet(canvases, targets, net, epochs=boot.epochs, batch_size=boot.batch_size,
                                 lr=boot.lr, crop=boot.crop or size, gen=gen, progress=params.progress)
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out)
    return {"backend": "darknet", "width": net.width, "classes": classes, "input_size": size,
            "crop": boot.crop or size, "epochs": boot.epochs, "labels": boot.labels,
            "train_images": len(canvases), **stats}


# ---- stage run functions ----------------------------------------------------------------------------------
def run_bootstrap_frcnn(params: Params) -> Path:
    """Stage ``bootstrap-frcnn``: the tiny Faster R-CNN weights file (no-op when weights are given)."""
    return _run(params, "frcnn")


def run_bootstrap_fcos(params: Params) -> Path:
    """Stage ``bootstrap-fcos``: the tiny FCOS weights file (no-op when weights are given)."""
    return _run(params, "fcos")


def run_bootstrap_yolo(params: Params) -> Path:
    """Stage ``bootstrap-yolo``: the tiny YOLOv3 weights file (no-op when weights are given)."""
    return _run(params, "yolo")


def _run(params: Params, teacher: str) -> Path:
    weights = getattr(params.teachers, teacher).weights
    if weights:
        log.info("bootstrap-%s: teachers.%s.weights is set (%s); nothing to train", teacher, teacher, weights)
        return Path(weights)
    return bootstrap(params, teacher)
