"""SimREC / RefCLIP annotation JSON (``data/anns/<dataset>.json`` of luogen1996/SimREC, kingthreestones/RefCLIP).

Format: ``{split: [{"iid": int, "bbox": [x, y, w, h], "cat_id": int, "refs": [str, ...], "mask_id": int}]}``,
boxes xywh in original pixels. The JSON names no image files: both repositories build the path from ``iid``
with a per-dataset pattern (their ``load_img_feats``), reproduced in :data:`SIMREC_IMAGE_PATTERNS`:

* ``refcoco``, ``refcoco+``, ``refcocog``: ``COCO_train2014_%012d.jpg`` (under COCO ``train2014``);
* ``referit``: ``%d.jpg`` (under their ``images/refclef`` folder, flat);
* ``flickr``: ``%d.jpg``: not a SimREC dataset; this is Flickr30k's own image naming (``<id>.jpg``).

Any other dataset needs ``image_pattern``: either %-style with one integer conversion (``"img_%06d.png"``) or
``str.format`` style with ``{iid}``. Width/height come from decoding the image (the JSON has no size).

Conventions: one RefRecord per string of ``refs``; ``ref_id = f"{dataset}/{mask_id}/{k}"`` (``mask_id`` is
the per-annotation id SimREC uses to name mask files, ``k`` the index in ``refs``), so ids do not depend on
the order of items in the file; ``image_id = str(iid)``; category is ``None`` unless ``categories`` maps the
numeric ``cat_id`` to a name (the JSON carries no names).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from grounding.data.reader_common import ImageRequest, orientation_when_unknown, add_images, file_provenance
from grounding.data.builder import DatasetBuilder
from grounding.data.schema import CanonicalDataset, DataError, OnError

_COCO_TRAIN2014 = "COCO_train2014_%012d.jpg"

#: Image file name pattern per dataset (from SimREC/RefCLIP ``load_img_feats``; ``flickr``: Flickr30k naming).
SIMREC_IMAGE_PATTERNS: dict[str, str] = {
    "refcoco": _COCO_TRAIN2014,
    "refcoco+": _COCO_TRAIN2014,
    "refcocog": _COCO_TRAIN2014,
    "referit": "%d.jpg",
    "flickr": "%d.jpg",
}


def image_file_name(pattern: str, iid: Any) -> str:
    """The image file name for ``iid`` under ``pattern`` (%-style integer conversion or ``{iid}``)."""
    if "{iid" in pattern:
        return pattern.format(iid=iid)
    if "%" in pattern:
        if isinstance(iid, bool) or not isinstance(iid, int):
            raise ValueError(f"iid {iid!r} is not an integer, as pattern {pattern!r} needs")
        return pattern % iid
    raise ValueError(f"image pattern {pattern!r} has neither a %-conversion nor '{{iid}}'")


def read_simrec(json_path: str | os.PathLike[str], image_root: str | os.PathLike[str], *, dataset: str,
                name: str | None = None, image_pattern: str | None = None, splits: Iterable[str] | None = None,
                categories: Mapping[int, str] | None = None, on_error: OnError = "fail") -> CanonicalDataset:
    """Read a SimREC/RefCLIP JSON; ``dataset`` picks the image name pattern unless ``image_pattern`` is given.

    ``splits`` keeps only the listed top-level keys (default: all). Bad items follow ``on_error``.
    """
    json_path = Path(json_path)
    if image_pattern is not None and not isinstance(image_pattern, str):
        raise DataError(f"image_pattern {image_pattern!r} is not a string; pass e.g. image_pattern='{{iid}}.jpg'")
    pattern = image_pattern or SIMREC_IMAGE_PATTERNS.get(dataset)
    if pattern is None:
        raise DataError(f"{json_path}: no image file pattern known for dataset {dataset!r} (known: "
                        f"{', '.join(sorted(SIMREC_IMAGE_PATTERNS))}); pass image_pattern=, e.g. '%d.jpg'")
    if not json_path.is_file():
        raise DataError(f"{json_path}: SimREC annotation file is missing")
    try:
        with open(json_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not all(isinstance(v, list) for v in doc.values()):
        raise DataError(f"{json_path}: expected {{split: [items]}}")
    chosen = sorted(doc) if splits is None else list(splits)
    unknown = [s for s in chosen if s not in doc]
    if unknown:
        raise DataError(f"{json_path}: splits {unknown} not in the file (it has {sorted(doc)})")

    builder = DatasetBuilder(name or f"{dataset}-simrec", image_root, on_error=on_error)
    requests: list[ImageRequest] = []
    todo: list[tuple[str, int, dict]] = []
    for split in chosen:
        for i, it in enumerate(doc[split]):
            item = f"{split}[{i}]"
            if not isinstance(it, dict):
                builder.fail(item, json_path, f"is a {type(it).__name__}, not a dict")
                continue
            missing = [k for k in ("iid", "bbox", "refs", "mask_id") if k not in it]
            if missing:
                builder.fail(item, json_path, f"missing keys {missing}")
                continue
            if not isinstance(it["refs"], list):
                builder.fail(item, json_path, "'refs' is not a list of strings")
                continue
            try:
                rel = image_file_name(pattern, it["iid"])
            except (ValueError, TypeError, KeyError) as e:
                builder.fail(item, json_path, str(e))
                continue
            requests.append(ImageRequest(str(it["iid"]), rel, None, str(json_path), orientation_when_unknown(dataset)))
            todo.append((split, i, it))

    add_images(builder, requests)

    for split, _i, it in todo:
        cat_id = it.get("cat_id")
        cat = categories.get(cat_id) if categories is not None and isinstance(cat_id, (int, str)) else None
        for k, text in enumerate(it["refs"]):
            builder.add_ref(ref_id=f"{dataset}/{it['mask_id']}/{k}", image_id=str(it["iid"]), text=text,
                            split=split, box=it["bbox"], box_format="xywh", category=cat, file=json_path)

    return builder.build(source={
        "format": "simrec",
        "dataset": dataset,
        "files": [file_provenance(json_path)],
        "options": {"image_pattern": pattern, "splits": chosen, "on_error": on_error,
                    "categories": {str(k): v for k, v in categories.items()} if categories else None},
        "conventions": {"ref_id": "{dataset}/{mask_id}/{index in refs}", "image_id": "iid",
                        "box": "bbox xywh -> xyxy", "size": "decoded (no annotated size)"},
    })
