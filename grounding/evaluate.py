"""Acc@0.5: the fraction of predictions whose IoU with the GT box (original pixels, xyxy) is >= 0.5."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from grounding.boxes import paired_iou


def accuracy(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> float:
    """Acc@``threshold`` of ``(N, 4)`` predicted vs GT xyxy boxes; NaN for N = 0."""
    if len(pred) == 0:
        return float("nan")
    return float((paired_iou(pred, gt) >= threshold).mean())


def per_split(pred: Mapping[str, np.ndarray], gt: Mapping[str, np.ndarray], split: Mapping[str, str],
              threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """``{split: {"acc": Acc@thr, "n": count}}`` over the keys present in ``pred`` and ``gt``."""
    keys: dict[str, list[str]] = {}
    for k in pred:
        if k in gt:
            keys.setdefault(split[k], []).append(k)
    out: dict[str, dict[str, float]] = {}
    for s, ks in sorted(keys.items()):
        p = np.stack([pred[k] for k in ks])
        g = np.stack([gt[k] for k in ks])
        out[s] = {"acc": round(accuracy(p, g, threshold), 4), "n": len(ks)}
    return out


def covered(candidates: Sequence[np.ndarray], gt: np.ndarray, threshold: float = 0.5) -> float:
    """Upper bound: fraction of rows whose GT box is matched at IoU >= thr by any of its candidate boxes."""
    from grounding.boxes import box_iou

    hits = [len(c) > 0 and float(box_iou(c, g[None]).max()) >= threshold for c, g in zip(candidates, gt)]
    return float(np.mean(hits)) if hits else float("nan")


# ---- the students' table (stage ``evaluate``) ----------------------------------------------------------------
SPLIT_ORDER = ("train", "val", "test", "testA", "testB")


def _split_columns(docs: Mapping[str, Mapping]) -> list[str]:
    splits: set[str] = set()
    for d in docs.values():
        splits |= set(d.get("acc50", {}))
        for b in d.get("baselines", {}).values():
            splits |= set(b)
    return [s for s in SPLIT_ORDER if s in splits] + sorted(splits - set(SPLIT_ORDER))


def students_table(docs: Mapping[str, Mapping]) -> str:
    """Markdown table of Acc@0.5 (%): one row per student (``docs``: stage -> its metrics json) and one per
    baseline of it; columns are splits."""
    cols = _split_columns(docs)
    fmt = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for stage, d in docs.items():
        lines.append(f"| {stage} | " + " | ".join(fmt(d.get("acc50", {}).get(c)) for c in cols) + " |")
        for name, b in d.get("baselines", {}).items():
            lines.append(f"| {stage} · baseline: {name} | " + " | ".join(fmt(b.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def run_evaluate(params) -> "Path":  # noqa: ANN001
    """Stage ``evaluate``: reads ``data/metrics/<stage>.json`` of every registered ``student-*`` stage and
    writes ``data/metrics/students.json`` (stage -> acc50 / n / baselines) and ``students.md`` (the table).
    A student whose metrics file is missing is listed under ``missing`` (and logged), not guessed."""
    import json
    import logging
    from pathlib import Path

    from grounding.stages import STAGES

    metrics = Path(params.paths.metrics)
    docs, missing = {}, []
    for stage in sorted(n for n in STAGES if n.startswith("student-")):
        path = metrics / f"{stage}.json"
        if not path.is_file():
            missing.append(stage)
            continue
        d = json.loads(path.read_text())
        docs[stage] = {k: d.get(k, {}) for k in ("acc50", "n", "baselines")}
    if missing:
        logging.getLogger(__name__).warning("evaluate: no metrics yet for %s (run those stages first)", missing)
    out = metrics / "students.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps({"students": docs, "missing": missing}, indent=1, sort_keys=True) + "\n"),
                       (metrics / "students.md", students_table(docs))):
        if not path.is_file() or path.read_text() != text:  # unchanged: leave the file (and its mtime) alone
            path.write_text(text)
    return out
