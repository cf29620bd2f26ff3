"""The canonical dataset: image and sentence records, validation, fingerprint, (de)serialisation.

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

import hashlib
import json
import math
import os
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np

from grounding import boxes as B

FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
ORIENTATIONS = ("none", "raw", "exif")
OnError = Literal["fail", "skip"]


class DataError(ValueError):
    """A problem with user data: names the file (or id) and the problem."""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image: ``width``/``height`` in pixels after the recorded ``orientation`` is applied."""

    image_id: str
    path: str
    width: int
    height: int
    sha256: str
    orientation: str = "none"

    def __post_init__(self) -> None:
        if not self.image_id:
            raise DataError("image record with an empty image_id")
        for name in ("image_id", "path"):
            why = unicode_problem(getattr(self, name))
            if why:
                raise DataError(f"image {printable(self.image_id)}: {name} {why}")
        if self.width <= 0 or self.height <= 0:
            raise DataError(f"image {self.image_id}: non-positive size {self.width}x{self.height}")
        if self.orientation not in ORIENTATIONS:
            raise DataError(f"image {self.image_id}: orientation {self.orientation!r} not in {ORIENTATIONS}")
        check_relative_path(self.path, what=f"image {self.image_id}")


@dataclass(frozen=True, slots=True)
class RefRecord:
    """One referring sentence or phrase; ``box`` float32 xyxy original pixels or ``None``."""

    ref_id: str
    image_id: str
    text: str
    split: str
    box: tuple[float, float, float, float] | None = None
    category: str | None = None
    mask: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.ref_id:
            raise DataError(f"sentence of image {self.image_id} has an empty ref_id")
        for name in ("ref_id", "image_id", "text", "split", "category"):
            value = getattr(self, name)
            why = unicode_problem(value) if isinstance(value, str) else None
            if why:
                raise DataError(f"ref {printable(self.ref_id)}: {name} {why}")
        if not self.split:
            raise DataError(f"ref {self.ref_id}: empty split")


def unicode_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as UTF-8 (a lone surrogate, e.g. from a JSON ``"\\ud800"`` escape or
    bytes decoded with ``surrogateescape``), or None when it can."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"is not valid Unicode (lone surrogate U+{ord(value[e.start]):04X} at character {e.start}); "
                f"fix the text in the source file")
    return None


