"""Descriptive statistics of a canonical dataset (counts per split, sentence lengths, box sizes)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from grounding.data.schema import CanonicalDataset


def dataset_stats(ds: CanonicalDataset) -> dict[str, Any]:
    """Per split: images, sentences, sentences with a box, mean words per sentence, mean box area as a
    fraction of its image, median box width/height in pixels. Plus category counts and skipped items."""
    images = ds.image_index
    splits: dict[str, dict[str, Any]] = {}
    by_split: dict[str, list] = {}
    for r in ds.refs:
        by_split.setdefault(r.split, []).append(r)
    for split, refs in sorted(by_split.items()):
        boxed = [r for r in refs if r.box is not None]
        wh = np.array([[r.box[2] - r.box[0], r.box[3] - r.box[1]] for r in boxed], dtype=np.float64).reshape(-1, 2)
        area = np.array([(r.box[2] - r.box[0]) * (r.box[3] - r.box[1])
                         / (images[r.image_id].width * images[r.image_id].height) for r in boxed])
        splits[split] = {
            "images": len({r.image_id for r in refs}),
            "sentences": len(refs),
            "with_box": len(boxed),
            "words_mean": float(np.mean([len(r.text.split()) for r in refs])),
            "area_frac_mean": float(area.mean()) if len(area) else 0.0,
            "box_w_median": float(np.median(wh[:, 0])) if len(wh) else 0.0,
            "box_h_median": float(np.median(wh[:, 1])) if len(wh) else 0.0,
        }
    cats = Counter(r.category for r in ds.refs if r.category)
    return {"images": len(ds.images), "sentences": len(ds.refs), "skipped": len(ds.errors),
            "splits": splits, "categories": dict(sorted(cats.items()))}
