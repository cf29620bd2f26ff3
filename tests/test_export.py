"""``refclip-export`` (issue 21): exports the published SimREC, RefCLIP and TransVG loaders read as they are.

Each export (of a small synthetic dataset and of the RefCOCO-layout reader fixture, with hand-made pseudo
shard sets: fractional boxes, a ``.5`` tie, a zero-height box and a sub-pixel box) is read with the loaders'
parsing rules re-implemented in ``published_loaders.py`` (iid -> file name, ``<mask_id>.npy``, xywh -> xyxy
after TransVG's int cast, ``<dataset>_<split>.pth`` and ``trainval``), and round-trips through
``grounding data prepare``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

import published_loaders as L
from grounding import config, stages
from grounding.cli import app
from grounding.data import synthetic as S
from grounding.data.refcoco import read_refer
from grounding.data.schema import CanonicalDataset
from grounding.refclip import export as E
from grounding.shards import FieldSpec, ShardSetSpec, ShardWriter

try:
    from fixtures import formats as F
except ImportError:  # pragma: no cover - run from the repo root
    from tests.fixtures import formats as F

FORMATS = ("simrec", "refclip", "transvg")


# ---- inputs ---------------------------------------------------------------------------------------------
def write_pseudo(directory: Path, boxes: dict[str, np.ndarray]) -> Path:
    """A refclip-pseudo shard set holding ``boxes`` (ref id -> float32 xyxy)."""
    spec = ShardSetSpec(stage="refclip-pseudo", stage_key="handmade", level="sentence",
                        fields=(FieldSpec("box", "float32", (4,)),), rows_per_shard=16, teacher={"name": "handmade"})
    with ShardWriter(directory, spec, sorted(boxes), progress=False) as w:
        for k in w.todo():
            w.add(k, {"box": np.asarray(boxes[k], np.float32)})
    return directory


def fractional_pseudo(ds: CanonicalDataset) -> tuple[dict[str, np.ndarray], str, str]:
    """Pseudo-boxes for the train refs: GT moved by fractions of a pixel (one ``.5`` tie), plus one of zero
    height (every format leaves it out) and one 0.15 px wide (TransVG's rounding would make it empty)."""
    images = ds.image_index
    train = [r for r in ds.refs if r.split == "train"]
    out = {}
    for n, r in enumerate(train):
        im = images[r.image_id]
        x1, y1, x2, y2 = r.box
        d = [0.5, 0.37, -0.49, -0.21] if n % 2 else [0.26, -0.5, 0.13, 0.44]
        box = np.clip(np.array([x1 + d[0], y1 + d[1], x2 + d[2], y2 + d[3]]), 0, [im.width, im.height] * 2)
        out[r.ref_id] = box.astype(np.float32)
    flat, thin = train[0], train[1]
    bx = out[flat.ref_id]
    out[flat.ref_id] = np.array([bx[0], bx[1], bx[2], bx[1]], np.float32)  # zero height
    bx = out[thin.ref_id]
    out[thin.ref_id] = np.array([bx[0] + 0.3, bx[1], bx[0] + 0.45, bx[3]], np.float32)  # rounds to one column
    return out, flat.ref_id, thin.ref_id


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[CanonicalDataset, Path, dict, str, str]:
    tmp = tmp_path_factory.mktemp("syn")
    ds = S.generate(S.SyntheticConfig(n_images=12, seed=3), tmp / "ds", progress=False)
    ds.save(tmp / "ds")
    ds = CanonicalDataset.load(tmp / "ds")
    boxes, flat, thin = fractional_pseudo(ds)
    return ds, write_pseudo(tmp / "pseudo", boxes), boxes, flat, thin


@pytest.fixture(scope="module")
def refcoco(tmp_path_factory: pytest.TempPathFactory) -> tuple[CanonicalDataset, Path, dict, str, str]:
    tmp = tmp_path_factory.mktemp("refcoco")
    paths = F.make_refcoco(tmp)
    ds = read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    boxes = {"refcoco/1000": np.array([11.3, 6.7, 29.6, 19.2], np.float32),   # fractional
             "refcoco/1001": np.array([2.5, 3.5, 40.5, 30.5], np.float32)}    # ties: off by exactly 0.5
    return ds, write_pseudo(tmp / "pseudo", boxes), boxes, "", ""


def expected_boxes(ds: CanonicalDataset, pseudo: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What each exported item must carry: the pseudo-box for train, GT otherwise (float64 xyxy)."""
    return {r.ref_id: np.asarray(pseudo[r.ref_id] if r.split == "train" else r.box, np.float64)
            for r in ds.refs if (r.split == "train" and r.ref_id in pseudo) or (r.split != "train" and r.box)}


def dropped_for(fmt: str, flat: str, thin: str) -> set[str]:
    return {x for x in (flat, thin if fmt == "transvg" else "") if x}


# ---- the loaders' view of an export ----------------------------------------------------------------------
def loader_view(fmt: str, out: Path) -> dict[str, tuple[list[dict], list]]:
    """Every split of the export read with the published loader's rules: ``split -> (items, failures)``."""
    prov = json.loads((out / "provenance.json").read_text())
    lp = prov["loader"]
    if fmt == "transvg":
        splits = [p.name[len(lp["dataset"]) + 1:-4] for p in sorted((out / lp["split_dir"]).glob("*.pth"))]
        if "trainval" not in splits:
            splits.append("trainval")
        return {s: L.read_transvg(out / lp["data_root"], out / lp["split_root"], lp["dataset"], s) for s in splits}
    doc = json.loads((out / lp["ann_path"]).read_text())
    if fmt == "simrec":
        return {s: L.read_simrec(out / lp["ann_path"], out / lp["image_path"], out / lp["mask_path"], lp["dataset"], s)
                for s in doc}
    return {s: L.read_refclip(out / lp["ann_path"], out / lp["image_path"], lp["dataset"], s) for s in doc}


def item_ref_ids(fmt: str, out: Path, split: str, items: list[dict]) -> list[str]:
    """The ref id of each item, from the item (JSON) or the provenance's row list (TransVG)."""
    if fmt != "transvg":
        return [it["ref_id"] for it in items]
    rows = json.loads((out / "provenance.json").read_text())["rows"]
    if split == "trainval" and "trainval" not in rows:
        return rows.get("train", {"ref_ids": []})["ref_ids"] + rows.get("val", {"ref_ids": []})["ref_ids"]
    return rows[split]["ref_ids"]


def check_export(fmt: str, ds: CanonicalDataset, out: Path, pseudo: dict, drop: set[str]) -> None:
    """The loader reads every item, each box after its conversion within the stated tolerance of the
    source box, images are real files (links or copies) of the decoded size, SimREC masks are (H, W) uint8."""
    prov = json.loads((out / "provenance.json").read_text())
    expected = {k: v for k, v in expected_boxes(ds, pseudo).items() if k not in drop}
    assert {d["ref_id"] for d in prov["dropped"]} == drop
    tol = {"transvg": 0.5, "simrec": 0.0, "refclip": 0.0}[fmt]
    assert prov["box_max_error_px"] == tol
    by_ref = {r.ref_id: r for r in ds.refs}
    images = ds.image_index
    seen: set[str] = set()
    for split, (items, failures) in loader_view(fmt, out).items():
        assert failures == [], (split, failures[:3])
        ids = item_ref_ids(fmt, out, split, items)
        assert len(ids) == len(items)
        if split != "trainval":
            assert sum(prov["boxes_by_split"][split].values()) == len(items)
            seen.update(ids)
        for rid, it in zip(ids, items):
            r = by_ref[rid]
            assert split == "trainval" or r.split == split
            err = np.abs(it["box_xyxy"] - expected[rid]).max()
            assert err <= tol + 1e-9, (fmt, rid, it["box_xyxy"], expected[rid])
            im = images[r.image_id]
            size = it["size"] if fmt == "transvg" else it["shape"][::-1]
            assert tuple(size) == (im.width, im.height)
            if fmt != "transvg":
                assert it["iid"] == prov["image_ids"]["map"][r.image_id]
                assert it["refs"] == [r.text]
            if fmt == "simrec":
                m = it["mask"]
                assert m.dtype == np.uint8 and m.shape == (im.height, im.width) and set(np.unique(m)) <= {0, 1}
                if r.split != "train" and r.mask is not None:
                    rle = {"size": r.mask["size"], "counts": r.mask["counts"].encode()}
                    assert np.array_equal(m, mask_utils.decode(rle))
                else:  # the filled (pseudo- or GT) box
                    ys, xs = np.nonzero(m)
                    b = expected[rid]
                    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (
                        np.floor(b[0]), np.floor(b[1]), np.ceil(b[2]), np.ceil(b[3]))
                    assert m.sum() == (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min())
    assert seen == set(expected)
    image_dir = out / prov["loader"]["image_dir" if fmt == "transvg" else "image_path"]
    for image_id, iid in prov["image_ids"]["map"].items():
        name = (F.COCO_NAME % iid) if prov["layout"] == "refcoco" else f"{iid}.jpg"
        dst, src = image_dir / name, Path(ds.image_root) / images[image_id].path
        assert dst.is_file() and not dst.is_symlink()
        assert os.path.samefile(dst, src) or dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", ["synthetic", "refcoco"])
def test_published_loaders_read_every_exported_item(fmt: str, which: str, request: pytest.FixtureRequest,
                                                    tmp_path: Path) -> None:
    ds, pseudo_dir, pseudo, flat, thin = request.getfixturevalue(which)
    out = tmp_path / fmt
    files = E.export_pseudo(pseudo_dir, ds, out, fmt)
    assert all(f.is_file() for f in files) and files[-1].name == "provenance.json"
    check_export(fmt, ds, out, pseudo, dropped_for(fmt, flat, thin))
    prov = json.loads((out / "provenance.json").read_text())
    if which == "synthetic":  # non-numeric ids: 0..n-1 in sorted order
        assert prov["image_ids"]["rule"] == "sorted"
        assert prov["image_ids"]["map"] == {i: n for n, i in enumerate(sorted(ds.image_index))
                                            if i in prov["image_ids"]["map"]}
    else:  # COCO ids are kept: the images are the COCO files themselves
        assert prov["image_ids"]["rule"] == "numeric" and prov["image_ids"]["map"] == {"1": 1, "2": 2}
    if fmt == "transvg":
        rows = torch.load(out / "data" / "unc" / "unc_train.pth", weights_only=True)
        assert all(isinstance(v, int) for row in rows for v in row[2])
        assert "trainval" not in prov["rows"]  # unc: TransVG concatenates train and val itself
        for split, r in prov["rows"].items():  # float boxes kept beside the integer ones
            assert [list(np.float32(b)) for b in r["boxes_xyxy"]] == [
                list(np.float32(expected_boxes(ds, pseudo)[k])) for k in r["ref_ids"]]
    if fmt == "simrec":
        assert prov["masks"]["files"] == sum(sum(v.values()) for v in prov["boxes_by_split"].values())
        assert len(list((out / prov["loader"]["mask_path"]).glob("*.npy"))) == prov["masks"]["files"]


def test_referit_layout(refcoco: tuple, tmp_path: Path) -> None:
    """ReferIt naming (``%d.jpg`` under images/refclef, anns/refclef.json) and TransVG's referit_trainval.pth."""
    ds, pseudo_dir, pseudo, _, _ = refcoco
    ds = CanonicalDataset(ds.name, ds.image_root, ds.images,  # referit's splits: testA -> test
                          [replace(r, split="test") if r.split == "testA" else r for r in ds.refs], ds.source)
    for fmt in FORMATS:
        out = tmp_path / fmt
        E.export_pseudo(pseudo_dir, ds, out, fmt, layout="referit")
        check_export(fmt, ds, out, pseudo, set())
        prov = json.loads((out / "provenance.json").read_text())
        if fmt == "transvg":
            assert prov["loader"]["dataset"] == "referit"
            trainval = torch.load(out / "data" / "referit" / "referit_trainval.pth", weights_only=True)
            train = torch.load(out / "data" / "referit" / "referit_train.pth", weights_only=True)
            val = torch.load(out / "data" / "referit" / "referit_val.pth", weights_only=True)
            assert trainval == train + val and train[0][2] == [11, 7, 30, 19]  # xyxy, each corner rounded
        else:
            assert prov["loader"]["ann_path"] == "anns/refclef.json" and (out / "images" / "refclef" / "1.jpg").is_file()


def test_transvg_refuses_splits_and_layouts_its_loader_does_not_know(synthetic: tuple, tmp_path: Path) -> None:
    ds, pseudo_dir, *_ = synthetic
    with pytest.raises(ValueError, match=r"splits \['testA', 'testB'\] are not splits TransVG's loader accepts"):
        E.export_pseudo(pseudo_dir, ds, tmp_path / "a", "transvg", layout="referit")
    with pytest.raises(ValueError, match="names its images as the refcoco layout"):
        E.export_pseudo(pseudo_dir, ds, tmp_path / "b", "transvg", layout="referit", transvg_dataset="unc")
    with pytest.raises(ValueError, match="unknown export format 'coco'"):
        E.export_pseudo(pseudo_dir, ds, tmp_path / "c", "coco")


def test_transvg_integers_survive_the_cast() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 600, (2000, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 300, (2000, 2))], 1).astype(np.float32)
    boxes[:5] = [[0.5, 1.5, 2.5, 3.5], [10.49, 0, 20.51, 7.5], [0, 0, 1, 1], [3.25, 4.75, 9.5, 9.5], [1, 2, 3, 4]]
    for fmt in ("xywh", "xyxy"):
        ints = np.array([E.transvg_int_box(b, fmt) for b in boxes], dtype=int)  # TransVG's cast
        if fmt == "xywh":
            ints[:, 2], ints[:, 3] = ints[:, 0] + ints[:, 2], ints[:, 1] + ints[:, 3]
        assert np.abs(ints - boxes.astype(np.float64)).max() <= 0.5


