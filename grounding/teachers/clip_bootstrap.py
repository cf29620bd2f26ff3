"""The ``bootstrap-clip`` stage: a tiny CLIP trained contrastively on the dataset's train split.

Only used when ``teachers.clip.pretrained`` is null (the synthetic default, where no real weights exist).
The architecture is ``teachers.clip.model`` (the shipped ``grounding-tiny-clip`` by default) and images
go through the same preprocessing the teacher uses at inference. Each step draws ``batch_size``
(image, sentence) pairs from distinct images and ``batch_size`` (GT-box crop, sentence) pairs from
distinct boxes, and minimises the symmetric InfoNCE (CLIP) loss of both with one shared temperature, plus
a cross-entropy of each crop against the class names of the split's categories written with
:data:`CLASS_TEMPLATES` (a real CLIP has seen "a photo of a <noun>" captions; without this term class-name
prompts would be text the tiny model never met, and ``clip-classes`` would be noise).

Deterministic for a fixed seed: initialisation and sampling are seeded, torch's deterministic algorithms
are on, training runs on ``bootstrap.threads`` torch threads (1 by default, so the bytes do not depend on
the machine's core count, and a busy shared CPU does not stall thread barriers), and the weights file is
serialised from memory (its bytes do not depend on its name). Different CPU instruction sets may still
round differently; the key covers the torch and open_clip versions. The file is ``models/bootstrap/clip/<dataset>.pt`` (a plain state dict, loadable
with ``weights_only=True``), written through :func:`grounding.artefacts.write_artefact`; the stage engine retrains it only when its
stage is stale (code, architecture, preprocessing, bootstrap params, seed, dataset).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from grounding.artefacts import write_artefact
from grounding.codeset import code_version
from grounding.config import ClipBootstrapParams, Params
from grounding.data.images import ImageError, load_rgb
from grounding.data.schema import CanonicalDataset, DataError
from grounding.environment import training_environment
from grounding.progress import progress_bar
from grounding.runtime import torch_threads
from grounding.shards.keys import digest
from grounding.teachers.clip_model import bootstrap_path  # noqa: F401 - where the stage writes

log = logging.getLogger(__name__)

#: Class-name captions the bootstrap aligns with crops (fixed: the teacher does not depend on the
#: ``prompts`` of ``clip-classes``, which only read the teacher).
CLASS_TEMPLATES = ("a photo of a {}", "a {}", "the {}", "a picture of a {}")


@dataclass(frozen=True)
class TrainingData:
    """Preprocessed training tensors: ``images (N, 3, S, S)``, ``crops (M, 3, S, S)``, ``tokens (R, L)``
    and, per sentence, the index of its image and of its GT-box crop (``-1``: the sentence has no box);
    ``crop_class (M,)`` the category index of each crop (``-1``: none) and ``class_tokens (C * T, L)`` the
    class names written with :data:`CLASS_TEMPLATES` (class-major), ``None`` without categories."""

    images: torch.Tensor
    crops: torch.Tensor
    tokens: torch.Tensor
    ref_image: torch.Tensor
    ref_crop: torch.Tensor
    crop_class: torch.Tensor | None = None
    class_tokens: torch.Tensor | None = None
    skipped: tuple[dict[str, str], ...] = ()


def training_data(ds: CanonicalDataset, split: str, preprocess: dict[str, Any], tokenizer: Any,
                  context_length: int, on_error: str = "fail") -> TrainingData:
    """Decode the images of ``split`` (through :func:`load_rgb`), crop every distinct GT box in original
    pixels, preprocess both with the teacher's transform, tokenize the sentences. Undecodable images
    raise under ``on_error="fail"`` and are skipped (and listed) under ``"skip"``."""
    from grounding.teachers.clip_loading import crop_box_pixels
    from grounding.teachers.clip_model import tokenize, transform_of

    refs = [r for r in ds.refs if r.split == split]
    if not refs:
        raise DataError(f"dataset {ds.name} has no sentences in split {split!r} to bootstrap CLIP on")
    tf = transform_of(preprocess)
    index = ds.image_index
    images: list[torch.Tensor] = []
    crops: list[torch.Tensor] = []
    image_pos: dict[str, int] = {}
    crop_pos: dict[tuple[str, tuple[float, ...]], int] = {}
    skipped: list[dict[str, str]] = []
    for image_id in sorted({r.image_id for r in refs}):
        try:
            img = load_rgb(ds.image_root, index[image_id])
        except ImageError as e:
            if on_error == "fail":
                raise
            skipped.append({"item": image_id, "reason": str(e)})
            continue
        image_pos[image_id] = len(images)
        images.append(tf(img))
        for r in refs:
            if r.image_id == image_id and r.box is not None and (image_id, r.box) not in crop_pos:
                crop_pos[(image_id, r.box)] = len(crops)
                crops.append(tf(img.crop(crop_box_pixels(r.box, img.width, img.height))))
    kept = [r for r in refs if r.image_id in image_pos]
    tok = tokenize(tokenizer, [r.text for r in kept], context_length)
    classes = sorted({r.category for r in kept if r.category and r.box is not None})
    crop_class = torch.full((len(crops),), -1, dtype=torch.long)
    for r in kept:
        if r.category in classes and (r.image_id, r.box) in crop_pos:
            crop_class[crop_pos[(r.image_id, r.box)]] = classes.index(r.category)
    class_tokens = (tokenize(tokenizer, [t.format(c) for c in classes for t in CLASS_TEMPLATES], context_length).tokens
                    if len(classes) > 1 else None)
    return TrainingData(
        images=torch.stack(images), crops=torch.stack(crops) if crops else torch.zeros(0, *images[0].shape),
        tokens=tok.tokens, ref_image=torch.tensor([image_pos[r.image_id] for r in kept]),
        ref_crop=torch.tensor([crop_pos.get((r.image_id, r.box), -1) if r.box else -1 for r in kept]),
        crop_class=crop_class if class_tokens is not None else None, class_tokens=class_tokens,
        skipped=tuple(skipped),
    )


def pick_distinct(targets: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of up to ``n`` sentences with pairwise distinct ``targets`` (ignoring ``-1``), drawn at
    random: one sentence per image (or crop), so in-batch negatives are never the same picture."""
    perm = torch.randperm(len(targets), generator=generator)
    t = targets[perm]
    keep = t >= 0
    perm, t = perm[keep], t[keep]
    first = torch.zeros(len(t), dtype=torch.bool)
    seen: set[int] = set()
    for i, v in enumerate(t.tolist()):
        if v not in seen:
            seen.add(v)
            first[i] = True
            if len(seen) == n:
                break
    return perm[first]


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows of L2-normalised ``img``/``txt`` ``(B, D)``."""
    logits = logit_scale * img @ txt.T  # [B,B]
    y = torch.arange(len(img))
    return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2


def class_loss(crops: torch.Tensor, prompts: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of normalised crop features ``(B, D)`` against class embeddings: the normalised mean
    of each class's normalised template embeddings ``prompts (C * T, D)`` (class-major, as
    ``clip-classes`` builds them); ``labels (B,)``, ``-1`` ignored."""
    c = len(prompts) // len(CLASS_TEMPLATES)
    classes = F.normalize(prompts.view(c, len(CLASS_TEMPLATES), -1).mean(dim=1), dim=-1)  # [C,D]
    if not (labels >= 0).any():
        return crops.sum() * 0.0
    return F.cross_entropy(logit_scale * crops @ classes.T, labels, ignore_index=-1)


