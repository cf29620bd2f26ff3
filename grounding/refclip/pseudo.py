"""RefCLIP inference from cached anchors: a pseudo-box per sentence, and Acc@0.5 against GT.

Inference (SEEDS 003): the best-scoring kept anchor of the sentence's image; its box is the prediction
(the cached anchor box is already the highest-confidence box of that cell, in original pixels).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from grounding.artefacts import read_provenance
from grounding.config import Params
from grounding.data.schema import CanonicalDataset
from grounding.evaluate import accuracy, covered
from grounding.refclip.model import from_checkpoint
from grounding.refclip.train import AnchorTable, best_anchor, load_anchor_table, model_path
from grounding.shards import FieldSpec, ShardSet
from grounding.shards.keys import file_sha256

PSEUDO_FIELDS = (
    FieldSpec("box", "float32", (4,), meaning="pseudo-box: box of the best-scoring kept anchor, xyxy original pixels"),
    FieldSpec("score", "float32", (), meaning="RefCLIP anchor-text score of that anchor"),
    FieldSpec("anchor", "int32", (), meaning="row-major stride-32 grid cell index of that anchor"),
    FieldSpec("anchor_rank", "int32", (), meaning="index of that anchor among the image's kept anchors"),
    FieldSpec("truncated", "bool", (), meaning="sentence longer than refclip.max_len tokens (truncated)"),
)


def predict(params: Params) -> tuple[list[str], dict[str, np.ndarray], CanonicalDataset, AnchorTable, list[str]]:
    """Pseudo-boxes of every sentence whose image has cached anchors.

    Returns the ref ids (ref-id order), the per-field arrays, the dataset, the anchor table and the ref
    ids without anchors (their image failed in the anchor stage)."""
    ds = CanonicalDataset.load(params.prepared_dir())
    anchors = ShardSet(params.teacher_dir(params.refclip.anchors_from))
    from grounding.errors import load_weights

    mpath = model_path(params)
    ckpt = load_weights(mpath, "refclip-train model", f"delete {mpath} and rerun refclip-train to retrain it")
    model, vocab = from_checkpoint(ckpt)
    usable = [r for r in ds.refs if r.image_id in anchors]
    missing = [r.ref_id for r in ds.refs if r.image_id not in anchors]
    table = load_anchor_table(anchors, sorted({r.image_id for r in usable}))
    row = table.row
    rows = [row[r.image_id] for r in usable]
    pick, score, truncated = best_anchor(model, table, [r.text for r in usable], rows, vocab)
    rows_np, pick_np = np.asarray(rows, dtype=np.int64), pick.numpy()
    fields = {
        "box": table.boxes[rows_np, pick_np],
        "score": score.numpy().astype(np.float32),
        "anchor": table.cells[rows_np, pick_np],
        "anchor_rank": pick_np.astype(np.int32),
        "truncated": truncated.numpy(),
    }
    return [r.ref_id for r in usable], fields, ds, table, missing


def metrics(ref_ids: list[str], fields: dict[str, np.ndarray], ds: CanonicalDataset, table: AnchorTable,
            seed: int = 0) -> dict[str, Any]:
    """Acc@0.5 per split of the pseudo-boxes, with the upper bound (GT covered by any kept anchor box) and
    two label-free baselines (a random kept anchor; the most confident kept anchor)."""
    refs = {r.ref_id: r for r in ds.refs}
    rng = np.random.default_rng(seed)
    row = table.row
    out: dict[str, Any] = {}
    for split in sorted({refs[k].split for k in ref_ids}):
        idx = [i for i, k in enumerate(ref_ids) if refs[k].split == split and refs[k].box is not None]
        if not idx:
            continue
        gt = np.array([refs[ref_ids[i]].box for i in idx], dtype=np.float32)
        img = np.array([row[refs[ref_ids[i]].image_id] for i in idx])
        n_kept = table.mask.numpy()[img].sum(axis=1)
        rand = np.array([rng.integers(0, n) for n in n_kept])
        conf = np.where(table.mask.numpy()[img], table.confidence[img], -np.inf).argmax(axis=1)
        out[split] = {
            "n": len(idx),
            "acc": round(accuracy(fields["box"][idx], gt), 4),
            "upper_bound": round(covered([table.boxes[i][table.mask[i].numpy()] for i in img], gt), 4),
            "random_anchor": round(accuracy(table.boxes[img, rand], gt), 4),
            "most_confident_anchor": round(accuracy(table.boxes[img, conf], gt), 4),
        }
    return out


def run_refclip_pseudo(params: Params) -> Path:
    """Stage ``refclip-pseudo``: sentence-level pseudo-box shard set + ``data/metrics/refclip.json``."""
    from grounding.stages import dataset_extra, write_stage

    ref_ids, fields, ds, table, missing = predict(params)
    out = params.teacher_dir("refclip-pseudo")
    weights = model_path(params)
    prov = read_provenance(weights)
    by_key = {k: i for i, k in enumerate(ref_ids)}
    all_ids = [r.ref_id for r in ds.refs]
    anchors_key = prov.get("provenance", {}).get("anchors_key", "")

    def rows(todo: list[str]):
        for k in todo:
            if k in by_key:
                i = by_key[k]
                yield k, {name: arr[i] for name, arr in fields.items()}
            else:
                yield k, LookupError("its image has no cached anchors (failed in the anchor stage)")

    path = write_stage(
        params, stage="refclip-pseudo", modules=["grounding.refclip.pseudo", "grounding.refclip.model",
                                                 "grounding.refclip.train"],
        level="sentence", fields=PSEUDO_FIELDS, item_keys=all_ids, rows=rows,
        stage_params={"anchors_from": params.refclip.anchors_from},
        inputs={"dataset": ds.fingerprint(), "anchors": anchors_key, "refclip_weights": file_sha256(weights)},
        teacher={"name": "refclip", "weights_sha256": file_sha256(weights), "weights": str(weights),
                 "train_key": prov.get("key", "")},
        extra=dataset_extra(params, ds, out), out_dir=out,
    )
    report = {"refclip": metrics(ref_ids, fields, ds, table, params.seed),
              "sentences_without_anchors": len(missing)}
    mpath = Path(params.paths.metrics) / "refclip.json"
    text = json.dumps(report, indent=1, sort_keys=True) + "\n"
    if not mpath.is_file() or mpath.read_text() != text:  # unchanged: leave the file (and its mtime) alone
        mpath.parent.mkdir(parents=True, exist_ok=True)
        mpath.write_text(text)
    return path
