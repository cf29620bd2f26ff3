"""Readers of user formats: records produced, box conventions, masks, fingerprints, bad inputs, safety."""

from __future__ import annotations

import json
import pickle
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from grounding.data import readers
from grounding.data.flickr30k import parse_sentence, read_flickr30k
from grounding.data.refcoco import coco_rle, read_refer, read_referit
from grounding.data.safe_pickle import load_pickle, load_torch_list
from grounding.data.schema import DataError
from grounding.data.simrec import SIMREC_IMAGE_PATTERNS, image_file_name, read_simrec
from grounding.data.transvg import TRANSVG_BOX_FORMAT, read_transvg

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

try:
    from fixtures import formats as F
except ImportError:  # tests/ imported as a package
    from tests.fixtures import formats as F


def f32(*vals: float) -> tuple[float, ...]:
    """Values as the float32 the datasets store."""
    return tuple(float(v) for v in np.asarray(vals, dtype=np.float32))


def by_id(ds):
    return {r.ref_id: r for r in ds.refs}


# ---- safe pickle -----------------------------------------------------------------------------------------


def test_load_pickle_plain_containers(tmp_path):
    obj = [{"a": 1, "b": [1.5, "x", None, True], "c": (1, 2), "d": {1, 2}, "e": frozenset({3}), "f": b"\x00"}]
    for protocol in (0, 2, 4, 5):
        p = tmp_path / f"ok{protocol}.p"
        p.write_bytes(pickle.dumps(obj, protocol=protocol))
        assert load_pickle(p) == obj


def test_load_pickle_python2_strings_are_utf8(tmp_path):
    # what Python 2's pickle.dump([{'sent': 'caf\xc3\xa9'}], f, 2) writes (py2 str = UTF-8 bytes), as refer's files
    p = tmp_path / "py2.p"
    p.write_bytes(b"\x80\x02]q\x00}q\x01U\x04sentq\x02U\x05caf\xc3\xa9q\x03sa.")
    assert load_pickle(p) == [{"sent": "caf\u00e9"}]


def test_load_pickle_refuses_malicious_reduce_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "refs(unc).p"
    p.write_bytes(pickle.dumps([F.Pwned(f"echo pwned > {marker}")], protocol=2))
    with pytest.raises(DataError, match=r"refusing to import (posix|os|nt)\.system from .*refs\(unc\)\.p"):
        load_pickle(p)
    assert not marker.exists()


def test_load_pickle_refuses_any_class(tmp_path):
    p = tmp_path / "np.p"
    p.write_bytes(pickle.dumps([np.float32(1.0)]))
    with pytest.raises(DataError, match="refusing to import numpy"):
        load_pickle(p)


def test_load_pickle_garbage_and_missing(tmp_path):
    p = tmp_path / "bad.p"
    p.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="bad.p: not a readable pickle"):
        load_pickle(p)
    with pytest.raises(DataError, match="missing"):
        load_pickle(tmp_path / "nope.p")


def test_refer_reader_refuses_malicious_refs_file(tmp_path):
    paths = F.make_refcoco(tmp_path)
    marker = tmp_path / "pwned"
    F.write_refer(paths["root"], "refcoco", "unc", [F.Pwned(f"touch {marker}")], F.refer_instances())
    with pytest.raises(DataError, match=r"refusing to import .*system"):
        read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    assert not marker.exists()


def test_load_torch_list_refuses_numpy(tmp_path):
    p = tmp_path / "unc_train.pth"
    torch.save([("a.jpg", "m.pth", np.array([1.0, 2.0, 3.0, 4.0]), "x", [])], p)
    with pytest.raises(DataError) as e:
        load_torch_list(p)
    msg = str(e.value)
    assert str(p) in msg and "weights_only=True" in msg and "numpy" in msg
    assert "convert" in msg and "torch.save" in msg


