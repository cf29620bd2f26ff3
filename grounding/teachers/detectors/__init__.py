"""Detector teachers: one :class:`Detector` interface, backends chosen in ``params.yaml``.

``grounding.teachers.detectors.stage.build_detector(teacher, params)`` is the only constructor (``teacher`` in :data:`TEACHERS`). Every
backend sees the same pixels: images are decoded with :func:`grounding.data.images.load_rgb` in
DataLoader workers and letterboxed (aspect kept, centred, padded) into an ``input_size`` square canvas by
:func:`letterbox_image`; the :class:`~grounding.boxes.Letterbox` of each image is stored in its row, and
every box a stage writes is float32 ``xyxy`` in original-image pixels (mapped back with
:meth:`Letterbox.inverse`). A backend only implements :meth:`Detector.forward` (canvas batch -> raw
outputs in canvas pixels) and :meth:`Detector.to_row` (raw outputs of one image -> shard row).

Teacher identity (hashed into every stage key): library, version, architecture/config, input size,
preprocessing and the sha256 of the weights file actually loaded. Weights are local files
(``teachers.<name>.weights``); with none, the bootstrap stage trains a tiny teacher on the synthetic
train split (stage ``bootstrap-<teacher>``, :mod:`grounding.teachers.bootstrap`; the engine runs it first).
"""

from __future__ import annotations

import functools
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from grounding.boxes import Letterbox
from grounding.config import Params
from grounding.data.images import load_rgb
from grounding.data.schema import CanonicalDataset, ImageRecord
from grounding.imaging import IMAGENET_MEAN, IMAGENET_STD, letterbox_image  # noqa: F401 - re-exported
from grounding.overlap import Pinnable, prefetch_loader
from grounding.shards import FieldSpec, file_sha256
from grounding.weights import as_state_dict, load_weights_file, read_sidecar, sidecar_meta

log = logging.getLogger(__name__)

#: Teacher name -> stage that caches it.
TEACHERS: dict[str, str] = {"frcnn": "frcnn-proposals", "fcos": "fcos-points", "yolo": "yolo-anchors"}
CHECKPOINT_FORMAT = "grounding-detector-v1"


class ImageFailed(RuntimeError):
    """An image the detector could not use (decode error, ...): recorded under ``on_error``."""


# ---- preprocessing: letterbox_image and the ImageNet constants live in grounding.imaging (shared with the
# students, who never import a teacher); re-exported above for existing callers.
@dataclass(frozen=True)
class LoadedImage(Pinnable):
    """One DataLoader item: position in the key list, canvas and letterbox, or the error message."""

    index: int
    canvas: torch.Tensor | None
    letterbox: Letterbox | None
    error: str | None = None


#: ``(RGB image) -> (canvas (3, S, S) float32 in [0, 1], Letterbox)``: a backend's preprocessing.
LetterboxFn = Callable[[Image.Image], "tuple[torch.Tensor, Letterbox]"]


class LetterboxedImages(Dataset):
    """Decodes (``load_rgb``) and letterboxes images in DataLoader workers; failures become items with
    ``error`` set (the stage applies ``on_error``), never exceptions that would kill the loader.
    ``letterbox`` (picklable) replaces the default :func:`letterbox_image` with ``size``/``pad_rgb``."""

    def __init__(self, image_root: Path, records: Sequence[ImageRecord], size: int, pad_rgb: Sequence[float],
                 letterbox: LetterboxFn | None = None):
        self.image_root, self.records, self.size, self.pad_rgb = image_root, list(records), size, tuple(pad_rgb)
        self.letterbox = letterbox or functools.partial(letterbox_image, size=size, pad_rgb=self.pad_rgb)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> LoadedImage:
        try:
            canvas, lb = self.letterbox(load_rgb(self.image_root, self.records[i]))
        except Exception as e:  # noqa: BLE001 - any per-image failure is recorded, not fatal to the loader
            return LoadedImage(i, None, None, f"{type(e).__name__}: {e}")
        return LoadedImage(i, canvas, lb)


def _collate(items: list[LoadedImage]) -> list[LoadedImage]:
    return items


# ---- checkpoints and identity ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A weights file as loaded: ``state_dict`` plus what the file says about itself (may be empty)."""

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]


