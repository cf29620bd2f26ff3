"""The stage registry and the stage engine.

Each stage is declared once (:data:`STAGES`): its compute function (``"module:function"``, called as
``function(params) -> Path``), its data inputs (outputs of upstream stages, as path templates), the
``params.yaml`` sections it reads, and its outputs. Everything else is derived from that declaration:

- the code part of its key: :func:`grounding.codeset.code_set` of the compute module (every library module
  it imports, transitively) plus its ``stages/<entry>.py``;
- its upstream stages (the stages whose outputs are its inputs), hence :func:`plan`;
- ``dvc.yaml`` (:func:`grounding.dvcgen.dvc_yaml`: deps = that code set + the inputs, params = the sections).

The engine (:func:`run`, :func:`status`) decides currency with one mechanism for every kind of output: the
stage key (stage, code version, declared params, fingerprints of the inputs) is written with the
fingerprints of the outputs to one record, ``<first output>.stage.json`` (atomically, after the compute
returns). A stage is current when its record holds the key of today's code, params and inputs and its
outputs still have the recorded fingerprints (a shard set: its manifest's key; a file: its sha256). As in
DVC, a stale upstream does not make a stage stale by itself: its key follows the upstream's *outputs*, so
an upstream rerun that writes the same bytes leaves it current.

An input may name its stage by a params value (:func:`_from`: ``{teachers}/{students.rec.pseudo_from}/{dataset}``):
:func:`bind` fills in the stage the params name, so the key fingerprints the set actually read and the
producer run under ``deps`` is that stage; a null value (a nullable param) leaves the input out.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from string import Formatter
from types import NoneType
from typing import Any, Callable, Iterable, NamedTuple, get_args

from grounding.codeset import code_set, files_version
from grounding.config import ConfigError, DatasetParams, Params
from grounding.shards.keys import digest, file_sha256
from grounding.shards.manifest import atomic_write_bytes

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".stage.json"


@dataclass(frozen=True)
class Out:
    """One output of a stage. ``path`` is a template: ``{prepared}``, ``{teachers}``, ``{students}``,
    ``{metrics}``, ``{models}`` (the ``paths`` section) and ``{dataset}`` (``dataset.name``). ``kind``:
    ``outs`` | ``metrics`` | ``plots`` (how dvc.yaml lists it); ``cache``/``persist``/``x``/``y`` as in DVC."""

    path: str
    kind: str = "outs"
    cache: bool = True
    persist: bool = True
    x: str | None = None
    y: str | None = None
    comment: str | None = None


@dataclass(frozen=True)
class StageDef:
    """A registered stage: what it reads (``inputs``: output templates of upstream stages; ``params``:
    dotted ``params.yaml`` paths, each a section of :class:`~grounding.config.Params` or a leaf), what it
    writes (``outputs``) and the function computing it. ``fan_out``: writes one shard set through
    :func:`grounding.stage_writer.write_stage`, so it can run in parts."""

    name: str
    description: str
    compute: str
    inputs: tuple[str, ...] = ()  # a field ``{a.b.c_from}`` names the stage by a params value (see :func:`bind`)
    params: tuple[str, ...] = ()
    outputs: tuple[Out, ...] = ()
    fan_out: bool = False
    reads: Callable[[Params], tuple[str, ...]] | None = field(default=None, compare=False)  # user files it reads
    partial: bool = False  # inputs may be missing (their absence is in the key): not produced under deps="missing"

    @property
    def module(self) -> str:
        return self.compute.split(":")[0]

    @property
    def entry(self) -> str:
        """The thin DVC entry point ``stages/<name>.py``."""
        return f"stages/{self.name.replace('-', '_')}.py"

    def bound_inputs(self, params: Params | None = None) -> tuple[str, ...]:
        """:attr:`inputs` with their stages named for ``params`` (``None``: the ``Params()`` defaults), each
        an output template of a registered stage; an input named by a null value is left out."""
        return tuple(b for b in (bind(t, params) for t in self.inputs) if b is not None)

    def upstream(self, params: Params | None = None) -> tuple[str, ...]:
        """The producers of :meth:`bound_inputs` for ``params`` (in input order, without repeats)."""
        return tuple(dict.fromkeys(producer(t) for t in self.bound_inputs(params)))

    @property
    def needs(self) -> tuple[str, ...]:
        """Upstream stages for the default params (the static DAG; dvc.yaml's edges for params.yaml's)."""
        return self.upstream()

    def code_files(self) -> tuple[str, ...]:
        """The files whose source is hashed into the key (and listed as dvc.yaml code deps)."""
        return (*code_set(self.module), self.entry)

    def code_version(self) -> str:
        return files_version(self.code_files())


class StageResult(NamedTuple):
    """What :func:`run` returns: the output path, the stage key and whether it was a cache hit."""

    path: Path
    key: str
    hit: bool


class StageStatus(NamedTuple):
    """What :func:`status` returns: ``current`` and, when not, why (one line)."""

    name: str
    current: bool
    reason: str
    key: str | None
    missing: tuple[str, ...] = ()  # bound input templates with nothing there yet (a stage that cannot run)


# ---- declarations --------------------------------------------------------------------------------------------
PREP = "{prepared}/{dataset}"


def _t(stage: str) -> str:
    return f"{{teachers}}/{stage}/{{dataset}}"


def _from(param: str) -> str:
    """The teacher shard set of the stage named by the value of ``params.yaml`` path ``param``."""
    return f"{{teachers}}/{{{param}}}/{{dataset}}"


def _boot(teacher: str) -> str:
    return f"{{models}}/bootstrap/{teacher}/{{dataset}}.pt"


def _local(*dotted: str) -> Callable[[Params], tuple[str, ...]]:
    """``reads`` of a stage whose params name local files or directories (word vectors, a BERT directory,
    backbone weights, a public checkpoint): the values set, in order."""
    return lambda p: tuple(str(v) for v in (param_value(p, d) for d in dotted) if v)


def _trunk_files(section: str) -> Callable[[Params], tuple[str, ...]]:
    return _local(f"{section}.backbone_weights", f"{section}.bert_path")


def _shards(path: str) -> tuple[Out, ...]:
    return (Out(path),)


def _model(path: str) -> tuple[Out, ...]:
    """A weights file and the provenance sidecar it is written with (not DVC-cached)."""
    return (Out(path), Out(path + ".json", cache=False))


def _student(stage: str, x: str = "epoch") -> tuple[Out, ...]:
    return (Out(f"{{students}}/{stage}/{{dataset}}"), Out(f"{{models}}/students/{stage}/{{dataset}}.pt"),
            Out(f"{{metrics}}/{stage}.json", "metrics", cache=False),
            Out(f"{{metrics}}/{stage}-curve.json", "plots", cache=False, x=x, y="loss"))


_DET = "grounding.teachers.detectors"
_BOOT = "grounding.teachers.bootstrap"
_CLIP = "grounding.teachers.clip"
_CLIP_PARAMS = ("teachers.clip", "shards", "dataset.on_error")
_STUDENTS = ("student-rec-pseudo", "student-epmvg", "student-pbrec", "student-nce-distill", "student-bicm")

_DECLARED: tuple[StageDef, ...] = (
    StageDef("prepare", "canonical dataset from user files or the synthetic generator",
             "grounding.data.prepare:run_prepare", params=("seed", "dataset"), outputs=_shards(PREP),
             reads=lambda p: dataset_files(p.dataset)),
    StageDef("gt-boxes", "distinct GT boxes per image (oracle proposals)", "grounding.data.gt_stage:run_gt_boxes",
             (PREP,), ("shards",), _shards(_t("gt-boxes")), fan_out=True),
    StageDef("wordnet-labels", "phrase head noun -> soft label over the detector classes (WordNet 3.0)",
             "grounding.teachers.wordnet:run_wordnet_labels", (PREP, _from("teachers.wordnet.classes_from")),
             ("teachers.wordnet", "shards", "dataset.on_error"),
             (Out(_t("wordnet-labels")), Out("{metrics}/wordnet-labels/{dataset}.json", "metrics", cache=False, persist=False)),
             fan_out=True),
    StageDef("bootstrap-frcnn", "tiny Faster R-CNN trained on the synthetic train split (when no weights)",
             f"{_BOOT}:run_bootstrap_frcnn", (PREP,), ("seed", "teachers.frcnn"), _model(_boot("frcnn"))),
    StageDef("frcnn-proposals", "Faster R-CNN top-100 boxes, scores, class probabilities, RoI features",
             f"{_DET}.stage:run_frcnn_proposals", (PREP, _boot("frcnn")),
             ("teachers.frcnn", "shards", "dataset.on_error"), _shards(_t("frcnn-proposals")), fan_out=True),
    StageDef("bootstrap-fcos", "tiny FCOS trained on the synthetic train split (when no weights)",
             f"{_BOOT}:run_bootstrap_fcos", (PREP,), ("seed", "teachers.fcos"), _model(_boot("fcos"))),
    StageDef("fcos-points", "FCOS P5 points: ltrb/xyxy boxes, centerness and class logits",
             f"{_DET}.stage:run_fcos_points", (PREP, _boot("fcos")), ("teachers.fcos", "shards", "dataset.on_error"),
             _shards(_t("fcos-points")), fan_out=True),
    StageDef("bootstrap-yolo", "width-scaled SimREC YOLOv3 (darknet; or ultralytics') trained on the synthetic "
             "train split", f"{_BOOT}:run_bootstrap_yolo", (PREP,),
             ("seed", *(f"teachers.yolo.{k}" for k in ("backend", "weights", "config", "depth_multiple",
                                                          "width_multiple", "input_size", "bootstrap"))),
             _model(_boot("yolo"))),
    StageDef("yolo-anchors", "YOLOv3 (darknet: three pre-head maps, stride-32 boxes/objectness of every cell; "
             "ultralytics: neck features of the cells); top keep_ratio cells kept",
             f"{_DET}.stage:run_yolo_anchors", (PREP, _boot("yolo")), ("teachers.yolo", "shards", "dataset.on_error"),
             _shards(_t("yolo-anchors")), fan_out=True),
    StageDef("refclip-train", "RefCLIP anchor-text model trained on the cached YOLOv3 anchors",
             "grounding.refclip.train:run_refclip_train", (PREP, _from("refclip.anchors_from")),
             ("seed", "refclip", "train"),
             (*_model("{models}/refclip/{dataset}.pt"),
              Out("{metrics}/refclip-train-curve.json", "plots", cache=False, x="epoch", y="loss")),
             reads=_local("refclip.word_vectors")),
    StageDef("refclip-pseudo", "RefCLIP pseudo-box per sentence + Acc@0.5 (data/metrics/refclip.json)",
             "grounding.refclip.pseudo:run_refclip_pseudo",
             (PREP, _from("refclip.anchors_from"), "{models}/refclip/{dataset}.pt"),
             ("refclip.anchors_from", "refclip.checkpoint", "refclip.vocab_from", "shards"),
             (Out(_t("refclip-pseudo")), Out("{metrics}/refclip.json", "metrics", cache=False)),
             reads=_local("refclip.checkpoint", "refclip.vocab_from")),
    StageDef("refclip-export", "pseudo-labels as files SimREC, RefCLIP or TransVG loaders read as is",
             "grounding.refclip.export:run_refclip_export", (PREP, _t("refclip-pseudo")),
             ("refclip.export_format", "refclip.export_layout", "refclip.transvg_dataset"),
             (Out(_t("refclip-export"), cache=False, comment="hard links into the prepared images and between equal "
                  "masks: DVC's cache would replace them with copies"),)),
    # CLIP teacher (issue 4): bootstrap (only when teachers.clip.pretrained is null), five caches, sanity
    StageDef("bootstrap-clip", "tiny CLIP trained contrastively on the train split (when no weights)",
             "grounding.teachers.clip_bootstrap:run_bootstrap_clip", (PREP,), ("seed", "teachers.clip"),
             _model(_boot("clip"))),
    StageDef("clip-image", "CLIP embedding per image (L2-normalised, float16)", f"{_CLIP}:run_clip_image",
             (PREP, _boot("clip")), _CLIP_PARAMS, _shards(_t("clip-image")), fan_out=True),
    StageDef("clip-text", "CLIP embedding per sentence, token count and truncation flag", f"{_CLIP}:run_clip_text",
             (PREP, _boot("clip")), _CLIP_PARAMS, _shards(_t("clip-text")), fan_out=True),
    StageDef("clip-classes", "CLIP embedding per detector class name (mean over prompt templates)",
             f"{_CLIP}:run_clip_classes", (_boot("clip"), _from("teachers.clip.classes_from")), ("teachers.clip", "shards"),
             _shards(_t("clip-classes")), fan_out=True),
    StageDef("clip-crops", "CLIP embedding per proposal crop (teachers.clip.crops_from boxes)", f"{_CLIP}:run_clip_crops",
             (PREP, _boot("clip"), _from("teachers.clip.crops_from")), _CLIP_PARAMS, _shards(_t("clip-crops")),
             fan_out=True),
    StageDef("qam", "BiCM query attention map per sentence (patch grid) and its box P_t", "grounding.teachers.qam_stage:run_qam",
             (PREP, _boot("clip")), _CLIP_PARAMS, _shards(_t("qam")), fan_out=True),
    StageDef("clip-eval", "CLIP sanity figures on the eval split -> data/metrics/clip.json",
             "grounding.teachers.clip_eval:run_clip_eval",
             (PREP, *(_t(s) for s in ("clip-image", "clip-text", "clip-crops", "clip-classes", "qam"))),
             ("teachers.clip.eval_split",), (Out("{metrics}/clip.json", "metrics", cache=False, persist=False),)),
    # REC students (issue 9) and weakly supervised grounding students (issue 10): read teacher shard sets only
    StageDef("student-rec-pseudo", "REC student (TransVG-style) taught by RefCLIP pseudo-boxes, random resize + EMA",
             "grounding.students.rec:run_student_rec_pseudo", (PREP, _from("students.rec.pseudo_from")),
             ("seed", "students.rec", "train", "shards"), _student("student-rec-pseudo"),
             reads=_trunk_files("students.rec")),
    StageDef("student-epmvg", "EpmVG: REC student on GT + distillation from the cached CLIP image/text embeddings",
             "grounding.students.epmvg:run_student_epmvg",
             (PREP, _from("students.epmvg.image_from"), _from("students.epmvg.text_from")),
             ("seed", "students.epmvg", "train", "shards"), _student("student-epmvg"),
             reads=_trunk_files("students.epmvg")),
    StageDef("student-pbrec", "PBREC: point head on the REC trunk ranking the cached FCOS P5 points",
             "grounding.students.pbrec:run_student_pbrec", (PREP, _from("students.pbrec.points_from")),
             ("seed", "students.pbrec", "train", "shards"), _student("student-pbrec"),
             reads=_trunk_files("students.pbrec")),
    StageDef("student-nce-distill", "NCE+Distill: region-phrase NCE + WordNet/detector soft-target distillation",
             "grounding.students.nce_distill:run_student_nce_distill",
             (PREP, _from("students.nce_distill.proposals_from"), _from("students.nce_distill.labels_from")),
             ("seed", "students.nce_distill", "shards"),
             _student("student-nce-distill", x="step"), reads=_local("students.nce_distill.glove_path")),
    StageDef("student-bicm", "BiCM from caches: COM (crop/class-query cosines) + QAM fusion + KAM MLP",
             "grounding.students.bicm:run_student_bicm",
             (PREP, _from("students.bicm.proposals_from"),
              *(_t(s) for s in ("clip-crops", "clip-classes", "clip-image", "clip-text", "qam"))),
             ("seed", "students.bicm", "shards"), _student("student-bicm")),
    StageDef("evaluate", "Acc@0.5 table of every student and its baselines (data/metrics/students.*)",
             "grounding.evaluate:run_evaluate", tuple(f"{{metrics}}/{s}.json" for s in _STUDENTS), (),
             (Out("{metrics}/students.json", "metrics", cache=False, persist=False),
              Out("{metrics}/students.md", cache=False, persist=False)),
             partial=True),  # a student without metrics is listed under `missing`, not trained
)

STAGES: dict[str, StageDef] = {s.name: s for s in _DECLARED}

#: The main job, in dependency order: what `grounding demo` (and `make demo`) runs.
PIPELINE: tuple[str, ...] = (
    "prepare", "gt-boxes", "wordnet-labels",
    "bootstrap-frcnn", "frcnn-proposals", "bootstrap-fcos", "fcos-points", "bootstrap-yolo", "yolo-anchors",
    "refclip-train", "refclip-pseudo", "refclip-export",
    "bootstrap-clip", "clip-image", "clip-text", "clip-classes", "clip-crops", "qam", "clip-eval",
    *_STUDENTS,
    "evaluate",  # keep last: it reads every student's metrics
)


@lru_cache(maxsize=None)
def producer(template: str) -> str:
    """The stage declaring output ``template`` (``KeyError`` when none does)."""
    for s in _DECLARED:
        if any(o.path == template for o in s.outputs):
            return s.name
    raise KeyError(f"no stage declares the output {template!r}")


def get(name: str) -> StageDef:
    """The stage called ``name``; ``KeyError`` listing the known stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are {sorted(STAGES)}") from None


