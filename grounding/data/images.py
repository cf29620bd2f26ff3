"""Safe image access: path containment, hashing, probing (size, EXIF orientation) and RGB decoding.

Every teacher decodes images through :func:`load_rgb`, so all of them see the same pixels: the
orientation recorded at prepare time is applied (EXIF transpose only when it was ``"exif"``), any mode
(grayscale, palette, CMYK, RGBA, 16-bit) becomes 8-bit RGB, and alpha is composited over white.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from grounding.data.schema import DataError, ImageRecord, check_relative_path

# EXIF orientation tag and the values that swap width and height (rotations by 90/270 degrees).
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


class ImageError(DataError):
    """An image that cannot be used: names the file and the problem."""


@dataclass(frozen=True)
class ImageProbe:
    """What :func:`probe_image` learned: size after ``orientation`` is applied, the decoded mode."""

    width: int
    height: int
    orientation: str
    mode: str
    note: str = ""


def resolve_image_path(root: str | os.PathLike[str], rel_path: str) -> Path:
    """``root / rel_path``, refusing absolute paths, ``..`` and symlinks that leave ``root``."""
    check_relative_path(rel_path, what="annotation image path")
    root_r = Path(root).resolve()
    full = (root_r / rel_path).resolve()
    if full != root_r and root_r not in full.parents:
        raise ImageError(f"annotation image path {rel_path!r} resolves outside the image root {root_r}; refused")
    return full


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _open_full(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: image file is missing")
    try:
        img = Image.open(path)
        img.load()  # full decode: catches truncated files that Image.open alone accepts
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    return img


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # malformed EXIF blocks must not make a readable image unusable
        return 1


def decide_orientation(raw_w: int, raw_h: int, exif_value: int,
                       annotated: tuple[int, int] | None, when_unknown: str = "exif") -> tuple[str, str]:
    """Choose ``"none" | "raw" | "exif"`` for an image of stored size ``raw_w x raw_h``.

    Without an EXIF rotation the answer is ``"none"``. With one, the annotation's ``(width, height)``
    decides: keep the stored pixels (``"raw"``) or apply the EXIF transpose (``"exif"``), whichever
    matches; when both match (180-degree rotations, square images) the stored pixels are kept, as the
    COCO-family annotation tools did. No annotated size: ``when_unknown`` decides (``"exif"``, as cv2
    and browsers do, or ``"raw"`` for formats whose boxes are known to be in stored-pixel coordinates,
    e.g. COCO images referenced from SimREC/TransVG files). Neither matches: ``ImageError``.
    Returns ``(orientation, note)``.
    """
    if exif_value in (0, 1):
        if annotated is not None and annotated != (raw_w, raw_h):
            raise ImageError(f"decoded size {raw_w}x{raw_h} differs from annotated {annotated[0]}x{annotated[1]}")
        return "none", ""
    exif_size = (raw_h, raw_w) if exif_value in _SWAPS_AXES else (raw_w, raw_h)
    if annotated is None:
        if when_unknown not in ("exif", "raw"):
            raise ValueError(f"when_unknown must be 'exif' or 'raw', got {when_unknown!r}")
        return when_unknown, f"EXIF orientation {exif_value}: no annotated size, {when_unknown} chosen by the reader"
    raw_ok, exif_ok = annotated == (raw_w, raw_h), annotated == exif_size
    if raw_ok:
        note = "EXIF orientation ignored: stored pixels match the annotation"
        return "raw", note + (" (both match; kept stored pixels)" if exif_ok else "")
    if exif_ok:
        return "exif", f"EXIF orientation {exif_value} applied: transposed size matches the annotation"
    raise ImageError(
        f"neither the stored size {raw_w}x{raw_h} nor the EXIF-transposed size {exif_size[0]}x{exif_size[1]} "
        f"matches the annotated {annotated[0]}x{annotated[1]}"
    )


def probe_image(path: str | os.PathLike[str], annotated_size: tuple[int, int] | None = None,
                when_unknown: str = "exif") -> ImageProbe:
    """Decode ``path`` fully, decide its orientation against ``annotated_size`` ``(width, height)``
    (``when_unknown`` applies when there is none; see :func:`decide_orientation`)."""
    path = Path(path)
    img = _open_full(path)
    try:
        orientation, note = decide_orientation(img.width, img.height, _exif_orientation(img), annotated_size,
                                               when_unknown)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    w, h = (img.height, img.width) if orientation == "exif" and _exif_orientation(img) in _SWAPS_AXES else img.size
    return ImageProbe(w, h, orientation, img.mode, note)


def image_record(root: str | os.PathLike[str], image_id: str, rel_path: str,
                 annotated_size: tuple[int, int] | None = None,
                 when_unknown: str = "exif") -> tuple[ImageRecord, ImageProbe]:
    """Build an :class:`ImageRecord` for ``root/rel_path``: containment check, full decode, sha256."""
    full = resolve_image_path(root, rel_path)
    probe = probe_image(full, annotated_size, when_unknown)
    rec = ImageRecord(image_id, rel_path, probe.width, probe.height, sha256_file(full), probe.orientation)
    return rec, probe


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit/int/float scaled to 0..255, alpha composited over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_rgb(root: str | os.PathLike[str], record: ImageRecord) -> Image.Image:
    """Decode an image exactly as every teacher sees it; checks the size against the record."""
    full = resolve_image_path(root, record.path)
    img = _open_full(full)
    if record.orientation == "exif":
        img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    if img.size != (record.width, record.height):
        raise ImageError(f"{full}: decoded size {img.width}x{img.height} differs from the prepared "
                         f"{record.width}x{record.height} (file changed since prepare?)")
    return img
