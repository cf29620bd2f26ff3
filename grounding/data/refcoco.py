"""RefCOCO / RefCOCO+ / RefCOCOg / ReferIt (RefCLEF) in the layout of the ``refer`` toolkit (lichengunc/refer).

On disk::

    <root>/<dataset>/refs(<split_by>).p   pickle: [{ref_id, ann_id, image_id, split, category_id, file_name,
                                                     sentences: [{sent_id, sent, raw, tokens}], ...}]
    <root>/<dataset>/instances.json       COCO: images [{id, file_name, width, height}],
                                                annotations [{id, image_id, bbox xywh, segmentation, category_id}],
                                                categories [{id, name}]
    <image_root>/<file_name>              the ``file_name`` of instances.json, as is

``dataset`` is ``refcoco`` (split_by ``unc`` or ``google``), ``refcoco+`` (``unc``), ``refcocog`` (``umd`` or
``google``) or ``refclef`` (ReferIt: ``unc`` or ``berkeley``). The toolkit's image folders are
``<root>/images/mscoco/images/train2014`` (COCO, file names ``COCO_train2014_%012d.jpg``) and
``<root>/images/saiapr_tc-12`` (RefCLEF; its ``file_name`` values carry the subfolder of that archive), but
``image_root`` is always passed explicitly.

Conventions: one :class:`~grounding.data.schema.RefRecord` per sentence, ``ref_id = f"{dataset}/{sent_id}"``
(sent ids are unique within a dataset and identical across its split_bys), ``image_id = str(COCO image id)``,
text = the sentence's ``sent`` field (``text_field="raw"`` for the raw one), box = the annotation's COCO ``bbox``
(xywh, pixels) converted to xyxy, category = the category name of the annotation, mask = the annotation's
segmentation as a compressed COCO RLE (polygons rasterised with ``frPyObjects`` and merged; ``counts`` str).
The refs pickle is read with the restricted unpickler of :mod:`grounding.data.safe_pickle`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from grounding.data.reader_common import ImageRequest, add_images, file_provenance
from grounding.data.safe_pickle import load_pickle
from grounding.data.builder import DatasetBuilder
from grounding.data.schema import CanonicalDataset, DataError, OnError


def coco_rle(segmentation: Any, height: int, width: int) -> dict[str, Any] | None:
    """A COCO segmentation as one compressed RLE ``{"size": [h, w], "counts": str}``.

    Accepted: a list of polygons (rasterised and merged), an uncompressed or compressed RLE dict, or a list of
    RLE dicts (merged; RefCLEF stores its masks so, which is why the ``refer`` toolkit sums decoded maps).

    ``height``/``width`` are the image's pixel size; an empty segmentation gives ``None``. Raises ``ValueError``
    for malformed polygons or an RLE whose size is not the image's.
    """
    from pycocotools import mask as mask_utils

    if segmentation is None or (isinstance(segmentation, (list, dict)) and len(segmentation) == 0):
        return None
    if isinstance(segmentation, list) and all(isinstance(s, dict) for s in segmentation):
        # a list of RLEs (RefCLEF's instances.json): their union
        parts = [coco_rle(s, height, width) for s in segmentation]
        rle = mask_utils.merge([{"size": p["size"], "counts": p["counts"].encode("ascii")} for p in parts if p])
    elif isinstance(segmentation, list):
        polys = []
        margin = max(height, width)  # rasterising cost grows with the polygon's extent: refuse absurd ones
        for i, poly in enumerate(segmentation):
            if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                raise ValueError(f"segmentation polygon {i} is not a list of >= 3 (x, y) pairs")
            vals = [float(v) for v in poly]
            if not all(math.isfinite(v) and -margin <= v <= 2 * margin for v in vals):
                raise ValueError(f"segmentation polygon {i} has coordinates far outside the {width}x{height} image")
            polys.append(vals)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if size is None or counts is None:
            raise ValueError("RLE segmentation without 'size' or 'counts'")
        if [int(v) for v in size] != [height, width]:
            raise ValueError(f"RLE size {list(size)} (h, w) differs from the image's [{height}, {width}]")
        if isinstance(counts, list):  # uncompressed RLE: run lengths must cover the image exactly
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise ValueError("uncompressed RLE counts are not non-negative integers")
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE runs sum to {sum(counts)}, not {height}*{width}")
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, (str, bytes)):  # compressed: kept as is once its runs are checked
            raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
            total = sum(compressed_rle_runs(raw))
            if total != height * width:
                raise ValueError(f"compressed RLE runs sum to {total}, not {height}*{width}")
            rle = {"size": [height, width], "counts": raw}
        else:
            raise ValueError(f"RLE counts of type {type(counts).__name__}")
    else:
        raise ValueError(f"segmentation of type {type(segmentation).__name__}")
    counts = rle["counts"]
    return {"size": [int(height), int(width)],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts)}


def compressed_rle_runs(counts: bytes) -> list[int]:
    """The run lengths of a COCO compressed RLE string (the inverse of pycocotools' ``rleToString``).

    Parsed here, in Python, so that a malformed string is a ``ValueError`` instead of reaching
    pycocotools' C decoder, which trusts the runs to sum to ``h * w``."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("compressed RLE string ends inside a number")
            c = counts[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE string has a character {chr(counts[p])!r} outside '0'..'o'")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("compressed RLE string has a negative run")
        runs.append(x)
    return runs


def _index(items: Any, what: str, path: Path) -> dict[Any, dict[str, Any]]:
    if not isinstance(items, list):
        raise DataError(f"{path}: '{what}' is not a list")
    out: dict[Any, dict[str, Any]] = {}
    for it in items:
        if not isinstance(it, dict) or "id" not in it:
            raise DataError(f"{path}: an entry of '{what}' has no 'id'")
        if not _is_id(it["id"]):
            raise DataError(f"{path}: an entry of '{what}' has id {it['id']!r:.60}, not an integer or string")
        out[it["id"]] = it
    return out


def _is_id(value: Any) -> bool:
    """COCO/refer ids are integers (sometimes strings); anything else cannot name a record."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _load_instances(path: Path) -> tuple[dict, dict, dict]:
    if not path.is_file():
        raise DataError(f"{path}: instances.json is missing")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a COCO object with images/annotations/categories")
    missing = [k for k in ("images", "annotations", "categories") if k not in doc]
    if missing:
        raise DataError(f"{path}: missing COCO keys {missing}")
    return (_index(doc["images"], "images", path), _index(doc["annotations"], "annotations", path),
            _index(doc["categories"], "categories", path))


def read_refer(root: str | os.PathLike[str], dataset: str, split_by: str, image_root: str | os.PathLike[str],
               *, name: str | None = None, splits: Iterable[str] | None = None, text_field: str = "sent",
               on_error: OnError = "fail") -> CanonicalDataset:
    """Read ``<root>/<dataset>/refs(<split_by>).p`` + ``instances.json`` into a canonical dataset.

    ``splits`` keeps only refs whose split is listed (e.g. ``("val", "testA")``); ``text_field`` picks the
    sentence field (``"sent"`` or ``"raw"``). Bad items follow ``on_error`` (see :class:`DatasetBuilder`).
    """
    data_dir = Path(root) / dataset
    refs_path = data_dir / f"refs({split_by}).p"
    inst_path = data_dir / "instances.json"
    if not refs_path.is_file():
        found = sorted(p.name for p in data_dir.glob("refs(*).p")) if data_dir.is_dir() else []
        raise DataError(f"{refs_path}: refs file is missing"
                        + (f" (found {', '.join(found)})" if found else f" (no refs(*).p in {data_dir})"))
    refs = load_pickle(refs_path)
    if not isinstance(refs, list):
        raise DataError(f"{refs_path}: expected a list of refs, found {type(refs).__name__}")
    images, anns, cats = _load_instances(inst_path)
    keep = set(splits) if splits is not None else None

    builder = DatasetBuilder(name or f"{dataset}-{split_by}", image_root, on_error=on_error)
    requests: list[ImageRequest] = []
    todo: list[tuple[str, dict, dict, dict]] = []  # (item, ref, ann, image)
    for i, ref in enumerate(refs):
        item = f"ref #{i}" + (f" (ref_id {ref.get('ref_id')})" if isinstance(ref, dict) else "")
        if not isinstance(ref, dict):
            builder.fail(item, refs_path, f"is a {type(ref).__name__}, not a dict")
            continue
        missing = [k for k in ("ann_id", "image_id", "split", "sentences") if k not in ref]
        if missing:
            builder.fail(item, refs_path, f"missing keys {missing}")
            continue
        bad = [k for k in ("ann_id", "image_id") if not _is_id(ref[k])]
        if bad or not isinstance(ref["split"], str):
            builder.fail(item, refs_path, f"{', '.join(bad) or 'split'} of type "
                                          f"{type(ref[(bad or ['split'])[0]]).__name__} is not an id/string")
            continue
        if keep is not None and ref["split"] not in keep:
            continue
        ann = anns.get(ref["ann_id"])
        if ann is None:
            builder.fail(item, refs_path, f"annotation {ref['ann_id']} is not in {inst_path.name}")
            continue
        image = images.get(ref["image_id"])
        if image is None:
            builder.fail(item, refs_path, f"image {ref['image_id']} is not in {inst_path.name}")
            continue
        if ann.get("image_id") != ref["image_id"]:
            builder.fail(item, refs_path, f"annotation {ref['ann_id']} belongs to image {ann.get('image_id')}, "
                                          f"not {ref['image_id']}")
            continue
        try:
            size = (int(image["width"]), int(image["height"]))
            file_name = image["file_name"]
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            builder.fail(f"image {ref['image_id']}", inst_path, f"no usable file_name/width/height ({e!r})")
            continue
        if not isinstance(file_name, str):
            builder.fail(f"image {ref['image_id']}", inst_path, f"file_name {file_name!r} is not a string")
            continue
        requests.append(ImageRequest(str(ref["image_id"]), file_name, size, str(inst_path)))
        todo.append((item, ref, ann, image))

    add_images(builder, requests)

    masks: dict[Any, dict[str, Any] | None] = {}
    for item, ref, ann, image in todo:
        cat_id = ann.get("category_id", ref.get("category_id"))
        cat = cats.get(cat_id) if _is_id(cat_id) else None
        if not isinstance(ann.get("bbox"), (list, tuple)):
            builder.fail(item, inst_path, f"annotation {ann['id']} has no bbox")
            continue
        if cat is None or not isinstance(cat.get("name"), str):
            builder.fail(item, inst_path, f"category {ann.get('category_id')} of annotation {ann['id']} is unknown")
            continue
        if ann["id"] not in masks:
            try:
                masks[ann["id"]] = coco_rle(ann.get("segmentation"), int(image["height"]), int(image["width"]))
            except (ValueError, TypeError, OverflowError) as e:
                builder.fail(f"annotation {ann['id']}", inst_path, f"bad segmentation: {e}")
                masks[ann["id"]] = None
        sentences = ref["sentences"]
        if not isinstance(sentences, list):
            builder.fail(item, refs_path, "'sentences' is not a list")
            continue
        for sent in sentences:
            if not isinstance(sent, dict) or "sent_id" not in sent:
                builder.fail(item, refs_path, "a sentence without 'sent_id'")
                continue
            if text_field not in sent:
                builder.fail(f"ref {dataset}/{sent['sent_id']}", refs_path, f"sentence has no {text_field!r} field")
                continue
            builder.add_ref(
                ref_id=f"{dataset}/{sent['sent_id']}", image_id=str(ref["image_id"]),
                text=sent[text_field], split=str(ref["split"]), box=ann.get("bbox"), box_format="xywh",
                category=cat["name"], mask=masks[ann["id"]], file=refs_path,
            )

    return builder.build(source={
        "format": "refer",
        "dataset": dataset,
        "split_by": split_by,
        "files": [file_provenance(refs_path), file_provenance(inst_path)],
        "options": {"splits": sorted(keep) if keep is not None else None, "text_field": text_field,
                    "on_error": on_error},
        "conventions": {"ref_id": "{dataset}/{sent_id}", "image_id": "COCO image id", "box": "bbox xywh -> xyxy",
                        "mask": "COCO RLE (polygons merged)", "image_path": "instances.json file_name"},
    })


def read_referit(root: str | os.PathLike[str], image_root: str | os.PathLike[str], *, split_by: str = "berkeley",
                 name: str | None = None, splits: Iterable[str] | None = None, text_field: str = "sent",
                 on_error: OnError = "fail") -> CanonicalDataset:
    """ReferIt (RefCLEF) in the ``refer`` layout: ``<root>/refclef/refs(berkeley).p`` + ``instances.json``.

    The same reader as :func:`read_refer` (the layout is identical); ``image_root`` is the ``saiapr_tc-12``
    folder, and RefCLEF masks are the RLE segmentations of its instances.json.
    """
    return read_refer(root, "refclef", split_by, image_root, name=name or f"referit-{split_by}", splits=splits,
                      text_field=text_field, on_error=on_error)
