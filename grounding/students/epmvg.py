"""EpmVG (SEEDS 000): the REC trunk supervised with GT boxes plus distillation from CLIP, read from the
**cached** ``clip-image`` / ``clip-text`` shard sets (no CLIP forward during training).

As the paper (seed 000, eqs. 5-7): the distillation targets the fusion transformer's output at the beginning
positions of the visual and the linguistic tokens (p'_v^1, the [VLS] place, and p'_l^1, the [CLS] / start
token), so the fusion transformer itself gets the signal; the CLIP image / text embeddings (dim D_clip) are
average-pooled (``AdaptiveAvgPool1d``) to the student's width d and pulled to by cosine losses:
L = SmoothL1 (on the normalised cx, cy, w, h, summed) + λ·GIoU + α·(1 − cos_v) + β·(1 − cos_l), λ = 1,
α = 1.5, β = 2. AdamW (wd 1e-4), lr 1e-5 backbone / 1e-4 rest (BERT 1e-5), step drop. ``distill: false``
is the plain student.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grounding import distributed as D
from grounding.students import common as C
from grounding.students import rec_trunk as R

#: ``teacher(batch) -> (image_embedding (B, D), text_embedding (B, D))`` per sentence of the batch
TeacherFn = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def clip_to_width(clip: torch.Tensor, width: int) -> torch.Tensor:
    """CLIP embeddings ``(B, D_clip)`` average-pooled over the feature axis to ``(B, width)`` (EpmVG eqs. 5-6:
    ``AdaptiveAvgPool1d(width)``; D_clip = 4 and width 2 give the means of the halves)."""
    return nn.functional.adaptive_avg_pool1d(clip.float().unsqueeze(1), width).squeeze(1)


def beginning_tokens(out: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused visual and linguistic features at their beginning positions, ``(B, d)`` each: position 0
    of the fusion output's visual tokens (p'_v^1) and of its text tokens (p'_l^1, the start / [CLS] token)."""
    return out["fused_visual"][:, 0], out["fused_text"][:, 0]


