"""Overlap a teacher stage's three steps: decode, forward, write (issue 23 item 4).

A teacher stage decodes + letterboxes (or preprocesses) images, runs the model, and hands the rows to the
shard writer. Run one after the other, the model waits for the decoder and the writer. Here:

* :func:`prefetch_loader` decodes in DataLoader worker processes, ``prefetch_factor`` batches ahead, into
  pinned memory when the model is on CUDA (items subclassing :class:`Pinnable` pin their tensors; a plain
  dataclass would silently stay pageable), and in-process inside a daemonic process, which may not fork;
* :func:`overlapped` runs the row producer (the loader and the forward) in a background thread, at most
  ``depth`` rows ahead, while the caller (the stage's shard writer: hashing, HDF5 writes) consumes them,
  so writing a batch's rows overlaps the next batch's forward (torch and hashlib release the GIL).

Neither changes a byte of the output: rows come out in the order the producer yields them, errors
(``ImageFailed`` rows included) pass through unchanged, and an exception in the producer is raised in the
consumer. Plain Python + torch; no model or shard code here.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)
T = TypeVar("T")

#: rows the producer thread may run ahead of the writer; 0 runs everything in the caller's thread (tests)
DEPTH = 64
_DONE = object()


class Pinnable:
    """Mixin for dataclass batch items: ``pin_memory()`` returns a copy with every tensor field pinned
    (the DataLoader's pin thread calls it when ``pin_memory=True``)."""

    def pin_memory(self) -> Any:
        pinned = {f.name: v.pin_memory() for f in dataclasses.fields(self)  # type: ignore[arg-type]
                  if isinstance(v := getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **pinned) if pinned else self  # type: ignore[type-var]


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the forward for the cores with thread pools


def prefetch_loader(dataset: Dataset, *, batch_size: int, num_workers: int, device: torch.device | str,
                    collate_fn: Callable[[list[Any]], Any], prefetch_factor: int = 4) -> DataLoader:
    """A DataLoader over ``dataset`` in order: ``num_workers`` decoding processes (0, or inside a
    daemonic process: in-process), ``prefetch_factor`` batches each ahead, pinned memory on CUDA."""
    if num_workers and multiprocessing.current_process().daemon:
        log.info("daemonic process: decoding images in-process (num_workers=0)")
        num_workers = 0
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=torch.device(device).type == "cuda",
                      worker_init_fn=_one_thread if num_workers else None,
                      prefetch_factor=prefetch_factor if num_workers else None, persistent_workers=False)


def overlapped(rows: Iterable[T], depth: int | None = None) -> Iterator[T]:
    """Yield the items of ``rows`` in order while a background thread produces up to ``depth`` (default
    :data:`DEPTH`) ahead. The producer's exception is raised here, after the items it produced; closing
    this generator early (the consumer failed) stops the producer at its next item and closes ``rows``."""
    depth = DEPTH if depth is None else depth
    if depth <= 0:
        yield from rows
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(rows)
        try:
            for item in it:
                if not put(item):
                    break
            else:
                put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Raised(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=produce, name="overlapped-rows", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                break
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        t.join()


@dataclasses.dataclass(frozen=True)
class _Raised:
    error: BaseException
