"""RefCLIP's public training recipe: Adam, the 'wcosine' per-step schedule and the ramped EMA.

kingthreestones/RefCLIP ``train.py`` and ``utils/utils.py``: Adam(betas, eps) over the trainable parameters;
``LambdaLR`` stepped every batch: over the first ``warmup_epochs * steps_per_epoch`` steps the lr rises
linearly from ``warmup_lr`` to ``lr``, then follows ``min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2``;
gradients clipped to norm ``grad_clip`` before the step; an EMA of weights *and* buffers with decay
``min(ema_decay, (n + 1) / (n + 10))`` at update ``n`` (here torch's ``AveragedModel``; its first update
copies the model, where the public EMA blends 0.1 of the initial weights).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from grounding.runtime import scaled_step


def wcosine_factor(step: int, lr: float, warmup_steps: int, total_steps: int, warmup_lr: float,
                   min_lr: float) -> float:
    """lr multiplier (of ``lr``) at optimiser step ``step`` (0-based) of the public 'wcosine' schedule."""
    if step < warmup_steps:
        return (warmup_lr + step * (lr - warmup_lr) / warmup_steps) / lr
    span = max(total_steps - warmup_steps, 1)
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup_steps) / span))) / lr


def make_optimizer(model: nn.Module, rp: Any, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """Adam over the parameters that require grad (frozen word vectors excluded) and its scheduler."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=rp.lr,
                           betas=tuple(rp.betas), eps=rp.eps)
    if rp.scheduler == "constant":
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    warm, total = int(rp.warmup_epochs * steps_per_epoch), int(rp.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: wcosine_factor(s, rp.lr, warm, total, rp.warmup_lr, rp.min_lr))
    return opt, sched


def _ramped_ema(decay: float):
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        d = min(decay, (float(n) + 1) / (float(n) + 10))
        if averaged and not averaged[0].is_floating_point():  # e.g. BatchNorm's num_batches_tracked
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1 - d)

    return update


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """The public EMA (weights and buffers, ramped decay) or None when ``decay`` is 0."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=_ramped_ema(decay), use_buffers=True)


def optimiser_step(loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                   ema: AveragedModel | None, grad_clip: float, scaler: torch.amp.GradScaler | None = None) -> None:
    """One public training step: backward (through ``scaler``: fp16 on CUDA), clip the gradient norm to
    ``grad_clip`` (0: off), Adam step, scheduler step (per batch), EMA update."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    scaled_step(loss, opt, scaler, model.parameters(), grad_clip if grad_clip > 0 else None)
    sched.step()
    if ema is not None:
        ema.update_parameters(model)
