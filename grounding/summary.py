"""The end-of-run table of `grounding demo`: per stage its rows, seconds, whether its output was reused
(cache hit) or computed, and one headline figure read from what the stage wrote."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from grounding.config import Params


@dataclass(frozen=True)
class StageSummary:
    """One stage of a run. ``status``: ``"cache hit"`` (the engine found it current) or ``"computed"``."""

    stage: str
    out: Path
    rows: int | None
    seconds: float
    status: str
    metric: str


def timed_run(name: str, params: Params, run: Callable[[str, Params], Any]) -> StageSummary:
    """Run stage ``name`` through ``run(name, params)`` (a :class:`grounding.stages.StageResult`) and
    summarise it; "computed" unless the engine reported a cache hit."""
    t0 = time.time()
    result = run(name, params)
    seconds = time.time() - t0
    out = Path(result.path)
    computed = not result.hit
    rows = None
    if (out / "manifest.json").is_file():
        from grounding.shards import Manifest

        rows = Manifest.load(out).n_rows
    return StageSummary(name, out, rows, round(seconds, 1), "computed" if computed else "cache hit",
                        headline(name, params, out))


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _split(d: dict[str, Any]) -> str | None:
    """The split a headline reports: val when present, else the first."""
    return "val" if "val" in d else next(iter(sorted(d)), None)


def headline(stage: str, params: Params, out: Path) -> str:
    """One figure for the stage, from its metrics file or provenance; ``-`` when it has none."""
    try:
        return _headline(stage, params, out) or "-"
    except Exception as e:  # a summary never fails the run it summarises
        return f"({type(e).__name__})"


def _headline(stage: str, params: Params, out: Path) -> str | None:
    metrics = Path(params.paths.metrics)
    if stage.startswith("student-"):
        acc = (_read(metrics / f"{stage}.json") or {}).get("acc50") or {}
        s = _split(acc)
        return f"Acc@0.5 {s} {100 * acc[s]:.1f} %" if s else None
    if stage == "evaluate":
        docs = (_read(metrics / "students.json") or {}).get("students") or {}
        vals = {k: v["acc50"]["val"] for k, v in docs.items() if "val" in v.get("acc50", {})}
        if vals:
            best = max(vals, key=vals.get)
            return f"{len(docs)} students, best val {100 * vals[best]:.1f} % ({best})"
        return f"{len(docs)} students" if docs else None
    if stage == "refclip-pseudo":
        doc = (_read(metrics / "refclip.json") or {}).get("refclip") or {}
        s = _split(doc)
        return f"pseudo-box Acc@0.5 {s} {100 * doc[s]['acc']:.1f} %" if s else None
    if stage == "clip-eval":
        doc = _read(metrics / "clip.json") or {}
        if "text_to_image_r5" in doc:
            return f"text→image R@5 {doc['text_to_image_r5']:.3f} (chance {doc['text_to_image_r5_chance']:.3f})"
        return None
    if stage == "wordnet-labels":
        doc = _read(metrics / stage / f"{params.dataset.name}.json") or {}
        return f"coverage {doc['coverage']:.3f}" if "coverage" in doc else None
    if stage in ("frcnn-proposals", "fcos-points", "yolo-anchors") and (out / "manifest.json").is_file():
        from grounding.data.schema import CanonicalDataset
        from grounding.shards import ShardSet
        from grounding.teachers.detectors.recall import proposal_recall

        with ShardSet(out) as shards:
            r = proposal_recall(shards, CanonicalDataset.load(params.prepared_dir()), "val")
        return f"recall@0.5 val {r['recall']:.3f}" if r["gt_boxes"] else None
    if stage.startswith("bootstrap-") and out.is_file():
        from grounding.artefacts import read_provenance

        prov = read_provenance(out)
        for d in (prov, prov.get("provenance", {}), prov.get("provenance", {}).get("training", {}),
                  prov.get("training", {})):
            if isinstance(d, dict) and "final_loss" in d:
                return f"final loss {d['final_loss']:.3f}"
    return None
