"""Top-k class probabilities + residual mass (issue 23 item 3): encoding, rebuild, bytes, consumer."""

from __future__ import annotations

import numpy as np
import pytest

from grounding import class_probs as cp


def softmax_rows(n: int, c: int, seed: int = 0, temperature: float = 3.0) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, c)) * temperature
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def test_topk_keeps_the_largest_exactly_and_spreads_the_rest_evenly() -> None:
    p = softmax_rows(100, 1601)
    enc = cp.encode_topk(p, 32)
    v, idx, rest = enc[cp.TOPK_VALUES], enc[cp.TOPK_INDEX], enc[cp.TOPK_REST]
    assert v.dtype == np.float16 and idx.dtype == np.int32 and rest.dtype == np.float32
    assert v.shape == idx.shape == (100, 32) and rest.shape == (100,)
    np.testing.assert_array_equal(idx[:, 0], p.argmax(1))
    assert (np.diff(v.astype(np.float32), axis=1) <= 0).all()  # decreasing
    np.testing.assert_allclose(rest, 1 - np.sort(p, 1)[:, ::-1][:, :32].sum(1), atol=1e-6)
    q = cp.decode_topk(v, idx, rest, 1601)
    assert q.shape == p.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(1), 1.0, atol=2e-3)  # float16 rounding of the top values only
    others = np.ones_like(p, bool)
    np.put_along_axis(others, idx.astype(np.int64), False, 1)
    np.testing.assert_allclose(q[others].reshape(100, -1), np.repeat(rest[:, None] / 1569, 1569, 1), rtol=1e-6)
    # the error is float16 rounding on the top k and the gap between the tail and its mean elsewhere
    assert np.abs(q - p).max() <= max(float(np.sort(p, 1)[:, -33].max()), 1e-3)


def test_indices_past_float16_range_and_k_at_least_c() -> None:
    p = np.zeros((2, 3000), np.float32)
    p[0, 2049], p[0, 2999], p[1, 2051] = 0.7, 0.3, 1.0  # float16 cannot hold 2049 or 2051
    enc = cp.encode_topk(p, 2)
    assert enc[cp.TOPK_INDEX].tolist() == [[2049, 2999], [2051, 0]]
    np.testing.assert_allclose(cp.decode_topk(*(enc[f] for f in cp.TOPK_FIELDS), 3000), p, atol=5e-4)  # float16
    small = softmax_rows(4, 5)
    enc = cp.encode_topk(small, 10)  # k capped at C: exact up to float16, nothing left to spread
    assert enc[cp.TOPK_VALUES].shape == (4, 5) and np.allclose(enc[cp.TOPK_REST], 0, atol=1e-6)
    np.testing.assert_allclose(cp.dense(enc, 5), small, atol=1e-3)
    with pytest.raises(ValueError, match="k >= 1"):
        cp.encode_topk(small, 0)
    with pytest.raises(ValueError, match="out of range"):
        cp.decode_topk(enc[cp.TOPK_VALUES], enc[cp.TOPK_INDEX], enc[cp.TOPK_REST], 3)


def test_stored_fields_and_dense_read_either_encoding() -> None:
    p = softmax_rows(3, 11)
    assert cp.stored_fields({"boxes", "class_probs"}) == ["class_probs"]
    assert cp.stored_fields({"boxes", *cp.TOPK_FIELDS}) == list(cp.TOPK_FIELDS)
    with pytest.raises(ValueError, match="no class probabilities"):
        cp.stored_fields({"boxes", cp.TOPK_VALUES})
    np.testing.assert_array_equal(cp.dense({"class_probs": p.astype(np.float16)}, 11), p.astype(np.float16))
    assert cp.dense(cp.encode_topk(p, 4), 11).shape == (3, 11)


def test_bytes_per_image_at_visual_genome_size() -> None:
    """100 regions x 1601 columns: dense float16 320 KB, float32 640 KB; top-32 19.6 KB."""
    enc = cp.encode_topk(softmax_rows(100, 1601), 32)
    topk = sum(a.nbytes for a in enc.values())
    assert topk == 100 * (32 * 2 + 32 * 4 + 4) == 19_600
    assert 100 * 1601 * 2 / topk > 16
