"""Stage ``qam``: BiCM's query attention map per sentence and its box, from the frozen CLIP teacher
(the map itself: :mod:`grounding.teachers.qam`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from grounding.codeset import code_version
from grounding.config import Params
from grounding.data.images import ImageError
from grounding.shards import FieldSpec

from grounding.teachers.clip_loading import ImageItems, _common_extra, _dataset, iter_loaded
from grounding.teachers.clip_model import ModelSpec, build_teacher, encode_texts, tokenize

log = logging.getLogger(__name__)


# ---- qam -----------------------------------------------------------------------------------------------
def image_runs(keys: Sequence[str], image_of: Mapping[str, str]) -> list[tuple[str, list[int]]]:
    """Group consecutive ``keys`` (sentence ids) by image: ``[(image_id, [positions in keys])]``."""
    runs: list[tuple[str, list[int]]] = []
    for i, k in enumerate(keys):
        im = image_of[k]
        if runs and runs[-1][0] == im:
            runs[-1][1].append(i)
        else:
            runs.append((im, [i]))
    return runs


def patch_grid(spec: ModelSpec) -> tuple[int, int]:
    """``(rows, cols)`` of a ViT's patch grid from its config; ``ValueError`` for non-ViT image towers."""
    v = spec.model_cfg["vision_cfg"]
    if "timm_model_name" in v or not isinstance(v.get("layers", 12), int):
        raise ValueError(f"QAM needs an open_clip ViT image tower; {spec.name} has "
                         f"{v.get('timm_model_name') or 'a ResNet'}")
    size, patch = v.get("image_size", 224), v.get("patch_size", 16)
    (h, w), (ph, pw) = [(x, x) if isinstance(x, int) else tuple(x) for x in (size, patch)]
    return h // ph, w // pw


def run_qam(params: Params) -> Path:
    """``qam``: BiCM's query attention map per sentence (patch grid, float16, min-max normalised) and its
    box P_t (float32 xyxy original pixels) at ``qam_threshold``; the image is squashed to the model's
    input (see :mod:`grounding.teachers.qam`)."""
    from grounding.stage_writer import write_stage
    from grounding.teachers.qam import check_supported, map_box, qam_from_states, qam_preprocess, trunk

    ds = _dataset(params)
    teacher = build_teacher(params)
    cp = params.teachers.clip
    out = params.teacher_dir("qam")
    refs = {r.ref_id: r for r in ds.refs}
    index = ds.image_index
    gh, gw = patch_grid(teacher.spec)
    pre = qam_preprocess(teacher.spec.preprocess)
    thr = cp.qam_threshold

    def rows(todo: list[str]) -> Iterator[tuple[str, Any]]:
        check_supported(teacher.model.visual)
        if tuple(teacher.model.visual.grid_size) != (gh, gw):
            raise ValueError(f"model grid {teacher.model.visual.grid_size} != config grid {(gh, gw)}")
        dtype = next(teacher.model.parameters()).dtype
        runs = image_runs(todo, {k: refs[k].image_id for k in todo})
        items = ImageItems(ds.image_root, [index[im] for im, _ in runs], pre)
        for batch in iter_loaded(items, batch_size=max(1, cp.batch_size // 4), num_workers=cp.num_workers):
            results: dict[int, Any] = {}
            ok = [b for b in batch if b.tensor is not None]
            for b in batch:
                if b.tensor is None:
                    results.update({p: ImageError(b.error) for p in runs[b.index][1]})
            pairs = [(j, p) for j, b in enumerate(ok) for p in runs[b.index][1]]
            if ok:
                images = torch.stack([b.tensor for b in ok]).to(teacher.device, dtype)
                with torch.no_grad():
                    states = trunk(teacher.model.visual, images)  # blocks before the last: once per image
                tok = tokenize(teacher.tokenizer, [refs[todo[p]].text for _, p in pairs], teacher.spec.context_length)
                text = encode_texts(teacher, tok.tokens)
                for lo in range(0, len(pairs), cp.batch_size):
                    chunk = pairs[lo:lo + cp.batch_size]
                    res = qam_from_states(teacher.model, states, text[lo:lo + len(chunk)],
                                          torch.tensor([j for j, _ in chunk], dtype=torch.long))
                    for c, (j, p) in enumerate(chunk):
                        rec = index[runs[ok[j].index][0]]
                        box, _ = map_box(res.maps[c].numpy(), rec.width, rec.height, thr)
                        results[p] = {"map": res.maps[c].numpy(), "box": box,
                                      "cosine": np.float32(res.cosine[c]), "flat": np.uint8(res.flat[c])}
            for b in batch:
                for p in runs[b.index][1]:
                    yield todo[p], results[p]

    fields = (
        FieldSpec("map", "float16", (gh, gw), meaning="query attention map on the ViT patch grid (rows = image "
                  "top to bottom), att*ReLU(grad) of cos(image, text) w.r.t. the last block's CLS->patch "
                  "attention, mean over heads, min-max normalised to [0, 1]"),
        FieldSpec("box", "float32", (4,), meaning=f"P_t: tight box of the upsampled, renormalised map >= {thr}, "
                  "xyxy original pixels (whole image when flat)"),
        FieldSpec("cosine", "float32", (), meaning="cos(CLIP image, CLIP text) of the squashed image"),
        FieldSpec("flat", "uint8", (), meaning="1 when the map had no positive evidence (all zeros)"),
    )
    return write_stage(params, stage="qam", code=code_version(__name__), level="sentence",
                       fields=fields, item_keys=[r.ref_id for r in ds.refs], rows=rows,
                       stage_params={"threshold": thr, "resize_mode": "squash"},
                       inputs={"dataset": ds.fingerprint()}, teacher=teacher.identity,
                       extra={**_common_extra(params, teacher, ds, out), "grid": [gh, gw],
                              "qam_preprocess": pre}, out_dir=out)
