"""Diagnostic: RefCLIP's training dynamics, and what its cached inputs allow when the answer is given.

    python benchmarks/refclip_probe.py --mode weak|supervised [--set key=value ...] [--out FILE.json]

Reads the prepared dataset and the ``yolo-anchors`` set the params name (e.g. ``--set
paths.teachers=benchmarks/out/refclip_compare/multiscale/teachers``) and trains the ``refclip.features`` model
with the ``refclip`` recipe, printing per epoch the loss and Acc@0.5 of the pick on train and val (GT boxes
are read only for these figures):

- ``weak``: ``refclip-train``'s own training (:func:`grounding.refclip.train.train_refclip`, the configured
  ``refclip.loss``), i.e. the pseudo-label accuracy by epoch.
- ``supervised``: the same model and recipe, but the loss is cross-entropy over the sentence's own image's
  kept cells with the GT cell as target (the kept cell whose box — its highest-objectness valid prediction,
  the box inference returns — has the highest IoU with GT, if >= 0.5; other sentences are not trained on). A
  ceiling for any grounding head on these features: if it stays near the most confident cell, the features
  (not the weak loss) are what holds RefCLIP back.

Also prints the *cell* upper bound (some kept cell's returned box hits GT), tighter than ``refclip.json``'s
``upper_bound`` (any of the 4 boxes of a kept cell).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from grounding import config as C
from grounding.boxes import box_iou
from grounding.data.schema import CanonicalDataset
from grounding.evaluate import accuracy
from grounding.refclip.anchors import load_anchor_table
from grounding.refclip.recipe import make_ema, make_optimizer, optimiser_step
from grounding.refclip.text import build_vocab, encode
from grounding.refclip.train import batches, best_anchor, model_config, train_refclip
from grounding.refclip.model import build_model
from grounding.runtime import seed_everything
from grounding.shards import ShardSet


def cell_targets(table, rows: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per sentence: index of the kept cell whose returned box has the highest IoU with GT (>= 0.5), else -1."""
    out = np.full(len(rows), -1, np.int64)
    for s, (r, g) in enumerate(zip(rows, gt)):
        valid = table.mask[r].numpy()
        iou = np.where(valid, box_iou(table.boxes[r], g[None])[:, 0], -1.0)
        if iou.max() >= 0.5:
            out[s] = int(iou.argmax())
    return out


def supervised_train(table, texts, rows, targets, rp, seed: int, vocab, on_epoch):
    """The multiscale/p5 model trained by cross-entropy over its own image's kept cells (target given)."""
    gen = seed_everything(seed)
    model = build_model(model_config(table, None, vocab, rp)).train()
    ids, _ = encode(texts, vocab, rp.max_len)
    keep = torch.as_tensor(np.flatnonzero(targets >= 0))
    rows_t, tgt = torch.as_tensor(rows), torch.as_tensor(targets)
    steps = len(batches(len(keep), rp.batch_size, torch.Generator().manual_seed(0)))
    opt, sched = make_optimizer(model, rp, steps)
    ema = make_ema(model, rp.ema_decay)
    curve = []
    for epoch in range(rp.epochs):
        total = 0.0
        for b in batches(len(keep), rp.batch_size, gen):
            s = keep[b]
            r = rows_t[s]
            a = model.embed_anchors(table.visual(r))  # [B,K,H]
            sc = torch.einsum("bkh,bh->bk", a, model.embed_text(ids[s])).masked_fill(~table.mask[r], -1e9)
            loss = F.cross_entropy(sc, tgt[s])
            optimiser_step(loss, model, opt, sched, ema, rp.grad_clip)
            total += loss.item() * len(b)
        evaluated = ema.module if ema is not None else model
        curve.append({"epoch": epoch + 1, "loss": round(total / max(len(keep), 1), 4), **on_epoch(evaluated.eval())})
        evaluated.train()
        print(json.dumps(curve[-1]), flush=True)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("weak", "supervised"), required=True)
    ap.add_argument("--set", action="append", default=[], help="params override (key=value)")
    ap.add_argument("--out", type=Path, help="write the curve and the bounds here (JSON)")
    a = ap.parse_args()
    params = C.load("params.yaml", ["progress=false", *a.set])
    rp = params.refclip
    ds = CanonicalDataset.load(params.prepared_dir())
    anchors = ShardSet(params.teacher_dir(rp.anchors_from))
    table = load_anchor_table(anchors, sorted(im.image_id for im in ds.images), rp.features)
    table.preload()
    row = table.row
    refs = {sp: [r for r in ds.refs if r.split == sp and r.box is not None and r.image_id in row]
            for sp in ("train", "val")}
    data = {}
    for sp, rs in refs.items():
        rows = np.array([row[r.image_id] for r in rs])
        gt = np.array([r.box for r in rs], np.float32)
        data[sp] = ([r.text for r in rs], rows, gt, cell_targets(table, rows, gt))
    bounds = {sp: round(float((d[3] >= 0).mean()), 4) for sp, d in data.items()}
    conf = {}
    for sp, (_, rows, gt, _) in data.items():
        best = np.where(table.mask[rows].numpy(), table.confidence[rows], -np.inf).argmax(1)
        conf[sp] = round(accuracy(table.boxes[rows, best], gt), 4)
    print(json.dumps({"cell_upper_bound": bounds, "most_confident_cell": conf}), flush=True)
    vocab = build_vocab(r.text for r in ds.refs)  # as refclip-train: every sentence, all splits

    def on_epoch(model) -> dict[str, float]:
        out = {}
        for sp, (texts, rows, gt, tgt) in data.items():
            pick = best_anchor(model, table, texts, rows.tolist(), vocab)[0].numpy()
            box = table.boxes[rows, pick]
            out[f"{sp}_acc"] = round(accuracy(box, gt), 4)
        return out

    t0 = time.perf_counter()
    if a.mode == "weak":
        texts, rows = data["train"][0], data["train"][1]

        def log_epoch(model):
            out = on_epoch(model)
            print(json.dumps(out), flush=True)
            return out

        _, _, curve = train_refclip(table, texts, rows.tolist(), rp, seed=params.seed,
                                    device=torch.device("cpu"), progress=False, vocab=vocab, on_epoch=log_epoch)
    else:
        curve = supervised_train(table, data["train"][0], data["train"][1], data["train"][3], rp,
                                 params.seed, vocab, on_epoch)
    result = {"mode": a.mode, "sets": a.set, "seconds": round(time.perf_counter() - t0, 1),
              "cell_upper_bound": bounds, "most_confident_cell": conf, "curve": curve}
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
