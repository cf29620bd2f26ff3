"""PBREC (SEEDS 004): a point head on the REC trunk, ranking the cached FCOS P5 points.

Training targets at every P5 point of the sentence's image (``fcos-points``, original pixels; g = the P5
point spacing in original pixels):

* center-ness: for points inside the GT box and inside the ``3g`` square centred on the GT box centre,
  ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` (FCOS); 0 elsewhere;
* mass-ness: for points within ``2g`` of the mask centroid, the fraction of the ``g x g`` cell around the
  point covered by the mask (pycocotools RLE); 0 elsewhere.

The head (an MLP on the trunk's fused visual tokens, two logits per token) is read at the P5 points one to
one (seed 004): the student's token grid is the P5 grid (``input_size / visual_stride`` = the FCOS canvas
/ 32), token k scores point k, and the tokens' sine positions sit at the points' own coordinates
(torchvision's FCOS anchor points are the cell corners ``i * stride``, not the centres), so nothing is
interpolated. BCE against both soft targets. Inference: the ``top_k`` points by score, then IoU voting:
the cached FCOS box with the largest sum of IoU with the other top-k boxes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn
from torchvision.ops import box_iou

from grounding import distributed as D
from grounding.students import common as C
from grounding.students import rec_trunk as R



# ---- soft targets (original pixels) ----------------------------------------------------------------------
def point_spacing(points: np.ndarray) -> float:
    """g: the spacing of a row-major grid of ``(P, 2)`` points (original pixels)."""
    xs = np.unique(np.round(points[:, 0], 3))
    if len(xs) < 2:
        raise ValueError("need at least two point columns to know the grid spacing")
    return float(np.min(np.diff(xs)))


def centerness_targets(points: np.ndarray, box: Sequence[float], g: float) -> np.ndarray:
    """``(P,)`` float32 FCOS center-ness of ``(P, 2)`` points w.r.t. an xyxy ``box``, for points inside the
    box and inside the ``3g`` square centred on its centre; 0 elsewhere."""
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    x1, y1, x2, y2 = (float(v) for v in box)
    l, r, t, b = x - x1, x2 - x, y - y1, y2 - y
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    pos = (np.minimum.reduce([l, r, t, b]) > 0) & (np.abs(x - cx) <= 1.5 * g) & (np.abs(y - cy) <= 1.5 * g)
    lr = np.minimum(l, r) / np.maximum(np.maximum(l, r), 1e-9)
    tb = np.minimum(t, b) / np.maximum(np.maximum(t, b), 1e-9)
    return np.where(pos, np.sqrt(np.clip(lr * tb, 0, 1)), 0).astype(np.float32)


def massness_targets(points: np.ndarray, mask: np.ndarray, g: float) -> np.ndarray:
    """``(P,)`` float32 mass-ness: for points within ``2g`` of the centroid of the ``(H, W)`` bool mask, the
    fraction of the ``g x g`` cell centred on the point covered by the mask; 0 elsewhere (and for an
    empty mask)."""
    ys, xs = np.nonzero(mask)
    out = np.zeros(len(points), np.float32)
    if len(xs) == 0:
        return out
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres, continuous coordinates
    h, w = mask.shape
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    for k, (px, py) in enumerate(points.astype(np.float64)):
        if (px - cx) ** 2 + (py - cy) ** 2 > (2 * g) ** 2:
            continue
        xa, xb = int(np.clip(np.floor(px - g / 2), 0, w)), int(np.clip(np.ceil(px + g / 2), 0, w))
        ya, yb = int(np.clip(np.floor(py - g / 2), 0, h)), int(np.clip(np.ceil(py + g / 2), 0, h))
        covered = integral[yb, xb] - integral[ya, xb] - integral[yb, xa] + integral[ya, xa]
        out[k] = covered / max(g * g, 1e-9)
    return np.clip(out, 0, 1)


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (``counts`` str or list) -> ``(H, W)`` bool."""
    r = dict(rle)
    if isinstance(r.get("counts"), list):
        r = mask_utils.frPyObjects(r, *r["size"])
    elif isinstance(r.get("counts"), str):
        r["counts"] = r["counts"].encode("ascii")
    return mask_utils.decode(r).astype(bool)


