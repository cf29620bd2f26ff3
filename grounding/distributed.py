"""Data-parallel training under ``torchrun``: rank / world helpers, process-group set-up, DDP wrapping, the
per-rank slices of a global batch, and global BatchNorm statistics.

Neutral: imports torch and the standard library only. Every helper is a no-op (rank 0 of a world of 1)
when ``torch.distributed`` is not initialised, so single-process code calls them unconditionally.

Conventions. Every rank builds the *same* global batches (same seed, same generator calls) and trains on
its own disjoint slice of each (:func:`shard_batch`); the global batch is the one a single process uses,
so a run on N processes matches a 1-process run up to float reduction order when the loss is a mean over
the batch's items (:func:`local_weight` makes DDP's gradient *mean* over ranks the gradient of the global
batch mean), BatchNorm sees the whole global batch (:func:`global_batchnorm`) and dropout is 0 or seeded
by item rather than by rank. Launch: ``torchrun --standalone --nproc_per_node N ...`` on one machine; on
several, ``torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT
--rdzv_id JOB ...`` on each (torchrun's rendezvous sets the env vars :func:`init_from_env` reads).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")
#: seconds a rank waits at a collective (e.g. a barrier while rank 0 alone runs a long stage)
TIMEOUT_ENV = "GROUNDING_DIST_TIMEOUT_S"


def is_initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialised() else 0


def world_size() -> int:
    """Processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_initialised() else 1


def local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``; 0 when unset): its CUDA device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the only rank that writes checkpoints, metrics and shard sets."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def launched() -> bool:
    """True in a process that torchrun started with ``WORLD_SIZE`` > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> bool:
    """``init_process_group`` from torchrun's env vars (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``):
    backend ``nccl`` for a CUDA ``device`` (and ``cuda.set_device(LOCAL_RANK)``), else ``gloo``. No-op
    (returns False) when ``WORLD_SIZE`` is unset or 1, or when a group already exists."""
    if not launched() or is_initialised():
        return False
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank())
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 4 * 3600)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    log.info("rank %d of %d (%s)", rank(), world_size(), dist.get_backend())
    return True


def shutdown() -> None:
    """Destroy the process group (when one exists)."""
    if is_initialised():
        dist.destroy_process_group()


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable object), so that all ranks take the same decision
    (e.g. whether a stage's output is current); ``value`` itself in one process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` on ``device`` (its CUDA index as ``device_ids``); ``model`` itself in
    one process. ``find_unused``: DDP's ``find_unused_parameters`` (for models whose loss leaves a head unused)."""
    if world_size() == 1:
        return model
    ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_divisible(global_batch: int, what: str) -> int:
    """Per-rank batch ``global_batch / world_size()``; ``ValueError`` naming ``what`` when it does not divide."""
    n = world_size()
    if global_batch % n:
        raise ValueError(f"{what} = {global_batch} is not divisible by the {n} processes; pick a process count "
                         f"that divides it (the global batch is the same as in one process)")
    return global_batch // n


def shard_batch(batch: Sequence[int], groups: Sequence[Any] | None = None) -> list[int]:
    """This rank's disjoint slice of a global ``batch`` of item indices: the batch cut into
    ``world_size()`` contiguous parts of equal size (equal within one when it does not divide).
    ``groups[i]``: the group of item ``i`` (e.g. its image); a group is never split across ranks, and
    the cut is by groups in their order of first appearance. Slices of all ranks concatenated are ``batch``."""
    n, r = world_size(), rank()
    items = [int(i) for i in batch]
    if n == 1:
        return items
    if groups is None:
        units = [[i] for i in items]
    else:
        order: dict[Any, list[int]] = {}
        for i in items:
            order.setdefault(groups[i], []).append(i)
        units = list(order.values())
    q, extra = divmod(len(units), n)
    start = r * q + min(r, extra)
    return [i for u in units[start:start + q + (r < extra)] for i in u]


def global_batches_usable(batches: Sequence[Sequence[int]], groups: Sequence[Any] | None = None) -> list[Any]:
    """The global batches that give every rank at least one item (a short last batch can leave a rank
    with none: it is skipped under N processes and logged, the one place where N processes differ from one)."""
    if world_size() == 1:
        return list(batches)
    n = world_size()
    keep = [b for b in batches if (len(b) if groups is None else len({groups[int(i)] for i in b})) >= n]
    if len(keep) < len(batches) and is_main():
        log.warning("%d global batch(es) with fewer groups than the %d processes skipped", len(batches) - len(keep), n)
    return keep


def local_weight(n_local: int, n_global: int) -> float:
    """Factor on a rank's batch-mean loss so that DDP's mean of the ranks' gradients is the gradient of
    the global batch mean: ``world_size() * n_local / n_global`` (1 in one process)."""
    return world_size() * n_local / max(n_global, 1)


def all_reduce_mean(value: float | torch.Tensor, weight: float = 1.0) -> float:
    """Weighted mean over ranks of a scalar (a metric or a loss for logging): ``sum(v*w) / sum(w)``."""
    v = float(value.detach() if isinstance(value, torch.Tensor) else value)
    if world_size() == 1:
        return v
    t = torch.tensor([v * weight, weight], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t[0] / t[1]) if float(t[1]) else 0.0


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of a tensor whose first dimension may differ per rank; the
    gradient flows through this rank's part only (others' parts are constants), so a loss over the
    gathered batch needs the factor ``world_size()`` for DDP's gradient mean to equal its gradient."""
    n = world_size()
    if n == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    most = int(max(int(s) for s in sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded)
    parts = [p[:int(s)] for p, s in zip(parts, sizes)]
    parts[rank()] = x
    return torch.cat(parts)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with a gradient: the backward of a sum is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (sums all-reduced across ranks,
    with gradient), on any backend (gloo included; torch's ``SyncBatchNorm`` needs CUDA). Running
    statistics are updated as ``nn.BatchNorm`` does, from the global mean and unbiased variance."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean, sq = stats[:c] / n, stats[c:2 * c] / n
        var = (sq - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` made global-batch: torch's ``SyncBatchNorm`` on CUDA, else
    :class:`GlobalBatchNorm` (state dicts unchanged). ``model`` itself in one process."""
    if world_size() == 1:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        for name, p in module.named_parameters(recurse=False):
            new._parameters[name].requires_grad_(p.requires_grad)
        return new
    for name, child in module.named_children():
        module._modules[name] = _convert(child)
    return module
