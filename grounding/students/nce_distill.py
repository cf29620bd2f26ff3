"""NCE+Distill (SEEDS 002): weakly supervised phrase grounding trained on cached detector regions with a
contrastive image-caption loss and the WordNet/detector teacher target, from shard sets only.

* Region-phrase score ``s(x, y) = f(x)ᵀ g(y)`` (seed 002 §4.1): ``f`` two FC layers (ReLU between) over the
  cached RoI feature of a ``proposals_from`` region (plus, with ``geometry``, its relative box and area),
  standardised to zero mean / unit variance with the training images' statistics; ``g`` two FC layers over
  the max-pool of a 2-layer LSTM's hidden states (300-d words and hidden; GloVe vectors from a local
  ``glove_path``, frozen, when given, else trained from random); both L2-normalised, ``embed_dim`` = 512.
* A caption is the training phrases of one image; ``S(X, Y) = Σ_k max_l s(x_l, y_k)``.
* ``L_IS``: NCE over the images of the batch (``batch_size - 1`` negatives), ``softmax(S / τ)``.
* ``L_RP``: soft cross-entropy between ``softmax_l(s(x_l, y) / τ)`` over the image's regions and the teacher
  target ``p̂(x, y) ∝ Σ_z p(y, z) p(z | x)`` (:func:`grounding.soft_targets.region_targets`; ``p(y, z)``
  the ``labels_from`` soft label, ``p(z | x)`` the detector's non-background class posterior), summed over
  the caption's phrases as eq. 4 (then the mean over the batch's captions). Phrases without a target (no
  WordNet match) add nothing.
* ``L = L_IS + λ L_RP`` with the staircase ``λ = min(floor(step / a), b)``; Adam, lr 1e-4 (the paper).
* Inference needs no detector score: the proposal with the highest ``s(x, y)`` is the phrase's box.

GT boxes are never read in training (only to evaluate). No teacher model is run: everything comes from
the cached shard sets.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from grounding import distributed as D
from grounding import runtime as R
from grounding.artefacts import write_artefact
from grounding.codeset import code_version
from grounding.config import Params
from grounding.data.schema import CanonicalDataset, RefRecord
from grounding.word_vocab import build_vocab, encode
from grounding.runtime import seed_everything
from grounding.shards import ShardSet, file_sha256, stage_key
from grounding.soft_targets import region_targets
from grounding.students.regions import (  # noqa: F401 - re-exported
    GEOMETRY_DIM, Regions, box_geometry, detector_classes, load_regions, proposal_baselines, read_timing,
    standardise, timing_path)
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

log = logging.getLogger(__name__)
STAGE = "student-nce-distill"


# ---- cached regions ---------------------------------------------------------------------------------------


def load_glove(path: str | Path, vocab: Sequence[str], dim: int) -> tuple[torch.Tensor, int]:
    """``(len(vocab), dim)`` float32 rows of a local GloVe text file (``word v1 ... v_dim`` per line) for the
    words of ``vocab``; words it lacks (and ``<pad>``) get zeros. Returns the matrix and how many words
    were found; ``ValueError`` naming the file when a vector has another width."""
    index = {w: i for i, w in enumerate(vocab)}
    out = torch.zeros(len(vocab), dim)
    found = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            word, _, rest = line.rstrip("\n").partition(" ")
            if word not in index:
                continue
            vec = rest.split()
            if len(vec) != dim:
                raise ValueError(f"{path}:{n}: GloVe vector of {word!r} has {len(vec)} values, expected "
                                 f"students.nce_distill.word_dim={dim}")
            out[index[word]] = torch.tensor([float(v) for v in vec])
            found += 1
    return out, found


def soft_labels(labels_set: ShardSet, ref_ids: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """``(P, C)`` float32 WordNet soft labels p(y, z) of ``ref_ids``, columns reordered to ``classes``
    (the detector's order); ``ValueError`` when a detector class is unknown to the label set."""
    theirs = list(labels_set.manifest.extra.get("classes") or [])
    missing = [c for c in classes if c not in theirs]
    if missing:
        raise ValueError(f"{labels_set.path}: labels have no column for detector classes {missing}")
    cols = [theirs.index(c) for c in classes]
    if not ref_ids:
        return np.zeros((0, len(classes)), np.float32)
    lab = np.stack([labels_set.get(k, ["label"])["label"] for k in ref_ids]).astype(np.float32)
    return lab[:, cols]


# ---- model -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NceDistillConfig:
    """Sizes of :class:`NceDistill`; ``feature_dim`` is the region input width. Paper: 512-d embeddings,
    300-d words, a 2-layer 300-d LSTM."""

    vocab_size: int
    feature_dim: int
    embed_dim: int = 512
    word_dim: int = 300
    hidden: int = 300
    max_len: int = 20
    lstm_layers: int = 2


def _two_fc(d_in: int, e: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, e), nn.ReLU(), nn.Linear(e, e))


