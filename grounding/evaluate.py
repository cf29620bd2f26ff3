"""Acc@0.5: the fraction of predictions whose IoU with the GT box (original pixels, xyxy) is >= 0.5."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from grounding.boxes import paired_iou


def accuracy(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> float:
    """Acc@``threshold`` of ``(N, 4)`` predicted vs GT xyxy boxes; NaN for N = 0."""
    if len(pred) == 0:
        return float("nan")
    return float((paired_iou(pred, gt) >= threshold).mean())


def per_split(pred: Mapping[str, np.ndarray], gt: Mapping[str, np.ndarray], split: Mapping[str, str],
              threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """``{split: {"acc": Acc@thr, "n": count}}`` over the keys present in ``pred`` and ``gt``."""
    keys: dict[str, list[str]] = {}
    for k in pred:
        if k in gt:
            keys.setdefault(split[k], []).append(k)
    out: dict[str, dict[str, float]] = {}
    for s, ks in sorted(keys.items()):
        p = np.stack([pred[k] for k in ks])
        g = np.stack([gt[k] for k in ks])
        out[s] = {"acc": round(accuracy(p, g, threshold), 4), "n": len(ks)}
    return out


def covered(candidates: Sequence[np.ndarray], gt: np.ndarray, threshold: float = 0.5) -> float:
    """Upper bound: fraction of rows whose GT box is matched at IoU >= thr by any of its candidate boxes."""
    from grounding.boxes import box_iou

    hits = [len(c) > 0 and float(box_iou(c, g[None]).max()) >= threshold for c, g in zip(candidates, gt)]
    return float(np.mean(hits)) if hits else float("nan")