def test_load_torch_list_plain_and_not_a_list(tmp_path):
    p = tmp_path / "ok.pth"
    torch.save([("a.jpg", [1.5, 2, 3, 4], "x")], p)
    assert load_torch_list(p) == [("a.jpg", [1.5, 2, 3, 4], "x")]
    torch.save({"a": 1}, p)
    with pytest.raises(DataError, match="expected a list"):
        load_torch_list(p)


# ---- refer toolkit ----------------------------------------------------------------------------------------


def test_refcoco_records(tmp_path):
    paths = F.make_refcoco(tmp_path)
    ds = read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    refs = by_id(ds)
    assert sorted(refs) == ["refcoco/1000", "refcoco/1001", "refcoco/1002", "refcoco/1003"]
    assert ds.name == "refcoco-unc"
    assert ds.splits() == {"testA": 1, "train": 2, "val": 1}
    r = refs["refcoco/1000"]
    assert (r.image_id, r.text, r.split, r.category) == ("1", "the man on the left", "train", "person")
    # xywh [10.5, 5.25, 20, 15.5] -> xyxy, exact float32
    assert r.box == f32(10.5, 5.25, 30.5, 20.75)
    assert refs["refcoco/1002"].box == f32(4, 6, 16, 16) and refs["refcoco/1002"].category == "car"
    # non-ASCII kept, NFC
    assert refs["refcoco/1001"].text == unicodedata.normalize("NFC", "the café chair")
    assert refs["refcoco/1001"].text != F.NFD_CAFE
    images = ds.image_index
    assert (images["1"].width, images["1"].height, images["1"].path) == (64, 48, "COCO_train2014_000000000001.jpg")
    assert (images["2"].width, images["2"].height) == (48, 64)
    assert ds.source["format"] == "refer" and ds.source["split_by"] == "unc"
    assert ds.errors == []


def test_refcoco_masks_decode_to_right_area(tmp_path):
    paths = F.make_refcoco(tmp_path)
    refs = by_id(read_refer(paths["root"], "refcoco", "unc", paths["image_root"]))
    poly = refs["refcoco/1000"].mask
    assert poly["size"] == [48, 64] and isinstance(poly["counts"], str)
    m = mask_utils.decode({"size": poly["size"], "counts": poly["counts"].encode()})
    assert m.shape == (48, 64)
    assert abs(int(m.sum()) - 300) <= 40  # the 20x15 rectangle polygon, up to rasterisation of its border
    ys, xs = np.nonzero(m)
    assert 9 <= xs.min() <= 11 and 29 <= xs.max() <= 30 and 4 <= ys.min() <= 6 and 19 <= ys.max() <= 20
    rle = refs["refcoco/1002"].mask  # compressed RLE of a 10x12 block
    assert int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()})) == 120
    unc = refs["refcoco/1003"].mask  # uncompressed RLE of a 10x20 block -> compressed
    m = mask_utils.decode({"size": unc["size"], "counts": unc["counts"].encode()})
    assert m.shape == (64, 48) and int(m.sum()) == 200 and m[30:40, 0:20].all()
    assert refs["refcoco/1001"].mask == refs["refcoco/1000"].mask  # one mask per annotation


def test_coco_rle_rejects_bad_segmentations():
    assert coco_rle([], 10, 10) is None
    with pytest.raises(ValueError, match="polygon 0"):
        coco_rle([[1, 2, 3, 4]], 10, 10)
    with pytest.raises(ValueError, match="differs from the image"):
        coco_rle(F.rle_block(5, 5, 0, 1, 0, 1), 10, 10)
    with pytest.raises(ValueError, match="runs sum to 99"):
        coco_rle({"size": [10, 10], "counts": [50, 49]}, 10, 10)
    merged = coco_rle([F.rle_block(10, 10, 0, 5, 0, 5), F.rle_block(10, 10, 5, 10, 5, 10, compressed=False)], 10, 10)
    assert int(mask_utils.area({"size": [10, 10], "counts": merged["counts"].encode()})) == 50


