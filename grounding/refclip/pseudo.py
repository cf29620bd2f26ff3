"""RefCLIP inference from cached anchors: a pseudo-box per sentence, and Acc@0.5 against GT.

Inference (SEEDS 003; the public ``getPrediction`` + ``get_boxes``): the best-scoring kept anchor of the
sentence's image, then (multiscale) the highest-objectness of that cell's 4 boxes; degenerate boxes (zero
area once clipped to the image) are never chosen (issue 21) and the box is clipped to the image.
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
from grounding.refclip.anchors import AnchorTable, load_anchor_table
from grounding.refclip.model import RefCLIP, RefCLIPNet, from_checkpoint
from grounding.refclip.train import best_anchor, model_path
from grounding.shards import FieldSpec, ShardSet
from grounding.shards.keys import file_sha256

PSEUDO_FIELDS = (
    FieldSpec("box", "float32", (4,), meaning="pseudo-box: the box of the best-scoring valid kept anchor (multiscale: "
              "its highest-objectness valid box), clipped, xyxy original pixels; the whole image if none is valid"),
    FieldSpec("score", "float32", (), meaning="RefCLIP anchor-text score of that anchor"),
    FieldSpec("anchor", "int32", (), meaning="row-major stride-32 grid cell index of that anchor (-1: none valid)"),
    FieldSpec("anchor_rank", "int32", (), meaning="index of that anchor among the image's kept anchors (-1: none)"),
    FieldSpec("truncated", "bool", (), meaning="sentence longer than refclip.max_len tokens (truncated)"),
)


def load_model(params: Params) -> tuple[RefCLIP | RefCLIPNet, list[str], dict[str, Any]]:
    """The model ``refclip-pseudo`` uses: ``refclip.checkpoint`` (a public RefCLIP checkpoint) when given,
    else ``refclip-train``'s; with its vocabulary and a description ``{"weights", "sha256", "public"}``."""
    rp = params.refclip
    if rp.checkpoint:
        from grounding.refclip.public import load_public_checkpoint

        model, vocab = load_public_checkpoint(rp.checkpoint, rp.vocab_from, rp, params.teachers.yolo.weights)
        return model, vocab, {"weights": str(rp.checkpoint), "sha256": file_sha256(Path(rp.checkpoint)),
                              "public": True}
    from grounding.errors import load_weights

    path = model_path(params)
    model, vocab = from_checkpoint(load_weights(path, "refclip-train model",
                                                f"delete {path} and rerun refclip-train to retrain it"))
    return model, vocab, {"weights": str(path), "sha256": file_sha256(path), "public": False}


def predict(params: Params, loaded: tuple | None = None) -> tuple[list[str], dict[str, np.ndarray], CanonicalDataset, AnchorTable, list[str]]:
    """Pseudo-boxes of every sentence whose image has cached anchors.

    The box is that of the best-scoring *valid* kept anchor (multiscale: the highest-objectness valid box of
    the best cell), clipped to the image; an image whose kept anchors are all degenerate gets the whole
    image as its box (``anchor`` = -1). Returns the ref ids (ref-id order), the per-field arrays, the
    dataset, the anchor table and the ref ids without anchors (their image failed in the anchor stage)."""
    ds = CanonicalDataset.load(params.prepared_dir())
    anchors = ShardSet(params.teacher_dir(params.refclip.anchors_from))
    model, vocab, _ = loaded or load_model(params)
    usable = [r for r in ds.refs if r.image_id in anchors]
    missing = [r.ref_id for r in ds.refs if r.image_id not in anchors]
    table = load_anchor_table(anchors, sorted({r.image_id for r in usable}), model.cfg.features)
    table.preload()
    row = table.row
    rows = [row[r.image_id] for r in usable]
    pick, score, truncated = best_anchor(model, table, [r.text for r in usable], rows, vocab)
    rows_np, pick_np = np.asarray(rows, dtype=np.int64), pick.numpy()
    none = ~table.mask.numpy()[rows_np].any(axis=1)
    boxes = table.boxes[rows_np, pick_np].copy()
    if none.any():
        images = ds.image_index
        boxes[none] = [[0, 0, images[usable[i].image_id].width, images[usable[i].image_id].height]
                       for i in np.flatnonzero(none)]
    fields = {
        "box": boxes.astype(np.float32),
        "score": score.numpy().astype(np.float32),
        "anchor": np.where(none, -1, table.cells[rows_np, pick_np]).astype(np.int32),
        "anchor_rank": np.where(none, -1, pick_np).astype(np.int32),
        "truncated": truncated.numpy(),
    }
    return [r.ref_id for r in usable], fields, ds, table, missing


