"""BiCM (SEEDS 001) entirely from cached teacher outputs: COM, QAM, similarity fusion and KAM.

For a sentence (query q) on its image, the candidates are the ``proposals_from`` boxes that ``clip-crops``
embedded, plus the QAM box P_t (``qam``):

* ``S_PQ`` = cos(CLIP crop embedding, CLIP query embedding) (Eq. 6); ``S_CQ`` = cos(CLIP embedding of the
  proposal's detected class name, query) (Eq. 7); ``S_BU = S_PQ + S_CQ`` (Eq. 8).
* P_t takes, as the paper says, the class name with the highest ``S_CQ``; its crop was never embedded
  (the cache holds proposal crops only), so its ``S_PQ`` is that of the cached crop overlapping it most
  (largest IoU) — our departure, forced by running no teacher here.
* ``S_TD`` = mean of the QAM map (bilinearly upsampled to the image, min-max normalised) inside the box
  (Eq. 9), scaled by ``td_scale``; ``S = S_BU + λ_t S_TD`` (Eq. 10).
* KAM: each ``kam_split`` image is paired with its most CLIP-similar query over the whole unpaired query set
  of ``kam_split`` (cosine of the cached image and text embeddings, seed 001 §3.5; ``kam_pairing:
  own_sentences`` restricts the search to the image's own sentences, which uses the GT pairing the unpaired
  setting does not have). The QAM cache holds a map per (sentence, its own image) only, so a pair whose query
  belongs to another image is scored by COM alone (S_TD = 0, no P_t) — our departure, forced by running no
  teacher here. Where the fused score of the selected box exceeds ``Thr_k`` it is a pseudo label. An MLP
  (3 FC with BN and ReLU, sigmoid) on [image, crop, class-name, query] embeddings learns ``S_KAM`` (BCE,
  candidates with IoU >= ``kam_pos_iou`` with the pseudo box positive); ``Sim = S + λ_k S_KAM`` (Eq. 11).
* Final box: the largest box among the candidates scoring above their mean (the paper's rule for one
  referent per query), or the arg-max (``select: argmax``).

GT boxes are read only to evaluate (and to report the pseudo labels' precision). No teacher model is run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grounding import distributed as D
from grounding import runtime as R
from grounding.artefacts import write_artefact
from grounding.codeset import code_version
from grounding.boxes import box_iou
from grounding.config import Params
from grounding.data.schema import CanonicalDataset, RefRecord
from grounding.progress import progress_bar
from grounding.runtime import seed_everything
from grounding.shards import ShardSet, file_sha256, stage_key
from grounding.students.common import (
    acc_per_split,
    curve_path,
    model_path,
    teacher_set,
    torch_threads,
    training,
    write_json,
    write_metrics,
    write_predictions,
)
from grounding.students.regions import detector_classes, load_regions, proposal_baselines, read_timing, timing_path

log = logging.getLogger(__name__)
STAGE = "student-bicm"
ROWS = ("com", "com+qam", "com+qam+kam")
TD_MAX_SIDE = 160  # S_TD is computed on the map upsampled to at most this many pixels a side (boxes scaled alike)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---- top-down score ------------------------------------------------------------------------------------------
def upsample_map(grid_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """A patch-grid map ``(gh, gw)`` bilinearly upsampled to ``(height, width)`` and min-max normalised to
    [0, 1] (all zeros when flat), float32."""
    m = torch.as_tensor(np.asarray(grid_map, np.float32))
    up = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    lo, hi = float(up.min()), float(up.max())
    if hi - lo <= 1e-5 * max(abs(lo), abs(hi), 1e-12):
        return np.zeros_like(up)
    return (up - lo) / (hi - lo)


def box_means(image_map: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``(K,)`` mean of a ``(H, W)`` pixel map inside each ``(K, 4)`` xyxy box (original pixels; the box
    is rounded outwards to whole pixels, clipped to the image, at least one pixel)."""
    h, w = image_map.shape
    ii = np.zeros((h + 1, w + 1), np.float64)
    ii[1:, 1:] = image_map.astype(np.float64).cumsum(0).cumsum(1)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    x1 = np.clip(np.floor(b[:, 0]), 0, w - 1).astype(int)
    y1 = np.clip(np.floor(b[:, 1]), 0, h - 1).astype(int)
    x2 = np.maximum(np.clip(np.ceil(b[:, 2]), 0, w).astype(int), x1 + 1)
    y2 = np.maximum(np.clip(np.ceil(b[:, 3]), 0, h).astype(int), y1 + 1)
    total = ii[y2, x2] - ii[y1, x2] - ii[y2, x1] + ii[y1, x1]
    return (total / ((x2 - x1) * (y2 - y1))).astype(np.float32)


