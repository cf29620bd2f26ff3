"""Building a canonical dataset record by record with validation (:class:`DatasetBuilder`): what every
reader of a user format uses."""

from __future__ import annotations

import math
import os
import unicodedata
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from grounding import boxes as B
from grounding.data.records import (
    OnError, DataError, ImageRecord, RefRecord, unicode_problem, printable, normalize_text, float32_box)
from grounding.data.schema import CanonicalDataset


class DatasetBuilder:
    """Collects records from a reader, validates them and applies the ``on_error`` policy.

    With ``on_error="fail"`` the first bad item raises :class:`DataError` naming the file and problem;
    with ``"skip"`` it is left out and recorded in ``errors`` (``{"item", "file", "reason"}``).
    """

    def __init__(self, name: str, image_root: str | os.PathLike[str], *, on_error: OnError = "fail",
                 max_text_chars: int = 1000, box_tolerance: float = 1.0) -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.name = name
        self.image_root = Path(image_root)
        self.on_error = on_error
        self.max_text_chars = max_text_chars
        self.box_tolerance = box_tolerance
        self.images: dict[str, ImageRecord] = {}
        self.refs: dict[str, RefRecord] = {}
        self.errors: list[dict[str, str]] = []

    def fail(self, item: str, file: str | os.PathLike[str] | None, reason: str) -> None:
        """Record a bad item (skip policy) or raise :class:`DataError` (fail policy)."""
        item, reason = printable(item), printable(reason)  # the record must be storable as UTF-8
        where = f"{printable(file)}: " if file else ""
        if self.on_error == "fail":
            raise DataError(f"{where}{item}: {reason}")
        self.errors.append({"item": item, "file": printable(file or ""), "reason": reason})

    def add_image(self, record: ImageRecord, *, file: str | os.PathLike[str] | None = None) -> bool:
        """Add an image; a duplicate id is a bad item. Returns whether it was added."""
        if record.image_id in self.images:
            if self.images[record.image_id] == record:
                return True  # the same image listed twice by the source (e.g. one row per ref): fine
            self.fail(f"image {record.image_id}", file, "duplicate image_id with different content")
            return False
        self.images[record.image_id] = record
        return True

    def add_ref(
        self,
        *,
        ref_id: str,
        image_id: str,
        text: str,
        split: str,
        box: Iterable[float] | None,
        box_format: str = "xyxy",
        category: str | None = None,
        mask: dict[str, Any] | None = None,
        file: str | os.PathLike[str] | None = None,
    ) -> bool:
        """Validate and add a sentence: text non-empty and not over ``max_text_chars``, image known,
        box converted from ``box_format`` to xyxy and checked against the image size. Returns whether added."""
        item = f"ref {ref_id}"
        if ref_id in self.refs:
            self.fail(item, file, "duplicate ref_id")
            return False
        image = self.images.get(image_id)
        if image is None:
            self.fail(item, file, f"image {image_id!r} is missing or was skipped")
            return False
        if not isinstance(text, str):
            self.fail(item, file, f"text is {type(text).__name__}, not a string")
            return False
        if not isinstance(split, str) or not split.strip():
            self.fail(item, file, f"split {split!r} is not a non-empty string")
            return False
        for name, value in (("ref_id", ref_id), ("text", text), ("split", split), ("category", category)):
            why = unicode_problem(value) if isinstance(value, str) else None
            if why:
                self.fail(item, file, f"{name} {why}")
                return False
        clean = normalize_text(text)
        if not any(unicodedata.category(c)[0] not in "ZC" for c in clean):  # nothing visible (ZWSP, BOM, ...)
            self.fail(item, file, "empty sentence")
            return False
        if len(clean) > self.max_text_chars:
            self.fail(item, file, f"sentence of {len(clean)} characters exceeds max_text_chars={self.max_text_chars}")
            return False
        xyxy: tuple[float, float, float, float] | None = None
        if box is not None:
            try:
                try:
                    if isinstance(box, (str, bytes, dict)):
                        raise TypeError(type(box).__name__)
                    vals = [float(v) for v in box]
                except (TypeError, ValueError, OverflowError):
                    raise ValueError(f"box {box!r:.80} is not 4 numbers") from None
                if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
                    raise ValueError(f"box {vals} is not 4 finite numbers")
                arr = B.convert(np.array([vals]), box_format, "xyxy")
                arr = B.validate_xyxy(arr, image.width, image.height, tolerance=self.box_tolerance,
                                      name=f"box ({box_format} {vals})")
                xyxy = float32_box(arr[0])
            except ValueError as e:
                self.fail(item, file, str(e))
                return False
        self.refs[ref_id] = RefRecord(ref_id, image_id, clean, split, xyxy, category, mask)
        return True

    def build(self, source: dict[str, Any]) -> CanonicalDataset:
        """The dataset, keeping only images that have at least one ref, with provenance ``source``."""
        used = {r.image_id for r in self.refs.values()}
        images = [im for im in self.images.values() if im.image_id in used]
        return CanonicalDataset(self.name, self.image_root, images, list(self.refs.values()),
                                source, list(self.errors))
