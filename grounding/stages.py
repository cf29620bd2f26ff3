"""The stage registry: name -> inputs, outputs, code modules (hashed into the key) and run function.

DVC (``stages/*.py``) and Prefect (``pipelines/flow.py``) both call :func:`run`; a stage whose output
directory already holds a committed shard set with the same key returns at once, so the two share one
cache. ``run`` returns the output directory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from grounding import __version__
from grounding.config import Params
from grounding.data.schema import DATASET_FILE, CanonicalDataset, canonical_json, read_records
from grounding.shards import FieldSpec, ShardSetSpec, ShardWriter, code_version, stage_key
from grounding.shards.keys import content_base

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageDef:
    """A registered stage. ``modules`` are the library modules whose source defines its outputs."""

    name: str
    description: str
    modules: tuple[str, ...]
    run: Callable[[Params], Path]
    needs: tuple[str, ...] = ()  # upstream stages (run first by `plan`)
    fan_out: bool = False  # writes one shard set through write_stage, so it can run in parts


_PART: ContextVar[tuple[int, int] | None] = ContextVar("grounding_shard_part", default=None)


@contextmanager
def shard_part(part: int, n_parts: int) -> Iterator[None]:
    """Within this context, shard-set stages write only shards ``i`` with ``i % n_parts == part`` and do
    not commit (fan-out: run every part, then run the stage once more outside the context to commit;
    the result is byte-identical to a serial run because shard contents depend only on their items)."""
    if not 0 <= part < n_parts:
        raise ValueError(f"part {part} not in [0, {n_parts})")
    token = _PART.set((part, n_parts))
    try:
        yield
    finally:
        _PART.reset(token)


def write_stage(
    params: Params,
    *,
    stage: str,
    modules: Iterable[str],
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
    """Key, resume and write one shard set.

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
    code = code_version([*modules, "grounding.shards.writer"])
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
                     item_hashes=hashes, reuse_from=sources) as w:
        if w.complete:
            log.info("%s: up to date at %s (key %s)", stage, out, key[:12])
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


# ---- stages --------------------------------------------------------------------------------------------
def _run_prepare(params: Params) -> Path:
    from grounding.data.prepare import prepare

    prepare(params, refs=False)
    return params.prepared_dir()


def _run_gt_boxes(params: Params) -> Path:
    from grounding.data.gt import GT_FIELDS_MEANING, class_list, gt_regions

    ds = CanonicalDataset.load(params.prepared_dir())
    classes = class_list(ds)
    out = params.teacher_dir("gt-boxes")
    regions = dict(gt_regions(ds, classes))
    fields = (
        FieldSpec("boxes", "float32", (4,), ragged=True, meaning=GT_FIELDS_MEANING["boxes"]),
        FieldSpec("labels", "int32", (), ragged=True, meaning=GT_FIELDS_MEANING["labels"]),
        FieldSpec("size", "int32", (2,), meaning=GT_FIELDS_MEANING["size"]),
    )
    return write_stage(
        params, stage="gt-boxes", modules=["grounding.data.gt", "grounding.stages"], level="image",
        fields=fields, item_keys=[im.image_id for im in ds.images],
        rows=lambda todo: ((k, regions[k]) for k in todo), stage_params={"classes": classes},
        inputs={"dataset": ds.fingerprint()}, teacher={"name": "ground-truth", "package": __version__},
        extra={**dataset_extra(params, ds, out), "classes": classes}, out_dir=out,
    )


def _lazy(module: str, fn: str) -> Callable[[Params], Path]:
    """A stage function imported on first call (keeps `import grounding.stages` light)."""

    def run_(params: Params) -> Path:
        import importlib

        return getattr(importlib.import_module(module), fn)(params)

    run_.__name__ = fn
    return run_