# ---- cached inputs -------------------------------------------------------------------------------------------
@dataclass
class ImageCrops:
    """One image's embedded proposals: ``boxes`` ``(K, 4)``, unit ``embedding`` ``(K, D)``, detector
    class index ``cls`` ``(K,)`` (into the detector's class list)."""

    boxes: np.ndarray
    embedding: np.ndarray
    cls: np.ndarray


@dataclass
class Candidates:
    """One sentence's candidates (the K crops, then P_t): ``boxes`` ``(K+1, 4)``; scores ``s_pq``,
    ``s_cq``, ``s_td`` ``(K+1,)`` (``s_td`` unscaled, in [0, 1]); ``crop`` ``(K+1,)`` the crop whose
    embedding stands for each candidate; ``cls`` ``(K+1,)`` its class index."""

    boxes: np.ndarray
    s_pq: np.ndarray
    s_cq: np.ndarray
    s_td: np.ndarray
    crop: np.ndarray
    cls: np.ndarray


def candidates(crops: ImageCrops, class_emb: np.ndarray, query: np.ndarray, grid_map: np.ndarray,
               p_t: np.ndarray, width: int, height: int) -> Candidates:
    """COM and QAM scores of the ``K`` crops and P_t for one (unit) query embedding."""
    q = _unit(query)
    s_pq = crops.embedding @ q  # [K]
    cq_all = class_emb @ q  # [C]
    s_cq = cq_all[crops.cls]
    p_t = np.asarray(p_t, np.float32).reshape(1, 4)
    nearest = int(np.argmax(box_iou(crops.boxes, p_t)[:, 0]))
    boxes = np.concatenate([crops.boxes, p_t])
    f = min(1.0, TD_MAX_SIDE / max(width, height))  # the box mean of a smooth map barely depends on resolution
    s_td = box_means(upsample_map(grid_map, max(1, round(width * f)), max(1, round(height * f))), boxes * f)
    k = len(crops.boxes)
    t_cls = int(crops.cls[int(np.argmax(s_cq))])  # P_t's class: the proposal class name closest to the query
    return Candidates(boxes, np.append(s_pq, s_pq[nearest]).astype(np.float32),
                      np.append(s_cq, cq_all[t_cls]).astype(np.float32), s_td,
                      np.append(np.arange(k), nearest).astype(np.int64), np.append(crops.cls, t_cls).astype(np.int64))


def select(scores: np.ndarray, boxes: np.ndarray, rule: str) -> int:
    """Index of the final box: ``argmax`` of ``scores``, or (``largest_above_mean``) the largest-area box
    among those scoring above the mean (ties in area: the higher score; every box when all are equal)."""
    if rule == "argmax":
        return int(np.argmax(scores))
    if rule != "largest_above_mean":
        raise ValueError(f"unknown selection rule {rule!r}")
    above = np.flatnonzero(scores > scores.mean())
    if len(above) == 0:
        above = np.arange(len(scores))
    area = (boxes[above, 2] - boxes[above, 0]) * (boxes[above, 3] - boxes[above, 1])
    order = np.lexsort((-scores[above], -area))  # largest area first, then highest score
    return int(above[order[0]])


# ---- KAM -----------------------------------------------------------------------------------------------------
class KamMLP(nn.Module):
    """KAM's MLP: [image, region visual, region class, query] features → FC-BN-ReLU → FC-BN-ReLU → FC →
    sigmoid score in (0, 1)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4 * dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def kam_features(image: np.ndarray, crops: ImageCrops, class_emb: np.ndarray, query: np.ndarray,
                 cand: Candidates) -> np.ndarray:
    """``(K+1, 4D)`` float32 inputs of the KAM MLP for one sentence's candidates."""
    n = len(cand.boxes)
    return np.concatenate([np.broadcast_to(_unit(image), (n, len(image))), crops.embedding[cand.crop],
                           class_emb[cand.cls], np.broadcast_to(_unit(query), (n, len(query)))], axis=1).astype(np.float32)


