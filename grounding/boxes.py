"""Box conventions and conversions.

Inside the library and in every shard, boxes are ``(N, 4)`` float32 ``xyxy`` in original-image pixels
(x to the right, y down, ``x2 > x1``, ``y2 > y1``, continuous coordinates: a box covering the whole
``W x H`` image is ``[0, 0, W, H]``). Conversions happen only at the edges: readers of ``xywh``
formats, exports, and letterboxed model inputs, whose parameters are kept in a :class:`Letterbox`
so boxes map back exactly. Thin over :mod:`torchvision.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou as _tv_box_iou

BoxFormat = Literal["xyxy", "xywh", "cxcywh"]
BOX_FORMATS: tuple[str, ...] = ("xyxy", "xywh", "cxcywh")


def as_boxes(boxes: np.ndarray | torch.Tensor | list, *, name: str = "boxes",
             dtype: type = np.float32) -> np.ndarray:
    """Return ``boxes`` as a ``(N, 4)`` array of ``dtype`` (float32 unless a caller needs the exact float64
    values of its input); raise ``ValueError`` naming the bad shape or row."""
    arr = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=dtype)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape (N, 4), got {tuple(arr.shape)}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: row {i} is not finite: {arr[i].tolist()}")
    return arr


def convert(boxes: np.ndarray | list, in_fmt: str, out_fmt: str, *, dtype: type = np.float32) -> np.ndarray:
    """Convert ``(N, 4)`` boxes between ``"xyxy" | "xywh" | "cxcywh"``; returns ``(N, 4)`` of ``dtype``.

    The arithmetic is float64 on the input's own values, so a float32 xyxy box exported as float64 xywh
    (``dtype=np.float64``, e.g. into JSON) and read back gives the identical float32 xyxy box."""
    for fmt in (in_fmt, out_fmt):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"unsupported box format {fmt!r}; expected one of {BOX_FORMATS}")
    arr = as_boxes(boxes, dtype=np.float64)
    if in_fmt == out_fmt:
        return arr.astype(dtype)
    out = box_convert(torch.from_numpy(arr), in_fmt=in_fmt, out_fmt=out_fmt)
    return out.numpy().astype(dtype)


def validate_xyxy(
    boxes: np.ndarray | list,
    width: float | None = None,
    height: float | None = None,
    *,
    tolerance: float = 1.0,
    name: str = "boxes",
) -> np.ndarray:
    """Check ``(N, 4)`` xyxy boxes: positive size and, given the image size, inside it.

    Boxes may exceed the image by at most ``tolerance`` pixels (rounding in annotation tools) and are
    then clipped; anything further out raises ``ValueError`` naming the row. Returns float32 ``(N, 4)``.
    """
    arr = as_boxes(boxes, name=name)
    nonpos = (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])
    if nonpos.any():
        i = int(np.flatnonzero(nonpos)[0])
        raise ValueError(f"{name}: row {i} has non-positive size (xyxy {arr[i].tolist()})")
    if width is not None and height is not None:
        lo = np.array([-tolerance, -tolerance, -tolerance, -tolerance], dtype=np.float32)
        hi = np.array([width, height, width, height], dtype=np.float32) + tolerance
        out = (arr < lo) | (arr > hi)
        if out.any():
            i = int(np.flatnonzero(out.any(axis=1))[0])
            raise ValueError(
                f"{name}: row {i} xyxy {arr[i].tolist()} lies outside the {width:g}x{height:g} image"
            )
        arr = clip(arr, width, height)
        nonpos = (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])
        if nonpos.any():
            i = int(np.flatnonzero(nonpos)[0])
            raise ValueError(f"{name}: row {i} is empty once clipped to the {width:g}x{height:g} image")
    return arr


def clip(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Clip ``(N, 4)`` xyxy boxes to ``[0, width] x [0, height]``; returns float32."""
    arr = as_boxes(boxes).copy()
    arr[:, 0::2] = arr[:, 0::2].clip(0, width)
    arr[:, 1::2] = arr[:, 1::2].clip(0, height)
    return arr


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU matrix ``(N, M)`` of two sets of xyxy boxes (torchvision.ops.box_iou)."""
    a = torch.from_numpy(as_boxes(boxes1, name="boxes1"))
    b = torch.from_numpy(as_boxes(boxes2, name="boxes2"))
    return _tv_box_iou(a, b).numpy()


def paired_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of row i of ``boxes1`` with row i of ``boxes2``; ``(N,)`` float32."""
    a, b = as_boxes(boxes1, name="boxes1"), as_boxes(boxes2, name="boxes2")
    if a.shape != b.shape:
        raise ValueError(f"paired_iou: shapes differ {a.shape} vs {b.shape}")
    lt = np.maximum(a[:, :2], b[:, :2])  # [N,2]
    rb = np.minimum(a[:, 2:], b[:, 2:])  # [N,2]
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0).astype(np.float32)


