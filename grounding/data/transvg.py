"""TransVG split files (djiajunustc/TransVG ``datasets/data_loader.py``; the same files as ReSC/VLTVG/QRNet).

On disk: ``<root>/<dataset>/<dataset>_<split>.pth``, each a ``torch.save``-d list of rows

* ``(img_file, mask_file, bbox, phrase, attributes)`` for ``unc``, ``unc+``, ``gref``, ``gref_umd``, ``referit``;
* ``(img_file, bbox, phrase)`` for ``flickr``.

The box convention differs per dataset and is never guessed (:data:`TRANSVG_BOX_FORMAT`): TransVG's loader
turns RefCOCO-family boxes from xywh into xyxy and uses ReferIt/Flickr boxes as they are (xyxy). Confusing the
two collapses accuracy silently (TransVG issue #12); here every box is checked against its image and a box that
reads wrongly under the chosen convention gets an error that says which convention it looks like. TransVG's
loader also casts boxes to ``int``; we keep the stored values (fractional boxes stay fractional).

Images: ``<image_root>/<img_file>``; TransVG's own folders are ``ln_data/other/images/mscoco/images/train2014``
(RefCOCO family), ``ln_data/referit/images`` and ``ln_data/Flickr30k/flickr30k_images``. Width/height come
from decoding (rows carry no size).

Conventions: ``ref_id = f"{dataset}/{split}/{row index}"`` (rows carry no id, so ids are positional: they are
stable for a given file, not across reorderings of it); ``image_id`` = ``img_file`` without its extension;
``mask_file`` and ``attributes`` are not used. Default splits: every ``<dataset>_*.pth`` except ``trainval``
(for ReferIt a union of train and val, which would duplicate rows).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np

from grounding import boxes as B
from grounding.data.reader_common import ImageRequest, orientation_when_unknown, add_images, file_provenance
from grounding.data.safe_pickle import load_torch_list
from grounding.data.builder import DatasetBuilder
from grounding.data.schema import CanonicalDataset, DataError, OnError

#: Box convention of each TransVG dataset's split files.
TRANSVG_BOX_FORMAT: dict[str, str] = {
    "unc": "xywh",
    "unc+": "xywh",
    "gref": "xywh",
    "gref_umd": "xywh",
    "referit": "xyxy",
    "flickr": "xyxy",
}

#: Splits TransVG knows per dataset (``trainval`` is a file of its own only for ReferIt).
TRANSVG_SPLITS: dict[str, tuple[str, ...]] = {
    "unc": ("train", "val", "testA", "testB"),
    "unc+": ("train", "val", "testA", "testB"),
    "gref": ("train", "val"),
    "gref_umd": ("train", "val", "test"),
    "referit": ("train", "val", "trainval", "test"),
    "flickr": ("train", "val", "test"),
}


def box_problem(box: list[float], box_format: str, width: int, height: int, tolerance: float = 1.0) -> str | None:
    """Why ``box`` (read as ``box_format``) is not a valid box of a ``width x height`` image, with a hint when it
    looks like the other convention; ``None`` if it is valid."""
    try:
        xyxy = B.convert(np.array([box], dtype=np.float64), box_format, "xyxy")
        B.validate_xyxy(xyxy, width, height, tolerance=tolerance, name=f"box ({box_format} {box})")
        return None
    except ValueError as e:
        msg = str(e)
    x0, y0, a, b = box
    if box_format == "xyxy" and (a <= x0 or b <= y0):
        msg += ("; read as xyxy it has x2 <= x1 or y2 <= y1, which is what an xywh box looks like (TransVG "
                "stores xywh for unc/unc+/gref/gref_umd): if this file holds xywh, pass box_format='xywh'")
    elif box_format == "xywh" and a > x0 and b > y0 and a <= width + tolerance and b <= height + tolerance:
        msg += ("; read as xyxy it would fit the image (TransVG stores xyxy for referit/flickr): if this file "
                "holds xyxy, pass box_format='xyxy'")
    return msg


def _row_fields(row: Any) -> tuple[str, Any, Any]:
    """``(img_file, bbox, phrase)`` of a 5-field or 3-field (Flickr) row; ``ValueError`` otherwise."""
    if not isinstance(row, (list, tuple)) or len(row) not in (3, 5):
        n = len(row) if isinstance(row, (list, tuple)) else type(row).__name__
        raise ValueError(f"row is not (img_file, mask_file, bbox, phrase, attributes) or (img_file, bbox, phrase): {n}")
    img_file, bbox, phrase = (row[0], row[2], row[3]) if len(row) == 5 else (row[0], row[1], row[2])
    if not isinstance(img_file, str) or not img_file.strip():
        raise ValueError(f"img_file {img_file!r} is not a file name")
    if hasattr(bbox, "tolist"):
        bbox = bbox.tolist()
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"bbox {bbox!r} is not 4 numbers")
    try:
        bbox = [float(v) for v in bbox]
    except (TypeError, ValueError):
        raise ValueError(f"bbox {bbox!r} is not 4 numbers") from None
    return img_file, bbox, phrase


def read_transvg(root: str | os.PathLike[str], dataset: str, image_root: str | os.PathLike[str], *,
                 splits: Iterable[str] | None = None, box_format: str | None = None, name: str | None = None,
                 on_error: OnError = "fail") -> CanonicalDataset:
    """Read ``<root>/<dataset>/<dataset>_<split>.pth`` files into a canonical dataset.

    ``box_format`` overrides :data:`TRANSVG_BOX_FORMAT` and is required for datasets not in it. ``.pth`` files
    are loaded with ``torch.load(weights_only=True)`` only (see :func:`~grounding.data.safe_pickle.load_torch_list`).
    """
    fmt = box_format or TRANSVG_BOX_FORMAT.get(dataset)
    if fmt is None:
        raise DataError(f"TransVG dataset {dataset!r} has no known box convention (known: "
                        f"{', '.join(f'{k}={v}' for k, v in TRANSVG_BOX_FORMAT.items())}); pass box_format='xywh' "
                        f"or 'xyxy' explicitly: it is never guessed")
    if fmt not in B.BOX_FORMATS:
        raise DataError(f"box_format {fmt!r} not in {B.BOX_FORMATS}")
    data_dir = Path(root) / dataset
    if splits is None:
        prefix = f"{dataset}_"
        chosen = sorted(p.name[len(prefix):-len(".pth")] for p in data_dir.glob(f"{dataset}_*.pth")
                        if p.name[len(prefix):-len(".pth")] != "trainval")
        if not chosen:
            raise DataError(f"{data_dir}: no {dataset}_<split>.pth files here")
    else:
        chosen = list(splits)
    files = {s: data_dir / f"{dataset}_{s}.pth" for s in chosen}
    for s, p in files.items():
        if not p.is_file():
            raise DataError(f"{p}: split file for split {s!r} is missing")

    builder = DatasetBuilder(name or f"{dataset}-transvg", image_root, on_error=on_error)
    requests: list[ImageRequest] = []
    todo: list[tuple[str, str, Path, str, list[float], Any]] = []  # (ref_id, image_id, file, split, bbox, phrase)
    for split, path in files.items():
        for i, row in enumerate(load_torch_list(path)):
            ref_id = f"{dataset}/{split}/{i}"
            try:
                img_file, bbox, phrase = _row_fields(row)
            except ValueError as e:
                builder.fail(f"ref {ref_id}", path, str(e))
                continue
            try:
                image_id = PurePosixPath(img_file.replace("\\", "/")).with_suffix("").as_posix()
            except ValueError as e:  # e.g. "/" or "a/": no file name to strip a suffix from
                builder.fail(f"ref {ref_id}", path, f"img_file {img_file!r}: {e}")
                continue
            requests.append(ImageRequest(image_id, img_file, None, str(path), orientation_when_unknown(dataset)))
            todo.append((ref_id, image_id, path, split, bbox, phrase))

    add_images(builder, requests)

    for ref_id, image_id, path, split, bbox, phrase in todo:
        image = builder.images.get(image_id)
        if image is not None:
            problem = box_problem(bbox, fmt, image.width, image.height, builder.box_tolerance)
            if problem is not None:
                builder.fail(f"ref {ref_id}", path, problem)
                continue
        builder.add_ref(ref_id=ref_id, image_id=image_id, text=phrase, split=split, box=bbox, box_format=fmt,
                        file=path)

    return builder.build(source={
        "format": "transvg",
        "dataset": dataset,
        "box_format": fmt,
        "files": [file_provenance(p) for p in files.values()],
        "options": {"splits": chosen, "box_format": box_format, "on_error": on_error},
        "conventions": {"ref_id": "{dataset}/{split}/{row index}", "image_id": "img_file without extension",
                        "box": f"{fmt} -> xyxy, not cast to int", "size": "decoded (no annotated size)"},
    })
