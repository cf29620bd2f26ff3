"""The ``clip-eval`` stage: sanity figures of the cached CLIP teacher on one split, from the shard sets only.

Written to ``data/metrics/clip.json`` (``dvc metrics show``). Each figure comes with its chance level:

* ``text_to_image_r1``: a sentence's embedding retrieves its own image among the split's images;
* ``phrase_to_crop_acc``: among its image's crops, the crop most similar to a sentence has IoU >= 0.5
  with the sentence's GT box (BiCM's S_PQ used alone as a grounder);
* ``crop_to_phrase_acc``: for each crop matching a GT box (IoU >= 0.5), the most similar of its image's
  sentences refers to a box that the crop matches;
* ``crop_to_class_acc``: zero-shot class of a GT-matched crop from the class-name embeddings;
* ``query_to_class_acc``: the class-name embedding most similar to a sentence's is its category (BiCM's
  S_CQ used alone);
* ``qam_acc``: Acc@0.5 of the QAM box P_t, beside a centred box of the train split's mean relative GT size
  and the whole image; ``qam_acc_by_threshold`` recomputes P_t from the stored maps at other thresholds;
* ``qam_pointing``: the map's peak patch centre lies inside the GT box (pointing game; chance = the mean
  fraction of the image the GT box covers): whether the map itself points at the referent, however coarse
  the patch grid makes the box.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from grounding.artefacts import write_artefact
from grounding.codeset import code_version
from grounding.boxes import box_iou, paired_iou
from grounding.config import Params
from grounding.data.schema import CanonicalDataset, RefRecord
from grounding.shards import ShardSet
from grounding.shards.keys import digest
from grounding.teachers.qam import map_box

EVAL_STAGES = ("clip-image", "clip-text", "clip-crops", "clip-classes", "qam")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_to_image_recall(text: np.ndarray, text_image: Sequence[str], images: np.ndarray,
                         image_ids: Sequence[str], k: int = 1) -> tuple[float, float]:
    """Recall@k of sentences ``text (N, D)`` (own image ``text_image[i]``) over ``images (M, D)`` with ids
    ``image_ids``; returns ``(recall, chance)``."""
    sims = _unit(text) @ _unit(images).T  # [N,M]
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    pos = {im: j for j, im in enumerate(image_ids)}
    hit = [pos[t] in row for t, row in zip(text_image, top)]
    return float(np.mean(hit)), min(1.0, k / len(image_ids))


def phrase_to_crop(text: np.ndarray, gt: np.ndarray, crops: Sequence[np.ndarray],
                   crop_boxes: Sequence[np.ndarray]) -> tuple[float, float]:
    """Per sentence ``i``: the crop of its image most similar to ``text[i]`` hits ``gt[i]`` at IoU >= 0.5.
    ``crops[i] (K_i, D)``/``crop_boxes[i] (K_i, 4)`` are its image's crops. Returns ``(accuracy, chance)``."""
    hits, chance = [], []
    for t, g, c, b in zip(text, gt, crops, crop_boxes):
        if len(c) == 0:
            hits.append(False)
            chance.append(0.0)
            continue
        ok = box_iou(b, g[None])[:, 0] >= 0.5
        hits.append(bool(ok[int(np.argmax(_unit(c) @ _unit(t)))]))
        chance.append(float(ok.mean()))
    return float(np.mean(hits)), float(np.mean(chance))


def crop_to_phrase(crop: np.ndarray, crop_box: np.ndarray, text: np.ndarray, gt: np.ndarray) -> tuple[list[bool], list[float]]:
    """For one image: each crop matching some sentence box (IoU >= 0.5) picks its most similar sentence;
    a hit when that sentence's box matches the crop. Returns per-crop hits and chance levels."""
    if len(crop) == 0 or len(text) == 0:
        return [], []
    match = box_iou(crop_box, gt) >= 0.5  # [K,N]
    best = np.argmax(_unit(crop) @ _unit(text).T, axis=1)  # [K]
    rows = np.flatnonzero(match.any(axis=1))
    return [bool(match[r, best[r]]) for r in rows], [float(match[r].mean()) for r in rows]


