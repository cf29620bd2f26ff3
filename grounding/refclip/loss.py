"""RefCLIP's anchor-based contrastive loss (SEEDS 003, Eq. 4).

For sentence ``t`` of batch item ``t``: the positive is the best-scoring kept anchor of its own image; the
negatives are, for every *other* image in the batch, its ``n_neg`` best-scoring anchors for that sentence
(``n_neg = 2`` by default: the paper's negative anchor augmentation, as in the public code, which takes
the top-2 by similarity). Anchors of the sentence's own image are never negatives (the indicator of
Eq. 4), nor are those of other batch items showing the same image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def anchor_contrastive_loss(scores: torch.Tensor, anchor_mask: torch.Tensor, same_image: torch.Tensor,
                            n_neg: int = 2, temperature: float = 1.0) -> torch.Tensor:
    """Mean InfoNCE loss over the batch.

    Args:
        scores: ``(M, M, K)`` — ``scores[t, i, k]`` = score of anchor ``k`` of item ``i``'s image for item
            ``t``'s sentence.
        anchor_mask: ``(M, K)`` bool, True for real (not padding) anchors.
        same_image: ``(M, M)`` bool, True where items ``t`` and ``i`` show the same image (diagonal included).
        n_neg: negative anchors taken from each other image.
        temperature: τ of Eq. 4.
    """
    m, m2, k = scores.shape
    if m != m2 or anchor_mask.shape != (m, k) or same_image.shape != (m, m):
        raise ValueError(f"shapes do not match: scores {tuple(scores.shape)}, mask {tuple(anchor_mask.shape)}, "
                         f"same_image {tuple(same_image.shape)}")
    if not anchor_mask.any(dim=1).all():
        raise ValueError("every image in the batch needs at least one kept anchor")
    neg_inf = torch.finfo(scores.dtype).min
    s = scores.masked_fill(~anchor_mask.unsqueeze(0), neg_inf)  # [M,M,K]
    top = s.topk(min(max(n_neg, 1), k), dim=-1).values  # [M,M,n]
    idx = torch.arange(m, device=scores.device)
    positive = top[idx, idx, 0]  # [M]
    negatives = top[..., :n_neg].masked_fill(same_image.unsqueeze(-1), neg_inf).flatten(1)  # [M, M*n]
    logits = torch.cat([positive.unsqueeze(1), negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(m, dtype=torch.long, device=scores.device))


def published_contrastive_loss(scores: torch.Tensor, anchor_mask: torch.Tensor) -> torch.Tensor:
    """The public code's ``getContrast`` (kingthreestones/RefCLIP ``models/RefCLIP/head.py``): logits of
    sentence ``t`` are the best anchor of *every* image of the batch (its own is the target) and the
    second-best anchor of every other image (negative anchor augmentation), τ = 1. Unlike Eq. 4 as
    :func:`anchor_contrastive_loss` applies it with ``same_image``, other batch items showing the same
    image are negatives too. Equal to ``anchor_contrastive_loss(scores, mask, eye, n_neg=2)``."""
    m = scores.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=scores.device)
    return anchor_contrastive_loss(scores, anchor_mask, eye, n_neg=2, temperature=1.0)
