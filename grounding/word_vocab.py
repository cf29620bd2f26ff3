"""The word vocabulary the weakly supervised students share with RefCLIP's checkpoints: a lower-cased word
split, a sorted vocabulary (``<pad>`` = 0, ``<unk>`` = 1) and fixed-length token ids. Neutral (no model
code), so a student reads it without importing the RefCLIP teacher; RefCLIP itself tokenises as the public
code does (:mod:`grounding.refclip.text`)."""

from __future__ import annotations

import re
from typing import Sequence

import torch

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[\w']+", re.UNICODE)


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