def centred_box(width: int, height: int, rel_w: float, rel_h: float) -> np.ndarray:
    """A box of ``rel_w * width`` x ``rel_h * height`` centred in the image, float32 xyxy."""
    w, h = rel_w * width, rel_h * height
    return np.array([(width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2], dtype=np.float32)


def clip_metrics(ds: CanonicalDataset, split: str, sets: dict[str, ShardSet]) -> dict[str, Any]:
    """All figures on ``split`` from the shard sets in ``sets`` (keys of :data:`EVAL_STAGES`)."""
    refs = [r for r in ds.refs if r.split == split]
    if not refs:
        raise ValueError(f"dataset {ds.name} has no sentences in split {split!r}")
    index = ds.image_index
    out: dict[str, Any] = {"split": split, "sentences": len(refs)}
    img_set, txt_set = sets["clip-image"], sets["clip-text"]
    refs = [r for r in refs if r.ref_id in txt_set and r.image_id in img_set]
    image_ids = sorted({r.image_id for r in refs})
    out["images"] = len(image_ids)
    text = np.stack([txt_set.get(r.ref_id, ["embedding"])["embedding"] for r in refs])
    images = np.stack([img_set.get(i, ["embedding"])["embedding"] for i in image_ids])
    for k in (1, 5):
        r, c = text_to_image_recall(text, [r.image_id for r in refs], images, image_ids, k)
        out[f"text_to_image_r{k}"], out[f"text_to_image_r{k}_chance"] = round(r, 4), round(c, 4)
    boxed = [(i, r) for i, r in enumerate(refs) if r.box is not None]
    gt = np.array([r.box for _, r in boxed], dtype=np.float32).reshape(-1, 4)
    crop_set = sets.get("clip-crops")
    if crop_set is not None and boxed:
        crops = {im: crop_set.get(im, ["embedding", "boxes"]) for im in image_ids if im in crop_set}
        empty = {"embedding": np.zeros((0, text.shape[1]), np.float16), "boxes": np.zeros((0, 4), np.float32)}
        per = [crops.get(r.image_id, empty) for _, r in boxed]
        acc, ch = phrase_to_crop(text[[i for i, _ in boxed]], gt, [p["embedding"] for p in per],
                                 [p["boxes"] for p in per])
        out["phrase_to_crop_acc"], out["phrase_to_crop_chance"] = round(acc, 4), round(ch, 4)
        hits: list[bool] = []
        chance: list[float] = []
        for im, row in crops.items():
            sel = [j for j, (i, r) in enumerate(boxed) if r.image_id == im]
            h, c = crop_to_phrase(row["embedding"], row["boxes"], text[[boxed[j][0] for j in sel]], gt[sel])
            hits += h
            chance += c
        if hits:
            out["crop_to_phrase_acc"], out["crop_to_phrase_chance"] = round(float(np.mean(hits)), 4), round(float(np.mean(chance)), 4)
            out["crops_matched"] = len(hits)
        cls_set = sets.get("clip-classes")
        if cls_set is not None:
            out.update(_crop_to_class(crops, boxed, gt, cls_set))
    cls_set = sets.get("clip-classes")
    if cls_set is not None:
        classes = list(cls_set.keys)
        sel = [i for i, r in enumerate(refs) if r.category in classes]
        if sel:
            emb = np.stack([cls_set.get(c, ["embedding"])["embedding"] for c in classes])
            pred = np.argmax(_unit(text[sel]) @ _unit(emb).T, axis=1)
            hit = [classes[p] == refs[i].category for p, i in zip(pred, sel)]
            out["query_to_class_acc"] = round(float(np.mean(hit)), 4)
            out["query_to_class_chance"] = round(1 / len(classes), 4)
    qam_set = sets.get("qam")
    if qam_set is not None and boxed:
        out.update(_qam_figures(ds, boxed, gt, qam_set))
    return out


def _crop_to_class(crops: dict[str, dict[str, np.ndarray]], boxed: list[tuple[int, RefRecord]], gt: np.ndarray,
                   cls_set: ShardSet) -> dict[str, Any]:
    classes = list(cls_set.keys)
    emb = np.stack([cls_set.get(c, ["embedding"])["embedding"] for c in classes])
    hits = []
    for im, row in crops.items():
        sel = [j for j, (_, r) in enumerate(boxed) if r.image_id == im and r.category in classes]
        if not sel or len(row["boxes"]) == 0:
            continue
        iou = box_iou(row["boxes"], gt[sel])  # [K,N]
        for k in range(len(row["boxes"])):
            j = int(np.argmax(iou[k]))
            if iou[k, j] >= 0.5:
                pred = classes[int(np.argmax(_unit(emb) @ _unit(row["embedding"][k])))]
                hits.append(pred == boxed[sel[j]][1].category)
    if not hits:
        return {}
    return {"crop_to_class_acc": round(float(np.mean(hits)), 4), "crop_to_class_chance": round(1 / len(classes), 4)}


def _qam_figures(ds: CanonicalDataset, boxed: list[tuple[int, RefRecord]], gt: np.ndarray,
                 qam_set: ShardSet) -> dict[str, Any]:
    index = ds.image_index
    keep = [j for j, (_, r) in enumerate(boxed) if r.ref_id in qam_set]
    if not keep:
        return {}
    rows = [qam_set.get(boxed[j][1].ref_id, ["box", "flat", "map"]) for j in keep]
    pred = np.stack([r["box"] for r in rows])
    g = gt[keep]
    sizes = [(index[boxed[j][1].image_id].width, index[boxed[j][1].image_id].height) for j in keep]
    points = np.stack([peak_point(r["map"], w, h) for r, (w, h) in zip(rows, sizes)])
    inside = (points[:, 0] >= g[:, 0]) & (points[:, 0] <= g[:, 2]) & (points[:, 1] >= g[:, 1]) & (points[:, 1] <= g[:, 3])
    area = np.array([(b[2] - b[0]) * (b[3] - b[1]) / (w * h) for b, (w, h) in zip(g, sizes)])
    train = [r for r in ds.refs if r.split == "train" and r.box is not None] or [r for _, r in boxed]
    rel_w = float(np.mean([(r.box[2] - r.box[0]) / index[r.image_id].width for r in train]))
    rel_h = float(np.mean([(r.box[3] - r.box[1]) / index[r.image_id].height for r in train]))
    centred = np.stack([centred_box(w, h, rel_w, rel_h) for w, h in sizes])
    whole = np.array([[0, 0, w, h] for w, h in sizes], dtype=np.float32)
    acc = lambda p: round(float((paired_iou(p, g) >= 0.5).mean()), 4)  # noqa: E731
    by_thr = {f"{t:.1f}": acc(np.stack([map_box(r["map"], w, h, t)[0] for r, (w, h) in zip(rows, sizes)]))
              for t in (0.3, 0.5)}
    return {"qam_acc": acc(pred), "qam_centred_box_acc": acc(centred), "qam_whole_image_acc": acc(whole),
            "qam_acc_by_threshold": {**by_thr, "stored": acc(pred)},
            "qam_pointing": round(float(inside.mean()), 4), "qam_pointing_chance": round(float(area.mean()), 4),
            "qam_mean_iou": round(float(paired_iou(pred, g).mean()), 4),
            "qam_flat": int(sum(int(r["flat"]) for r in rows)), "qam_sentences": len(keep),
            "centred_box_rel_size": [round(rel_w, 4), round(rel_h, 4)]}


def peak_point(grid_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """Original-pixel ``(x, y)`` of the centre of a patch-grid map's highest cell (first on ties)."""
    m = np.asarray(grid_map, dtype=np.float32)
    i, j = np.unravel_index(int(np.argmax(m)), m.shape)
    return np.array([(j + 0.5) * width / m.shape[1], (i + 0.5) * height / m.shape[0]], dtype=np.float32)


def run_clip_eval(params: Params) -> Path:
    """Stage ``clip-eval``: the figures above on ``teachers.clip.eval_split`` -> ``data/metrics/clip.json``
    (the engine reruns it when an input shard set or this code changes)."""
    ds = CanonicalDataset.load(params.prepared_dir())
    sets = {s: ShardSet(params.teacher_dir(s)) for s in EVAL_STAGES if (params.teacher_dir(s) / "manifest.json").exists()}
    for need in ("clip-image", "clip-text"):
        if need not in sets:
            from grounding.shards.manifest import ShardError

            raise ShardError(f"clip-eval needs the {need} shard set at {params.teacher_dir(need)}: run it first")
    split = params.teachers.clip.eval_split
    key = digest({"stage": "clip-eval", "code": code_version(__name__), "split": split,
                  "dataset": ds.fingerprint(), "inputs": {s: v.manifest.stage_key for s, v in sorted(sets.items())}})
    path = Path(params.paths.metrics) / "clip.json"

    def build(tmp: Path) -> None:
        m = clip_metrics(ds, split, sets)
        m["teacher"] = {k: sets["clip-image"].manifest.teacher.get(k) for k in ("model", "weights_sha256")}
        m["crops_from"] = sets["clip-crops"].manifest.params.get("crops_from") if "clip-crops" in sets else None
        tmp.write_text(json.dumps(m, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    return write_artefact(path, key, build, {"stage": "clip-eval", "inputs": sorted(sets)})