def test_refcoco_filters_and_text_field(tmp_path):
    paths = F.make_refcoco(tmp_path)
    ds = read_refer(paths["root"], "refcoco", "unc", paths["image_root"], splits=["val"], text_field="raw")
    assert [(r.ref_id, r.text) for r in ds.refs] == [("refcoco/1002", "BIG BLUE CAR")]
    assert [im.image_id for im in ds.images] == ["2"]


def test_refcoco_fingerprint_stable_and_order_independent(tmp_path):
    a = F.make_refcoco(tmp_path / "a")
    fp1 = read_refer(a["root"], "refcoco", "unc", a["image_root"]).fingerprint()
    fp2 = read_refer(a["root"], "refcoco", "unc", a["image_root"]).fingerprint()
    assert fp1 == fp2
    b = F.make_refcoco(tmp_path / "b")  # elsewhere on disk, records in reverse order
    inst = F.refer_instances()
    inst = {k: list(reversed(v)) for k, v in inst.items()}
    refs = list(reversed(F.refer_refs()))
    for r in refs:
        r["sentences"] = list(reversed(r["sentences"]))
    F.write_refer(b["root"], "refcoco", "unc", refs, inst, protocol=4)
    assert read_refer(b["root"], "refcoco", "unc", b["image_root"]).fingerprint() == fp1


def test_refcoco_missing_refs_file_lists_found(tmp_path):
    paths = F.make_refcoco(tmp_path)
    with pytest.raises(DataError, match=r"refs\(google\)\.p: refs file is missing \(found refs\(unc\)\.p\)"):
        read_refer(paths["root"], "refcoco", "google", paths["image_root"])


def _refer_variant(tmp_path, mutate_refs=None, mutate_inst=None):
    paths = F.make_refcoco(tmp_path)
    refs, inst = F.refer_refs(), F.refer_instances()
    if mutate_refs:
        mutate_refs(refs)
    if mutate_inst:
        mutate_inst(inst)
    refs_path = F.write_refer(paths["root"], "refcoco", "unc", refs, inst)
    return paths, refs_path


@pytest.mark.parametrize("bbox, reason", [
    ([50, 40, 30, 30], "outside the 64x48 image"),
    ([10, 10, 0, 5], "non-positive size"),
    ([10, 10, 5, -3], "non-positive size"),
])
def test_refcoco_bad_boxes(tmp_path, bbox, reason):
    def bad(inst):
        inst["annotations"][0]["bbox"] = bbox
    paths, refs_path = _refer_variant(tmp_path, mutate_inst=bad)
    with pytest.raises(DataError, match=reason) as e:
        read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    assert str(refs_path) in str(e.value)
    ds = read_refer(paths["root"], "refcoco", "unc", paths["image_root"], on_error="skip")
    assert sorted(by_id(ds)) == ["refcoco/1002", "refcoco/1003"]
    assert {e["item"] for e in ds.errors} == {"ref refcoco/1000", "ref refcoco/1001"}
    assert all(reason in e["reason"] and e["file"] == str(refs_path) for e in ds.errors)


def test_refcoco_empty_sentence(tmp_path):
    def bad(refs):
        refs[1]["sentences"][0]["sent"] = "   "
    paths, refs_path = _refer_variant(tmp_path, mutate_refs=bad)
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: ref refcoco/1002: empty sentence"):
        read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    ds = read_refer(paths["root"], "refcoco", "unc", paths["image_root"], on_error="skip")
    assert "refcoco/1002" not in by_id(ds)
    assert ds.errors == [{"item": "ref refcoco/1002", "file": str(refs_path), "reason": "empty sentence"}]


def test_refcoco_duplicate_sentence_ids(tmp_path):
    def dup(refs):
        refs[2]["sentences"][0]["sent_id"] = 1002
    paths, _ = _refer_variant(tmp_path, mutate_refs=dup)
    with pytest.raises(DataError, match="ref refcoco/1002: duplicate ref_id"):
        read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    ds = read_refer(paths["root"], "refcoco", "unc", paths["image_root"], on_error="skip")
    assert by_id(ds)["refcoco/1002"].text == "big blue car"  # the first one is kept
    assert [e["reason"] for e in ds.errors] == ["duplicate ref_id"]