def train_kam(x: np.ndarray, y: np.ndarray, bp: Any, *, seed: int,
              progress: bool = False) -> tuple[KamMLP, list[dict[str, float]], float]:
    """BCE training of :class:`KamMLP` on candidate rows ``x`` ``(N, 4D)`` with 0/1 targets ``y``; Adam
    ``kam_lr``, ``kam_epochs`` epochs of seeded batches. Returns the model (eval mode), the per-epoch
    curve and the throughput (candidate rows per second).

    Device: :func:`grounding.runtime.current_training` (fp32). Under torchrun every rank draws the same
    batches and trains on its slice of each with DDP, global-batch BatchNorm and the loss weighted so that
    the step is the global batch's (:func:`grounding.distributed.local_weight`); the curve is the global one."""
    gen = seed_everything(seed)
    device = R.current_training().device
    model = D.global_batchnorm(KamMLP(x.shape[1] // 4, bp.kam_hidden).to(device), device)
    opt = torch.optim.Adam(model.parameters(), lr=bp.kam_lr)
    net = D.wrap_ddp(R.inputs_to_device(model.net), device)  # net(x)[:, 0]: the logits (every weight is in .net)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    curve: list[dict[str, float]] = []
    seen, t0 = 0, time.perf_counter()
    bar = progress_bar(bp.kam_epochs * len(xt), f"{STAGE} KAM", unit="row", enabled=progress and D.is_main())
    model.train()
    for epoch in range(bp.kam_epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total, count = 0.0, 0
        for lo in range(0, len(xt), bp.kam_batch_size):
            b = perm[lo:lo + bp.kam_batch_size]
            if len(b) < max(2, D.world_size()):  # BatchNorm needs two rows; every rank one at least
                continue
            mine = torch.as_tensor(D.shard_batch(b), dtype=torch.long)
            loss = F.binary_cross_entropy_with_logits(net(xt[mine])[:, 0], yt[mine].to(device))
            w = D.local_weight(len(mine), len(b))
            opt.zero_grad(set_to_none=True)
            (loss if w == 1.0 else loss * w).backward()
            opt.step()
            total += D.all_reduce_mean(loss, len(mine)) * len(b)
            count += len(b)
            seen += len(b)
        bar.update(len(xt))  # the epoch's rows (a last single row is skipped, not left uncounted)
        curve.append({"epoch": epoch + 1, "loss": round(total / max(count, 1), 6)})
        bar.set_postfix(epoch=epoch + 1, loss=f"{curve[-1]['loss']:.4f}")
        if progress and (epoch + 1) % 10 == 0:
            log.info("%s KAM epoch %d loss %.4f", STAGE, epoch + 1, curve[-1]["loss"])
    bar.close()
    return model.cpu().eval(), curve, seen / max(time.perf_counter() - t0, 1e-9)


# ---- the stage -----------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Everything BiCM reads, per image / sentence, as arrays."""

    crops: dict[str, ImageCrops]
    class_emb: np.ndarray
    image_emb: dict[str, np.ndarray]
    text_emb: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    p_t: dict[str, np.ndarray]
    keys: dict[str, str]


def _same_clip(sets: Sequence[ShardSet]) -> None:
    """BiCM compares crop, image, text and class-name embeddings: all from one CLIP (same embedding width)."""
    dims = {str(s.path): s.fields["embedding"].shape[0] for s in sets}
    if len(set(dims.values())) > 1:
        raise ValueError(f"{STAGE}: the CLIP shard sets come from different models (embedding widths {dims}); "
                         "rerun the clip-* stages with one teachers.clip")


def load_inputs(params: Params, ds: CanonicalDataset, refs: Sequence[RefRecord]) -> Inputs:
    """Open and check the cached teacher outputs BiCM reads (dataset fingerprint, rows present, crops made
    from the configured proposals, every detector class embedded)."""
    bp = params.students.bicm
    image_ids = sorted({r.image_id for r in refs})
    ref_ids = [r.ref_id for r in refs]
    proposals = teacher_set(params, bp.proposals_from, image_ids, ds, STAGE)
    crops_set = teacher_set(params, "clip-crops", image_ids, ds, STAGE)
    crops_from = crops_set.manifest.params.get("crops_from")
    if crops_from != bp.proposals_from:
        raise ValueError(f"{STAGE}: clip-crops at {crops_set.path} embeds crops of {crops_from!r}, not of "
                         f"{bp.proposals_from!r}; rerun it with teachers.clip.crops_from={bp.proposals_from} "
                         "(crops of GT boxes would make BiCM an oracle)")
    if crops_set.manifest.inputs.get(crops_from) != proposals.manifest.stage_key:
        raise ValueError(f"{STAGE}: clip-crops at {crops_set.path} was made from another {crops_from} shard set "
                         f"than {proposals.path}; rerun clip-crops")
    image_set = teacher_set(params, "clip-image", image_ids, ds, STAGE)
    text_set = teacher_set(params, "clip-text", ref_ids, ds, STAGE)
    qam_set = teacher_set(params, "qam", ref_ids, ds, STAGE)
    classes = detector_classes(proposals)
    cls_path = params.teacher_dir("clip-classes")
    cls_set = ShardSet(cls_path)
    _same_clip([crops_set, image_set, text_set, cls_set])
    missing = [c for c in classes if c not in cls_set]
    if missing:
        raise ValueError(f"{STAGE}: clip-classes at {cls_path} has no embedding for detector classes {missing}")
    class_emb = _unit(np.stack([cls_set.get(c, ["embedding"])["embedding"] for c in classes]))
    crops: dict[str, ImageCrops] = {}
    for im in image_ids:
        c = crops_set.get(im, ["boxes", "embedding", "proposal_index"])
        labels = proposals.get(im, ["labels"])["labels"]
        if len(c["boxes"]) == 0:
            raise ValueError(f"{STAGE}: image {im} has no embedded proposal crops")
        crops[im] = ImageCrops(np.asarray(c["boxes"], np.float32), _unit(c["embedding"]),
                               np.asarray(labels, np.int64)[c["proposal_index"]])
    image_emb = {im: _unit(image_set.get(im, ["embedding"])["embedding"]) for im in image_ids}
    text_emb = {k: _unit(text_set.get(k, ["embedding"])["embedding"]) for k in ref_ids}
    maps, p_t = {}, {}
    for k in ref_ids:
        row = qam_set.get(k, ["map", "box"])
        maps[k], p_t[k] = np.asarray(row["map"], np.float32), np.asarray(row["box"], np.float32)
    keys = {s.manifest.stage: s.manifest.stage_key for s in (proposals, crops_set, image_set, text_set, qam_set, cls_set)}
    return Inputs(crops, class_emb, image_emb, text_emb, maps, p_t, keys)


def score_all(inp: Inputs, ds: CanonicalDataset, refs: Sequence[RefRecord]) -> dict[str, Candidates]:
    """:func:`candidates` of every sentence."""
    index = ds.image_index
    return {r.ref_id: candidates(inp.crops[r.image_id], inp.class_emb, inp.text_emb[r.ref_id], inp.maps[r.ref_id],
                                 inp.p_t[r.ref_id], index[r.image_id].width, index[r.image_id].height) for r in refs}


def fused(c: Candidates, bp: Any) -> np.ndarray:
    """``S = S_PQ + S_CQ + λ_t · td_scale · S_TD`` of every candidate (Eq. 8, 10)."""
    return c.s_pq + c.s_cq + bp.lambda_t * bp.td_scale * c.s_td


@dataclass(frozen=True)
class KamPair:
    """One KAM pseudo label: the image, its paired query (``ref_id``, maybe of another image), that pair's
    candidates, the selected candidate ``j`` and its fused score."""

    image_id: str
    ref_id: str
    cand: Candidates
    j: int
    score: float


def com_candidates(crops: ImageCrops, class_emb: np.ndarray, query: np.ndarray) -> Candidates:
    """COM-only candidates (the ``K`` crops, S_TD = 0, no P_t) of a query on an image whose QAM map was never
    cached (a query of another image)."""
    q = _unit(query)
    k = len(crops.boxes)
    return Candidates(crops.boxes, (crops.embedding @ q).astype(np.float32), (class_emb @ q)[crops.cls].astype(np.float32),
                      np.zeros(k, np.float32), np.arange(k, dtype=np.int64), crops.cls.astype(np.int64))


def kam_queries(inp: Inputs, refs: Sequence[RefRecord], bp: Any) -> dict[str, RefRecord]:
    """Image -> its paired query: the ``kam_split`` query with the highest CLIP image-text cosine, searched
    over every ``kam_split`` query (``kam_pairing: all_queries``, the paper) or over the image's own
    sentences (``own_sentences``). Ties: the first query in ref-id order."""
    pool = [r for r in refs if r.split == bp.kam_split]
    images = sorted({r.image_id for r in pool})
    if not pool:
        return {}
    if bp.kam_pairing == "own_sentences":
        out = {}
        for im in images:
            rs = [r for r in pool if r.image_id == im]
            out[im] = rs[int(np.argmax([float(inp.image_emb[im] @ inp.text_emb[r.ref_id]) for r in rs]))]
        return out
    q = np.stack([inp.text_emb[r.ref_id] for r in pool])  # [M,D] unit
    sims = np.stack([inp.image_emb[im] for im in images]) @ q.T  # [I,M]
    return {im: pool[int(j)] for im, j in zip(images, np.argmax(sims, axis=1))}


def pseudo_labels(inp: Inputs, cands: dict[str, Candidates], refs: Sequence[RefRecord], bp: Any) -> list[KamPair]:
    """KAM pseudo labels: per ``kam_split`` image its :func:`kam_queries` query; the pairs whose selected box
    scores above ``thr_k`` (own queries: COM + QAM fused score; foreign ones: COM only)."""
    out = []
    for im, r in kam_queries(inp, refs, bp).items():
        c = cands[r.ref_id] if r.image_id == im else com_candidates(inp.crops[im], inp.class_emb, inp.text_emb[r.ref_id])
        sc = fused(c, bp)
        j = select(sc, c.boxes, bp.select)
        if sc[j] > bp.thr_k:
            out.append(KamPair(im, r.ref_id, c, j, float(sc[j])))
    return out


def predict(cands: dict[str, Candidates], row: str, bp: Any, rule: str,
            kam: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The final box of every sentence for one ablation ``row`` of :data:`ROWS` (or ``qam_box``)."""
    out = {}
    for k, c in cands.items():
        if row == "qam_box":
            out[k] = c.boxes[-1]
            continue
        if row == "com":
            s, boxes = c.s_pq[:-1] + c.s_cq[:-1], c.boxes[:-1]
        else:
            s, boxes = fused(c, bp), c.boxes
            if row == "com+qam+kam":
                if kam is None:
                    raise ValueError("row com+qam+kam needs KAM scores")
                s = s + bp.lambda_k * kam[k]
        out[k] = boxes[select(s, boxes, rule)]
    return out


def run_student_bicm(params: Params) -> Path:
    """Stage ``student-bicm``: score every sentence from the caches, train KAM on pseudo labels of the
    ``kam_split`` images, write predictions (COM + QAM + KAM), ``data/metrics/student-bicm.json`` with the
    ablation rows, and the KAM curve. Returns the predictions' shard-set directory."""
    bp = params.students.bicm
    ds = CanonicalDataset.load(params.prepared_dir())
    refs = list(ds.refs)
    t0 = time.perf_counter()
    inp = load_inputs(params, ds, refs)
    cands = score_all(inp, ds, refs)
    scoring_speed = len(refs) / max(time.perf_counter() - t0, 1e-9)
    pseudo = pseudo_labels(inp, cands, refs, bp)
    refs_by_id = {r.ref_id: r for r in refs}
    key = stage_key(STAGE, code_version(__name__), {}, bp.model_dump(mode="json") | {"seed": params.seed},
                    {"dataset": ds.fingerprint(), **inp.keys})
    mpath = model_path(params, STAGE)
    dim = inp.class_emb.shape[1]

    def build(tmp: Path | None) -> None:
        """Train KAM (every rank); write the checkpoint to ``tmp`` (rank 0; ``None`` on the others)."""
        xs, ys = [], []
        for pr in pseudo:
            c = pr.cand
            xs.append(kam_features(inp.image_emb[pr.image_id], inp.crops[pr.image_id], inp.class_emb,
                                   inp.text_emb[pr.ref_id], c))
            ys.append(box_iou(c.boxes, c.boxes[pr.j][None])[:, 0] >= bp.kam_pos_iou)
        if not xs:
            raise ValueError(f"{STAGE}: no KAM pseudo label above thr_k={bp.thr_k}; lower students.bicm.thr_k")
        with torch_threads(bp.threads), training(params):
            model, curve, speed = train_kam(np.concatenate(xs), np.concatenate(ys), bp, seed=params.seed,
                                            progress=params.progress)
        if tmp is None:
            return
        torch.save({"dim": dim, "hidden": bp.kam_hidden, "state": model.state_dict(), "curve": curve}, tmp)
        write_json(timing_path(mpath), {"throughput_samples_per_s": round(speed, 2)})

    if not D.is_main():  # every rank trains (torchrun); rank 0 alone evaluates and writes
        build(None)
        return params.student_dir(STAGE)
    write_artefact(mpath, key, build, {"stage": STAGE, "dataset": ds.name, "inputs": inp.keys,
                                       "pseudo_labels": len(pseudo)})
    from grounding.errors import load_weights

    ckpt = load_weights(mpath, f"{STAGE} model", f"delete {mpath} and rerun {STAGE} to retrain it")
    model = KamMLP(ckpt["dim"], ckpt["hidden"])
    model.load_state_dict(ckpt["state"])
    model.eval()
    kam: dict[str, np.ndarray] = {}
    with torch.no_grad(), torch_threads(bp.threads):
        for r in refs:
            x = kam_features(inp.image_emb[r.image_id], inp.crops[r.image_id], inp.class_emb, inp.text_emb[r.ref_id],
                             cands[r.ref_id])
            kam[r.ref_id] = model(torch.from_numpy(x)).numpy()
    rows: dict[str, dict[str, float]] = {}
    preds: dict[str, dict[str, np.ndarray]] = {}
    for rule in ("largest_above_mean", "argmax"):
        for row in ROWS:
            name = row if rule == bp.select else f"{row}@{rule}"
            preds[name] = predict(cands, row, bp, rule, kam)
            rows[name] = acc_per_split(preds[name], ds)[0]
    rows["qam_box"] = acc_per_split(predict(cands, "qam_box", bp, bp.select), ds)[0]
    final = preds["com+qam+kam"]
    acc, n = acc_per_split(final, ds)
    regions = load_regions(ShardSet(params.teacher_dir(bp.proposals_from)), ds, sorted({r.image_id for r in refs}),
                           geometry=False)
    baselines = proposal_baselines(regions, refs, ds, params.seed,
                                   extra_candidates={k: inp.p_t[k] for k in inp.p_t})
    own = [pr for pr in pseudo if refs_by_id[pr.ref_id].image_id == pr.image_id]
    precision = [float(box_iou(pr.cand.boxes[pr.j][None], np.array([refs_by_id[pr.ref_id].box], np.float32))[0, 0]) >= 0.5
                 for pr in own if refs_by_id[pr.ref_id].box is not None]
    write_metrics(params, STAGE, acc, n, baselines, **rows,
                  kam={"pairs": len({r.image_id for r in refs if r.split == bp.kam_split}),
                       "pseudo_labels": len(pseudo), "pairing": bp.kam_pairing,
                       "own_query_pseudo_labels": len(own),  # precision is defined on these only (GT of the query)
                       "pseudo_label_precision": round(float(np.mean(precision)), 4) if precision else None},
                  select=bp.select, **read_timing(mpath), throughput_unit="KAM training candidate rows per second")
    # logged, not stored: a cached rerun must leave the metrics file byte-identical
    logging.getLogger(__name__).info("student-bicm: scored %.1f sentences/s", scoring_speed)
    write_json(curve_path(params, STAGE), ckpt["curve"])
    return write_predictions(params, STAGE, __name__, ds, final, inp.keys,
                             bp.model_dump(mode="json") | {"seed": params.seed}, file_sha256(mpath))


__all__ = ["Candidates", "ImageCrops", "KamMLP", "KamPair", "com_candidates", "kam_queries", "box_means", "candidates", "fused", "kam_features", "load_inputs",
           "predict", "pseudo_labels", "run_student_bicm", "select", "train_kam", "upsample_map"]