def save_checkpoint(path: Path, state_dict: Mapping[str, torch.Tensor], **meta: Any) -> None:
    """Save ``{"format", **meta, "state_dict"}`` with ``torch.save`` (loadable with ``weights_only=True``)."""
    torch.save({"format": CHECKPOINT_FORMAT, **meta,
                "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}}, path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a local weights file safely (:func:`grounding.weights.load_weights_file`:
    ``torch.load(weights_only=True)`` or safetensors): a plain state dict (or one wrapped as
    ``{"state_dict": {...}}`` / ``{"model": {...}}``, e.g. torchvision reference-script checkpoints), or the
    ``{"format": grounding-detector-v1, ..., "state_dict"}`` files the bootstrap writes. For a plain state
    dict, ``meta`` (``classes``, ``config``) comes from the provenance sidecar ``<file>.json`` that
    ``grounding weights import`` writes, when there is one. Pickled files (ultralytics ``.pt``, full models)
    are refused with a :class:`~grounding.weights.WeightsError` naming that command."""
    path = Path(path)
    obj = load_weights_file(path)
    sha = file_sha256(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "format")}
        return Checkpoint(path, sha, dict(obj["state_dict"]), meta)
    return Checkpoint(path, sha, as_state_dict(obj, path), sidecar_meta(read_sidecar(path, sha)))


def resolve_classes(explicit: Sequence[str] | None, ckpt: Checkpoint, n_classes: int,
                    fallback: Sequence[str] | None = None) -> list[str]:
    """Class names of a detector with ``n_classes`` outputs: params > weights file > ``fallback``;
    the count must match the model's, else ``ValueError``."""
    for source, names in (("params", explicit), ("the weights file", ckpt.meta.get("classes")),
                          ("the default list", fallback)):
        if names is not None:
            names = [str(n) for n in names]
            if len(names) != n_classes:
                raise ValueError(f"{len(names)} class names from {source} but the detector in {ckpt.path} has "
                                 f"{n_classes} classes; set teachers.<name>.classes")
            return names
    raise ValueError(f"{ckpt.path}: no class names; set teachers.<name>.classes ({n_classes} names)")


def bootstrap_path(params: Params, teacher: str) -> Path:
    """Where stage ``bootstrap-<teacher>`` writes the tiny ``teacher`` trained on the current dataset."""
    return Path(params.paths.models) / "bootstrap" / teacher / f"{params.dataset.name}.pt"


def resolve_weights(params: Params, teacher: str) -> Path:
    """The weights file of ``teacher``: ``teachers.<teacher>.weights`` or, when null, the output of stage
    ``bootstrap-<teacher>`` (which the engine runs first). A teacher never trains its own weights."""
    cfg = getattr(params.teachers, teacher)
    if cfg.weights:
        path = Path(cfg.weights)
        if not path.is_file():
            raise FileNotFoundError(f"teachers.{teacher}.weights: {path} is not a file")
        return path
    path = bootstrap_path(params, teacher)
    if not path.is_file():
        raise FileNotFoundError(f"teachers.{teacher}.weights is null and {path} does not exist: run "
                                f"`grounding run bootstrap-{teacher}` (or name a weights file)")
    return path


# ---- the interface -----------------------------------------------------------------------------------------
class Detector(ABC):
    """A frozen detector teacher. Subclasses set :attr:`teacher`, :attr:`library` (its distribution name,
    whose installed version enters the identity) and :attr:`level`, and implement :attr:`classes`,
    :meth:`_build`, :meth:`arch_identity`, :meth:`fields`, :meth:`output_params`, :meth:`forward` and
    :meth:`to_row`. The model is built lazily, so keying a stage needs only the weights file's hash."""

    teacher: str = ""
    library: str = ""
    level: str = "region"

    def __init__(self, params: Params, weights: Path, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.cfg = getattr(params.teachers, self.teacher)
        self.weights = Path(weights)
        self.device = torch.device(device)

    @property
    def stage(self) -> str:
        return TEACHERS[self.teacher]

    @property
    def input_size(self) -> int:
        return int(self.cfg.input_size)

    @property
    def pad_rgb(self) -> tuple[float, float, float]:
        """Canvas padding colour, three floats in [0, 1]."""
        return IMAGENET_MEAN

    def letterbox_fn(self) -> LetterboxFn:
        """The backend's preprocessing (picklable, runs in DataLoader workers): by default
        :func:`letterbox_image` into ``input_size`` with :attr:`pad_rgb`."""
        return functools.partial(letterbox_image, size=self.input_size, pad_rgb=self.pad_rgb)

    @cached_property
    def checkpoint(self) -> Checkpoint:
        return load_checkpoint(self.weights)

    @cached_property
    def model(self) -> torch.nn.Module:
        """The model in eval mode on :attr:`device` (built on first use)."""
        return self._build().eval().to(self.device)

    @property
    @abstractmethod
    def classes(self) -> list[str]:
        """Detector class names (``labels`` index into them)."""

    @abstractmethod
    def _build(self) -> torch.nn.Module: ...

    @abstractmethod
    def arch_identity(self) -> dict[str, Any]:
        """Architecture/config part of the identity (no weights)."""

    @abstractmethod
    def fields(self) -> tuple[FieldSpec, ...]:
        """Shard fields of one row (one image)."""

    @abstractmethod
    def output_params(self) -> dict[str, Any]:
        """The parameters that affect the cached outputs (hashed into the stage key)."""

    @abstractmethod
    def forward(self, canvases: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Run the model on a ``(B, 3, S, S)`` canvas batch in [0, 1]; raw outputs per image, canvas pixels."""

    @abstractmethod
    def to_row(self, raw: Mapping[str, torch.Tensor], lb: Letterbox) -> dict[str, np.ndarray]:
        """One image's raw outputs -> shard row (boxes float32 xyxy in original pixels)."""

    def identity(self) -> dict[str, Any]:
        """Teacher identity: library, version, arch/config, input size, preprocessing, weights sha256."""
        return {"teacher": self.teacher, "library": self.library, "version": self.library_version(),
                **self.arch_identity(), "input_size": self.input_size,
                "preprocess": {"letterbox": "centred, PIL bilinear", "pad_rgb": list(self.pad_rgb)},
                "weights_sha256": self.checkpoint.sha256}

    def extra(self) -> dict[str, Any]:
        """Backend-specific provenance for the manifest's ``extra`` (not hashed)."""
        return {}

    def library_version(self) -> str:
        import importlib.metadata as md

        return md.version(self.library)

    @torch.inference_mode()
    def detect(self, canvases: torch.Tensor, letterboxes: Sequence[Letterbox]) -> list[dict[str, np.ndarray]]:
        """Rows for a canvas batch (what the stage caches)."""
        raws = self.forward(canvases.to(self.device))
        return [self.to_row(r, lb) for r, lb in zip(raws, letterboxes)]

    def detect_images(self, images: Sequence[Image.Image]) -> list[dict[str, np.ndarray]]:
        """Rows for decoded RGB images (letterboxed here); convenience for tests and notebooks."""
        fn = self.letterbox_fn()
        pairs = [fn(im) for im in images]
        return self.detect(torch.stack([c for c, _ in pairs]), [lb for _, lb in pairs])


def common_fields() -> tuple[FieldSpec, ...]:
    """Fields every detector row carries: the letterbox parameters and the original image size."""
    return (
        FieldSpec("letterbox", "float32", (8,), meaning="[orig_w, orig_h, size, scale, new_w, new_h, dx, dy] of "
                  "the canvas the model saw (grounding.boxes.Letterbox.from_array)"),
        FieldSpec("size", "int32", (2,), meaning="image width, height in pixels"),
    )


def common_row(lb: Letterbox) -> dict[str, np.ndarray]:
    return {"letterbox": lb.as_array(), "size": np.array([lb.orig_w, lb.orig_h], dtype=np.int32)}


def canvas_to_original(boxes: torch.Tensor, lb: Letterbox) -> np.ndarray:
    """``(K, 4)`` xyxy canvas pixels -> float32 xyxy original pixels, clipped to the image (boxes that
    covered only padding become zero-area boxes on the image border)."""
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    return lb.inverse(boxes.detach().float().cpu().numpy())


def canvas_points_to_original(points: torch.Tensor, lb: Letterbox) -> np.ndarray:
    """``(K, 2)`` canvas pixel locations -> float32 original pixels (not clipped)."""
    p = points.detach().double().cpu().numpy()
    sx, sy = lb.new_w / lb.orig_w, lb.new_h / lb.orig_h
    return ((p - np.array([lb.dx, lb.dy])) / np.array([sx, sy])).astype(np.float32)


def keep_count(n: int, keep_ratio: float) -> int:
    """How many of ``n`` candidates the top ``keep_ratio`` keeps: ``ceil(n * keep_ratio)``, at least 1."""
    return max(1, min(n, math.ceil(n * keep_ratio - 1e-9)))


# ---- running a detector over a dataset ----------------------------------------------------------------------
def iter_rows(detector: Detector, ds: CanonicalDataset, keys: Sequence[str], *, batch_size: int,
              num_workers: int) -> Iterator[tuple[str, dict[str, np.ndarray] | Exception]]:
    """Yield ``(image_id, row | ImageFailed)`` for ``keys`` in order; decoding runs in ``num_workers``
    DataLoader worker processes so the model is not starved (grounding/overlap.py)."""
    index = ds.image_index
    data = LetterboxedImages(ds.image_root, [index[k] for k in keys], detector.input_size, detector.pad_rgb,
                             detector.letterbox_fn())
    loader = prefetch_loader(data, batch_size=batch_size, num_workers=num_workers, device=detector.device,
                             collate_fn=_collate)
    _ = detector.model  # build before the first batch arrives
    for batch in loader:
        good = [it for it in batch if it.error is None]
        rows = detector.detect(torch.stack([it.canvas for it in good]), [it.letterbox for it in good]) if good else []
        by_index = {it.index: r for it, r in zip(good, rows)}
        for it in batch:
            yield keys[it.index], (ImageFailed(it.error) if it.error is not None else by_index[it.index])


