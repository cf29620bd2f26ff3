"""Shared pieces of the student stages: shard-set checks, letterboxed image canvases, random-resize
augmentation, EMA, the training loop, prediction, and metric / curve / prediction writing.

Students read teacher outputs from shard sets only (never a teacher model). Every shard set a student
reads goes through :func:`require_rows` first: it must have been computed from the same canonical dataset
(``manifest.inputs["dataset"]``) and hold a row for every key the student needs; otherwise the stage
stops before training with a message naming the stage, the shard set and what is wrong.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grounding import distributed as D
from grounding import imaging
from grounding import runtime as R
from grounding.boxes import Letterbox
from grounding.data.images import load_rgb
from grounding.data.schema import CanonicalDataset, DataError, RefRecord
from grounding.evaluate import accuracy
from grounding.progress import progress_bar
from grounding.runtime import torch_threads, training  # noqa: F401 - re-exported for the student stages
from grounding.shards import FieldSpec, ShardSet

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = imaging.IMAGENET_MEAN, imaging.IMAGENET_STD  # grounding.imaging's (shared)


class StudentInputError(DataError):
    """A student's input shard set does not belong to its dataset or lacks rows it needs (a ``DataError``,
    so a known error: one line at every entry point)."""


# ---- input checks (public: the other students import these) --------------------------------------------
def require_rows(shard_set: ShardSet | str | os.PathLike[str], keys: Sequence[str], dataset_fingerprint: str,
                 stage: str) -> ShardSet:
    """Check that ``shard_set`` was computed from the dataset with ``dataset_fingerprint`` and holds a row
    for every key in ``keys``; return it (opened). Raises :class:`StudentInputError` naming the stage,
    the shard set, and both fingerprints or the missing keys (the first few and their count)."""
    ss = shard_set if isinstance(shard_set, ShardSet) else ShardSet(shard_set)
    theirs = ss.manifest.inputs.get("dataset")
    if theirs != dataset_fingerprint:
        raise StudentInputError(
            f"{stage}: shard set {ss.path} (stage {ss.manifest.stage}) was computed from dataset fingerprint "
            f"{theirs!r}, but the training dataset has fingerprint {dataset_fingerprint!r}; rerun "
            f"{ss.manifest.stage} on this dataset")
    missing = [k for k in keys if k not in ss]
    if missing:
        raise StudentInputError(
            f"{stage}: shard set {ss.path} (stage {ss.manifest.stage}) has no row for {len(missing)} of the "
            f"{len(keys)} keys {stage} needs, e.g. {missing[:5]} (failed items: see its manifest errors)")
    return ss


def teacher_set(params: Any, teacher_stage: str, keys: Sequence[str], ds: CanonicalDataset, stage: str) -> ShardSet:
    """Open ``params.teacher_dir(teacher_stage)`` and :func:`require_rows` on it."""
    path = params.teacher_dir(teacher_stage)
    if not (Path(path) / "manifest.json").is_file():
        raise StudentInputError(f"{stage}: needs the shard set of {teacher_stage} at {path}, which does not exist "
                                f"(run `grounding run {teacher_stage}` first)")
    return require_rows(path, keys, ds.fingerprint(), stage)


def split_refs(ds: CanonicalDataset, split: str | None = None) -> list[RefRecord]:
    """Refs of ``split`` (all when None), in ref-id order."""
    return [r for r in ds.refs if split is None or r.split == split]


# ---- images ----------------------------------------------------------------------------------------------
class Canvases:
    """Letterboxed images of a dataset at one canvas size, decoded on first use and kept (uint8, the
    resized image only). :meth:`canvas` is the detector teachers' canvas pixel for pixel
    (:func:`grounding.imaging.letterbox_image` with ImageNet-mean padding)."""

    def __init__(self, ds: CanonicalDataset, size: int, cache: bool = True) -> None:
        self.ds, self.size, self.cache = ds, size, cache
        self._images = ds.image_index
        self._store: dict[str, tuple[torch.Tensor, Letterbox]] = {}

    def get(self, image_id: str) -> tuple[torch.Tensor, Letterbox]:
        """The resized uint8 pixels ``(3, new_h, new_w)`` of an image and its letterbox."""
        if image_id in self._store:
            return self._store[image_id]
        out = imaging.letterbox_pixels(load_rgb(self.ds.image_root, self._images[image_id]), self.size)
        if self.cache:
            self._store[image_id] = out
        return out

    def canvas(self, image_id: str) -> torch.Tensor:
        """``(3, S, S)`` float32 in [0, 1], padded with the ImageNet mean (as the frcnn/fcos teachers)."""
        pixels, lb = self.get(image_id)
        return imaging.paste_canvas(pixels, lb, imaging.IMAGENET_MEAN)

    def letterbox(self, image_id: str) -> Letterbox:
        """Letterbox parameters of an image (no decoding: from its recorded size)."""
        im = self._images[image_id]
        return Letterbox.fit(im.width, im.height, self.size)

    def batch(self, image_ids: Sequence[str]) -> torch.Tensor:
        """``(B, 3, S, S)`` float32, ImageNet-normalised (padding is exactly 0)."""
        return imaging.normalise(torch.stack([self.canvas(i) for i in image_ids]))


def resize_canvas(x: torch.Tensor, size: int) -> torch.Tensor:
    """Random-resize augmentation: rescale a ``(B, 3, S, S)`` letterboxed batch to ``size``; boxes given as
    fractions of the canvas are unchanged by it (the letterbox is linear)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def to_canvas_fraction(boxes: np.ndarray, lbs: Sequence[Letterbox]) -> torch.Tensor:
    """``(N, 4)`` xyxy original pixels -> xyxy as fractions of each row's letterbox canvas (float32)."""
    out = np.stack([lb.forward(b[None])[0] / lb.size for b, lb in zip(np.asarray(boxes, np.float32), lbs)])
    return torch.from_numpy(out.astype(np.float32))