def test_refcoco_path_escaping_image_root_is_refused(tmp_path):
    def escape(inst):
        inst["images"][0]["file_name"] = "../x.jpg"
    paths, _ = _refer_variant(tmp_path, mutate_inst=escape)
    (paths["image_root"].parent / "x.jpg").write_bytes((paths["image_root"] / (F.COCO_NAME % 1)).read_bytes())
    with pytest.raises(DataError, match=r"instances\.json: image 1: .*'\.\./x\.jpg'.*escapes the image root"):
        read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    ds = read_refer(paths["root"], "refcoco", "unc", paths["image_root"], on_error="skip")
    assert [im.image_id for im in ds.images] == ["2"]
    items = [e["item"] for e in ds.errors]
    assert items[0] == "image 1" and set(items[1:]) == {"ref refcoco/1000", "ref refcoco/1001"}


def test_refcoco_missing_and_truncated_images(tmp_path):
    paths = F.make_refcoco(tmp_path)
    (paths["image_root"] / (F.COCO_NAME % 1)).unlink()
    with pytest.raises(DataError, match="image file is missing"):
        read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    F.write_image(paths["image_root"] / (F.COCO_NAME % 1), 64, 48, 1)
    F.truncate(paths["image_root"] / (F.COCO_NAME % 2))
    with pytest.raises(DataError, match="cannot decode image"):
        read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    ds = read_refer(paths["root"], "refcoco", "unc", paths["image_root"], on_error="skip")
    assert sorted(by_id(ds)) == ["refcoco/1000", "refcoco/1001"]
    assert ds.errors[0]["item"] == "image 2" and "cannot decode" in ds.errors[0]["reason"]


def test_refcoco_annotated_size_mismatch(tmp_path):
    def wrong(inst):
        inst["images"][0]["width"] = 65
    paths, _ = _refer_variant(tmp_path, mutate_inst=wrong)
    with pytest.raises(DataError, match="differs from annotated 65x48"):
        read_refer(paths["root"], "refcoco", "unc", paths["image_root"])


def test_refcoco_dangling_annotation(tmp_path):
    def dangling(refs):
        refs[0]["ann_id"] = 999
    paths, _ = _refer_variant(tmp_path, mutate_refs=dangling)
    with pytest.raises(DataError, match="annotation 999 is not in instances.json"):
        read_refer(paths["root"], "refcoco", "unc", paths["image_root"])


def test_referit_refer_layout(tmp_path):
    paths = F.make_refclef(tmp_path)
    ds = read_referit(paths["root"], paths["image_root"])
    (r,) = ds.refs
    assert (r.ref_id, r.image_id, r.text, r.split) == ("refclef/9", "25008", "bottom half", "test")
    assert r.category == "ground"
    assert r.box == f32(0, 24, 64, 48)
    assert ds.images[0].path == "25/images/25008.jpg" and ds.name == "referit-berkeley"
    m = mask_utils.decode({"size": r.mask["size"], "counts": r.mask["counts"].encode()})
    assert int(m.sum()) == 24 * 64


# ---- SimREC / RefCLIP ---------------------------------------------------------------------------------------


def test_simrec_records(tmp_path):
    paths = F.make_simrec(tmp_path)
    ds = read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco")
    refs = by_id(ds)
    assert sorted(refs) == ["refcoco/0/0", "refcoco/0/1", "refcoco/1/0", "refcoco/2/0"]
    assert [refs["refcoco/0/0"].text, refs["refcoco/0/1"].text] == ["the man on the left", "left man"]
    assert refs["refcoco/0/0"].box == f32(10.5, 5.25, 30.5, 20.75)
    assert refs["refcoco/2/0"].box == f32(0, 30, 48, 64)
    assert ds.splits() == {"train": 2, "val": 2}
    assert refs["refcoco/1/0"].category is None and refs["refcoco/1/0"].image_id == "2"
    assert (ds.image_index["2"].width, ds.image_index["2"].height) == (48, 64)  # decoded size
    ds2 = read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco", categories={1: "person", 3: "car"},
                      splits=["val"])
    assert {r.ref_id: r.category for r in ds2.refs} == {"refcoco/1/0": "car", "refcoco/2/0": "person"}


