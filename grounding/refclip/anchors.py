"""The kept anchors RefCLIP chooses among, read from a ``yolo-anchors`` shard set, degenerate ones masked.

Two cache layouts (``refclip.features``):

- ``p5-cells`` (ultralytics backend): ragged ``features``/``boxes``/``scores``/``cell_index`` per image; a kept
  anchor is one box (already clipped to the image) with its neck feature.
- ``multiscale`` (darknet backend, CONTRACT-20): fixed ``map_s8``/``map_s16``/``map_s32``, ``cell_boxes``
  ``(G*G, 4, 4)`` (not clipped), ``cell_objectness`` ``(G*G, 4)``, ``cell_scores`` and ``kept_cells`` ``(K,)``
  ascending. A kept anchor is a cell; its box is the highest-objectness of its 4 predictions
  (``get_boxes`` of the public code).

Issue 21: a prediction whose box has zero area once clipped to the image (e.g. wholly on the letterbox
padding) is never selected: such boxes are masked before the in-cell choice, and a cell with no valid box
(or a p5 anchor with a degenerate box) is masked out of the anchor set, in training and at inference.
Every box here is clipped to the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from grounding.shards import ShardSet

MAP_FIELDS = ("map_s8", "map_s16", "map_s32")


def clip_boxes(boxes: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Clip ``(..., 4)`` xyxy boxes to their image; ``size`` ``(..., 2)`` (width, height) broadcasts."""
    w, h = size[..., 0:1].astype(np.float32), size[..., 1:2].astype(np.float32)
    out = boxes.astype(np.float32, copy=True)
    out[..., 0::2] = np.clip(out[..., 0::2], 0, w)
    out[..., 1::2] = np.clip(out[..., 1::2], 0, h)
    return out


def nondegenerate(boxes: np.ndarray, size: np.ndarray) -> np.ndarray:
    """``(...,)`` bool: True where the box keeps a positive area once clipped to the image."""
    c = clip_boxes(boxes, size)
    return (c[..., 2] > c[..., 0]) & (c[..., 3] > c[..., 1])


@dataclass
class AnchorTable:
    """Kept anchors of every image padded to ``K``: ``mask`` ``(N, K)`` bool (real and non-degenerate),
    ``boxes`` ``(N, K, 4)`` float32 xyxy original pixels clipped (the box each anchor predicts), ``cells``
    ``(N, K)`` int32 grid index, ``confidence`` ``(N, K)`` float32 (anchor ranking score), ``candidates``: per
    image the valid boxes of all its kept anchors (the upper bound's set). ``features`` ``(N, K, D)``
    (p5-cells) or, for multiscale, ``source`` + ``kept`` to read the maps with :meth:`visual`."""

    image_ids: list[str]
    kind: str
    mask: torch.Tensor
    boxes: np.ndarray
    cells: np.ndarray
    confidence: np.ndarray
    candidates: list[np.ndarray]
    features: torch.Tensor | None = None
    source: ShardSet | None = None
    kept: torch.Tensor | None = None
    _maps: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def row(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.image_ids)}

    def preload(self, max_bytes: int = 2 << 30) -> bool:
        """Hold every image's maps in memory (float16) when they fit ``max_bytes``; True if done."""
        if self.kind != "multiscale" or self._maps:
            return bool(self._maps)
        per = sum(int(np.prod(self.source.fields[f].shape)) * 2 for f in MAP_FIELDS)
        if per * len(self.image_ids) > max_bytes:
            return False
        rows = [self.source.get(k, list(MAP_FIELDS)) for k in self.image_ids]
        self._maps = {f: torch.from_numpy(np.stack([r[f] for r in rows])) for f in MAP_FIELDS}
        return True

    def visual(self, rows: torch.Tensor, device: torch.device | None = None):
        """The visual input of ``rows`` for the model: features ``(B, K, D)`` or ``(s8, s16, s32, kept)``."""
        device = device or torch.device("cpu")
        if self.kind == "p5-cells":
            return self.features[rows].to(device)
        if self._maps:
            maps = [self._maps[f][rows] for f in MAP_FIELDS]
        else:  # memory-mapped reads of just this batch
            got = [self.source.get(self.image_ids[int(r)], list(MAP_FIELDS)) for r in rows]
            maps = [torch.from_numpy(np.stack([g[f] for g in got])) for f in MAP_FIELDS]
        return (*[m.to(device).float() for m in maps], self.kept[rows].to(device))


