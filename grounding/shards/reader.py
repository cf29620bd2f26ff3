"""Lazy reader of a committed shard set.

``ShardSet(path)`` loads the manifest and the ``key`` datasets (small), maps every key to ``(shard, row)``
and opens HDF5 files only when a row is read, once per process (so it can be created before a DataLoader
forks and used inside its workers). Fixed-size fields are contiguous and uncompressed in the file, so they
are read through a NumPy memmap at the dataset's file offset (PITFALLS.md: 0.95x a plain memmap, where
h5py row indexing reaches 0.26x). Ragged fields are mapped the same way: their ``offsets`` are loaded once per
shard and ``values`` (contiguous, uncompressed: writer.py) is mapped at its file offset, so a ragged row is
two slices (issue 23: h5py group lookups and offset reads per row made them 0.03x a memmap).
:meth:`ShardSet.get_many` reads many keys grouped by shard and file offset; :meth:`ShardSet.row_id` resolves a
key once to an int that :meth:`ShardSet.get_row` / :meth:`ShardSet.get_rows` read without the key lookup.

Trust (checked once per shard, never per row; grounding/shards/validate.py): when the set is opened each
shard is compared with the manifest (content key, generation, dtype and shape of every field, ragged
offsets) and its identity (inode, size, generation) is recorded; each later open of that shard
(lazily, in this process or a DataLoader worker) checks that the file is still the one checked, so a set
rewritten under an open reader raises :class:`ShardError` instead of mixing rows of two writes.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from grounding.shards.manifest import FieldSpec, Manifest, ShardError
from grounding.shards.validate import ShardIdentity, identity, shard_problems


_OPEN_SETS: "weakref.WeakSet[ShardSet]" = weakref.WeakSet()
_SHIFT, _MASK = 32, (1 << 32) - 1  # row ids: shard index in the high bits, row in the shard in the low 32
_Readers = tuple[tuple[str, Any, "list[int] | None"], ...]  # (field name, values, offsets or None) per field


def _forget_handles_after_fork() -> None:
    for s in list(_OPEN_SETS):
        s._drop_handles()


os.register_at_fork(after_in_child=_forget_handles_after_fork)  # never reuse a parent's HDF5 handles


class ShardSet:
    """Read access to one shard set directory. Rows are ``dict[field name, np.ndarray]``."""

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = False, check: bool = True) -> None:
        """``verify=True`` also re-hashes every shard first. ``check=False`` skips the per-shard checks
        (schema, offsets, content key, generation, identity on reopen): only to measure what they cost."""
        self.path = Path(path)
        self.check = check
        if verify:
            from grounding.shards.verify import verify_shard_set

            report = verify_shard_set(self.path)
            if not report.ok:
                raise ShardError(f"{self.path}: verification failed: " + "; ".join(report.problems[:5]))
        self.manifest = Manifest.load(self.path)
        self.fields: dict[str, FieldSpec] = {f.name: f for f in self.manifest.fields}
        self._keys: list[str] = []
        self._where: dict[str, int] = {}  # key -> row id (shard << 32 | row): one int, no tuple to chase
        self._identity: list[ShardIdentity | None] = []
        for si, shard in enumerate(self.manifest.shards):
            file = self.path / shard.file
            if not file.exists():
                raise ShardError(f"{file}: shard listed in the manifest is missing")
            try:
                with h5py.File(file, "r") as f:
                    keys = [k.decode("utf-8") for k in f["key"][()]]
                    ident = identity(f) if check else None
                    problems = shard_problems(f, self.manifest, shard, keys, ident) if check else []
            except (OSError, KeyError, ValueError, UnicodeDecodeError) as e:
                raise ShardError(f"{file}: cannot read shard ({e})") from None
            if problems:
                raise ShardError(f"{self.path}: {problems[0]}" + (f" (+{len(problems) - 1} more; run `grounding "
                                                                  f"shards verify`)" if len(problems) > 1 else ""))
            if len(keys) != shard.rows:
                raise ShardError(f"{file}: {len(keys)} rows, manifest says {shard.rows}")
            self._identity.append(ident)
            for ri, k in enumerate(keys):
                if k in self._where:
                    raise ShardError(f"{self.path}: key {k!r} appears twice")
                self._where[k] = si << _SHIFT | ri
            self._keys.extend(keys)
        self._field_names = tuple(self.fields)
        self._drop_handles()
        _OPEN_SETS.add(self)

    def _drop_handles(self) -> None:
        """Forget every open file, map and reader (closing nothing: after a fork they are the parent's)."""
        self._files: dict[int, h5py.File] = {}
        self._maps: dict[int, dict[str, tuple[Any, list[int] | None]]] = {}  # shard -> field -> (values, offsets)
        self._mapped: dict[tuple[int, str], np.ndarray | None] = {}
        # the hot path: per shard, ``(name, values, offsets)`` of every field (None until first read), and of
        # the field selections asked for, by ``(shard, names)``
        self._hot: list[_Readers | None] = [None] * len(self.manifest.shards)
        self._sel: dict[tuple[int, tuple[str, ...]], _Readers] = {}

    # ---- pickling (DataLoader workers reopen files themselves) ----------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_files={}, _maps={}, _mapped={}, _hot=[None] * len(self.manifest.shards), _sel={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _OPEN_SETS.add(self)

    def _file(self, si: int) -> h5py.File:
        f = self._files.get(si)
        if f is None:
            f = h5py.File(self.path / self.manifest.shards[si].file, "r")
            if self.check:
                self._check_same_file(si, f)
            self._files[si] = f
        return f

    def _check_same_file(self, si: int, f: h5py.File) -> None:
        """The file opened now under shard ``si``'s name is the one checked when the set was opened."""
        then, now = self._identity[si], identity(f)  # not st_dev: another host's mount of the same file differs
        if then is not None and (now.ino, now.size, now.generation) != (then.ino, then.size, then.generation):
            f.close()
            raise ShardError(
                f"{self.path}: {self.manifest.shards[si].file} changed since this reader opened the set "
                f"(generation {then.generation} -> {now.generation}, inode {then.ino} -> {now.ino}, size "
                f"{then.size} -> {now.size}): the set was rewritten; open it again")

    def _values_map(self, si: int, dset: h5py.Dataset) -> np.ndarray | None:
        """A read-only plain-ndarray view of a contiguous, uncompressed dataset of shard ``si`` mapped at its
        file offset (through the checked file's own descriptor); None when it cannot be mapped (chunked,
        compressed, or never allocated)."""
        offset = dset.id.get_offset()
        if offset is None or dset.chunks is not None or dset.compression is not None or dset.shape[0] == 0:
            return None
        with os.fdopen(os.dup(self._file(si).id.get_vfd_handle()), "rb") as fh:
            mm = np.memmap(fh, mode="r", dtype=dset.dtype, offset=offset, shape=dset.shape)
        return mm.view(np.ndarray)  # plain view: indexing skips memmap's __array_finalize__ overhead

    def _reader(self, si: int, name: str) -> tuple[Any, list[int] | None]:
        """``(values, offsets)`` of field ``name`` in shard ``si``, built once per shard and process: a fixed
        row is ``values[ri]``, a ragged row ``values[offsets[ri]:offsets[ri + 1]]`` (offsets loaded once as
        a list; ``values`` a memmap view, or the h5py dataset when it cannot be mapped)."""
        spec = self.fields.get(name)
        if spec is None:
            raise KeyError(f"no field {name!r} in {self.path}; fields are {list(self.fields)}")
        f = self._file(si)
        dset = f[name]["values"] if spec.ragged else f[name]
        offs: list[int] | None = f[name]["offsets"][()].tolist() if spec.ragged else None
        mapped = self._values_map(si, dset)
        if mapped is not None:
            vals: Any = mapped
        elif dset.shape[0] == 0:  # nothing stored (no rows or no values): an empty array slices like one
            vals = np.zeros(dset.shape, dset.dtype)
        else:  # chunked or compressed (not written by this writer): h5py reads
            vals = dset
        self._maps.setdefault(si, {})[name] = (vals, offs)
        self._mapped[(si, name)] = mapped
        return vals, offs

    def _memmap(self, si: int, name: str) -> np.ndarray | None:
        """The mapped array behind field ``name`` of shard ``si`` (ragged: its ``values``); None when that
        field is read through h5py instead. For tests and diagnostics."""
        if name not in self._maps.get(si, {}):
            self._reader(si, name)
        return self._mapped[(si, name)]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._drop_handles()

    def __enter__(self) -> "ShardSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- lookups -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    @property
    def keys(self) -> list[str]:
        """All keys in storage order."""
        return list(self._keys)

    def locate(self, key: str) -> tuple[int, int]:
        """``(shard index, row index)`` of ``key``; ``KeyError`` naming the set when absent."""
        rid = self.row_id(key)
        return rid >> _SHIFT, rid & _MASK

    def row_id(self, key: str) -> int:
        """An int naming ``key``'s row for :meth:`get_row` (valid for this open set; resolve keys once, read
        many times: a DataLoader's dataset does)."""
        try:
            return self._where[key]
        except KeyError:
            raise KeyError(f"key {key!r} not in shard set {self.path} ({len(self)} rows)") from None

    def _readers(self, si: int, fields: Sequence[str] | None) -> _Readers:
        """``(name, values, offsets)`` of ``fields`` (None: all) in shard ``si``, built once per shard, field
        selection and process (the first read of a shard opens and checks its file)."""
        if fields is None:
            hot = self._hot[si]
            if hot is None:
                hot = self._hot[si] = tuple((n, *self._field_reader(si, n)) for n in self._field_names)
            return hot
        names = tuple(fields)
        sel = self._sel.get((si, names))
        if sel is None:
            sel = self._sel[(si, names)] = tuple((n, *self._field_reader(si, n)) for n in names)
        return sel

    def _field_reader(self, si: int, name: str) -> tuple[Any, list[int] | None]:
        r = self._maps.get(si, {}).get(name)
        return r if r is not None else self._reader(si, name)

    def get(self, key: str, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The row of ``key`` (copies, safe to keep), restricted to ``fields`` when given."""
        try:
            rid = self._where[key]
        except KeyError:
            raise KeyError(f"key {key!r} not in shard set {self.path} ({len(self)} rows)") from None
        # hot path (issue 23): one key lookup, one list index, then a slice and a copy per field; no h5py
        # call and no check per row (they ran when the set and the shard were opened)
        readers = (self._hot[rid >> _SHIFT] if fields is None else None) or self._readers(rid >> _SHIFT, fields)
        ri = rid & _MASK
        out = {}
        for name, vals, offs in readers:
            out[name] = vals[ri].copy() if offs is None else vals[offs[ri]:offs[ri + 1]].copy()
        return out

    @staticmethod
    def shard_of(row_id: int) -> int:
        """The shard index of a :meth:`row_id`."""
        return row_id >> _SHIFT

    def get_row(self, row_id: int, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """:meth:`get` by a :meth:`row_id` (skips the key lookup; same copies)."""
        readers = (self._hot[row_id >> _SHIFT] if fields is None else None) or self._readers(row_id >> _SHIFT, fields)
        ri = row_id & _MASK
        out = {}
        for name, vals, offs in readers:
            out[name] = vals[ri].copy() if offs is None else vals[offs[ri]:offs[ri + 1]].copy()
        return out

    def __getitem__(self, key: str) -> dict[str, np.ndarray]:
        return self.get(key)

    def get_many(self, keys: Sequence[str], fields: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
        """The rows of ``keys`` in the order given (copies), read grouped by shard and in file order within
        each shard (readers looked up once per shard; forward-only page access)."""
        where = self._where
        try:
            rids = [where[k] for k in keys]
        except KeyError as e:
            raise KeyError(f"key {e.args[0]!r} not in shard set {self.path} ({len(self)} rows)") from None
        return self.get_rows(rids, fields)

    def get_rows(self, row_ids: Sequence[int], fields: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
        """:meth:`get_many` by :meth:`row_id` s."""
        out: list[dict[str, np.ndarray]] = [{} for _ in row_ids]
        si, readers = -1, ()
        # a row id sorts by shard, then by row (= file offset): one sort, then each shard's readers once
        for i in sorted(range(len(row_ids)), key=row_ids.__getitem__):
            rid = row_ids[i]
            if rid >> _SHIFT != si:
                si = rid >> _SHIFT
                readers = self._readers(si, fields)
            ri = rid & _MASK
            row = out[i]
            for name, vals, offs in readers:
                row[name] = vals[ri].copy() if offs is None else vals[offs[ri]:offs[ri + 1]].copy()
        return out

    def column(self, name: str) -> np.ndarray | list[np.ndarray]:
        """A whole field in key order: one array for fixed fields, a list of arrays for ragged ones."""
        spec = self.fields[name] if name in self.fields else self.manifest.field(name)
        parts: list[Any] = []
        for si, shard in enumerate(self.manifest.shards):
            if spec.ragged:
                g = self._file(si)[name]
                offsets, values = g["offsets"][()], g["values"][()]
                parts.extend(values[offsets[i]:offsets[i + 1]] for i in range(shard.rows))
            else:
                parts.append(self._file(si)[name][()])
        if spec.ragged:
            return parts
        return np.concatenate(parts) if parts else np.zeros((0, *spec.shape), spec.np_dtype)
