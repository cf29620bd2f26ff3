"""Render one shard-set row over its image: boxes (labelled), heat maps, the sentence as title.

Any float field whose rows are ``(4,)`` or ``(K, 4)`` is drawn as xyxy boxes in original pixels; any
float field whose rows are 2-D ``(h, w)`` is drawn as a heat map upsampled to the image; for sentence
rows the sentence is the title and its GT box (when the dataset has one) is drawn in green; for image
rows of a teacher the image's GT boxes are drawn in green (labelled inside, teacher labels above).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from grounding.data.images import load_rgb
from grounding.data.schema import CanonicalDataset
from grounding.shards.manifest import ShardError
from grounding.shards.reader import ShardSet

PALETTE = [(255, 64, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220), (255, 128, 0)]
GT_COLOUR = (0, 200, 0)


@dataclass(frozen=True)
class RenderTarget:
    """What a row refers to: its image and, for sentence rows, the sentence and its GT box."""

    image_id: str
    title: str
    gt_box: tuple[float, float, float, float] | None


def dataset_of(shards: ShardSet, override: str | Path | None = None) -> CanonicalDataset:
    """The canonical dataset a shard set was computed from (``extra.dataset_dir``, relative to the set)."""
    if override is not None:
        return CanonicalDataset.load(override)
    rel = shards.manifest.extra.get("dataset_dir")
    if rel is None:
        raise ShardError(f"{shards.path}: manifest names no dataset_dir; pass --dataset")
    return CanonicalDataset.load((shards.path / rel).resolve())


def target_of(shards: ShardSet, ds: CanonicalDataset, key: str) -> RenderTarget:
    """Resolve a row key to its image (image/region rows are keyed by image id, sentence rows by ref id)."""
    level = shards.manifest.level
    if level in ("image", "region"):
        if key not in ds.image_index:
            raise KeyError(f"image {key!r} is not in dataset {ds.name}")
        return RenderTarget(key, f"{shards.manifest.stage} · image {key}", None)
    if level == "sentence":
        ref = next((r for r in ds.refs if r.ref_id == key), None)
        if ref is None:
            raise KeyError(f"sentence {key!r} is not in dataset {ds.name}")
        return RenderTarget(ref.image_id, f'"{ref.text}"', ref.box)
    raise ShardError(f"{level}-level rows have no image to render")


def heat_overlay(img: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a 2-D map (min-max normalised, bilinearly upsampled) over ``img`` in a red-yellow ramp."""
    h = heat.astype(np.float32)
    h = (h - h.min()) / (h.max() - h.min()) if h.max() > h.min() else np.zeros_like(h)
    up = np.asarray(Image.fromarray(h).resize(img.size, Image.BILINEAR), dtype=np.float32)
    colour = np.stack([np.ones_like(up), up, np.zeros_like(up)], axis=-1) * 255.0
    base = np.asarray(img, dtype=np.float32)
    a = (alpha * up)[..., None]
    return Image.fromarray(np.clip(base * (1 - a) + colour * a, 0, 255).astype(np.uint8))


def _label_for(row: dict[str, np.ndarray], classes: list[str], i: int) -> str:
    parts = []
    labels, scores = row.get("labels"), row.get("scores")
    if labels is not None and labels.ndim == 1 and i < len(labels):
        li = int(labels[i])
        parts.append(classes[li] if 0 <= li < len(classes) else str(li))
    if scores is not None and scores.ndim == 1 and i < len(scores):
        parts.append(f"{float(scores[i]):.2f}")
    return " ".join(parts)


def render_row(shard_dir: str | Path, key: str, out: str | Path, *, dataset: str | Path | None = None,
               max_boxes: int = 50) -> Path:
    """Draw row ``key`` of the shard set at ``shard_dir`` over its image and save a PNG to ``out``."""
    shards = ShardSet(shard_dir)
    return render_loaded(shards, dataset_of(shards, dataset), key, out, max_boxes=max_boxes)


def render_loaded(shards: ShardSet, ds: CanonicalDataset, key: str, out: str | Path, *, max_boxes: int = 50,
                  caption: str | None = None) -> Path:
    """:func:`render_row` on an open shard set and its loaded dataset (many rows: load both once).
    ``caption`` (e.g. the row's IoU) is appended to the title."""
    img, title, legend = draw_row(shards, ds, key, max_boxes=max_boxes)
    return _with_title(img, f"{title} · {caption}" if caption else title, legend, out)