def from_canvas_fraction(boxes: torch.Tensor, lbs: Sequence[Letterbox]) -> np.ndarray:
    """Inverse of :func:`to_canvas_fraction`, clipped to each image: ``(N, 4)`` float32 original pixels."""
    b = boxes.detach().cpu().numpy().astype(np.float64)
    return np.stack([lb.inverse(row[None] * lb.size)[0] for row, lb in zip(b, lbs)]).astype(np.float32)


# ---- batching, EMA, optimisation -------------------------------------------------------------------------
def image_batches(image_of: Sequence[str], batch_images: int, generator: torch.Generator) -> list[np.ndarray]:
    """Sentence indices grouped by image: a seeded shuffle of the distinct images cut into groups of
    ``batch_images``; each batch holds every sentence of its images (so the backbone runs once per image)."""
    by_image: dict[str, list[int]] = {}
    for i, im in enumerate(image_of):
        by_image.setdefault(im, []).append(i)
    images = sorted(by_image)
    perm = torch.randperm(len(images), generator=generator).tolist()
    out = []
    for s in range(0, len(perm), batch_images):
        out.append(np.array([i for j in perm[s:s + batch_images] for i in by_image[images[j]]], dtype=np.int64))
    return out


def ema_model(model: torch.nn.Module, decay: float, warmup: bool = True) -> torch.optim.swa_utils.AveragedModel:
    """EMA copy via ``torch.optim.swa_utils.AveragedModel`` (parameters and buffers). With ``warmup`` the
    decay of update n is ``min(decay, (1 + n) / (10 + n))`` (timm's ModelEma warm-up)."""

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        return averaged * d + current * (1 - d)

    return torch.optim.swa_utils.AveragedModel(model, avg_fn=avg_fn, use_buffers=True)


def param_groups(model: torch.nn.Module, lr: float, lr_backbone: float, weight_decay: float,
                 lr_bert: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: parameters under a ``backbone`` module at ``lr_backbone``, under a ``bert`` module (the
    pre-trained language model) at ``lr_bert`` (``lr`` when None), the rest at ``lr``; empty groups left out."""
    def group(name: str) -> str:
        if name.startswith("backbone.") or ".backbone." in name:
            return "backbone"
        if name.startswith("bert.") or ".bert." in name:
            return "bert"
        return "rest"

    rates = {"rest": lr, "backbone": lr_backbone, "bert": lr if lr_bert is None else lr_bert}
    by: dict[str, list[torch.nn.Parameter]] = {"rest": [], "backbone": [], "bert": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            by[group(n)].append(p)
    return [{"params": ps, "lr": rates[g], "weight_decay": weight_decay, "name": g}
            for g, ps in by.items() if ps or g == "rest"]


def scheduler(opt: torch.optim.Optimizer, tp: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: ``step`` (MultiStepLR at ``tp.lr_drop``, ``tp.lr_gamma``) or ``cosine``
    (CosineAnnealingLR to 0 over ``tp.epochs``)."""
    kind = getattr(tp, "lr_schedule", "step")
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tp.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(tp.lr_drop), gamma=tp.lr_gamma)


LossFn = Callable[[torch.nn.Module, np.ndarray, int], tuple[torch.Tensor, dict[str, float]]]


