"""YOLOv3 anchor teacher (ultralytics): the ``yolo-anchors`` stage RefCLIP trains on.

Images are letterboxed to ``input_size`` (416: the 13x13 stride-32 grid of RefCLIP) with grey
``pad_value`` padding and the same geometry as ultralytics' ``LetterBox`` (centred, ``round`` of the
scaled size). Only the stride-32 level is read. Ultralytics' YOLOv3 head is anchor-free (one prediction
per grid cell, "anchor" = cell); per cell: the neck feature at stride 32 (the input of the detection
head), the decoded box and the confidence (max class probability: the head has no separate objectness).
The top ``keep_ratio`` of cells by confidence (ties: lower cell index first) are kept:

* ``boxes`` (K, 4) float32 xyxy original pixels (clipped); ``scores`` (K,) float32 confidence;
* ``labels`` (K,) int32 into ``extra.classes``; ``class_probs`` (K, C) float32 (sigmoid scores);
* ``features`` (K, D) float16 neck features; ``cell_index`` (K,) int32 row-major index into the grid;
* ``cell_scores`` (G*G,) float32: the confidence of every cell, kept or not.

Ultralytics is imported only through :func:`import_ultralytics`, which first points its settings at a
project directory and switches off everything that could reach the network (``YOLO_OFFLINE``, sync,
hub/tracking callbacks).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image

from grounding.boxes import Letterbox
from grounding.config import Params
from grounding.shards import FieldSpec
from grounding.ultralytics_offline import offline_ultralytics  # noqa: F401 - re-exported
from grounding.teachers.detectors import (
    Detector,
    canvas_to_original,
    common_fields,
    common_row,
    keep_count,
)

P5_STRIDE = 32
def import_ultralytics(params: Params) -> Any:
    """:func:`offline_ultralytics` with the project's config dir (``<paths.models>/.ultralytics``)."""
    return offline_ultralytics(Path(params.paths.models) / ".ultralytics")


#: Model yamls shipped with grounding (``yolov3-p5.yaml``: detection on the stride-32 level only).
CONFIG_DIR = Path(__file__).parent / "configs"


def model_config(config: str, nc: int, depth_multiple: float | None, width_multiple: float | None) -> dict[str, Any]:
    """The ultralytics model dict of ``config`` (a yaml shipped with grounding in :data:`CONFIG_DIR`, one
    shipped with ultralytics such as ``yolov3.yaml``, or a local yaml file) with ``nc`` classes and, when
    given, the depth/width multiples."""
    from ultralytics.nn.tasks import yaml_model_load

    if (CONFIG_DIR / config).is_file():
        config = str(CONFIG_DIR / config)
    elif not (Path(config).is_file() or Path(config).name == config):
        raise FileNotFoundError(f"teachers.yolo.config: {config} is neither a local file nor an ultralytics yaml name")
    d = copy.deepcopy(yaml_model_load(config))
    d["nc"] = int(nc)
    if depth_multiple is not None:
        d["depth_multiple"] = float(depth_multiple)
    if width_multiple is not None:
        d["width_multiple"] = float(width_multiple)
    d.pop("yaml_file", None)
    return d


def level_span(feature_sizes: list[tuple[int, int]], strides: list[int], stride: int = P5_STRIDE) -> slice:
    """Span of the ``stride`` level in the detection head's level-concatenated cell order."""
    if stride not in strides:
        raise ValueError(f"no stride-{stride} level among the head's strides {strides}")
    i = strides.index(stride)
    start = sum(h * w for h, w in feature_sizes[:i])
    return slice(start, start + feature_sizes[i][0] * feature_sizes[i][1])


