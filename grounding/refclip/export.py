"""Export pseudo-labels as files that SimREC, RefCLIP and TransVG read with their published loaders, as is.

``fmt`` picks the loader, ``layout`` whose file-naming rules the export follows (``refcoco``: the RefCOCO
family, images ``COCO_train2014_%012d.jpg``; ``referit``: images ``%d.jpg``). Each export is a directory
laid out as that project's default config expects, relative to the directory it is run from:

* ``simrec`` (luogen1996/SimREC ``simrec/datasets/dataset.py``): ``anns/<name>.json``,
  ``images/<coco|refclef>/<file>``, ``masks/<name>/<mask_id>.npy`` (one per item: uint8 ``(H, W)`` 0/1,
  as SimREC's ``data_process.py`` saves ``refer.getMask``); point ``ann_path``/``image_path``/``mask_path``
  of its dataset config here;
* ``refclip`` (kingthreestones/RefCLIP ``datasets/dataloader.py``): ``anns/<name>.json``,
  ``images/<train2014|refclef>/<file>``;
* ``transvg`` (djiajunustc/TransVG ``datasets/data_loader.py``): ``data/<dataset>/<dataset>_<split>.pth``
  (``--split_root data``) and the images under ``ln_data/`` (``--data_root ln_data``) in TransVG's folders;
  ReferIt also gets ``referit_trainval.pth`` (train + val rows: TransVG reads that file, while for the
  other datasets it concatenates the train and val files itself).

JSON items are ``{"iid", "bbox": [x, y, w, h], "cat_id", "refs": [text], "mask_id", "ref_id"}`` (one item per
sentence: pseudo-boxes differ per sentence), boxes float xywh in original pixels: the loaders use them
as floats, so they read back exactly. TransVG rows are ``(img_file, mask_file, bbox, phrase, [])``
(``(img_file, bbox, phrase)`` for flickr); its loader casts the box with ``np.array(bbox, dtype=int)``
*before* ``x2 = x + w`` (RefCOCO family; ReferIt/Flickr boxes are xyxy), so the export writes integers:
``x = round(x1)``, ``w = round(x2) - round(x1)`` (likewise y, h; xyxy: each corner rounded), which the cast
keeps exactly: every coordinate within 0.5 px of the float box, which ``provenance.json`` keeps.

Both JSON loaders build the image file name from an integer ``iid``: datasets whose image ids are all
decimal numbers keep them; otherwise images get ``0..n-1`` in sorted image-id order (the map is in the
provenance). Images are hard-linked (copied where a link fails, or when they lie in the pipeline's
prepared outputs, which DVC caches; never symlinked) under the names the loader builds. Training splits
(``pseudo_splits``) get pseudo-boxes; the other splits keep their GT boxes
(students are evaluated on them). SimREC masks: the dataset's mask RLE for GT items (the filled box where
the dataset has no mask), the filled pseudo-box for pseudo-labelled items (a GT mask would be full
supervision and would not match the box). Items a reader would refuse (a box of zero size, or outside its
image, or zero-sized once rounded for TransVG) are left out and listed under ``dropped`` in the provenance.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from grounding.boxes import convert, validate_xyxy
from grounding.config import ConfigError
from grounding.data.schema import CanonicalDataset, DataError, ImageRecord, RefRecord
from grounding.data.simrec import SIMREC_IMAGE_PATTERNS, image_file_name
from grounding.shards import ShardSet

log = logging.getLogger(__name__)

FORMATS = ("simrec", "refclip", "transvg")
LAYOUTS = ("refcoco", "referit")
#: Largest distance (px) between an exported coordinate, after the loader's own conversion, and the float box.
MAX_BOX_ERROR = {"simrec": 0.0, "refclip": 0.0, "transvg": 0.5}
#: TransVG datasets whose images follow each layout's naming, and TransVG's image folder (under ``ln_data``).
TRANSVG_IMAGE_DIRS = {"unc": "other/images/mscoco/images/train2014", "unc+": "other/images/mscoco/images/train2014",
                      "gref": "other/images/mscoco/images/train2014",
                      "gref_umd": "other/images/mscoco/images/train2014",
                      "referit": "referit/images", "flickr": "Flickr30k/flickr30k_images"}
TRANSVG_LAYOUT = {"unc": "refcoco", "unc+": "refcoco", "gref": "refcoco", "gref_umd": "refcoco",
                  "referit": "referit", "flickr": "referit"}

Row = tuple[RefRecord, np.ndarray, str]


# ---- names the loaders build ------------------------------------------------------------------------
def integer_image_ids(image_ids: Iterable[str]) -> tuple[dict[str, int], str]:
    """``image_id -> iid`` and the rule used: ``"numeric"`` (every id is a decimal number: kept) or
    ``"sorted"`` (0..n-1 in sorted id order, deterministic for a given set of ids)."""
    ids = sorted(set(image_ids))
    if all(i.isascii() and i.isdigit() for i in ids) and len({int(i) for i in ids}) == len(ids):
        return {i: int(i) for i in ids}, "numeric"
    return {i: n for n, i in enumerate(ids)}, "sorted"


def json_dataset(layout: str, ds: CanonicalDataset) -> tuple[str, str]:
    """``(dataset, file stem)`` for SimREC/RefCLIP: the loader's ``DATASET`` key and the name its default
    config gives the annotation file and mask folder (``referit`` -> ``refclef``)."""
    if layout == "referit":
        return "referit", "refclef"
    src = ds.source.get("dataset")
    name = src if src in ("refcoco", "refcoco+", "refcocog") else "refcoco"
    return name, name


def default_transvg_dataset(layout: str, ds: CanonicalDataset) -> str:
    """The TransVG dataset an export of ``layout`` names by default: ``referit``, or the RefCOCO family
    member of the source (``unc+`` for refcoco+, ``gref``/``gref_umd`` for refcocog) else ``unc``."""
    if layout == "referit":
        return "referit"
    src, split_by = ds.source.get("dataset"), ds.source.get("split_by")
    if src == "refcoco+":
        return "unc+"
    if src == "refcocog":
        return "gref" if split_by == "google" else "gref_umd"
    return "unc"


def loader_paths(fmt: str, layout: str, ds: CanonicalDataset, transvg_dataset: str | None = None) -> dict[str, str]:
    """Where the loader of ``fmt`` looks, relative to the export directory, and the dataset name to give it."""
    if fmt == "transvg":
        tv = transvg_dataset or default_transvg_dataset(layout, ds)
        return {"dataset": tv, "split_root": "data", "split_dir": f"data/{tv}", "data_root": "ln_data",
                "image_dir": f"ln_data/{TRANSVG_IMAGE_DIRS[tv]}"}
    dataset, stem = json_dataset(layout, ds)
    coco = layout == "refcoco"
    paths = {"dataset": dataset, "ann_path": f"anns/{stem}.json"}
    if fmt == "simrec":
        paths |= {"image_path": "images/coco" if coco else "images/refclef", "mask_path": f"masks/{stem}"}
    else:
        paths |= {"image_path": "images/train2014" if coco else "images/refclef"}
    return paths


# ---- boxes and masks --------------------------------------------------------------------------------
def _round(v: float) -> int:
    """Round half up (the same on every platform and Python version)."""
    return int(np.floor(v + 0.5))


def transvg_int_box(box_xyxy: np.ndarray, box_format: str) -> list[int]:
    """Integers TransVG's ``np.array(bbox, dtype=int)`` keeps as they are: xywh ``[round(x1), round(y1),
    round(x2) - round(x1), round(y2) - round(y1)]`` (so ``x + w = round(x2)``) or xyxy each corner rounded."""
    x1, y1, x2, y2 = (_round(float(v)) for v in box_xyxy)
    return [x1, y1, x2 - x1, y2 - y1] if box_format == "xywh" else [x1, y1, x2, y2]


def filled_box_mask(box_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``(height, width)`` 0/1 mask of every pixel the box overlaps (rows ``floor(y1)..ceil(y2)-1``,
    likewise columns), so a box of positive size never gives an empty mask."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    m = np.zeros((height, width), dtype=np.uint8)
    r0, r1 = max(int(np.floor(y1)), 0), min(int(np.ceil(y2)), height)
    c0, c1 = max(int(np.floor(x1)), 0), min(int(np.ceil(x2)), width)
    m[r0:r1, c0:c1] = 1
    return m


def rle_mask(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    """uint8 ``(height, width)`` 0/1 mask of a compressed COCO RLE ``{"size": [h, w], "counts": str}``."""
    from pycocotools import mask as mask_utils

    if [int(v) for v in rle["size"]] != [height, width]:
        raise ValueError(f"mask RLE size {rle['size']} is not the image's [{height}, {width}]")
    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    return mask_utils.decode({"size": [height, width], "counts": counts}).astype(np.uint8)


def link_or_copy(src: Path, dst: Path, *, copy: bool = False) -> str:
    """Hard-link ``src`` at ``dst`` (replacing what is there), copying where a link is refused (another
    file system, no permission) or ``copy`` is set; never a symlink. Returns ``"linked"`` or ``"copied"``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if not copy:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return "copied"