def fit(model: torch.nn.Module, batches_fn: Callable[[torch.Generator], list[np.ndarray]], loss_fn: LossFn, tp: Any,
        *, generator: torch.Generator, ema: torch.optim.swa_utils.AveragedModel | None = None,
        progress: bool = False, desc: str = "student", group_of: Sequence[Any] | None = None) -> list[dict[str, float]]:
    """The shared loop: per epoch, ``batches_fn(gen)`` gives sentence-index batches; per batch a canvas size
    (random-resize when ``tp.random_resize``) and ``loss_fn(model, batch, size) -> (loss, parts)``;
    AdamW with the :func:`param_groups` learning rates, :func:`scheduler` per epoch; EMA updated after each step.
    Returns the per-epoch curve ``[{"epoch", "loss", <parts>...}]``.

    Device and precision: :func:`grounding.runtime.current_training` (the model and EMA end on that device).
    Under torchrun every rank draws the same global batches and trains on its slice (``group_of[i]``: item
    ``i``'s image, never split across ranks; ``tp.batch_images`` must divide by the process count) with
    DDP, global-batch BatchNorm and the loss weighted so that the step is the global batch's step."""
    tr = R.current_training()
    raw = R.inputs_to_device(model.to(tr.device))
    if ema is not None:
        R.inputs_to_device(ema.to(tr.device))
    if D.world_size() > 1:
        D.check_divisible(tp.batch_images, "batch_images")
        raw = D.global_batchnorm(raw, tr.device)
    opt = torch.optim.AdamW(param_groups(raw, tp.lr, tp.lr_backbone, tp.weight_decay, getattr(tp, "lr_bert", None)))
    sched = scheduler(opt, tp)
    scaler = R.grad_scaler(tr.precision, tr.device)
    net = D.wrap_ddp(raw, tr.device, find_unused=True)  # e.g. PBREC's point head leaves the box head unused
    curve: list[dict[str, float]] = []
    epochs: Any = range(tp.epochs)
    bar = progress_bar(None, desc, unit="row", enabled=progress and D.is_main())  # sentences, rows/s, ETA
    raw.train()
    for epoch in epochs:
        sums: dict[str, float] = {}
        count = 0
        batches = D.global_batches_usable(batches_fn(generator), group_of)
        if bar.total is None:
            bar.total = tp.epochs * sum(len(b) for b in batches)
            bar.refresh()
        for batch in batches:
            size = tp.input_size
            if tp.random_resize:
                size = int(tp.random_resize[int(torch.randint(len(tp.random_resize), (1,), generator=generator))])
            local = np.asarray(D.shard_batch(batch, group_of), dtype=np.int64)
            with R.autocast(tr.precision, tr.device):
                loss, parts = loss_fn(net, local, size)
            w = D.local_weight(len(local), len(batch))
            R.scaled_step(loss if w == 1.0 else loss * w, opt, scaler)
            if ema is not None:
                ema.update_parameters(raw)
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + D.all_reduce_mean(v, len(local)) * len(batch)
            count += len(batch)
            bar.update(len(batch))
        sched.step()
        curve.append({"epoch": epoch + 1, **{k: round(v / max(count, 1), 6) for k, v in sums.items()}})
        bar.set_postfix(epoch=epoch + 1, loss=f"{curve[-1]['loss']:.4f}")
    bar.close()
    raw.eval()
    return curve


# ---- evaluation and outputs ------------------------------------------------------------------------------
def acc_per_split(pred: Mapping[str, np.ndarray], ds: CanonicalDataset) -> tuple[dict[str, float], dict[str, int]]:
    """Acc@0.5 (rounded to 4 places) and counts per split of predicted xyxy boxes ``{ref_id: (4,)}``
    against the GT boxes of refs that have one."""
    by_split: dict[str, list[RefRecord]] = {}
    for r in ds.refs:
        if r.ref_id in pred and r.box is not None:
            by_split.setdefault(r.split, []).append(r)
    acc, n = {}, {}
    for split, refs in sorted(by_split.items()):
        p = np.stack([pred[r.ref_id] for r in refs]).astype(np.float32)
        g = np.array([r.box for r in refs], dtype=np.float32)
        acc[split], n[split] = round(accuracy(p, g), 4), len(refs)
    return acc, n