class NceDistill(nn.Module):
    """Two branches into an L2-normalised ``embed_dim`` space, each two FC layers with a ReLU between
    (seed 002 §4.1): ``region`` over the (standardised) region feature, ``phrase`` over the max-pool of the
    LSTM's hidden states of the phrase's tokens."""

    def __init__(self, cfg: NceDistillConfig, word_vectors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim
        self.region = _two_fc(cfg.feature_dim, e)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.word_dim, padding_idx=0)
        if word_vectors is not None:  # GloVe: fixed during training, as the paper
            self.embedding.weight.data.copy_(word_vectors)
            self.embedding.weight.requires_grad_(False)
        self.lstm = nn.LSTM(cfg.word_dim, cfg.hidden, num_layers=cfg.lstm_layers, batch_first=True)
        self.phrase = _two_fc(cfg.hidden, e)

    def forward(self, feats: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, R, F)`` region features and ``(B, P, L)`` phrase token ids → ``(B, R, E)`` f(x) and
        ``(B, P, E)`` g(y): both branches in one call (so DDP syncs the gradients of both)."""
        b, p, length = ids.shape
        return self.embed_regions(feats), self.embed_phrases(ids.reshape(b * p, length)).reshape(b, p, -1)

    def embed_regions(self, feats: torch.Tensor) -> torch.Tensor:
        """``(..., F)`` region features → ``(..., E)`` unit vectors f(x)."""
        return F.normalize(self.region(feats), dim=-1)

    def embed_phrases(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` token ids (0-padded, at least one token) → ``(B, E)`` unit vectors g(y): max-pool of the
        LSTM's top-layer hidden states over the phrase's tokens (padding left out), then two FC layers."""
        lengths = (ids != 0).sum(dim=1).clamp(min=1)
        packed = pack_padded_sequence(self.embedding(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        hs, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=ids.shape[1])  # [B,L,H]
        keep = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        pooled = hs.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(dim=1)
        return F.normalize(self.phrase(pooled), dim=-1)


def staircase(step: int, a: int, b: float) -> float:
    """λ of step ``step`` (0-based): ``min(floor(step / a), b)``."""
    return float(min(step // a, b))


# ---- training data ------------------------------------------------------------------------------------------
@dataclass
class Captions:
    """Training captions, one per image: ``rows`` into the :class:`Regions`, phrase token ids ``(N, P, L)``,
    phrase mask ``(N, P)``, soft labels ``(N, P, C)`` p(y, z), and the ref ids ``(N, P)`` ("" = padding)."""

    rows: np.ndarray
    ids: torch.Tensor
    phrase_mask: torch.Tensor
    labels: np.ndarray
    ref_ids: list[list[str]]


def build_captions(refs: Sequence[RefRecord], regions: Regions, labels: np.ndarray, vocab: Sequence[str],
                   max_len: int) -> Captions:
    """Group the training phrases ``refs`` (with soft labels ``labels`` ``(len(refs), C)``) by image."""
    row = regions.row
    by_image: dict[str, list[int]] = {}
    for j, r in enumerate(refs):
        by_image.setdefault(r.image_id, []).append(j)
    images = sorted(by_image)
    p_max = max(len(v) for v in by_image.values())
    ids_all, _ = encode([r.text for r in refs], vocab, max_len)
    n, c = len(images), labels.shape[1]
    ids = torch.zeros(n, p_max, max_len, dtype=torch.long)
    pmask = torch.zeros(n, p_max, dtype=torch.bool)
    lab = np.zeros((n, p_max, c), np.float32)
    ref_ids = [[""] * p_max for _ in range(n)]
    for i, im in enumerate(images):
        for p, j in enumerate(by_image[im]):
            ids[i, p], pmask[i, p], lab[i, p] = ids_all[j], True, labels[j]
            ref_ids[i][p] = refs[j].ref_id
    return Captions(np.array([row[im] for im in images]), ids, pmask, lab, ref_ids)


def batch_targets(caps: Captions, regions: Regions, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher target of a training batch of captions: ``(B, P, R)`` p̂ over each image's regions and
    ``(B, P)`` valid (a real phrase with a WordNet label that some region supports)."""
    rows = caps.rows[batch]
    t, valid = region_targets(torch.from_numpy(caps.labels[batch]), torch.from_numpy(regions.class_probs[rows]),
                              torch.from_numpy(regions.mask[rows]))
    return t, valid & caps.phrase_mask[batch]


def losses(model: nn.Module, caps: Captions, regions: Regions, batch: np.ndarray,
           tau: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(L_IS, L_RP, number of phrases with a target)`` of one batch of captions. ``model``: a
    :class:`NceDistill` (or its DDP wrapper). Under torchrun this rank embeds its slice of ``batch``
    (:func:`grounding.distributed.shard_batch`) and the embeddings of all ranks are gathered, so the losses
    are the whole batch's (its in-batch negatives too), as in one process; the gradient flows through this
    rank's slice only (scale the loss by the process count for DDP's gradient mean to be the batch's)."""
    mine = np.asarray(D.shard_batch(batch), dtype=np.int64)
    f, g = model(regions.features[torch.from_numpy(caps.rows[mine])], caps.ids[mine])  # [b,R,E], [b,P,E]
    f, g = D.gather_cat(f), D.gather_cat(g)  # [B,R,E], [B,P,E] in batch order (the slices are contiguous)
    dev = f.device
    rows = torch.from_numpy(caps.rows[batch])
    rmask = torch.from_numpy(regions.mask)[rows].to(dev)  # [B,R]
    b = len(batch)
    pmask = caps.phrase_mask[batch].to(dev)  # [B,P]
    s = torch.einsum("jre,ipe->ijpr", f, g)  # caption i, image j, phrase p, region r
    s = s.masked_fill(~rmask[None, :, None, :], float("-inf"))
    big_s = (s.amax(dim=-1) * pmask[:, None, :]).sum(dim=-1)  # [B captions, B images]
    l_is = F.cross_entropy(big_s / tau, torch.arange(b, device=dev))
    own = s[torch.arange(b), torch.arange(b)]  # [B,P,R]
    logq = F.log_softmax(own / tau, dim=-1).masked_fill(~rmask[:, None, :], 0.0)
    target, valid = (t.to(dev) for t in batch_targets(caps, regions, batch))
    per = -(target * logq).sum(dim=-1)  # [B,P]
    n_valid = int(valid.sum())
    l_rp = (per * valid).sum() / b  # eq. 4: summed over the caption's phrases; mean over the batch's captions
    return l_is, l_rp, n_valid


def batch_schedule(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[tuple[int, np.ndarray]]:
    """``steps`` batches ``(epoch, caption indices)``: seeded shuffles of ``range(n)`` cut into batches
    (a last batch of fewer than two captions is dropped: it has no negative; under torchrun one of fewer
    captions than processes too, so that every rank has a slice)."""
    out: list[tuple[int, np.ndarray]] = []
    epoch = 0
    while len(out) < steps:
        epoch += 1
        perm = torch.randperm(n, generator=generator).numpy()
        least = max(2, D.world_size())
        out.extend((epoch, perm[lo:lo + batch_size]) for lo in range(0, n, batch_size) if n - lo >= least)
    return out[:steps]


def _steps(model: NceDistill, opt: torch.optim.Optimizer, caps: Captions, regions: Regions,
           schedule: list[tuple[int, np.ndarray]], start: int, stop: int, np_: Any, distill: bool,
           records: list[tuple[int, int, float, int, float, float, float]], bar: Any) -> None:
    """Optimizer steps ``start .. stop-1`` of ``schedule``, appending ``(epoch, step, λ, batch size, loss,
    L_IS, L_RP)`` to ``records``."""
    model.train()
    net = D.wrap_ddp(R.inputs_to_device(model), R.device_of(model))
    for step in range(start, stop):
        epoch, batch = schedule[step]
        lam = staircase(step, np_.lambda_step, np_.lambda_max) if distill else 0.0
        l_is, l_rp, _ = losses(net, caps, regions, batch, np_.temperature)
        loss = l_is + lam * l_rp
        opt.zero_grad(set_to_none=True)
        (loss * D.world_size() if D.world_size() > 1 else loss).backward()  # gather_cat: see losses()
        opt.step()
        records.append((epoch, step + 1, lam, len(batch), float(loss.detach()), float(l_is.detach()),
                        float(l_rp.detach())))
        if bar is not None:
            bar.update(1)


def _curve(records: list[tuple[int, int, float, int, float, float, float]]) -> list[dict[str, float]]:
    """One point per epoch: last step, its λ, and the batch-size-weighted mean losses."""
    out: list[dict[str, float]] = []
    for epoch in sorted({r[0] for r in records}):
        rs = [r for r in records if r[0] == epoch]
        n = sum(r[3] for r in rs)
        out.append({"epoch": epoch, "step": rs[-1][1], "lambda": rs[-1][2],
                    **{k: round(sum(r[3] * r[i] for r in rs) / n, 6) for k, i in (("loss", 4), ("l_is", 5), ("l_rp", 6))}})
    return out


def train(caps: Captions, regions: Regions, cfg: NceDistillConfig, np_: Any, *, seed: int,
          variants: Sequence[str] = ("distill",), progress: bool = False, word_vectors: torch.Tensor | None = None,
          ) -> dict[str, tuple[NceDistill, list[dict[str, float]], float]]:
    """Adam for ``np_.steps`` steps over seeded batches of ``np_.batch_size`` captions, for each variant:
    ``distill`` (λ by the staircase) and/or ``no_distill`` (λ = 0). Both variants are the same run while the
    staircase is 0 (the first ``lambda_step`` steps), so that prefix is trained once and forked (model and
    optimizer state): the result equals two separate runs. Returns per variant the model (eval mode), the
    curve (one point per epoch) and the throughput in captions/s (the shared prefix counted in full).
    Device: :func:`grounding.runtime.current_training` (fp32). Under torchrun every rank draws the same
    batches and embeds its slice of each; the losses are the whole batch's (see :func:`losses`).
    ``word_vectors``: fixed GloVe rows of the vocabulary (see :func:`load_glove`)."""
    unknown = set(variants) - {"distill", "no_distill"}
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}")
    gen = seed_everything(seed)
    device = R.current_training().device
    model = NceDistill(cfg, word_vectors).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=np_.lr)
    schedule = batch_schedule(len(caps.rows), np_.batch_size, np_.steps, gen)
    shared = min(np_.lambda_step, len(schedule))
    bar = None
    if progress and D.is_main():  # rank 0 alone shows progress
        from tqdm.auto import tqdm

        bar = tqdm(total=shared + len(variants) * (len(schedule) - shared), desc=STAGE, unit="step")
    prefix: list[tuple[int, int, float, int, float, float, float]] = []
    t0 = time.perf_counter()
    _steps(model, opt, caps, regions, schedule, 0, shared, np_, False, prefix, bar)
    t_shared = time.perf_counter() - t0
    out = {}
    for name in variants:
        m = NceDistill(cfg, word_vectors).to(device)
        m.load_state_dict(model.state_dict())
        o = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=np_.lr)
        o.load_state_dict(copy.deepcopy(opt.state_dict()))  # Adam's moments are updated in place
        records = list(prefix)
        t1 = time.perf_counter()
        _steps(m, o, caps, regions, schedule, shared, len(schedule), np_, name == "distill", records, bar)
        seconds = t_shared + time.perf_counter() - t1
        out[name] = (m.cpu().eval(), _curve(records), sum(r[3] for r in records) / max(seconds, 1e-9))
    if bar is not None:
        bar.close()
    return out


# ---- inference and evaluation ----------------------------------------------------------------------------
@torch.no_grad()
def region_scores(model: NceDistill, regions: Regions, texts: Sequence[str], image_rows: Sequence[int],
                  vocab: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """``(S, R)`` float32 scores s(x, y) of each phrase against its image's regions (-inf on padding)."""
    ids, _ = encode(texts, vocab, model.cfg.max_len)
    rows = np.asarray(image_rows, dtype=np.int64)
    out = np.full((len(texts), regions.mask.shape[1]), -np.inf, np.float32)
    for lo in range(0, len(texts), batch_size):
        r = torch.from_numpy(rows[lo:lo + batch_size])
        f = model.embed_regions(regions.features[r])  # [B,R,E]
        g = model.embed_phrases(ids[lo:lo + batch_size])  # [B,E]
        s = torch.einsum("bre,be->br", f, g).masked_fill(~torch.from_numpy(regions.mask)[r], float("-inf"))
        out[lo:lo + len(r)] = s.numpy()
    return out


def eval_refs(ds: CanonicalDataset, proposals: ShardSet) -> list[RefRecord]:
    """Every sentence (all splits) whose image has cached proposals."""
    return [r for r in ds.refs if r.image_id in proposals]


def checkpoint_key(params: Params, ds: CanonicalDataset, proposals: ShardSet, labels: ShardSet) -> str:
    np_ = params.students.nce_distill
    inputs = {"dataset": ds.fingerprint(), "proposals": proposals.manifest.stage_key, "labels": labels.manifest.stage_key}
    if np_.glove_path:
        inputs["glove"] = file_sha256(np_.glove_path)  # the vectors' content, never the path
    return stage_key(STAGE, code_version(__name__), {}, np_.model_dump(mode="json") | {"seed": params.seed}, inputs)


def run_student_nce_distill(params: Params) -> Path:
    """Stage ``student-nce-distill``: train (with and, when ``no_distill``, without L_RP) on the train
    split's phrases, ground every phrase, write predictions, ``data/metrics/student-nce-distill.json``
    and its curve. Returns the predictions' shard-set directory."""
    np_ = params.students.nce_distill
    ds = CanonicalDataset.load(params.prepared_dir())
    image_ids = sorted({r.image_id for r in ds.refs})
    proposals = teacher_set(params, np_.proposals_from, image_ids, ds, STAGE)
    train_refs = [r for r in ds.refs if r.split == np_.train_split]
    if not train_refs:
        raise ValueError(f"{STAGE}: dataset {ds.name} has no {np_.train_split!r} phrases to train on")
    labels_set = teacher_set(params, np_.labels_from, [r.ref_id for r in train_refs], ds, STAGE)
    regions = load_regions(proposals, ds, image_ids, np_.geometry)
    if np_.standardise:
        standardise(regions, sorted({regions.row[r.image_id] for r in train_refs}))
    key = checkpoint_key(params, ds, proposals, labels_set)
    mpath = model_path(params, STAGE)
    vocab = build_vocab([r.text for r in train_refs])
    cfg = NceDistillConfig(vocab_size=len(vocab), feature_dim=regions.features.shape[-1], embed_dim=np_.embed_dim,
                           word_dim=np_.word_dim, hidden=np_.hidden, max_len=np_.max_len, lstm_layers=np_.lstm_layers)
    glove: torch.Tensor | None = None
    if np_.glove_path:
        glove, found = load_glove(np_.glove_path, vocab, np_.word_dim)
        log.info("%s: %d of %d vocabulary words in %s", STAGE, found, len(vocab), np_.glove_path)

    def build(tmp: Path | None) -> None:
        """Train (every rank); write the checkpoint to ``tmp`` (rank 0; ``None`` on the others)."""
        caps = build_captions(train_refs, regions, soft_labels(labels_set, [r.ref_id for r in train_refs],
                                                               regions.classes), vocab, np_.max_len)
        variants = ("distill", "no_distill") if np_.no_distill else ("distill",)
        with torch_threads(np_.threads), training(params):
            trained = train(caps, regions, cfg, np_, seed=params.seed, variants=variants, progress=params.progress,
                            word_vectors=glove)
        states = {k: v[0].state_dict() for k, v in trained.items()}
        curves = {k: v[1] for k, v in trained.items()}
        speed = {k: v[2] for k, v in trained.items()}
        if tmp is None:
            return
        torch.save({"config": asdict(cfg), "vocab": list(vocab), "states": states, "curves": curves}, tmp)
        write_json(timing_path(mpath), {"throughput_samples_per_s": round(speed["distill"], 2),
                                        "throughput_no_distill_samples_per_s": round(speed.get("no_distill", 0.0), 2)})

    if not D.is_main():  # every rank trains (torchrun); rank 0 alone evaluates and writes
        build(None)
        return params.student_dir(STAGE)
    write_artefact(mpath, key, build, {"stage": STAGE, "dataset": ds.name, "inputs": {
        "proposals": proposals.manifest.stage_key, "labels": labels_set.manifest.stage_key}})
    from grounding.errors import load_weights

    ckpt = load_weights(mpath, f"{STAGE} model", f"delete {mpath} and rerun {STAGE} to retrain it")
    refs = eval_refs(ds, proposals)
    row = regions.row
    rows = [row[r.image_id] for r in refs]
    preds: dict[str, dict[str, np.ndarray]] = {}
    for name, state in ckpt["states"].items():
        model = NceDistill(NceDistillConfig(**ckpt["config"]))
        model.load_state_dict(state)
        model.eval()
        best = region_scores(model, regions, [r.text for r in refs], rows, ckpt["vocab"]).argmax(axis=1)
        preds[name] = {r.ref_id: regions.boxes[i, b] for r, i, b in zip(refs, rows, best)}
    acc, n = acc_per_split(preds["distill"], ds)
    baselines = proposal_baselines(regions, refs, ds, params.seed)
    baselines["teacher_target"] = teacher_target_accuracy(regions, refs, ds, labels_set, np_.labels_from)
    extra: dict[str, Any] = {**read_timing(mpath),
                             "throughput_unit": "training captions (images) per second, distill run",
                             "train_split": np_.train_split, "steps": np_.steps}
    if "no_distill" in preds:
        extra["no_distill"] = acc_per_split(preds["no_distill"], ds)[0]
    write_metrics(params, STAGE, acc, n, baselines, **extra)
    write_json(curve_path(params, STAGE), merge_curves(ckpt["curves"]))
    return write_predictions(params, STAGE, __name__, ds, preds["distill"],
                             {"proposals": proposals.manifest.stage_key, "labels": labels_set.manifest.stage_key},
                             np_.model_dump(mode="json") | {"seed": params.seed}, file_sha256(mpath))


def teacher_target_accuracy(regions: Regions, refs: Sequence[RefRecord], ds: CanonicalDataset, labels_set: ShardSet,
                            labels_from: str) -> dict[str, float]:
    """Acc@0.5 of the teacher target itself as a grounder: the region with the largest p̂ (the most
    confident proposal when the phrase has no target). Refs without a label row count as no target."""
    have = [r.ref_id for r in refs if r.ref_id in labels_set]
    lab = dict(zip(have, soft_labels(labels_set, have, regions.classes)))
    row = regions.row
    pred = {}
    for r in refs:
        i = row[r.image_id]
        t, valid = region_targets(lab.get(r.ref_id, np.zeros(len(regions.classes), np.float32)),
                                  regions.class_probs[i], regions.mask[i])
        score = t if bool(valid) else np.where(regions.mask[i], regions.scores[i], -np.inf)
        pred[r.ref_id] = regions.boxes[i, int(np.argmax(score))]
    return acc_per_split(pred, ds)[0]


def merge_curves(curves: Mapping[str, list[dict[str, float]]]) -> list[dict[str, float]]:
    """One list for a DVC plot: the distill curve's points, with the λ = 0 run's losses as ``no_distill_*``."""
    base = [dict(p) for p in curves.get("distill", [])]
    for p, q in zip(base, curves.get("no_distill", [])):
        p.update({f"no_distill_{k}": v for k, v in q.items() if k in ("loss", "l_is", "l_rp")})
    return base


__all__ = ["NceDistill", "NceDistillConfig", "Regions", "batch_targets", "box_geometry", "build_captions",
           "load_glove", "load_regions", "standardise", "losses", "proposal_baselines", "region_scores", "run_student_nce_distill",
           "soft_labels", "staircase", "train"]
