"""Pydantic models of ``params.yaml``: one section per concern, unknown keys refused, clear errors.

``load(path, overrides=["dataset.synthetic.n_images=40"])`` reads the file, applies ``--set`` style
overrides (values parsed as YAML) and validates the result the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

DATASET_FORMATS = ("synthetic", "refcoco", "refcoco+", "refcocog", "referit", "simrec", "transvg", "flickr30k")


class ConfigError(ValueError):
    """Bad parameters: the message names the key and the problem."""


def _has_bool(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, list) and any(isinstance(x, bool) for x in v))


def _wants_number(annotation: Any) -> bool:
    """Whether a field's type is a number (``int``, ``float``, a ``Literal`` of numbers), optionally in a
    union with None or as a list's items, and not a boolean."""
    args = get_args(annotation)
    origin = get_origin(annotation)
    if annotation in (int, float):
        return True
    if origin is Literal:
        return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if origin in (Union, UnionType, list):
        return any(_wants_number(a) for a in args if a is not type(None)) and bool not in args
    return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """``true``/``false`` is never a number (pydantic would read ``rows_per_shard: true`` as 1)."""
        if info.field_name is not None and _has_bool(v) and _wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"a boolean ({v!r}) is not a number; write the number")
        return v


class DatasetParams(_Section):
    """Which dataset to prepare. ``synthetic`` is the embedded default; the others read user files.

    ``root``/``image_root`` are paths to local files (annotation root and image directory); ``options``
    are passed to the reader (e.g. ``dataset: unc``, ``split_by: unc``, ``box_format: xywh``).
    """

    name: str = "synthetic"
    format: Literal[DATASET_FORMATS] = "synthetic"  # type: ignore[valid-type]
    root: str | None = None
    image_root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    on_error: Literal["fail", "skip"] = "fail"
    synthetic: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_is_a_dir_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"dataset name {v!r} must be a plain directory name")
        return v


class ShardParams(_Section):
    """Shard layout: rows per shard file (the unit of atomic writes and of resume); ``reuse_from``: names of
    other datasets whose committed sets of the same stage may donate shards with the same content address
    (incremental extension into a new dataset name; growing a dataset in place needs nothing); ``wait``: when
    another writer holds a stage's output directory, wait for it instead of failing at once (``--wait``)."""

    rows_per_shard: int = Field(1024, ge=1)
    reuse_from: list[str] = Field(default_factory=list)
    wait: bool = False  # another writer holds the output directory: wait for it (true) or fail at once naming it


class PathParams(_Section):
    """Where stage outputs go (relative to the working directory)."""

    prepared: str = "data/prepared"
    teachers: str = "data/teachers"
    students: str = "data/students"
    metrics: str = "data/metrics"
    models: str = "models"


# ---- teachers (each section is owned by the module that implements the teacher) ----------------------
class BootstrapParams(_Section):
    """Tiny-teacher training on the synthetic train split (used only when ``weights`` is null)."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    input_size: int | None = Field(None, ge=32)  # training canvas; null = the teacher's input_size


class YoloBootstrapParams(BootstrapParams):
    """Bootstrap of the scaled YOLOv3. ``backend: darknet`` (the default): this project's loop and loss
    (:mod:`grounding.teachers.detectors.darknet_train`) on ``crop``-pixel windows of the canvases;
    ``backend: ultralytics``: ultralytics' trainer with mosaic (README: 40 epochs, batch 16, no crop)."""

    epochs: int = Field(6, ge=1)
    batch_size: int = Field(8, ge=1)
    input_size: int | None = Field(416, ge=32)
    # training labels: the shape class, or colour x shape ("red circle": 80 classes), an attribute-aware
    # detector whose stride-32 features must keep the colour most synthetic sentences name
    labels: Literal["shape", "colour-shape"] = "shape"
    # darknet backend only: side of the random window (multiple of 32) cut from each input_size canvas per
    # step (objects keep their scale, the step costs (crop / input_size)^2); null: the whole canvas
    crop: int | None = Field(224, ge=32)

    @field_validator("crop")
    @classmethod
    def _crop_multiple_of_32(cls, v: int | None) -> int | None:
        return None if v is None else _check_input_size(v)


def _check_input_size(v: int) -> int:
    if v % 32:
        raise ValueError(f"input_size must be a multiple of 32 (the largest stride), got {v}")
    return v


