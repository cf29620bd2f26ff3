"""Box conversions, validation and letterbox round trips (float32 xyxy, original pixels)."""

from __future__ import annotations

import numpy as np
import pytest

from grounding import boxes as B


def test_xywh_round_trip_is_exact() -> None:
    xywh = np.array([[10.5, 20.25, 30.0, 40.75], [0, 0, 1, 1]], dtype=np.float32)
    xyxy = B.convert(xywh, "xywh", "xyxy")
    np.testing.assert_array_equal(xyxy, [[10.5, 20.25, 40.5, 61.0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(B.convert(xyxy, "xyxy", "xywh"), xywh)
    np.testing.assert_allclose(B.convert(xyxy, "xyxy", "cxcywh")[0], [25.5, 40.625, 30.0, 40.75])
    assert xyxy.dtype == np.float32


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unsupported box format 'xxyy'"):
        B.convert([[0, 0, 1, 1]], "xxyy", "xyxy")
    with pytest.raises(ValueError, match=r"expected shape \(N, 4\), got \(2, 3\)"):
        B.as_boxes(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="row 1 is not finite"):
        B.as_boxes([[0, 0, 1, 1], [0, np.nan, 1, 1]])
    with pytest.raises(ValueError, match="row 0 has non-positive size"):
        B.validate_xyxy([[5, 5, 5, 9]])
    with pytest.raises(ValueError, match="outside the 100x50 image"):
        B.validate_xyxy([[10, 10, 120, 40]], 100, 50)


def test_validate_clips_within_tolerance() -> None:
    out = B.validate_xyxy([[-0.5, 0, 100.8, 50]], 100, 50)
    np.testing.assert_array_equal(out, [[0, 0, 100, 50]])


def test_iou_matches_hand_computation() -> None:
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 5, 15, 15], [0, 0, 10, 10]], np.float32)
    np.testing.assert_allclose(B.box_iou(a, b), [[25 / 175, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(B.paired_iou(np.repeat(a, 2, 0), b), [25 / 175, 1.0], rtol=1e-6)


@pytest.mark.parametrize("w,h", [(640, 480), (333, 517), (416, 416), (1000, 10)])
def test_letterbox_maps_back_exactly(w: int, h: int) -> None:
    lb = B.Letterbox.fit(w, h, 416)
    assert max(lb.new_w, lb.new_h) == 416 and lb.dx >= 0 and lb.dy >= 0
    boxes = np.array([[0, 0, w, h], [w * 0.25, h * 0.5, w * 0.75, h * 0.9]], np.float32)
    fwd = lb.forward(boxes)
    np.testing.assert_allclose(fwd[0], [lb.dx, lb.dy, lb.dx + lb.new_w, lb.dy + lb.new_h], atol=1e-4)
    np.testing.assert_allclose(lb.inverse(fwd), boxes, atol=1e-3)
    assert B.Letterbox.from_array(lb.as_array()).forward(boxes).tolist() == fwd.tolist()


def test_float64_export_reads_back_to_the_same_float32_box() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 600, (500, 2)).astype(np.float32)
    xyxy = np.concatenate([xy, xy + rng.uniform(1, 90, (500, 2)).astype(np.float32)], 1)
    xywh64 = B.convert(xyxy, "xyxy", "xywh", dtype=np.float64)
    as_json = [[float(v) for v in row] for row in xywh64]  # what an export writes
    np.testing.assert_array_equal(B.convert(as_json, "xywh", "xyxy"), xyxy)