def images_inside(ds: CanonicalDataset, directory: str | os.PathLike[str]) -> bool:
    """Whether ``ds``'s images lie under ``directory`` (the pipeline's prepared outputs, which DVC caches: it
    replaces a cached file that has other hard links with a copy, so those images are copied, not linked)."""
    try:
        return Path(ds.image_root).resolve().is_relative_to(Path(directory).resolve())
    except OSError:
        return False


# ---- rows -------------------------------------------------------------------------------------------
def labelled_refs(pseudo: ShardSet, ds: CanonicalDataset, pseudo_splits: Iterable[str]) -> list[Row]:
    """``(ref, xyxy box, source)`` in ref-id order: pseudo-box for ``pseudo_splits``, GT for the others;
    ``source`` is ``"pseudo"`` or ``"gt"``. Training refs without a pseudo-box are left out."""
    wanted = set(pseudo_splits)
    out: list[Row] = []
    for r in ds.refs:
        if r.split in wanted:
            if r.ref_id in pseudo:
                out.append((r, pseudo.get(r.ref_id, ["box"])["box"], "pseudo"))
        elif r.box is not None:
            out.append((r, np.asarray(r.box, dtype=np.float32), "gt"))
    return out


def usable_rows(rows: list[Row], images: dict[str, ImageRecord], fmt: str, box_format: str = "xyxy"
                ) -> tuple[list[Row], list[dict[str, str]]]:
    """The rows the project's readers accept (box of positive size, inside its image within 1 px; for
    TransVG also once rounded) and ``{"ref_id", "source", "reason"}`` for the others."""
    kept: list[Row] = []
    dropped: list[dict[str, str]] = []
    for r, box, source in rows:
        im = images[r.image_id]
        reason = None
        try:
            validate_xyxy(box[None], im.width, im.height, name=f"box {[float(v) for v in box]}")
        except ValueError as e:
            reason = str(e)
        if reason is None and fmt == "transvg":
            x1, y1, a, b = transvg_int_box(box, box_format)
            w, h = (a, b) if box_format == "xywh" else (a - x1, b - y1)
            if w <= 0 or h <= 0:
                reason = f"box {[float(v) for v in box]} has zero size once rounded to integers for TransVG"
        if reason is None:
            kept.append((r, box, source))
        else:
            dropped.append({"ref_id": r.ref_id, "source": source, "reason": reason})
    return kept, dropped


