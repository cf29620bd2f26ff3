"""Bootstrap training of a width-scaled SimREC YOLOv3 (:mod:`.darknet`) on the synthetic train split.

Not the published training recipe or loss: a plain YOLOv3-style loss, chosen to be cheap on CPU and to give
*every* level (RefCLIP reads only the stride-32 one) a prediction for every object:

* assignment: each GT box is assigned at each of the three levels to the cell holding its centre, in two
  slots: the level's anchor with the best (w, h) IoU and the anchor-free slot;
* box: BCE of ``sigmoid(tx)`` against the centre's fraction in the cell, smooth-L1 of the decoded
  log-size ``tw + guide`` against ``log(gt_w / base_w)`` and of the guide itself against the same target
  (the guide is the anchor-guiding branch: it must predict the size for the offsets to mean anything);
* objectness: BCE, 1 at assigned slots, 0 elsewhere except slots whose decoded box overlaps a GT at
  IoU > ``IGNORE_IOU`` (ignored, as YOLOv3 does);
* class: BCE against the one-hot class at assigned slots.

Training sees random ``crop``-pixel windows (aligned to 32) of the ``input_size`` letterbox canvases, so
objects keep the scale the stage sees at a fraction of the cost (the network is fully convolutional),
with horizontal flips; AdamW with a linear warm-up then cosine decay.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from grounding.progress import progress_bar
from grounding.runtime import optimizer_step
from grounding.teachers.detectors.darknet import HEADS, N_PRED, DarknetConfig, DarknetYolo

log = logging.getLogger(__name__)

IGNORE_IOU = 0.7


def _wh_iou(wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of boxes sharing a centre: ``wh`` (N, 2) vs ``anchors`` (A, 2) -> (N, A)."""
    inter = torch.min(wh[:, None], anchors[None]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)


def _xyxy(cxcywh: torch.Tensor) -> torch.Tensor:
    return torch.cat([cxcywh[..., :2] - cxcywh[..., 2:] / 2, cxcywh[..., :2] + cxcywh[..., 2:] / 2], -1)


