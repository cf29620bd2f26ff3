"""Train RefCLIP entirely from the cached anchor shard set: no detector forward during training.

Departures from the public code, all forced by training on a cache: the detector's maps are those of the
frozen detector in eval mode (the public ``net.train()`` also puts the frozen detector's BatchNorm in
training mode, so its features and saved running statistics drift during training); an epoch is one pass
over the *sentences* (the public loader draws one sentence per annotated object per epoch); anchors whose
boxes are degenerate are masked (issue 21)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from grounding import distributed as D
from grounding import runtime as R
from grounding.artefacts import write_artefact
from grounding.codeset import code_version
from grounding.config import Params
from grounding.data.schema import CanonicalDataset
from grounding.refclip.anchors import MAP_FIELDS, AnchorTable, load_anchor_table
from grounding.refclip.loss import anchor_contrastive_loss, published_contrastive_loss
from grounding.refclip.model import RefCLIP, RefCLIPConfig, RefCLIPNet, build_model, checkpoint
from grounding.refclip.recipe import make_ema, make_optimizer, optimiser_step
from grounding.refclip.text import build_vocab, encode, load_word_vectors
from grounding.runtime import resolve_device, seed_everything
from grounding.shards import ShardSet, stage_key
from grounding.shards.keys import file_sha256

log = logging.getLogger(__name__)


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle of ``range(n)`` cut into batches (the last, smaller one included if >= 2)."""
    perm = torch.randperm(n, generator=generator)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in out if len(b) >= 2]


def model_config(table: AnchorTable, anchors: ShardSet | None, vocab: Sequence[str], rp: Any) -> RefCLIPConfig:
    """The model sizes for ``table``'s cache layout and ``rp`` (params.yaml ``refclip``)."""
    common = dict(vocab_size=len(vocab), features=table.kind, word_dim=rp.word_dim, hidden=rp.hidden,
                  n_sa=rp.n_self_attention, heads=rp.heads, ff_size=rp.ff_size, dropout=rp.dropout, rnn=rp.rnn,
                  max_len=rp.max_len, word_vectors=str(rp.word_vectors) if rp.word_vectors else None)
    if table.kind == "p5-cells":
        return RefCLIPConfig(feature_dim=int(table.features.shape[-1]), visual_mlp=rp.visual_mlp, **common)
    src = anchors if anchors is not None else table.source
    channels = tuple(int(src.fields[f].shape[0]) for f in MAP_FIELDS)
    return RefCLIPConfig(channels=channels, fusion_hidden=rp.fusion_hidden or channels[2], **common)


