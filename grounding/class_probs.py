"""Detector class posteriors p(z | x) per region: dense, or top-k + residual mass (issue 23).

A Visual Genome detector has 1600 classes + background: dense probabilities are 100 x 1601 values per image
(320 KB as float16, 640 KB as float32), more than every other field together. ``teachers.frcnn.class_probs:
topk`` stores, per region, the ``k`` largest probabilities as float16 (``class_probs_topk``), their column
indices as int32 (``class_probs_index``; float16 cannot index past 2048 exactly) and the probability mass
outside them as float32 (``class_probs_rest`` = 1 - sum of the top k, from the float32 softmax). The
consumer rebuilds a dense ``(K, C)`` float32 array with the residual spread evenly over the other C - k
columns (each row still sums to 1 up to float16 rounding). Columns are background-first, as the dense
``class_probs`` field. Pure NumPy: shared by the teachers that write and the students that read.
"""

from __future__ import annotations

from typing import Collection, Mapping

import numpy as np

DENSE = "class_probs"
TOPK_VALUES, TOPK_INDEX, TOPK_REST = "class_probs_topk", "class_probs_index", "class_probs_rest"
TOPK_FIELDS = (TOPK_VALUES, TOPK_INDEX, TOPK_REST)


def encode_topk(probs: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """``(K, C)`` probabilities -> the three top-k fields: values ``(K, k)`` float16 in decreasing order
    (ties: lower column first), indices ``(K, k)`` int32, residual mass ``(K,)`` float32 (>= 0). ``k`` is
    capped at C."""
    p = np.asarray(probs, np.float32)
    if p.ndim != 2:
        raise ValueError(f"class probabilities must be (K, C), got shape {p.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top-k needs an integer k >= 1, got {k!r}")
    k = min(int(k), p.shape[1])
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(p, idx, 1)
    rest = np.clip(1.0 - vals.sum(1, dtype=np.float64), 0.0, None).astype(np.float32)
    return {TOPK_VALUES: vals.astype(np.float16), TOPK_INDEX: idx.astype(np.int32), TOPK_REST: rest}


def decode_topk(values: np.ndarray, index: np.ndarray, rest: np.ndarray, n_columns: int) -> np.ndarray:
    """The dense ``(K, n_columns)`` float32 probabilities: the stored top k, the residual mass spread evenly
    over the other ``n_columns - k`` columns."""
    v, idx, r = np.asarray(values, np.float32), np.asarray(index), np.asarray(rest, np.float32)
    if v.shape != idx.shape or v.ndim != 2 or r.shape != v.shape[:1]:
        raise ValueError(f"top-k fields disagree: values {v.shape}, index {idx.shape}, rest {r.shape}")
    kk = v.shape[1]
    if len(idx) and (idx.min() < 0 or idx.max() >= n_columns):
        raise ValueError(f"top-k index out of range for {n_columns} columns: {idx.min()}..{idx.max()}")
    out = np.zeros((v.shape[0], n_columns), np.float32)
    if n_columns > kk:
        out += (r / (n_columns - kk))[:, None]
    np.put_along_axis(out, idx.astype(np.int64), v, 1)
    return out


def stored_fields(fields: Collection[str]) -> list[str]:
    """The class-probability fields a shard set holds: ``[class_probs]`` or the three top-k fields."""
    if DENSE in fields:
        return [DENSE]
    if all(f in fields for f in TOPK_FIELDS):
        return list(TOPK_FIELDS)
    raise ValueError(f"no class probabilities: neither {DENSE!r} nor {list(TOPK_FIELDS)} among fields {sorted(fields)}")


def dense(row: Mapping[str, np.ndarray], n_columns: int) -> np.ndarray:
    """``(K, n_columns)`` float32 p(z | x) of one row in either encoding (dense: as stored)."""
    if DENSE in row:
        return np.asarray(row[DENSE], np.float32)
    return decode_topk(row[TOPK_VALUES], row[TOPK_INDEX], row[TOPK_REST], n_columns)
