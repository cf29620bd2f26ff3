"""The synthetic grounding world: the embedded default dataset and the project's correctness oracle.

Each image is a textured background with (by default) 2..5 non-overlapping coloured shapes, each drawn through
its own binary mask, so every ground-truth box (the mask's tight box) and mask is exact. Every sentence refers
to exactly one object: it is built from predicates (noun, colour, absolute size, superlative size, extreme
position, spatial relation to a landmark object), and it is kept only when it is true of its target and of no
other object under a deliberately *loose* reading of every predicate (see :func:`describes_uniquely`).

Determinism: image ``i`` is drawn from its own ``numpy`` generator seeded by ``SeedSequence([seed, i])`` and
its split comes from a golden-ratio sequence, so image ``i`` (pixels, objects, sentences, split) does not depend
on how many images precede or follow it, and :func:`iter_synthetic` streams any number of images in constant
memory. JPEG files are written with fixed encoder settings and no EXIF, so two runs give identical bytes with the
same Pillow/libjpeg build (the sha256 in each :class:`~grounding.data.schema.ImageRecord`, hence the dataset
fingerprint, is taken over those bytes).

Nouns: a sentence names its target either by the class name or by another English noun taken from
:data:`NOUNS`: WordNet 3.0 synonyms, hyponyms and hypernyms of the class (checked against the WordNet 3.0
database files) plus a few nouns WordNet does not link to the class, so a WordNet soft-label stage has real
work, hits and misses both. :class:`RefRecord.category` is always the class name; which noun and relation a
sentence used is kept only in :class:`SyntheticRef`.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from grounding.data.builder import DatasetBuilder
from grounding.data.schema import CanonicalDataset, ImageRecord, float32_box

# Bump whenever a change alters pixels, objects, sentences or splits for a given config.
GENERATOR_VERSION = "1"

# ---- the world -----------------------------------------------------------------------------------------

#: Detector class vocabulary of the synthetic world (each a WordNet 3.0 noun with a shape sense).
CLASSES: tuple[str, ...] = (
    "circle", "ellipse", "square", "rhombus", "triangle", "hexagon", "star", "cross", "ring", "heart",
)

#: Nominal RGB of each colour name (objects get a small per-object jitter around it).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (245, 215, 35),
    "purple": (135, 50, 175),
    "orange": (250, 135, 20),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
#: Colour vocabulary.
COLOUR_NAMES: tuple[str, ...] = tuple(COLOUR_RGB)
COLOURS = COLOUR_NAMES

SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB")

#: Size categories: the tight box's longer side as a fraction of the image's shorter side. The gaps between
#: the ranges keep "small" and "large" visually unmistakable.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.11, 0.16),
    "medium": (0.20, 0.26),
    "large": (0.31, 0.40),
}
_SIZE_PROBS = (0.35, 0.40, 0.25)
_OPPOSITE_SIZE = {"small": "large", "large": "small"}


class Noun(NamedTuple):
    """One row of :data:`NOUNS`: ``noun`` may name an object of class ``cls``; ``relation`` is the WordNet
    3.0 relation of the noun's synset to the class synset (``exact`` | ``synonym`` | ``hyponym`` |
    ``hypernym`` | ``none``: WordNet has no path, a plain-English near-synonym); ``wordnet`` says which."""

    noun: str
    cls: str
    relation: str
    wordnet: str


#: (noun, class, relation, WordNet 3.0 evidence). Synsets named ``word.n.k`` (k = sense rank); a noun whose
#: first sense is not the shape sense is a deliberate hard case for a first-sense WordNet matcher.
NOUNS: tuple[Noun, ...] = (
    # circle (circle.n.01 -> ellipse.n.01 -> conic_section -> plane_figure -> figure -> shape.n.02)
    Noun("circle", "circle", "exact", "circle.n.01"),
    Noun("circlet", "circle", "hyponym", "circlet.n.01 'a small circle' IS-A circle.n.01 (small circles only)"),
    Noun("disk", "circle", "none", "disk.n.01 IS-A round_shape IS-A shape; no path to circle.n.01"),
    Noun("plane figure", "circle", "hypernym", "plane_figure.n.01, ancestor of circle.n.01"),
    Noun("shape", "circle", "hypernym", "shape.n.02, ancestor of circle.n.01"),
    # ellipse (ellipse.n.01 = {ellipse, oval})
    Noun("ellipse", "ellipse", "exact", "ellipse.n.01"),
    Noun("oval", "ellipse", "synonym", "oval is a lemma of ellipse.n.01 (its first sense)"),
    Noun("plane figure", "ellipse", "hypernym", "plane_figure.n.01, ancestor of ellipse.n.01"),
    Noun("shape", "ellipse", "hypernym", "shape.n.02, ancestor of ellipse.n.01"),
    # square (square.n.01 -> rectangle, regular_polygon -> parallelogram -> quadrilateral -> polygon)
    Noun("square", "square", "exact", "square.n.01"),
    Noun("rectangle", "square", "hypernym", "rectangle.n.01, direct hypernym of square.n.01"),
    Noun("regular polygon", "square", "hypernym", "regular_polygon.n.01, direct hypernym of square.n.01"),
    Noun("quadrilateral", "square", "hypernym", "quadrilateral.n.01, ancestor of square.n.01"),
    Noun("polygon", "square", "hypernym", "polygon.n.01, ancestor of square.n.01"),
    Noun("shape", "square", "hypernym", "shape.n.02, ancestor of square.n.01"),
    # rhombus (rhombus.n.01 = {rhombus, rhomb, diamond} -> parallelogram -> quadrilateral -> polygon)
    Noun("rhombus", "rhombus", "exact", "rhombus.n.01"),
    Noun("diamond", "rhombus", "synonym", "diamond is a lemma of rhombus.n.01 (sense 3; sense 1 is the gem)"),
    Noun("rhomb", "rhombus", "synonym", "rhomb is a lemma of rhombus.n.01"),
    Noun("parallelogram", "rhombus", "hypernym", "parallelogram.n.01, direct hypernym of rhombus.n.01"),
    Noun("quadrilateral", "rhombus", "hypernym", "quadrilateral.n.01, ancestor of rhombus.n.01"),
    Noun("polygon", "rhombus", "hypernym", "polygon.n.01, ancestor of rhombus.n.01"),
    # triangle (triangle.n.01 = {triangle, trigon, trilateral} -> polygon)
    Noun("triangle", "triangle", "exact", "triangle.n.01"),
    Noun("trigon", "triangle", "synonym", "trigon is a lemma of triangle.n.01"),
    Noun("equilateral triangle", "triangle", "hyponym",
         "equilateral_triangle.n.01 IS-A triangle.n.01 (all drawn triangles are equilateral)"),
    Noun("polygon", "triangle", "hypernym", "polygon.n.01, direct hypernym of triangle.n.01"),
    Noun("shape", "triangle", "hypernym", "shape.n.02, ancestor of triangle.n.01"),
    # hexagon (hexagon.n.01 -> polygon)
    Noun("hexagon", "hexagon", "exact", "hexagon.n.01"),
    Noun("regular hexagon", "hexagon", "hyponym", "regular_hexagon.n.01 IS-A hexagon.n.01 (all drawn are regular)"),
    Noun("polygon", "hexagon", "hypernym", "polygon.n.01, direct hypernym of hexagon.n.01"),
    # star (star.n.05 'a plane figure with 5 or more points'; star.n.01 is the celestial body)
    Noun("star", "star", "exact", "star.n.05"),
    Noun("pentagram", "star", "hyponym", "pentacle.n.01 = {pentacle, pentagram, pentangle} IS-A star.n.05"),
    Noun("pentacle", "star", "hyponym", "pentacle.n.01 IS-A star.n.05 (all drawn stars have 5 points)"),
    Noun("plane figure", "star", "hypernym", "plane_figure.n.01, direct hypernym of star.n.05"),
    # cross (cross.n.02 = {crisscross, cross, mark}; Cross.n.03 the emblem; cross.n.01 the wooden structure)
    Noun("cross", "cross", "exact", "cross.n.02 / Cross.n.03"),
    Noun("greek cross", "cross", "hyponym", "Greek_cross.n.01 'four arms the same length' IS-A Cross.n.03"),
    Noun("crisscross", "cross", "synonym", "crisscross is a lemma of cross.n.02 (its first sense)"),
    Noun("shape", "cross", "none", "no WordNet path from cross.n.02/Cross.n.03 to shape.n.02"),
    # ring (ring.n.02 = {ring, halo, annulus, doughnut, anchor_ring} -> toroid -> solid -> shape)
    Noun("ring", "ring", "exact", "ring.n.02 (ring.n.01 is a sound)"),
    Noun("annulus", "ring", "synonym", "annulus is a lemma of ring.n.02 (its first sense)"),
    Noun("doughnut", "ring", "synonym", "doughnut is a lemma of ring.n.02 (its first sense)"),
    Noun("shape", "ring", "hypernym", "shape.n.02, ancestor of ring.n.02"),
    # heart (heart.n.07 'a plane figure with rounded sides...'; heart.n.01 is the locus of feelings)
    Noun("heart", "heart", "exact", "heart.n.07"),
    Noun("plane figure", "heart", "hypernym", "plane_figure.n.01, direct hypernym of heart.n.07"),
    Noun("shape", "heart", "hypernym", "shape.n.02, ancestor of heart.n.07"),
)

#: Classes a noun is *generated* for (the noun is true of them).
NOUN_CLASSES: dict[str, frozenset[str]] = {}
for _row in NOUNS:
    NOUN_CLASSES[_row.noun] = NOUN_CLASSES.get(_row.noun, frozenset()) | {_row.cls}
del _row

#: Classes a reader might *also* take a noun to mean (human confusions and WordNet IS-A links such as
#: circle IS-A ellipse, square as a special rhombus). Uniqueness is checked against these too.
_LOOSE_EXTRA: dict[str, frozenset[str]] = {
    "circle": frozenset({"ring"}),
    "circlet": frozenset({"ring"}),
    "disk": frozenset({"ring"}),
    "ellipse": frozenset({"circle"}),
    "oval": frozenset({"circle"}),
    "rhombus": frozenset({"square"}),
    "diamond": frozenset({"square"}),
    "rhomb": frozenset({"square"}),
    "regular polygon": frozenset({"triangle", "hexagon", "rhombus"}),
    "rectangle": frozenset({"rhombus"}),
    "polygon": frozenset({"star", "cross"}),
    "plane figure": frozenset(CLASSES),
    "shape": frozenset(CLASSES),
}
NOUN_LOOSE: dict[str, frozenset[str]] = {
    n: cs | _LOOSE_EXTRA.get(n, frozenset()) for n, cs in NOUN_CLASSES.items()
}
#: Nouns that also assert a size category (a hyponym meaning "small X").
_NOUN_SIZE = {"circlet": "small"}

_CLASS_NOUNS: dict[str, tuple[Noun, ...]] = {c: tuple(r for r in NOUNS if r.cls == c) for c in CLASSES}

# ---- configuration -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic dataset; every field is part of its identity (``source.config``)."""

    n_images: int = 240
    seed: int = 0
    min_size: int = 240  # image sides vary independently in [min_size, max_size]
    max_size: int = 640
    min_objects: int = 2
    max_objects: int = 5
    sentences_per_object: int = 2
    split_fractions: tuple[float, float, float, float] = (0.7, 0.1, 0.1, 0.1)  # train, val, testA, testB
    noun_variation: float = 0.4  # probability that a sentence names its target by a noun other than the class
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        def _int(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"SyntheticConfig.{name} must be an integer, got {v!r}")
            if v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ValueError(f"SyntheticConfig.{name} must be {rng}, got {v}")
            object.__setattr__(self, name, int(v))  # plain int: the config is serialised to JSON

        _int("n_images", 1)
        _int("seed", 0)
        _int("min_size", 64, 8192)
        _int("max_size", 64, 8192)
        if self.min_size > self.max_size:
            raise ValueError(
                f"SyntheticConfig: min_size ({self.min_size}) must not exceed max_size ({self.max_size})"
            )
        _int("min_objects", 1, 12)
        _int("max_objects", 1, 12)
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"SyntheticConfig: min_objects ({self.min_objects}) must not exceed max_objects ({self.max_objects})"
            )
        _int("sentences_per_object", 1, 10)
        _int("jpeg_quality", 1, 100)
        fr = tuple(self.split_fractions)
        if len(fr) != len(SPLITS):
            raise ValueError(f"SyntheticConfig.split_fractions needs {len(SPLITS)} values {SPLITS}, got {fr}")
        if any((not isinstance(f, (int, float))) or not math.isfinite(f) or f < 0 for f in fr):
            raise ValueError(f"SyntheticConfig.split_fractions must be finite and >= 0, got {fr}")
        if abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"SyntheticConfig.split_fractions must sum to 1, got {fr} (sum {sum(fr):g})")
        object.__setattr__(self, "split_fractions", tuple(float(f) for f in fr))
        nv = self.noun_variation
        if not isinstance(nv, (int, float)) or not 0.0 <= nv <= 1.0:
            raise ValueError(f"SyntheticConfig.noun_variation must be in [0, 1], got {nv!r}")


