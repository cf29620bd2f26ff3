"""RefCLIP's language encoder as published (kingthreestones/RefCLIP ``models/language_encoder.py`` and the
``SA``/``AttFlat`` blocks of ``models/network_blocks.py``), with the same module names so a public state
dict's ``lang_encoder.*`` keys load as they are.

Embedding (``word_dim``, frozen GloVe when given) → a one-layer recurrent encoder called ``lstm``: in the
public code (``LANG_ENC: lstm``) it is a *unidirectional GRU* with ``hidden`` units (``rnn: lstm`` here gives a
real LSTM, for comparison only) → ``n_sa`` self-attention blocks (post-norm, a LayerNorm that divides by the
unbiased std + 1e-6, feed-forward ``ff_size`` with ReLU) → ``AttFlat`` attention pooling (one glimpse) and a
linear merge: ``(B, L)`` ids → ``(B, hidden)``. Padding (id 0) is masked in attention and pooling with -1e9.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NEG = -1e9


class FC(nn.Module):
    """Linear → ReLU → dropout (``fc.linear`` in the public key names)."""

    def __init__(self, n_in: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(self.linear(x)))


class MLP(nn.Module):
    """``FC`` then a plain linear layer."""

    def __init__(self, n_in: int, n_mid: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.fc = FC(n_in, n_mid, dropout)
        self.linear = nn.Linear(n_mid, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.fc(x))


class LayerNorm(nn.Module):
    """``weight * (x - mean) / (std + eps) + bias`` over the last dim, std unbiased (the public block)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + self.bias


class MHAtt(nn.Module):
    """Multi-head scaled dot-product self-attention; ``pad`` ``(B, L)`` True at padding keys."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"refclip.hidden ({hidden}) must be a multiple of refclip.heads ({heads})")
        self.heads = heads
        self.linear_v = nn.Linear(hidden, hidden)
        self.linear_k = nn.Linear(hidden, hidden)
        self.linear_q = nn.Linear(hidden, hidden)
        self.linear_merge = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        return x.view(b, n, self.heads, h // self.heads).transpose(1, 2)  # [B,heads,L,d]

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.linear_q(x)), self._split(self.linear_k(x)), self._split(self.linear_v(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B,heads,L,L]
        att = self.dropout(att.masked_fill(pad[:, None, None, :], NEG).softmax(dim=-1))
        out = (att @ v).transpose(1, 2).reshape(x.shape)
        return self.linear_merge(out)


class FFN(nn.Module):
    def __init__(self, hidden: int, ff_size: int, dropout: float) -> None:
        super().__init__()
        self.mlp = MLP(hidden, ff_size, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SA(nn.Module):
    """Post-norm self-attention block: ``norm1(x + att(x))`` then ``norm2(x + ffn(x))``."""

    def __init__(self, hidden: int, heads: int, ff_size: int, dropout: float) -> None:
        super().__init__()
        self.mhatt = MHAtt(hidden, heads, dropout)
        self.ffn = FFN(hidden, ff_size, dropout)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm1, self.norm2 = LayerNorm(hidden), LayerNorm(hidden)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.mhatt(x, pad)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class AttFlat(nn.Module):
    """Attention pooling over positions (one glimpse) then ``linear_merge``: ``(B, L, H)`` → ``(B, H)``."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = MLP(hidden, hidden // 2, 1, dropout)
        self.linear_merge = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        att = self.mlp(x).masked_fill(pad.unsqueeze(-1), NEG).softmax(dim=1)  # [B,L,1]
        return self.linear_merge((att * x).sum(dim=1))


class LanguageEncoder(nn.Module):
    """``(B, L)`` token ids (0 = padding) → ``(B, hidden)`` sentence feature (``flat_lang_feat``)."""

    def __init__(self, vocab_size: int, word_dim: int = 300, hidden: int = 512, n_sa: int = 3, heads: int = 8,
                 ff_size: int = 2048, dropout: float = 0.1, rnn: str = "gru") -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim)
        if rnn not in ("gru", "lstm"):
            raise ValueError(f"refclip.rnn must be gru or lstm, got {rnn!r}")
        self.lstm = (nn.GRU if rnn == "gru" else nn.LSTM)(word_dim, hidden, num_layers=1, batch_first=True)
        self.sa_list = nn.ModuleList(SA(hidden, heads, ff_size, dropout) for _ in range(n_sa))
        self.att_flat = AttFlat(hidden, dropout)

    def set_word_vectors(self, vectors: torch.Tensor) -> None:
        """Copy frozen word vectors ``(vocab, word_dim)`` into the embedding and stop its gradient."""
        if vectors.shape != self.embedding.weight.shape:
            raise ValueError(f"word vectors {tuple(vectors.shape)} do not fit the embedding "
                             f"{tuple(self.embedding.weight.shape)}")
        self.embedding.weight.data.copy_(vectors)
        self.embedding.weight.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0  # [B,L]
        x, _ = self.lstm(self.embedding(ids))  # [B,L,H]; padding runs through the RNN as in the public code
        for sa in self.sa_list:
            x = sa(x, pad)
        return self.att_flat(x, pad)