def gt_boxes_of_image(ds: CanonicalDataset, image_id: str) -> list[tuple[tuple[float, float, float, float], str]]:
    """Distinct GT boxes (xyxy, original pixels) of an image with their category ('' when none), sorted."""
    found: dict[tuple[float, float, float, float], str] = {}
    for r in ds.refs:
        if r.image_id == image_id and r.box is not None:
            found.setdefault(tuple(float(v) for v in r.box), r.category or "")
    return sorted(found.items())


def _outline(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    """PIL's inclusive rectangle of box xyxy (original pixels); a box under a pixel wide or high (an
    under-trained teacher's, or a reversed one) is drawn as a line or a point, never refused."""
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    return [x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)]


def draw_row(shards: ShardSet, ds: CanonicalDataset, key: str, *, max_boxes: int = 50
             ) -> tuple[Image.Image, str, list[tuple[str, tuple[int, int, int]]]]:
    """The row's image with heat maps and labelled boxes drawn, its title and legend ``[(name, rgb)]``.
    Teacher labels sit on tabs above a box's top-left corner, GT labels inside its bottom-left corner."""
    row = shards.get(key)
    target = target_of(shards, ds, key)
    img = load_rgb(ds.image_root, ds.image_index[target.image_id])
    for name, spec in shards.fields.items():
        if spec.np_dtype.kind == "f" and not spec.ragged and len(spec.shape) == 2:
            img = heat_overlay(img, row[name])
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    classes = list(shards.manifest.extra.get("classes", []))
    legend: list[tuple[str, tuple[int, int, int]]] = []
    gt = [(target.gt_box, "")] if target.gt_box is not None else []
    if shards.manifest.level in ("image", "region") and shards.manifest.teacher.get("name") != "ground-truth":
        gt = gt_boxes_of_image(ds, target.image_id)
    for box, text in gt:  # GT first, so the teacher's boxes stay on top
        x1, y1, x2, y2 = box
        draw.rectangle(_outline(x1, y1, x2, y2), outline=GT_COLOUR, width=2)
        if text:
            bbox = draw.textbbox((x1 + 3, y2 - 13), text, font=font)
            draw.rectangle([bbox[0] - 1, bbox[1] - 1, bbox[2] + 1, bbox[3] + 1], fill=GT_COLOUR)
            draw.text((x1 + 3, y2 - 13), text, fill=(0, 0, 0), font=font)
    if gt:
        legend.append(("GT", GT_COLOUR))
    colour_i = 0
    for name, spec in shards.fields.items():
        if spec.np_dtype.kind != "f" or spec.shape != (4,):
            continue
        colour = PALETTE[colour_i % len(PALETTE)]
        colour_i += 1
        legend.append((name, colour))
        boxes = row[name].reshape(-1, 4)[:max_boxes]
        for i, b in enumerate(boxes):
            x1, y1, x2, y2 = (float(v) for v in b)
            draw.rectangle(_outline(x1, y1, x2, y2), outline=colour, width=2)
            text = _label_for(row, classes, i)
            if text:  # label on a filled tab so it stays readable over any background
                tx, ty = x1, max(0.0, y1 - 11)
                bbox = draw.textbbox((tx + 2, ty), text, font=font)
                draw.rectangle([bbox[0] - 2, bbox[1] - 1, bbox[2] + 2, bbox[3] + 1], fill=colour)
                draw.text((tx + 2, ty), text, fill=(0, 0, 0), font=font)
    return img, target.title, legend


def _with_title(img: Image.Image, title: str, legend: list[tuple[str, tuple[int, int, int]]],
                out: str | Path) -> Path:
    font = ImageFont.load_default()
    bar = 34
    canvas = Image.new("RGB", (max(img.width, 320), img.height + bar), (255, 255, 255))
    canvas.paste(img, (0, bar))
    d = ImageDraw.Draw(canvas)
    d.text((4, 3), title[:120], fill=(0, 0, 0), font=font)
    x = 4
    for name, colour in legend:
        d.rectangle([x, 20, x + 10, 30], fill=colour)
        d.text((x + 14, 19), name, fill=(0, 0, 0), font=font)
        x += 24 + 7 * len(name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jpeg = out.suffix.lower() in (".jpg", ".jpeg")  # JPEG encodes ~10x faster than PNG (report galleries)
    canvas.save(out, format="JPEG" if jpeg else "PNG", **({"quality": 88} if jpeg else {}))
    return out