def test_simrec_image_patterns(tmp_path):
    assert SIMREC_IMAGE_PATTERNS["refcocog"] == "COCO_train2014_%012d.jpg"
    assert image_file_name(SIMREC_IMAGE_PATTERNS["refcoco+"], 581857) == "COCO_train2014_000000581857.jpg"
    assert image_file_name(SIMREC_IMAGE_PATTERNS["referit"], 8756) == "8756.jpg"
    assert image_file_name("img_{iid}.png", "a7") == "img_a7.png"
    with pytest.raises(ValueError, match="not an integer"):
        image_file_name("%d.jpg", "7")
    paths = F.make_simrec(tmp_path)
    with pytest.raises(DataError, match="no image file pattern known for dataset 'vgx'"):
        read_simrec(paths["json_path"], paths["image_root"], dataset="vgx")
    for iid in (1, 2):
        shutil.copy(paths["image_root"] / (F.COCO_NAME % iid), paths["image_root"] / f"im{iid}.jpg")
    ds = read_simrec(paths["json_path"], paths["image_root"], dataset="vgx", image_pattern="im%d.jpg")
    assert sorted(im.path for im in ds.images) == ["im1.jpg", "im2.jpg"]


def test_simrec_fingerprint_order_independent(tmp_path):
    a = F.make_simrec(tmp_path / "a")
    fp = read_simrec(a["json_path"], a["image_root"], dataset="refcoco").fingerprint()
    data = F.simrec_data()
    data = {k: list(reversed(v)) for k, v in reversed(list(data.items()))}
    b = F.make_simrec(tmp_path / "b", data)
    assert read_simrec(b["json_path"], b["image_root"], dataset="refcoco").fingerprint() == fp


def test_simrec_bad_items(tmp_path):
    data = F.simrec_data()
    data["val"][0]["bbox"] = [40, 50, 20, 20]  # outside the 48x64 image
    data["val"][1]["refs"] = ["", "ok ref"]
    data["train"].append({"iid": 3, "bbox": [0, 0, 1, 1], "cat_id": 1, "refs": ["ghost"], "mask_id": 5})
    paths = F.make_simrec(tmp_path, data)
    with pytest.raises(DataError, match="refcoco.json: image 3: .*image file is missing"):
        read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco")
    ds = read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco", on_error="skip")
    assert sorted(by_id(ds)) == ["refcoco/0/0", "refcoco/0/1", "refcoco/2/1"]
    reasons = {e["item"]: e["reason"] for e in ds.errors}
    assert "image file is missing" in reasons["image 3"]
    assert "outside the 48x64 image" in reasons["ref refcoco/1/0"]
    assert reasons["ref refcoco/2/0"] == "empty sentence"
    assert "image '3' is missing or was skipped" in reasons["ref refcoco/5/0"]


# ---- TransVG -----------------------------------------------------------------------------------------------


def test_transvg_unc_xywh(tmp_path):
    paths = F.make_transvg(tmp_path)
    ds = read_transvg(paths["root"], "unc", paths["coco"])
    refs = by_id(ds)
    assert sorted(refs) == ["unc/testB/0", "unc/train/0", "unc/train/1"]
    assert refs["unc/train/0"].box == f32(10.5, 5.25, 30.5, 20.75)  # fractional kept (TransVG casts to int)
    assert refs["unc/train/1"].box == f32(30, 10, 50, 25)
    assert refs["unc/testB/0"].box == f32(4, 6, 16, 16)
    assert refs["unc/train/0"].image_id == "COCO_train2014_000000000001"
    assert ds.source["box_format"] == "xywh" and ds.splits() == {"testB": 1, "train": 2}


