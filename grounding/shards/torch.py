"""A torch ``Dataset`` over one or more shard sets joined by key.

Each sample is one key of the *primary* set; every other set is joined through an optional key map
(e.g. ``ref_id -> image_id`` to pair a sentence with its image's embedding). HDF5 files are opened lazily
inside each DataLoader worker (the :class:`ShardSet` objects drop their handles when pickled), never
across a fork.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

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
        for name, s in self.sets.items():  # fail early, naming the first missing join
            kmap = self.key_maps.get(name)
            for k in self.keys:
                target = kmap.get(k) if kmap is not None else k
                if target is None or target not in s:
                    raise KeyError(f"sample key {k!r} has no row in set {name!r} ({s.path})"
                                   + (f" (mapped to {target!r})" if kmap is not None else ""))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        sample: dict[str, Any] = {"key": key}
        for name, s in self.sets.items():
            kmap = self.key_maps.get(name)
            row = s.get(kmap[key] if kmap is not None else key, self.fields[name])
            sample[name] = {f: torch.from_numpy(np.ascontiguousarray(v)) for f, v in row.items()}
        return sample

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