# ---- records -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticObject:
    """One drawn shape: class, colour name and drawn RGB, size category, exact box and mask."""

    cls: str
    colour: str
    rgb: tuple[int, int, int]
    size: str  # "small" | "medium" | "large"
    box: tuple[float, float, float, float]  # float32 xyxy pixels: tight box of the mask (x2 = max col + 1)
    mask: dict[str, Any]  # COCO RLE {"size": [h, w], "counts": str}
    area: int  # mask pixels

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0


@dataclass(frozen=True)
class SyntheticRef:
    """Generator metadata of one sentence: its target object, the noun used and its WordNet relation, the
    kind of description (``noun`` | ``colour`` | ``size`` | ``superlative`` | ``extreme`` | ``relation``)
    and the landmark object of a relation."""

    text: str
    target: int
    noun: str
    noun_relation: str
    kind: str
    landmark: int | None = None


@dataclass(frozen=True)
class SyntheticImage:
    """One generated image with its objects and sentences (nothing touches the disk)."""

    index: int
    image_id: str
    split: str
    image: Image.Image
    objects: tuple[SyntheticObject, ...]
    refs: tuple[SyntheticRef, ...]
    background: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def image_id_of(index: int) -> str:
    return f"syn{index:06d}"


def index_of(image_id: str) -> int:
    """Inverse of :func:`image_id_of` (``ValueError`` for an id the generator does not make)."""
    if not (image_id.startswith("syn") and image_id[3:].isdigit()):
        raise ValueError(f"{image_id!r} is not a synthetic image id (syn + digits)")
    return int(image_id[3:])


