"""Diagnostic: how far does the REC trunk get on GT boxes? Fits the box-regression pipeline (letterbox,
targets, loss, optimiser) on the first N_IMAGES training images (0: all of them) and reports Acc@0.5 and
mean IoU on those sentences and on the val split, plus the correlation of predicted and GT box centres on
val (does the trunk look in the right place even when the box is not good enough for IoU 0.5?).

    python benchmarks/rec_overfit.py SIZE EPOCHS N_IMAGES [key=value ...]
    python benchmarks/rec_overfit.py 128 300 8     # measured: train Acc@0.5 0.767, mIoU 0.678 (300 steps)
    python benchmarks/rec_overfit.py 128 60 8      # measured: 0.000, mIoU 0.082 (60 steps)
    python benchmarks/rec_overfit.py 128 100 0 students.rec.visual_stride=16
                                                   # measured: see README "Students"
"""
import argparse
import time

import numpy as np
import torch

from grounding import config
from grounding.boxes import paired_iou
from grounding.data.schema import CanonicalDataset
from grounding.students import common as C
from grounding.students import rec as R


def _scores(model: torch.nn.Module, data: R.RecBatches) -> dict:
    pred = R.predict_boxes(model, data)
    refs = data.refs
    p = np.stack([pred[r.ref_id] for r in refs]).astype(np.float32)
    g = np.stack([r.box for r in refs]).astype(np.float32)
    iou = paired_iou(p, g)
    pc, gc = (p[:, :2] + p[:, 2:]) / 2, (g[:, :2] + g[:, 2:]) / 2
    corr = [float(np.corrcoef(pc[:, k], gc[:, k])[0, 1]) for k in (0, 1)]
    return {"acc50": round(float(np.mean(iou >= 0.5)), 3), "miou": round(float(iou.mean()), 3),
            "centre_corr_xy": [round(c, 3) for c in corr], "n": len(refs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("size", type=int, help="students.rec.input_size")
    ap.add_argument("epochs", type=int, help="students.rec.epochs")
    ap.add_argument("n_images", type=int, help="first N training images (0: all)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of params.yaml")
    a = ap.parse_args()
    torch.set_num_threads(1)
    size, epochs, nimg = a.size, a.epochs, a.n_images
    p = config.load("params.yaml", [f"students.rec.input_size={size}", f"students.rec.epochs={epochs}",
                                    "students.rec.random_resize=[]", f"students.rec.lr_drop=[{epochs * 9 // 10}]",
                                    "progress=false", *a.overrides])
    ds = CanonicalDataset.load(p.prepared_dir())
    train = [r for r in C.split_refs(ds, "train") if r.box is not None]
    ims = sorted({r.image_id for r in train})
    ims = set(ims[:nimg] if nimg else ims)
    refs = [r for r in train if r.image_id in ims]
    gt = np.stack([r.box for r in refs]).astype(np.float32)
    t0 = time.time()
    model, ema, curve, tok = R.train_rec_pseudo(ds, refs, gt, p.students.rec, 0)
    val = [r for r in C.split_refs(ds, "val") if r.box is not None]
    canvases = C.Canvases(ds, size)
    on_train, on_val = R.RecBatches(ds, refs, canvases, tok), R.RecBatches(ds, val, canvases, tok)
    print(f"size {size} epochs {epochs} images {len(ims)} refs {len(refs)} ({time.time() - t0:.0f} s); "
          f"last epoch {curve[-1] if curve else None}")
    for name, m in (("raw", model), ("ema", ema)):
        print(f"{name}: train {_scores(m, on_train)} val {_scores(m, on_val)}", flush=True)


if __name__ == "__main__":
    main()
