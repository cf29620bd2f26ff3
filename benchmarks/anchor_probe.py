"""Diagnostic: what do the cached YOLO anchor features carry? A linear probe (held-out fifth of the images)
reading the colour and the shape class of the synthetic object each kept anchor overlaps (IoU >= 0.3),
against the majority class. RefCLIP can only match sentences to what the anchor features encode.

    python benchmarks/anchor_probe.py [data/teachers/yolo-anchors/synthetic]

Synthetic dataset only (the generator gives each object's colour). Measured on the default (240 images):
10-epoch bootstrap: colour 0.355 (majority 0.281), shape 0.048 (0.16); 40-epoch: colour 0.156 (0.176),
shape 0.277 (0.152); 40-epoch with ``teachers.yolo.bootstrap.labels=colour-shape``: colour 0.258 (0.175),
shape 0.163 (0.135).
"""
import argparse

import numpy as np
import torch
from grounding.data.schema import CanonicalDataset
from grounding.shards import ShardSet
from torchvision.ops import box_iou
from grounding.data.synthetic import synthesize_image, SyntheticConfig, COLOUR_NAMES, CLASSES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("anchors", nargs="?", default="data/teachers/yolo-anchors/synthetic",
                    help="yolo-anchors shard set (default: %(default)s); reads data/prepared/synthetic")
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = CanonicalDataset.load('data/prepared/synthetic')
    a = ShardSet(args.anchors)
    cfg = SyntheticConfig(n_images=240, seed=0)
    X, yc, ys, split = [], [], [], []
    for i, im in enumerate(ds.images):
        s = synthesize_image(cfg, i)
        r = a.get(im.image_id, ['features', 'boxes'])
        if len(r['boxes']) == 0: continue
        gb = torch.tensor(np.stack([o.box for o in s.objects]), dtype=torch.float32)
        iou = box_iou(torch.tensor(r['boxes']), gb)
        v, j = iou.max(1)
        for k in range(len(v)):
            if v[k] >= 0.3:
                X.append(r['features'][k].astype(np.float32)); yc.append(COLOUR_NAMES.index(s.objects[j[k]].colour)); ys.append(CLASSES.index(s.objects[j[k]].cls)); split.append(i % 5 == 0)
    X = torch.tensor(np.stack(X)); X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    split = torch.tensor(split)
    print('samples', len(X), 'dim', X.shape[1])
    for name, y in [('colour', yc), ('shape', ys)]:
        y = torch.tensor(y); n = int(y.max()) + 1
        lin = torch.nn.Linear(X.shape[1], n); opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(lin(X[~split]), y[~split]); opt.zero_grad(); loss.backward(); opt.step()
        acc = (lin(X[split]).argmax(1) == y[split]).float().mean().item()
        maj = torch.bincount(y[split]).max().item() / split.sum().item()
        print(name, 'held-out probe acc', round(acc, 3), 'majority', round(maj, 3))


if __name__ == "__main__":
    main()
