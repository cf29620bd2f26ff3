"""A torch ``Dataset`` over one or more shard sets joined by key, and a shard-local shuffling sampler.

Each sample is one key of the *primary* set; every other set is joined through an optional key map
(e.g. ``ref_id -> image_id`` to pair a sentence with its image's embedding). HDF5 files are opened lazily
inside each DataLoader worker (the :class:`ShardSet` objects drop their handles when pickled), never
across a fork. Keys are resolved to row ids once, here; a DataLoader with a ``batch_size`` fetches a batch
through ``__getitems__``, i.e. :meth:`ShardSet.get_rows` (reads grouped by shard and file offset).

:class:`ShardLocalSampler` shuffles an epoch the way LitData and webdataset do, but over random-access
shards: the shard order is shuffled, each shard's rows are streamed in file order through a bounded shuffle
buffer, so reads stay within one or two shards' pages at a time. Every epoch yields each index exactly once.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from grounding.shards.reader import ShardSet


class ShardDataset(Dataset):
    """Samples ``{"key": str, "<set name>": {field: Tensor}}`` over joined shard sets.

    Args:
        sets: ``name -> shard set path (or ShardSet)``; the first is the primary set.
        keys: the sample keys (default: every key of the primary set, in storage order).
        key_maps: ``name -> {sample key -> key in that set}`` for sets keyed differently from the primary.
        fields: ``name -> field names`` to read (default: all fields).
    """

    def __init__(self, sets: Mapping[str, str | os.PathLike[str] | ShardSet],
                 keys: Sequence[str] | None = None,
                 key_maps: Mapping[str, Mapping[str, str]] | None = None,
                 fields: Mapping[str, Sequence[str]] | None = None) -> None:
        if not sets:
            raise ValueError("ShardDataset needs at least one shard set")
        self.sets = {n: s if isinstance(s, ShardSet) else ShardSet(s) for n, s in sets.items()}
        self.primary = next(iter(self.sets))
        self.key_maps = {n: dict(m) for n, m in (key_maps or {}).items()}
        unknown = set(self.key_maps) - set(self.sets)
        if unknown:
            raise ValueError(f"key_maps for unknown sets {sorted(unknown)}")
        self.fields = {n: list(fields[n]) if fields and n in fields else list(s.fields) for n, s in self.sets.items()}
        self.keys = list(keys) if keys is not None else self.sets[self.primary].keys
        self.row_ids: dict[str, list[int]] = {}  # set name -> row id of every sample (keys resolved once)
        for name, s in self.sets.items():  # fail early, naming the first missing join
            kmap = self.key_maps.get(name)
            ids = self.row_ids[name] = []
            for k in self.keys:
                target = kmap.get(k) if kmap is not None else k
                if target is None or target not in s:
                    raise KeyError(f"sample key {k!r} has no row in set {name!r} ({s.path})"
                                   + (f" (mapped to {target!r})" if kmap is not None else ""))
                ids.append(s.row_id(target))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        sample: dict[str, Any] = {"key": key}
        for name, s in self.sets.items():
            row = s.get_row(self.row_ids[name][index], self.fields[name])
            sample[name] = {f: torch.from_numpy(np.ascontiguousarray(v)) for f, v in row.items()}
        return sample

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Many samples at once (the DataLoader's batched fetch): one :meth:`ShardSet.get_many` per set."""
        samples: list[dict[str, Any]] = [{"key": self.keys[i]} for i in indices]
        for name, s in self.sets.items():
            ids = self.row_ids[name]
            rows = s.get_rows([ids[i] for i in indices], self.fields[name])
            for sample, row in zip(samples, rows):
                sample[name] = {f: torch.from_numpy(np.ascontiguousarray(v)) for f, v in row.items()}
        return samples

    def shard_of(self) -> list[int]:
        """For each sample index, the shard of the primary set that holds its row."""
        return [ShardSet.shard_of(r) for r in self.row_ids[self.primary]]

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """``collate_fn`` for a DataLoader: fixed fields are stacked into ``(B, ...)`` tensors, ragged
        fields (per the schema) and keys become lists."""
        out: dict[str, Any] = {"key": [b["key"] for b in batch]}
        for name, s in self.sets.items():
            out[name] = {
                f: [b[name][f] for b in batch] if s.fields[f].ragged else torch.stack([b[name][f] for b in batch])
                for f in self.fields[name]
            }
        return out


class ShardLocalSampler(Sampler[int]):
    """Seeded shard-local shuffle: each epoch, the shards in a random order, every shard's indices in file
    order through a shuffle buffer of ``buffer`` indices (an index leaves the buffer at a random slot when a
    new one comes in). Each epoch is a permutation of all indices (the same set of rows every epoch); the
    order depends only on ``(seed, epoch)``. The epoch advances by one after each full pass, or is set with
    :meth:`set_epoch` (as ``DistributedSampler``).

    Args:
        source: a :class:`ShardDataset` (its primary set's shards), a :class:`ShardSet` (indices into its
            ``keys``), or a sequence giving the shard of every index.
        buffer: shuffle buffer size in rows (1: shard order shuffled, rows in file order).
        seed: base seed.
    """

    def __init__(self, source: "ShardDataset | ShardSet | Sequence[int]", buffer: int = 1024, seed: int = 0) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"ShardLocalSampler buffer must be an integer >= 1 rows, got {buffer!r}")
        if isinstance(source, ShardDataset):
            shard_of = source.shard_of()
        elif isinstance(source, ShardSet):
            shard_of = [source.locate(k)[0] for k in source.keys]
        else:
            shard_of = [int(x) for x in source]
        groups: dict[int, list[int]] = {}
        for i, si in enumerate(shard_of):
            groups.setdefault(si, []).append(i)
        self.groups = [groups[si] for si in sorted(groups)]  # indices in file order within each shard
        self.n = len(shard_of)
        self.buffer, self.seed, self.epoch = buffer, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def order(self, epoch: int) -> list[int]:
        """The indices of ``epoch``, in the order they are yielded."""
        rng = np.random.default_rng([self.seed, epoch])
        out: list[int] = []
        buf: list[int] = []
        slots = iter(rng.integers(0, 2**62, size=self.n).tolist())
        for g in rng.permutation(len(self.groups)).tolist():
            for i in self.groups[g]:
                if len(buf) < self.buffer:
                    buf.append(i)
                    continue
                j = next(slots) % self.buffer
                out.append(buf[j])
                buf[j] = i
        rng.shuffle(buf)
        out.extend(buf)
        return out

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self.epoch += 1
        return iter(self.order(epoch))
