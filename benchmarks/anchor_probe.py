"""Diagnostic: what do the cached YOLO anchor features carry? A linear probe (held-out fifth of the images)
reading the colour and the shape class of the synthetic object each kept anchor overlaps (IoU >= 0.3),
against the majority class. RefCLIP can only match sentences to what the anchor features encode.

    python benchmarks/anchor_probe.py [ANCHORS] [--model refclip.pt] [--pseudo refclip-pseudo/synthetic]

``ANCHORS``: a ``yolo-anchors`` shard set of either backend (default ``data/teachers/yolo-anchors/synthetic``).
For the darknet (``multiscale``) cache the probe reads, at each kept stride-32 cell, the ``map_s32`` vector,
``map_s16`` / ``map_s8`` averaged over the cell's 2x2 / 4x4 block, their concatenation, the mean RGB of the
image inside the cell's box (a pixel control: the colour is there to be read) and, with ``--model`` (a
``refclip-train`` checkpoint of the multiscale model), the trained fusion's output and ``linear_vs``'s.
``--pseudo``: a ``refclip-pseudo`` shard set; prints its Acc@0.5 per split and per sentence kind (the
generator's ``noun | colour | size | superlative | extreme | relation``) beside the most confident kept cell.

Synthetic dataset only (the generator gives each object's colour). Measured on the default (240 images),
ultralytics cache: 10-epoch bootstrap: colour 0.355 (majority 0.281), shape 0.048 (0.16); 40-epoch: colour
0.156 (0.176), shape 0.277 (0.152); 40-epoch with ``teachers.yolo.bootstrap.labels=colour-shape``: colour
0.258 (0.175), shape 0.163 (0.135). Darknet cache: README, "RefCLIP as published".
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from grounding.data.schema import CanonicalDataset
from grounding.data.synthetic import CLASSES, COLOUR_NAMES, SyntheticConfig, index_of, synthesize_image
from grounding.refclip.anchors import cache_kind, load_anchor_table
from grounding.shards import ShardSet

MIN_IOU = 0.3


def linear_probe(x: torch.Tensor, y: torch.Tensor, held: torch.Tensor, steps: int = 300) -> tuple[float, float]:
    """Held-out accuracy of a standardised linear classifier (Adam, 300 full-batch steps) and the majority's."""
    mu, sd = x[~held].mean(0), x[~held].std(0) + 1e-6
    x = (x - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(lin(x[~held]), y[~held])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (lin(x[held]).argmax(1) == y[held]).float().mean().item()
    maj = torch.bincount(y[held]).max().item() / max(int(held.sum()), 1)
    return acc, maj


def _labels(boxes: np.ndarray, objects) -> tuple[np.ndarray, np.ndarray]:
    """Per box: index of the object it overlaps most (IoU >= MIN_IOU, else -1)."""
    gb = torch.tensor(np.stack([o.box for o in objects]), dtype=torch.float32)
    v, j = box_iou(torch.as_tensor(boxes, dtype=torch.float32), gb).max(1)
    return np.where(v.numpy() >= MIN_IOU, j.numpy(), -1), v.numpy()


def p5_samples(anchors: ShardSet, ds: CanonicalDataset, cfg: SyntheticConfig):
    """``{"features": X}``, colour, shape, held-out flags of the ultralytics cache's kept anchors."""
    x, yc, ys, held = [], [], [], []
    for im in ds.images:
        i = index_of(im.image_id)
        s = synthesize_image(cfg, i)
        r = anchors.get(im.image_id, ["features", "boxes"])
        if len(r["boxes"]) == 0:
            continue
        j, _ = _labels(r["boxes"], s.objects)
        for k in np.flatnonzero(j >= 0):
            o = s.objects[j[k]]
            x.append(r["features"][k].astype(np.float32))
            yc.append(COLOUR_NAMES.index(o.colour)), ys.append(CLASSES.index(o.cls)), held.append(i % 5 == 0)
    return {"features": torch.tensor(np.stack(x))}, yc, ys, held


def _cell_maps(s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three maps on the stride-32 grid ``(B, C, G, G)``: s16 / s8 averaged over each cell's block."""
    return {"map_s32": s32, "map_s16 (2x2 mean)": F.avg_pool2d(s16, 2), "map_s8 (4x4 mean)": F.avg_pool2d(s8, 4)}


@torch.no_grad()
def darknet_samples(anchors: ShardSet, ds: CanonicalDataset, cfg: SyntheticConfig, model=None):
    """Per probed reading (name → ``(n, D)``), colour, shape, held-out flags of the darknet cache's kept cells
    that overlap an object (the cell's box: its highest-objectness valid prediction, as RefCLIP picks)."""
    ids = [im.image_id for im in ds.images]
    table = load_anchor_table(anchors, ids)
    table.preload()
    feats, yc, ys, held = defaultdict(list), [], [], []
    for row, key in enumerate(ids):
        i = index_of(key)
        s = synthesize_image(cfg, i)
        r = torch.tensor([row])
        s8, s16, s32, kept = table.visual(r)
        grid = _cell_maps(s8, s16, s32)
        if model is not None:
            grid["fused (trained multi_scale_manner)"] = model.multi_scale_manner(s8, s16, s32)
        cells = {n: g.flatten(2)[0].T[kept[0]] for n, g in grid.items()}  # [K, C]
        cells["map_s32+s16+s8"] = torch.cat([cells[n] for n in list(_cell_maps(s8, s16, s32))], 1)
        if model is not None:
            cells["linear_vs (joint space)"] = model.embed_anchors((s8, s16, s32, kept))[0]
        pixels = np.asarray(s.image.convert("RGB"), np.float32)
        boxes = table.boxes[row]
        j, _ = _labels(boxes, s.objects)
        for k in np.flatnonzero((j >= 0) & table.mask[row].numpy()):
            x1, y1, x2, y2 = (int(round(v)) for v in boxes[k])
            patch = pixels[max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)].reshape(-1, 3)
            feats["pixel control: mean RGB in the box"].append(torch.tensor(patch.mean(0)))
            for n, c in cells.items():
                feats[n].append(c[k].float())
            o = s.objects[j[k]]
            yc.append(COLOUR_NAMES.index(o.colour)), ys.append(CLASSES.index(o.cls)), held.append(i % 5 == 0)
    return {n: torch.stack(v) for n, v in feats.items()}, yc, ys, held


def pseudo_by_kind(pseudo: ShardSet, anchors: ShardSet, ds: CanonicalDataset, cfg: SyntheticConfig) -> None:
    """Print Acc@0.5 of the pseudo-boxes and of the most confident kept cell per split and sentence kind."""
    table = load_anchor_table(anchors, [im.image_id for im in ds.images])
    row = table.row
    kind_of = {}
    for im in ds.images:
        s = synthesize_image(cfg, index_of(im.image_id))
        kind_of.update({(im.image_id, r.text): r.kind for r in s.refs})
    hits = defaultdict(lambda: [0, 0, 0])  # (split, kind) -> [n, refclip hits, most-confident hits]
    for ref in ds.refs:
        if ref.box is None or ref.ref_id not in pseudo:
            continue
        gt = torch.tensor([ref.box], dtype=torch.float32)
        pb = torch.tensor(pseudo.get(ref.ref_id, ["box"])["box"][None])
        r = row[ref.image_id]
        conf = np.where(table.mask[r].numpy(), table.confidence[r], -np.inf)
        cb = torch.tensor(table.boxes[r][int(conf.argmax())][None])
        kind = kind_of.get((ref.image_id, ref.text), "?")
        for key in ((ref.split, kind), (ref.split, "all")):
            h = hits[key]
            h[0] += 1
            h[1] += int(box_iou(pb, gt).item() >= 0.5)
            h[2] += int(box_iou(cb, gt).item() >= 0.5)
    print("| split | kind | n | RefCLIP | most confident cell |\n|---|---|---:|---:|---:|")
    for (split, kind), (n, a, c) in sorted(hits.items()):
        print(f"| {split} | {kind} | {n} | {a / n:.3f} | {c / n:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("anchors", nargs="?", default="data/teachers/yolo-anchors/synthetic",
                    help="yolo-anchors shard set (default: %(default)s)")
    ap.add_argument("--prepared", default="data/prepared/synthetic", help="prepared synthetic dataset")
    ap.add_argument("--model", help="refclip-train checkpoint (multiscale) whose fusion to probe too")
    ap.add_argument("--pseudo", help="refclip-pseudo shard set: Acc@0.5 per sentence kind")
    args = ap.parse_args()
    ds = CanonicalDataset.load(args.prepared)
    anchors = ShardSet(args.anchors)
    cfg = SyntheticConfig(n_images=len(ds.images), seed=0)
    if cache_kind(anchors) == "p5-cells":
        feats, yc, ys, held = p5_samples(anchors, ds, cfg)
    else:
        model = None
        if args.model:
            from grounding.refclip.model import from_checkpoint

            model = from_checkpoint(torch.load(args.model, weights_only=True))[0]
        feats, yc, ys, held = darknet_samples(anchors, ds, cfg, model)
    held_t = torch.tensor(held)
    print(f"samples {len(held)} (held out {int(held_t.sum())})")
    print("| reading | dim | colour probe | colour majority | shape probe | shape majority |\n|---|---:|---:|---:|---:|---:|")
    for name, x in feats.items():
        (ca, cm), (sa, sm) = (linear_probe(x, torch.tensor(y), held_t) for y in (yc, ys))
        print(f"| {name} | {x.shape[1]} | {ca:.3f} | {cm:.3f} | {sa:.3f} | {sm:.3f} |")
    if args.pseudo:
        pseudo_by_kind(ShardSet(args.pseudo), anchors, ds, cfg)


if __name__ == "__main__":
    main()
