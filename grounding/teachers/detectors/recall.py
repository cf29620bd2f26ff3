"""Proposal recall of the cached detector outputs: the upper bound of anything that picks a cached box.

Recall = fraction of distinct GT boxes of a split's images covered by at least one cached box at
IoU >= 0.5 (frcnn: the ``max_detections`` boxes per image; fcos: the P5 points inside the image; yolo:
the kept cells). Run ``python -m grounding.teachers.detectors.recall [--split val] [--set k=v ...]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from grounding.config import Params, load
from grounding.data.gt import gt_regions
from grounding.data.schema import CanonicalDataset
from grounding.shards import ShardSet
from grounding.teachers.detectors import TEACHERS


def covered(gt: np.ndarray, candidates: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """``(G,)`` bool: whether each GT box (float32 xyxy) has a candidate box with IoU >= ``iou``."""
    if len(gt) == 0:
        return np.zeros(0, bool)
    if len(candidates) == 0:
        return np.zeros(len(gt), bool)
    m = box_iou(torch.from_numpy(np.asarray(gt, np.float32)), torch.from_numpy(np.asarray(candidates, np.float32)))
    return (m >= iou).any(1).numpy()


def candidate_boxes(stage: str, row: dict[str, np.ndarray]) -> np.ndarray:
    """The boxes of a cached row that count as proposals (fcos: only points inside the image; yolo with
    ``backend: darknet``: the 4 predictions of every kept cell, clipped to the image)."""
    if stage == "fcos-points":
        return row["boxes"][row["inside"].astype(bool)]
    if "kept_cells" in row:
        boxes = row["cell_boxes"][row["kept_cells"]].reshape(-1, 4)
        w, h = (float(v) for v in row["size"])
        return np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    return row["boxes"]


def proposal_recall(shards: ShardSet, ds: CanonicalDataset, split: str = "val", iou: float = 0.5) -> dict[str, float]:
    """Recall of the cached boxes in ``shards`` over the GT boxes of ``split``'s images."""
    images = {r.image_id for r in ds.refs if r.split == split}
    hits = total = n_images = 0
    n_candidates = []
    for image_id, reg in gt_regions(ds, []):
        if image_id not in images or image_id not in shards:
            continue
        cand = candidate_boxes(shards.manifest.stage, shards.get(image_id))
        c = covered(reg["boxes"], cand, iou)
        hits, total, n_images = hits + int(c.sum()), total + len(c), n_images + 1
        n_candidates.append(len(cand))
    return {"recall": hits / total if total else float("nan"), "gt_boxes": total, "images": n_images,
            "boxes_per_image": float(np.mean(n_candidates)) if n_candidates else 0.0}


def recall_table(params: Params, split: str = "val", stages: Iterable[str] = TEACHERS.values()) -> dict[str, dict]:
    """Recall of every detector shard set that exists for the current dataset."""
    ds = CanonicalDataset.load(params.prepared_dir())
    out = {}
    for stage in stages:
        path = params.teacher_dir(stage)
        if (path / "manifest.json").exists():
            out[stage] = proposal_recall(ShardSet(path), ds, split)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. dataset.synthetic.n_images=40")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", type=Path, help="also write the table as JSON here")
    a = ap.parse_args(argv)
    table = recall_table(load(a.params, a.set), a.split)
    for stage, r in table.items():
        print(f"{stage:16s} recall@0.5 {r['recall']:.3f}  ({r['gt_boxes']} GT boxes, {r['images']} {a.split} images, "
              f"{r['boxes_per_image']:.1f} boxes/image)")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"split": a.split, **table}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
