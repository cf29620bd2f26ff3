"""The parsing rules of the three published loaders that ``refclip-export`` targets, re-implemented from
reading them (nothing copied), so tests and ``benchmarks/export_loaders.py`` can read an export exactly as
those loaders would, without their model code, GloVe or BERT:

* RefCLIP ``datasets/dataloader.py`` (kingthreestones/RefCLIP) ``RefCOCODataSet``: ``DATASET`` must be one of
  refcoco, refcoco+, refcocog, referit; ``json.load`` of ``ANN_PATH``; items of every ``split.split('+')``
  key concatenated; the tokenizer walks ``item['refs']`` of every split and lower-cases each string;
  ``load_img_feats`` opens ``IMAGE_PATH/'COCO_train2014_%012d.jpg' % iid`` (RefCOCO family) or
  ``'%d.jpg' % iid`` (referit) with ``cv2.imread``; ``box = np.array([bbox])`` (floats, xywh) and
  ``label2yolobox`` uses ``x1 = x``, ``x2 = x + w`` (likewise y).
* SimREC ``simrec/datasets/dataset.py`` (luogen1996/SimREC): the same, plus
  ``np.load(mask_path/'%d.npy' % mask_id)``; ``preprocess_info`` does ``np.expand_dims(mask, -1)
  .astype(np.float32)``, ``cv2.resize`` to the letterboxed ``(nw, nh)`` and pastes it into a
  ``(416, 416, 1)`` canvas, so the file must be a 2-D ``(H, W)`` array of the image's size (SimREC's
  ``data_process.py`` saves ``refer.getMask(...)['mask']``: uint8 0/1).
* TransVG ``datasets/data_loader.py`` (djiajunustc/TransVG) ``TransVGDataset``: the splits it accepts per
  dataset; ``split_root/<dataset>`` must exist; ``trainval`` is ``<dataset>_trainval.pth`` for referit and
  ``_train.pth`` + ``_val.pth`` for the others; rows ``(img_file, mask_file, bbox, phrase, attri)`` or
  ``(img_file, bbox, phrase)`` for flickr; ``bbox = np.array(bbox, dtype=int)`` then, except for referit
  and flickr, ``bbox[2], bbox[3] = bbox[0] + bbox[2], bbox[1] + bbox[3]``; images
  ``Image.open(im_dir/img_file).convert("RGB")`` with ``im_dir`` = ``data_root/other/images/mscoco/images/
  train2014`` (RefCOCO family), ``data_root/referit/images``, ``data_root/Flickr30k/flickr30k_images``.

Each reader returns ``(items, failures)``: one dict per item the loader would yield (``box_xyxy`` after the
loader's own conversion, in original pixels) and ``(index, error)`` for each it would crash on.
"""

from __future__ import annotations

import json
import os.path as osp
import re
from pathlib import Path
from typing import Any

import numpy as np

JSON_DATASETS = ("refcoco", "refcoco+", "refcocog", "referit")
TRANSVG_SPLITS = {"referit": ("train", "val", "trainval", "test"), "unc": ("train", "val", "trainval", "testA", "testB"),
                  "unc+": ("train", "val", "trainval", "testA", "testB"), "gref": ("train", "val"),
                  "gref_umd": ("train", "val", "test"), "flickr": ("train", "val", "test")}
INPUT_SIZE = 416  # both JSON loaders' INPUT_SHAPE


def _words(ref: str) -> list[str]:
    """The JSON loaders' tokenisation (fails on anything but a string)."""
    return re.sub(r"([.,'!?\"()*#:;])", "", ref.lower()).replace("-", " ").replace("/", " ").split()


def _json_items(ann_path: str | Path, dataset: str, split: str) -> tuple[dict, list[dict]]:
    assert dataset in JSON_DATASETS, f"dataset {dataset!r} is not one the loaders accept"
    doc = json.load(open(ann_path, "r"))
    items: list[dict] = []
    for s in split.split("+"):
        items += doc[s]
    for s in doc:  # the tokenizer's pass over every split
        for ann in doc[s]:
            for ref in ann["refs"]:
                _words(ref)
    return doc, items


def _image_file(dataset: str, iid: Any) -> str:
    if dataset in ("refcoco", "refcoco+", "refcocog"):
        return "COCO_train2014_%012d.jpg" % iid
    return "%d.jpg" % iid


