"""Export pseudo-labels so existing students train on them unchanged.

* SimREC / RefCLIP JSON: ``{split: [{"iid", "bbox": [x, y, w, h], "cat_id", "refs": [text], "mask_id",
  "ref_id"}]}`` with boxes xywh in original pixels (one item per sentence: pseudo-boxes differ per sentence).
* TransVG ``.pth``: ``<out>/<dataset>/<dataset>_<split>.pth``, a list of tuples ``(img_file, mask_file, bbox,
  phrase, attributes)`` (``(img_file, bbox, phrase)`` for flickr), bbox in the convention TransVG uses
  for that dataset (:data:`grounding.data.transvg.TRANSVG_BOX_FORMAT`: xywh for RefCOCO*, xyxy for
  ReferIt/Flickr).

Training splits (``pseudo_splits``) get pseudo-boxes; the other splits keep their GT boxes (students are
evaluated on them), and sentences without a box are left out. A ``provenance.json`` beside the output says
which is which and where the pseudo-labels came from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from grounding.boxes import convert
from grounding.data.schema import CanonicalDataset, RefRecord
from grounding.shards import ShardSet


def _iid(image_id: str) -> int | str:
    """SimREC's ``iid``: an int for numeric ids (COCO, Flickr, ReferIt), else the id string."""
    return int(image_id) if image_id.isdigit() else image_id


def labelled_refs(pseudo: ShardSet, ds: CanonicalDataset, pseudo_splits: Iterable[str]
                  ) -> list[tuple[RefRecord, np.ndarray, str]]:
    """``(ref, xyxy box, source)`` in ref-id order: pseudo-box for ``pseudo_splits``, GT for the others;
    ``source`` is ``"pseudo"`` or ``"gt"``. Training refs without a pseudo-box are left out."""
    wanted = set(pseudo_splits)
    out: list[tuple[RefRecord, np.ndarray, str]] = []
    for r in ds.refs:
        if r.split in wanted:
            if r.ref_id in pseudo:
                out.append((r, pseudo.get(r.ref_id, ["box"])["box"], "pseudo"))
        elif r.box is not None:
            out.append((r, np.asarray(r.box, dtype=np.float32), "gt"))
    return out


