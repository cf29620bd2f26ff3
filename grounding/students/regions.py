"""The cached regions the weakly supervised students share (NCE+Distill, BiCM): detector proposals of the
images as padded arrays (:func:`load_regions`), their box geometry, the detector's class list, the label-free
proposal baselines, and the training-throughput note beside a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from grounding import class_probs as cprobs
from grounding.boxes import box_iou
from grounding.data.schema import CanonicalDataset, RefRecord
from grounding.shards import ShardSet
from grounding.students.common import acc_per_split

GEOMETRY_DIM = 5


@dataclass
class Regions:
    """Proposals of ``image_ids`` padded to ``R`` = the largest count. ``boxes`` ``(N, R, 4)`` float32 xyxy
    original pixels; ``mask`` ``(N, R)`` bool; ``features`` ``(N, R, F)`` float32 (RoI feature, then the
    geometry when asked); ``class_probs`` ``(N, R, C)`` float32 p(z | x) without the background column;
    ``scores`` ``(N, R)`` detector confidence; ``classes`` the C detector class names."""

    image_ids: list[str]
    boxes: np.ndarray
    mask: np.ndarray
    features: torch.Tensor
    class_probs: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    classes: list[str]

    @property
    def row(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.image_ids)}


def standardise(regions: Regions, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Standardise ``regions.features`` in place to zero mean and unit variance per feature column, with the
    statistics of the real (unpadded) regions of ``rows`` (the training images, seed 002 §4.1); padding
    stays 0. Returns ``(mean, std)`` ``(F,)`` float32 (std floored at 1e-6)."""
    rows = np.asarray(rows, dtype=np.int64)
    m = torch.from_numpy(regions.mask[rows])
    x = regions.features[torch.from_numpy(rows)][m].double()  # [n,F]
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    all_mask = torch.from_numpy(regions.mask).unsqueeze(-1)
    z = ((regions.features.double() - mean) / std).float()
    regions.features = torch.where(all_mask, z, torch.zeros_like(z))
    return mean.float().numpy(), std.float().numpy()


def box_geometry(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """``(K, 5)`` float32: x1/W, y1/H, x2/W, y2/H and the box's area fraction of the image."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    rel = b / np.array([width, height, width, height], np.float32)
    area = (rel[:, 2] - rel[:, 0]) * (rel[:, 3] - rel[:, 1])
    return np.concatenate([rel, area[:, None]], axis=1).astype(np.float32)


def detector_classes(proposals: ShardSet) -> list[str]:
    """The detector's class names (``extra.classes``); the class_probs columns are background-first."""
    classes = proposals.manifest.extra.get("classes")
    if not classes:
        raise ValueError(f"{proposals.path}: manifest has no extra.classes (detector class names)")
    if "class_probs" in proposals.fields:  # dense; top-k sets (grounding/class_probs.py) have C+1 implied
        n = proposals.fields["class_probs"].shape[-1]
        if n != len(classes) + 1:
            raise ValueError(f"{proposals.path}: class_probs has {n} columns, expected background + "
                             f"{len(classes)} classes")
    return list(classes)


def load_regions(proposals: ShardSet, ds: CanonicalDataset, image_ids: Sequence[str], geometry: bool) -> Regions:
    """Read the proposals of ``image_ids`` into padded arrays (see :class:`Regions`)."""
    classes = detector_classes(proposals)
    index = ds.image_index
    rows = proposals.get_many(image_ids, ["boxes", "features", *cprobs.stored_fields(proposals.fields),
                                          "scores", "labels"])
    r_max = max((len(r["boxes"]) for r in rows), default=0)
    if r_max == 0:
        raise ValueError(f"{proposals.path}: no proposals for the {len(image_ids)} images")
    n, d, c = len(rows), proposals.fields["features"].shape[-1], len(classes)
    fd = d + (GEOMETRY_DIM if geometry else 0)
    boxes = np.zeros((n, r_max, 4), np.float32)
    mask = np.zeros((n, r_max), bool)
    feats = np.zeros((n, r_max, fd), np.float32)
    probs = np.zeros((n, r_max, c), np.float32)
    scores = np.zeros((n, r_max), np.float32)
    labels = np.full((n, r_max), -1, np.int32)
    for i, (im, r) in enumerate(zip(image_ids, rows)):
        k = len(r["boxes"])
        boxes[i, :k], mask[i, :k], scores[i, :k], labels[i, :k] = r["boxes"], True, r["scores"], r["labels"]
        feats[i, :k, :d] = r["features"]
        if geometry:
            feats[i, :k, d:] = box_geometry(r["boxes"], index[im].width, index[im].height)
        probs[i, :k] = cprobs.dense(r, c + 1)[:, 1:]  # dense or top-k + residual; drop the background
    return Regions(list(image_ids), boxes, mask, torch.from_numpy(feats), probs, scores, labels, classes)


def proposal_baselines(regions: Regions, refs: Sequence[RefRecord], ds: CanonicalDataset, seed: int,
                       extra_candidates: Mapping[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Label-free baselines over the cached proposals, Acc@0.5 per split: a random proposal (seeded), the
    largest proposal, the most confident proposal, and the upper bound (some proposal has IoU >= 0.5 with
    the GT box: the best proposal by IoU). ``extra_candidates`` (``ref_id -> (K, 4)``) adds boxes to the
    upper bound only (reported as ``upper_bound_with_extra``)."""
    rng = np.random.default_rng(seed)
    row = regions.row
    rand, large, conf, best, best_x = {}, {}, {}, {}, {}
    for r in refs:
        i = row[r.image_id]
        m = regions.mask[i]
        boxes = regions.boxes[i][m]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        rand[r.ref_id] = boxes[int(rng.integers(0, len(boxes)))]
        large[r.ref_id] = boxes[int(np.argmax(area))]
        conf[r.ref_id] = boxes[int(np.argmax(regions.scores[i][m]))]
        if r.box is not None:
            gt = np.asarray([r.box], np.float32)
            best[r.ref_id] = boxes[int(np.argmax(box_iou(boxes, gt)[:, 0]))]
            if extra_candidates is not None and r.ref_id in extra_candidates:
                cand = np.concatenate([boxes, np.asarray(extra_candidates[r.ref_id], np.float32).reshape(-1, 4)])
                best_x[r.ref_id] = cand[int(np.argmax(box_iou(cand, gt)[:, 0]))]
    out = {"random": acc_per_split(rand, ds)[0], "largest": acc_per_split(large, ds)[0],
           "most_confident": acc_per_split(conf, ds)[0], "upper_bound": acc_per_split(best, ds)[0]}
    if extra_candidates is not None:
        out["upper_bound_with_extra"] = acc_per_split(best_x, ds)[0]
    return out


def timing_path(model_file: Path) -> Path:
    """Where the training throughput of a student checkpoint is noted (kept out of the weights file, so
    the weights' bytes, and the predictions' key, do not depend on the machine's speed)."""
    return model_file.with_name(model_file.name + ".timing.json")


def read_timing(model_file: Path) -> dict[str, Any]:
    """The noted throughput figures (``{}`` when the note is missing)."""
    import json

    path = timing_path(model_file)
    return json.loads(path.read_text()) if path.is_file() else {}
