"""The canonical dataset: :class:`CanonicalDataset` (records: :mod:`grounding.data.records`; ``dataset.json``
streamed: :mod:`grounding.data.store`; building with validation: :class:`grounding.data.builder.DatasetBuilder`).

Every reader turns a user format into a :class:`CanonicalDataset`. Conventions:

* ids are strings, stable across runs, unique (``image_id`` per image, ``ref_id`` per sentence/phrase);
* image ``path`` is POSIX, relative to the dataset's image root, and may not escape it;
* ``box`` is float32 ``xyxy`` in original-image pixels (see :mod:`grounding.boxes`), or ``None`` when the
  sentence has no box (weak supervision never reads GT boxes during training, only evaluation);
* ``mask`` is a COCO RLE ``{"size": [h, w], "counts": str}`` or ``None``;
* ``orientation`` says how pixels are decoded: ``"none"`` (no EXIF rotation), ``"raw"`` (EXIF rotation
  present but ignored, the annotation matches the stored pixels) or ``"exif"`` (EXIF transpose applied).

The fingerprint is the sha256 of the canonical JSON of images and refs (sorted by id): it does not depend
on where the dataset lies on disk or in which order a reader met the records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


from grounding.data.records import (  # noqa: F401 - re-exported
    FORMAT_VERSION, DATASET_FILE, ORIENTATIONS, OnError, DataError, ImageRecord, RefRecord, unicode_problem, printable, normalize_text, float32_box, check_relative_path)
from grounding.data.store import (  # noqa: F401 - re-exported
    LINE_LAYOUT, _NotLineLayout, _RefsNotLoaded, _reading, _meta, _unreadable, _record, _check_fingerprint, _write_records, read_records, read_source, _stream_refs, _check_version, _text, _number, _image_root, _image_record, _ref_record, _fingerprint_of, _fields_of, canonical_json)


@dataclass
class CanonicalDataset:
    """Images and refs of one dataset plus provenance (``source``) and recorded skips (``errors``)."""

    name: str
    image_root: Path
    images: list[ImageRecord]
    refs: list[RefRecord]
    source: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.images = sorted(self.images, key=lambda r: r.image_id)
        self.refs = sorted(self.refs, key=lambda r: r.ref_id)
        seen: set[str] = set()
        for im in self.images:
            if im.image_id in seen:
                raise DataError(f"dataset {self.name}: duplicate image_id {im.image_id!r}")
            seen.add(im.image_id)
        ref_seen: set[str] = set()
        for r in self.refs:
            if r.ref_id in ref_seen:
                raise DataError(f"dataset {self.name}: duplicate ref_id {r.ref_id!r}")
            if r.image_id not in seen:
                raise DataError(f"dataset {self.name}: ref {r.ref_id} points at unknown image {r.image_id!r}")
            ref_seen.add(r.ref_id)

    # ---- lookups -------------------------------------------------------------------------------------
    @property
    def image_index(self) -> dict[str, ImageRecord]:
        """``image_id -> ImageRecord``."""
        return {im.image_id: im for im in self.images}

    def splits(self) -> dict[str, int]:
        """Number of refs per split, sorted by split name."""
        out: dict[str, int] = {}
        for r in self.refs:
            out[r.split] = out.get(r.split, 0) + 1
        return dict(sorted(out.items()))

    def image_path(self, image: ImageRecord) -> Path:
        """Absolute path of an image file (the relative path was checked not to escape the root)."""
        return self.image_root / image.path

    # ---- identity --------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of images and refs (independent of location and input order)."""
        if isinstance(self.refs, _RefsNotLoaded):
            return self._fingerprint
        return _fingerprint_of(self.images, self.refs)

    # ---- storage ---------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``<directory>/dataset.json`` atomically; ``image_root`` is stored relative when inside."""
        directory = Path(directory)
        head_fingerprint = self.fingerprint()  # fails before anything is created if a record is not storable
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            return self._save(directory, head_fingerprint)
        except BaseException:
            if created and not any(directory.iterdir()):  # a failure never leaves an empty output directory
                directory.rmdir()
            raise

    def _save(self, directory: Path, fingerprint: str) -> Path:
        root = Path(self.image_root).resolve()
        try:
            root_str = root.relative_to(directory.resolve()).as_posix()
        except ValueError:
            root_str = str(root)
        head = {"errors": self.errors, "fingerprint": fingerprint, "format_version": FORMAT_VERSION,
                "image_root": root_str}
        out = directory / DATASET_FILE
        tmp = out.with_suffix(".json.tmp")
        try:
            self._write(tmp, head)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, out)
        return out

    def _write(self, tmp: Path, head: dict[str, Any]) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            # One JSON document (keys in canonical order), laid out one record per line: see LINE_LAYOUT.
            f.write(canonical_json(head)[:-1] + ",\n")
            _write_records(f, "images", self.images)
            f.write(canonical_json({"name": self.name})[1:-1] + ",\n")
            _write_records(f, "refs", self.refs)
            f.write(canonical_json({"source": self.source})[1:] + "\n")
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, refs: bool = True) -> "CanonicalDataset":
        """Read a dataset written by :meth:`save`; checks format version and fingerprint.

        ``refs=False`` keeps only the images: the sentences are streamed, validated and hashed into the
        fingerprint check one line at a time, so memory does not grow with their number (image-level teacher
        stages at 100k images). Reading ``ds.refs`` of such a dataset raises :class:`DataError`."""
        directory = Path(directory)
        path = directory / DATASET_FILE if directory.is_dir() else directory
        if not path.exists():
            raise DataError(f"{path}: no prepared dataset here (run `grounding data prepare` first)")
        if not refs:
            try:
                return cls._load_images(path)
            except _NotLineLayout:  # an older or hand-made file: read it whole, keep the images
                pass
        with _reading(path):
            head, images, ref_iter = read_records(path)
            refs_read = list(ref_iter)  # sets head["source"] when streamed
            ds = cls._from_doc({**head, "images": images, "refs": refs_read}, path)
            fingerprint = ds.fingerprint()
        _check_fingerprint(path, head, fingerprint)
        return ds if refs else ds._images_only(fingerprint)

    @classmethod
    def _load_images(cls, path: Path) -> "CanonicalDataset":
        """:meth:`load` with ``refs=False`` on a file in :data:`LINE_LAYOUT` (else :class:`_NotLineLayout`)."""
        with _reading(path):
            head, images, raw_refs = read_records(path, line_layout_only=True, image_fn=_image_record)
            ids = [im.image_id for im in images]
            if any(a >= b for a, b in zip(ids, ids[1:])):
                raise _NotLineLayout  # unsorted or duplicated: the full reader says which
            known = set(ids)

            def checked_refs() -> Iterator[RefRecord]:
                last = ""
                for raw in raw_refs:
                    r = _ref_record(raw)
                    if r.ref_id <= last:
                        raise _NotLineLayout
                    if r.image_id not in known:
                        raise DataError(f"ref {r.ref_id} points at unknown image {r.image_id!r}")
                    last = r.ref_id
                    yield r

            fingerprint = _fingerprint_of(images, checked_refs())
            name, root, source, errors = _meta(head, path)
            ds = cls.__new__(cls)  # not __init__: it would sort and check refs it must not hold
            ds.name, ds.image_root, ds.images, ds.source, ds.errors = name, root, images, source, errors
        _check_fingerprint(path, head, fingerprint)
        return ds._images_only(fingerprint)

    def _images_only(self, fingerprint: str) -> "CanonicalDataset":
        """This dataset without its sentences, remembering the (checked) fingerprint of the whole."""
        self.refs = _RefsNotLoaded(self.name)  # type: ignore[assignment]
        self._fingerprint = fingerprint
        return self

    @classmethod
    def _from_doc(cls, doc: dict[str, Any], path: Path) -> "CanonicalDataset":
        """The dataset of a parsed ``dataset.json``; raises KeyError/TypeError/ValueError on bad structure."""
        name, root, source, errors = _meta(doc, path)
        return cls(name, root, [_image_record(im) for im in doc["images"]], [_ref_record(r) for r in doc["refs"]],
                   source, errors)
