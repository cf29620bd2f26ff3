"""The readers of user formats, behind one dispatcher, plus the helpers they share.

``read(fmt, root, image_root, **options)`` is what ``grounding data prepare --format X --root R`` calls.
``root`` means, per format:

===============  ==============================================================================================
``refcoco``      the ``refer`` data folder holding ``refcoco/refs(<split_by>).p`` + ``refcoco/instances.json``
``refcoco+``     same, ``refcoco+/``
``refcocog``     same, ``refcocog/`` (``split_by`` is required: ``"umd"`` or ``"google"``)
``referit``      same, ``refclef/`` with ``refs(berkeley).p`` (ReferIt in the ``refer`` layout)
``simrec``       the SimREC/RefCLIP annotation JSON file (``dataset=`` required)
``transvg``      the TransVG split folder holding ``<dataset>/<dataset>_<split>.pth`` (``dataset=`` required)
``flickr30k``    the Flickr30k Entities folder with ``Sentences/``, ``Annotations/`` and ``train.txt`` ...
===============  ==============================================================================================

The reader modules import :class:`ImageRequest`, :func:`add_images` and :func:`file_provenance` from here;
this module imports them lazily, so there is no import cycle.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image

from grounding.data.images import image_record
from grounding.data.schema import CanonicalDataset, DataError, DatasetBuilder, ImageRecord


#: Datasets whose images are COCO train2014: their boxes are in stored-pixel coordinates, so an EXIF-rotated
#: image referenced from a file without an annotated size (SimREC JSON, TransVG .pth) keeps its stored pixels.
COCO_FAMILY = frozenset({"refcoco", "refcoco+", "refcocog", "unc", "unc+", "gref", "gref_umd"})


def orientation_when_unknown(dataset: str) -> str:
    """``"raw"`` for COCO-family datasets, else ``"exif"`` (see :func:`grounding.data.images.decide_orientation`)."""
    return "raw" if dataset in COCO_FAMILY else "exif"


# ---- shared helpers ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRequest:
    """An image a reader needs: ``rel_path`` under the image root, annotated ``(width, height)`` if the
    format has one (it decides EXIF orientation), and the annotation ``file`` that names it (for errors).
    ``when_unknown`` is the orientation to use for an EXIF-rotated image without an annotated size."""

    image_id: str
    rel_path: str
    annotated_size: tuple[int, int] | None
    file: str
    when_unknown: str = "exif"


def _probe(root: Path, req: ImageRequest) -> ImageRecord | DataError:
    """The image's record, or the error that makes it unusable (returned, so a worker thread never raises)."""
    try:
        return image_record(root, req.image_id, req.rel_path, req.annotated_size, req.when_unknown)[0]
    except DataError as e:
        return e
    except (OSError, Image.DecompressionBombError) as e:  # unreadable file, absurd pixel count
        return DataError(f"{root / req.rel_path}: {type(e).__name__}: {e}")


def add_images(builder: DatasetBuilder, requests: Iterable[ImageRequest], *, workers: int | None = None) -> set[str]:
    """Decode and hash every requested image once (in a thread pool) and add it to ``builder``.

    Requests are handled in ``image_id`` order, so with ``on_error="fail"`` the same bad image is reported
    whatever order the reader met them in. The same id asked for with two different paths or sizes is a bad
    item. Returns the ids that were added.
    """
    unique: dict[str, ImageRequest] = {}
    for req in requests:
        prev = unique.get(req.image_id)
        if prev is None:
            unique[req.image_id] = req
        elif (prev.rel_path, prev.annotated_size) != (req.rel_path, req.annotated_size):
            builder.fail(f"image {req.image_id}", req.file,
                         f"listed twice with different files/sizes: {prev.rel_path!r} {prev.annotated_size} "
                         f"vs {req.rel_path!r} {req.annotated_size}")
    ordered = [unique[k] for k in sorted(unique)]
    workers = workers or min(8, os.cpu_count() or 1)
    root = Path(builder.image_root)
    if workers > 1 and len(ordered) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda r: _probe(root, r), ordered))
    else:
        results = [_probe(root, r) for r in ordered]
    added: set[str] = set()
    for req, res in zip(ordered, results):
        if isinstance(res, DataError):
            builder.fail(f"image {req.image_id}", req.file, str(res))
        elif builder.add_image(res, file=req.file):
            added.add(req.image_id)
    return added