class _Embeddings(nn.Module):
    """``forward(visual, ids) -> (anchors (B, K, H), text (B, H))``: the model's two embeddings in one
    forward, so DDP syncs the gradients of both; the scores (Eq. 3) are taken after :func:`D.gather_cat`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, visual: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.embed_anchors(visual), self.model.embed_text(ids)


def _loss(scores: torch.Tensor, mask: torch.Tensor, same: torch.Tensor, rp: Any) -> torch.Tensor:
    if rp.loss == "published":
        return published_contrastive_loss(scores, mask)
    return anchor_contrastive_loss(scores, mask, same, rp.n_neg, rp.temperature)


def train_refclip(table: AnchorTable, texts: Sequence[str], image_rows: Sequence[int], rp: Any, *, seed: int,
                  device: torch.device, progress: bool = True, vocab: Sequence[str] | None = None,
                  precision: str = "fp32", on_epoch: Callable[[RefCLIP | RefCLIPNet], dict[str, float]] | None = None,
                  ) -> tuple[RefCLIP | RefCLIPNet, list[str], list[dict[str, float]]]:
    """Train on sentences ``texts`` whose images are ``table`` rows ``image_rows`` with the public recipe
    (:mod:`grounding.refclip.recipe`); returns the model (the EMA one when ``ema_decay`` > 0; eval mode, on
    CPU), its vocabulary (``vocab`` or built from ``texts``) and the per-epoch curve
    ``[{"epoch", "loss", "lr", "pick_stability"}]``.

    ``pick_stability`` is the fraction of training sentences whose best anchor is the one picked after the
    previous epoch — a label-free convergence signal (GT boxes are never read in training).

    ``precision``: ``train.precision`` (autocast on CUDA, see :mod:`grounding.runtime`). Under torchrun each
    rank embeds its slice of every global batch (``rp.batch_size`` divides by the process count), the
    embeddings are gathered and every rank takes the loss of the whole batch (its negatives are the global
    batch's, as in one process); BatchNorm statistics are the global batch's. The curve is rank 0's.

    ``on_epoch`` (diagnostics, e.g. ``benchmarks/refclip_probe.py``): called on rank 0 after each epoch with
    the model inference would use (the EMA one, eval mode); its dict is added to that epoch's curve entry."""
    gen = seed_everything(seed)
    vocab = list(vocab) if vocab is not None else build_vocab(texts)
    model = build_model(model_config(table, None, vocab, rp))
    if rp.word_vectors:
        model.lang_encoder.set_word_vectors(load_word_vectors(rp.word_vectors, vocab, rp.word_dim))
    model.to(device).train()
    if D.world_size() > 1:
        D.check_divisible(rp.batch_size, "refclip.batch_size")
        model = D.global_batchnorm(model, device)
    net = D.wrap_ddp(_Embeddings(model), device, find_unused=True)  # a few fusion weights get no gradient
    scaler = R.grad_scaler(precision, device)
    ids, _ = encode(texts, vocab, rp.max_len)
    rows = torch.as_tensor(list(image_rows), dtype=torch.long)
    mask = table.mask.to(device)
    table.preload()
    steps = len(batches(len(texts), rp.batch_size, torch.Generator().manual_seed(0)))
    opt, sched = make_optimizer(model, rp, steps)
    ema = make_ema(model, rp.ema_decay)
    curve: list[dict[str, float]] = []
    prev_pick: torch.Tensor | None = None
    epochs = range(rp.epochs)
    if progress and D.is_main():
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="refclip-train", unit="epoch")
    for epoch in epochs:
        total, count = 0.0, 0
        for b in D.global_batches_usable(batches(len(texts), rp.batch_size, gen)):
            r, mine = rows[b], torch.as_tensor(D.shard_batch(b), dtype=torch.long)
            with R.autocast(precision, device):
                anchors, text = net(table.visual(rows[mine], device), R.to_device(ids[mine], device))
                scores = torch.einsum("ikh,th->tik", D.gather_cat(anchors), D.gather_cat(text))  # [M,M,K] Eq. 3
                loss = _loss(scores.float(), mask[r], r[:, None] == r[None, :], rp)
            optimiser_step(loss * D.world_size() if D.world_size() > 1 else loss, model, opt, sched, ema,
                           rp.grad_clip, scaler)
            total += loss.item() * len(b)
            count += len(b)
        stable = 0.0
        if D.is_main():  # the curve is rank 0's: the others skip the label-free check
            evaluated = ema.module if ema is not None else model
            pick = best_anchor(evaluated, table, texts, rows.tolist(), vocab, device)[0]
            stable = float((pick == prev_pick).float().mean()) if prev_pick is not None else 0.0
            prev_pick = pick
        curve.append({"epoch": epoch + 1, "loss": round(total / max(count, 1), 6),
                      "lr": float(opt.param_groups[0]["lr"]), "pick_stability": round(stable, 4)})
        if on_epoch is not None and D.is_main():
            was_training = evaluated.training
            curve[-1].update(on_epoch(evaluated.eval()))
            evaluated.train(was_training)
        if progress and D.is_main():
            epochs.set_postfix(loss=f"{curve[-1]['loss']:.4f}")
    final = ema.module if ema is not None else model
    return final.cpu().eval(), vocab, curve


