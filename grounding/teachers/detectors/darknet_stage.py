"""``teachers.yolo.backend: darknet``: SimREC's / RefCLIP's YOLOv3 (:mod:`.darknet`) as the ``yolo-anchors`` teacher.

Preprocessing is SimREC's dataloader's (:func:`simrec_letterbox`): the decoded RGB image (the project's
one decoder, :func:`grounding.data.images.load_rgb`) is resized keeping its ratio to integer sizes
``nw, nh = int(...)`` with OpenCV bilinear, pasted at ``dx = (S - nw) // 2, dy = (S - nh) // 2`` into an
``S x S`` canvas of grey 127, then normalised with the ImageNet mean/std. Boxes are mapped back exactly as
SimREC's ``yolobox2label`` does (:func:`canvas_cxcywh_to_original`), not clipped.

One row per image (level ``image``), every field fixed-size (memory-mapped reads), G = S // 32:
``map_s32`` (C32, G, G), ``map_s16`` (C16, 2G, 2G), ``map_s8`` (C8, 4G, 4G) float16: the inputs of the
three heads (RefCLIP's multi-scale fusion reads them); ``cell_boxes`` (G*G, 4, 4) float32 xyxy original
pixels and ``cell_objectness`` (G*G, 4) of the stride-32 head (cells row-major (y, x); per cell the 3
anchor-based predictions in anchor-mask order, then the anchor-free one); ``cell_scores`` (G*G,) their mean
objectness (RefCLIP's ranking); ``kept_cells`` (K,) int32, the top ``keep_ratio`` cells (ties: lower
index) in ascending cell order; plus the letterbox parameters.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image

from grounding.artefacts import read_provenance
from grounding.boxes import Letterbox
from grounding.shards import FieldSpec
from grounding.teachers.detectors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Detector,
    LetterboxFn,
    common_fields,
    common_row,
    keep_count,
)
from grounding.teachers.detectors.darknet import (
    HEADS,
    DarknetConfig,
    DarknetYolo,
    from_state_dict,
    infer_config,
    strip_prefixes,
)

log = logging.getLogger(__name__)

PAD_VALUE = 127  # SimREC's grey canvas


def simrec_fit(orig_w: int, orig_h: int, size: int) -> Letterbox:
    """SimREC's letterbox geometry: the long side becomes ``size``, the short one ``int(size * ratio)``
    (computed as the dataloader does, ``nh = nw / (w / h)``), centred with floor division."""
    if orig_w <= 0 or orig_h <= 0 or size <= 0:
        raise ValueError(f"letterbox needs positive sizes, got {orig_w}x{orig_h} -> {size}")
    ar = orig_w / orig_h
    nw, nh = (size * ar, size) if ar < 1 else (size, size / ar)
    nw, nh = max(1, int(nw)), max(1, int(nh))  # SimREC would crash on a 0-pixel side; keep 1
    return Letterbox(orig_w, orig_h, size, min(nw / orig_w, nh / orig_h), nw, nh, (size - nw) // 2, (size - nh) // 2)


def simrec_letterbox(img: Image.Image, size: int, pad_value: int = PAD_VALUE) -> tuple[torch.Tensor, Letterbox]:
    """Canvas (3, size, size) float32 in [0, 1] (uint8 / 255, before mean/std) and its :class:`Letterbox`,
    the resize by ``cv2.resize`` (INTER_LINEAR) of the RGB pixels."""
    import cv2

    if img.mode != "RGB":
        raise ValueError(f"simrec_letterbox needs an RGB image, got mode {img.mode!r}")
    lb = simrec_fit(img.width, img.height, size)
    pixels = np.asarray(img, dtype=np.uint8)
    if (lb.new_w, lb.new_h) != img.size:
        pixels = cv2.resize(pixels, (lb.new_w, lb.new_h), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), pad_value, np.uint8)
    canvas[lb.dy:lb.dy + lb.new_h, lb.dx:lb.dx + lb.new_w] = pixels
    return torch.from_numpy(canvas).permute(2, 0, 1).float().div(255), lb


def normalise(canvases: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of (B, 3, S, S) canvases in [0, 1] (torchvision ``Normalize``)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=canvases.dtype, device=canvases.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=canvases.dtype, device=canvases.device).view(1, 3, 1, 1)
    return (canvases - mean) / std


def canvas_cxcywh_to_original(cxcywh: np.ndarray, lb: Letterbox) -> np.ndarray:
    """(..., 4) canvas ``cx, cy, w, h`` -> float32 xyxy original pixels, not clipped: RefCLIP's
    ``get_boxes`` corner order then SimREC's ``yolobox2label`` (``x1 = (x1 - dx) / nw * w``,
    ``x2 = x1 + (x2 - x1) / nw * w``), in float64."""
    b = np.asarray(cxcywh, np.float64)
    x1, y1 = b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2
    x2, y2 = x1 + b[..., 2], y1 + b[..., 3]
    bw, bh = (x2 - x1) / lb.new_w * lb.orig_w, (y2 - y1) / lb.new_h * lb.orig_h
    ox1, oy1 = (x1 - lb.dx) / lb.new_w * lb.orig_w, (y1 - lb.dy) / lb.new_h * lb.orig_h
    return np.stack([ox1, oy1, ox1 + bw, oy1 + bh], -1).astype(np.float32)


def original_to_canvas_xyxy(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """(K, 4) xyxy original pixels -> xyxy canvas pixels (SimREC's ``label2yolobox`` scale and offset)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    s = np.array([lb.new_w / lb.orig_w, lb.new_h / lb.orig_h] * 2)
    return (b * s + np.array([lb.dx, lb.dy, lb.dx, lb.dy])).astype(np.float32)


def select_kept(cell_scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Top ``keep_ratio`` cells by score (ties: lower index), returned in ascending cell index."""
    order = torch.sort(cell_scores, descending=True, stable=True).indices
    return torch.sort(order[:keep_count(len(cell_scores), keep_ratio)]).values


def coco80_names() -> list[str]:
    """The 80 COCO class names in contiguous-id order (the published yolov3_coco.pth's 80 outputs)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return [c for c in FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
            if c not in ("__background__", "N/A")]


class DarknetDetector(Detector):
    """SimREC's YOLOv3 on SimREC's input; caches the three pre-head maps and the stride-32 predictions."""

    teacher = "yolo"
    library = "torchvision"  # torchvision.ops.deform_conv2d is the only non-torch op
    level = "image"

    @property
    def pad_rgb(self) -> tuple[float, float, float]:
        v = PAD_VALUE / 255.0
        return (v, v, v)

    def letterbox_fn(self) -> LetterboxFn:
        return functools.partial(simrec_letterbox, size=self.input_size)

    @functools.cached_property
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd, removed = strip_prefixes(self.checkpoint.state_dict)
        if removed:
            log.info("%s: stripped key prefixes %s", self.weights, removed)
        return sd

    @functools.cached_property
    def net_config(self) -> DarknetConfig:
        return infer_config(self.state_dict, str(self.weights))

    @property
    def classes(self) -> list[str]:
        n = self.net_config.num_classes
        side = read_provenance(self.weights)
        for source, names in (("teachers.yolo.classes", self.cfg.classes),
                              ("the weights file", self.checkpoint.meta.get("classes")),
                              ("the weights file's sidecar", side.get("classes") or
                               side.get("provenance", {}).get("classes"))):
            if names:
                if len(names) != n:
                    raise ValueError(f"{len(names)} class names from {source} but {self.weights} has {n} classes; "
                                     "set teachers.yolo.classes")
                return [str(c) for c in names]
        if n == 80:
            return coco80_names()
        raise ValueError(f"{self.weights}: {n} classes and no class names; set teachers.yolo.classes")

    @property
    def grid(self) -> int:
        return self.input_size // 32

    def channels(self) -> dict[str, int]:
        return {f"s{stride}": self.net_config.ch(base) for _, stride, _, base in HEADS}

    def _build(self) -> torch.nn.Module:
        return from_state_dict(self.state_dict, str(self.weights))

    def arch_identity(self) -> dict[str, Any]:
        c = self.net_config
        return {"arch": "simrec-yolov3-darknet53", "width": c.width, "num_classes": c.num_classes}

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        import cv2

        ident["preprocess"] = {"letterbox": "SimREC: int sizes, centred (floor), cv2 INTER_LINEAR",
                               "opencv": cv2.__version__,
                               "pad_value": PAD_VALUE, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        return ident

    def output_params(self) -> dict[str, Any]:
        c = self.cfg
        return {"backend": c.backend, "input_size": c.input_size, "pad_value": PAD_VALUE,
                "keep_ratio": c.keep_ratio, "classes": self.classes}

    def extra(self) -> dict[str, Any]:
        return {"grid": [self.grid, self.grid], "strides": [s for _, s, _, _ in HEADS], "channels": self.channels(),
                "kept_per_image": keep_count(self.grid * self.grid, self.cfg.keep_ratio),
                "cell_order": "row-major (y, x)",
                "prediction_order": "3 anchor-based (anchor mask order), then anchor-free",
                "width": self.net_config.width}

    def fields(self) -> tuple[FieldSpec, ...]:
        g, ch = self.grid, self.channels()
        k = keep_count(g * g, self.cfg.keep_ratio)
        return (
            FieldSpec("map_s32", "float16", (ch["s32"], g, g), meaning="input of the stride-32 YOLO head"),
            FieldSpec("map_s16", "float16", (ch["s16"], 2 * g, 2 * g), meaning="input of the stride-16 YOLO head"),
            FieldSpec("map_s8", "float16", (ch["s8"], 4 * g, 4 * g), meaning="input of the stride-8 YOLO head"),
            FieldSpec("cell_boxes", "float32", (g * g, 4, 4),
                      meaning="stride-32 predictions per cell (row-major), xyxy original pixels, not clipped"),
            FieldSpec("cell_objectness", "float32", (g * g, 4), meaning="sigmoid objectness of each prediction"),
            FieldSpec("cell_scores", "float32", (g * g,), meaning="mean objectness of the cell's 4 predictions"),
            FieldSpec("kept_cells", "int32", (k,), meaning="top keep_ratio cells by cell_scores, ascending index"),
            *common_fields(),
        )

    def forward(self, canvases: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = self.model(normalise(canvases))
        maps, p32 = out["maps"], out["preds"][0]  # p32: (B, 4, G, G, 5 + C)
        b, n, g = p32.shape[0], p32.shape[1], p32.shape[2]
        cells = p32.permute(0, 2, 3, 1, 4).reshape(b, g * g, n, -1)  # (B, G*G, 4, 5 + C)
        rows = []
        for i in range(b):
            scores = cells[i, :, :, 4].mean(1)
            rows.append({"map_s32": maps[0][i], "map_s16": maps[1][i], "map_s8": maps[2][i],
                         "cxcywh": cells[i, :, :, :4], "objectness": cells[i, :, :, 4], "cell_scores": scores,
                         "kept_cells": select_kept(scores, self.cfg.keep_ratio)})
        return rows

    def to_row(self, raw: Mapping[str, torch.Tensor], lb: Letterbox) -> dict[str, np.ndarray]:
        f16 = {k: raw[k].float().cpu().numpy().astype(np.float16) for k in ("map_s32", "map_s16", "map_s8")}
        return {**f16,
                "cell_boxes": canvas_cxcywh_to_original(raw["cxcywh"].float().cpu().numpy(), lb),
                "cell_objectness": raw["objectness"].float().cpu().numpy(),
                "cell_scores": raw["cell_scores"].float().cpu().numpy(),
                "kept_cells": raw["kept_cells"].to(torch.int32).cpu().numpy(),
                **common_row(lb)}


def random_weights(path: Path, width: float, num_classes: int, seed: int = 0) -> Path:
    """A random-initialised network saved as a plain public-layout state dict (tests, smoke runs)."""
    torch.manual_seed(seed)
    model = DarknetYolo(DarknetConfig(width, num_classes))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path