class DetectorParams(_Section):
    """A detector teacher (``teachers.frcnn``, ``teachers.fcos``).

    ``arch``: a torchvision builder name (``fasterrcnn_resnet50_fpn``, ``fcos_resnet50_fpn``, ...) or
    ``tiny`` (the small architecture the bootstrap trains); for ``backend: mmdet`` an mmdet config name.
    ``weights``: a local weights file (never downloaded); null trains a tiny teacher on the synthetic
    train split (``bootstrap``). ``classes``: detector class names (null: from the weights file, the
    torchvision COCO list for 91-class COCO archs, or the dataset). Images are letterboxed into an
    ``input_size`` square (mean padding) before the model; boxes are stored in original pixels.
    """

    backend: Literal["torchvision", "mmdet"] = "torchvision"
    arch: str = "tiny"
    weights: str | None = None
    classes: list[str] | None = None
    input_size: int = Field(320, ge=32)
    batch_size: int = Field(4, ge=1)
    num_workers: int = Field(1, ge=0)
    max_detections: int = Field(100, ge=1)  # Faster R-CNN: detections kept per image
    score_thresh: float = Field(0.0, ge=0, lt=1)
    nms_thresh: float = Field(0.5, gt=0, le=1)
    class_probs: Literal["dense", "topk"] = "dense"  # Faster R-CNN p(z|x): dense (K, C+1) or top-k + residual
    class_probs_k: int = Field(32, ge=1)  # top-k: probabilities kept per region (grounding/class_probs.py)
    bootstrap: BootstrapParams = BootstrapParams()

    @field_validator("input_size")
    @classmethod
    def _input_size_multiple_of_32(cls, v: int) -> int:
        return _check_input_size(v)

    @field_validator("backend")
    @classmethod
    def _backend_installed(cls, v: str) -> str:
        if v == "mmdet":
            import importlib.util

            if not all(importlib.util.find_spec(m) for m in ("mmdet", "mmcv", "mmengine")) or \
                    importlib.util.find_spec("mmcv._ext") is None:
                raise ValueError("mmdet backend needs mmdet+mmcv with ops; see README for `make mmdet` "
                                 "(mmdet, mmengine or mmcv's compiled ops are not importable here)")
        return v


class FcosParams(DetectorParams):
    """The FCOS teacher (``teachers.fcos``): as :class:`DetectorParams`, with a 512 canvas by default so the
    P5 (stride-32) grid, the only level PBREC reads, has 16x16 points."""

    input_size: int = Field(512, ge=32)