def simrec_document(rows: list[Row], classes: list[str], iids: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """The SimREC/RefCLIP JSON document (boxes xywh, original pixels; ``mask_id`` = row index);
    ``cat_id`` indexes ``classes`` (-1: none)."""
    cat = {c: i for i, c in enumerate(classes)}
    doc: dict[str, list[dict[str, Any]]] = {}
    for mask_id, (r, box, _) in enumerate(rows):
        xywh = convert(box[None], "xyxy", "xywh", dtype=np.float64)[0]  # exact: reads back to the same box
        doc.setdefault(r.split, []).append({
            "iid": iids[r.image_id], "bbox": [float(v) for v in xywh], "cat_id": cat.get(r.category or "", -1),
            "refs": [r.text], "mask_id": mask_id, "ref_id": r.ref_id,
        })
    return dict(sorted(doc.items()))


def transvg_rows(rows: list[Row], dataset: str, file_of: dict[str, str]) -> dict[str, list[tuple]]:
    """TransVG tuples per split: integer bbox in ``dataset``'s convention, ``img_file`` from ``file_of``."""
    from grounding.data.transvg import TRANSVG_BOX_FORMAT

    fmt = TRANSVG_BOX_FORMAT[dataset]
    out: dict[str, list[tuple]] = {}
    for i, (r, box, _) in enumerate(rows):
        bbox = transvg_int_box(box, fmt)
        img_file = file_of[r.image_id]
        row = (img_file, bbox, r.text) if dataset == "flickr" else (img_file, f"{i}.pth", bbox, r.text, [])
        out.setdefault(r.split, []).append(row)
    return dict(sorted(out.items()))


def _check_transvg(dataset: str, layout: str, splits: Iterable[str]) -> None:
    from grounding.data.transvg import TRANSVG_SPLITS

    if dataset not in TRANSVG_LAYOUT:
        raise ConfigError(f"refclip.transvg_dataset {dataset!r} is not a TransVG dataset; use one of "
                          f"{', '.join(TRANSVG_LAYOUT)}")
    if TRANSVG_LAYOUT[dataset] != layout:
        fits = [d for d, lay in TRANSVG_LAYOUT.items() if lay == layout]
        raise ConfigError(f"refclip.transvg_dataset {dataset!r} names its images as the {TRANSVG_LAYOUT[dataset]} "
                          f"layout, not {layout!r}: use one of {', '.join(fits)} (or export_layout "
                          f"{TRANSVG_LAYOUT[dataset]})")
    known = [s for s in TRANSVG_SPLITS[dataset] if s != "trainval"]
    bad = sorted(set(splits) - set(known))
    if bad:
        raise ConfigError(f"splits {bad} are not splits TransVG's loader accepts for dataset {dataset!r} "
                          f"({', '.join(TRANSVG_SPLITS[dataset])}); choose a transvg_dataset whose splits are the "
                          f"dataset's (unc/unc+: train, val, testA, testB; gref_umd, referit, flickr: train, val, test)")


# ---- the export -------------------------------------------------------------------------------------
def export_pseudo(pseudo_dir: str | Path, ds: CanonicalDataset, out: str | Path, fmt: str, *,
                  layout: str = "refcoco", pseudo_splits: Iterable[str] = ("train",),
                  transvg_dataset: str | None = None, classes: list[str] | None = None,
                  copy_images: bool = False) -> list[Path]:
    """Write the export of ``fmt`` (``simrec`` | ``refclip`` | ``transvg``) in ``layout`` (``refcoco`` |
    ``referit``) under the directory ``out`` (new, empty, or an earlier export, which is replaced), plus
    ``out/provenance.json``; returns the annotation files and the provenance (images and masks are counted
    in the provenance). Images are hard links unless ``copy_images``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown export layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    from grounding.data.transvg import TRANSVG_BOX_FORMAT

    if fmt == "transvg":
        transvg_dataset = transvg_dataset or default_transvg_dataset(layout, ds)
        _check_transvg(transvg_dataset, layout, ())
    pseudo = ShardSet(pseudo_dir)
    splits = tuple(pseudo_splits)
    images = ds.image_index
    paths = loader_paths(fmt, layout, ds, transvg_dataset)
    box_format = TRANSVG_BOX_FORMAT[paths["dataset"]] if fmt == "transvg" else "xyxy"
    rows, dropped = usable_rows(labelled_refs(pseudo, ds, splits), images, fmt, box_format)
    if fmt == "transvg":
        _check_transvg(paths["dataset"], layout, {r.split for r, _, _ in rows})
    for d in dropped:
        log.warning("refclip-export: left out %s (%s): %s", d["ref_id"], d["source"], d["reason"])
    iids, id_rule = integer_image_ids(images)
    pattern = SIMREC_IMAGE_PATTERNS[layout]
    file_of = {i: image_file_name(pattern, iid) for i, iid in iids.items()}

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / "provenance.json").is_file():
            raise ConfigError(f"{out}: not empty and not an earlier export (no provenance.json); export into a "
                              f"new or empty directory")
        shutil.rmtree(out)  # an earlier export: replaced whole, so no stale masks, images or splits remain
    out.mkdir(parents=True, exist_ok=True)
    used = sorted({r.image_id for r, _, _ in rows})
    image_dir = out / paths["image_dir" if fmt == "transvg" else "image_path"]
    how = {"linked": 0, "copied": 0}
    for image_id in used:
        how[link_or_copy(Path(ds.image_root) / images[image_id].path, image_dir / file_of[image_id],
                         copy=copy_images)] += 1
    rotated = sum(images[i].orientation != "none" for i in used)
    if rotated:
        log.warning("refclip-export: %d images carry an EXIF orientation; the loaders may decode them "
                    "differently from the canonical (oriented) pixels the boxes refer to", rotated)

    classes = classes if classes is not None else sorted({r.category for r in ds.refs if r.category})
    written: list[Path] = []
    extra: dict[str, Any] = {}
    if fmt in ("simrec", "refclip"):
        ann = out / paths["ann_path"]
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps(simrec_document(rows, classes, iids), indent=None, sort_keys=True) + "\n")
        written.append(ann)
        if fmt == "simrec":
            extra["masks"] = _write_masks(rows, images, out / paths["mask_path"])
    else:
        tv = paths["dataset"]
        per_split = transvg_rows(rows, tv, file_of)
        refs_of: dict[str, list[Row]] = {}
        for row in rows:
            refs_of.setdefault(row[0].split, []).append(row)
        if tv == "referit" and ("train" in per_split or "val" in per_split):
            per_split["trainval"] = per_split.get("train", []) + per_split.get("val", [])
            refs_of["trainval"] = refs_of.get("train", []) + refs_of.get("val", [])
        for split, items in sorted(per_split.items()):
            path = out / paths["split_dir"] / f"{tv}_{split}.pth"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(items, path)
            written.append(path)
        extra["rows"] = {split: {"ref_ids": [r.ref_id for r, _, _ in rs],
                                 "boxes_xyxy": [[float(v) for v in box] for _, box, _ in rs]}
                         for split, rs in sorted(refs_of.items())}
        extra["trainval"] = ("referit_trainval.pth holds the train rows then the val rows" if tv == "referit"
                             else "TransVG's loader concatenates <dataset>_train.pth and <dataset>_val.pth itself")

    counts: dict[str, dict[str, int]] = {}
    for r, _, source in rows:
        counts.setdefault(r.split, {}).setdefault(source, 0)
        counts[r.split][source] += 1
    convention = {"simrec": "xywh float, original pixels (used as floats by the loader)",
                  "refclip": "xywh float, original pixels (used as floats by the loader)",
                  "transvg": f"TransVG {paths['dataset']}: {box_format} integers, exact under np.array(bbox, "
                             f"dtype=int); float xyxy boxes under rows"}[fmt]
    prov = {"format": fmt, "layout": layout, "loader": paths,
            "pseudo_shard_set": str(pseudo_dir), "pseudo_stage_key": pseudo.manifest.stage_key,
            "teacher": pseudo.manifest.teacher, "dataset": ds.name, "dataset_fingerprint": ds.fingerprint(),
            "image_root": str(ds.image_root), "pseudo_splits": list(splits), "boxes_by_split": counts,
            "box_convention": convention, "box_max_error_px": MAX_BOX_ERROR[fmt],
            "classes": classes if fmt != "transvg" else None,
            "image_ids": {"rule": id_rule, "pattern": pattern,
                          "map": {i: iids[i] for i in used}},
            "images": {"files": len(used), **how, "exif_oriented": rotated},
            "dropped": dropped, **extra}
    prov_path = out / "provenance.json"
    prov_path.write_text(json.dumps(prov, indent=1, sort_keys=True) + "\n")
    return [*written, prov_path]


def _write_masks(rows: list[Row], images: dict[str, ImageRecord], mask_dir: Path) -> dict[str, Any]:
    """One ``<mask_id>.npy`` (uint8 ``(H, W)`` 0/1) per row; identical masks are hard links of one file."""
    mask_dir.mkdir(parents=True, exist_ok=True)
    first: dict[tuple, Path] = {}
    sources = {"rle": 0, "gt_box": 0, "pseudo_box": 0}
    for mask_id, (r, box, source) in enumerate(rows):
        im = images[r.image_id]
        use_rle = source == "gt" and r.mask is not None
        key = ((r.image_id, "rle", r.mask["counts"]) if use_rle
               else (r.image_id, "box", tuple(float(v) for v in box)))
        sources["rle" if use_rle else f"{source}_box"] += 1
        path = mask_dir / f"{mask_id}.npy"
        if key in first:
            link_or_copy(first[key], path)
            continue
        try:
            m = rle_mask(r.mask, im.height, im.width) if use_rle else filled_box_mask(box, im.height, im.width)
        except ValueError as e:
            raise DataError(f"ref {r.ref_id}: {e}") from None
        if path.is_symlink() or path.exists():
            path.unlink()  # another row's hard link may live here: never write through it
        np.save(path, m)
        first[key] = path
    return {"files": len(rows), "distinct": len(first), "dtype": "uint8", "shape": "(H, W) of the image",
            "values": "0/1", "source": sources}


def run_refclip_export(params: Any) -> Path:
    """Stage ``refclip-export``: the export of ``refclip.export_format`` in ``refclip.export_layout`` under
    ``data/teachers/refclip-export/<dataset>/<format>/`` (the engine reruns it when the pseudo-labels, the
    options or this code change)."""
    from grounding.codeset import code_version
    from grounding.shards.keys import digest
    from grounding.shards.manifest import atomic_write_bytes

    rc = params.refclip
    ds = CanonicalDataset.load(params.prepared_dir())
    pseudo_dir = params.teacher_dir("refclip-pseudo")
    out = params.teacher_dir("refclip-export")
    dest = out / rc.export_format
    key = digest({"pseudo": ShardSet(pseudo_dir).manifest.stage_key, "dataset": ds.fingerprint(),
                  "format": rc.export_format, "layout": rc.export_layout, "transvg_dataset": rc.transvg_dataset,
                  "code": code_version(__name__)})
    done = out / "export.json"  # the export's record (key, files): what the engine fingerprints
    # written beside, then swapped in: one export per dataset (no stale masks, images or other formats), and
    # a failed export leaves the previous one in place
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        files = export_pseudo(pseudo_dir, ds, tmp / rc.export_format, rc.export_format, layout=rc.export_layout,
                              transvg_dataset=rc.transvg_dataset,
                              copy_images=images_inside(ds, params.paths.prepared))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = {"key": key, "files": sorted(str(f.relative_to(tmp)) for f in files)}
    atomic_write_bytes(tmp / done.name, (json.dumps(record, indent=1) + "\n").encode())
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return dest
