"""mmdet backend for the Faster R-CNN and FCOS teachers (optional: ``make mmdet``).

mmdet 3.3 needs mmcv 2.x *with its compiled ops*; mmcv 2.1.0 has no wheel for this torch and its sdist
only builds after patching (see the Makefile's ``mmdet`` target), so the backend is an optional extra:
``teachers.<name>.backend: mmdet`` is refused at param validation when mmdet/mmcv ops are not importable.

The conversion from mmdet's layouts to the shard rows of :mod:`.torchvision_rcnn` / :mod:`.fcos` is
pure and tested without mmdet (tests/test_detectors.py):

* Faster R-CNN: mmdet's ``cls_score`` is ``(N, C+1)`` with the background class *last*; our
  ``class_probs`` put it first (torchvision's order), and ``labels`` are 0-based class indices in both;
  class-specific boxes ``(N, 4C)`` get a background slot prepended so :func:`select_detections` (the
  torchvision selection rule) applies unchanged.
* FCOS: mmdet's per-level maps are ``(C, H, W)`` / ``(4, H, W)`` / ``(1, H, W)``; its points sit at
  ``((x + 0.5) * stride, (y + 0.5) * stride)`` (``MlvlPointGenerator`` offset 0.5, where torchvision uses
  0), and in eval mode ``bbox_pred`` is already ltrb in pixels (``norm_on_bbox`` multiplies by the stride).

The model wiring below (``init_detector`` on a config shipped in mmdet, local weights, piecewise
forward, the config's own data preprocessing) is checked against mmdet's own inference in
tests/test_mmdet.py where ``make mmdet`` has been run (it built here: mmcv 2.1.0 with ops on torch 2.14.1,
CPU only; those tests skip elsewhere).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from grounding.teachers.detectors import Checkpoint, load_checkpoint
from grounding.teachers.detectors.fcos import P5_STRIDE, FCOSDetector
from grounding.teachers.detectors.torchvision_rcnn import FasterRCNNDetector, select_detections

MMDET_HELP = "mmdet backend needs mmdet+mmcv with ops; see README for `make mmdet`"


def mmdet_available() -> bool:
    """Whether mmdet, mmengine and mmcv with compiled ops are importable."""
    if not all(importlib.util.find_spec(m) for m in ("mmdet", "mmcv", "mmengine")):
        return False
    return importlib.util.find_spec("mmcv._ext") is not None


def require_mmdet() -> None:
    if not mmdet_available():
        raise ImportError(MMDET_HELP)


# ---- pure conversions (tested without mmdet) --------------------------------------------------------------
def background_first(cls_score: torch.Tensor) -> torch.Tensor:
    """``(N, C+1)`` logits with background last (mmdet) -> softmax probabilities with background first."""
    probs = F.softmax(cls_score, -1)
    return torch.cat([probs[:, -1:], probs[:, :-1]], 1)


def class_boxes_with_background(boxes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mmdet class-specific decoded boxes ``(N, 4C)`` (or class-agnostic ``(N, 4)``) -> ``(N, 4(C+1))`` in
    torchvision's layout (a background slot first, a copy of class 0's box: it is never selected)."""
    n = boxes.shape[0]
    per_class = boxes.view(n, -1, 4)
    if per_class.shape[1] == 1:
        per_class = per_class.expand(n, num_classes, 4)
    if per_class.shape[1] != num_classes:
        raise ValueError(f"box predictions for {per_class.shape[1]} classes, expected {num_classes}")
    return torch.cat([per_class[:, :1], per_class], 1).reshape(n, -1)


def rcnn_detections(cls_score: torch.Tensor, decoded: torch.Tensor, features: torch.Tensor,
                    proposals: list[torch.Tensor], canvas: int, *, score_thresh: float, nms_thresh: float,
                    detections_per_img: int) -> list[dict[str, torch.Tensor]]:
    """mmdet RoI-head outputs of a batch -> per-image raw dicts of :class:`FasterRCNNDetector` (selection by
    torchvision's rule, :func:`select_detections`).

    Args:
        cls_score: ``(N, C+1)`` logits, background last. decoded: ``(N, 4C)`` class-specific (or ``(N, 4)``)
            decoded boxes in canvas pixels. features: ``(N, D)`` inputs of ``fc_cls``. proposals: the RoIs
            of each image (their counts split the batch). canvas: canvas side.
    Returns per image ``boxes``, ``scores``, ``labels`` (1-based, 0 = background), ``roi``,
    ``class_probs`` (K, C+1) background first, ``features`` (K, D).
    """
    probs = background_first(cls_score)
    boxes = class_boxes_with_background(decoded, cls_score.shape[1] - 1)
    logits = torch.log(probs.clamp_min(1e-30))  # softmax(log p) == p
    dets = select_detections(logits, boxes, proposals, [(canvas, canvas)] * len(proposals), _Identity(),
                             score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img)
    split = [len(p) for p in proposals]
    for d, p, f in zip(dets, probs.split(split), features.split(split)):
        d["class_probs"], d["features"] = p[d["roi"]], f[d["roi"]]
    return dets


