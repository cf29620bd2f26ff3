"""Faster R-CNN teacher (torchvision): the ``frcnn-proposals`` stage.

Per image, the top ``max_detections`` (100) detections after per-class NMS, exactly as torchvision's
``RoIHeads.postprocess_detections`` selects them, plus for each detection the RoI it came from:

* ``boxes`` (K, 4) float32 xyxy original pixels (class-specific regressed box, clipped to the image);
* ``scores`` (K,) float32, probability of the detection's class;
* ``labels`` (K,) int32, index into manifest ``extra.classes`` (background excluded);
* ``class_probs`` (K, C+1) float16, softmax over [background, classes...] of the detection's RoI (p(z|x));
  with ``class_probs: topk`` instead ``class_probs_topk`` (K, k) float16, ``class_probs_index`` (K, k) int32
  and ``class_probs_rest`` (K,) float32, the residual mass (grounding/class_probs.py rebuilds p(z|x));
* ``features`` (K, D) float16, the RoI box-head output (the vector the box predictor sees).

The model is run piecewise (transform, backbone, RPN, RoI pooling, box head, predictor) so that the RoI
index of every detection is known; a test checks boxes/scores/labels against ``model(images)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign, batched_nms, boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from grounding import class_probs as cp
from grounding.boxes import Letterbox
from grounding.imaging import IMAGENET_MEAN, IMAGENET_STD
from grounding.shards import FieldSpec
from grounding.teachers.detectors import (
    Detector,
    canvas_to_original,
    common_fields,
    common_row,
    resolve_classes,
)
from grounding.teachers.detectors.tiny import TINY_FPN_CHANNELS, TinyFPNBackbone

#: Architectures this backend builds (``tiny``: the bootstrap teacher; the rest: torchvision builders,
#: always with ``weights=None, weights_backbone=None`` - weights come from the local file).
FRCNN_ARCHS: tuple[str, ...] = ("tiny", "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
                                "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn")
_CLS_WEIGHT = "roi_heads.box_predictor.cls_score.weight"


def build_faster_rcnn(arch: str, num_classes: int, *, input_size: int, max_detections: int = 100,
                      score_thresh: float = 0.0, nms_thresh: float = 0.5) -> FasterRCNN:
    """A randomly initialised Faster R-CNN with ``num_classes`` outputs (background included).

    Its transform neither resizes nor pads an ``input_size`` square canvas (``min_size = max_size =
    input_size``), so the letterbox is the only geometric preprocessing."""
    if arch not in FRCNN_ARCHS:
        raise ValueError(f"unknown Faster R-CNN arch {arch!r}; known: {FRCNN_ARCHS}")
    common: dict[str, Any] = dict(min_size=input_size, max_size=input_size, image_mean=list(IMAGENET_MEAN),
                                  image_std=list(IMAGENET_STD), box_detections_per_img=max_detections,
                                  box_score_thresh=score_thresh, box_nms_thresh=nms_thresh)
    if arch == "tiny":
        anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)
        return FasterRCNN(
            TinyFPNBackbone(LastLevelMaxPool()), None, rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(TINY_FPN_CHANNELS * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_classes),
            rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
            rpn_pre_nms_top_n_test=600, rpn_post_nms_top_n_test=300, box_batch_size_per_image=128, **common)
    builder = getattr(torchvision.models.detection, arch)
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, **common)


def select_detections(class_logits: torch.Tensor, box_regression: torch.Tensor, proposals: list[torch.Tensor],
                      image_shapes: list[tuple[int, int]], box_coder: Any, *, score_thresh: float,
                      nms_thresh: float, detections_per_img: int) -> list[dict[str, torch.Tensor]]:
    """torchvision's ``RoIHeads.postprocess_detections`` that also returns, per detection, the index of
    its RoI (``roi``) in that image's proposals. Boxes in (transformed) canvas pixels; ``labels``
    1-based (0 is background)."""
    num_classes = class_logits.shape[-1]
    per_image = [len(p) for p in proposals]
    pred_boxes = box_coder.decode(box_regression, proposals).split(per_image, 0)
    pred_scores = F.softmax(class_logits, -1).split(per_image, 0)
    out = []
    for boxes, scores, shape in zip(pred_boxes, pred_scores, image_shapes):
        boxes = box_ops.clip_boxes_to_image(boxes, shape)
        n = boxes.shape[0]
        labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand(n, -1)
        roi = torch.arange(n, device=boxes.device).view(-1, 1).expand(n, num_classes)
        boxes, scores, labels, roi = (boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1),
                                      labels[:, 1:].reshape(-1), roi[:, 1:].reshape(-1))
        keep = torch.where(scores > score_thresh)[0]
        boxes, scores, labels, roi = boxes[keep], scores[keep], labels[keep], roi[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels, roi = boxes[keep], scores[keep], labels[keep], roi[keep]
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep], "roi": roi[keep]})
    return out


class FasterRCNNDetector(Detector):
    """torchvision Faster R-CNN over letterboxed canvases (see the module docstring for the row)."""

    teacher = "frcnn"
    library = "torchvision"
    level = "region"

    @property
    def num_classes(self) -> int:
        """Outputs of the box predictor, background included (C + 1)."""
        sd = self.checkpoint.state_dict
        if _CLS_WEIGHT not in sd:
            raise ValueError(f"{self.weights}: no {_CLS_WEIGHT} - not a torchvision Faster R-CNN state dict")
        return int(sd[_CLS_WEIGHT].shape[0])

    @property
    def arch(self) -> str:
        return str(self.checkpoint.meta.get("arch", self.cfg.arch))

    @property
    def classes(self) -> list[str]:
        fallback = None
        if self.arch != "tiny" and self.num_classes == 91:
            from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

            fallback = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:]
        return resolve_classes(self.cfg.classes, self.checkpoint, self.num_classes - 1, fallback)

    def _build(self) -> torch.nn.Module:
        model = build_faster_rcnn(self.arch, self.num_classes, input_size=self.input_size,
                                  max_detections=self.cfg.max_detections, score_thresh=self.cfg.score_thresh,
                                  nms_thresh=self.cfg.nms_thresh)
        model.load_state_dict(self.checkpoint.state_dict)
        return model

    def arch_identity(self) -> dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes}

    def output_params(self) -> dict[str, Any]:
        c = self.cfg
        return {"backend": c.backend, "arch": self.arch, "input_size": c.input_size,
                "max_detections": c.max_detections, "score_thresh": c.score_thresh, "nms_thresh": c.nms_thresh,
                "classes": self.classes,
                **({"class_probs": {"encoding": "topk", "k": c.class_probs_k}} if c.class_probs == "topk" else {})}

    def fields(self) -> tuple[FieldSpec, ...]:
        c1 = self.num_classes
        return (
            FieldSpec("boxes", "float32", (4,), ragged=True, meaning="detections, float32 xyxy original pixels"),
            FieldSpec("scores", "float32", (), ragged=True, meaning="probability of the detection's class"),
            FieldSpec("labels", "int32", (), ragged=True, meaning="class index into extra.classes"),
            *self._class_prob_fields(c1),
            FieldSpec("features", "float16", (self.feature_dim,), ragged=True,
                      meaning="RoI box-head output of the detection's RoI (input of the box predictor)"),
            *common_fields(),
        )

    def _class_prob_fields(self, c1: int) -> tuple[FieldSpec, ...]:
        if self.cfg.class_probs == "dense":
            return (FieldSpec(cp.DENSE, "float16", (c1,), ragged=True,
                              meaning="softmax over [background, *classes] of the detection's RoI (p(z|x))"),)
        k = min(self.cfg.class_probs_k, c1)
        return (FieldSpec(cp.TOPK_VALUES, "float16", (k,), ragged=True,
                          meaning=f"top-{k} of the softmax over [background, *classes] (p(z|x)), decreasing"),
                FieldSpec(cp.TOPK_INDEX, "int32", (k,), ragged=True,
                          meaning="column of each top-k value (0 = background)"),
                FieldSpec(cp.TOPK_REST, "float32", (), ragged=True,
                          meaning="probability mass outside the top k (spread evenly when rebuilt)"))

    @property
    def feature_dim(self) -> int:
        return int(self.model.roi_heads.box_predictor.cls_score.in_features)

    def forward(self, canvases: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        m = self.model
        images, _ = m.transform(list(canvases))
        feats = m.backbone(images.tensors)
        proposals, _ = m.rpn(images, feats)
        rh = m.roi_heads
        roi_feats = rh.box_head(rh.box_roi_pool(feats, proposals, images.image_sizes))  # [sum N, D]
        class_logits, box_regression = rh.box_predictor(roi_feats)
        dets = select_detections(class_logits, box_regression, proposals, images.image_sizes, rh.box_coder,
                                 score_thresh=rh.score_thresh, nms_thresh=rh.nms_thresh,
                                 detections_per_img=rh.detections_per_img)
        probs = F.softmax(class_logits, -1).split([len(p) for p in proposals])
        roi_feats = roi_feats.split([len(p) for p in proposals])
        for d, p, f in zip(dets, probs, roi_feats):
            d["class_probs"], d["features"] = p[d["roi"]], f[d["roi"]]
        return dets

    def to_row(self, raw: Mapping[str, torch.Tensor], lb: Letterbox) -> dict[str, np.ndarray]:
        return {
            "boxes": canvas_to_original(raw["boxes"], lb),
            "scores": raw["scores"].float().cpu().numpy(),
            "labels": (raw["labels"] - 1).to(torch.int32).cpu().numpy(),
            **self._class_prob_row(raw["class_probs"].float().cpu().numpy()),
            "features": raw["features"].cpu().numpy().astype(np.float16),
            **common_row(lb),
        }


    def _class_prob_row(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        if self.cfg.class_probs == "dense":
            return {cp.DENSE: probs.astype(np.float16)}
        return cp.encode_topk(probs, self.cfg.class_probs_k)