def distill_loss(student_v: torch.Tensor, student_t: torch.Tensor, clip_v: torch.Tensor,
                 clip_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distances ``1 - cos`` (mean over the batch) of student vs (pooled) CLIP image and text features."""
    cos_v = 1 - F.cosine_similarity(student_v, clip_v.to(student_v), dim=-1).mean()
    cos_l = 1 - F.cosine_similarity(student_t, clip_t.to(student_t), dim=-1).mean()
    return cos_v, cos_l


def cached_teacher(data: R.RecBatches) -> TeacherFn:
    """Teacher embeddings of a batch read from the shard sets joined in ``data.shards`` (names ``image``
    and ``text``, field ``embedding``)."""

    def fn(batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = data.teacher(batch)
        return t["image"]["embedding"].float(), t["text"]["embedding"].float()

    return fn


def epmvg_loss(data: R.RecBatches, ep: Any, teacher: TeacherFn | None, clip_dim: int | None = None) -> C.LossFn:
    """The step loss of EpmVG (``teacher`` None: the plain box-loss student). ``clip_dim`` is unused (the CLIP
    features are pooled to the student's width); kept for callers."""

    def loss_fn(model: nn.Module, batch: np.ndarray, size: int) -> tuple[torch.Tensor, dict[str, float]]:
        x, index, _ = data.inputs(batch, size)
        b = torch.as_tensor(batch)
        out = model(x, index, data.ids[b], data.pad[b])
        loss, parts = R.box_loss(out["box"], data.targets[b].to(out["box"].device), ep.giou_weight, ep.box_l1)
        if teacher is not None:
            clip_v, clip_t = teacher(batch)
            sv, st = beginning_tokens(out)
            d = sv.shape[-1]
            cos_v, cos_l = distill_loss(sv, st, clip_to_width(clip_v, d), clip_to_width(clip_t, d))
            loss = loss + ep.alpha * cos_v + ep.beta * cos_l
            parts |= {"cos_v": float(cos_v.detach()), "cos_l": float(cos_l.detach())}
        return loss, parts

    return loss_fn


def epmvg_data(params: Any, ds: Any, stage: str = "student-epmvg") -> tuple[R.RecBatches, R.Tokenizer, dict[str, Any]]:
    """Training data of the train split: GT targets, and the CLIP image/text shard sets joined per sentence
    (checked with :func:`common.require_rows` first). Returns the data, tokenizer and the opened sets."""
    from grounding.shards.torch import ShardDataset

    ep = params.students.epmvg
    train = [r for r in C.split_refs(ds, ep.train_split) if r.box is not None]
    if not train:
        raise ValueError(f"{stage}: dataset {ds.name} has no {ep.train_split!r} sentences with GT boxes")
    keys = [r.ref_id for r in train]
    images = C.teacher_set(params, ep.image_from, sorted({r.image_id for r in train}), ds, stage)
    texts = C.teacher_set(params, ep.text_from, keys, ds, stage)
    shards = ShardDataset({"text": texts, "image": images}, keys=keys,
                          key_maps={"image": {r.ref_id: r.image_id for r in train}},
                          fields={"text": ["embedding"], "image": ["embedding"]})
    cfg = R.RecConfig.from_params(ep, ds)
    tok = R.Tokenizer(cfg)
    data = R.RecBatches(ds, train, C.Canvases(ds, ep.input_size), tok,
                        targets=np.array([r.box for r in train], np.float32), shards=shards)
    return data, tok, {"image": images, "text": texts}


def train_epmvg(data: R.RecBatches, ep: Any, seed: int, distill: bool, clip_dim: int, *,
                teacher: TeacherFn | None = None, progress: bool = False) -> tuple[R.RecStudent, list[dict[str, float]]]:
    """Train one EpmVG student (``distill``: with the cached teacher unless ``teacher`` is given)."""
    from grounding.runtime import seed_everything

    gen = seed_everything(seed)
    model = R.RecStudent(data.tokenizer.cfg)
    t = (teacher or cached_teacher(data)) if distill else None
    curve = C.fit(model, lambda g: C.image_batches(data.image_of, ep.batch_images, g),
                  epmvg_loss(data, ep, t, clip_dim), ep, generator=gen, progress=progress,
                  desc=f"student-epmvg{'' if distill else ' (no distill)'}", group_of=data.image_of)
    return model, curve


def run_student_epmvg(params: Any) -> Path:
    """Stage ``student-epmvg``: the distilled student (``distill``) and, with ``baseline``, the plain one,
    each per seed; weights (first seed of the main variant), predictions, metrics and curves."""
    from grounding.data.schema import CanonicalDataset
    from grounding.shards import file_sha256

    stage, ep = "student-epmvg", params.students.epmvg
    ds = CanonicalDataset.load(params.prepared_dir())
    data, tok, sets = epmvg_data(params, ds, stage)
    inputs = {"clip_image": sets["image"].manifest.stage_key, "clip_text": sets["text"].manifest.stage_key}
    sp = ep.model_dump(mode="json") | {"seed": params.seed} | params.train.key_params()
    clip_dim = sets["text"].fields["embedding"].shape[0]
    variants = [ep.distill] + ([not ep.distill] if ep.baseline else [])
    every = R.RecBatches(ds, ds.refs, C.Canvases(ds, ep.input_size), tok)
    results: dict[bool, list[dict[str, float]]] = {}
    curves, first = [], None
    with C.torch_threads(ep.threads), C.training(params):
        for distill in variants:
            for seed in ep.seeds:
                model, curve = train_epmvg(data, ep, seed, distill, clip_dim, progress=params.progress)
                if not D.is_main():
                    continue  # every rank trains (torchrun); rank 0 alone evaluates and writes
                pred = R.predict_boxes(model, every)
                acc, n = C.acc_per_split(pred, ds)
                results.setdefault(distill, []).append(acc)
                curves += [{**row, "seed": seed, "distill": distill} for row in curve]
                if first is None:
                    first = (model, pred)
    if not D.is_main():
        return params.student_dir(stage)
    model, pred = first
    mpath = C.model_path(params, stage)
    R.save_checkpoint(mpath, {"state_dict": model}, R.RecConfig.from_params(ep, ds),
                      {"seed": ep.seeds[0], "distill": ep.distill})
    name = lambda d: "distill" if d else "no distill"  # noqa: E731
    baselines = {"centred box": C.centred_box_baseline(ds)}
    if ep.baseline:
        baselines[f"distill: {str(not ep.distill).lower()}"] = C.mean_acc(results[not ep.distill])
    C.write_metrics(params, stage, C.mean_acc(results[ep.distill]), n, baselines,
                    variants={name(d): {"mean": C.mean_acc(r), "seeds": dict(zip(map(str, ep.seeds), r))}
                              for d, r in results.items()},
                    trained_on=f"GT boxes of the {ep.train_split} split"
                               + (f" + cached {ep.image_from}/{ep.text_from}" if ep.distill else ""))
    C.write_json(C.curve_path(params, stage), curves)
    return C.write_predictions(params, stage, __name__, ds, pred, inputs, sp, file_sha256(mpath))

