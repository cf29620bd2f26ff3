"""Teacher targets built from cached teacher outputs: pure array math, no model code.

Here rather than under ``teachers/`` because students read shards and may not import ``grounding.teachers``
(DESIGN.md §2); teachers and students both may import this module.

NCE+Distill (seed paper 002, Eq. 3-4). A detector gives each region x_l a class posterior p(z | x_l); the
WordNet stage gives each phrase y a soft label p(y, z) over the same classes. The pseudo region-phrase target
is

    p̂(x_l, y) ∝ Σ_z p(y, z) p(z | x_l) p(x_l),

with p(z) taken as constant (dropped) and p(x_l) uniform over the image's regions. Eq. 4 uses p̂ as the target
of a softmax *over the regions* of the image (ĥ normalises exp(s(x_l, y)/τ) over l ∈ R_i), so for each phrase
p̂(·, y) is normalised over regions: p̂(x_l, y) = t_l / Σ_l' t_l' with t_l = Σ_z p(y, z) p(z | x_l). A phrase
whose label is all zero (WordNet matched no class) or whose classes no region supports (Σ_l t_l = 0) has no
target: its row is all zero and ``valid`` is False, and the student leaves it out of L_RP.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def region_targets(labels: Any, class_probs: Any, region_mask: Any = None, *, eps: float = 0.0) -> tuple[Any, Any]:
    """Per-region teacher targets p̂(x, y) of NCE+Distill, normalised over regions.

    Works on NumPy arrays and on torch tensors (same type out; float32 for float16 inputs).

    Args:
        labels: ``(..., P, C)`` (or ``(C,)``) soft labels p(y, z) of P phrases over C detector classes
            (the ``label`` field of ``wordnet-labels``).
        class_probs: ``(..., R, C)`` detector class posteriors p(z | x) of R regions, columns in the same
            class order as ``labels`` (drop a background column first).
        region_mask: optional ``(..., R)`` bool, False for padded regions (they get zero target).
        eps: targets t below ``eps`` count as zero mass (``valid`` needs Σ_l t_l > eps).

    Returns:
        ``(targets, valid)``: ``targets`` ``(..., P, R)`` float32, each valid row sums to 1 over regions, an
        invalid row is all zero; ``valid`` ``(..., P)`` bool.
    """
    try:
        import torch

        is_torch = isinstance(labels, torch.Tensor) or isinstance(class_probs, torch.Tensor)
    except ImportError:  # pragma: no cover - torch is a dependency
        is_torch = False
    if is_torch:
        import torch

        lab = torch.as_tensor(labels).float()
        probs = torch.as_tensor(class_probs, device=lab.device).float()
    else:
        lab = np.asarray(labels, dtype=np.float32)
        probs = np.asarray(class_probs, dtype=np.float32)
    single = lab.ndim == 1
    if single:
        lab = lab[None]
    if probs.ndim < 2 or lab.shape[-1] != probs.shape[-1]:
        raise ValueError(f"labels (..., P, C) and class_probs (..., R, C) must share C; got shapes "
                         f"{tuple(lab.shape)} and {tuple(probs.shape)}")
    if (lab < 0).any() or (probs < 0).any():
        raise ValueError("labels and class_probs must be non-negative")
    t = lab @ probs.transpose(-1, -2) if is_torch else lab @ np.swapaxes(probs, -1, -2)  # [..., P, R]
    if region_mask is not None:
        mask = torch.as_tensor(region_mask, device=t.device).bool() if is_torch else np.asarray(region_mask, bool)
        if tuple(mask.shape) != tuple(probs.shape[:-1]):
            raise ValueError(f"region_mask shape {tuple(mask.shape)} != class_probs regions {tuple(probs.shape[:-1])}")
        t = t * mask[..., None, :]
    total = t.sum(-1, keepdim=True) if is_torch else t.sum(-1, keepdims=True)  # [..., P, 1]
    valid = total[..., 0] > eps
    safe = torch.where(valid[..., None], total, torch.ones_like(total)) if is_torch \
        else np.where(valid[..., None], total, 1.0)
    out = t / safe
    out = out * valid[..., None]
    if single:
        out, valid = out[0], valid[0]
    return out, valid
