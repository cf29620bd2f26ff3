"""What the report shows, read from disk: shard sets (manifest, verification, scores, rows worst first)
and the metrics / training-curve JSON files. No drawing here."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from grounding.shards import Manifest, ShardError, ShardSet, verify_shard_set

#: 1-D per-row float fields whose values are scores (histogrammed besides every scalar float field).
SCORE_NAME = re.compile(r"score|conf|center|iou|cosine|prob", re.IGNORECASE)


@dataclass
class SetInfo:
    """One shard set as the report lists it. ``verified``: ``None`` when not checked, else the verify
    problems (empty list: OK)."""

    path: Path
    manifest: Manifest | None
    error: str = ""
    size: int = 0
    verified: list[str] | None = None

    @property
    def title(self) -> str:
        return self.manifest.stage if self.manifest else self.path.name


@dataclass
class MetricsFile:
    """A ``<name>.json`` metrics document or a ``<name>-curve.json`` training curve."""

    path: Path
    name: str
    doc: Any
    curve: bool = field(default=False)


def find_sets(roots: Iterable[str | Path], *, verify: bool = True) -> list[SetInfo]:
    """Every directory holding a ``manifest.json`` under ``roots``, sorted by path; unreadable manifests
    are kept with their error. ``verify`` re-hashes every shard (:func:`grounding.shards.verify_shard_set`)."""
    seen: dict[Path, SetInfo] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such directory (give the data directory, e.g. `data`)")
        for mpath in sorted(root.rglob("manifest.json")):
            d = mpath.parent.resolve()
            if d in seen:
                continue
            try:
                m = Manifest.load(d)
            except ShardError as e:
                seen[d] = SetInfo(mpath.parent, None, error=str(e))
                continue
            info = SetInfo(mpath.parent, m, size=sum(s.size for s in m.shards))
            if verify:
                info.verified = verify_shard_set(d).problems
            seen[d] = info
    return sorted(seen.values(), key=lambda s: str(s.path))


def find_metrics(roots: Iterable[str | Path]) -> list[MetricsFile]:
    """The JSON files in ``metrics`` directories under ``roots`` (``*-curve.json`` are curves), by name."""
    out: dict[Path, MetricsFile] = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*.json")):
            if "metrics" not in path.parent.parts or path.resolve() in out:
                continue
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            rel = path.relative_to(_metrics_root(path)).with_suffix("")
            name = str(rel)
            out[path.resolve()] = MetricsFile(path, name, doc, curve=name.endswith("-curve"))
    return sorted(out.values(), key=lambda m: m.name)


def _metrics_root(path: Path) -> Path:
    p = path.parent
    while p.name != "metrics":
        p = p.parent
    return p


def score_values(shards: ShardSet) -> dict[str, np.ndarray]:
    """Per score-like field, all its finite values as float64: every float field with scalar rows
    (ragged or not) and 1-D float fields named like scores (``SCORE_NAME``)."""
    out: dict[str, np.ndarray] = {}
    for name, spec in shards.fields.items():
        if spec.np_dtype.kind != "f":
            continue
        if not (spec.shape == () or (len(spec.shape) == 1 and not spec.ragged and SCORE_NAME.search(name))):
            continue
        col = shards.column(name)
        parts = col if isinstance(col, list) else [col]
        vals = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts]) if parts else np.zeros(0)
        out[name] = vals[np.isfinite(vals)]
    return out


def row_quality(shards: ShardSet, gt: dict[str, tuple[float, float, float, float]],
                gt_images: dict[str, np.ndarray] | None = None) -> tuple[list[str], dict[str, str]]:
    """Row keys sorted worst first and a caption per key.

    Sentence rows with a ``box``/``iou`` field: by IoU with the GT box (``gt``: ref id -> xyxy), lowest
    first. Image/region rows with ragged ``boxes`` (a detector's): by the fraction of the image's GT boxes
    (``gt_images``: image id -> (K, 4) xyxy) that a cached box covers at IoU >= 0.5. Otherwise by the first
    scalar score field (``score``, ``cosine``, ...), lowest first, or by the best of a ragged ``scores``
    field. Sets with nothing to rank keep key order. NaN sorts last."""
    keys = shards.keys
    m = shards.manifest
    quality: np.ndarray | None = None
    label = ""
    boxes_spec = shards.fields.get("boxes")
    if "iou" in shards.fields and shards.fields["iou"].shape == ():
        quality, label = np.asarray(shards.column("iou"), dtype=np.float64), "IoU"
    elif m.level == "sentence" and "box" in shards.fields and gt:
        boxes = np.asarray(shards.column("box"), dtype=np.float64).reshape(-1, 4)
        quality = np.array([_iou(b, gt[k]) if k in gt else math.nan for k, b in zip(keys, boxes)])
        label = "IoU"
    elif (m.level in ("image", "region") and gt_images and boxes_spec is not None and boxes_spec.ragged
          and m.teacher.get("name") != "ground-truth"):
        col = shards.column("boxes")
        quality = np.array([_recall(np.asarray(c, dtype=np.float64).reshape(-1, 4), gt_images[k])
                            if k in gt_images and len(gt_images[k]) else math.nan for k, c in zip(keys, col)])
        label = "GT recall@0.5"
    else:
        for name, spec in shards.fields.items():
            if spec.np_dtype.kind == "f" and spec.shape == () and SCORE_NAME.search(name):
                col = shards.column(name)
                if spec.ragged:
                    quality = np.array([float(np.max(c)) if len(c) else math.nan for c in col])
                    label = f"max {name}"
                else:
                    quality, label = np.asarray(col, dtype=np.float64), name
                break
    if quality is None:
        return list(keys), {}
    order = sorted(range(len(keys)), key=lambda i: (math.isnan(quality[i]), quality[i]))
    captions = {keys[i]: f"{label} {quality[i]:.2f}" for i in order}
    return [keys[i] for i in order], captions


def _recall(cand: np.ndarray, gt: np.ndarray, thr: float = 0.5) -> float:
    """Fraction of the GT boxes ``(K, 4)`` with a candidate ``(N, 4)`` at IoU >= ``thr`` (xyxy pixels)."""
    if len(cand) == 0:
        return 0.0
    lt = np.maximum(gt[:, None, :2], cand[None, :, :2])  # [K,N,2]
    rb = np.minimum(gt[:, None, 2:], cand[None, :, 2:])  # [K,N,2]
    inter = np.clip(rb - lt, 0, None).prod(-1)  # [K,N]
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    iou = inter / np.maximum(area(gt)[:, None] + area(cand)[None, :] - inter, 1e-9)
    return float((iou.max(axis=1) >= thr).mean())


def _iou(a: np.ndarray, b: tuple[float, float, float, float]) -> float:
    """IoU of two xyxy boxes (original pixels)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def scalar_items(doc: Any, prefix: str = "", limit: int = 200) -> list[tuple[str, Any]]:
    """Flatten a JSON document to ``[("a.b.c", scalar)]`` (at most ``limit`` entries)."""
    out: list[tuple[str, Any]] = []

    def walk(v: Any, p: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(v, dict):
            for k in sorted(v):
                walk(v[k], f"{p}.{k}" if p else str(k))
        elif isinstance(v, list):
            if all(not isinstance(x, (dict, list)) for x in v) and len(v) <= 8:
                out.append((p, v))
            else:
                out.append((p, f"<list of {len(v)}>"))
        else:
            out.append((p, v))

    walk(doc, prefix)
    return out


def curve_series(doc: Any) -> dict[str, list[dict[str, float]]]:
    """A curve document as ``{series label: [row, ...]}``: a list of per-epoch dicts is grouped by its
    non-numeric keys and by ``seed`` (``{"": rows}`` when there is none); a dict of such lists is one
    series per key."""
    if isinstance(doc, dict):
        out: dict[str, list[dict[str, float]]] = {}
        for k, v in doc.items():
            for sub, rows in curve_series(v).items():
                out[f"{k} {sub}".strip()] = rows
        return out
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        return {}
    groups: dict[str, list[dict[str, float]]] = {}
    for r in doc:
        tag = " ".join(f"{k}={r[k]}" for k in sorted(r)
                       if k == "seed" or not isinstance(r[k], (int, float)) or isinstance(r[k], bool))
        groups.setdefault(tag, []).append(r)
    return groups