def select_cells(confidence: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices of the top ``keep_ratio`` cells by confidence, highest first, ties by lower index."""
    order = torch.sort(confidence, descending=True, stable=True).indices
    return order[:keep_count(len(confidence), keep_ratio)]


class YoloDetector(Detector):
    """Ultralytics YOLOv3 (any ultralytics detection yaml); caches the kept stride-32 cells."""

    teacher = "yolo"
    library = "ultralytics"
    level = "region"

    @property
    def pad_rgb(self) -> tuple[float, float, float]:
        v = self.cfg.pad_value / 255.0
        return (v, v, v)

    @property
    def classes(self) -> list[str]:
        names = self.cfg.classes or self.checkpoint.meta.get("classes")
        if not names:
            raise ValueError(f"{self.weights}: no class names in the file; set teachers.yolo.classes")
        return [str(n) for n in names]

    @property
    def config(self) -> dict[str, Any]:
        meta = self.checkpoint.meta.get("config")
        if meta is not None:
            return copy.deepcopy(dict(meta))
        import_ultralytics(self.params)
        return model_config(self.cfg.config, len(self.classes), self.cfg.depth_multiple, self.cfg.width_multiple)

    @property
    def grid(self) -> int:
        return self.input_size // P5_STRIDE

    def _build(self) -> torch.nn.Module:
        import_ultralytics(self.params)
        from ultralytics.nn.tasks import DetectionModel

        cfg = self.config
        if int(cfg["nc"]) != len(self.classes):
            raise ValueError(f"{self.weights}: model has {cfg['nc']} classes but {len(self.classes)} class names")
        model = DetectionModel(cfg=cfg, nc=int(cfg["nc"]), verbose=False)
        model.load_state_dict(self.checkpoint.state_dict)
        return model

    def arch_identity(self) -> dict[str, Any]:
        cfg = self.config
        return {"config": self.cfg.config, "depth_multiple": cfg.get("depth_multiple"),
                "width_multiple": cfg.get("width_multiple"), "num_classes": int(cfg["nc"])}

    def output_params(self) -> dict[str, Any]:
        c = self.cfg
        return {"backend": c.backend, "input_size": c.input_size, "pad_value": c.pad_value,
                "keep_ratio": c.keep_ratio, "level_stride": P5_STRIDE, "classes": self.classes}

    def extra(self) -> dict[str, Any]:
        return {"grid": [self.grid, self.grid], "stride": P5_STRIDE, "cell_order": "row-major (y, x)",
                "kept_per_image": keep_count(self.grid * self.grid, self.cfg.keep_ratio)}

    @property
    def feature_dim(self) -> int:
        head = self.model.model[-1]
        return int(head.cv2[list(self._strides()).index(P5_STRIDE)][0].conv.in_channels)

    def _strides(self) -> list[int]:
        return [int(s) for s in self.model.stride.tolist()]

    def fields(self) -> tuple[FieldSpec, ...]:
        c = len(self.classes)
        return (
            FieldSpec("boxes", "float32", (4,), ragged=True, meaning="kept cells' boxes, float32 xyxy original pixels"),
            FieldSpec("scores", "float32", (), ragged=True, meaning="confidence (max class probability)"),
            FieldSpec("labels", "int32", (), ragged=True, meaning="argmax class index into extra.classes"),
            FieldSpec("class_probs", "float32", (c,), ragged=True, meaning="per-class sigmoid scores"),
            FieldSpec("features", "float16", (self.feature_dim,), ragged=True,
                      meaning="stride-32 neck feature of the cell (input of the detection head)"),
            FieldSpec("cell_index", "int32", (), ragged=True, meaning="row-major index of the kept cell in the grid"),
            FieldSpec("cell_scores", "float32", (self.grid * self.grid,),
                      meaning="confidence of every stride-32 cell, row-major"),
            *common_fields(),
        )

    def forward(self, canvases: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        y, preds = self.model(canvases)  # y: [B, 4 + C, cells] (xywh canvas pixels, sigmoid scores)
        feats = preds["feats"]
        sl = level_span([tuple(f.shape[-2:]) for f in feats], self._strides())
        p5 = feats[self._strides().index(P5_STRIDE)]  # [B, D, G, G]
        out = []
        for b in range(len(canvases)):
            xywh, probs = y[b, :4, sl].T, y[b, 4:, sl].T  # [P,4], [P,C]
            conf, labels = probs.max(1)
            keep = select_cells(conf, self.cfg.keep_ratio)
            xyxy = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
            out.append({"boxes": xyxy[keep], "scores": conf[keep], "labels": labels[keep],
                        "class_probs": probs[keep], "features": p5[b].flatten(1).T[keep],
                        "cell_index": keep, "cell_scores": conf})
        return out

    def to_row(self, raw: Mapping[str, torch.Tensor], lb: Letterbox) -> dict[str, np.ndarray]:
        return {
            "boxes": canvas_to_original(raw["boxes"], lb),
            "scores": raw["scores"].float().cpu().numpy(),
            "labels": raw["labels"].to(torch.int32).cpu().numpy(),
            "class_probs": raw["class_probs"].float().cpu().numpy(),
            "features": raw["features"].float().cpu().numpy().astype(np.float16),
            "cell_index": raw["cell_index"].to(torch.int32).cpu().numpy(),
            "cell_scores": raw["cell_scores"].float().cpu().numpy(),
            **common_row(lb),
        }
