"""The frozen CLIP teacher (open_clip): the ``clip-*`` stages (model: :mod:`grounding.teachers.clip_model`; image loading: :mod:`grounding.teachers.clip_loading`; ``qam``: :mod:`grounding.teachers.qam_stage`).

Conventions:

* embeddings are L2-normalised and stored as float16 ``(D,)`` rows (``D`` = the model's ``embed_dim``);
* images are decoded only through :func:`grounding.data.images.load_rgb` and preprocessed exactly by the
  model's own open_clip transform (``PreprocessCfg``: size, mean, std, interpolation, resize mode), in
  DataLoader workers that open nothing before they fork;
* boxes (crops, QAM box) are float32 ``xyxy`` in original-image pixels;
* weights are only ever a local file: ``teachers.clip.pretrained`` names it, or, when it is null, the tiny
  CLIP trained by :mod:`grounding.teachers.clip_bootstrap` is used. open_clip is never given a hub tag.

Teacher identity (hashed into every stage key and written into every manifest): library and version,
model name, the full model config, the final preprocessing config, precision and the sha256 of the
weights file actually loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from grounding.codeset import code_version
from grounding.config import Params
from grounding.data.images import ImageError
from grounding.data.schema import CanonicalDataset
from grounding.overlap import overlapped
from grounding.shards import FieldSpec
from grounding.shards.manifest import ShardError
from grounding.teachers.clip_loading import (  # noqa: F401 - re-exported
    CropItems, ImageItems, Loaded, _common_extra, _dataset, crop_box_pixels, embed_loaded_images, iter_loaded,
    upstream)
from grounding.teachers.clip_model import (  # noqa: F401 - re-exported
    CONFIG_DIR, EMBEDDING_MEANING, PACKAGED_PREPROCESS, TINY_MODEL, ClipTeacher, ModelSpec, Tokenized,
    asdict_preprocess, bootstrap_path, build_teacher, class_prompt_embedding, create_model, encode_images,
    encode_texts, load_weights, model_spec, teacher_identity, tokenize, transform_of, weights_path,
    weights_sha256)


log = logging.getLogger(__name__)


# ---- stages --------------------------------------------------------------------------------------------
def run_clip_image(params: Params) -> Path:
    """``clip-image``: one L2-normalised embedding per image (float16, D)."""
    return write_clip_image(params, build_teacher(params), _dataset(params, refs=False))


def write_clip_image(params: Params, teacher: ClipTeacher, ds: CanonicalDataset, out: Path | None = None) -> Path:
    """The body of ``clip-image`` with a built teacher: decode + preprocess in ``num_workers`` DataLoader
    workers, forward in batches of ``batch_size``, stream rows into the shard writer."""
    from grounding.stage_writer import write_stage

    cp = params.teachers.clip
    out = out or params.teacher_dir("clip-image")
    index = ds.image_index

    def rows(todo: list[str]) -> Iterator[tuple[str, Any]]:
        items = ImageItems(ds.image_root, [index[k] for k in todo], teacher.spec.preprocess)
        for batch in iter_loaded(items, batch_size=cp.batch_size, num_workers=cp.num_workers, device=teacher.device):
            emb = embed_loaded_images(teacher, batch)
            for b in batch:
                e = emb[b.index]
                yield todo[b.index], (e if isinstance(e, Exception) else {"embedding": e})

    fields = (FieldSpec("embedding", "float16", (teacher.embed_dim,), meaning=EMBEDDING_MEANING + " of the image"),)
    return write_stage(params, stage="clip-image", code=code_version(__name__), level="image", fields=fields,
                       item_keys=[im.image_id for im in ds.images], rows=lambda todo: overlapped(rows(todo)),
                       stage_params={}, inputs={"dataset": ds.fingerprint()}, teacher=teacher.identity,
                       extra=_common_extra(params, teacher, ds, out), out_dir=out)


def run_clip_text(params: Params) -> Path:
    """``clip-text``: one embedding per sentence, with token count and truncation flag."""
    from grounding.stage_writer import write_stage

    ds = _dataset(params)
    teacher = build_teacher(params)
    cp = params.teachers.clip
    out = params.teacher_dir("clip-text")
    text = {r.ref_id: r.text for r in ds.refs}
    ctx = teacher.spec.context_length

    def rows(todo: list[str]) -> Iterator[tuple[str, Any]]:
        for lo in range(0, len(todo), cp.batch_size):
            keys = todo[lo:lo + cp.batch_size]
            tok = tokenize(teacher.tokenizer, [text[k] for k in keys], ctx)
            emb = encode_texts(teacher, tok.tokens).numpy().astype(np.float16)
            for j, k in enumerate(keys):
                yield k, {"embedding": emb[j], "n_tokens": tok.n_tokens[j], "truncated": np.uint8(tok.truncated[j])}

    fields = (
        FieldSpec("embedding", "float16", (teacher.embed_dim,), meaning=EMBEDDING_MEANING + " of the sentence"),
        FieldSpec("n_tokens", "int32", (), meaning="tokens of the untruncated sentence incl. start/end tokens"),
        FieldSpec("truncated", "uint8", (), meaning=f"1 when the sentence was cut to the context length ({ctx})"),
    )
    return write_stage(params, stage="clip-text", code=code_version(__name__), level="sentence", fields=fields,
                       item_keys=[r.ref_id for r in ds.refs], rows=rows, stage_params={},
                       inputs={"dataset": ds.fingerprint()}, teacher=teacher.identity,
                       extra={**_common_extra(params, teacher, ds, out), "context_length": ctx}, out_dir=out)


def detector_classes(params: Params) -> tuple[list[str], str]:
    """The detector class list (``extra.classes`` of the ``classes_from`` shard set) and that set's key."""
    src = upstream(params, params.teachers.clip.classes_from)
    classes = src.manifest.extra.get("classes")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ShardError(f"{src.path}: manifest has no extra.classes list to embed")
    return list(classes), src.manifest.stage_key


