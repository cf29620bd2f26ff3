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

The readers share :mod:`grounding.data.reader_common` (re-exported here); this module imports the readers
lazily.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from grounding.data.reader_common import (  # noqa: F401 - re-exported
    COCO_FAMILY, ImageRequest, add_images, file_provenance, orientation_when_unknown)
from grounding.data.schema import CanonicalDataset, DataError


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