def _letterbox(h: int, w: int) -> tuple[int, int, int, int]:
    """``(nh, nw, dx, dy)`` of ``preprocess_info``."""
    new_ar = w / h
    if new_ar < 1:
        nh, nw = INPUT_SIZE, INPUT_SIZE * new_ar
    else:
        nw, nh = INPUT_SIZE, INPUT_SIZE / new_ar
    nw, nh = int(nw), int(nh)
    return nh, nw, (INPUT_SIZE - nw) // 2, (INPUT_SIZE - nh) // 2


def read_refclip(ann_path: str | Path, image_path: str | Path, dataset: str, split: str,
                 mask_path: str | Path | None = None) -> tuple[list[dict], list[tuple[int, str]]]:
    """Items as RefCLIP's loader reads them (and SimREC's, given ``mask_path``)."""
    import cv2

    _, anns = _json_items(ann_path, dataset, split)
    items, failures = [], []
    for idx, ann in enumerate(anns):
        try:
            img_path = osp.join(str(image_path), _image_file(dataset, ann["iid"]))
            image = cv2.imread(img_path)
            if image is None:
                raise FileNotFoundError(f"cv2.imread could not read {img_path}")
            box = np.array([ann["bbox"]])
            x1, y1 = box[:, 0], box[:, 1]
            x2, y2 = box[:, 0] + box[:, 2], box[:, 1] + box[:, 3]
            item = {"iid": ann["iid"], "mask_id": ann["mask_id"], "ref_id": ann.get("ref_id"), "refs": ann["refs"],
                    "shape": image.shape[:2], "box_xyxy": np.stack([x1, y1, x2, y2], 1)[0].astype(np.float64)}
            if mask_path is not None:
                mask = np.load(osp.join(str(mask_path), "%d.npy" % ann["mask_id"]))
                item["mask"] = mask
                h, w, _ = image.shape
                nh, nw, dx, dy = _letterbox(h, w)
                m = np.expand_dims(mask, -1).astype(np.float32)
                m = cv2.resize(m, (nw, nh))
                m = np.expand_dims(m, -1).astype(np.float32)
                sized = np.zeros((INPUT_SIZE, INPUT_SIZE, 1), dtype=np.float32)
                sized[dy:dy + nh, dx:dx + nw, :] = m
            items.append(item)
        except Exception as e:  # noqa: BLE001 - a loader crash of any kind is what is counted
            failures.append((idx, f"{type(e).__name__}: {e}"))
    return items, failures


def read_simrec(ann_path: str | Path, image_path: str | Path, mask_path: str | Path, dataset: str,
                split: str) -> tuple[list[dict], list[tuple[int, str]]]:
    """Items as SimREC's loader reads them (RefCLIP's rules plus the mask file)."""
    return read_refclip(ann_path, image_path, dataset, split, mask_path=mask_path)


def transvg_image_dir(data_root: str | Path, dataset: str) -> str:
    if dataset == "referit":
        return osp.join(str(data_root), "referit", "images")
    if dataset == "flickr":
        return osp.join(str(data_root), "Flickr30k", "flickr30k_images")
    return osp.join(str(data_root), "other", "images", "mscoco", "images", "train2014")


def read_transvg(data_root: str | Path, split_root: str | Path, dataset: str, split: str
                 ) -> tuple[list[dict], list[tuple[int, str]]]:
    """Rows as TransVG's loader reads them."""
    import torch
    from PIL import Image

    if split not in TRANSVG_SPLITS[dataset]:
        raise ValueError(f"Dataset {dataset} does not have split {split}")
    dataset_path = osp.join(str(split_root), dataset)
    assert osp.exists(dataset_path), f"{dataset_path} is missing"
    splits = [split]
    if dataset != "referit":
        splits = ["train", "val"] if split == "trainval" else [split]
    rows: list = []
    for s in splits:
        rows += torch.load(osp.join(dataset_path, f"{dataset}_{s}.pth"))
    im_dir = transvg_image_dir(data_root, dataset)
    items, failures = [], []
    for idx, row in enumerate(rows):
        try:
            if dataset == "flickr":
                img_file, bbox, phrase = row
            else:
                img_file, _, bbox, phrase, _attri = row
            bbox = np.array(bbox, dtype=int)
            if dataset not in ("referit", "flickr"):
                bbox[2], bbox[3] = bbox[0] + bbox[2], bbox[1] + bbox[3]
            img = Image.open(osp.join(im_dir, img_file)).convert("RGB")
            phrase.lower()
            items.append({"img_file": img_file, "phrase": phrase, "size": img.size,
                          "box_xyxy": bbox.astype(np.float64)})
        except Exception as e:  # noqa: BLE001
            failures.append((idx, f"{type(e).__name__}: {e}"))
    return items, failures
