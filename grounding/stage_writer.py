"""Writing one stage's shard set: key, resume, fan-out parts and incremental reuse (:func:`write_stage`).

Stage code calls :func:`write_stage` with the code version of its own module
(:func:`grounding.codeset.code_version`), never a hand-written module list.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from grounding.config import Params
from grounding.data.schema import DATASET_FILE, CanonicalDataset, canonical_json, read_records
from grounding.shards import FieldSpec, ShardSetSpec, ShardWriter, stage_key
from grounding.shards.keys import content_base
from grounding.shard_parts import _PART, in_part, shard_part  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


def write_stage(
    params: Params,
    *,
    stage: str,
    code: str,
    level: str,
    fields: tuple[FieldSpec, ...],
    item_keys: list[str],
    rows: Callable[[list[str]], Iterable[tuple[str, Mapping[str, Any] | Exception]]],
    stage_params: Mapping[str, Any],
    inputs: Mapping[str, str],
    teacher: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    out_dir: Path | None = None,
    item_hashes: Mapping[str, str] | Callable[[str], str] | str | None = "auto",
    item_inputs: tuple[str, ...] = ("dataset",),
) -> Path:
    """Key, resume and write one shard set. ``code``: the code version of the calling stage's module
    (:func:`grounding.codeset.code_version` of it: its whole derived code set, this module included).

    ``rows(todo_keys)`` yields ``(key, row)`` for the keys still missing, in order; yielding an exception
    instead of a row records that item as failed (``on_error`` decides whether that stops the stage).

    Incremental extension: with per-item content hashes each shard is addressed by (stage, code, teacher,
    params, the inputs not in ``item_inputs``) + its members' keys and hashes, so when the dataset grows,
    shards whose items are unchanged are kept (or copied from the same stage's sets of the datasets named
    in ``shards.reuse_from``) and only the others are computed. ``item_hashes="auto"`` derives them from
    the prepared dataset when ``inputs["dataset"]`` is its fingerprint and the items are its images or
    sentences (:func:`dataset_item_hashes`). This is valid only if a row depends on the dataset through its
    own item alone (anything dataset-wide that shapes rows, e.g. a class list, belongs in ``stage_params``);
    a stage that breaks this passes ``item_hashes=None``.
    """
    out = out_dir or params.teacher_dir(stage)
    key = stage_key(stage, code, teacher, stage_params, inputs)
    hashes = _item_hashes(params, item_hashes, level, item_keys, inputs)
    base = content_base(stage, code, teacher, stage_params, inputs, item_inputs) if hashes is not None else ""
    spec = ShardSetSpec(stage=stage, stage_key=key, level=level, fields=fields,
                        rows_per_shard=params.shards.rows_per_shard, teacher=dict(teacher or {}),
                        params=dict(stage_params), inputs=dict(inputs), extra=dict(extra or {}),
                        on_error=params.dataset.on_error, content_base=base)
    part = _PART.get()
    shards = None
    if part is not None:
        n_shards = math.ceil(len(item_keys) / spec.rows_per_shard)
        shards = [i for i in range(n_shards) if i % part[1] == part[0]]
    desc = stage if part is None else f"{stage} [part {part[0] + 1}/{part[1]}]"
    sources = [out.parent / name for name in params.shards.reuse_from if name != out.name]
    with ShardWriter(out, spec, item_keys, progress=params.progress, desc=desc, shards=shards,
                     item_hashes=hashes, reuse_from=sources, wait=params.shards.wait) as w:
        if w.complete:
            log.info("%s: up to date at %s (key %s)", stage, out, key[:12])
            kept = w.manifest.rows_per_shard
            if kept and kept != spec.rows_per_shard:  # the layout is not part of the key: rows are the same
                log.warning("%s: %s is up to date and keeps its layout of %d rows per shard; "
                            "shards.rows_per_shard=%d applies to sets written from now on (delete the directory "
                            "to re-shard it)", stage, out, kept, spec.rows_per_shard)
            return out
        if w.reused:
            log.info("%s: %d of %d shards reused (%d kept, %d copied), computing %d rows", stage, len(w.reused),
                     w.n_shards, sum(v == "kept" for v in w.reused.values()),
                     sum(v == "copied" for v in w.reused.values()), len(w.todo_indices()))
        todo = list(w.todo())
        if todo:
            for k, row in rows(todo):
                if isinstance(row, Exception):
                    w.skip(k, f"{type(row).__name__}: {row}")
                else:
                    w.add(k, row)
    return out


def dataset_item_hashes(images: Iterable[Mapping[str, Any]], refs: Iterable[Mapping[str, Any]], level: str,
                        item_keys: Sequence[str]) -> list[str] | None:
    """Content hash of each item from the dataset's records (as stored in ``dataset.json``): for
    image-level items the image record (incl. the sha256 of the file's bytes) and its sentences; for
    sentence-level items the sentence record and its image's record. ``refs`` is read once, in stored
    (``ref_id``) order, and not kept: memory grows with the images, not the sentences. ``None`` when the
    items are not the dataset's images (or sentences) of that level."""
    return _hashes_of_items(dict(map(_image_digest, images)), refs, level, item_keys)


def _image_digest(image: Mapping[str, Any]) -> tuple[str, str]:
    """``(image_id, sha256 of the record's canonical JSON)``."""
    return image["image_id"], hashlib.sha256(canonical_json(image).encode("utf-8")).hexdigest()


def _hashes_of_items(image_digests: Mapping[str, str], refs: Iterable[Mapping[str, Any]], level: str,
                     item_keys: Sequence[str]) -> list[str] | None:
    def h(*parts: str) -> str:
        return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()

    if level == "image":
        if not all(k in image_digests for k in item_keys):
            return None
        per_image: dict[str, Any] = {}  # image_id -> running sha256 of its sentences
        for r in refs:
            acc = per_image.get(r["image_id"])
            if acc is None:
                acc = per_image[r["image_id"]] = hashlib.sha256()
            acc.update(canonical_json(r).encode("utf-8") + b"\n")
        empty = hashlib.sha256().hexdigest()
        return [h("image", image_digests[k], per_image[k].hexdigest() if k in per_image else empty)
                for k in item_keys]
    if level != "sentence":
        return None
    wanted, found = set(item_keys), {}
    for r in refs:
        if r["ref_id"] in wanted:
            found[r["ref_id"]] = h("sentence", canonical_json(r), image_digests.get(r["image_id"], ""))
    if len(found) != len(wanted):
        return None
    return [found[k] for k in item_keys]


def _item_hashes(params: Params, how: Mapping[str, str] | Callable[[str], str] | str | None, level: str,
                 item_keys: list[str], inputs: Mapping[str, str]) -> list[str] | None:
    """Per-item content hashes for :func:`write_stage` (``None``: shards addressed by the stage key).
    ``"auto"`` streams the prepared ``dataset.json`` and uses it only when its recorded fingerprint is
    ``inputs["dataset"]`` (the stage's own load checked that fingerprint against the content)."""
    if how is None:
        return None
    if isinstance(how, str):
        if how != "auto":
            raise ValueError(f"item_hashes must be 'auto', None, a mapping or a callable, got {how!r}")
        if "dataset" not in inputs or level not in ("image", "sentence"):
            return None
        try:
            head, images, refs = read_records(params.prepared_dir() / DATASET_FILE, image_fn=_image_digest)
            if head.get("fingerprint") != inputs["dataset"]:
                return None
            return _hashes_of_items(dict(images), refs, level, item_keys)
        except (OSError, ValueError, KeyError, TypeError) as e:  # DataError is a ValueError
            log.debug("no item hashes (prepared dataset unreadable: %s)", e)
            return None
    if callable(how):
        return [str(how(k)) for k in item_keys]
    return [str(how[k]) for k in item_keys]


def dataset_extra(params: Params, ds: CanonicalDataset, out: Path) -> dict[str, Any]:
    """Provenance every shard set carries about its dataset: name and where it lies (relative to ``out``)."""
    return {"dataset": ds.name, "dataset_dir": os.path.relpath(params.prepared_dir().resolve(), out.resolve())}