def yolo_loss(model: DarknetYolo, out: dict[str, list[torch.Tensor]], boxes: Sequence[torch.Tensor],
              labels: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss terms (summed over the batch, divided by its size) of ``model(x, decode=False)`` outputs for
    per-image GT ``boxes`` (K, 4) xyxy canvas pixels and ``labels`` (K,) int64."""
    heads = [model.module_list[i] for i, _, _, _ in HEADS]
    bsz = len(boxes)
    terms = {"xy": 0.0, "wh": 0.0, "guide": 0.0, "obj": 0.0, "cls": 0.0}
    for head, raw, guide in zip(heads, out["preds"], out["guides"]):
        s, nc = head.stride, head.num_classes
        _, _, gh, gw, _ = raw.shape
        base = head.base_wh  # (4, 2)
        with torch.no_grad():
            dec = head.decode(raw.detach(), guide.detach())
        obj_t = torch.zeros(raw.shape[:4])
        obj_w = torch.ones(raw.shape[:4])
        pos_b, pos_a, pos_y, pos_x, t_xy, t_wh, t_cls = [], [], [], [], [], [], []
        for b in range(bsz):
            gt = boxes[b].float()
            if len(gt) == 0:
                continue
            ious = box_iou(_xyxy(dec[b, ..., :4]).reshape(-1, 4), gt).max(1).values.view(obj_w.shape[1:])
            obj_w[b][ious > IGNORE_IOU] = 0.0
            cxcy, wh = (gt[:, :2] + gt[:, 2:]) / 2, (gt[:, 2:] - gt[:, :2]).clamp(min=1.0)
            best = _wh_iou(wh, base[:3]).argmax(1)
            cx = (cxcy[:, 0] / s).clamp(0, gw - 1e-4)
            cy = (cxcy[:, 1] / s).clamp(0, gh - 1e-4)
            for k in range(len(gt)):
                for a in (int(best[k]), N_PRED - 1):
                    pos_b.append(b), pos_a.append(a), pos_y.append(int(cy[k])), pos_x.append(int(cx[k]))
                    t_xy.append(torch.stack([cx[k] - int(cx[k]), cy[k] - int(cy[k])]))
                    t_wh.append(torch.log(wh[k] / base[a]))
                    t_cls.append(int(labels[b][k]))
        if pos_b:
            idx = (torch.tensor(pos_b), torch.tensor(pos_a), torch.tensor(pos_y), torch.tensor(pos_x))
            obj_t[idx], obj_w[idx] = 1.0, 1.0
            p, g = raw[idx], guide[idx]  # (P, 5 + C), (P, 2)
            txy, twh = torch.stack(t_xy), torch.stack(t_wh)
            terms["xy"] = terms["xy"] + F.binary_cross_entropy_with_logits(p[:, :2], txy, reduction="sum")
            terms["wh"] = terms["wh"] + F.smooth_l1_loss(p[:, 2:4] + g.detach(), twh, reduction="sum")
            terms["guide"] = terms["guide"] + F.smooth_l1_loss(g, twh, reduction="sum")
            onehot = F.one_hot(torch.tensor(t_cls), nc).float()
            terms["cls"] = terms["cls"] + F.binary_cross_entropy_with_logits(p[:, 5:], onehot, reduction="sum")
        terms["obj"] = terms["obj"] + (F.binary_cross_entropy_with_logits(
            raw[..., 4], obj_t, reduction="none") * obj_w).sum()
    return {k: v / bsz if torch.is_tensor(v) else torch.tensor(v) for k, v in terms.items()}


def _crop(canvas: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, crop: int, gen: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random ``crop`` window (origin a multiple of 32) of a canvas; keeps the boxes whose centre lies in
    it, shifted and clipped to the window."""
    size = canvas.shape[-1]
    if crop >= size:
        return canvas, boxes, labels
    n = (size - crop) // 32
    ox, oy = (int(v) * 32 for v in torch.randint(0, n + 1, (2,), generator=gen))
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    keep = (c[:, 0] >= ox) & (c[:, 0] < ox + crop) & (c[:, 1] >= oy) & (c[:, 1] < oy + crop)
    b = (boxes[keep] - torch.tensor([ox, oy, ox, oy], dtype=boxes.dtype)).clamp(0, crop)
    return canvas[:, oy:oy + crop, ox:ox + crop], b, labels[keep]


def train_darknet(canvases: list[torch.Tensor], targets: list[tuple[torch.Tensor, torch.Tensor]],
                  cfg: DarknetConfig, *, epochs: int, batch_size: int, lr: float, crop: int,
                  gen: torch.Generator, progress: bool = True) -> tuple[DarknetYolo, dict[str, Any]]:
    """Train a fresh network on normalised canvases (3, S, S) and their ``(boxes xyxy canvas px, labels)``;
    ``progress``: one bar over every epoch's images (rows/s, ETA, running loss)."""
    model = DarknetYolo(cfg)
    steps_per_epoch = math.ceil(len(canvases) / batch_size)
    total = steps_per_epoch * epochs
    warmup = min(30, total // 4 + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = progress_bar(epochs * len(canvases), "bootstrap-yolo", unit="img", enabled=progress)
    for epoch in range(epochs):
        order = torch.randperm(len(canvases), generator=gen).tolist()
        for s in range(steps_per_epoch):
            imgs, boxes, labels = [], [], []
            for i in order[s * batch_size:(s + 1) * batch_size]:
                img, (b, lab) = canvases[i], targets[i]
                if bool(torch.rand((), generator=gen) < 0.5):
                    w = img.shape[-1]
                    img, b = img.flip(-1), torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
                img, b, lab = _crop(img, b, lab, crop, gen)
                imgs.append(img), boxes.append(b), labels.append(lab)
            terms = yolo_loss(model, model(torch.stack(imgs), decode=False), boxes, labels)
            loss = sum(terms.values())
            losses.append(optimizer_step(loss, model, opt, sched, clip=10.0))
            bar.update(len(imgs))
            bar.set_postfix(loss=f"{losses[-1]:.2f}", refresh=False)
        log.info("bootstrap darknet: epoch %d/%d loss %.2f (%.0f s)", epoch + 1, epochs,
                 float(np.mean(losses[-steps_per_epoch:])), time.perf_counter() - t0)
    bar.close()
    model.eval()
    return model, {"steps": total, "final_loss": round(float(np.mean(losses[-steps_per_epoch:])), 4),
                   "first_loss": round(float(np.mean(losses[:steps_per_epoch])), 4)}