def iou_vote(boxes: torch.Tensor, scores: torch.Tensor, top_k: int = 12) -> int:
    """Index (into ``boxes``) of the IoU-vote pick: among the ``top_k`` boxes by score, the one with the
    largest sum of IoU with the others (ties: the higher score)."""
    k = min(top_k, len(scores))
    top = torch.topk(scores, k).indices  # sorted by score, descending
    votes = box_iou(boxes[top], boxes[top]).sum(dim=1)  # [k]
    return int(top[int(torch.argmax(votes))])  # argmax returns the first (best-scored) maximum


# ---- model -------------------------------------------------------------------------------------------------
def p5_token_index(points: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Token index ``(P,)`` int64 of each of ``(P, 2)`` points given as canvas fractions on a ``grid = (h, w)``
    token grid whose token ``(i, j)`` sits at ``(j / w, i / h)`` (torchvision's FCOS anchor points): row-major
    ``round(y h) w + round(x w)``. Raises ``ValueError`` unless the points are that grid one to one (each
    token once, every point within a tenth of a cell of its token)."""
    pts = torch.as_tensor(points, dtype=torch.float64)
    h, w = grid
    gx, gy = pts[:, 0] * w, pts[:, 1] * h
    ix, iy = gx.round(), gy.round()
    off = torch.maximum((gx - ix).abs(), (gy - iy).abs())
    idx = (iy * w + ix).long()
    if (len(pts) != h * w or bool((off > 0.1).any()) or bool((ix < 0).any() | (ix >= w).any() | (iy < 0).any()
                                                              | (iy >= h).any()) or len(torch.unique(idx)) != len(idx)):
        raise ValueError(f"the {len(pts)} FCOS P5 points are not the student's {h}x{w} token grid one to one "
                         f"(worst offset {float(off.max()):.2f} cells): set students.pbrec.input_size / visual_stride "
                         f"to the P5 grid (teachers.fcos.input_size / 32 tokens a side) and no random_resize")
    return idx


class PointStudent(nn.Module):
    """The REC trunk plus PBREC's point head: ``forward`` returns the trunk's outputs and ``point_logits``
    ``(B, P, 2)`` (center-ness, mass-ness), token ``token_index[b, k]`` for point k (one to one, no
    interpolation). The trunk's sine positions are at the cell corners (``token_origin`` 0), the FCOS points'
    own coordinates. ``head_prior`` (a probability): both logits' bias starts at ``logit(head_prior)``, FCOS's
    prior init (None: torch's default, every point at sigmoid ~0.5)."""

    def __init__(self, cfg: R.RecConfig, head_prior: float | None = None) -> None:
        super().__init__()
        self.trunk = R.RecStudent(replace(cfg, token_origin=0.0))
        d = cfg.d_model
        self.point_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 2))
        if head_prior is not None:  # FCOS / RetinaNet prior init: every point starts at sigmoid = head_prior
            nn.init.constant_(self.point_head[-1].bias, -math.log((1 - head_prior) / head_prior))

    def forward(self, images: torch.Tensor, image_index: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor,
                token_index: torch.Tensor) -> dict[str, Any]:
        out = self.trunk(images, image_index, ids, pad)
        n = out["fused_visual"].shape[1]
        if token_index.shape[1] != n:
            h, w = out["grid"]
            raise ValueError(f"{token_index.shape[1]} FCOS P5 points but a {h}x{w} student token grid: set "
                             f"students.pbrec.input_size / visual_stride so the grid is the P5 grid, no random_resize")
        logits = self.point_head(out["fused_visual"])  # [B,N,2]
        out["point_logits"] = torch.gather(logits, 1, token_index.unsqueeze(-1).expand(-1, -1, 2))  # [B,P,2]
        return out


def point_scores(logits: torch.Tensor, how: str) -> torch.Tensor:
    """Ranking score ``(B, P)`` from ``(B, P, 2)`` logits: ``centerness`` | ``massness`` | ``product``."""
    p = logits.sigmoid()
    return {"centerness": p[..., 0], "massness": p[..., 1], "product": p[..., 0] * p[..., 1]}[how]


# ---- data -------------------------------------------------------------------------------------------------------
class PointData:
    """Per sentence: the FCOS P5 points of its image (canvas fractions), the student token of each (one to
    one on the ``grid``, :func:`p5_token_index`), their cached boxes and inside flags (read through a
    :class:`ShardDataset` joined by ref -> image), and (training) the soft targets."""

    def __init__(self, rec: R.RecBatches, fcos: Any, with_targets: bool, grid: tuple[int, int]) -> None:
        from grounding.shards.torch import ShardDataset

        self.rec = rec
        refs = rec.refs
        sd = ShardDataset({"fcos": fcos}, keys=[r.ref_id for r in refs],
                          key_maps={"fcos": {r.ref_id: r.image_id for r in refs}},
                          fields={"fcos": ["points", "boxes", "inside"]})
        per_image: dict[str, dict[str, np.ndarray]] = {}
        for i, r in enumerate(refs):
            if r.image_id not in per_image:
                per_image[r.image_id] = {k: v.numpy() for k, v in sd[i]["fcos"].items()}
        self.points = torch.stack([self._canvas(per_image[r.image_id]["points"], lb) for r, lb in zip(refs, rec.lbs)])
        self.token_index = torch.stack([p5_token_index(p, grid) for p in self.points]) if len(refs) else None
        self.boxes = torch.stack([torch.from_numpy(per_image[r.image_id]["boxes"].astype(np.float32)) for r in refs])
        self.inside = torch.stack([torch.from_numpy(per_image[r.image_id]["inside"] > 0) for r in refs])
        self.targets = None
        if with_targets:
            tg = []
            for r in refs:
                pts = per_image[r.image_id]["points"]
                g = point_spacing(pts)
                c = centerness_targets(pts, r.box, g)
                m = massness_targets(pts, decode_mask(r.mask), g) if r.mask else np.zeros(len(pts), np.float32)
                tg.append(np.stack([c, m], axis=1))
            self.targets = torch.from_numpy(np.stack(tg))  # [S,P,2]

    @staticmethod
    def _canvas(points: np.ndarray, lb: Any) -> torch.Tensor:
        sx, sy = lb.new_w / lb.orig_w, lb.new_h / lb.orig_h
        xy = np.stack([points[:, 0] * sx + lb.dx, points[:, 1] * sy + lb.dy], axis=1) / lb.size
        return torch.from_numpy(xy.astype(np.float32))

    def forward(self, model: PointStudent, batch: np.ndarray, size: int | None = None) -> dict[str, Any]:
        x, index, _ = self.rec.inputs(batch, size)
        b = torch.as_tensor(batch)
        return model(x, index, self.rec.ids[b], self.rec.pad[b], self.token_index[b])


def pbrec_loss(data: PointData, pp: Any) -> C.LossFn:
    """BCE of the point logits against the center-ness and mass-ness soft targets (points inside the image)."""

    def loss_fn(model: nn.Module, batch: np.ndarray, size: int) -> tuple[torch.Tensor, dict[str, float]]:
        b = torch.as_tensor(batch)
        logits = data.forward(model, batch, size)["point_logits"]  # [B,P,2]
        keep = data.inside[b].to(logits.device).unsqueeze(-1).float().expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, data.targets[b].to(logits.device), reduction="none") * keep
        per = bce.sum(dim=(0, 1)) / keep.sum(dim=(0, 1)).clamp_min(1)  # [2]
        loss = pp.centerness_weight * per[0] + pp.massness_weight * per[1]
        return loss, {"bce_centerness": float(per[0].detach()), "bce_massness": float(per[1].detach())}

    return loss_fn