def mean_acc(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-split mean over runs (seeds), rounded to 4 places."""
    return {s: round(float(np.mean([r[s] for r in runs])), 4) for s in runs[0]}


def metrics_path(params: Any, stage: str) -> Path:
    return Path(params.paths.metrics) / f"{stage}.json"


def curve_path(params: Any, stage: str) -> Path:
    return Path(params.paths.metrics) / f"{stage}-curve.json"


def model_path(params: Any, stage: str) -> Path:
    """``models/students/<stage>/<dataset>.pt``."""
    return Path(params.paths.models) / "students" / stage / f"{params.dataset.name}.pt"


def write_json(path: Path, doc: Any) -> Path:
    """Write ``doc`` as sorted JSON; a file that already holds exactly that text is left alone (its mtime
    too), so a cached rerun touches nothing DVC or Prefect watch."""
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_metrics(params: Any, stage: str, acc50: Mapping[str, float], n: Mapping[str, int],
                  baselines: Mapping[str, Mapping[str, float]], **extra: Any) -> Path:
    """``data/metrics/<stage>.json`` per the students' metrics contract:
    ``{"acc50": {split: float}, "n": {split: int}, "baselines": {name: {split: float}}, ...extra}``."""
    return write_json(metrics_path(params, stage), {"acc50": dict(acc50), "n": dict(n),
                                                     "baselines": {k: dict(v) for k, v in baselines.items()}, **extra})


PREDICTION_FIELDS = (
    FieldSpec("box", "float32", (4,), meaning="predicted box, xyxy original pixels"),
    FieldSpec("iou", "float32", (), meaning="IoU with the GT box (NaN when the sentence has none)"),
)


def write_predictions(params: Any, stage: str, module: str, ds: CanonicalDataset,
                      pred: Mapping[str, np.ndarray], inputs: Mapping[str, str], stage_params: Mapping[str, Any],
                      weights_sha256: str) -> Path:
    """Per-sentence predictions as a sentence-level shard set under ``params.student_dir(stage)``. Its key
    holds the input shard-set keys, the student's params and code (``module``: its derived code set) and the
    weights' sha256, so a retraining that ends at other weights replaces the predictions, one that ends at
    the same weights keeps them."""
    from grounding import __version__
    from grounding.boxes import paired_iou
    from grounding.codeset import code_version
    from grounding.stage_writer import dataset_extra, write_stage

    out = params.student_dir(stage)
    refs = {r.ref_id: r for r in ds.refs}

    def rows(todo: list[str]):
        for k in todo:
            if k not in pred:
                yield k, LookupError("no prediction (sentence not evaluated)")
                continue
            box = np.asarray(pred[k], np.float32)
            gt = refs[k].box
            iou = float(paired_iou(box[None], np.array([gt], np.float32))[0]) if gt is not None else float("nan")
            yield k, {"box": box, "iou": np.float32(iou)}

    ins = {"dataset": ds.fingerprint(), **inputs}
    teacher = {"name": stage, "package": __version__, "weights_sha256": weights_sha256}
    return write_stage(params, stage=stage, code=code_version(module), level="sentence", fields=PREDICTION_FIELDS,
                       item_keys=[r.ref_id for r in ds.refs], rows=rows, stage_params=dict(stage_params),
                       inputs=ins, teacher=teacher,
                       extra={**dataset_extra(params, ds, out), "weights_sha256": weights_sha256}, out_dir=out)


@dataclass(frozen=True)
class CentredBox:
    """The centred-box baseline: a box of the mean relative GT size of the training split, centred."""

    rel_w: float
    rel_h: float

    @classmethod
    def fit(cls, boxes: np.ndarray, sizes: np.ndarray) -> "CentredBox":
        """From ``(N, 4)`` xyxy boxes and ``(N, 2)`` image (width, height)."""
        b, s = np.asarray(boxes, np.float64), np.asarray(sizes, np.float64)
        return cls(float(np.mean((b[:, 2] - b[:, 0]) / s[:, 0])), float(np.mean((b[:, 3] - b[:, 1]) / s[:, 1])))

    def predict(self, width: float, height: float) -> np.ndarray:
        w, h = self.rel_w * width, self.rel_h * height
        return np.array([(width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2], np.float32)


def centred_box_baseline(ds: CanonicalDataset, fit_split: str = "train") -> dict[str, float]:
    """Acc@0.5 per split of :class:`CentredBox` fitted on ``fit_split``'s GT boxes."""
    images = ds.image_index
    fit_refs = [r for r in ds.refs if r.split == fit_split and r.box is not None]
    if not fit_refs:
        return {}
    cb = CentredBox.fit(np.array([r.box for r in fit_refs]),
                        np.array([[images[r.image_id].width, images[r.image_id].height] for r in fit_refs]))
    pred = {r.ref_id: cb.predict(images[r.image_id].width, images[r.image_id].height) for r in ds.refs}
    return acc_per_split(pred, ds)[0]
