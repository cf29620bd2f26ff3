"""Markdown tables of ``benchmarks/out/gpu_check.json`` (``benchmarks/gpu_check.py``) for the README.

    python benchmarks/gpu_check_table.py [benchmarks/out/gpu_check.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def tables(doc: dict[str, Any]) -> str:
    """The stage table (seconds, status) and the throughput table (stage vs bare images/s)."""
    head = (f"GPU check on {doc.get('gpu') or doc['device']}, torch {doc['torch']}, {doc['images']} synthetic images, "
            f"{doc['models']['frcnn']} / {doc['models']['fcos']} / darknet YOLOv3 width {doc['models']['yolo_width']} / "
            f"CLIP {doc['models']['clip']} (random weights), students and RefCLIP 1 epoch in {doc['precision']}; "
            f"total {doc['total_s']} s (budget {doc['budget_s']} s)")
    out = [head, "", "| stage | seconds | status |", "|---|---:|---|"]
    for r in doc["stages"]:
        status = r["status"] + (f": {r['error'][:120]}" if r.get("error") else "")
        out.append(f"| {r['name']} | {r.get('seconds', '-')} | {status.replace('|', '/')} |")
    out += ["", "| teacher | bare images/s | stage images/s | stage ÷ bare |", "|---|---:|---:|---:|"]
    for r in doc["throughput"]:
        if r["status"] != "ok":
            out.append(f"| {r['name']} | - | - | {r['status']} |")
        else:
            out.append(f"| {r['name']} | {r['bare_images_per_s']} | {r['stage_images_per_s']} | {r['ratio']} |")
    return "\n".join(out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="?", type=Path, default=Path("benchmarks/out/gpu_check.json"))
    path = ap.parse_args().json
    if not path.is_file():
        print(f"error: {path} not found: run benchmarks/gpu_check.sh first", file=sys.stderr)
        raise SystemExit(1)
    print(tables(json.loads(path.read_text())))
