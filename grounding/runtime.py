"""Runtime helpers shared by teacher and student stages: device choice, seeding, torch threads, mixed
precision (``train.precision``) and the stages that train data-parallel under ``torchrun``."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from grounding import distributed as D

log = logging.getLogger(__name__)
T = TypeVar("T")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is a clear error. Under torchrun
    a bare ``cuda`` is this process's GPU (``cuda:LOCAL_RANK``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device; use device: auto or cpu")
    if device == "cuda" and D.launched():
        return torch.device("cuda", D.local_rank())
    return torch.device(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU ``torch.Generator`` seeded the same way.

    Deterministic algorithms are requested where torch supports them (CPU runs are bit-reproducible)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (``None`` or 0: leave torch's setting alone)."""
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler | None = None, clip: float | None = None) -> float:
    """One training step: zero the grads, back-propagate ``loss``, clip the grad norm to ``clip`` (when
    given), step the optimiser and the scheduler; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.detach())


# ---- mixed precision (params.yaml train.precision) ---------------------------------------------------------
_warned: set[str] = set()


def effective_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: ``precision`` on CUDA, ``fp32`` on CPU (logged once when another was asked)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda" and precision != "fp32":
        if precision not in _warned:
            _warned.add(precision)
            log.warning("train.precision %s asked for on %s: CPU training stays fp32", precision, device.type)
        return "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``precision``'s dtype on CUDA (bf16 / fp16); a no-op context for fp32 and CPU."""
    p = effective_precision(precision, device)
    if p == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[p])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler``, enabled for fp16 on CUDA only (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=effective_precision(precision, device) == "fp16")


def scaled_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                params: Any = None, clip: float | None = None) -> None:
    """Zero the grads, back-propagate ``loss`` through ``scaler``, unscale and clip the grad norm of
    ``params`` to ``clip`` (when both given), step. With a disabled scaler this is the plain fp32 step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip is not None and params is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(opt)
    scaler.update()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``: from pinned memory with a non-blocking copy on CUDA; unchanged on CPU."""
    if device.type != "cuda" or x.device == device:
        return x
    return x.pin_memory().to(device, non_blocking=True)


# ---- the training settings of a stage run -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Training:
    """Where and how a training stage trains: ``device`` and ``precision`` (already
    :func:`effective_precision`); the process group (if any) is :mod:`grounding.distributed`'s."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"


_TRAINING: contextvars.ContextVar[Training] = contextvars.ContextVar("training", default=Training())


def current_training() -> Training:
    """The settings :func:`training` set for the running stage (CPU, fp32 outside one)."""
    return _TRAINING.get()


@contextmanager
def training(params: Any) -> Iterator[Training]:
    """Within the block, training loops read ``params.device`` and ``params.train.precision`` through
    :func:`current_training`; under torchrun the process group is initialised first (gloo on CPU, nccl on
    CUDA; :func:`grounding.distributed.init_from_env`)."""
    device = resolve_device(params.device)
    D.init_from_env(device)
    token = _TRAINING.set(Training(device, effective_precision(params.train.precision, device)))
    try:
        yield _TRAINING.get()
    finally:
        _TRAINING.reset(token)


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def inputs_to_device(model: torch.nn.Module) -> torch.nn.Module:
    """Register (once) a forward pre-hook moving the tensor arguments of ``model`` to its device (pinned,
    non-blocking on CUDA), so data code that builds CPU batches calls a CUDA model unchanged."""
    if getattr(model, "_inputs_to_device", False):
        return model

    def hook(m: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        dev = device_of(m)
        return tuple(to_device(a, dev) if isinstance(a, torch.Tensor) else a for a in args)

    model.register_forward_pre_hook(hook)
    model._inputs_to_device = True  # type: ignore[assignment]
    return model


# ---- stages under torchrun ---------------------------------------------------------------------------------
#: stages whose training is data-parallel (every rank trains on its slice; rank 0 writes); any other
#: stage runs on rank 0 alone while the others wait (teacher caches, bootstraps, evaluate, ...)
DATA_PARALLEL_STAGES = frozenset({"refclip-train", "student-rec-pseudo", "student-epmvg", "student-pbrec",
                                  "student-nce-distill", "student-bicm"})


def run_on_ranks(name: str, run: Callable[[], T]) -> T | None:
    """Run stage ``name`` the torchrun way: on every rank when it is data-parallel, else on rank 0 only;
    then a barrier, so no rank reads an output before rank 0 has written it. Returns ``run()``'s value
    (``None`` on a rank that did not run it). One process: just ``run()``."""
    out = run() if name in DATA_PARALLEL_STAGES or D.is_main() else None
    D.barrier()
    return out