def _detector_stages() -> tuple[StageDef, ...]:
    """Detector teachers (issue 5): tiny-teacher bootstraps and the three caching stages."""

    call = _lazy
    boot, det = "grounding.teachers.bootstrap", "grounding.teachers.detectors"
    mods = (det, "grounding.teachers.detectors.tiny", "grounding.boxes", "grounding.data.images")
    darknet = (f"{det}.darknet", f"{det}.darknet_stage")
    return (
        StageDef("bootstrap-frcnn", "tiny Faster R-CNN trained on the synthetic train split (when no weights)",
                 (boot, f"{det}.torchvision_rcnn", *mods), call(boot, "run_bootstrap_frcnn"), needs=("prepare",)),
        StageDef("bootstrap-fcos", "tiny FCOS trained on the synthetic train split (when no weights)",
                 (boot, f"{det}.fcos", *mods), call(boot, "run_bootstrap_fcos"), needs=("prepare",)),
        StageDef("bootstrap-yolo", "width-scaled SimREC YOLOv3 (darknet; or ultralytics') trained on the synthetic "
                 "train split", (boot, f"{det}.yolo", *darknet, f"{det}.darknet_train", *mods), call(boot, "run_bootstrap_yolo"), needs=("prepare",)),
        StageDef("frcnn-proposals", "Faster R-CNN top-100 boxes, scores, class probabilities, RoI features",
                 (f"{det}.torchvision_rcnn", *mods), call(f"{det}.torchvision_rcnn", "run_frcnn_proposals"),
                 needs=("prepare", "bootstrap-frcnn"), fan_out=True),
        StageDef("fcos-points", "FCOS P5 points: ltrb/xyxy boxes, centerness and class logits",
                 (f"{det}.fcos", *mods), call(f"{det}.fcos", "run_fcos_points"),
                 needs=("prepare", "bootstrap-fcos"), fan_out=True),
        StageDef("yolo-anchors", "YOLOv3 (darknet: three pre-head maps, stride-32 boxes/objectness of every cell; "
                 "ultralytics: neck features of the cells); top keep_ratio cells kept",
                 (f"{det}.yolo", *darknet, *mods), call(f"{det}.yolo", "run_yolo_anchors"),
                 needs=("prepare", "bootstrap-yolo"), fan_out=True),
    )


STAGES: dict[str, StageDef] = {
    s.name: s
    for s in (
        StageDef("prepare", "canonical dataset from user files or the synthetic generator",
                 ("grounding.data.prepare",), _run_prepare),
        StageDef("gt-boxes", "distinct GT boxes per image (oracle proposals)",
                 ("grounding.data.gt",), _run_gt_boxes, needs=("prepare",), fan_out=True),
        StageDef("wordnet-labels", "phrase head noun -> soft label over the detector classes (WordNet 3.0)",
                 ("grounding.teachers.wordnet", "grounding.teachers.wordnet_db"), _lazy("grounding.teachers.wordnet", "run_wordnet_labels"),
                 needs=("prepare",), fan_out=True),
        *_detector_stages(),
        StageDef("refclip-train", "RefCLIP anchor-text model trained on the cached YOLOv3 anchors",
                 ("grounding.refclip.train",), _lazy("grounding.refclip.train", "run_refclip_train"),
                 needs=("yolo-anchors",)),
        StageDef("refclip-pseudo", "RefCLIP pseudo-box per sentence + Acc@0.5 (data/metrics/refclip.json)",
                 ("grounding.refclip.pseudo",), _lazy("grounding.refclip.pseudo", "run_refclip_pseudo"),
                 needs=("refclip-train",)),
        StageDef("refclip-export", "pseudo-labels as SimREC JSON and TransVG .pth",
                 ("grounding.refclip.export",), _lazy("grounding.refclip.export", "run_refclip_export"),
                 needs=("refclip-pseudo",)),
        # CLIP teacher (issue 4): bootstrap (only when teachers.clip.pretrained is null), five caches, sanity
        StageDef("bootstrap-clip", "tiny CLIP trained contrastively on the train split (when no weights)",
                 ("grounding.teachers.clip_bootstrap", "grounding.teachers.clip"),
                 _lazy("grounding.teachers.clip_bootstrap", "run_bootstrap_clip"), needs=("prepare",)),
        StageDef("clip-image", "CLIP embedding per image (L2-normalised, float16)",
                 ("grounding.teachers.clip",), _lazy("grounding.teachers.clip", "run_clip_image"),
                 needs=("prepare", "bootstrap-clip"), fan_out=True),
        StageDef("clip-text", "CLIP embedding per sentence, token count and truncation flag",
                 ("grounding.teachers.clip",), _lazy("grounding.teachers.clip", "run_clip_text"),
                 needs=("prepare", "bootstrap-clip"), fan_out=True),
        StageDef("clip-classes", "CLIP embedding per detector class name (mean over prompt templates)",
                 ("grounding.teachers.clip",), _lazy("grounding.teachers.clip", "run_clip_classes"),
                 needs=("gt-boxes", "bootstrap-clip"), fan_out=True),
        StageDef("clip-crops", "CLIP embedding per proposal crop (teachers.clip.crops_from boxes)",
                 ("grounding.teachers.clip",), _lazy("grounding.teachers.clip", "run_clip_crops"),
                 needs=("frcnn-proposals", "bootstrap-clip"), fan_out=True),
        StageDef("qam", "BiCM query attention map per sentence (patch grid) and its box P_t",
                 ("grounding.teachers.clip", "grounding.teachers.qam"), _lazy("grounding.teachers.clip", "run_qam"),
                 needs=("prepare", "bootstrap-clip"), fan_out=True),
        StageDef("clip-eval", "CLIP sanity figures on the eval split -> data/metrics/clip.json",
                 ("grounding.teachers.clip_eval",), _lazy("grounding.teachers.clip_eval", "run_clip_eval"),
                 needs=("clip-image", "clip-text", "clip-crops", "clip-classes", "qam")),
        # REC students (issue 9): read teacher shard sets only
        StageDef("student-rec-pseudo", "REC student (TransVG-style) taught by RefCLIP pseudo-boxes, random resize + EMA",
                 ("grounding.students.rec", "grounding.students.common"),
                 _lazy("grounding.students.rec", "run_student_rec_pseudo"), needs=("refclip-pseudo",)),
        StageDef("student-epmvg", "EpmVG: REC student on GT + distillation from the cached CLIP image/text embeddings",
                 ("grounding.students.epmvg", "grounding.students.rec", "grounding.students.common"),
                 _lazy("grounding.students.epmvg", "run_student_epmvg"), needs=("clip-image", "clip-text")),
        StageDef("student-pbrec", "PBREC: point head on the REC trunk ranking the cached FCOS P5 points",
                 ("grounding.students.pbrec", "grounding.students.rec", "grounding.students.common"),
                 _lazy("grounding.students.pbrec", "run_student_pbrec"), needs=("fcos-points",)),
        # weakly supervised grounding students (issue 10): read teacher shard sets only
        StageDef("student-nce-distill", "NCE+Distill: region-phrase NCE + WordNet/detector soft-target distillation",
                 ("grounding.students.nce_distill", "grounding.soft_targets", "grounding.students.common"),
                 _lazy("grounding.students.nce_distill", "run_student_nce_distill"),
                 needs=("frcnn-proposals", "wordnet-labels")),
        StageDef("student-bicm", "BiCM from caches: COM (crop/class-query cosines) + QAM fusion + KAM MLP",
                 ("grounding.students.bicm", "grounding.students.nce_distill", "grounding.students.common"),
                 _lazy("grounding.students.bicm", "run_student_bicm"),
                 needs=("frcnn-proposals", "clip-crops", "clip-classes", "clip-image", "clip-text", "qam")),
    )
}