def test_transvg_referit_and_flickr_xyxy(tmp_path):
    paths = F.make_transvg(tmp_path)
    ds = read_transvg(paths["root"], "referit", paths["referit"])
    refs = by_id(ds)
    assert sorted(refs) == ["referit/test/0", "referit/train/0"]  # trainval (train + val) not read by default
    assert refs["referit/train/0"].box == f32(2, 3, 40.5, 30) and refs["referit/train/0"].image_id == "8756"
    assert refs["referit/test/0"].box == f32(10, 20, 60, 45)
    fl = read_transvg(paths["root"], "flickr", paths["flickr"])
    assert [(r.ref_id, r.text, r.box) for r in fl.refs] == [
        ("flickr/test/0", "A man", f32(10, 5, 29, 19)), ("flickr/test/1", "two bikes", f32(0, 0, 59, 39))]
    tv = read_transvg(paths["root"], "referit", paths["referit"], splits=["trainval"])
    assert [r.ref_id for r in tv.refs] == ["referit/trainval/0"]


def test_transvg_box_table_and_unknown_dataset(tmp_path):
    assert TRANSVG_BOX_FORMAT == {"unc": "xywh", "unc+": "xywh", "gref": "xywh", "gref_umd": "xywh",
                                  "referit": "xyxy", "flickr": "xyxy"}
    paths = F.make_transvg(tmp_path)
    shutil.copytree(paths["root"] / "unc", paths["root"] / "mine")
    for p in (paths["root"] / "mine").iterdir():
        p.rename(p.with_name(p.name.replace("unc_", "mine_")))
    with pytest.raises(DataError, match="'mine' has no known box convention.*never guessed"):
        read_transvg(paths["root"], "mine", paths["coco"])
    ds = read_transvg(paths["root"], "mine", paths["coco"], box_format="xywh")
    assert by_id(ds)["mine/train/1"].box == f32(30, 10, 50, 25)


def test_transvg_xywh_read_as_xyxy_says_so(tmp_path):
    paths = F.make_transvg(tmp_path)
    with pytest.raises(DataError) as e:
        read_transvg(paths["root"], "unc", paths["coco"], box_format="xyxy")
    msg = str(e.value)
    assert "unc_train.pth" in msg and "ref unc/train/1" in msg
    assert "x2 <= x1" in msg and "looks like" in msg and "xywh" in msg and "box_format='xywh'" in msg
    # and xyxy boxes read as xywh: the message suggests xyxy
    with pytest.raises(DataError, match="read as xyxy it would fit the image.*box_format='xyxy'"):
        read_transvg(paths["root"], "referit", paths["referit"], box_format="xywh")


def test_transvg_bad_rows_skip(tmp_path):
    rows = F.transvg_rows()
    rows["unc"]["train"].append((F.COCO_NAME % 1, "m", [1, 2, 3], "three numbers", []))
    rows["unc"]["train"].append(("../escape.jpg", "m", [1, 2, 3, 4], "escape", []))
    rows["unc"]["train"].append(("missing.jpg", "m", [1, 2, 3, 4], "missing", []))
    rows["unc"]["train"].append((F.COCO_NAME % 1, "m", [1, 2, 3, 4], " ", []))
    paths = F.make_transvg(tmp_path, rows)
    with pytest.raises(DataError, match="unc_train.pth: ref unc/train/2: bbox"):
        read_transvg(paths["root"], "unc", paths["coco"])
    ds = read_transvg(paths["root"], "unc", paths["coco"], on_error="skip")
    assert sorted(by_id(ds)) == ["unc/testB/0", "unc/train/0", "unc/train/1"]
    reasons = {e["item"]: e["reason"] for e in ds.errors}
    assert "4 numbers" in reasons["ref unc/train/2"]
    assert "escapes the image root" in reasons["image ../escape"]
    assert "image file is missing" in reasons["image missing"]
    assert reasons["ref unc/train/5"] == "empty sentence"