def printable(value: object) -> str:
    """``str(value)`` made storable as UTF-8 (lone surrogates written as ``\\udXXX``): for error records."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def normalize_text(text: str) -> str:
    """NFC-normalise, collapse whitespace. Non-ASCII is kept (it is the user's text)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def float32_box(box: Iterable[float]) -> tuple[float, float, float, float]:
    """Round a box to float32 values (as stored everywhere) and return them as a Python tuple."""
    arr = B.as_boxes(list(box))[0]
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


def check_relative_path(path: str, *, what: str = "path") -> str:
    """Refuse absolute paths and paths that escape the root (``..``); returns the path unchanged."""
    p = PurePosixPath(path.replace("\\", "/"))
    if not path or p.is_absolute() or ".." in p.parts or (len(path) > 1 and path[1] == ":"):
        raise DataError(f"{what}: path {path!r} is absolute or escapes the image root; refused")
    return path


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


# ---- dataset.json, streamed ----------------------------------------------------------------------------
#: How :meth:`CanonicalDataset.save` lays out ``dataset.json``: still one JSON document with keys in
#: canonical (sorted) order, but every image and every sentence on its own line, so readers can stream it::
#:
#:     {"errors":[...],"fingerprint":"...","format_version":1,"image_root":"images",
#:     "images":[
#:     {...first image...}
#:     ,{...next image...}
#:     ],
#:     "name":"synthetic",
#:     "refs":[
#:     {...first sentence...}
#:     ,{...}
#:     ],
#:     "source":{...}}
LINE_LAYOUT = "one record per line (see CanonicalDataset.save)"


class _NotLineLayout(Exception):
    """``dataset.json`` is not laid out as :data:`LINE_LAYOUT` says (older or hand-made): read it whole."""


class _RefsNotLoaded(list):
    """``refs`` of a dataset loaded with ``refs=False``: any read raises a :class:`DataError` saying so."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def _refuse(self, *_: Any) -> Any:
        raise DataError(f"dataset {self.name} was loaded without its sentences "
                        f"(CanonicalDataset.load(..., refs=False)); load it with refs=True to read them")

    __iter__ = __len__ = __getitem__ = __contains__ = __reversed__ = _refuse  # type: ignore[assignment]


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what a damaged ``dataset.json`` raises into a :class:`DataError` naming the file."""
    try:
        yield
    except DataError as e:
        raise (e if str(e).startswith(str(path)) else DataError(f"{path}: {e}")) from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: malformed prepared dataset ({type(e).__name__}: {e})") from None


def _meta(doc: dict[str, Any], path: Path) -> tuple[str, Path, dict[str, Any], list[Any]]:
    """``(name, image_root, source, errors)`` of a parsed ``dataset.json`` head (TypeError on bad types)."""
    source, errors = doc.get("source", {}), doc.get("errors", [])
    if not isinstance(source, dict) or not isinstance(errors, list):
        raise TypeError("'source' is not an object or 'errors' is not a list")
    return _text(doc["name"], "name"), _image_root(doc, path), source, errors


def _unreadable(path: Path, e: Exception) -> DataError:
    return DataError(f"{path}: not a readable prepared dataset ({type(e).__name__}: {e}); prepare it again")


def _record(line: str) -> Any:
    """One record line of :data:`LINE_LAYOUT` (every record but the first starts with the comma)."""
    return json.loads(line[1:] if line.startswith(",") else line)


def _check_fingerprint(path: Path, head: dict[str, Any], fingerprint: str) -> None:
    if fingerprint != head.get("fingerprint"):
        raise DataError(f"{path}: fingerprint mismatch (file edited or corrupted)")


def _write_records(f: Any, key: str, records: Iterable[Any]) -> None:
    f.write(f'"{key}":[\n')
    for i, rec in enumerate(records):
        f.write(("," if i else "") + canonical_json(_fields_of(rec)) + "\n")
    f.write("],\n")


def read_records(path: str | os.PathLike[str], *, line_layout_only: bool = False,
                 image_fn: Callable[[dict[str, Any]], Any] = lambda raw: raw,
                 ) -> tuple[dict[str, Any], list[Any], Iterator[dict[str, Any]]]:
    """``(head, images, refs)`` of a ``dataset.json`` as stored (plain dicts, not validated): ``head`` holds
    the top-level members but the two lists (``source`` is added once ``refs`` is exhausted when the file
    is streamed), ``images`` the list of ``image_fn(raw image dict)`` (made as each is read, so the raw
    dicts need not all be held), ``refs`` an iterator read line by line for a file in :data:`LINE_LAYOUT`
    (memory independent of the number of sentences), else from the whole document (``line_layout_only=True``:
    raise :class:`_NotLineLayout` instead). Raises :class:`DataError` for a file that is not a grounding
    dataset or is newer than this code."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8", newline="\n")
        with f:
            first = f.readline()
            if first.startswith("{") and first.endswith(",\n") and f.readline() == '"images":[\n':
                head = json.loads(first[:-2] + "}")
                _check_version(head, path)
                images = []
                while (line := f.readline()) != "],\n":  # readline, not iteration: f.tell() below
                    if not line:
                        raise _NotLineLayout
                    images.append(image_fn(_record(line)))
                name_line = f.readline()
                if not name_line.endswith(",\n") or f.readline() != '"refs":[\n':
                    raise _NotLineLayout
                head.update(json.loads("{" + name_line[:-2] + "}"))
                body_at = f.tell()
                return head, images, _stream_refs(path, body_at, head)
        if line_layout_only:
            raise _NotLineLayout
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    _check_version(doc, path)
    images, refs = doc.pop("images", None), doc.pop("refs", None)
    for key, items in (("images", images), ("refs", refs)):
        if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
            raise DataError(f"{path}: malformed prepared dataset ({key!r} is not a list of objects)")
    return doc, [image_fn(im) for im in images], iter(refs)  # type: ignore[union-attr,arg-type]


def read_source(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``source`` member of a ``dataset.json`` (provenance, e.g. the synthetic prepare key) without
    reading the records: the last line of a :data:`LINE_LAYOUT` file, else the whole document."""
    path = Path(path)
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - (1 << 16)))
        tail = f.read().decode("utf-8", errors="replace").rstrip("\n").rsplit("\n", 1)[-1]
    try:
        if tail.startswith('"source":{'):
            source = json.loads("{" + tail)["source"]
        else:
            head, _, refs = read_records(path)
            for _ in refs:  # a streamed file sets head["source"] once its sentences are read
                pass
            source = head.get("source", {})
    except json.JSONDecodeError as e:
        raise _unreadable(path, e) from None
    if not isinstance(source, dict):
        raise DataError(f"{path}: 'source' is not an object")
    return source


