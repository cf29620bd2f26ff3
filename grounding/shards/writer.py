"""Streaming, resumable, deterministic shard-set writer.

A stage hands the writer the ordered list of its input items (``item_keys``). Shard ``i`` covers items
``[i * rows_per_shard, (i + 1) * rows_per_shard)``, so the partition does not depend on which items fail.
Rows are buffered for one shard at a time; a full shard is written to a temporary file, fsynced and renamed
(atomic); ``manifest.json`` is written last. After a crash, a rerun keeps every finished shard whose
recorded content address matches and resumes at the first missing one. One writer per directory at a
time (``lock.py``: a second one fails naming the holder, or waits); the commit re-hashes every shard it
lists; each shard carries the set's generation (``generation.py``), re-stamped when a shard is kept.

Content addresses (incremental extension). Every shard records a ``content_key``
(:func:`grounding.shards.keys.shard_key`): by default a hash of the stage key and the shard's items, so it
changes whenever the set's key does. When the stage gives per-item content hashes (``item_hashes``, e.g. the
sha256 of each image) and the dataset-independent part of its key (``spec.content_base``), the address
depends only on (stage, code, teacher, params, non-dataset inputs) and the shard's member keys and item
hashes. A writer whose set key differs from the committed set in its directory (the dataset grew) then keeps
every shard whose address is unchanged (the manifest is un-committed first; kept shards are re-hashed
against the old manifest) and may copy matching shards from other committed sets (``reuse_from``) through
the same temp + fsync + rename protocol. Shard files hold nothing set-level (no stage key, no dataset
fingerprint), so a kept or copied shard is byte-identical to the one a from-scratch run would write. Shards
are fixed item ranges, so items appended at the end (ids sorting last) leave every full old shard intact:
an extension computes the new items plus the items of the old set's last shard when it was partial
(recomputed whole, so batches start at the same shard boundary as in a scratch run).

Usage::

    with ShardWriter(out_dir, spec, item_keys) as w:
        for key in w.todo():                      # keys of the shards still missing, in order
            w.add(key, {"embedding": vec})         # or w.skip(key, "corrupt image")
    manifest = w.manifest                          # committed on a clean exit
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import h5py
import numpy as np

from grounding import __version__
from grounding.shards.generation import USERBLOCK, file_generation, generation_of, stamp, userblock
from grounding.shards.keys import file_sha256, shard_key
from grounding.shards.lock import DirLock
from grounding.shards.manifest import (
    FORMAT_VERSION,
    LEVELS,
    MANIFEST,
    FieldSpec,
    Manifest,
    ShardError,
    ShardInfo,
    fsync_dir,
)

SHARD_PATTERN = "shard-{:05d}.h5"
log = logging.getLogger(__name__)


class ItemFailed(RuntimeError):
    """Raised under ``on_error="fail"``: names the item and the reason; finished shards are kept."""


@dataclass(frozen=True)
class ShardSetSpec:
    """What a stage writes: identity, level, schema and provenance (all of it lands in the manifest)."""

    stage: str
    stage_key: str
    level: str
    fields: tuple[FieldSpec, ...]
    rows_per_shard: int = 4096
    teacher: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    on_error: str = "fail"
    content_base: str = ""  # keys.content_base(...): set when the writer is given per-item content hashes

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level {self.level!r} not in {LEVELS}")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate field names in {names}")


def is_complete(out_dir: str | os.PathLike[str], stage_key: str) -> bool:
    """True when ``out_dir`` holds a committed shard set with this key whose shard files are all present
    with their recorded sizes and the manifest's generation (cheap check; ``verify`` re-hashes)."""
    out = Path(out_dir)
    try:
        m = Manifest.load(out)
    except ShardError:
        return False
    if m.stage_key != stage_key or m.format_version != FORMAT_VERSION:  # an older format is rewritten
        return False
    try:
        return all((out / s.file).is_file() and (out / s.file).stat().st_size == s.size
                   and file_generation(out / s.file) == m.generation for s in m.shards)
    except OSError:
        return False


