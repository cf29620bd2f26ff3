"""FCOS teacher (torchvision): the ``fcos-points`` stage.

For the P5 level (stride 32) of the ``input_size`` canvas, every point (a fixed ``G x G`` grid,
``G = input_size / 32``, row-major), as PBREC reads them at inference (top-k 12, IoU-vote NMS):

* ``points`` (P, 2) float32: the point's location (torchvision's anchor centre) in original pixels;
* ``ltrb`` (P, 4) float32: regressed distances left, top, right, bottom in original pixels (unclipped);
* ``boxes`` (P, 4) float32 xyxy original pixels: ``points -/+ ltrb`` clipped to the image;
* ``centerness`` (P,) float32: centerness logit; ``class_logits`` (P, C) float32;
* ``inside`` (P,) uint8: 1 where the point lies inside the image (0: on the letterbox padding).

Rows are fixed-size (level ``image``), so readers map them straight into memory.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torchvision
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.anchor_utils import AnchorGenerator

from grounding.boxes import Letterbox
from grounding.imaging import IMAGENET_MEAN, IMAGENET_STD
from grounding.shards import FieldSpec
from grounding.teachers.detectors import (
    Detector,
    canvas_points_to_original,
    canvas_to_original,
    common_fields,
    common_row,
    resolve_classes,
)
from grounding.teachers.detectors.tiny import TINY_FPN_CHANNELS, TinyFPNBackbone

FCOS_ARCHS: tuple[str, ...] = ("tiny", "fcos_resnet50_fpn")
P5_STRIDE = 32
_CLS_WEIGHT = "head.classification_head.cls_logits.weight"


def build_fcos(arch: str, num_classes: int, *, input_size: int) -> FCOS:
    """A randomly initialised FCOS (``num_classes`` without background; ``tiny``: P5 only, resnet50: P3..P7) whose transform
    neither resizes nor pads an ``input_size`` canvas."""
    if arch not in FCOS_ARCHS:
        raise ValueError(f"unknown FCOS arch {arch!r}; known: {FCOS_ARCHS}")
    common: dict[str, Any] = dict(min_size=input_size, max_size=input_size, image_mean=list(IMAGENET_MEAN),
                                  image_std=list(IMAGENET_STD))
    if arch == "tiny":
        # P5 only: the one level PBREC reads, so every object is assigned to it in training (FCOS's scale
        # ranges would send the synthetic world's objects, all under ~130 px at 320, to P3/P4).
        backbone = TinyFPNBackbone(None, levels=1)
        head = FCOSHead(TINY_FPN_CHANNELS, 1, num_classes, num_convs=2)
        anchors = AnchorGenerator(((P5_STRIDE,),), ((1.0,),))
        return FCOS(backbone, num_classes, head=head, anchor_generator=anchors, **common)
    return torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None,
                                                          num_classes=num_classes, **common)


def level_slice(feature_sizes: list[tuple[int, int]], canvas: int, stride: int = P5_STRIDE) -> slice:
    """The span of the level with ``stride`` in torchvision's level-concatenated anchor order."""
    strides = [canvas // w for _, w in feature_sizes]
    if stride not in strides:
        raise ValueError(f"no stride-{stride} level among strides {strides} (canvas {canvas})")
    i = strides.index(stride)
    start = sum(h * w for h, w in feature_sizes[:i])
    h, w = feature_sizes[i]
    return slice(start, start + h * w)


class FCOSDetector(Detector):
    """torchvision FCOS; caches every P5 point (see the module docstring)."""

    teacher = "fcos"
    library = "torchvision"
    level = "image"

    @property
    def num_classes(self) -> int:
        sd = self.checkpoint.state_dict
        if _CLS_WEIGHT not in sd:
            raise ValueError(f"{self.weights}: no {_CLS_WEIGHT} - not a torchvision FCOS state dict")
        return int(sd[_CLS_WEIGHT].shape[0])

    @property
    def arch(self) -> str:
        return str(self.checkpoint.meta.get("arch", self.cfg.arch))

    @property
    def grid(self) -> int:
        return self.input_size // P5_STRIDE

    @property
    def classes(self) -> list[str]:
        fallback = None
        if self.arch != "tiny" and self.num_classes == 91:
            from torchvision.models.detection import FCOS_ResNet50_FPN_Weights

            fallback = FCOS_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
        return resolve_classes(self.cfg.classes, self.checkpoint, self.num_classes, fallback)

    def _build(self) -> torch.nn.Module:
        model = build_fcos(self.arch, self.num_classes, input_size=self.input_size)
        model.load_state_dict(self.checkpoint.state_dict)
        return model

    def arch_identity(self) -> dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes}

    def output_params(self) -> dict[str, Any]:
        return {"backend": self.cfg.backend, "arch": self.arch, "input_size": self.input_size, "level_stride": P5_STRIDE,
                "classes": self.classes}

    def extra(self) -> dict[str, Any]:
        return {"grid": [self.grid, self.grid], "stride": P5_STRIDE, "point_order": "row-major (y, x)"}

    def fields(self) -> tuple[FieldSpec, ...]:
        p, c = self.grid * self.grid, self.num_classes
        return (
            FieldSpec("points", "float32", (p, 2), meaning="P5 point locations (x, y), original pixels"),
            FieldSpec("ltrb", "float32", (p, 4), meaning="regressed left/top/right/bottom distances, original pixels"),
            FieldSpec("boxes", "float32", (p, 4), meaning="decoded boxes, float32 xyxy original pixels, clipped"),
            FieldSpec("centerness", "float32", (p,), meaning="centerness logit"),
            FieldSpec("class_logits", "float32", (p, c), meaning="class logits (sigmoid: per-class score)"),
            FieldSpec("inside", "uint8", (p,), meaning="1 if the point lies inside the image, 0 on padding"),
            *common_fields(),
        )

    def forward(self, canvases: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        m = self.model
        images, _ = m.transform(list(canvases))
        feats = list(m.backbone(images.tensors).values())
        head = m.head(feats)
        anchors = m.anchor_generator(images, feats)
        sl = level_slice([tuple(f.shape[-2:]) for f in feats], images.tensors.shape[-1])
        out = []
        for b in range(len(canvases)):
            rel, anc = head["bbox_regression"][b, sl], anchors[b][sl]
            wh = (anc[:, 2:] - anc[:, :2]).repeat(1, 2)  # [P,4] anchor (w, h, w, h)
            out.append({"points": (anc[:, :2] + anc[:, 2:]) / 2, "ltrb": rel * wh,
                        "boxes": m.box_coder.decode(rel, anc), "centerness": head["bbox_ctrness"][b, sl, 0],
                        "class_logits": head["cls_logits"][b, sl]})
        return out

    def to_row(self, raw: Mapping[str, torch.Tensor], lb: Letterbox) -> dict[str, np.ndarray]:
        pts = canvas_points_to_original(raw["points"], lb)
        sx, sy = lb.new_w / lb.orig_w, lb.new_h / lb.orig_h
        ltrb = (raw["ltrb"].double().cpu().numpy() / np.array([sx, sy, sx, sy])).astype(np.float32)
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < lb.orig_w) & (pts[:, 1] >= 0) & (pts[:, 1] < lb.orig_h)
        return {"points": pts, "ltrb": ltrb, "boxes": canvas_to_original(raw["boxes"], lb),
                "centerness": raw["centerness"].float().cpu().numpy(),
                "class_logits": raw["class_logits"].float().cpu().numpy(), "inside": inside.astype(np.uint8),
                **common_row(lb)}