def train_tiny_clip(model: torch.nn.Module, data: TrainingData, bp: ClipBootstrapParams, seed: int, *,
                    progress: bool = False) -> dict[str, Any]:
    """Train ``model`` in place (AdamW, one-cycle schedule); returns a log (losses, seconds). ``progress``:
    a bar over the image-text pairs seen (rows/s, ETA)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=bp.lr,
                            weight_decay=bp.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=bp.lr, total_steps=bp.steps, pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    has_crops = len(data.crops) > 1
    bar = progress_bar(None, "bootstrap-clip", unit="pair", enabled=progress)  # image-text pairs
    for step in range(bp.steps):
        pi = pick_distinct(data.ref_image, bp.batch_size, gen)
        pc = pick_distinct(data.ref_crop, bp.batch_size, gen) if has_crops else pi[:0]
        x = torch.cat([data.images[data.ref_image[pi]], data.crops[data.ref_crop[pc]]])
        n_cls = 0 if data.class_tokens is None or bp.class_weight == 0 else len(data.class_tokens)
        t = torch.cat([data.tokens[pi], data.tokens[pc]] + ([data.class_tokens] if n_cls and len(pc) else []))
        feats_i = model.encode_image(x, normalize=True)
        feats_t = model.encode_text(t, normalize=True)
        scale = model.logit_scale.exp()
        n, m = len(pi), len(pi) + len(pc)
        loss = clip_loss(feats_i[:n], feats_t[:n], scale)
        if len(pc) > 1:
            loss = loss + clip_loss(feats_i[n:], feats_t[n:m], scale)
        if n_cls and len(pc):
            loss = loss + bp.class_weight * class_loss(feats_i[n:], feats_t[m:], data.crop_class[data.ref_crop[pc]], scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100.0))
        losses.append(float(loss.item()))
        if step == 0:  # pick_distinct may give fewer than batch_size pairs (few distinct images)
            bar.total = bp.steps * len(pi)
        bar.update(len(pi))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % 50 == 0 or step == bp.steps - 1:
            log.info("bootstrap-clip step %d/%d loss %.3f (%.0fs)", step + 1, bp.steps, losses[-1],
                     time.perf_counter() - t0)
    bar.close()
    model.eval()
    tail = losses[-min(20, len(losses)):]
    return {"steps": bp.steps, "first_loss": round(losses[0], 4), "final_loss": round(float(np.mean(tail)), 4),
            "train_seconds": round(time.perf_counter() - t0, 1)}


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """The model's state dict serialised in memory (bytes independent of the file name)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def bootstrap_weights(params: Params) -> Path:
    """Train (or reuse) the tiny CLIP for the configured dataset; returns the weights file."""
    import open_clip

    from grounding.runtime import seed_everything
    from grounding.teachers.clip_model import create_model, model_spec

    cp = params.teachers.clip
    bp = cp.bootstrap
    spec = model_spec(cp)
    ds = CanonicalDataset.load(params.prepared_dir(), refs=False)  # the key needs only the fingerprint
    key = digest({"stage": "bootstrap-clip", "code": code_version(__name__), "model": spec.name,
                  "model_config": spec.model_cfg, "preprocess": spec.preprocess, "bootstrap": bp.model_dump(),
                  "seed": params.seed, "dataset": ds.fingerprint(), "open_clip": open_clip.__version__,
                  "torch": torch.__version__})
    path = bootstrap_path(params)
    provenance: dict[str, Any] = {
        "stage": "bootstrap-clip", "model": spec.name, "model_config": spec.model_cfg,
        "preprocess": spec.preprocess, "bootstrap": bp.model_dump(), "seed": params.seed, "dataset": ds.name,
        "dataset_fingerprint": ds.fingerprint(), "open_clip": open_clip.__version__, "torch": torch.__version__,
    }

    def build(tmp: Path) -> None:
        with torch_threads(bp.threads):
            train(tmp)

    def train(tmp: Path) -> None:
        seed_everything(params.seed)
        tokenizer = open_clip.get_tokenizer(spec.name)
        data = training_data(CanonicalDataset.load(params.prepared_dir()), bp.split, spec.preprocess, tokenizer,
                             spec.context_length, on_error=params.dataset.on_error)
        model = create_model(spec, precision="fp32", device="cpu")
        log.info("bootstrap-clip: training %s on %d images, %d crops, %d sentences of split %s", spec.name,
                 len(data.images), len(data.crops), len(data.tokens), bp.split)
        training = train_tiny_clip(model, data, bp, params.seed, progress=params.progress)
        training.update(images=len(data.images), crops=len(data.crops), sentences=len(data.tokens),
                        skipped=list(data.skipped), torch_threads=torch.get_num_threads())
        provenance["training"] = training  # write_artefact writes the sidecar after build returns
        provenance["environment"] = training_environment()  # inside torch_threads; a record only: not in the key
        tmp.write_bytes(state_dict_bytes(model))

    return write_artefact(path, key, build, provenance)


def run_bootstrap_clip(params: Params) -> Path:
    """Stage ``bootstrap-clip``: the tiny CLIP's weights file (trained when missing or stale). With
    ``teachers.clip.pretrained`` set there is nothing to bootstrap and the given file is returned."""
    if params.teachers.clip.pretrained:
        from grounding.teachers.clip_model import weights_path

        return weights_path(params)
    return bootstrap_weights(params)