class ShardWriter:
    """Writes one shard set; see the module docstring. Not thread-safe.

    One writer per directory: the writer holds ``<out_dir>/.grounding-lock`` (grounding/shards/lock.py)
    from construction until it commits, fails or is closed; a second writer raises
    :class:`~grounding.shards.lock.LockHeld` naming the holder, or waits for it with ``wait=True``. Only
    a writer holding the lock exclusively removes temporaries (they are then a dead writer's), and the
    commit re-hashes every shard it lists against what this writer wrote or checked."""

    def __init__(self, out_dir: str | os.PathLike[str], spec: ShardSetSpec, item_keys: Sequence[str],
                 *, progress: bool = True, desc: str | None = None, shards: Collection[int] | None = None,
                 item_hashes: Sequence[str] | None = None,
                 reuse_from: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
                 wait: bool = False) -> None:
        """``shards`` restricts this writer to some shard indices (fan-out: several processes write
        disjoint parts of one set, then a final writer without ``shards`` commits the manifest); a
        restricted writer touches only its own shard files and never commits.

        ``item_hashes`` (one content hash per item key, with ``spec.content_base`` set) makes shard
        addresses independent of the dataset as a whole, so shards of a previous set whose members are
        unchanged are kept (same directory) or copied (from the committed sets named in ``reuse_from``)
        instead of recomputed.

        ``wait``: when another writer holds the directory, wait for it instead of failing at once."""
        keys = [str(k) for k in item_keys]
        if len(set(keys)) != len(keys):
            dup = next(k for i, k in enumerate(keys) if k in keys[:i])
            raise ValueError(f"duplicate item key {dup!r} given to the writer of {spec.stage}")
        nul = next((k for k in keys if "\x00" in k), None)
        if nul is not None:  # keys are stored as fixed-width bytes, which cannot hold a trailing NUL
            raise ValueError(f"item key {nul!r} given to the writer of {spec.stage} contains a NUL character")
        bad = next((k for k in keys if not _utf8_ok(k)), None)
        if bad is not None:  # keys are stored as UTF-8 bytes
            raise ValueError(f"item key {bad!r} given to the writer of {spec.stage} is not valid Unicode "
                             f"(lone surrogate)")
        if (item_hashes is None) != (not spec.content_base):
            raise ValueError(f"{spec.stage}: item_hashes and spec.content_base go together (got "
                             f"{'no ' if item_hashes is None else ''}item hashes, content_base={spec.content_base!r})")
        if item_hashes is not None and len(item_hashes) != len(keys):
            raise ValueError(f"{spec.stage}: {len(item_hashes)} item hashes for {len(keys)} item keys")
        self.out = Path(out_dir)
        self.spec = spec
        self.keys = keys
        self.progress = progress
        self.desc = desc or spec.stage
        self._fields = {f.name: f for f in spec.fields}
        self.n_shards = (len(keys) + spec.rows_per_shard - 1) // spec.rows_per_shard
        self.partial = shards is not None
        base = spec.content_base if item_hashes is not None else spec.stage_key
        hashes = None if item_hashes is None else [str(h) for h in item_hashes]
        self._content_keys = [
            shard_key(base, lo, keys[lo:lo + spec.rows_per_shard],
                      None if hashes is None else hashes[lo:lo + spec.rows_per_shard])
            for lo in range(0, len(keys), spec.rows_per_shard)
        ]
        if reuse_from is None:
            sources: list[Path] = []
        elif isinstance(reuse_from, str | os.PathLike):
            sources = [Path(reuse_from)]
        else:
            sources = [Path(p) for p in reuse_from]
        self._sources = sources
        self.reused: dict[int, str] = {}  # shard index -> "kept" (already in out_dir) | "copied" (reuse_from)
        self.rows_added = 0  # rows (and skips) handed in by the stage, i.e. computed by this run
        self._mine = set(range(self.n_shards)) if shards is None else {int(i) for i in shards} & set(range(self.n_shards))
        self.manifest: Manifest | None = None
        self._done: dict[int, ShardInfo] = {}
        self._errors: dict[int, list[dict[str, str]]] = {}
        self._buf_rows: list[tuple[str, dict[str, np.ndarray]]] = []
        self._buf_errors: list[dict[str, str]] = []
        self._cursor = 0  # index into self.keys of the next expected item
        self._shard = -1
        self._bar = None
        self.generation = generation_of(spec.stage_key)
        self._created_dir = not self.out.exists()
        self._lock = DirLock(self.out, shared=self.partial)
        self._lock.acquire(wait=wait)
        try:
            self._prepare_dir()
        except BaseException:
            self.close(failed=True)
            raise
        if self.complete:
            self.close()  # nothing to write: let the next writer in

    def close(self, *, failed: bool = False) -> None:
        """Release the directory's lock (idempotent). After a failure a directory this writer created and
        left empty is removed, so a failed run never leaves an empty output directory behind."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release(remove_dir_if_empty=failed and self._created_dir)

    # ---- set-up and resume ---------------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if is_complete(self.out, self.spec.stage_key):
            self.manifest = Manifest.load(self.out)
            return
        previous = _committed_shards(self.out)  # what the old manifest promised (to re-check kept shards)
        manifest = self.out / MANIFEST
        if manifest.exists():  # a different (stale) or damaged set: un-commit it first, then clean up
            manifest.unlink(missing_ok=True)
            fsync_dir(self.out)
        own = f".tmp-{os.getpid()}"
        for p in self.out.iterdir():  # leftovers of killed runs: with the exclusive lock no other writer is
            # alive, so every temporary is a dead one's; a fan-out part (shared lock) removes only its own
            if ".tmp" in p.name and p.name.startswith(("shard-", "manifest")) and (
                    not self.partial or p.name.endswith(own)):
                p.unlink(missing_ok=True)
        sources = self._reuse_index()
        for i in sorted(self._mine):
            info = self._check_existing(i, previous.get(SHARD_PATTERN.format(i)))
            how = "kept"
            if info is None and self._content_keys[i] in sources:
                info, how = self._copy_from(i, *sources[self._content_keys[i]]), "copied"
            if info is not None:
                self._done[i] = info
                self.reused[i] = how
        if not self.partial:
            wanted = {SHARD_PATTERN.format(i) for i in range(self.n_shards)}
            for p in self.out.glob("shard-*.h5"):
                if p.name not in wanted:
                    p.unlink()

    def _item_range(self, i: int) -> tuple[int, int]:
        start = i * self.spec.rows_per_shard
        return start, min(len(self.keys), start + self.spec.rows_per_shard) - start

    def _reuse_index(self) -> dict[str, tuple[Path, ShardInfo]]:
        """``content_key -> (set directory, shard)`` over the committed sets named in ``reuse_from``."""
        index: dict[str, tuple[Path, ShardInfo]] = {}
        for src in self._sources:
            if src.resolve() == self.out.resolve():
                continue
            shards = _committed_shards(src)
            if not shards:
                log.warning("%s: reuse source %s holds no committed format-%d shard set; ignored",
                            self.spec.stage, src, FORMAT_VERSION)
            for info in shards.values():
                index.setdefault(info.content_key, (src, info))
        return index

    def _copy_from(self, i: int, src: Path, info: ShardInfo) -> ShardInfo | None:
        """Copy shard ``info`` of the committed set ``src`` as shard ``i`` (temp, fsync, rename), then check
        it like a kept shard (attributes, keys, sha256 against ``src``'s manifest)."""
        path = self.out / SHARD_PATTERN.format(i)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        try:
            shutil.copyfile(src / info.file, tmp)
        except OSError as e:
            log.warning("%s: cannot copy %s from %s (%s); recomputing", self.spec.stage, info.file, src, e)
            tmp.unlink(missing_ok=True)
            return None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.out)
        return self._check_existing(i, info)

    def _check_existing(self, i: int, recorded: ShardInfo | None = None) -> ShardInfo | None:
        """Keep a finished shard (of an interrupted run, of the previous committed set, or just copied)
        when its content address, item range and keys match; when ``recorded`` (what a committed manifest
        said about this file) has the same address, its sha256 must match too."""
        path = self.out / SHARD_PATTERN.format(i)
        if not path.exists():
            return None
        start, count = self._item_range(i)
        try:
            with h5py.File(path, "r") as f:
                a = f.attrs
                ok = (
                    a.get("content_key") == self._content_keys[i]
                    and int(a.get("item_start", -1)) == start
                    and int(a.get("item_count", -1)) == count
                    and int(a.get("format_version", -1)) == FORMAT_VERSION
                )
                keys = [k.decode("utf-8") for k in f["key"][()]] if ok else []
                errors = json.loads(a.get("errors", "[]")) if ok else []
        except (OSError, KeyError, ValueError):
            ok = False
        expected = self.keys[start:start + count]
        if ok:
            failed = {e["item"] for e in errors}
            ok = keys == [k for k in expected if k not in failed]
        info = _shard_info(path, keys, start, count, self._content_keys[i]) if ok else None
        if info is not None and recorded is not None and recorded.content_key == info.content_key:
            ok = (recorded.sha256, recorded.size) == (info.sha256, info.size)
        if not ok:
            path.unlink()
            return None
        if info is not None and stamp(path, self.generation):  # kept into a set of another generation
            info = _shard_info(path, keys, start, count, self._content_keys[i])
        self._errors[i] = errors
        return info

    # ---- the stage's side ----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """True when the directory already holds this exact shard set (nothing to do)."""
        return self.manifest is not None

    def todo(self) -> Iterator[str]:
        """Keys of the items still to compute (those of missing shards), in order."""
        if self.complete:
            return
        for i in self._pending():
            start, count = self._item_range(i)
            yield from self.keys[start:start + count]

    def _pending(self) -> list[int]:
        """Shard indices this writer still has to write."""
        return [] if self.complete else [i for i in sorted(self._mine) if i not in self._done]

    def todo_indices(self) -> list[int]:
        """Indices into ``item_keys`` of the items still to compute."""
        out: list[int] = []
        for i in self._pending():
            start, count = self._item_range(i)
            out.extend(range(start, start + count))
        return out

    def _expect(self, key: str) -> None:
        while self._cursor < len(self.keys) and (self._shard_of(self._cursor) in self._done
                                                  or self._shard_of(self._cursor) not in self._mine):
            self._cursor += 1
        if self._cursor >= len(self.keys):
            raise ShardError(f"{self.spec.stage}: got item {key!r} but every item is already written")
        expected = self.keys[self._cursor]
        if key != expected:
            raise ShardError(f"{self.spec.stage}: items out of order: got {key!r}, expected {expected!r}")
        self._shard = self._shard_of(self._cursor)
        self._cursor += 1

    def _shard_of(self, index: int) -> int:
        return index // self.spec.rows_per_shard

    def add(self, key: str, row: Mapping[str, Any]) -> None:
        """Add the row of item ``key`` (the next expected item): ``field name -> array``."""
        checked = self._check_row(str(key), row)  # before _expect: a bad row leaves the cursor alone
        self._expect(str(key))
        self.rows_added += 1
        self._buf_rows.append((str(key), checked))
        self._after_item()

    def skip(self, key: str, reason: str) -> None:
        """Record that item ``key`` failed. Under ``on_error="fail"`` raises :class:`ItemFailed`."""
        if self.spec.on_error == "fail":
            raise ItemFailed(f"{self.spec.stage}: item {key!r} failed: {reason} "
                             f"(set on_error: skip to record it and go on)")
        self._expect(str(key))
        self.rows_added += 1
        self._buf_errors.append({"item": str(key), "reason": str(reason).encode("utf-8", "backslashreplace")
                                 .decode("utf-8")})  # storable in the manifest whatever the message holds
        self._after_item()

    def _check_row(self, key: str, row: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = set(self._fields) - set(row)
        extra = set(row) - set(self._fields)
        if missing or extra:
            raise ShardError(f"{self.spec.stage}: row {key!r}: missing fields {sorted(missing)}, "
                             f"unknown fields {sorted(extra)}")
        out: dict[str, np.ndarray] = {}
        for name, spec in self._fields.items():
            arr = np.asarray(row[name])
            if arr.dtype.kind in "fc" and spec.np_dtype.kind in "iub":
                raise ShardError(f"{self.spec.stage}: row {key!r} field {name}: float values for an "
                                 f"integer field ({spec.dtype}); round explicitly")
            arr = arr.astype(spec.np_dtype, copy=False)
            got = arr.shape[1:] if spec.ragged else arr.shape
            if (spec.ragged and arr.ndim != len(spec.shape) + 1) or got != spec.shape:
                want = ("K", *spec.shape) if spec.ragged else spec.shape
                raise ShardError(f"{self.spec.stage}: row {key!r} field {name}: shape {arr.shape}, "
                                 f"expected {want}")
            out[name] = np.array(arr, order="C", copy=True)  # ascontiguousarray would make 0-d 1-d
        return out

    def _after_item(self) -> None:
        if self._bar is not None:
            self._bar.update(1)
        start, count = self._item_range(self._shard)
        if self._cursor == start + count:
            self._flush(self._shard)

    # ---- writing -------------------------------------------------------------------------------------
    def _flush(self, i: int) -> None:
        start, count = self._item_range(i)
        rows, errors = self._buf_rows, self._buf_errors
        self._buf_rows, self._buf_errors = [], []
        path = self.out / SHARD_PATTERN.format(i)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        write_shard_file(tmp, self.spec, rows, errors, start, count, self._content_keys[i], self.generation)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.out)
        self._done[i] = _shard_info(path, [k for k, _ in rows], start, count, self._content_keys[i])
        self._errors[i] = errors

    def commit(self) -> Manifest:
        """Write the manifest once every shard exists; returns it."""
        if self.partial:
            self.close()  # a part is done once its shards are written
            raise ShardError(f"{self.spec.stage}: a writer restricted to some shards cannot commit the set")
        if self.complete:
            assert self.manifest is not None
            return self.manifest
        missing = [i for i in range(self.n_shards) if i not in self._done]
        if missing:
            raise ShardError(f"{self.spec.stage}: cannot commit, shards {missing[:5]} not written")
        for i in range(self.n_shards):  # what is committed is what this writer wrote or checked
            info, path = self._done[i], self.out / self._done[i].file
            now = (path.stat().st_size, file_sha256(path)) if path.is_file() else (None, None)
            if now != (info.size, info.sha256):
                raise ShardError(f"{path}: changed on disk since this writer wrote it (sha256 {str(now[1])[:12]}…, "
                                 f"expected {info.sha256[:12]}…); did another process write into {self.out}? "
                                 f"Nothing committed; rerun")
        s = self.spec
        manifest = Manifest(
            stage=s.stage, stage_key=s.stage_key, level=s.level, fields=list(s.fields),
            shards=[self._done[i] for i in range(self.n_shards)], teacher=dict(s.teacher),
            params=dict(s.params), inputs=dict(s.inputs), extra=dict(s.extra),
            errors=[e for i in range(self.n_shards) for e in self._errors.get(i, [])],
            rows_per_shard=s.rows_per_shard, package_version=__version__, content_base=s.content_base,
            generation=self.generation,
        )
        manifest.save(self.out)
        self.manifest = manifest
        self.close()
        return manifest

    def __enter__(self) -> "ShardWriter":
        if not self.complete and self.progress:
            from tqdm.auto import tqdm

            todo = len(self.todo_indices())
            self._bar = tqdm(total=todo, desc=self.desc, unit="row", dynamic_ncols=True, leave=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.close()
        try:
            if exc_type is None and not self.partial:
                self.commit()
        except BaseException:
            self.close(failed=True)
            raise
        self.close(failed=exc_type is not None)


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _committed_shards(directory: Path) -> dict[str, ShardInfo]:
    """``file name -> ShardInfo`` of the committed current-format set in ``directory`` ({} when none)."""
    try:
        m = Manifest.load(directory)
    except (ShardError, OSError):
        return {}
    if m.format_version != FORMAT_VERSION:
        return {}
    return {s.file: s for s in m.shards if s.content_key}


def _shard_info(path: Path, keys: list[str], start: int, count: int, content_key: str) -> ShardInfo:
    return ShardInfo(file=path.name, rows=len(keys), first_key=keys[0] if keys else None,
                     last_key=keys[-1] if keys else None, sha256=file_sha256(path),
                     size=path.stat().st_size, item_start=start, item_count=count, content_key=content_key)


def write_shard_file(path: Path, spec: ShardSetSpec, rows: list[tuple[str, dict[str, np.ndarray]]],
                     errors: list[dict[str, str]], item_start: int, item_count: int, content_key: str,
                     generation: str) -> None:
    """Write one HDF5 shard with a deterministic layout: ``key`` (fixed-width UTF-8 bytes), one contiguous
    uncompressed dataset per fixed field, ``<field>/values`` + ``<field>/offsets`` (int64), both contiguous,
    per ragged field; no timestamps. The attributes name the stage and the shard's content address, nothing
    set-level (no stage key), so the same items give the same file in any set that contains them; the set's
    generation lies in the 512-byte user block before the HDF5 data (re-stamped when a shard is kept)."""
    keys = [k.encode("utf-8") for k, _ in rows]
    width = max((len(k) for k in keys), default=1)
    block = userblock(generation)
    with h5py.File(path, "w", libver="earliest", track_order=False, userblock_size=USERBLOCK) as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["stage"] = spec.stage
        f.attrs["content_key"] = content_key
        f.attrs["item_start"] = item_start
        f.attrs["item_count"] = item_count
        f.attrs["errors"] = json.dumps(errors, sort_keys=True, ensure_ascii=False)
        f.create_dataset("key", data=np.array(keys, dtype=f"S{width}"), track_times=False)
        for spec_f in spec.fields:
            arrays = [r[spec_f.name] for _, r in rows]
            if not spec_f.ragged:
                data = np.stack(arrays) if arrays else np.zeros((0, *spec_f.shape), spec_f.np_dtype)
                f.create_dataset(spec_f.name, data=data, track_times=False)
                continue
            g = f.create_group(spec_f.name, track_order=False)
            lengths = np.array([len(a) for a in arrays], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            values = (np.concatenate(arrays) if arrays else np.zeros((0, *spec_f.shape), spec_f.np_dtype))
            # Contiguous, not chunked (a departure from DESIGN.md §3): HDF5 allocates chunks at close time in
            # metadata-cache order, which made the same content give different bytes in another process.
            g.create_dataset("values", data=values, track_times=False)
            g.create_dataset("offsets", data=offsets, track_times=False)
    with open(path, "r+b") as fh:
        fh.write(block)
