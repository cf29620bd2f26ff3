"""Stage ``student-rec-pseudo`` on the REC trunk (:mod:`grounding.students.rec_trunk`, re-exported here): a small TransVG-style REC student: ResNet backbone, text encoder, fusion transformer with a [REG] token.

Input: letterboxed, ImageNet-normalised images ``(B_img, 3, S, S)`` and token ids ``(B, L)``; each sentence
names its image by ``image_index`` (the backbone runs once per image, however many sentences it has).
Output box: ``(B, 4)`` xyxy as fractions of the letterbox canvas (map back with
:func:`grounding.students.common.from_canvas_fraction`).

Stage ``student-rec-pseudo`` (:func:`run_student_rec_pseudo`) trains it on RefCLIP pseudo-boxes (never GT)
with random-resize augmentation and an EMA copy; loss SmoothL1 + GIoU (torchvision.ops).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from grounding import distributed as D
from grounding.students import common as C
from grounding.students.rec_trunk import (  # noqa: F401 - re-exported
    CLIP_BPE_VOCAB, RecConfig, REFCOCOG_NAMES, query_length, Tokenizer, _bert_module, _SlimResNet, build_backbone, _out_channels, sine_positions, PosEncoderLayer, VisualEncoder, TextEncoder, RecStudent, BOX_L1, box_loss, RecBatches, predict_boxes, state_dict_of, save_checkpoint)

log = logging.getLogger(__name__)


# ---- stage student-rec-pseudo -----------------------------------------------------------------------------------
def train_rec_pseudo(ds: Any, refs: Sequence[Any], pseudo: np.ndarray, rp: Any, seed: int, *,
                     progress: bool = False) -> tuple[RecStudent, Any, list[dict[str, float]], Tokenizer]:
    """Train on ``refs`` with their pseudo-boxes ``(N, 4)`` (xyxy original pixels); returns the model, its EMA
    copy, the curve and the tokenizer."""
    from grounding.runtime import seed_everything

    gen = seed_everything(seed)
    cfg = RecConfig.from_params(rp, ds)
    model = RecStudent(cfg)
    ema = C.ema_model(model, rp.ema_decay, rp.ema_warmup)
    tok = Tokenizer(cfg)
    data = RecBatches(ds, refs, C.Canvases(ds, rp.input_size), tok, targets=pseudo)

    def loss_fn(m: nn.Module, batch: np.ndarray, size: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = data.forward(m, batch, size)
        return box_loss(out["box"], data.targets[torch.as_tensor(batch)].to(out["box"].device), rp.giou_weight, rp.box_l1)

    curve = C.fit(model, lambda g: C.image_batches(data.image_of, rp.batch_images, g), loss_fn, rp,
                  generator=gen, ema=ema, progress=progress, desc="student-rec-pseudo", group_of=data.image_of)
    ema.eval()
    return model, ema, curve, tok


def run_student_rec_pseudo(params: Any) -> Path:
    """Stage ``student-rec-pseudo``: weights, predictions shard set, metrics (raw and EMA student per seed,
    RefCLIP teacher and centred-box baselines) and the training curve."""
    from grounding.data.schema import CanonicalDataset
    from grounding.shards import file_sha256
    from grounding.shards.torch import ShardDataset

    stage, rp = "student-rec-pseudo", params.students.rec
    ds = CanonicalDataset.load(params.prepared_dir())
    train = C.split_refs(ds, rp.pseudo_split)
    pseudo_set = C.teacher_set(params, rp.pseudo_from, [r.ref_id for r in train], ds, stage)
    shards = ShardDataset({"pseudo": pseudo_set}, keys=[r.ref_id for r in train], fields={"pseudo": ["box"]})
    pseudo = np.stack([shards[i]["pseudo"]["box"].numpy() for i in range(len(shards))])  # never GT
    inputs = {"pseudo": pseudo_set.manifest.stage_key}
    sp = rp.model_dump(mode="json") | {"seed": params.seed} | params.train.key_params()
    runs, curves, best = [], [], None
    with C.torch_threads(rp.threads), C.training(params):
        for seed in rp.seeds:
            model, ema, curve, tok = train_rec_pseudo(ds, train, pseudo, rp, seed, progress=params.progress)
            if not D.is_main():
                continue  # every rank trains (torchrun); rank 0 alone evaluates and writes
            every = RecBatches(ds, ds.refs, C.Canvases(ds, rp.input_size), tok)
            acc_ema, n = C.acc_per_split(pred_ema := predict_boxes(ema, every), ds)
            acc_raw, _ = C.acc_per_split(predict_boxes(model, every), ds)
            runs.append({"seed": seed, "acc50_ema": acc_ema, "acc50_raw": acc_raw})
            curves.append([{**row, "seed": seed} for row in curve])
            if best is None:
                best = (model, ema, pred_ema)
    if not D.is_main():
        return params.student_dir(stage)
    model, ema, pred = best
    cfg = RecConfig.from_params(rp, ds)
    mpath = C.model_path(params, stage)
    save_checkpoint(mpath, {"state_dict": ema, "raw_state_dict": model}, cfg,
                    {"seed": rp.seeds[0], "pseudo_key": pseudo_set.manifest.stage_key})
    baselines = {"centred box": C.centred_box_baseline(ds)}
    teacher = _refclip_teacher_acc(params)
    if teacher:
        baselines["RefCLIP teacher"] = teacher
    C.write_metrics(params, stage, C.mean_acc([r["acc50_ema"] for r in runs]), n, baselines,
                    acc50_raw=C.mean_acc([r["acc50_raw"] for r in runs]), seeds=runs,
                    pseudo_key=pseudo_set.manifest.stage_key,
                    trained_on=f"{rp.pseudo_from} pseudo-boxes of the {rp.pseudo_split} split (no GT)")
    C.write_json(C.curve_path(params, stage), [row for c in curves for row in c])
    return C.write_predictions(params, stage, __name__, ds, pred, inputs, sp, file_sha256(mpath))


def _refclip_teacher_acc(params: Any) -> dict[str, float]:
    """The RefCLIP teacher's own Acc@0.5 per split from ``data/metrics/refclip.json`` (empty if absent)."""
    import json

    path = Path(params.paths.metrics) / "refclip.json"
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text()).get("refclip", {})
    return {s: float(v["acc"]) for s, v in sorted(doc.items()) if isinstance(v, dict) and "acc" in v}
