"""Diagnostic: does the PBREC point head learn to rank the cached FCOS P5 points? Trains ``student-pbrec``'s
model (the params' recipe, overridable) on the first N_IMAGES training images (0: all of them) and reports,
on those sentences and on the val split: Acc@0.5 of the IoU-voted box, ``hit1`` (the top-scored point is a
center-ness positive: inside the GT box and its 3g centre square), ``top1_target`` (mean center-ness
target at the top-scored point), and ``text_dep`` (mean over images of the score-map spread across the
image's sentences divided by the spread across points: 0 = the head ignores the query). Needs the
``fcos-points`` shard set (``grounding run fcos-points``).

    python benchmarks/pbrec_overfit.py EPOCHS N_IMAGES [key=value ...]
    python benchmarks/pbrec_overfit.py 40 8 students.pbrec.head_prior=null   # paper recipe, torch init:
                                                   # measured train Acc@0.5 0.100, hit1 0.067 (BCE 1.29 -> 0.64)
    python benchmarks/pbrec_overfit.py 40 8 students.pbrec.head_prior=null students.pbrec.lr=0.0005 \
        students.pbrec.lr_backbone=0.0005 students.pbrec.lr_schedule=step "students.pbrec.lr_drop=[30]"
                                                   # measured 0.067, hit1 0.017 (BCE -> 0.24)
    python benchmarks/pbrec_overfit.py 40 8        # head_prior 0.01 (default): 0.267, hit1 0.267 (0.16 -> 0.14)
"""
import argparse
import time

import numpy as np
import torch

from grounding import config
from grounding.data.schema import CanonicalDataset
from grounding.students import common as C
from grounding.students import pbrec as P
from grounding.students import rec as R


def _scores(model: P.PointStudent, data: P.PointData, pp: object, ds: CanonicalDataset) -> dict:
    pred = P.predict_points(model, data, pp)
    acc = C.acc_per_split(pred, ds)[0]
    hits, tops, spread = [], [], {}
    with torch.no_grad():
        for batch in C.image_batches(data.rec.image_of, 16, torch.Generator().manual_seed(0)):
            s = P.point_scores(data.forward(model, batch)["point_logits"], pp.score)  # [B,P]
            for row, i in enumerate(batch):
                si = s[row].masked_fill(~data.inside[int(i)], -1.0)
                k = int(torch.argmax(si))
                t = float(data.targets[int(i), k, 0])
                hits.append(t > 0)
                tops.append(t)
                spread.setdefault(data.rec.image_of[int(i)], []).append(s[row].numpy())
    dep = [np.std(np.stack(v), axis=0).mean() / max(np.std(np.stack(v), axis=1).mean(), 1e-12)
           for v in spread.values() if len(v) > 1]
    return {"acc50": acc, "hit1": round(float(np.mean(hits)), 3), "top1_target": round(float(np.mean(tops)), 3),
            "text_dep": round(float(np.mean(dep)), 3) if dep else None, "n": len(hits)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("epochs", type=int, help="students.pbrec.epochs")
    ap.add_argument("n_images", type=int, help="first N training images (0: all)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of params.yaml")
    a = ap.parse_args()
    torch.set_num_threads(1)
    p = config.load("params.yaml", [f"students.pbrec.epochs={a.epochs}", "progress=false", *a.overrides])
    pp = p.students.pbrec
    ds = CanonicalDataset.load(p.prepared_dir())
    train = [r for r in C.split_refs(ds, pp.train_split) if r.box is not None]
    ims = sorted({r.image_id for r in train})
    ims = set(ims[:a.n_images] if a.n_images else ims)
    refs = [r for r in train if r.image_id in ims]
    val = [r for r in C.split_refs(ds, "val") if r.box is not None]
    fcos = C.teacher_set(p, pp.points_from, sorted({r.image_id for r in ds.refs}), ds, "pbrec_overfit")
    cfg = R.RecConfig.from_params(pp, ds)
    tok = R.Tokenizer(cfg)
    canvases = C.Canvases(ds, pp.input_size)
    grid = (pp.input_size // pp.visual_stride,) * 2
    on_train = P.PointData(R.RecBatches(ds, refs, canvases, tok), fcos, with_targets=True, grid=grid)
    on_val = P.PointData(R.RecBatches(ds, val, canvases, tok), fcos, with_targets=True, grid=grid)
    t0 = time.time()
    model, curve = P.train_pbrec(on_train, pp, 0)
    print(f"epochs {a.epochs} images {len(ims)} refs {len(refs)} ({time.time() - t0:.0f} s) "
          f"lr {pp.lr} lr_backbone {pp.lr_backbone} schedule {pp.lr_schedule}; "
          f"first epoch {curve[0]}; last epoch {curve[-1]}")
    print(f"train {_scores(model, on_train, pp, ds)}")
    print(f"val {_scores(model, on_val, pp, ds)}", flush=True)


if __name__ == "__main__":
    main()
