"""RefCLIP's anchor-text matching model, trained on cached YOLOv3 stride-32 anchor features.

Language encoder (SEEDS 003): word embeddings → bi-GRU → self-attention layers → attention pooling
(``AttFlat``-style) → a 512-d sentence feature. Anchor features (the cached neck feature of each kept
stride-32 cell) and the sentence feature are linearly projected to a joint 512-d space; the score of an
anchor for a sentence is their dot product (Eq. 3). The detector itself is frozen and never run here.

Departure from the public code: RefCLIP fuses the three YOLO scales with a trainable module before
selecting anchors; we cache only the stride-32 feature (the 13x13 grid the paper keeps), so the trainable
visual part is a projection (``visual_mlp`` layers) on that cached feature.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[\w']+", re.UNICODE)


@dataclass(frozen=True)
class RefCLIPConfig:
    """Model sizes. ``feature_dim``: the cached anchor feature width; ``hidden``: language and joint dim."""

    vocab_size: int
    feature_dim: int
    word_dim: int = 300
    hidden: int = 512
    n_self_attention: int = 1
    heads: int = 8
    dropout: float = 0.1
    visual_mlp: int = 1  # 1: a linear projection; 2: Linear-ReLU-Linear
    max_len: int = 15

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes); the rest is dropped."""
    return _WORD.findall(text.lower())


def build_vocab(texts: Sequence[str], min_count: int = 1) -> list[str]:
    """Sorted vocabulary of the training sentences, ``<pad>`` = 0 and ``<unk>`` = 1 first.

    Saved with the checkpoint: the mapping never depends on the order sentences are read in."""
    counts: dict[str, int] = {}
    for t in texts:
        for w in tokenize(t):
            counts[w] = counts.get(w, 0) + 1
    return [PAD, UNK, *sorted(w for w, c in counts.items() if c >= min_count)]


def encode(texts: Sequence[str], vocab: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, max_len)`` int64 (0-padded, truncated) and the truncation flags ``(B,)`` bool.

    An empty sentence becomes a single ``<unk>`` token so that every row has at least one position."""
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    truncated = torch.zeros(len(texts), dtype=torch.bool)
    for r, t in enumerate(texts):
        toks = [index.get(w, 1) for w in tokenize(t)] or [1]
        truncated[r] = len(toks) > max_len
        toks = toks[:max_len]
        ids[r, : len(toks)] = torch.tensor(toks)
    return ids, truncated


class LanguageEncoder(nn.Module):
    """Embedding → bi-GRU → self-attention → attention pooling; ``(B, L)`` ids → ``(B, hidden)``."""

    def __init__(self, cfg: RefCLIPConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.word_dim, padding_idx=0)
        self.gru = nn.GRU(cfg.word_dim, cfg.hidden // 2, batch_first=True, bidirectional=True)
        self.self_attention = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, dim_feedforward=2 * cfg.hidden, dropout=cfg.dropout,
                                       batch_first=True)
            for _ in range(cfg.n_self_attention)
        )
        self.pool_score = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden // 2), nn.ReLU(),
                                        nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden // 2, 1))
        self.pool_out = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0  # [B,L]
        x, _ = self.gru(self.embedding(ids))  # [B,L,H]
        for layer in self.self_attention:
            x = layer(x, src_key_padding_mask=pad)
        att = self.pool_score(x).squeeze(-1).masked_fill(pad, float("-inf"))  # [B,L]
        pooled = (att.softmax(dim=-1).unsqueeze(-1) * x).sum(dim=1)  # [B,H]
        return self.pool_out(pooled)


class RefCLIP(nn.Module):
    """Scores ``(B_text, B_img, K)`` of every kept anchor of every image for every sentence."""

    def __init__(self, cfg: RefCLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.language = LanguageEncoder(cfg)
        if cfg.visual_mlp == 1:
            self.visual = nn.Linear(cfg.feature_dim, cfg.hidden)
        else:
            self.visual = nn.Sequential(nn.Linear(cfg.feature_dim, cfg.hidden), nn.ReLU(),
                                        nn.Linear(cfg.hidden, cfg.hidden))
        self.text = nn.Linear(cfg.hidden, cfg.hidden)

    def embed_anchors(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, K, feature_dim)`` cached anchor features → ``(B, K, hidden)`` joint-space vectors."""
        return self.visual(features.float())

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` token ids → ``(B, hidden)`` joint-space vectors."""
        return self.text(self.language(ids))

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """All-pairs scores ``[t, i, k] = <anchor k of image i, sentence t>`` (Eq. 3)."""
        a = self.embed_anchors(features)  # [B,K,H]
        t = self.embed_text(ids)  # [T,H]
        return torch.einsum("ikh,th->tik", a, t)


def checkpoint(model: RefCLIP, vocab: Sequence[str]) -> dict[str, Any]:
    """A plain dict (tensors, strings, numbers) that ``torch.load(weights_only=True)`` accepts."""
    return {"format": "grounding-refclip-v1", "config": model.cfg.to_dict(), "vocab": list(vocab),
            "state_dict": model.state_dict()}


def from_checkpoint(ckpt: dict[str, Any]) -> tuple[RefCLIP, list[str]]:
    """Rebuild the model and its vocabulary from :func:`checkpoint`'s dict."""
    if ckpt.get("format") != "grounding-refclip-v1":
        raise ValueError(f"not a grounding RefCLIP checkpoint (format {ckpt.get('format')!r})")
    model = RefCLIP(RefCLIPConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), list(ckpt["vocab"])
