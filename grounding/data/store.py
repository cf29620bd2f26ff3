"""``dataset.json`` on disk, streamed: the one-record-per-line layout, reading records without holding the
sentences, the fingerprint and canonical JSON (the store behind :class:`grounding.data.schema.CanonicalDataset`)."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from grounding.data.records import FORMAT_VERSION, DataError, ImageRecord, RefRecord


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