@dataclass(frozen=True)
class Letterbox:
    """Parameters of a letterbox resize from an ``orig_w x orig_h`` image to a ``size x size`` canvas.

    The image is scaled by ``scale`` (aspect kept) to ``new_w x new_h`` and pasted at ``(dx, dy)``;
    the rest of the canvas is padding. Boxes map as ``x' = x * scale + dx`` (and back exactly).
    """

    orig_w: int
    orig_h: int
    size: int
    scale: float
    new_w: int
    new_h: int
    dx: int
    dy: int

    @classmethod
    def fit(cls, orig_w: int, orig_h: int, size: int) -> "Letterbox":
        """Letterbox parameters for fitting ``orig_w x orig_h`` into a ``size`` square, centred."""
        if orig_w <= 0 or orig_h <= 0 or size <= 0:
            raise ValueError(f"letterbox needs positive sizes, got {orig_w}x{orig_h} -> {size}")
        scale = min(size / orig_w, size / orig_h)
        new_w, new_h = max(1, round(orig_w * scale)), max(1, round(orig_h * scale))
        return cls(orig_w, orig_h, size, scale, new_w, new_h, (size - new_w) // 2, (size - new_h) // 2)

    def forward(self, boxes: np.ndarray) -> np.ndarray:
        """Map xyxy boxes from original pixels to letterbox-canvas pixels."""
        arr = as_boxes(boxes).astype(np.float64)
        sx, sy = self.new_w / self.orig_w, self.new_h / self.orig_h
        out = arr * np.array([sx, sy, sx, sy]) + np.array([self.dx, self.dy, self.dx, self.dy])
        return out.astype(np.float32)

    def inverse(self, boxes: np.ndarray, *, clip_to_image: bool = True) -> np.ndarray:
        """Map xyxy boxes from letterbox-canvas pixels back to original pixels (optionally clipped)."""
        arr = as_boxes(boxes).astype(np.float64)
        sx, sy = self.new_w / self.orig_w, self.new_h / self.orig_h
        out = (arr - np.array([self.dx, self.dy, self.dx, self.dy])) / np.array([sx, sy, sx, sy])
        out = out.astype(np.float32)
        return clip(out, self.orig_w, self.orig_h) if clip_to_image else out

    def as_array(self) -> np.ndarray:
        """``(8,)`` float32 ``[orig_w, orig_h, size, scale, new_w, new_h, dx, dy]`` for storage in shards."""
        return np.array(
            [self.orig_w, self.orig_h, self.size, self.scale, self.new_w, self.new_h, self.dx, self.dy],
            dtype=np.float32,
        )

    @classmethod
    def from_array(cls, arr: np.ndarray) -> "Letterbox":
        """Inverse of :meth:`as_array`."""
        w, h, size, scale, nw, nh, dx, dy = (float(v) for v in np.asarray(arr).reshape(8))
        return cls(int(w), int(h), int(size), scale, int(nw), int(nh), int(dx), int(dy))