def simrec_document(rows: list[tuple[RefRecord, np.ndarray, str]], classes: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The SimREC JSON document (boxes xywh, original pixels); ``cat_id`` indexes ``classes`` (-1: none)."""
    cat = {c: i for i, c in enumerate(classes)}
    doc: dict[str, list[dict[str, Any]]] = {}
    for mask_id, (r, box, _) in enumerate(rows):
        xywh = convert(box[None], "xyxy", "xywh", dtype=np.float64)[0]  # exact: reads back to the same box
        doc.setdefault(r.split, []).append({
            "iid": _iid(r.image_id), "bbox": [float(v) for v in xywh], "cat_id": cat.get(r.category or "", -1),
            "refs": [r.text], "mask_id": mask_id, "ref_id": r.ref_id,
        })
    return dict(sorted(doc.items()))


def transvg_rows(rows: list[tuple[RefRecord, np.ndarray, str]], ds: CanonicalDataset, dataset: str
                 ) -> dict[str, list[tuple]]:
    """TransVG tuples per split, bbox in ``dataset``'s convention."""
    from grounding.data.transvg import TRANSVG_BOX_FORMAT

    if dataset not in TRANSVG_BOX_FORMAT:
        raise ValueError(f"no TransVG box convention known for {dataset!r}; choose one of {sorted(TRANSVG_BOX_FORMAT)}")
    fmt = TRANSVG_BOX_FORMAT[dataset]
    images = ds.image_index
    out: dict[str, list[tuple]] = {}
    for i, (r, box, _) in enumerate(rows):
        bbox = [float(v) for v in convert(box[None], "xyxy", fmt, dtype=np.float64)[0]]
        img_file = images[r.image_id].path
        row = (img_file, bbox, r.text) if dataset == "flickr" else (img_file, f"{i}.pth", bbox, r.text, [])
        out.setdefault(r.split, []).append(row)
    return dict(sorted(out.items()))


def export_pseudo(pseudo_dir: str | Path, ds: CanonicalDataset, out: str | Path, fmt: str, *,
                  pseudo_splits: Iterable[str] = ("train",), transvg_dataset: str = "unc",
                  classes: list[str] | None = None) -> list[Path]:
    """Write the export of ``fmt`` (``simrec`` → ``out`` is a .json file; ``transvg`` → ``out`` is a
    directory) plus ``provenance.json`` beside it; returns the files written."""
    pseudo = ShardSet(pseudo_dir)
    splits = tuple(pseudo_splits)
    rows = labelled_refs(pseudo, ds, splits)
    out = Path(out)
    if fmt == "simrec":
        classes = classes if classes is not None else sorted({r.category for r in ds.refs if r.category})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(simrec_document(rows, classes), indent=None, sort_keys=True) + "\n")
        written, prov_path = [out], out.with_name(out.stem + ".provenance.json")
    elif fmt == "transvg":
        written = []
        for split, items in transvg_rows(rows, ds, transvg_dataset).items():
            path = out / transvg_dataset / f"{transvg_dataset}_{split}.pth"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(items, path)
            written.append(path)
        prov_path = out / "provenance.json"
    else:
        raise ValueError(f"unknown export format {fmt!r}; use simrec or transvg")
    counts: dict[str, dict[str, int]] = {}
    for r, _, source in rows:
        counts.setdefault(r.split, {}).setdefault(source, 0)
        counts[r.split][source] += 1
    prov = {"format": fmt, "pseudo_shard_set": str(pseudo_dir), "pseudo_stage_key": pseudo.manifest.stage_key,
            "teacher": pseudo.manifest.teacher, "dataset": ds.name, "dataset_fingerprint": ds.fingerprint(),
            "image_root": str(ds.image_root), "pseudo_splits": list(splits), "boxes_by_split": counts,
            "box_convention": "xywh original pixels" if fmt == "simrec" else f"TransVG {transvg_dataset}",
            "classes": classes if fmt == "simrec" else None}
    prov_path.write_text(json.dumps(prov, indent=1, sort_keys=True) + "\n")
    return [*written, prov_path]


def run_refclip_export(params: Any) -> Path:
    """Stage ``refclip-export``: SimREC JSON and TransVG .pth of the pseudo-labels under
    ``data/teachers/refclip-export/<dataset>/``; redone only when the pseudo-labels or options change."""
    from grounding.shards.keys import code_version, digest
    from grounding.shards.manifest import atomic_write_bytes

    ds = CanonicalDataset.load(params.prepared_dir())
    pseudo_dir = params.teacher_dir("refclip-pseudo")
    out = params.teacher_dir("refclip-export")
    key = digest({"pseudo": ShardSet(pseudo_dir).manifest.stage_key, "dataset": ds.fingerprint(),
                  "transvg_dataset": params.refclip.transvg_dataset, "code": code_version([__name__])})
    done = out / "export.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key and all(
            (out / f).exists() for f in json.loads(done.read_text())["files"]):
        logging.getLogger(__name__).info("refclip-export: up to date at %s (key %s)", out, key[:12])
        return out
    done.unlink(missing_ok=True)
    files = export_pseudo(pseudo_dir, ds, out / "simrec" / f"{ds.name}.json", "simrec")
    files += export_pseudo(pseudo_dir, ds, out / "transvg", "transvg", transvg_dataset=params.refclip.transvg_dataset)
    record = {"key": key, "files": sorted(str(f.relative_to(out)) for f in files)}
    atomic_write_bytes(done, (json.dumps(record, indent=1) + "\n").encode())
    return out