def test_integer_image_ids() -> None:
    assert E.integer_image_ids(["10", "2"]) == ({"10": 10, "2": 2}, "numeric")
    assert E.integer_image_ids(["syn000001", "syn000000"]) == ({"syn000000": 0, "syn000001": 1}, "sorted")
    assert E.integer_image_ids(["01", "1"]) == ({"01": 0, "1": 1}, "sorted")  # would collide as ints
    assert E.integer_image_ids(["7", "a"])[1] == "sorted"


# ---- round trip through `grounding data prepare` ---------------------------------------------------------
READ_BACK = {"simrec": ("simrec", "anns/refcoco.json", "images/coco", ["dataset=refcoco"]),
             "refclip": ("simrec", "anns/refcoco.json", "images/train2014", ["dataset=refcoco"]),
             "transvg": ("transvg", "data", "ln_data/other/images/mscoco/images/train2014", ["dataset=unc"])}


@pytest.mark.parametrize("fmt", FORMATS)
def test_prepare_round_trip(fmt: str, synthetic: tuple, tmp_path: Path) -> None:
    """``grounding data prepare`` of each export gives back every box within the stated tolerance, with the
    export's counts and splits."""
    ds, pseudo_dir, pseudo, flat, thin = synthetic
    out = tmp_path / "export"
    E.export_pseudo(pseudo_dir, ds, out, fmt)
    prov = json.loads((out / "provenance.json").read_text())
    reader, root, image_root, options = READ_BACK[fmt]
    args = ["data", "prepare", "--format", reader, "--root", str(out / root), "--image-root", str(out / image_root),
            "--name", "back", "--set", f"paths.prepared={tmp_path / 'prepared'}", "--set", "progress=false"]
    for o in options:
        args += ["--option", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    back = CanonicalDataset.load(tmp_path / "prepared" / "back")
    assert back.errors == []
    counts: dict[str, int] = {}
    for r in back.refs:
        counts[r.split] = counts.get(r.split, 0) + 1
    assert counts == {s: sum(v.values()) for s, v in prov["boxes_by_split"].items()}
    expected = expected_boxes(ds, pseudo)
    if fmt == "transvg":
        source = {r.ref_id: prov["rows"][r.split]["ref_ids"][int(r.ref_id.rsplit("/", 1)[1])] for r in back.refs}
    else:
        doc = json.loads((out / root).read_text())
        by_mask = {it["mask_id"]: it["ref_id"] for items in doc.values() for it in items}
        source = {r.ref_id: by_mask[int(r.ref_id.split("/")[1])] for r in back.refs}
    errors = [np.abs(np.asarray(r.box, np.float64) - np.float32(expected[source[r.ref_id]])).max() for r in back.refs]
    assert max(errors) <= prov["box_max_error_px"] + 1e-6
    assert set(source.values()) == set(expected) - dropped_for(fmt, flat, thin)


# ---- the stage and the CLI -----------------------------------------------------------------------------
def test_stage_writes_the_configured_format_only(synthetic: tuple, tmp_path: Path) -> None:
    ds, _, pseudo, *_ = synthetic
    sets = [f"paths.{k}={tmp_path / k}" for k in ("prepared", "teachers", "models", "metrics")]
    p = config.load(None, [*sets, "dataset.synthetic.n_images=12", "dataset.synthetic.seed=3", "progress=false"])
    stages.run("prepare", p)
    assert CanonicalDataset.load(p.prepared_dir()).fingerprint() == ds.fingerprint()
    write_pseudo(p.teacher_dir("refclip-pseudo"), pseudo)
    out = stages.run("refclip-export", p).path
    assert out == p.teacher_dir("refclip-export") / "simrec" and (out / "masks" / "refcoco").is_dir()
    images = json.loads((out / "provenance.json").read_text())["images"]
    assert images["copied"] == images["files"] > 0  # under paths.prepared (a DVC-cached output): copies
    before = (out / "provenance.json").stat().st_mtime_ns
    assert stages.run("refclip-export", p).path == out and (out / "provenance.json").stat().st_mtime_ns == before
    p2 = config.load(None, [*sets, "dataset.synthetic.n_images=12", "dataset.synthetic.seed=3", "progress=false",
                            "refclip.export_format=transvg"])
    out2 = stages.run("refclip-export", p2).path
    assert (out2 / "data" / "unc" / "unc_train.pth").is_file() and not out.exists()  # no stale export left
    p3 = config.load(None, [*sets, "dataset.synthetic.n_images=12", "dataset.synthetic.seed=3", "progress=false",
                            "refclip.export_format=transvg", "refclip.export_layout=referit"])
    with pytest.raises(config.ConfigError, match="not splits TransVG's loader accepts"):
        stages.run("refclip-export", p3)
    assert (out2 / "data" / "unc" / "unc_train.pth").is_file()  # a failed export keeps the previous one
    assert [q.name for q in out2.parent.parent.iterdir() if not q.name.endswith(".stage.json")] == ["synthetic"]  # and leaves no partial one (the engine's record lies beside)
    res = CliRunner().invoke(app, ["run", "refclip-export", "--no-deps", *(f"--set={x}" for x in sets),
                                   "--set=dataset.synthetic.n_images=12", "--set=dataset.synthetic.seed=3",
                                   "--set=refclip.export_format=transvg", "--set=refclip.export_layout=referit"])
    assert res.exit_code == 2 and "not splits TransVG's loader accepts" in res.output and "Traceback" not in res.output


def test_export_cli(synthetic: tuple, tmp_path: Path) -> None:
    ds, pseudo_dir, pseudo, flat, thin = synthetic
    ds.save(tmp_path / "prepared" / "synthetic")
    sets = ["--set", f"paths.prepared={tmp_path / 'prepared'}"]
    res = CliRunner().invoke(app, ["export", "pseudo", "-f", "refclip", "-o", str(tmp_path / "rc"),
                                   "--from", str(pseudo_dir), *sets])
    assert res.exit_code == 0, res.output
    check_export("refclip", ds, tmp_path / "rc", pseudo, dropped_for("refclip", flat, thin))
    images = json.loads((tmp_path / "rc" / "provenance.json").read_text())["images"]
    assert images["linked"] == images["files"] > 0  # a user's image folder: hard links
    res = CliRunner().invoke(app, ["export", "pseudo", "-f", "simrec", "-o", str(tmp_path / "rc"),
                                   "--from", str(pseudo_dir), *sets])  # replaces the earlier export whole
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "rc" / "images" / "train2014").exists() and (tmp_path / "rc" / "masks").is_dir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(app, ["export", "pseudo", "-f", "simrec", "-o", str(tmp_path / "mine"),
                                   "--from", str(pseudo_dir), *sets])
    assert res.exit_code == 2 and "not an earlier export" in res.output  # a ConfigError: exit 2, as everywhere
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    res = CliRunner().invoke(app, ["export", "pseudo", "-f", "transvg", "--layout", "referit", "-o",
                                   str(tmp_path / "tv"), "--from", str(pseudo_dir), *sets])
    assert res.exit_code == 2 and "not splits TransVG's loader accepts" in res.output
    res = CliRunner().invoke(app, ["export", "pseudo", "-f", "coco", "-o", str(tmp_path / "x"),
                                   "--from", str(pseudo_dir), *sets])
    assert res.exit_code == 2 and "unknown export format" in res.output