def run_clip_classes(params: Params) -> Path:
    """``clip-classes``: one embedding per detector class name (mean over the prompt templates)."""
    from grounding.stage_writer import write_stage

    ds = _dataset(params)
    teacher = build_teacher(params)
    cp = params.teachers.clip
    out = params.teacher_dir("clip-classes")
    classes, classes_key = detector_classes(params)
    if len(set(classes)) != len(classes):
        raise ShardError(f"detector class list of {cp.classes_from!r} has duplicate names")
    position = {c: i for i, c in enumerate(classes)}

    def rows(todo: list[str]) -> Iterator[tuple[str, Any]]:
        emb = class_prompt_embedding(teacher, todo, cp.prompts).numpy().astype(np.float16)
        for j, k in enumerate(todo):
            yield k, {"embedding": emb[j], "index": np.int32(position[k])}

    fields = (
        FieldSpec("embedding", "float16", (teacher.embed_dim,),
                  meaning=EMBEDDING_MEANING + ": normalised mean of the prompt-template embeddings"),
        FieldSpec("index", "int32", (), meaning="index of the class in the detector's class list"),
    )
    return write_stage(params, stage="clip-classes", code=code_version(__name__), level="class", fields=fields,
                       item_keys=classes, rows=rows,
                       stage_params={"prompts": list(cp.prompts), "classes": classes},
                       inputs={cp.classes_from: classes_key}, teacher=teacher.identity,
                       extra={**_common_extra(params, teacher, ds, out), "classes": classes,
                              "classes_from": cp.classes_from}, out_dir=out)


def run_clip_crops(params: Params) -> Path:
    """``clip-crops``: one embedding per proposal crop (crops in original pixels from the ``crops_from``
    shard set's ragged ``boxes``, at most ``max_crops_per_image``, in the proposals' order)."""
    from grounding.stage_writer import write_stage

    ds = _dataset(params)
    teacher = build_teacher(params)
    cp = params.teachers.clip
    out = params.teacher_dir("clip-crops")
    src = upstream(params, cp.crops_from)
    if "boxes" not in src.fields or not src.fields["boxes"].ragged:
        raise ShardError(f"{src.path}: stage {cp.crops_from!r} has no ragged 'boxes' field to crop")
    index = ds.image_index
    keys = [k for k in src.keys if k in index]
    missing = [k for k in src.keys if k not in index]
    if missing:
        raise ShardError(f"{src.path}: proposals for images not in dataset {ds.name}: {missing[:5]}")
    k_max = cp.max_crops_per_image

    def rows(todo: list[str]) -> Iterator[tuple[str, Any]]:
        boxes = [np.asarray(src.get(k, ["boxes"])["boxes"], np.float32)[:k_max] for k in todo]
        items = CropItems(ds.image_root, [index[k] for k in todo], boxes, teacher.spec.preprocess,
                          teacher.spec.image_size)
        pending: list[Loaded] = []
        n_pending = 0
        loader = iter_loaded(items, batch_size=1, num_workers=cp.num_workers)
        for batch in loader:
            pending.extend(batch)
            n_pending += sum(len(b.tensor) for b in batch if b.tensor is not None)
            if n_pending >= cp.batch_size:
                yield from _emit_crops(teacher, pending, todo, boxes, cp.batch_size)
                pending, n_pending = [], 0
        yield from _emit_crops(teacher, pending, todo, boxes, cp.batch_size)

    d = teacher.embed_dim
    fields = (
        FieldSpec("boxes", "float32", (4,), ragged=True, meaning="cropped proposal boxes, xyxy original pixels"),
        FieldSpec("embedding", "float16", (d,), ragged=True, meaning=EMBEDDING_MEANING + " of each crop"),
        FieldSpec("proposal_index", "int32", (), ragged=True,
                  meaning=f"row of each box within the {cp.crops_from} row of the image"),
    )
    return write_stage(params, stage="clip-crops", code=code_version(__name__), level="region", fields=fields,
                       item_keys=keys, rows=rows,
                       stage_params={"crops_from": cp.crops_from, "max_crops_per_image": k_max},
                       inputs={"dataset": ds.fingerprint(), cp.crops_from: src.manifest.stage_key},
                       teacher=teacher.identity,
                       extra={**_common_extra(params, teacher, ds, out),
                              "classes": src.manifest.extra.get("classes", [])}, out_dir=out)


def _emit_crops(teacher: ClipTeacher, pending: list[Loaded], todo: list[str], boxes: list[np.ndarray],
                batch_size: int) -> Iterator[tuple[str, Any]]:
    """Embed the crops of ``pending`` images in model batches of ``batch_size`` and yield their rows."""
    ok = [b for b in pending if b.tensor is not None and len(b.tensor)]
    flat = torch.cat([b.tensor for b in ok]) if ok else torch.zeros(0)
    parts = [encode_images(teacher, flat[i:i + batch_size]) for i in range(0, len(flat), batch_size)]
    emb = torch.cat(parts).numpy().astype(np.float16) if parts else np.zeros((0, teacher.embed_dim), np.float16)
    at = 0
    for b in pending:
        k = todo[b.index]
        if b.tensor is None:
            yield k, ImageError(b.error)
            continue
        n = len(b.tensor)
        yield k, {"boxes": boxes[b.index][:n], "embedding": emb[at:at + n].reshape(n, teacher.embed_dim),
                  "proposal_index": np.arange(n, dtype=np.int32)}
        at += n