def test_transvg_numpy_file_refused(tmp_path):
    paths = F.make_transvg(tmp_path)
    torch.save([(F.COCO_NAME % 1, "m", np.array([1.0, 2, 3, 4]), "np box", [])],
               paths["root"] / "unc" / "unc_val.pth")
    with pytest.raises(DataError, match=r"unc_val\.pth: torch\.load\(weights_only=True\) refused"):
        read_transvg(paths["root"], "unc", paths["coco"])


def test_transvg_missing_split_file(tmp_path):
    paths = F.make_transvg(tmp_path)
    with pytest.raises(DataError, match="unc_val.pth: split file for split 'val' is missing"):
        read_transvg(paths["root"], "unc", paths["coco"], splits=["val"])


# ---- Flickr30k Entities -------------------------------------------------------------------------------------


def test_parse_sentence():
    ph = parse_sentence(F.FLICKR_SENTENCES["1000"][1])
    assert [(p.entity, p.types, p.text) for p in ph] == [
        ("3", ("people", "other"), "The couple"), ("4", ("people",), "a friend"), ("6", ("scene",), "the park"),
        ("0", ("notvisual",), "some fun"), ("7", ("animals",), "a dog")]
    with pytest.raises(ValueError, match="malformed"):
        parse_sentence("[/EN#1/people A man rides")


def test_flickr30k_records(tmp_path):
    paths = F.make_flickr30k(tmp_path)
    ds = read_flickr30k(paths["root"], paths["image_root"])
    refs = by_id(ds)
    assert sorted(refs) == ["1000:0:0", "1000:0:1", "1000:1:0", "1000:1:1", "1001:0:0", "1002:0:0"]
    # 1-based inclusive XML values minus 1 on all four
    assert refs["1000:0:0"].box == f32(10, 5, 29, 19)
    assert (refs["1000:0:0"].text, refs["1000:0:0"].category, refs["1000:0:0"].split) == ("A man", "people", "train")
    # two boxes of one entity -> their union
    assert refs["1000:0:1"].box == f32(0, 0, 59, 39)
    # one object with two names: both entities get its box; category = first type
    assert refs["1000:1:0"].box == refs["1000:1:1"].box == f32(20, 30, 39, 44)
    assert refs["1000:1:0"].category == "people"
    assert refs["1002:0:0"].box == f32(0, 0, 63, 47) and refs["1002:0:0"].split == "test"
    assert refs["1001:0:0"].split == "val"
    # nobndbox (1000:0:2), scene (1000:1:2), notvisual (1000:1:3), no object (1000:1:4): counted, not errors
    assert ds.source["skipped_no_box"] == 4
    assert ds.source["skipped_no_box_by_reason"] == {"notvisual": 1, "nobox_or_scene": 2, "no_object": 1}
    assert ds.errors == []
    assert ds.image_index["1000"].path == "1000.jpg" and ds.image_index["1000"].width == 64


def test_flickr30k_splits_and_fingerprint(tmp_path):
    a = F.make_flickr30k(tmp_path / "a")
    ds = read_flickr30k(a["root"], a["image_root"], splits=["val", "test"])
    assert sorted(ds.splits()) == ["test", "val"] and len(ds.refs) == 2
    fp = read_flickr30k(a["root"], a["image_root"]).fingerprint()
    assert read_flickr30k(a["root"], a["image_root"]).fingerprint() == fp
    objects = {k: list(reversed(v)) for k, v in F.FLICKR_OBJECTS.items()}
    b = F.make_flickr30k(tmp_path / "b", objects=objects,
                         splits={k: list(reversed(v)) for k, v in F.FLICKR_SPLITS.items()})
    assert read_flickr30k(b["root"], b["image_root"]).fingerprint() == fp