def file_provenance(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{"path", "sha256"}`` of an annotation file, for a dataset's ``source``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {"path": str(path), "sha256": h.hexdigest()}


# ---- dispatcher -----------------------------------------------------------------------------------------
def _format_names_dataset(fmt: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without ``dataset``: the refer formats name their dataset themselves, so a ``dataset``
    option may only repeat it (``--format refcoco --option dataset=refcoco``); another value is an error."""
    given = options.pop("dataset", fmt)
    if given != fmt:
        raise DataError(f"--format {fmt} reads the {fmt} dataset, but --option dataset={given} names another: "
                        f"use --format {given} (or drop --option dataset)")
    return options


def _refcoco(root: Any, image_root: Any, *, split_by: str = "unc", **options: Any) -> CanonicalDataset:
    from grounding.data.refcoco import read_refer
    return read_refer(root, "refcoco", split_by, image_root, **_format_names_dataset("refcoco", options))


def _refcoco_plus(root: Any, image_root: Any, *, split_by: str = "unc", **options: Any) -> CanonicalDataset:
    from grounding.data.refcoco import read_refer
    return read_refer(root, "refcoco+", split_by, image_root, **_format_names_dataset("refcoco+", options))


def _refcocog(root: Any, image_root: Any, *, split_by: str | None = None, **options: Any) -> CanonicalDataset:
    from grounding.data.refcoco import read_refer
    if split_by is None:
        raise DataError("refcocog has two different splits: pass split_by='umd' (refs(umd).p, train/val/test) "
                        "or split_by='google' (refs(google).p, train/val)")
    return read_refer(root, "refcocog", split_by, image_root, **_format_names_dataset("refcocog", options))


def _referit(root: Any, image_root: Any, **options: Any) -> CanonicalDataset:
    from grounding.data.refcoco import read_referit
    return read_referit(root, image_root, **options)


def _simrec(root: Any, image_root: Any, **options: Any) -> CanonicalDataset:
    from grounding.data.simrec import read_simrec
    if "dataset" not in options:
        raise DataError("simrec: pass dataset= (refcoco, refcoco+, refcocog, referit, flickr, ...): it picks "
                        "the image file pattern")
    return read_simrec(root, image_root, **options)


def _transvg(root: Any, image_root: Any, **options: Any) -> CanonicalDataset:
    from grounding.data.transvg import read_transvg
    if "dataset" not in options:
        raise DataError("transvg: pass dataset= (unc, unc+, gref, gref_umd, referit, flickr): it picks the "
                        "split files and the box convention")
    dataset = options.pop("dataset")
    return read_transvg(root, dataset, image_root, **options)


def _flickr30k(root: Any, image_root: Any, **options: Any) -> CanonicalDataset:
    from grounding.data.flickr30k import read_flickr30k
    return read_flickr30k(root, image_root, **options)


#: Format name -> ``reader(root, image_root, **options)``.
READERS: dict[str, Callable[..., CanonicalDataset]] = {
    "refcoco": _refcoco,
    "refcoco+": _refcoco_plus,
    "refcocog": _refcocog,
    "referit": _referit,
    "simrec": _simrec,
    "transvg": _transvg,
    "flickr30k": _flickr30k,
}


def read(fmt: str, root: str | os.PathLike[str], image_root: str | os.PathLike[str],
         **options: Any) -> CanonicalDataset:
    """Read a dataset of format ``fmt`` (a key of :data:`READERS`); ``KeyError`` lists the known formats."""
    try:
        reader = READERS[fmt]
    except KeyError:
        raise KeyError(f"unknown dataset format {fmt!r}; known formats: {', '.join(sorted(READERS))}") from None
    return reader(root, image_root, **options)
