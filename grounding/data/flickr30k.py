"""Flickr30k Entities (BryanPlummer/flickr30k_entities) for phrase grounding.

On disk::

    <root>/Sentences/<image_id>.txt     five captions, phrases marked ``[/EN#<entity id>/<type>[/<type>...] words]``
    <root>/Annotations/<image_id>.xml   PASCAL-like: <size><width/><height/>, <object> with one or more
                                        <name>entity id</name> and either <bndbox><xmin/>..</bndbox> or
                                        <nobndbox>/<scene> flags
    <root>/train.txt | val.txt | test.txt   image ids, one per line
    <image_root>/<image_id>.jpg

Conventions (chosen, and recorded in the dataset's ``source``):

* XML box values are 1-based and inclusive; like the official ``flickr30k_entities_utils.get_annotations`` we
  subtract 1 from all four (``[xmin-1, ymin-1, xmax-1, ymax-1]``). MDETR keeps the raw values, so readers
  differ by 1 px; we follow the dataset authors.
* An ``<object>`` with several ``<name>`` ids gives its box to every one of them (old versions of the utils read
  only the first name and lost those boxes).
* An entity with several boxes is grounded to the union of its boxes (the usual phrase-grounding protocol).
* One RefRecord per phrase occurrence: ``ref_id = f"{image_id}:{sentence index}:{phrase index}"`` (0-based;
  sentence index over non-empty lines, phrase index over all phrases of the sentence, boxed or not, so ids do
  not shift), text = the phrase, category = its first entity type.
* Phrases without a box (entity ``0``/``notvisual``, ``<nobndbox>``/``<scene>`` only, or no object at all) are
  not grounding refs and not errors: they are counted in ``source["skipped_no_box"]``.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from grounding.data.reader_common import ImageRequest, add_images, file_provenance
from grounding.data.builder import DatasetBuilder
from grounding.data.schema import CanonicalDataset, DataError, OnError

FLICKR30K_SPLITS = ("train", "val", "test")
_PLAIN_ID = re.compile(r"(?!\.\.?$)[\w.-]+")  # an image id names Sentences/<id>.txt etc.: no path parts

_PHRASE = re.compile(r"\[/EN#(?P<id>[^/\s\]]+)(?P<types>(?:/[^/\s\]]+)*)\s+(?P<words>[^\[\]]*?)\]")


@dataclass(frozen=True)
class Phrase:
    """A marked phrase: entity id (``"0"`` for notvisual), its types, the phrase text."""

    entity: str
    types: tuple[str, ...]
    text: str


@dataclass
class FlickrAnnotation:
    """An Annotations/*.xml file: image size, boxes per entity id (0-based xyxy), flagged entity ids."""

    width: int
    height: int
    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    nobox: set[str] = field(default_factory=set)
    scene: set[str] = field(default_factory=set)


def parse_sentence(line: str) -> list[Phrase]:
    """The marked phrases of one caption line, in order; ``ValueError`` on unbalanced markup."""
    phrases = [Phrase(m["id"], tuple(t for t in m["types"].split("/") if t), " ".join(m["words"].split()))
               for m in _PHRASE.finditer(line)]
    rest = _PHRASE.sub("", line)
    if "[/EN#" in rest or "[" in rest or "]" in rest:
        raise ValueError(f"malformed phrase markup in {line.strip()!r}")
    return phrases


def _number(obj: ET.Element, tag: str) -> float:
    el = obj.find(tag)
    if el is None or el.text is None:
        raise ValueError(f"<{tag}> is missing")
    try:
        return float(el.text.strip())
    except ValueError:
        raise ValueError(f"<{tag}> {el.text!r} is not a number") from None


def parse_annotation(path: Path) -> FlickrAnnotation:
    """Parse an Annotations/*.xml file; boxes become 0-based ``[xmin-1, ymin-1, xmax-1, ymax-1]``."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"not valid XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise ValueError("<size> is missing")
    w, h = _number(size, "width"), _number(size, "height")
    if not (math.isfinite(w) and math.isfinite(h) and w == int(w) and h == int(h) and w > 0 and h > 0):
        raise ValueError(f"<size> {w:g}x{h:g} is not a positive integer size")
    ann = FlickrAnnotation(int(w), int(h))
    for obj in root.findall("object"):
        names = [n.text.strip() for n in obj.findall("name") if n.text and n.text.strip()]
        bnd = obj.find("bndbox")
        if bnd is not None:
            box = tuple(_number(bnd, t) - 1.0 for t in ("xmin", "ymin", "xmax", "ymax"))
            for n in names:
                ann.boxes.setdefault(n, []).append(box)  # type: ignore[arg-type]
            continue
        for flag, bucket in (("nobndbox", ann.nobox), ("scene", ann.scene)):
            el = obj.find(flag)
            if el is not None and el.text and el.text.strip() not in ("", "0"):
                bucket.update(names)
    return ann


def union_box(boxes: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    """The smallest xyxy box containing all ``boxes``."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: split file is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def read_flickr30k(root: str | os.PathLike[str], image_root: str | os.PathLike[str], *,
                   splits: Iterable[str] = FLICKR30K_SPLITS, name: str | None = None,
                   on_error: OnError = "fail") -> CanonicalDataset:
    """Read Flickr30k Entities phrases with boxes (see the module docstring for every convention)."""
    root = Path(root)
    splits = tuple(splits)
    split_files = {s: root / f"{s}.txt" for s in splits}
    builder = DatasetBuilder(name or "flickr30k", image_root, on_error=on_error)
    split_of: dict[str, str] = {}
    for split, path in split_files.items():
        for image_id in _read_ids(path):
            if not _PLAIN_ID.fullmatch(image_id):
                builder.fail(f"image {image_id}", path, "image id is not a plain file name (letters, digits, "
                                                        "'_', '-', '.'; not '.' or '..'); refused")
                continue
            if image_id in split_of:
                builder.fail(f"image {image_id}", path, f"already listed in split {split_of[image_id]!r}")
                continue
            split_of[image_id] = split

    requests: list[ImageRequest] = []
    parsed: list[tuple[str, str, FlickrAnnotation, Path, list[str]]] = []
    for image_id, split in split_of.items():
        xml_path = root / "Annotations" / f"{image_id}.xml"
        txt_path = root / "Sentences" / f"{image_id}.txt"
        if not xml_path.is_file():
            builder.fail(f"image {image_id}", xml_path, "annotation file is missing")
            continue
        if not txt_path.is_file():
            builder.fail(f"image {image_id}", txt_path, "sentence file is missing")
            continue
        try:
            ann = parse_annotation(xml_path)
        except ValueError as e:
            builder.fail(f"image {image_id}", xml_path, str(e))
            continue
        try:
            with open(txt_path, encoding="utf-8") as f:
                lines = [ln for ln in f.read().split("\n") if ln.strip()]
        except UnicodeDecodeError as e:
            builder.fail(f"image {image_id}", txt_path, f"not UTF-8 text ({e})")
            continue
        requests.append(ImageRequest(image_id, f"{image_id}.jpg", (ann.width, ann.height), str(xml_path)))
        parsed.append((image_id, split, ann, txt_path, lines))

    add_images(builder, requests)

    skipped = {"notvisual": 0, "nobox_or_scene": 0, "no_object": 0}
    for image_id, split, ann, txt_path, lines in parsed:
        for s, line in enumerate(lines):
            try:
                phrases = parse_sentence(line)
            except ValueError as e:
                builder.fail(f"sentence {image_id}:{s}", txt_path, str(e))
                continue
            for p, ph in enumerate(phrases):
                boxes = ann.boxes.get(ph.entity)
                if ph.entity == "0" or "notvisual" in ph.types:
                    skipped["notvisual"] += 1
                elif not boxes:
                    skipped["nobox_or_scene" if ph.entity in ann.nobox | ann.scene else "no_object"] += 1
                else:
                    builder.add_ref(ref_id=f"{image_id}:{s}:{p}", image_id=image_id, text=ph.text, split=split,
                                    box=union_box(boxes), box_format="xyxy",
                                    category=ph.types[0] if ph.types else None, file=txt_path)

    return builder.build(source={
        "format": "flickr30k_entities",
        "files": [file_provenance(p) for p in split_files.values()],
        "options": {"splits": list(splits), "on_error": on_error},
        "skipped_no_box": sum(skipped.values()),
        "skipped_no_box_by_reason": skipped,
        "conventions": {"ref_id": "{image_id}:{sentence index}:{phrase index}",
                        "box": "XML 1-based inclusive values minus 1 on all four (official utils); "
                               "union of the entity's boxes; multi-name objects box every name",
                        "category": "first entity type", "image_path": "{image_id}.jpg"},
    })