def metrics(ref_ids: list[str], fields: dict[str, np.ndarray], ds: CanonicalDataset, table: AnchorTable,
            seed: int = 0) -> dict[str, Any]:
    """Acc@0.5 per split of the pseudo-boxes, with the upper bound (GT covered by any valid box of the kept
    anchors: all 4 predictions of each kept cell for multiscale) and two label-free baselines (a random
    valid kept anchor; the most confident valid kept anchor), all through the same box choice."""
    refs = {r.ref_id: r for r in ds.refs}
    rng = np.random.default_rng(seed)
    row = table.row
    valid = table.mask.numpy()
    out: dict[str, Any] = {}
    for split in sorted({refs[k].split for k in ref_ids}):
        idx = [i for i, k in enumerate(ref_ids) if refs[k].split == split and refs[k].box is not None]
        if not idx:
            continue
        gt = np.array([refs[ref_ids[i]].box for i in idx], dtype=np.float32)
        img = np.array([row[refs[ref_ids[i]].image_id] for i in idx])
        rand = np.array([rng.choice(np.flatnonzero(valid[i])) if valid[i].any() else 0 for i in img])
        conf = np.where(valid[img], table.confidence[img], -np.inf).argmax(axis=1)
        out[split] = {
            "n": len(idx),
            "acc": round(accuracy(fields["box"][idx], gt), 4),
            "upper_bound": round(covered([table.candidates[i] for i in img], gt), 4),
            "random_anchor": round(accuracy(table.boxes[img, rand], gt), 4),
            "most_confident_anchor": round(accuracy(table.boxes[img, conf], gt), 4),
        }
    return out


def run_refclip_pseudo(params: Params) -> Path:
    """Stage ``refclip-pseudo``: sentence-level pseudo-box shard set + ``data/metrics/refclip.json``."""
    from grounding.codeset import code_version
    from grounding.stage_writer import dataset_extra, write_stage

    loaded = load_model(params)
    used = loaded[2]
    ref_ids, fields, ds, table, missing = predict(params, loaded)
    out = params.teacher_dir("refclip-pseudo")
    prov = {} if used["public"] else read_provenance(Path(used["weights"]))
    by_key = {k: i for i, k in enumerate(ref_ids)}
    all_ids = [r.ref_id for r in ds.refs]
    anchors_key = prov.get("provenance", {}).get("anchors_key", "") if prov else \
        ShardSet(params.teacher_dir(params.refclip.anchors_from)).manifest.stage_key

    def rows(todo: list[str]):
        for k in todo:
            if k in by_key:
                i = by_key[k]
                yield k, {name: arr[i] for name, arr in fields.items()}
            else:
                yield k, LookupError("its image has no cached anchors (failed in the anchor stage)")

    path = write_stage(
        params, stage="refclip-pseudo", code=code_version(__name__),
        level="sentence", fields=PSEUDO_FIELDS, item_keys=all_ids, rows=rows,
        stage_params={"anchors_from": params.refclip.anchors_from, "checkpoint": params.refclip.checkpoint,
                      "vocab_from": params.refclip.vocab_from},
        inputs={"dataset": ds.fingerprint(), "anchors": anchors_key, "refclip_weights": used["sha256"]},
        teacher={"name": "refclip", "weights_sha256": used["sha256"], "weights": used["weights"],
                 "public_checkpoint": used["public"], "features": table.kind, "train_key": prov.get("key", "")},
        extra=dataset_extra(params, ds, out), out_dir=out,
    )
    report = {"refclip": metrics(ref_ids, fields, ds, table, params.seed), "features": table.kind,
              "sentences_without_anchors": len(missing),
              "sentences_without_valid_anchor": int((fields["anchor"] == -1).sum())}
    mpath = Path(params.paths.metrics) / "refclip.json"
    text = json.dumps(report, indent=1, sort_keys=True) + "\n"
    if not mpath.is_file() or mpath.read_text() != text:  # unchanged: leave the file (and its mtime) alone
        mpath.parent.mkdir(parents=True, exist_ok=True)
        mpath.write_text(text)
    return path
