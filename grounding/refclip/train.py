"""Train RefCLIP entirely from the cached anchor shard set: no detector forward during training."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from grounding.artefacts import build_once
from grounding.config import Params
from grounding.data.schema import CanonicalDataset
from grounding.refclip.loss import anchor_contrastive_loss
from grounding.refclip.model import RefCLIP, RefCLIPConfig, build_vocab, checkpoint, encode
from grounding.runtime import resolve_device, seed_everything
from grounding.shards import ShardSet, code_version, stage_key

log = logging.getLogger(__name__)
TRAIN_MODULES = ("grounding.refclip.model", "grounding.refclip.loss", "grounding.refclip.train")


@dataclass
class AnchorTable:
    """Kept anchors of every image, padded to ``K`` = the largest count: features ``(N, K, D)`` float32,
    ``mask`` ``(N, K)`` bool, ``boxes`` ``(N, K, 4)`` float32 xyxy original pixels, ``cells`` ``(N, K)``
    int32 grid index, ``confidence`` ``(N, K)`` float32."""

    image_ids: list[str]
    features: torch.Tensor
    mask: torch.Tensor
    boxes: np.ndarray
    cells: np.ndarray
    confidence: np.ndarray

    @property
    def row(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.image_ids)}


def load_anchor_table(anchors: ShardSet, image_ids: Sequence[str]) -> AnchorTable:
    """Read the kept anchors of ``image_ids`` from a ``yolo-anchors`` shard set into padded arrays."""
    rows = [anchors.get(i, ["features", "boxes", "scores", "cell_index"]) for i in image_ids]
    k = max((len(r["boxes"]) for r in rows), default=0)
    if k == 0:
        raise ValueError(f"{anchors.path}: no kept anchors at all")
    d = anchors.fields["features"].shape[0]
    n = len(rows)
    feats = np.zeros((n, k, d), np.float32)
    mask = np.zeros((n, k), bool)
    boxes = np.zeros((n, k, 4), np.float32)
    cells = np.full((n, k), -1, np.int32)
    conf = np.zeros((n, k), np.float32)
    for i, r in enumerate(rows):
        m = len(r["boxes"])
        feats[i, :m], mask[i, :m], boxes[i, :m] = r["features"], True, r["boxes"]
        cells[i, :m], conf[i, :m] = r["cell_index"], r["scores"]
    return AnchorTable(list(image_ids), torch.from_numpy(feats), torch.from_numpy(mask), boxes, cells, conf)


def load_glove(path: str | Path, vocab: Sequence[str], dim: int) -> torch.Tensor:
    """Embedding matrix ``(len(vocab), dim)`` from a local GloVe text file (``word v1 ... vdim`` per line);
    words missing from the file keep a small deterministic random vector."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(len(vocab), dim, generator=g) * 0.1
    out[0] = 0
    index = {w: i for i, w in enumerate(vocab)}
    found = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            word, _, rest = line.rstrip("\n").partition(" ")
            if word in index:
                vals = rest.split()
                if len(vals) != dim:
                    raise ValueError(f"{path}:{line_no}: vector of {len(vals)} values, word_dim is {dim}")
                out[index[word]] = torch.tensor([float(v) for v in vals])
                found += 1
    log.info("GloVe: %d of %d vocabulary words found in %s", found, len(vocab), path)
    return out


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle of ``range(n)`` cut into batches (the last, smaller one included if >= 2)."""
    perm = torch.randperm(n, generator=generator)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in out if len(b) >= 2]


def train_refclip(table: AnchorTable, texts: Sequence[str], image_rows: Sequence[int], rp: Any, *, seed: int,
                  device: torch.device, progress: bool = True) -> tuple[RefCLIP, list[str], list[dict[str, float]]]:
    """Train on sentences ``texts`` whose images are ``table`` rows ``image_rows``; returns the model (eval
    mode, on CPU), its vocabulary and the per-epoch curve ``[{"epoch", "loss", "pick_stability"}]``.

    ``pick_stability`` is the fraction of training sentences whose best anchor is the one picked after the
    previous epoch — a label-free convergence signal (GT boxes are never read in training)."""
    gen = seed_everything(seed)
    vocab = build_vocab(texts)
    cfg = RefCLIPConfig(vocab_size=len(vocab), feature_dim=table.features.shape[-1], word_dim=rp.word_dim,
                        hidden=rp.hidden, n_self_attention=rp.n_self_attention, heads=rp.heads, dropout=rp.dropout,
                        visual_mlp=rp.visual_mlp, max_len=rp.max_len)
    model = RefCLIP(cfg)
    if rp.glove:
        model.language.embedding.weight.data.copy_(load_glove(rp.glove, vocab, rp.word_dim))
    model.to(device).train()
    ids, _ = encode(texts, vocab, rp.max_len)
    rows = torch.as_tensor(list(image_rows), dtype=torch.long)
    feats, mask = table.features.to(device), table.mask.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=rp.lr)
    curve: list[dict[str, float]] = []
    prev_pick: torch.Tensor | None = None
    epochs = range(rp.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="refclip-train", unit="epoch")
    for epoch in epochs:
        total, count = 0.0, 0
        for b in batches(len(texts), rp.batch_size, gen):
            r = rows[b]
            scores = model(feats[r], ids[b].to(device))  # [M,M,K]
            loss = anchor_contrastive_loss(scores, mask[r], r[:, None] == r[None, :], rp.n_neg, rp.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
            count += len(b)
        pick = best_anchor(model, table, texts, rows.tolist(), vocab, device)[0]
        stable = float((pick == prev_pick).float().mean()) if prev_pick is not None else 0.0
        prev_pick = pick
        curve.append({"epoch": epoch + 1, "loss": round(total / max(count, 1), 6), "pick_stability": round(stable, 4)})
        if progress:
            epochs.set_postfix(loss=f"{curve[-1]['loss']:.4f}")
    return model.cpu().eval(), vocab, curve


@torch.no_grad()
def best_anchor(model: RefCLIP, table: AnchorTable, texts: Sequence[str], image_rows: Sequence[int],
                vocab: Sequence[str], device: torch.device | None = None,
                batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each sentence: index of its best kept anchor in its own image, that anchor's score, and whether
    the sentence was truncated; ``(S,)`` long, ``(S,)`` float32, ``(S,)`` bool."""
    was_training = model.training
    model.eval()
    device = device or torch.device("cpu")
    ids, truncated = encode(texts, vocab, model.cfg.max_len)
    rows = torch.as_tensor(list(image_rows), dtype=torch.long)
    picks, scores = [], []
    for s in range(0, len(texts), batch_size):
        r = rows[s:s + batch_size]
        a = model.embed_anchors(table.features[r].to(device))  # [B,K,H]
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
    key = stage_key("refclip-train", code_version(TRAIN_MODULES), {"anchors": anchors.manifest.teacher},
                    rp.model_dump(mode="json") | {"seed": params.seed},
                    {"dataset": ds.fingerprint(), "anchors": anchors.manifest.stage_key})
    out = model_path(params)
    curve_path = Path(params.paths.metrics) / "refclip-train-curve.json"

    def build(tmp: Path) -> None:
        images = sorted({s[1] for s in usable})
        table = load_anchor_table(anchors, images)
        row = table.row
        model, vocab, curve = train_refclip(table, [s[2] for s in usable], [row[s[1]] for s in usable], rp,
                                            seed=params.seed, device=resolve_device(params.device),
                                            progress=params.progress)
        torch.save(checkpoint(model, vocab), tmp)
        curve_path.parent.mkdir(parents=True, exist_ok=True)
        curve_path.write_text(json.dumps(curve, indent=1) + "\n")

    provenance = {"stage": "refclip-train", "dataset": ds.name, "dataset_fingerprint": ds.fingerprint(),
                  "anchors": str(anchors_dir), "anchors_key": anchors.manifest.stage_key,
                  "sentences": len(usable), "sentences_without_anchors": dropped,
                  "params": rp.model_dump(mode="json"), "seed": params.seed}
    build_once(out, key, build, provenance)
    if not curve_path.exists():  # the model was current but the curve was deleted: cheap to note, not rebuild
        log.warning("%s is missing; rerun with the model removed to regenerate it", curve_path)
    return out