def _stream_refs(path: Path, offset: int, head: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The sentence records of a :data:`LINE_LAYOUT` file from ``offset``; sets ``head["source"]`` at the end."""
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            f.seek(offset)
            for line in f:
                if line == "],\n":
                    break
                yield _record(line)
            else:
                raise DataError(f"{path}: truncated prepared dataset (no end of 'refs'); prepare it again")
            last = f.readline()
            if not last.startswith('"source":') or f.read(1):
                raise DataError(f"{path}: malformed prepared dataset (unexpected content after 'refs')")
            head.update(json.loads("{" + last))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from None


def _check_version(doc: dict[str, Any], path: Path) -> None:
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise DataError(f"{path}: no integer format_version; not a grounding prepared dataset")
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: dataset format version {version!r} is newer than this grounding "
            f"(supports <= {FORMAT_VERSION}); upgrade grounding"
        )
    if version < 1:
        raise DataError(f"{path}: unknown dataset format version {version!r} (supported: 1..{FORMAT_VERSION})")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} is {type(value).__name__}, not a string")
    return value


def _number(value: Any, what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} is {type(value).__name__}, not a number")
    return value


def _image_root(doc: dict[str, Any], path: Path) -> Path:
    root = Path(_text(doc["image_root"], "image_root"))
    return root if root.is_absolute() else path.parent / root


def _image_record(im: Any) -> ImageRecord:
    """An :class:`ImageRecord` from its stored dict (TypeError/ValueError on a bad one)."""
    if not isinstance(im, dict):
        raise TypeError("image record is not an object")
    for k in ("image_id", "path", "sha256", "orientation"):
        _text(im.get(k), f"image {k}")
    for k in ("width", "height"):
        if isinstance(im.get(k), bool) or not isinstance(im.get(k), int):
            raise TypeError(f"image {k} is not an integer")
    return ImageRecord(**im)


def _ref_record(r: Any) -> RefRecord:
    """A :class:`RefRecord` from its stored dict (TypeError/ValueError on a bad one)."""
    if not isinstance(r, dict):
        raise TypeError("ref record is not an object")
    for k in ("ref_id", "image_id", "text", "split"):
        _text(r.get(k), f"ref {k}")
    box = r.get("box")
    if box is not None:
        if not isinstance(box, list) or len(box) != 4:
            raise TypeError(f"ref {r['ref_id']}: box is not a list of 4 numbers")
        box = tuple(_number(v, "box value") for v in box)
    return RefRecord(**{**r, "box": box})


def _fingerprint_of(images: Iterable[ImageRecord], refs: Iterable[RefRecord]) -> str:
    """sha256 over the canonical JSON of images then refs, each already in id order."""
    h = hashlib.sha256()
    h.update(f"grounding-dataset-v{FORMAT_VERSION}\n".encode())
    for im in images:
        h.update(canonical_json(_fields_of(im)).encode() + b"\n")
    h.update(b"--refs--\n")
    for r in refs:
        h.update(canonical_json(_fields_of(r)).encode() + b"\n")
    return h.hexdigest()


def _fields_of(record: Any) -> dict[str, Any]:
    """A record's fields as a shallow dict: the same JSON as ``dataclasses.asdict`` for our flat, frozen
    records, without deep-copying masks (the fingerprint of a large dataset was dominated by that copy)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


def canonical_json(obj: Any, indent: int | None = None) -> str:
    """JSON with sorted keys, no NaN, compact separators: the serialisation every hash is taken over."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=indent,
                      separators=(",", ":") if indent is None else None)


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
