"""What the format readers share: image requests probed in parallel into a builder, annotation provenance
and the EXIF policy of each dataset family (its own module so the readers and the dispatcher in
:mod:`grounding.data.readers` import it without a cycle)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image

from grounding.data.images import image_record
from grounding.data.builder import DatasetBuilder
from grounding.data.schema import DataError, ImageRecord


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