def _register_evaluate() -> None:
    """``evaluate`` needs every registered ``student-*`` stage (register students above this call)."""
    students = tuple(sorted(n for n in STAGES if n.startswith("student-")))
    STAGES["evaluate"] = StageDef("evaluate", "Acc@0.5 table of every student and its baselines (data/metrics/students.*)",
                                  ("grounding.evaluate",), _lazy("grounding.evaluate", "run_evaluate"),
                                  needs=students)


_register_evaluate()

#: The main job, in dependency order: what `grounding demo` (and `make demo`) runs.
PIPELINE: tuple[str, ...] = (
    "prepare", "gt-boxes", "wordnet-labels",
    "bootstrap-frcnn", "frcnn-proposals", "bootstrap-fcos", "fcos-points", "bootstrap-yolo", "yolo-anchors",
    "refclip-train", "refclip-pseudo", "refclip-export",
    "bootstrap-clip", "clip-image", "clip-text", "clip-classes", "clip-crops", "qam", "clip-eval",
    "student-rec-pseudo", "student-epmvg", "student-pbrec", "student-nce-distill", "student-bicm",
    "evaluate",  # keep last: it reads every student's metrics
)


def get(name: str) -> StageDef:
    """The stage called ``name``; ``KeyError`` listing the known stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are {sorted(STAGES)}") from None


def plan(targets: Iterable[str]) -> list[str]:
    """The stages needed for ``targets`` (their ``needs`` closure), in a dependency order."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"stage dependency cycle through {name!r}")
        visiting.add(name)
        for dep in get(name).needs:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for t in targets:
        visit(t)
    return order


def run(name: str, params: Params) -> Path:
    """Run (or reuse) stage ``name`` with ``params``; returns its output directory."""
    return get(name).run(params)