def plan(targets: Iterable[str], params: Params | None = None) -> list[str]:
    """The stages needed for ``targets`` (their :meth:`StageDef.upstream` closure for ``params``; ``None``:
    the defaults), in a dependency order."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"stage dependency cycle through {name!r}")
        visiting.add(name)
        for dep in get(name).upstream(params):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for t in targets:
        visit(t)
    return order


# ---- inputs named by params ---------------------------------------------------------------------------------
def fill(template: str, value: Callable[[str], str]) -> str:
    """``template`` with each ``{field}`` replaced by ``value(field)``; the literal text is kept."""
    return "".join(text + ("" if f is None else value(f)) for text, f, _, _ in Formatter().parse(template))


def named_by(template: str) -> str | None:
    """The ``params.yaml`` path naming an input's stage (the template's dotted field); ``None``: a fixed input."""
    return next((f for _, f, _, _ in Formatter().parse(template) if f and "." in f), None)


def param_nullable(dotted: str) -> bool:
    """Whether ``params.yaml`` path ``dotted`` admits null (its :class:`Params` field type includes ``None``)."""
    model: Any = Params
    for part in dotted.split("."):
        model = model.model_fields[part].annotation
    return NoneType in get_args(model)


def teacher_stages() -> list[str]:
    """The stages a ``*_from`` param may name: those whose first output is ``{teachers}/<stage>/{dataset}``."""
    return [s.name for s in _DECLARED if s.outputs[0].path == _t(s.name)]


@lru_cache(maxsize=1)
def _defaults() -> Params:
    return Params()


def bind(template: str, params: Params | None = None) -> str | None:
    """Input ``template`` with its stage named: a fixed input as is; one named by a param (:func:`_from`) as
    the output template of the stage that param's value names in ``params`` (``None``: the ``Params()``
    defaults); ``None`` when that value is null (the input is absent). :class:`ConfigError` when the value
    names no teacher stage."""
    param = named_by(template)
    if param is None:
        return template
    value = param_value(params if params is not None else _defaults(), param)
    if value is None:
        return None
    if value not in teacher_stages():
        raise ConfigError(f"{param}: {value!r} is not a teacher stage (one writing <paths.teachers>/<stage>/"
                          f"<dataset>); teacher stages are {', '.join(teacher_stages())}")
    return template.replace("{" + param + "}", value)


# ---- the engine ----------------------------------------------------------------------------------------------
def resolve(template: str, params: Params) -> Path:
    """A template as a path under ``params.paths`` for ``params.dataset.name``; a dotted field (an input
    named by a param, see :func:`bind`) is filled with that params value."""
    paths = params.paths.model_dump()

    def value(field: str) -> str:
        if field == "dataset":
            return params.dataset.name
        return paths[field] if field in paths else str(param_value(params, field))

    return Path(fill(template, value))


def param_value(params: Params, dotted: str) -> Any:
    """The JSON value of a ``params.yaml`` path (a section or a leaf); ``KeyError`` naming it."""
    node: Any = params
    for part in dotted.split("."):
        if not hasattr(node, part):
            raise KeyError(f"stage params: {dotted!r} is not a params.yaml path (no {part!r})")
        node = getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


def dataset_files(ds: DatasetParams) -> tuple[str, ...]:
    """The user's files a ``dataset`` section makes ``prepare`` read: ``root`` and ``image_root`` (files or
    directories, as given); none for the synthetic generator."""
    if ds.format == "synthetic":
        return ()
    return tuple(dict.fromkeys(x for x in (ds.root, ds.image_root) if x))


def tree_fingerprint(path: Path) -> str | None:
    """What identifies a user's file or directory without reading its bytes (a COCO image directory is
    13 GB): the digest of the sorted (relative path, size in bytes, mtime in ns) of every file under it, the
    signals DVC's own state cache trusts; ``None`` when absent. A touch makes it stale (the safe side)."""
    if path.is_file():
        st = path.stat()
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    if not path.is_dir():
        return None
    rows = []
    for top, _, files in os.walk(path, followlinks=True):
        for f in files:
            st = os.stat(os.path.join(top, f))
            rows.append((Path(top, f).relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return f"tree:{len(rows)}:{digest(sorted(rows))}"


def fingerprint(path: Path) -> str | None:
    """What identifies the content of an output: a shard set's manifest key (only when committed and
    complete), a prepared dataset's or export's record file sha256, a file's sha256; ``None`` when absent."""
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():
            from grounding.shards import is_complete

            try:
                key = json.loads(manifest.read_text(encoding="utf-8"))["stage_key"]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            return f"shards:{key}" if is_complete(path, key) else None
        for name in ("dataset.json", "export.json"):
            if (path / name).is_file():
                return f"{name}:{file_sha256(path / name)}"
        return None
    if path.is_file():
        return f"sha256:{file_sha256(path)}"
    return None


def record_path(stage: StageDef, params: Params) -> Path:
    """``<first output>.stage.json``: the engine's record of the stage (key, result path, output fingerprints)."""
    first = resolve(stage.outputs[0].path, params)
    return first.with_name(first.name + RECORD_SUFFIX)


def read_record(stage: StageDef, params: Params) -> dict[str, Any] | None:
    path = record_path(stage, params)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _input_path(template: str, params: Params) -> Path:
    """Where input ``template`` lies: the producer's result path when that is its first output but the
    producer returned another file (a bootstrap stage given ``weights``), else the template resolved."""
    up = get(producer(template))
    if up.outputs[0].path == template:
        rec = read_record(up, params)
        if rec and rec.get("path"):
            return Path(rec["path"])
    return resolve(template, params)


def stage_key(name: str, params: Params) -> tuple[str, dict[str, str | None]]:
    """The key of stage ``name`` today (code, declared params, input fingerprints) and those fingerprints."""
    s = get(name)
    inputs = {t: fingerprint(_input_path(t, params)) for t in s.bound_inputs(params)}
    keyed: dict[str, Any] = {"stage": s.name, "code": s.code_version(),
                             "params": {p: param_value(params, p) for p in s.params}, "inputs": inputs}
    user = s.reads(params) if s.reads is not None else ()
    if user:  # only then: the keys of stages that read no user files stay what they were
        keyed["user_files"] = {f: tree_fingerprint(Path(f)) for f in user}
    return digest(keyed), inputs


def _outputs(s: StageDef, params: Params, result: Path | None) -> dict[str, str | None]:
    paths = {str(resolve(o.path, params)) for o in s.outputs}
    if result is not None:
        paths.add(str(result))
    return {p: fingerprint(Path(p)) for p in sorted(paths)}


def status(name: str, params: Params) -> StageStatus:
    """Whether stage ``name`` is current, without running anything (see the module docstring)."""
    s = get(name)
    key, inputs = stage_key(name, params)
    missing = [t for t, fp in inputs.items() if fp is None]
    if missing and not s.partial:
        return StageStatus(name, False, f"input {resolve(missing[0], params)} is missing (run {producer(missing[0])})", key,
                           tuple(missing))
    rec = read_record(s, params)
    if rec is None:
        return StageStatus(name, False, "never run (no record)", key)
    if rec.get("key") != key:
        return StageStatus(name, False, "code, params or inputs changed", key)
    now, then = _outputs(s, params, Path(rec["path"]) if rec.get("path") else None), rec.get("outputs", {})
    changed = [p for p in sorted({*now, *then}) if now.get(p) != then.get(p)]
    if changed:
        return StageStatus(name, False, f"output {changed[0]} changed or missing", key)
    return StageStatus(name, True, "current", key)


def _compute(s: StageDef) -> Callable[[Params], Path]:
    module, fn = s.compute.split(":")
    return getattr(importlib.import_module(module), fn)


def run(name: str, params: Params, *, deps: bool | str = "missing") -> StageResult:
    """Bring stage ``name`` up to date and return ``(path, key, hit)``. ``deps``: ``True`` first brings every
    upstream stage up to date (in :func:`plan` order); ``"missing"`` (default) runs only the producers of
    inputs that do not exist yet (recursively); ``False`` runs nothing else and fails on a missing input
    (DVC and the flow order the stages themselves)."""
    if deps is True:
        for up in plan([name], params)[:-1]:
            run(up, params, deps=False)
    elif deps == "missing" and not get(name).partial:
        for t in get(name).bound_inputs(params):
            if fingerprint(_input_path(t, params)) is None:
                run(producer(t), params, deps="missing")
    from grounding.shard_parts import in_part

    s = get(name)
    st = status(name, params)
    missing = st.missing
    if missing:
        up = producer(missing[0])
        what = "prepared dataset" if up == "prepare" else "shard set" if not Path(missing[0]).suffix else "output"
        raise FileNotFoundError(f"needs the {what} of {up} at {_input_path(missing[0], params)}: run "
                                f"`grounding run {up}` first")
    if st.current:
        rec = read_record(s, params) or {}
        log.info("%s: up to date at %s (key %s)", name, rec["path"], st.key[:12])  # type: ignore[index]
        return StageResult(Path(rec["path"]), st.key, True)  # type: ignore[arg-type]
    out = Path(_compute(s)(params))
    from grounding import distributed as D

    # a fan-out part writes some shards only; the commit run records the stage; under torchrun rank 0 alone
    if not in_part() and D.is_main():
        _write_record(s, params, st.key, out)  # type: ignore[arg-type]
    return StageResult(out, st.key, False)  # type: ignore[arg-type]


def _write_record(s: StageDef, params: Params, key: str, out: Path) -> None:
    key_now, _ = stage_key(s.name, params)  # inputs changed while computing: record nothing (stays stale)
    if key_now != key:
        log.warning("%s: its inputs changed while it ran; not recorded as current", s.name)
        return
    rec = {"stage": s.name, "key": key, "path": str(out), "outputs": _outputs(s, params, out)}
    path = record_path(s, params)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(rec, sort_keys=True, indent=1) + "\n").encode("utf-8"))
