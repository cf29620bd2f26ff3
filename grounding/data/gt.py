"""Ground-truth regions per image: the distinct annotated boxes of each image with their class.

Used as the oracle proposal set (upper bounds, crop embeddings on GT boxes) and as the first shard set
the demo writes. Boxes float32 xyxy original pixels; ``labels`` index into the sorted class list.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from grounding.data.schema import CanonicalDataset

GT_FIELDS_MEANING = {
    "boxes": "distinct GT boxes of the image, float32 xyxy, original pixels",
    "labels": "class index of each box into manifest extra.classes (-1: no category)",
    "size": "image width, height in pixels",
}


def class_list(ds: CanonicalDataset) -> list[str]:
    """Sorted distinct categories of the dataset's refs."""
    return sorted({r.category for r in ds.refs if r.category})


def gt_regions(ds: CanonicalDataset, classes: list[str]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield ``(image_id, {"boxes": (K, 4) float32, "labels": (K,) int32, "size": (2,) int32})`` in
    image-id order; boxes are deduplicated exactly (several sentences usually refer to one object)."""
    index = {c: i for i, c in enumerate(classes)}
    per_image: dict[str, dict[tuple[float, ...], int]] = {im.image_id: {} for im in ds.images}
    for r in ds.refs:
        if r.box is not None:
            per_image[r.image_id].setdefault(tuple(r.box), index.get(r.category or "", -1))
    for im in ds.images:
        regions = per_image[im.image_id]
        ordered = sorted(regions)
        boxes = np.array(ordered, dtype=np.float32).reshape(-1, 4)
        labels = np.array([regions[b] for b in ordered], dtype=np.int32)
        yield im.image_id, {"boxes": boxes, "labels": labels,
                            "size": np.array([im.width, im.height], dtype=np.int32)}
