"""Model-input image preprocessing shared by teachers and students (imports no model code).

Images are decoded by :func:`grounding.data.images.load_rgb` (EXIF orientation, alpha over white, 16-bit
scaling, size check) and letterboxed here (aspect kept, centred, padded) into a square canvas whose
:class:`~grounding.boxes.Letterbox` maps boxes between original and canvas pixels exactly. Teachers
(``grounding.teachers.detectors``) and students (``grounding.students.common``) both import this module,
so a student sees the same canvas pixels as the detector teachers without importing a teacher.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from grounding.boxes import Letterbox

#: torchvision's detection normalisation (ImageNet mean/std); also the canvas padding of frcnn/fcos and the
#: students, so padding is exactly 0 after normalisation, like torchvision's own batch padding.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def letterbox_pixels(img: Image.Image, size: int) -> tuple[torch.Tensor, Letterbox]:
    """The resized image of a letterbox: ``(3, new_h, new_w)`` uint8 (PIL bilinear, aspect kept, no resize
    when the size already fits) and its :class:`Letterbox` into a ``size`` square."""
    if img.mode != "RGB":
        raise ValueError(f"letterbox_image needs an RGB image, got mode {img.mode!r}")
    lb = Letterbox.fit(img.width, img.height, size)
    if (lb.new_w, lb.new_h) != img.size:
        img = img.resize((lb.new_w, lb.new_h), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), lb


def paste_canvas(pixels: torch.Tensor, lb: Letterbox, pad_rgb: Sequence[float]) -> torch.Tensor:
    """``(3, size, size)`` float32 canvas in [0, 1]: ``pad_rgb`` (three floats in [0, 1]) everywhere, the
    uint8 ``pixels`` of :func:`letterbox_pixels` / 255 at ``(lb.dx, lb.dy)``."""
    canvas = torch.tensor(list(pad_rgb), dtype=torch.float32).view(3, 1, 1).repeat(1, lb.size, lb.size)
    canvas[:, lb.dy:lb.dy + lb.new_h, lb.dx:lb.dx + lb.new_w] = pixels.float() / 255.0
    return canvas


def letterbox_image(img: Image.Image, size: int, pad_rgb: Sequence[float]) -> tuple[torch.Tensor, Letterbox]:
    """Letterbox an RGB image into a ``size x size`` canvas.

    The image is resized (PIL bilinear, aspect kept) to ``new_w x new_h`` = :meth:`Letterbox.fit` and
    pasted at ``(dx, dy)``; the rest is ``pad_rgb`` (three floats in [0, 1]).
    Returns the canvas ``(3, size, size)`` float32 in [0, 1] and its :class:`Letterbox`, whose
    ``forward``/``inverse`` map xyxy boxes between original and canvas pixels exactly.
    """
    pixels, lb = letterbox_pixels(img, size)
    return paste_canvas(pixels, lb, pad_rgb), lb


def normalise(canvas: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of ``(..., 3, H, W)`` float canvases in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=canvas.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=canvas.dtype).view(3, 1, 1)
    return (canvas - mean) / std
