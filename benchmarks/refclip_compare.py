"""RefCLIP Acc@0.5 side by side: ``refclip.features: p5-cells`` (ultralytics cache) and ``multiscale`` (darknet
cache, RefCLIP's Net as published), each beside the random kept cell, the most confident kept cell and the
upper bound, per split (train = the pseudo-labels). One run each, same dataset and seed.

    python benchmarks/refclip_compare.py [--set key=value ...] [--p5 key=value ...] [--ms key=value ...]

Each variant runs its own chain (``yolo-anchors`` → ``refclip-train`` → ``refclip-pseudo``; upstream stages such
as the detector bootstraps are reused or built as ``grounding run`` would) in its own ``paths.teachers`` /
``paths.models`` / ``paths.metrics`` under ``benchmarks/out/refclip_compare/<variant>/`` (the prepared dataset
and the bootstrapped detectors are shared). Writes ``benchmarks/out/refclip_compare.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from grounding import config as C
from grounding import stages

VARIANTS = {
    "p5-cells": ["teachers.yolo.backend=ultralytics", "refclip.features=p5-cells"],
    "multiscale": ["teachers.yolo.backend=darknet", "refclip.features=multiscale"],
}
COLUMNS = ("acc", "random_anchor", "most_confident_anchor", "upper_bound")


def run_variant(name: str, base: list[str], extra: list[str], out: Path) -> dict:
    root = out / name
    sets = ["progress=false", *base, *VARIANTS[name], *extra,
            *(f"paths.{k}={root / k}" for k in ("teachers", "metrics")), f"paths.models={root / 'models'}"]
    params = C.load("params.yaml", sets)
    t0 = time.perf_counter()
    for stage in stages.plan(["refclip-pseudo"]):  # prepare, bootstrap-yolo, yolo-anchors, refclip-train, ...
        stages.run(stage, params)
    report = json.loads((Path(params.paths.metrics) / "refclip.json").read_text())
    return {"sets": sets, "seconds": round(time.perf_counter() - t0, 1), **report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], help="override for both variants")
    ap.add_argument("--p5", action="append", default=[], help="override for p5-cells only")
    ap.add_argument("--ms", action="append", default=[], help="override for multiscale only")
    ap.add_argument("--only", choices=sorted(VARIANTS), action="append", help="run only these variants")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/refclip_compare"))
    a = ap.parse_args()
    results = {}
    for name in a.only or list(VARIANTS):
        results[name] = run_variant(name, a.set, a.p5 if name == "p5-cells" else a.ms, a.out)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| split | " + " | ".join(f"{v}: RefCLIP / random / most confident / upper" for v in results) + " |")
    splits = sorted({s for r in results.values() for s in r["refclip"]})
    for s in splits:
        cells = [" / ".join(f"{r['refclip'][s][c]:.3f}" for c in COLUMNS) if s in r["refclip"] else "-"
                 for r in results.values()]
        print(f"| {s} | " + " | ".join(cells) + " |")
    for v, r in results.items():
        val = r["refclip"].get("val")
        if val and val["most_confident_anchor"]:
            print(f"{v}: val RefCLIP / most confident = {val['acc'] / val['most_confident_anchor']:.2f}x "
                  f"({r['seconds']} s)")


if __name__ == "__main__":
    main()
