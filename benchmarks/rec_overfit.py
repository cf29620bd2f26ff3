"""Diagnostic: can the REC trunk fit GT boxes of a few training images? (A check that the box-regression
pipeline — letterbox, targets, loss, optimiser — is sound, separate from whether the default budget is
enough.)

    python benchmarks/rec_overfit.py SIZE EPOCHS N_IMAGES [key=value ...]
    python benchmarks/rec_overfit.py 128 300 8     # measured: train Acc@0.5 0.767, mIoU 0.678 (300 steps)
    python benchmarks/rec_overfit.py 128 60 8      # measured: 0.000, mIoU 0.082 (60 steps)
"""
import sys, time, numpy as np, torch
from grounding import config
from grounding.data.schema import CanonicalDataset
from grounding.students import rec as R, common as C
from torchvision.ops import box_iou
torch.set_num_threads(1)
size, epochs, nimg = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
extra = sys.argv[4:]
p = config.load("params.yaml", [f"students.rec.input_size={size}", f"students.rec.epochs={epochs}", "students.rec.random_resize=[]", f"students.rec.lr_drop=[{epochs*3//4}]", *extra])
ds = CanonicalDataset.load(p.prepared_dir())
train = [r for r in C.split_refs(ds, "train") if r.box is not None]
ims = sorted({r.image_id for r in train})[:nimg]
refs = [r for r in train if r.image_id in ims]
gt = np.stack([r.box for r in refs]).astype(np.float32)
t0 = time.time()
model, ema, curve, tok = R.train_rec_pseudo(ds, refs, gt, p.students.rec, 0)
data = R.RecBatches(ds, refs, C.Canvases(ds, size), tok)
pred = R.predict_boxes(model, data)
iou = np.array([float(box_iou(torch.tensor(pred[r.ref_id])[None], torch.tensor(r.box)[None])) for r in refs])
print(f"size {size} epochs {epochs} imgs {nimg} refs {len(refs)}: train acc {np.mean(iou>=0.5):.3f} mIoU {iou.mean():.3f} ({time.time()-t0:.0f}s)", curve[-1] if curve else None, flush=True)