@torch.no_grad()
def predict_points(model: PointStudent, data: PointData, pp: Any, batch_images: int = 16) -> dict[str, np.ndarray]:
    """``{ref_id: (4,) xyxy original pixels}``: IoU vote over the top-k cached FCOS boxes by point score."""
    model.eval()
    out: dict[str, np.ndarray] = {}
    batches = C.image_batches(data.rec.image_of, batch_images, torch.Generator().manual_seed(0))
    for batch in batches:
        scores = point_scores(data.forward(model, batch)["point_logits"], pp.score).cpu()  # [B,P]
        for row, i in enumerate(batch):
            s = scores[row].masked_fill(~data.inside[int(i)], -1.0)
            pick = iou_vote(data.boxes[int(i)], s, pp.top_k)
            out[data.rec.refs[int(i)].ref_id] = data.boxes[int(i), pick].numpy()
    return out


def train_pbrec(data: PointData, pp: Any, seed: int, *, progress: bool = False) -> tuple[PointStudent, list[dict[str, float]]]:
    from grounding.runtime import seed_everything

    gen = seed_everything(seed)
    model = PointStudent(data.rec.tokenizer.cfg, getattr(pp, "head_prior", None))
    curve = C.fit(model, lambda g: C.image_batches(data.rec.image_of, pp.batch_images, g), pbrec_loss(data, pp), pp,
                  generator=gen, progress=progress, desc="student-pbrec", group_of=data.rec.image_of)
    return model, curve