# ---- randomness ----------------------------------------------------------------------------------------

_GOLDEN = 0.6180339887498949


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def split_of(cfg: SyntheticConfig, index: int) -> str:
    """Split of image ``index``: a seed-offset golden-ratio sequence mapped through the split fractions, so
    every prefix of the dataset has close to the requested fractions and no split depends on ``n_images``."""
    offset = float(np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 0x5B117])).random())
    u = (index * _GOLDEN + offset) % 1.0
    acc = 0.0
    for name, frac in zip(SPLITS, cfg.split_fractions):
        acc += frac
        if u < acc:
            return name
    return next(n for n, f in reversed(list(zip(SPLITS, cfg.split_fractions))) if f > 0)


# ---- drawing -------------------------------------------------------------------------------------------


def _muted_rgb(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.08, 0.35), rng.uniform(0.38, 0.68)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, str]:
    """A muted textured RGB background of size ``w x h`` and its kind."""
    kind = ("gradient", "stripes", "noise", "checker")[int(rng.integers(4))]
    c1, c2 = _muted_rgb(rng), _muted_rgb(rng)
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    theta = rng.uniform(0, 2 * math.pi)
    proj = xs * np.float32(math.cos(theta)) + ys * np.float32(math.sin(theta))
    if kind == "gradient":
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    elif kind == "stripes":
        period = rng.uniform(12, 60)
        amp = np.float32(0.5 * rng.uniform(0.4, 1.0))
        t = np.float32(0.5) + amp * np.sin(proj * np.float32(2 * math.pi / period))
    elif kind == "noise":
        gh, gw = int(rng.integers(3, 10)), int(rng.integers(3, 10))
        grid = (rng.random((gh, gw)) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(grid, "L").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    else:  # checker
        cell = rng.uniform(16, 64)
        t = (((xs // cell) + (ys // cell)) % 2) * np.float32(rng.uniform(0.3, 0.8))
    grain = rng.integers(0, 19, size=(h, w), dtype=np.uint8)  # luminance grain, -9..9 once offset
    # Blend through a 256-entry palette (t quantised to 8 bits) and add the grain, both in PIL's C code.
    levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    palette = np.clip(np.floor(c1[None, :] + (c2 - c1)[None, :] * levels + 0.5), 0, 255).astype(np.uint8)
    idx = np.clip(t * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8)
    img = Image.fromarray(idx, "L").convert("P")
    img.putpalette(palette.ravel().tobytes())
    g = Image.fromarray(grain, "L")
    return ImageChops.add(img.convert("RGB"), Image.merge("RGB", (g, g, g)), scale=1.0, offset=-9), kind


def _rot(points: np.ndarray, deg: float) -> np.ndarray:
    a = math.radians(deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return points @ r.T


def _regular(n: int, deg: float, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular n-gon (or n-pointed star with inner radius ``inner``) of circumradius 1."""
    k = 2 * n if inner is not None else n
    ang = np.arange(k) * (2 * math.pi / k) - math.pi / 2
    rad = np.ones(k) if inner is None else np.where(np.arange(k) % 2 == 0, 1.0, inner)
    return _rot(np.stack([np.cos(ang) * rad, np.sin(ang) * rad], axis=1), deg)


def _shape_mask(cls: str, extent: float, rng: np.random.Generator) -> np.ndarray:
    """Binary mask ``(h, w)`` bool of one shape, cropped to its tight box; longer side ~ ``extent`` px."""
    e = max(8.0, extent)
    pad = 2
    side = int(math.ceil(e)) + 2 * pad
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    lo, hi = pad, pad + e - 1

    def poly(points: np.ndarray) -> None:
        p = points - points.min(axis=0)
        p = p * ((e - 1) / max(float(p.max()), 1e-6)) + pad
        draw.polygon([(float(x), float(y)) for x, y in p], fill=255)

    if cls == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=255)
    elif cls == "ring":
        draw.ellipse([lo, lo, hi, hi], fill=255)
        t = e * rng.uniform(0.14, 0.22)
        draw.ellipse([lo + t, lo + t, hi - t, hi - t], fill=0)
    elif cls == "ellipse":
        ratio = rng.uniform(0.45, 0.62)
        ang = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        poly(_rot(np.stack([np.cos(ang), ratio * np.sin(ang)], axis=1), rng.uniform(0, 180)))
    elif cls == "square":
        draw.rectangle([lo, lo, hi, hi], fill=255)
    elif cls == "rhombus":
        ratio = rng.uniform(0.52, 0.68)
        pts = np.array([[0.0, -1.0], [ratio, 0.0], [0.0, 1.0], [-ratio, 0.0]])
        poly(pts if rng.random() < 0.7 else pts[:, ::-1])
    elif cls == "triangle":
        poly(_regular(3, rng.uniform(0, 120)))
    elif cls == "hexagon":
        poly(_regular(6, rng.uniform(0, 60)))
    elif cls == "star":
        poly(_regular(5, rng.uniform(-20, 20), inner=rng.uniform(0.42, 0.5)))
    elif cls == "cross":
        a = rng.uniform(0.17, 0.2)
        pts = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
                        [-1, a], [-1, -a], [-a, -a]], dtype=np.float64)
        poly(_rot(pts, rng.uniform(-12, 12)))
    elif cls == "heart":
        t = np.linspace(0, 2 * math.pi, 120, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        poly(_rot(np.stack([x, y], axis=1), rng.uniform(-12, 12)))
    else:  # pragma: no cover - CLASSES is closed
        raise ValueError(f"unknown synthetic class {cls!r}")
    arr = np.asarray(canvas) > 127
    rows, cols = np.flatnonzero(arr.any(axis=1)), np.flatnonzero(arr.any(axis=0))
    return arr[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]


def _place_objects(rng: np.random.Generator, w: int, h: int,
                   n: int) -> list[tuple[str, str, str, np.ndarray, int, int]]:
    """Choose class, colour, size and a non-overlapping position for up to ``n`` objects (rejection
    sampling; boxes keep a gap of a few pixels). Returns ``(cls, colour, size, mask, x0, y0)``."""
    # A small per-image palette of classes and colours makes repeated (class, colour) pairs common, so that
    # sentences need sizes, positions and relations to be unambiguous.
    classes = rng.choice(len(CLASSES), size=int(rng.integers(2, 5)), replace=False)
    colours = rng.choice(len(COLOUR_NAMES), size=int(rng.integers(2, 5)), replace=False)
    short = min(w, h)
    gap = max(3, short // 60)
    boxes: list[tuple[int, int, int, int]] = []
    out = []
    for _ in range(n):
        cls = CLASSES[int(rng.choice(classes))]
        colour = COLOUR_NAMES[int(rng.choice(colours))]
        size_i = int(rng.choice(3, p=_SIZE_PROBS))
        placed = False
        for size_name in list(SIZE_RANGES)[size_i::-1]:  # fall back to smaller sizes when crowded
            lo, hi = SIZE_RANGES[size_name]
            m = _shape_mask(cls, rng.uniform(lo, hi) * short, rng)
            mh, mw = m.shape
            if mw + 2 > w or mh + 2 > h:
                continue
            for _try in range(60):
                x0 = int(rng.integers(1, w - mw))
                y0 = int(rng.integers(1, h - mh))
                if all(x0 + mw + gap <= bx0 or bx1 + gap <= x0 or y0 + mh + gap <= by0 or by1 + gap <= y0
                       for bx0, by0, bx1, by1 in boxes):
                    boxes.append((x0, y0, x0 + mw, y0 + mh))
                    out.append((cls, colour, size_name, m, x0, y0))
                    placed = True
                    break
            if placed:
                break
    return out


def _rle(full: np.ndarray) -> dict[str, Any]:
    enc = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
    return {"size": [int(enc["size"][0]), int(enc["size"][1])], "counts": enc["counts"].decode("ascii")}


# ---- referring expressions ------------------------------------------------------------------------------

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_SUPERLATIVE_WORDS = {
    ("largest", False): ("largest", "biggest"), ("largest", True): ("larger", "bigger"),
    ("smallest", False): ("smallest",), ("smallest", True): ("smaller",),
}
_EXTREME_TEMPLATES = {
    "top": ("the {np} at the top", "the topmost {np}", "the {np} at the top of the image"),
    "bottom": ("the {np} at the bottom", "the lowest {np}", "the {np} at the bottom of the picture"),
    "left": ("the {np} on the left", "the leftmost {np}", "the {np} farthest to the left"),
    "right": ("the {np} on the right", "the rightmost {np}", "the {np} farthest to the right"),
}
_RELATION_WORDS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_SUPERLATIVE_MARGIN = 1.25


@dataclass(frozen=True)
class Description:
    """Predicates of a referring expression (at most one of superlative, extreme, relation)."""

    noun: str
    colour: str | None = None
    size: str | None = None  # absolute adjective: "small" | "large"
    superlative: str | None = None  # "largest" | "smallest" among the other candidates
    extreme: str | None = None  # "top" | "bottom" | "left" | "right"
    relation: str | None = None  # "left" | "right" | "above" | "below" (target relative to landmark)
    landmark: int | None = None
    landmark_desc: "Description | None" = None

    @property
    def kind(self) -> str:
        if self.relation:
            return "relation"
        if self.superlative:
            return "superlative"
        if self.extreme:
            return "extreme"
        if self.size or self.noun in _NOUN_SIZE:
            return "size"
        if self.colour:
            return "colour"
        return "noun"


def _base(o: SyntheticObject, d: Description, strict: bool) -> bool:
    """Noun, colour and size predicates. ``strict``: true of the target; loose: could a reader take it so."""
    if d.colour is not None and o.colour != d.colour:
        return False
    if strict:
        if o.cls not in NOUN_CLASSES[d.noun]:
            return False
        implied = _NOUN_SIZE.get(d.noun)
        if implied is not None and o.size != implied:
            return False
        return d.size is None or o.size == d.size
    if o.cls not in NOUN_LOOSE[d.noun]:
        return False
    return d.size is None or o.size != _OPPOSITE_SIZE[d.size]


def _relation(o: SyntheticObject, land: SyntheticObject, rel: str, strict: bool) -> bool:
    """Strict: ``o``'s box lies wholly on that side of the landmark's box and that is the dominant
    direction. Loose: ``o``'s centre is on that side of the landmark's centre at all."""
    (ox, oy), (lx, ly) = o.center, land.center
    dx, dy = ox - lx, oy - ly
    if not strict:
        return {"left": dx < 0, "right": dx > 0, "above": dy < 0, "below": dy > 0}[rel]
    ob, lb = o.box, land.box
    if rel == "left":
        return ob[2] <= lb[0] and abs(dx) >= abs(dy)
    if rel == "right":
        return ob[0] >= lb[2] and abs(dx) >= abs(dy)
    if rel == "above":
        return ob[3] <= lb[1] and abs(dy) >= abs(dx)
    return ob[1] >= lb[3] and abs(dy) >= abs(dx)


def _beyond(t: SyntheticObject, o: SyntheticObject, side: str) -> bool:
    """``t``'s box lies wholly beyond ``o``'s box towards ``side``."""
    if side == "top":
        return t.box[3] <= o.box[1]
    if side == "bottom":
        return t.box[1] >= o.box[3]
    if side == "left":
        return t.box[2] <= o.box[0]
    return t.box[0] >= o.box[2]


def _in_half(t: SyntheticObject, side: str, w: int, h: int, frac: float) -> bool:
    cx, cy = t.center
    return {"top": cy < h * frac, "bottom": cy > h * (1 - frac),
            "left": cx < w * frac, "right": cx > w * (1 - frac)}[side]


def _bigger(a: SyntheticObject, b: SyntheticObject) -> bool:
    """``a`` is clearly bigger than ``b``: by the margin in both box extent and mask area."""
    ea = math.sqrt((a.box[2] - a.box[0]) * (a.box[3] - a.box[1]))
    eb = math.sqrt((b.box[2] - b.box[0]) * (b.box[3] - b.box[1]))
    return ea >= _SUPERLATIVE_MARGIN * eb and math.sqrt(a.area) >= _SUPERLATIVE_MARGIN * math.sqrt(b.area)


def candidates(objects: tuple[SyntheticObject, ...] | list[SyntheticObject], d: Description) -> list[int]:
    """Objects a reader might take ``d``'s noun, colour, size and relation to cover (loose reading)."""
    out = [i for i, o in enumerate(objects) if _base(o, d, strict=False)]
    if d.relation is not None:
        land = objects[d.landmark]  # type: ignore[index]
        out = [i for i in out if i != d.landmark and _relation(objects[i], land, d.relation, strict=False)]
    return out


def describes_uniquely(objects: tuple[SyntheticObject, ...] | list[SyntheticObject], target: int,
                       d: Description, width: int, height: int) -> bool:
    """True when ``d`` is true of ``objects[target]`` (strict reading) and of no other object even under a
    loose reading: other objects of a confusable noun, an adjacent size category or a looser spatial sense
    all count as distractors. Superlatives and extremes need a clear margin over every distractor."""
    t = objects[target]
    if not _base(t, d, strict=True):
        return False
    if d.relation is not None:
        if d.landmark is None or d.landmark == target or d.landmark_desc is None:
            return False
        if not describes_uniquely(objects, d.landmark, d.landmark_desc, width, height):
            return False
        if not _relation(t, objects[d.landmark], d.relation, strict=True):
            return False
    cands = candidates(objects, d)
    if target not in cands:  # cannot happen (strict implies loose), kept as a guard
        return False
    others = [objects[i] for i in cands if i != target]
    if d.superlative is not None:
        if not others:
            return False
        if d.superlative == "largest":
            return all(_bigger(t, o) for o in others)
        return all(_bigger(o, t) for o in others)
    if d.extreme is not None:
        if others:
            return _in_half(t, d.extreme, width, height, 0.5) and all(_beyond(t, o, d.extreme) for o in others)
        return _in_half(t, d.extreme, width, height, 1 / 3)
    return not others


def _np_text(d: Description, rng: np.random.Generator) -> str:
    words = []
    if d.size:
        words.append(str(rng.choice(_SIZE_WORDS[d.size])))
    if d.colour:
        words.append(d.colour)
    words.append(d.noun)
    return " ".join(words)


def render(d: Description, objects: tuple[SyntheticObject, ...] | list[SyntheticObject],
           rng: np.random.Generator) -> str:
    """Words for a description, with the template varied by ``rng``."""
    np_ = _np_text(d, rng)
    det = "the " if rng.random() < 0.8 else ""
    if d.superlative:
        two = len(candidates(objects, d)) == 2
        word = str(rng.choice(_SUPERLATIVE_WORDS[(d.superlative, two)]))
        return f"the {word} {np_}"
    if d.extreme:
        return str(rng.choice(_EXTREME_TEMPLATES[d.extreme])).format(np=np_)
    if d.relation:
        land = "the " + _np_text(d.landmark_desc, rng)  # type: ignore[arg-type]
        rel = str(rng.choice(_RELATION_WORDS[d.relation]))
        if rng.random() < 0.3:
            return f"the {np_} that is {rel} {land}"
        return f"{det}{np_} {rel} {land}"
    if d.colour and not d.size and rng.random() < 0.15:
        return f"the {d.noun} in {d.colour}"
    return f"{det}{np_}"


def _choose_noun(cls: str, variation: float, rng: np.random.Generator) -> Noun:
    rows = _CLASS_NOUNS[cls]
    others = [r for r in rows if r.relation != "exact"]
    if others and rng.random() < variation:
        return others[int(rng.integers(len(others)))]
    return rows[0]


def _landmark_desc(objects: list[SyntheticObject], li: int, w: int, h: int,
                    rng: np.random.Generator, variation: float) -> Description | None:
    """A simple unique description (noun / colour / size) of object ``li`` to serve as a landmark."""
    o = objects[li]
    for noun in (_choose_noun(o.cls, variation, rng).noun, o.cls):
        size = o.size if o.size in _OPPOSITE_SIZE else None
        opts = [Description(noun, colour=o.colour), Description(noun)]
        if size:
            opts += [Description(noun, size=size), Description(noun, colour=o.colour, size=size)]
        for d in opts:
            if describes_uniquely(objects, li, d, w, h):
                return d
    return None


def _descriptions(objects: list[SyntheticObject], ti: int, noun: str, w: int, h: int,
                  landmarks: dict[int, Description | None]) -> list[list[Description]]:
    """Unique descriptions of ``objects[ti]`` with ``noun``, by level of specificity (index 0 simplest)."""
    t = objects[ti]
    size = t.size if t.size in _OPPOSITE_SIZE else None
    levels: list[list[Description]] = [
        [Description(noun)],
        [Description(noun, colour=t.colour)] + ([Description(noun, size=size)] if size else []),
        [Description(noun, colour=t.colour, size=size)] if size else [],
        [Description(noun, colour=c, superlative=s) for c in (None, t.colour) for s in ("largest", "smallest")]
        + [Description(noun, colour=c, extreme=e) for c in (None, t.colour) for e in _EXTREME_TEMPLATES],
        [Description(noun, colour=c, relation=r, landmark=li, landmark_desc=ld)
         for li, ld in landmarks.items() if ld is not None and li != ti
         for c in (None, t.colour) for r in _RELATION_WORDS],
    ]
    return [[d for d in lv if describes_uniquely(objects, ti, d, w, h)] for lv in levels]


def _make_refs(objects: list[SyntheticObject], w: int, h: int, cfg: SyntheticConfig,
               rng: np.random.Generator) -> list[SyntheticRef]:
    landmarks = {i: _landmark_desc(objects, i, w, h, rng, cfg.noun_variation) for i in range(len(objects))}
    refs: list[SyntheticRef] = []
    texts: set[str] = set()
    for ti, t in enumerate(objects):
        made = 0
        for _attempt in range(4 * cfg.sentences_per_object):
            if made >= cfg.sentences_per_object:
                break
            row = _choose_noun(t.cls, cfg.noun_variation, rng)
            levels = _descriptions(objects, ti, row.noun, w, h, landmarks)
            if not any(levels) and row.relation != "exact":
                row = _CLASS_NOUNS[t.cls][0]
                levels = _descriptions(objects, ti, row.noun, w, h, landmarks)
            valid = [i for i, lv in enumerate(levels) if lv]
            if not valid:
                break  # no unique description of this object exists
            # Mostly the simplest unique description, sometimes a more specific one (over-specification is
            # still true and unique): this varies the templates.
            weights = np.array([1.0 if i == valid[0] else 0.6 / (len(valid) - 1) for i in valid])
            level = valid[int(rng.choice(len(valid), p=weights / weights.sum()))]
            d = levels[level][int(rng.integers(len(levels[level])))]
            text = render(d, objects, rng)
            key = text.removeprefix("the ")
            if key in texts:
                continue
            texts.add(key)
            refs.append(SyntheticRef(text, ti, row.noun, row.relation, d.kind, d.landmark))
            made += 1
    return refs


# ---- entry points --------------------------------------------------------------------------------------


def synthesize_image(cfg: SyntheticConfig, index: int) -> SyntheticImage:
    """Image ``index`` of the dataset ``cfg`` describes (independent of every other image)."""
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    rng = _image_rng(cfg.seed, index)
    w = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    h = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    img, kind = _background(rng, w, h)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects: list[SyntheticObject] = []
    for cls, colour, size, m, x0, y0 in _place_objects(rng, w, h, n):
        base = np.array(COLOUR_RGB[colour])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, size=3), 0, 255))
        img.paste(rgb, (x0, y0, x0 + m.shape[1], y0 + m.shape[0]), Image.fromarray(m.astype(np.uint8) * 255, "L"))
        full = np.zeros((h, w), dtype=np.uint8)
        full[y0: y0 + m.shape[0], x0: x0 + m.shape[1]] = m
        box = float32_box((x0, y0, x0 + m.shape[1], y0 + m.shape[0]))
        objects.append(SyntheticObject(cls, colour, rgb, size, box, _rle(full), int(m.sum())))  # type: ignore
    refs = _make_refs(objects, w, h, cfg, rng)
    return SyntheticImage(index, image_id_of(index), split_of(cfg, index), img, tuple(objects), tuple(refs), kind)


def iter_synthetic(cfg: SyntheticConfig) -> Iterator[SyntheticImage]:
    """Yield the ``cfg.n_images`` images in order, one at a time (constant memory, no disk access)."""
    for i in range(cfg.n_images):
        yield synthesize_image(cfg, i)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """JPEG bytes with fixed encoder settings and no metadata (deterministic for one Pillow/libjpeg)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling=0)
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds exactly these bytes. Returns whether written."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


def generate(cfg: SyntheticConfig, out_dir: str | os.PathLike[str], *, progress: bool = True) -> CanonicalDataset:
    """Write the images under ``out_dir/images`` (files already holding the right bytes are left alone) and
    return the canonical dataset; the caller saves it."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    builder = DatasetBuilder("synthetic", image_dir, on_error="fail")
    for s in tqdm(iter_synthetic(cfg), total=cfg.n_images, desc="synthetic", unit="img", disable=not progress):
        data = encode_jpeg(s.image, cfg.jpeg_quality)
        rel = f"{s.image_id}.jpg"
        _write_if_changed(image_dir / rel, data)
        builder.add_image(ImageRecord(s.image_id, rel, s.width, s.height, hashlib.sha256(data).hexdigest()))
        for k, r in enumerate(s.refs):
            o = s.objects[r.target]
            builder.add_ref(ref_id=f"{s.image_id}-{k}", image_id=s.image_id, text=r.text, split=s.split,
                            box=o.box, category=o.cls, mask=o.mask)
    source = {"format": "synthetic", "config": asdict(cfg), "generator_version": GENERATOR_VERSION}
    return builder.build(source)