def test_flickr30k_bad_inputs(tmp_path):
    sentences = dict(F.FLICKR_SENTENCES)
    sentences["1001"] = ["[/EN#20/animals  ] runs ."]  # empty phrase
    objects = dict(F.FLICKR_OBJECTS)
    objects["1002"] = [(["30"], (1, 1, 90, 48), 0, 0)]  # wider than the 64x48 image
    paths = F.make_flickr30k(tmp_path, sentences=sentences, objects=objects)
    with pytest.raises(DataError, match=r"Sentences/1001\.txt: ref 1001:0:0: empty sentence"):
        read_flickr30k(paths["root"], paths["image_root"])
    ds = read_flickr30k(paths["root"], paths["image_root"], on_error="skip")
    reasons = {e["item"]: e["reason"] for e in ds.errors}
    assert reasons["ref 1001:0:0"] == "empty sentence"
    assert "outside the 64x48 image" in reasons["ref 1002:0:0"]
    assert sorted(ds.splits()) == ["train"]


def test_flickr30k_missing_files(tmp_path):
    paths = F.make_flickr30k(tmp_path)
    (paths["root"] / "Annotations" / "1001.xml").unlink()
    F.truncate(paths["image_root"] / "1002.jpg")
    with pytest.raises(DataError, match=r"Annotations/1001\.xml: image 1001: annotation file is missing"):
        read_flickr30k(paths["root"], paths["image_root"])
    ds = read_flickr30k(paths["root"], paths["image_root"], on_error="skip")
    assert sorted(ds.splits()) == ["train"]
    assert {e["item"] for e in ds.errors} == {"image 1001", "image 1002", "ref 1002:0:0"}
    with pytest.raises(DataError, match="nope.txt: split file is missing"):
        read_flickr30k(paths["root"], paths["image_root"], splits=["nope"])


def test_flickr30k_duplicate_image_across_splits(tmp_path):
    paths = F.make_flickr30k(tmp_path, splits={"train": ["1000"], "val": ["1001", "1000"], "test": ["1002"]})
    with pytest.raises(DataError, match=r"val\.txt: image 1000: already listed in split 'train'"):
        read_flickr30k(paths["root"], paths["image_root"])


# ---- dispatcher --------------------------------------------------------------------------------------------


def test_dispatcher(tmp_path):
    assert set(readers.READERS) == {"refcoco", "refcoco+", "refcocog", "referit", "simrec", "transvg", "flickr30k"}
    with pytest.raises(KeyError, match="known formats: flickr30k, refcoco, refcoco\\+, refcocog, referit"):
        readers.read("coco", tmp_path, tmp_path)
    r = F.make_refcoco(tmp_path / "r")
    assert readers.read("refcoco", r["root"], r["image_root"]).fingerprint() == \
        read_refer(r["root"], "refcoco", "unc", r["image_root"]).fingerprint()
    with pytest.raises(DataError, match="split_by='umd'"):
        readers.read("refcocog", r["root"], r["image_root"])
    c = F.make_refclef(tmp_path / "c")
    assert len(readers.read("referit", c["root"], c["image_root"]).refs) == 1
    s = F.make_simrec(tmp_path / "s")
    assert len(readers.read("simrec", s["json_path"], s["image_root"], dataset="refcoco").refs) == 4
    with pytest.raises(DataError, match="pass dataset="):
        readers.read("simrec", s["json_path"], s["image_root"])
    t = F.make_transvg(tmp_path / "t")
    assert len(readers.read("transvg", t["root"], t["flickr"], dataset="flickr").refs) == 2
    fl = F.make_flickr30k(tmp_path / "f")
    assert len(readers.read("flickr30k", fl["root"], fl["image_root"], on_error="skip").refs) == 6


def test_saved_dataset_round_trip(tmp_path):
    from grounding.data.schema import CanonicalDataset

    paths = F.make_refcoco(tmp_path)
    ds = read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    ds.save(tmp_path / "prepared")
    back = CanonicalDataset.load(tmp_path / "prepared")
    assert back.fingerprint() == ds.fingerprint() and back.refs == ds.refs
    json.loads((tmp_path / "prepared" / "dataset.json").read_text())  # valid JSON