def fcos_upper_bound(data: PointData, ds: Any) -> dict[str, float]:
    """Acc@0.5 per split of the best cached FCOS box per sentence (the ceiling of any point ranking)."""
    from grounding.boxes import box_iou as np_box_iou

    refs = {r.ref_id: r for r in ds.refs}
    pred = {}
    for i, r in enumerate(data.rec.refs):
        if refs[r.ref_id].box is None:
            continue
        boxes = data.boxes[i][data.inside[i]].numpy()
        iou = np_box_iou(boxes, np.array([r.box], np.float32))[:, 0]
        pred[r.ref_id] = boxes[int(np.argmax(iou))]
    return C.acc_per_split(pred, ds)[0]


def run_student_pbrec(params: Any) -> Path:
    """Stage ``student-pbrec``: point head trained on GT soft targets at the cached FCOS P5 points; weights,
    predictions, metrics (with centred-box, FCOS-most-confident and FCOS upper-bound rows) and curve."""
    from grounding.data.schema import CanonicalDataset
    from grounding.shards import file_sha256

    stage, pp = "student-pbrec", params.students.pbrec
    ds = CanonicalDataset.load(params.prepared_dir())
    train = [r for r in C.split_refs(ds, pp.train_split) if r.box is not None]
    if not train:
        raise ValueError(f"{stage}: dataset {ds.name} has no {pp.train_split!r} sentences with GT boxes")
    fcos = C.teacher_set(params, pp.points_from, sorted({r.image_id for r in ds.refs}), ds, stage)
    inputs = {"points": fcos.manifest.stage_key}
    sp = pp.model_dump(mode="json") | {"seed": params.seed} | params.train.key_params()
    cfg = R.RecConfig.from_params(pp, ds)
    tok = R.Tokenizer(cfg)
    canvases = C.Canvases(ds, pp.input_size)
    grid = (pp.input_size // pp.visual_stride,) * 2
    data = PointData(R.RecBatches(ds, train, canvases, tok), fcos, with_targets=True, grid=grid)
    every = PointData(R.RecBatches(ds, ds.refs, canvases, tok), fcos, with_targets=False, grid=grid)
    runs, curves, first = [], [], None
    with C.torch_threads(pp.threads), C.training(params):
        for seed in pp.seeds:
            model, curve = train_pbrec(data, pp, seed, progress=params.progress)
            if not D.is_main():
                continue  # every rank trains (torchrun); rank 0 alone evaluates and writes
            pred = predict_points(model, every, pp)
            acc, n = C.acc_per_split(pred, ds)
            runs.append(acc)
            curves += [{**row, "seed": seed} for row in curve]
            if first is None:
                first = (model, pred)
    if not D.is_main():
        return params.student_dir(stage)
    model, pred = first
    mpath = C.model_path(params, stage)
    R.save_checkpoint(mpath, {"state_dict": model}, cfg, {"seed": pp.seeds[0]})
    baselines = {"centred box": C.centred_box_baseline(ds), "FCOS upper bound": fcos_upper_bound(every, ds)}
    C.write_metrics(params, stage, C.mean_acc(runs), n, baselines, seeds=dict(zip(map(str, pp.seeds), runs)),
                    trained_on=f"GT box / mask soft targets of the {pp.train_split} split at {pp.points_from} points")
    C.write_json(C.curve_path(params, stage), curves)
    return C.write_predictions(params, stage, __name__, ds, pred, inputs, sp, file_sha256(mpath))
