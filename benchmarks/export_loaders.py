"""Exports of the refclip-pseudo shard set read with the published loaders' parsing rules (issue 21).

    python benchmarks/export_loaders.py [--params params.yaml] [--set key=value ...] [--layout refcoco]

Needs ``grounding run refclip-pseudo`` (same params) first. Writes each export format (``simrec``,
``refclip``, ``transvg``) under ``benchmarks/out/export_loaders/<format>/``, reads every split of it with
the re-implemented loaders of ``tests/published_loaders.py`` (RefCLIP ``datasets/dataloader.py``, SimREC
``simrec/datasets/dataset.py``, TransVG ``datasets/data_loader.py``) and prints, per format: items read
without a loader error / items exported, items the export left out (boxes no reader accepts), the largest
coordinate error (px) and the lowest IoU between the box the loader ends up with (after its own
conversion: ``x2 = x + w``, and TransVG's ``np.array(bbox, dtype=int)``) and the pseudo-/GT box, and for
TransVG the same figure had the float boxes been written (the export before issue 21).
Results also go to ``benchmarks/out/export_loaders.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import published_loaders as L  # noqa: E402
from grounding import config  # noqa: E402
from grounding.boxes import paired_iou  # noqa: E402
from grounding.data.schema import CanonicalDataset  # noqa: E402
from grounding.refclip.export import FORMATS, export_pseudo, images_inside  # noqa: E402
from grounding.shards import ShardSet  # noqa: E402


def read_export(fmt: str, out: Path) -> list[tuple[str, str, np.ndarray] | tuple[str, str, None]]:
    """``(split, ref_id, loader box xyxy or None when the loader failed)`` for every exported item."""
    prov = json.loads((out / "provenance.json").read_text())
    lp = prov["loader"]
    got: list = []
    if fmt == "transvg":
        for split, rows in prov["rows"].items():
            if split == "trainval":
                continue
            items, failures = L.read_transvg(out / lp["data_root"], out / lp["split_root"], lp["dataset"], split)
            bad = {i for i, _ in failures}
            it = iter(items)
            got += [(split, rid, None if i in bad else next(it)["box_xyxy"]) for i, rid in enumerate(rows["ref_ids"])]
        return got
    doc = json.loads((out / lp["ann_path"]).read_text())
    for split, anns in doc.items():
        if fmt == "simrec":
            items, failures = L.read_simrec(out / lp["ann_path"], out / lp["image_path"], out / lp["mask_path"],
                                            lp["dataset"], split)
        else:
            items, failures = L.read_refclip(out / lp["ann_path"], out / lp["image_path"], lp["dataset"], split)
        bad = {i for i, _ in failures}
        it = iter(items)
        got += [(split, a["ref_id"], None if i in bad else next(it)["box_xyxy"]) for i, a in enumerate(anns)]
    return got


def float_cast_error(boxes: np.ndarray) -> float:
    """Largest error had the float xywh boxes been written (TransVG casts before ``x2 = x + w``)."""
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    ints = np.array(xywh, dtype=int)
    back = np.concatenate([ints[:, :2], ints[:, :2] + ints[:, 2:]], 1)
    return float(np.abs(back - boxes).max()) if len(boxes) else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--layout", default=None, help="refcoco | referit (default: refclip.export_layout)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "export_loaders"))
    args = ap.parse_args()
    p = config.load(args.params, args.sets)
    layout = args.layout or p.refclip.export_layout
    ds = CanonicalDataset.load(p.prepared_dir())
    pseudo_dir = p.teacher_dir("refclip-pseudo")
    pseudo = ShardSet(pseudo_dir)
    source = {r.ref_id: (pseudo.get(r.ref_id, ["box"])["box"] if r.split == "train" else np.asarray(r.box, np.float32))
              for r in ds.refs if (r.split == "train" and r.ref_id in pseudo) or (r.split != "train" and r.box)}
    results = []
    for fmt in FORMATS:
        out = Path(args.out) / fmt
        if out.exists():
            shutil.rmtree(out)
        export_pseudo(pseudo_dir, ds, out, fmt, layout=layout, transvg_dataset=p.refclip.transvg_dataset,
                      copy_images=images_inside(ds, p.paths.prepared))
        prov = json.loads((out / "provenance.json").read_text())
        got = read_export(fmt, out)
        ok = [(rid, b) for _, rid, b in got if b is not None]
        loader = np.array([b for _, b in ok], np.float64).reshape(-1, 4)
        truth = np.array([source[rid] for rid, _ in ok], np.float64).reshape(-1, 4)
        row = {"format": fmt, "layout": layout, "loader_dataset": prov["loader"]["dataset"],
               "exported": len(got), "read": len(ok), "left_out": len(prov["dropped"]),
               "left_out_reasons": sorted({d["reason"].split(": ", 1)[-1][:60] for d in prov["dropped"]}),
               "max_error_px": float(np.abs(loader - truth).max()) if len(ok) else None,
               "min_iou": float(paired_iou(loader.astype(np.float32), truth.astype(np.float32)).min()) if len(ok) else None,
               "stated_max_error_px": prov["box_max_error_px"]}
        if fmt == "transvg":
            row["max_error_px_had_floats_been_written"] = float_cast_error(truth)
        results.append(row)
    print(f"dataset {ds.name}: {len(ds.images)} images, {len(ds.refs)} sentences; pseudo-boxes {pseudo_dir}")
    print("| format | loader dataset | items read / exported | left out | max box error (px) | lowest IoU |")
    print("|---|---|---|---|---|---|")
    for r in results:
        extra = (f" (float boxes: {r['max_error_px_had_floats_been_written']:.2f})"
                 if "max_error_px_had_floats_been_written" in r else "")
        print(f"| {r['format']} | {r['loader_dataset']} | {r['read']} / {r['exported']} | {r['left_out']} | "
              f"{r['max_error_px']:.3g}{extra} | {r['min_iou']:.4f} |")
    dest = ROOT / "benchmarks" / "out" / "export_loaders.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"dataset": ds.name, "n_images": len(ds.images), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