def _p5_table(anchors: ShardSet, image_ids: Sequence[str]) -> AnchorTable:
    has_size = "size" in anchors.fields  # absent: boxes taken as already inside the image
    rows = [anchors.get(i, ["features", "boxes", "scores", "cell_index", *(["size"] if has_size else [])])
            for i in image_ids]
    k = max((len(r["boxes"]) for r in rows), default=0)
    if k == 0:
        raise ValueError(f"{anchors.path}: no kept anchors at all")
    d = anchors.fields["features"].shape[0]
    n = len(rows)
    feats = np.zeros((n, k, d), np.float32)
    mask = np.zeros((n, k), bool)
    boxes = np.zeros((n, k, 4), np.float32)
    cells = np.full((n, k), -1, np.int32)
    conf = np.zeros((n, k), np.float32)
    cands = []
    for i, r in enumerate(rows):
        m = len(r["boxes"])
        size = r["size"] if has_size else np.array([np.inf, np.inf], np.float32)
        b = clip_boxes(r["boxes"], size)
        feats[i, :m], boxes[i, :m] = r["features"], b
        mask[i, :m] = nondegenerate(b, size)
        cells[i, :m], conf[i, :m] = r["cell_index"], r["scores"]
        cands.append(b[mask[i, :m]])
    return AnchorTable(list(image_ids), "p5-cells", torch.from_numpy(mask), boxes, cells, conf, cands,
                       features=torch.from_numpy(feats))


def _multiscale_table(anchors: ShardSet, image_ids: Sequence[str]) -> AnchorTable:
    need = ("kept_cells", "cell_boxes", "cell_objectness", "cell_scores", "size")
    n = len(image_ids)
    mask, boxes, cells, conf, cands = [], [], [], [], []
    for key in image_ids:
        r = anchors.get(key, list(need))
        kept = r["kept_cells"].astype(np.int64)
        b = clip_boxes(r["cell_boxes"][kept], r["size"])  # [K,4,4]
        ok = nondegenerate(b, r["size"])  # [K,4]
        obj = np.where(ok, r["cell_objectness"][kept], -np.inf)
        best = obj.argmax(axis=1)  # the highest-objectness valid box of each kept cell
        boxes.append(b[np.arange(len(kept)), best])
        mask.append(ok.any(axis=1))
        cells.append(kept.astype(np.int32))
        conf.append(r["cell_scores"][kept].astype(np.float32))
        cands.append(b[ok])
    if n == 0:
        raise ValueError(f"{anchors.path}: no images to read")
    return AnchorTable(list(image_ids), "multiscale", torch.from_numpy(np.stack(mask)), np.stack(boxes),
                       np.stack(cells), np.stack(conf), cands, source=anchors,
                       kept=torch.from_numpy(np.stack(cells).astype(np.int64)))


def cache_kind(anchors: ShardSet) -> str:
    """``multiscale`` for a darknet-layout cache (has ``map_s32``), ``p5-cells`` for the ultralytics one."""
    if "map_s32" in anchors.fields:
        return "multiscale"
    if "features" in anchors.fields:
        return "p5-cells"
    raise ValueError(f"{anchors.path}: neither a darknet (map_s32, ...) nor an ultralytics (features, ...) "
                     f"yolo-anchors shard set; fields are {list(anchors.fields)}")


def load_anchor_table(anchors: ShardSet, image_ids: Sequence[str], features: str | None = None) -> AnchorTable:
    """Read the kept anchors of ``image_ids``; ``features`` (``p5-cells | multiscale``) must fit the cache."""
    kind = cache_kind(anchors)
    if features is not None and features != kind:
        need = {"multiscale": "teachers.yolo.backend=darknet", "p5-cells": "teachers.yolo.backend=ultralytics"}
        raise ValueError(f"refclip.features={features} needs a yolo-anchors cache made with {need[features]}; "
                         f"{anchors.path} is a {kind} cache")
    return _multiscale_table(anchors, image_ids) if kind == "multiscale" else _p5_table(anchors, image_ids)