@torch.no_grad()
def best_anchor(model: RefCLIP | RefCLIPNet, table: AnchorTable, texts: Sequence[str], image_rows: Sequence[int],
                vocab: Sequence[str], device: torch.device | None = None,
                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each sentence: index of its best *valid* kept anchor in its own image (degenerate anchors are
    masked, issue 21), that anchor's score (-inf when the image has none), and whether the sentence was
    truncated; ``(S,)`` long, ``(S,)`` float32, ``(S,)`` bool."""
    was_training = model.training
    model.eval()
    device = device or torch.device("cpu")
    ids, truncated = encode(texts, vocab, model.cfg.max_len)
    rows = torch.as_tensor(list(image_rows), dtype=torch.long)
    picks, scores = [], []
    for s in range(0, len(texts), batch_size):
        r = rows[s:s + batch_size]
        a = model.embed_anchors(table.visual(r, device))  # [B,K,H]
        t = model.embed_text(ids[s:s + batch_size].to(device))  # [B,H]
        sc = torch.einsum("bkh,bh->bk", a, t).masked_fill(~table.mask[r].to(device), float("-inf"))
        v, i = sc.max(dim=1)
        picks.append(i.cpu())
        scores.append(v.float().cpu())
    model.train(was_training)
    if not picks:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0), truncated
    return torch.cat(picks), torch.cat(scores), truncated


def train_sentences(ds: CanonicalDataset, split: str = "train") -> list[tuple[str, str, str]]:
    """``(ref_id, image_id, text)`` of the training sentences, in ref-id order (GT boxes not read)."""
    return [(r.ref_id, r.image_id, r.text) for r in ds.refs if r.split == split]


def _vectors_id(path: str | None) -> str:
    """Content id of the word vectors (a file's sha256; a directory's files' names and sizes)."""
    if not path:
        return ""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        return str(sorted((str(f.relative_to(p)), f.stat().st_size) for f in p.rglob("*") if f.is_file()))
    raise ValueError(f"refclip.word_vectors: {p} does not exist (a GloVe .txt or a spaCy vectors directory)")


def model_path(params: Params) -> Path:
    return Path(params.paths.models) / "refclip" / f"{params.dataset.name}.pt"


def run_refclip_train(params: Params) -> Path:
    """Stage ``refclip-train``: ``models/refclip/<dataset>.pt`` (+ sidecar) and the training curve."""
    rp = params.refclip
    ds = CanonicalDataset.load(params.prepared_dir())
    anchors_dir = params.teacher_dir(rp.anchors_from)
    anchors = ShardSet(anchors_dir)
    sents = train_sentences(ds)
    if not sents:
        raise ValueError(f"dataset {ds.name} has no 'train' sentences to train RefCLIP on")
    usable = [s for s in sents if s[1] in anchors]
    dropped = len(sents) - len(usable)
    key = stage_key("refclip-train", code_version(__name__), {"anchors": anchors.manifest.teacher},
                    rp.model_dump(mode="json") | {"seed": params.seed} | params.train.key_params(),
                    {"dataset": ds.fingerprint(), "anchors": anchors.manifest.stage_key,
                     "word_vectors": _vectors_id(rp.word_vectors)})
    out = model_path(params)
    curve_path = Path(params.paths.metrics) / "refclip-train-curve.json"

    # the public vocabulary: every sentence of the dataset (all splits), in order (words only, no labels)
    vocab = build_vocab(r.text for r in ds.refs)
    counts: dict[str, int] = {}

    def build(tmp: Path | None) -> None:  # tmp None: a rank other than 0 (trains its slices, writes nothing)
        images = sorted({s[1] for s in usable})
        table = load_anchor_table(anchors, images, rp.features)
        row = table.row
        valid = table.mask.any(dim=1).numpy()
        train = [s for s in usable if valid[row[s[1]]]]  # an image whose kept anchors are all degenerate
        counts["no_valid_anchor"] = len(usable) - len(train)
        if counts["no_valid_anchor"]:
            log.warning("%d training sentences dropped: every kept anchor of their image is degenerate",
                        counts["no_valid_anchor"])
        model, vocab_, curve = train_refclip(table, [s[2] for s in train], [row[s[1]] for s in train], rp,
                                             seed=params.seed, device=resolve_device(params.device),
                                             progress=params.progress, vocab=vocab,
                                             precision=params.train.precision)
        if tmp is None:
            return
        torch.save(checkpoint(model, vocab_), tmp)
        curve_path.parent.mkdir(parents=True, exist_ok=True)
        curve_path.write_text(json.dumps(curve, indent=1) + "\n")

    provenance = {"stage": "refclip-train", "dataset": ds.name, "dataset_fingerprint": ds.fingerprint(),
                  "anchors": str(anchors_dir), "anchors_key": anchors.manifest.stage_key,
                  "sentences": len(usable), "sentences_without_anchors": dropped,
                  "params": rp.model_dump(mode="json"), "seed": params.seed}
    if not D.is_main():  # every rank trains (torchrun); rank 0 alone writes
        build(None)
        return out
    write_artefact(out, key, build, provenance)
    return out

