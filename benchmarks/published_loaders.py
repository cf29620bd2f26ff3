"""Read exports with the published loaders' own, unmodified code (issue 21), from local checkouts.

    python benchmarks/published_loaders.py EXPORTS --refclip DIR --simrec DIR --transvg DIR

``EXPORTS`` holds ``simrec/``, ``refclip/`` and ``transvg/`` exports (``benchmarks/export_loaders.py``
writes them to ``benchmarks/out/export_loaders``); ``DIR`` s are checkouts of kingthreestones/RefCLIP,
luogen1996/SimREC and djiajunustc/TransVG (nothing of them is copied into this project). Their dataset
classes are imported from the checkouts and every item of every split is fetched (``__getitem__`` for the
JSON loaders, ``pull_item`` for TransVG, which needs no BERT). Only what the item parsing does not use is
stubbed: the spaCy GloVe package (``use_glove=False``), the BERT tokenizer, ``scipy.io``, and the
packages' ``__init__`` modules (they build training loaders / need an old torchvision). Prints items read
per split and, for TransVG, the largest distance between the box its loader returns and the float box
kept in the provenance.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np


def _stub(name: str, **attrs: object) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _package(name: str, path: Path) -> None:
    """``name`` as a bare package over ``path`` (its ``__init__`` is not run)."""
    _stub(name, __path__=[str(path)])


def _forget(*prefixes: str) -> None:
    for m in [m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in prefixes)]:
        del sys.modules[m]


def _fetch_all(ds: object, fetch) -> tuple[int, list[str]]:
    ok, errors = 0, []
    for i in range(len(ds)):
        try:
            fetch(i)
            ok += 1
        except Exception as e:  # noqa: BLE001 - any loader crash counts
            errors.append(f"{type(e).__name__}: {e}")
    return ok, errors


def refclip(repo: Path, export: Path) -> None:
    lp = json.loads((export / "provenance.json").read_text())["loader"]
    sys.path.insert(0, str(repo))
    try:
        dl = importlib.import_module("datasets.dataloader")
        cfg = types.SimpleNamespace(DATASET=lp["dataset"], ANN_PATH={lp["dataset"]: str(export / lp["ann_path"])},
                                    IMAGE_PATH={lp["dataset"]: str(export / lp["image_path"])}, INPUT_SHAPE=[416, 416],
                                    USE_GLOVE=False, MAX_TOKEN=15, MEAN=[0.485, 0.456, 0.406], STD=[0.229, 0.224, 0.225])
        for split in json.loads((export / lp["ann_path"]).read_text()):
            ds = dl.RefCOCODataSet(cfg, split)
            ok, errors = _fetch_all(ds, ds.__getitem__)
            print(f"RefCLIP {lp['dataset']} {split}: {ok}/{len(ds)} items read; errors: {errors[:1]}")
    finally:
        sys.path.remove(str(repo))
        _forget("datasets", "utils")


def simrec(repo: Path, export: Path) -> None:
    from torchvision.transforms import transforms as T

    lp = json.loads((export / "provenance.json").read_text())["loader"]
    sys.path.insert(0, str(repo))
    try:
        _package("simrec.datasets", repo / "simrec" / "datasets")
        sd = importlib.import_module("simrec.datasets.dataset")
        tf = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        key = lp["dataset"]
        for split in json.loads((export / lp["ann_path"]).read_text()):
            ds = sd.RefCOCODataSet({key: str(export / lp["ann_path"])}, {key: str(export / lp["image_path"])},
                                   {key: str(export / lp["mask_path"])}, [416, 416], False, tf, {}, 15,
                                   use_glove=False, split=split, dataset=key)

            def fetch(i: int) -> None:
                mask = ds[i][2]
                if tuple(mask.shape) != (1, 416, 416) or float(mask.max()) <= 0:
                    raise ValueError(f"mask of shape {tuple(mask.shape)}, max {float(mask.max())}")

            ok, errors = _fetch_all(ds, fetch)
            print(f"SimREC {key} {split}: {ok}/{len(ds)} items read (non-empty 416x416 masks); errors: {errors[:1]}")
    finally:
        sys.path.remove(str(repo))
        _forget("simrec")


def transvg(repo: Path, export: Path) -> None:
    prov = json.loads((export / "provenance.json").read_text())
    lp = prov["loader"]
    sys.path.insert(0, str(repo))
    try:
        _package("datasets", repo / "datasets")
        sys.modules["scipy.io"] = _stub("scipy.io")
        _stub("scipy", io=sys.modules["scipy.io"])
        tok = _stub("pytorch_pretrained_bert.tokenization",
                    BertTokenizer=type("BertTokenizer", (), {"from_pretrained": classmethod(lambda c, *a, **k: c())}))
        _stub("pytorch_pretrained_bert", tokenization=tok)
        tv = importlib.import_module("datasets.data_loader")
        rows = prov["rows"]
        splits = list(rows) + ([] if "trainval" in rows or lp["dataset"] not in ("unc", "unc+", "referit") else ["trainval"])
        for split in splits:
            ds = tv.TransVGDataset(str(export / lp["data_root"]), split_root=str(export / lp["split_root"]),
                                   dataset=lp["dataset"], transform=lambda d: d, split=split)
            truth = rows[split]["boxes_xyxy"] if split in rows else rows["train"]["boxes_xyxy"] + rows["val"]["boxes_xyxy"]
            worst = [0.0]

            def fetch(i: int) -> None:
                box = ds.pull_item(i)[2].numpy()
                worst[0] = max(worst[0], float(np.abs(box - np.array(truth[i])).max()))

            ok, errors = _fetch_all(ds, fetch)
            print(f"TransVG {lp['dataset']} {split}: {ok}/{len(ds)} items read, max box error {worst[0]:.3f} px; "
                  f"errors: {errors[:1]}")
    finally:
        sys.path.remove(str(repo))
        _forget("datasets", "utils", "pytorch_pretrained_bert", "scipy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", type=Path)
    ap.add_argument("--refclip", type=Path)
    ap.add_argument("--simrec", type=Path)
    ap.add_argument("--transvg", type=Path)
    args = ap.parse_args()
    _stub("en_vectors_web_lg")
    for name, fn in (("refclip", refclip), ("simrec", simrec), ("transvg", transvg)):
        repo = getattr(args, name)
        if repo is not None:
            fn(repo.resolve(), (args.exports / name).resolve())


if __name__ == "__main__":
    main()