def fcos_level_points(cls_score: torch.Tensor, bbox_pred: torch.Tensor, centerness: torch.Tensor,
                      stride: int, canvas: int) -> dict[str, torch.Tensor]:
    """One image, one mmdet FCOS level (eval-mode outputs) -> the raw dict :class:`FCOSDetector` converts.

    Args:
        cls_score: ``(C, H, W)`` class logits. bbox_pred: ``(4, H, W)`` ltrb in canvas pixels.
        centerness: ``(1, H, W)`` logits. stride: the level's stride. canvas: canvas side (clip limit).
    Returns ``points`` (P, 2), ``ltrb`` (P, 4), ``boxes`` (P, 4) xyxy clipped to the canvas,
    ``centerness`` (P,), ``class_logits`` (P, C), P = H*W in row-major (y, x) order, canvas pixels.
    """
    c, h, w = cls_score.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    points = torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], 1)  # [P,2]
    ltrb = bbox_pred.reshape(4, -1).T.float()  # [P,4]
    boxes = torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], 1).clamp(0, canvas)
    return {"points": points, "ltrb": ltrb, "boxes": boxes, "centerness": centerness.reshape(-1),
            "class_logits": cls_score.reshape(c, -1).T}


def preprocess_like_mmdet(canvases: torch.Tensor, data_preprocessor: Any) -> torch.Tensor:
    """RGB canvases ``(B, 3, H, W)`` in [0, 1] -> the normalised input of an mmdet model, as its
    ``DetDataPreprocessor`` makes it from the BGR uint8 images mmdet's loader gives: channels reversed to
    BGR, flipped back when the config converts (``bgr_to_rgb``), then ``(x - mean) / std`` with the config's
    statistics (pytorch-style configs: RGB mean/std; caffe-style ones: BGR mean, std 1)."""
    x = canvases.flip(1) * 255.0  # as loaded by mmdet: BGR, 0..255
    if getattr(data_preprocessor, "_channel_conversion", False):
        x = x.flip(1)
    if getattr(data_preprocessor, "_enable_normalize", True):
        mean = data_preprocessor.mean.to(x.device).view(1, -1, 1, 1)
        std = data_preprocessor.std.to(x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def mmdet_state_dict(path: Path) -> Checkpoint:
    """An mmdet/mmengine checkpoint (``{"meta", "state_dict"}``) or a plain state dict, loaded with
    ``weights_only=True``; class names from ``meta.dataset_meta.classes`` when present."""
    from grounding.errors import load_weights

    obj = load_weights(path, "teachers.*.weights (mmdet)")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and "format" not in obj:
        meta = obj.get("meta") or {}
        classes = (meta.get("dataset_meta") or {}).get("classes") or meta.get("CLASSES")
        from grounding.shards import file_sha256

        return Checkpoint(path, file_sha256(path), dict(obj["state_dict"]),
                          {"classes": list(classes)} if classes else {})
    return load_checkpoint(path)


# ---- model wiring (needs mmdet + mmcv ops) ---------------------------------------------------------------
def mmdet_config(name: str) -> Path:
    """A config shipped inside the mmdet package (``mmdet/.mim/configs/**/<name>.py``) or a local file."""
    require_mmdet()
    if Path(name).is_file():
        return Path(name)
    import mmdet

    root = Path(mmdet.__file__).parent / ".mim" / "configs"
    found = sorted(root.rglob(f"{name}.py"))
    if not found:
        raise FileNotFoundError(f"no mmdet config {name!r} under {root}")
    return found[0]


class _MMDetMixin:
    """Builds an mmdet detector from a shipped config and local weights; normalises canvases its way."""

    library = "mmdet"

    @property
    def checkpoint(self) -> Checkpoint:  # type: ignore[override]
        if "_ckpt" not in self.__dict__:
            self.__dict__["_ckpt"] = mmdet_state_dict(self.weights)
        return self.__dict__["_ckpt"]

    def _build(self) -> torch.nn.Module:
        require_mmdet()
        from mmdet.apis import init_detector

        model = init_detector(str(mmdet_config(self.cfg.arch)), checkpoint=None, device="cpu")
        model.load_state_dict(self.checkpoint.state_dict)
        return model

    def _normalise(self, canvases: torch.Tensor) -> torch.Tensor:
        """RGB canvases in [0, 1] -> what the config's data preprocessor feeds the backbone."""
        return preprocess_like_mmdet(canvases, self.model.data_preprocessor)

    def _samples(self, n: int) -> list:
        from mmdet.structures import DetDataSample

        s = self.input_size
        out = []
        for _ in range(n):
            d = DetDataSample()
            d.set_metainfo({"img_shape": (s, s), "ori_shape": (s, s), "scale_factor": (1.0, 1.0),
                            "pad_shape": (s, s), "batch_input_shape": (s, s)})
            out.append(d)
        return out

    def arch_identity(self) -> dict[str, Any]:
        return {"arch": self.cfg.arch, "num_classes": self.num_classes}


class MMDetRCNNDetector(_MMDetMixin, FasterRCNNDetector):
    """mmdet Faster R-CNN -> the ``frcnn-proposals`` row layout (background-first probabilities)."""

    @property
    def num_classes(self) -> int:
        sd = self.checkpoint.state_dict
        return int(sd["roi_head.bbox_head.fc_cls.weight"].shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.model.roi_head.bbox_head.fc_cls.in_features)

    @property
    def classes(self) -> list[str]:
        from grounding.teachers.detectors import resolve_classes

        return resolve_classes(self.cfg.classes, self.checkpoint, self.num_classes - 1)

    def forward(self, canvases: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        from mmdet.structures.bbox import bbox2roi

        m = self.model
        feats = m.extract_feat(self._normalise(canvases))
        samples = self._samples(len(canvases))
        proposals = m.rpn_head.predict(feats, samples, rescale=False)
        rois = bbox2roi([p.bboxes for p in proposals])
        seen: dict[str, torch.Tensor] = {}
        hook = m.roi_head.bbox_head.fc_cls.register_forward_hook(lambda mod, i, o: seen.update(x=i[0]))
        try:
            res = m.roi_head._bbox_forward(feats, rois)
        finally:
            hook.remove()
        boxes = m.roi_head.bbox_head.bbox_coder.decode(rois[:, 1:], res["bbox_pred"],
                                                       max_shape=(self.input_size,) * 2)
        cfg = self.cfg
        return rcnn_detections(res["cls_score"], boxes, seen["x"], [p.bboxes for p in proposals], self.input_size,
                               score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                               detections_per_img=cfg.max_detections)


class _Identity:
    """A box coder whose ``decode`` returns already-decoded boxes as ``(N, C+1, 4)``."""

    @staticmethod
    def decode(rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return rel_codes.view(rel_codes.shape[0], -1, 4)


class MMDetFCOSDetector(_MMDetMixin, FCOSDetector):
    """mmdet FCOS -> the ``fcos-points`` row layout (P5 points at mmdet's +0.5 offset)."""

    @property
    def num_classes(self) -> int:
        return int(self.checkpoint.state_dict["bbox_head.conv_cls.weight"].shape[0])

    @property
    def classes(self) -> list[str]:
        from grounding.teachers.detectors import resolve_classes

        return resolve_classes(self.cfg.classes, self.checkpoint, self.num_classes)

    def forward(self, canvases: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        m = self.model
        feats = m.extract_feat(self._normalise(canvases))
        cls_scores, bbox_preds, centernesses = m.bbox_head(feats)
        strides = [int(s[0]) if isinstance(s, (tuple, list)) else int(s) for s in m.bbox_head.strides]
        i = strides.index(P5_STRIDE)
        return [fcos_level_points(cls_scores[i][b], bbox_preds[i][b], centernesses[i][b], P5_STRIDE,
                                  self.input_size) for b in range(len(canvases))]