class YoloParams(_Section):
    """The YOLOv3 anchor teacher (``teachers.yolo``).

    ``backend: darknet``: SimREC's / RefCLIP's YOLOv3 (DarkNet-53, SPP, three anchor-guided heads;
    :mod:`grounding.teachers.detectors.darknet`) on SimREC's input (int-size cv2 resize, grey 127, ImageNet
    mean/std); ``weights`` a public-layout state dict (``yolov3_coco.pth``, ``yolov3_vg.pth``) whose width and
    class count are read from its shapes; ``width_multiple`` only sizes the bootstrapped network (``config``,
    ``depth_multiple`` and ``pad_value`` are ultralytics-only). ``backend: ultralytics``:

    ``config``: a model yaml shipped with grounding (``yolov3-p5.yaml``: YOLOv3 detecting on the stride-32
    level only, the default for the bootstrap), with ultralytics (``yolov3.yaml`` for real YOLOv3 weights)
    or a local file, scaled by ``depth_multiple``/``width_multiple`` when given (null: as the yaml says). ``weights``: a
    local state-dict file (null: bootstrap a tiny teacher). Images are letterboxed to ``input_size``
    (416 gives RefCLIP's 13x13 stride-32 grid) with grey ``pad_value`` padding as ultralytics does;
    the top ``keep_ratio`` of stride-32 cells by confidence are kept.
    """

    backend: Literal["darknet", "ultralytics"] = "darknet"
    config: str = "yolov3-p5.yaml"
    depth_multiple: float | None = Field(0.33, gt=0)
    width_multiple: float | None = Field(0.125, gt=0)
    weights: str | None = None
    classes: list[str] | None = None
    input_size: int = Field(416, ge=32)
    pad_value: int = Field(114, ge=0, le=255)
    keep_ratio: float = Field(0.1, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(1, ge=0)
    bootstrap: YoloBootstrapParams = YoloBootstrapParams()

    @field_validator("input_size")
    @classmethod
    def _input_size_multiple_of_32(cls, v: int) -> int:
        return _check_input_size(v)

    @model_validator(mode="after")
    def _darknet_width(self) -> "YoloParams":
        if self.backend == "darknet" and not self.weights:
            w = self.width_multiple
            if w is None or abs(32 * w - round(32 * w)) > 1e-6 or round(32 * w) < 1:
                raise ValueError(f"teachers.yolo.width_multiple: {w} cannot size the bootstrapped darknet; "
                                 "32 x width_multiple must be a positive integer (e.g. 0.125, 0.25, 1.0)")
        return self


class ClipBootstrapParams(_Section):
    """Contrastive training of the tiny CLIP on the dataset's ``split`` (used only when ``pretrained`` is
    null): ``steps`` AdamW steps, each on ``batch_size`` (image, sentence) pairs plus as many (GT-box
    crop, phrase) pairs, and (weight ``class_weight``) the crops against captions of their category
    names; one-cycle learning-rate schedule peaking at ``lr``; ``threads`` torch threads."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    split: str = "train"
    threads: int | None = Field(1, ge=1)  # torch threads while training; 1: same bytes on any machine
    class_weight: float = Field(0.25, ge=0)  # weight of the crop vs class-name term (0: off)


class ClipParams(_Section):
    """The CLIP teacher (``teachers.clip``, open_clip).

    ``model``: an open_clip architecture name (``ViT-B-32``) or one shipped with grounding
    (``grounding-tiny-clip``); ``model_config``: instead, a local open_clip model-config JSON file.
    ``pretrained``: a local weights file (never a hub tag; nothing is downloaded); null trains the tiny
    CLIP on the dataset (``bootstrap``). ``preprocess``: overrides of open_clip's preprocessing fields
    (``resize_mode``, ``interpolation``, ...; null = the model's own). ``prompts``: templates for class
    names. ``crops_from``: the stage whose ragged ``boxes`` are cropped (a detector stage, the default ``frcnn-proposals``
    that BiCM scores, or ``gt-boxes`` for oracle crops).
    ``classes_from``: the stage whose manifest ``extra.classes`` lists the detector classes.
    ``qam_threshold``: BiCM's Thr_a on the min-max normalised, upsampled query attention map.
    ``device``/``batch_size``/``num_workers`` change speed, not outputs (beyond float rounding).
    """

    model: str = "grounding-tiny-clip"
    model_config_file: str | None = Field(None, alias="model_config")
    pretrained: str | None = None
    preprocess: dict[str, Any] | None = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(1, ge=0)
    prompts: list[str] = Field(default_factory=lambda: ["a photo of a {}"])
    crops_from: str = "frcnn-proposals"
    classes_from: str = "gt-boxes"
    max_crops_per_image: int = Field(100, ge=1)
    qam_threshold: float = Field(0.7, ge=0, lt=1)
    eval_split: str = "val"
    bootstrap: ClipBootstrapParams = ClipBootstrapParams()

    @field_validator("prompts")
    @classmethod
    def _prompts_have_slot(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("prompts must list at least one template")
        for t in v:
            if t.count("{}") != 1:
                raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}'")
        return v


class WordnetParams(_Section):
    """WordNet soft labels (``teachers.wordnet``; see grounding/teachers/wordnet.py).

    ``tagger``: head-noun path, ``auto`` (NLTK's POS tagger when its data is installed, else the WordNet
    fallback) | ``nltk`` | ``fallback``. Class vocabulary: ``classes`` (a list), else the manifest
    ``extra.classes`` of the stage named by ``classes_from`` (a detector stage), else the synthetic world's
    classes. ``class_senses``: which WordNet senses of a class name count (``concrete`` | ``first`` |
    ``all``); ``class_synsets`` pins them per class (``{mouse: [mouse.n.04]}``)."""

    tagger: Literal["auto", "nltk", "fallback"] = "auto"
    classes: list[str] | None = None
    classes_from: str | None = None
    class_senses: Literal["concrete", "first", "all"] = "concrete"
    class_synsets: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _classes_nonempty_unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v or any(not isinstance(c, str) or not c.strip() for c in v):
                raise ValueError("classes must be a non-empty list of non-empty names")
            if len(set(v)) != len(v):
                raise ValueError(f"classes has duplicates: {sorted({c for c in v if v.count(c) > 1})}")
        return v


class TeachersParams(_Section):
    """One section per teacher."""

    frcnn: DetectorParams = DetectorParams()
    fcos: FcosParams = FcosParams()
    yolo: YoloParams = YoloParams()
    clip: ClipParams = ClipParams()
    wordnet: WordnetParams = WordnetParams()


class RefclipParams(_Section):
    """RefCLIP (SEEDS 003) trained on the cached ``anchors_from`` shard set. The defaults are the public
    config (kingthreestones/RefCLIP ``config/refcoco.yaml``): 25 epochs, batch 64, Adam (0.9, 0.98) eps 1e-9
    lr 1e-4 with a 3-epoch linear warm-up from ``warmup_lr`` then cosine to ``min_lr`` per step ('wcosine'),
    gradient clip 0.15, EMA 0.9997, max 15 tokens, GloVe 300-d frozen, hidden 512, 3 self-attention layers
    (8 heads, FF 2048), dropout 0.1, a GRU (their ``LANG_ENC: lstm`` is a GRU).

    ``features``: ``multiscale`` (RefCLIP's Net on a darknet cache) or ``p5-cells`` (the earlier projection of
    the ultralytics cache's stride-32 feature). ``loss``: ``published`` (the public ``getContrast``) or
    ``eq4`` (Eq. 4 with batch items of the same image excluded from the negatives, ``n_neg``/``temperature``).
    ``checkpoint``: a trained public RefCLIP checkpoint (``det_best.pth``) used by ``refclip-pseudo``
    instead of ``refclip-train``'s model; ``vocab_from``: the RefCLIP annotation JSON it was trained with
    (its vocabulary is rebuilt from it)."""

    anchors_from: str = "yolo-anchors"
    features: Literal["p5-cells", "multiscale"] = "multiscale"
    loss: Literal["published", "eq4"] = "published"
    epochs: int = Field(25, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-9, gt=0)
    scheduler: Literal["wcosine", "constant"] = "wcosine"
    warmup_epochs: float = Field(3, ge=0)
    warmup_lr: float = Field(1e-7, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    grad_clip: float = Field(0.15, ge=0)  # 0: no clipping
    ema_decay: float = Field(0.9997, ge=0, lt=1)  # 0: no EMA; the saved model is the EMA one
    n_neg: int = Field(2, ge=1)  # eq4 only
    temperature: float = Field(1.0, gt=0)  # eq4 only
    max_len: int = Field(15, ge=1)
    word_dim: int = Field(300, ge=1)
    hidden: int = Field(512, ge=8)
    n_self_attention: int = Field(3, ge=0)
    heads: int = Field(8, ge=1)
    ff_size: int = Field(2048, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    rnn: Literal["gru", "lstm"] = "gru"
    fusion_hidden: int | None = Field(None, ge=2)  # multiscale: null = the cached C32 (1024 at full width)
    visual_mlp: Literal[1, 2] = 1  # p5-cells only
    word_vectors: str | None = None  # a local GloVe .txt or spaCy vectors dir (frozen); null: learned
    checkpoint: str | None = None  # a public RefCLIP checkpoint for refclip-pseudo (no retraining)
    vocab_from: str | None = None  # with checkpoint: the RefCLIP annotation JSON its vocabulary came from
    # refclip-export (issue 21; grounding/refclip/export.py): which loader reads the files, whose naming rules
    # (refcoco: COCO_train2014_%012d.jpg, referit: %d.jpg) they follow, and TransVG's dataset name
    # (null: unc/unc+/gref/gref_umd from the source for refcoco, referit for referit)
    export_format: Literal["simrec", "refclip", "transvg"] = "simrec"
    export_layout: Literal["refcoco", "referit"] = "refcoco"
    transvg_dataset: Literal["unc", "unc+", "gref", "gref_umd", "referit", "flickr"] | None = None

    @model_validator(mode="after")
    def _heads_divide(self) -> "RefclipParams":
        if self.hidden % self.heads:
            raise ValueError(f"refclip.hidden ({self.hidden}) must be a multiple of refclip.heads ({self.heads})")
        return self


class TrunkParams(_Section):
    """The TransVG-style REC trunk shared by the REC students (grounding/students/rec.py) and its training.

    Backbone: torchvision ResNet of ``depth`` (10 = one block per stage; 18/34/50 as torchvision), from a
    local state-dict file ``backbone_weights`` or random init (nothing is downloaded), cut at
    ``visual_stride`` (32: after ``layer4`` as TransVG; 16: after ``layer3``). Text: ``transformer``
    or ``gru`` over open_clip's BPE token ids, or ``bert`` from a local ``bert_path`` (needs
    ``transformers``; its weights train at ``lr_bert`` in their own param group). ``visual_layers``: TransVG's
    visual transformer (DETR encoder, 6 layers) on the projected ResNet tokens before fusion. Query length:
    ``max_len`` when set, else ``max_len_refcocog`` on RefCOCOg (40: TransVG, PBREC) and ``max_len_default``
    elsewhere (TransVG 20, PBREC 30). Box loss (``box_l1``): ``l1`` = TransVG (L1 on the normalised
    cx, cy, w, h summed over coordinates) + ``giou_weight`` GIoU; ``smooth_l1`` the same with SmoothL1
    (EpmVG eq. 8); ``smooth_l1_mean`` the first version here (mean SmoothL1 over xyxy). Images are
    letterboxed into ``input_size`` squares (mean padding), decoded as the teachers decode them. A step takes
    ``batch_images`` images with all their training sentences; AdamW (``lr_backbone`` for the ResNet,
    ``lr`` for the rest); ``lr_schedule``: ``step`` (times ``lr_gamma`` at each epoch in ``lr_drop``) or
    ``cosine`` (to 0 over ``epochs``, per epoch). ``threads``: torch threads while training (fixed so CPU
    runs give the same numbers on any machine).
    """

    input_size: int = Field(640, ge=32)
    depth: Literal[10, 18, 34, 50] = 18
    width: float = Field(1.0, gt=0, le=1)  # multiplier on the ResNet stage widths (1: torchvision's)
    visual_stride: Literal[16, 32] = 32  # 32: up to layer4 (TransVG); 16: up to layer3 (a 2x finer token grid)
    backbone_weights: str | None = None
    text_encoder: Literal["transformer", "gru", "bert"] = "transformer"
    bert_path: str | None = None
    max_len: int | None = Field(None, ge=2)  # null: the papers' rule (max_len_refcocog / max_len_default)
    max_len_default: int = Field(20, ge=2)
    max_len_refcocog: int = Field(40, ge=2)
    d_model: int = Field(256, ge=8)
    text_layers: int = Field(2, ge=1)
    visual_layers: int = Field(6, ge=0)  # TransVG: 6 (DETR encoder)
    fusion_layers: int = Field(6, ge=1)
    heads: int = Field(8, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(90, ge=1)
    batch_images: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_backbone: float = Field(1e-5, ge=0)
    lr_bert: float = Field(1e-5, ge=0)  # text_encoder: bert only (TransVG / EpmVG 1e-5, PBREC 1e-6)
    weight_decay: float = Field(1e-4, ge=0)
    lr_schedule: Literal["step", "cosine"] = "step"
    lr_drop: list[int] = Field(default_factory=lambda: [60])
    lr_gamma: float = Field(0.1, gt=0, le=1)
    box_l1: Literal["l1", "smooth_l1", "smooth_l1_mean"] = "l1"
    random_resize: list[int] = Field(default_factory=list)  # canvas sizes drawn per step (empty: off)
    seeds: list[int] = Field(default_factory=lambda: [0])  # one training per seed; metrics: mean and each
    threads: int | None = Field(1, ge=1)

    @field_validator("input_size")
    @classmethod
    def _input_size_multiple_of_32(cls, v: int) -> int:
        return _check_input_size(v)

    @field_validator("random_resize")
    @classmethod
    def _sizes_multiple_of_32(cls, v: list[int]) -> list[int]:
        for s in v:
            _check_input_size(s)
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds_nonempty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds must list at least one seed")
        return v


class RecPseudoParams(TrunkParams):
    """``student-rec-pseudo``: the trunk trained on RefCLIP pseudo-boxes of ``pseudo_from`` (never GT) with
    random-resize augmentation and an EMA copy (``ema_decay``; ``ema_warmup``: decay min(d, (1+n)/(10+n))
    over the first updates, as timm's ModelEma, so short runs do not average in the random init).
    Loss: TransVG's L1 (``box_l1``) + ``giou_weight`` * GIoU."""

    pseudo_from: str = "refclip-pseudo"
    pseudo_split: str = "train"
    ema_decay: float = Field(0.9997, gt=0, lt=1)
    ema_warmup: bool = True
    giou_weight: float = Field(1.0, ge=0)
    random_resize: list[int] = Field(default_factory=lambda: [448, 480, 512, 544, 576, 608, 640])


class EpmvgParams(TrunkParams):
    """``student-epmvg`` (EpmVG): GT boxes plus distillation from the cached CLIP image and text embeddings
    (``image_from``/``text_from`` shard sets) at the beginning positions of the fusion transformer's output
    (p'_v, p'_l; the CLIP features average-pooled to ``d_model``):
    L = SmoothL1 (``box_l1``) + giou_weight GIoU + alpha cos_v + beta cos_l.
    ``distill: false`` trains the plain student; ``baseline: true`` also trains it beside the distilled one
    (same seeds) and reports it under ``baselines``."""

    distill: bool = True
    baseline: bool = True
    image_from: str = "clip-image"
    text_from: str = "clip-text"
    train_split: str = "train"
    giou_weight: float = Field(1.0, ge=0)
    alpha: float = Field(1.5, ge=0)
    beta: float = Field(2.0, ge=0)
    box_l1: Literal["l1", "smooth_l1", "smooth_l1_mean"] = "smooth_l1"  # EpmVG eq. 8


class PbrecParams(TrunkParams):
    """``student-pbrec`` (PBREC): a point head on the trunk's fused visual tokens, trained with BCE on
    center-ness (FCOS formula, inside a 3g square around the GT box centre) and mass-ness (mask fraction of
    the g x g cell, within 2g of the mask centroid) soft targets at the cached FCOS P5 points
    (``points_from``), read one to one: the student's token grid (``input_size / visual_stride``) must be the
    P5 grid, token k scoring point k, its sine position at the point's own coordinate (the cell corner, as
    torchvision's FCOS anchor points); inference: the ``top_k`` points by score, then IoU voting.
    Training as the paper: 15 epochs AdamW, cosine schedule, lr 1e-4, the BERT at 1e-6 (a from-scratch
    text encoder trains at ``lr``); queries 30 / 40. ``head_prior``: the point head's output bias starts at
    ``logit(head_prior)`` (FCOS / RetinaNet prior init; the paper does not say), so the first steps do not go
    into pulling every point from sigmoid 0.5 down to the ~1 % positive rate of the soft targets."""

    points_from: str = "fcos-points"
    train_split: str = "train"
    centerness_weight: float = Field(1.0, ge=0)
    massness_weight: float = Field(1.0, ge=0)
    score: Literal["centerness", "massness", "product"] = "centerness"
    top_k: int = Field(12, ge=1)
    epochs: int = Field(15, ge=1)
    lr_schedule: Literal["step", "cosine"] = "cosine"
    lr_backbone: float = Field(1e-6, ge=0)  # the paper's, for an ImageNet ResNet (random init needs more)
    lr_bert: float = Field(1e-6, ge=0)
    max_len_default: int = Field(30, ge=2)
    head_prior: float | None = Field(0.01, gt=0, lt=1)  # point logits start at sigmoid = this; null: torch init


class NceDistillParams(_Section):
    """NCE+Distill (SEEDS 002) on cached ``proposals_from`` regions and ``labels_from`` WordNet soft labels.

    Paper values (§4.1): region features standardised with the training images' statistics
    (``standardise``), two FC layers per branch into a 512-d joint space, a 2-layer LSTM with 300-d words
    and hidden state, max-pooled over the tokens, GloVe vectors (fixed) from a local ``glove_path`` file when
    given (else word vectors trained from random: nothing is downloaded), Adam lr 1e-4, τ = 0.5 for L_IS and
    L_RP (L_RP summed over a caption's phrases), 31 in-batch negative images (batch 32),
    λ = min(floor(step / lambda_step), lambda_max) with lambda_step = 200, lambda_max 1 (VG detector) or 3
    (other detectors, as the bootstrapped one here); the default ``steps`` let λ reach lambda_max.
    ``geometry`` appends the box's relative xyxy and area to the cached RoI feature (our departure: the
    synthetic phrases name positions). ``threads``: torch threads while training (1: same bytes anywhere)."""

    proposals_from: str = "frcnn-proposals"
    labels_from: str = "wordnet-labels"
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-4, gt=0)
    embed_dim: int = Field(512, ge=8)
    word_dim: int = Field(300, ge=1)
    hidden: int = Field(300, ge=8)
    lstm_layers: int = Field(2, ge=1)
    glove_path: str | None = None
    standardise: bool = True
    max_len: int = Field(20, ge=1)
    temperature: float = Field(0.5, gt=0)
    lambda_step: int = Field(200, ge=1)
    lambda_max: float = Field(3.0, ge=0)
    geometry: bool = True
    no_distill: bool = True  # also train and report the λ = 0 variant
    train_split: str = "train"
    threads: int | None = Field(1, ge=1)


class BicmParams(_Section):
    """BiCM (SEEDS 001) scored from cached CLIP crops/classes/text/image embeddings, QAM maps and boxes,
    and ``proposals_from`` boxes. S_BU = S_PQ + S_CQ; S = S_BU + lambda_t * S_TD (+ lambda_k * S_KAM).

    ``td_scale`` multiplies the mean of the cached min-max-normalised QAM map inside a box: the paper's
    lambda_t = 1000 was set for raw att*ReLU(grad) maps, about 1e-3 of a [0, 1] map ("similar orders of
    magnitude"), so the default keeps lambda_t * td_scale * S_TD in [0, 1]. KAM: each ``kam_split`` image
    paired with its most CLIP-similar query over every ``kam_split`` query (``kam_pairing: all_queries``, the
    paper's unpaired setting; ``own_sentences``: only the image's own sentences, a GT pairing), pseudo-label
    where the fused score > ``thr_k`` (COM only for a query of another image: no cached QAM map for it); MLP (3 FC + BN +
    ReLU, sigmoid), Adam ``kam_lr``, ``kam_epochs``; regions with IoU >= ``kam_pos_iou`` with the pseudo
    box are positives. ``select``: the final box, ``largest_above_mean`` (the paper's rule) or ``argmax``."""

    proposals_from: str = "frcnn-proposals"
    lambda_t: float = Field(1000.0, ge=0)
    td_scale: float = Field(1e-3, gt=0)
    thr_k: float = 0.9
    lambda_k: float = Field(1.0, ge=0)
    kam_split: str = "train"
    kam_pairing: Literal["all_queries", "own_sentences"] = "all_queries"
    kam_epochs: int = Field(50, ge=1)
    kam_lr: float = Field(1e-4, gt=0)
    kam_batch_size: int = Field(1024, ge=2)
    kam_hidden: int = Field(512, ge=4)
    kam_pos_iou: float = Field(0.5, gt=0, le=1)
    select: Literal["largest_above_mean", "argmax"] = "largest_above_mean"
    threads: int | None = Field(1, ge=1)


class TrainParams(_Section):
    """Settings of every training stage (the students and ``refclip-train``). ``precision``: ``fp32``, or
    ``bf16`` / ``fp16`` autocast on CUDA (fp16 with a ``torch.amp.GradScaler``); CPU training stays fp32
    (a log line says so). It changes results, so a non-fp32 value enters the stage keys (fp32 leaves them
    as they were). The process count of ``grounding run --nproc N`` is not a param: N processes train on
    the same global batches as one (see grounding/distributed.py)."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    def key_params(self) -> dict[str, str]:
        """What enters a training stage's key: ``{}`` for fp32, else ``{"precision": ...}``."""
        return {} if self.precision == "fp32" else {"precision": self.precision}


class StudentsParams(_Section):
    """Students (issues 9 and 10): one sub-section per student stage. Students read teacher shard sets
    only; they never run a teacher model."""

    nce_distill: NceDistillParams = NceDistillParams()
    bicm: BicmParams = BicmParams()

    rec: RecPseudoParams = RecPseudoParams()
    epmvg: EpmvgParams = EpmvgParams()
    pbrec: PbrecParams = PbrecParams()


class Params(_Section):
    """The whole ``params.yaml``."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    progress: bool = True
    dataset: DatasetParams = DatasetParams()
    shards: ShardParams = ShardParams()
    paths: PathParams = PathParams()
    teachers: TeachersParams = TeachersParams()
    refclip: RefclipParams = RefclipParams()
    train: TrainParams = TrainParams()
    students: StudentsParams = StudentsParams()

    def prepared_dir(self) -> Path:
        return Path(self.paths.prepared) / self.dataset.name

    def teacher_dir(self, stage: str) -> Path:
        return Path(self.paths.teachers) / stage / self.dataset.name

    def student_dir(self, stage: str) -> Path:
        return Path(self.paths.students) / stage / self.dataset.name


def _field_type(keys: Sequence[str]) -> Any:
    """The annotation of the param at ``keys`` (``Any`` inside free-form mappings such as
    ``dataset.options``; ``None`` for a key the schema does not have)."""
    node: Any = Params
    for k in keys:
        if isinstance(node, type) and issubclass(node, BaseModel):
            fields = node.model_fields
            f = fields.get(k) or next((f for f in fields.values() if f.alias == k), None)
            if f is None:
                return None
            node = f.annotation
        elif get_origin(node) is dict:
            node = (get_args(node) or (str, Any))[1]
        else:
            return None
    return node


def _string_param(ann: Any) -> tuple[bool, bool]:
    """``(is a string param, may be null)``: ``str``, string ``Literal`` s, and their optional forms."""
    if ann is str:
        return True, False
    if get_origin(ann) is Literal:
        return all(isinstance(a, str) for a in get_args(ann)), False
    if get_origin(ann) in (Union, UnionType):
        members = [a for a in get_args(ann) if a is not type(None)]
        return bool(members) and all(_string_param(a)[0] for a in members), len(members) < len(get_args(ann))
    return False, False


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at column {mark.column + 1}" if mark is not None else problem


def parse_value(keys: Sequence[str], raw: str, assignment: str) -> Any:
    """The value of ``key.path=raw``: YAML, except that a string param takes ``raw`` as the string it is
    (``{iid}.jpg``, ``123``) unless it parses to a string or null, and a free-form option (``dataset.options``)
    takes as a string what is not valid YAML or is a ``{name}`` placeholder (YAML would make it a mapping
    of nulls). Any other value that is not valid YAML is a ConfigError that shows the quoting."""
    ann = _field_type(keys)
    try:
        parsed, error = yaml.safe_load(raw), None
    except yaml.YAMLError as e:
        parsed, error = None, e
    is_str, nullable = _string_param(ann)
    if is_str:
        if error is None and (isinstance(parsed, str) or (parsed is None and nullable and raw.strip())):
            return parsed
        return raw
    free_form = ann is Any or ann is None
    if error is not None:
        if free_form:
            return raw
        path = ".".join(keys)
        if get_origin(ann) in (list, tuple, dict):
            hint = (f"quote the strings inside it, e.g. {path}='[\"a {{}} photo\"]' "
                    "(YAML double quotes in shell single quotes)")
        else:
            hint = f"if it is a string, quote it: {path}='{raw}' (in a shell: \"{path}='{raw}'\")"
        raise ConfigError(f"override {assignment!r}: {raw!r} is not valid YAML ({_yaml_problem(error)}); {hint}")
    if (free_form and isinstance(parsed, dict) and parsed and raw.lstrip().startswith("{")
            and all(v is None for v in parsed.values())):
        return raw
    return parsed


def apply_override(doc: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict in place; ``value`` as :func:`parse_value` reads it."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value")
    path, raw = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {assignment!r} has an empty key")
    node = doc
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = parse_value(keys, raw, assignment)


def from_dict(doc: dict[str, Any], *, source: str = "params") -> Params:
    """Validate a params mapping; errors list every bad key with its dotted path."""
    try:
        return Params.model_validate(doc or {})
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{source}: invalid parameters\n" + "\n".join(lines)) from None


def load(path: str | os.PathLike[str] | None = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read and validate ``params.yaml`` (missing file: all defaults) with ``--set`` overrides."""
    doc: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        with open(path, encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        doc = loaded or {}
    elif path is not None and str(path) != "params.yaml":
        raise ConfigError(f"{path}: params file not found")
    for o in overrides:
        apply_override(doc, o)
    return from_dict(doc, source=str(path) if path is not None else "params")
