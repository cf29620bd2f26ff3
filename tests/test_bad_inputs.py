"""The bad-input matrix (docs/bad_inputs.md): the cases no other test covers, the regressions the fuzzers
found, and a check that every test node id the matrix names still exists (so the table cannot rot).

Every case ends in a named error (``DataError``/``ImageError``, ``ShardError``, ``ConfigError``, ``OSError``
with its errno) or in a skip recorded in the dataset's or manifest's ``errors``; nothing is dropped silently.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grounding import config as C
from grounding.data.flickr30k import read_flickr30k
from grounding.data.images import ImageError, probe_image
from grounding.data.refcoco import coco_rle, read_refer
from grounding.data.safe_pickle import load_torch_list
from grounding.data.builder import DatasetBuilder
from grounding.data.schema import CanonicalDataset, DataError, ImageRecord, RefRecord
from grounding.data.simrec import read_simrec
from grounding.data.transvg import read_transvg
from grounding.shards import Manifest, ShardError, ShardSet, ShardWriter, verify_shard_set

try:
    from fixtures import formats as F
except ImportError:  # tests/ imported as a package
    from tests.fixtures import formats as F

sys.path.insert(0, str(Path(__file__).parent))
from _writer_proc import row, spec, write_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MATRIX = ROOT / "docs" / "bad_inputs.md"

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools


def by_id(ds: CanonicalDataset) -> dict:
    return {r.ref_id: r for r in ds.refs}


def reasons(ds: CanonicalDataset) -> dict[str, str]:
    return {e["item"]: e["reason"] for e in ds.errors}


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


# ---- images -------------------------------------------------------------------------------------------------


def test_zero_byte_image(tmp_path: Path) -> None:
    (tmp_path / "z.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"z\.jpg: cannot decode image"):
        probe_image(tmp_path / "z.jpg")
    paths = F.make_simrec(tmp_path / "s")
    (paths["image_root"] / (F.COCO_NAME % 2)).write_bytes(b"")
    with pytest.raises(DataError, match="image 2: .*cannot decode image"):
        read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco")
    ds = read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco", on_error="skip")
    assert "cannot decode image" in reasons(ds)["image 2"] and sorted(ds.splits()) == ["train"]


def test_image_that_is_a_directory_or_unreadable(tmp_path: Path) -> None:
    (tmp_path / "d.jpg").mkdir()
    with pytest.raises(ImageError, match=r"d\.jpg: cannot decode image \(IsADirectoryError"):
        probe_image(tmp_path / "d.jpg")


# ---- boxes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bbox, reason", [
    ([float("nan"), 1, 2, 3], "is not 4 finite numbers"),
    ([1, 1, float("inf"), 3], "is not 4 finite numbers"),
    ([None, 1, 2, 3], "is not 4 numbers"),
    ({"x": 1}, "is not 4 numbers"),
    ("1234", "is not 4 numbers"),
    ([1, 2, 3], "is not 4 finite numbers"),
], ids=["nan", "inf", "null", "object", "string", "three-numbers"])
def test_non_numeric_and_non_finite_boxes(tmp_path: Path, bbox: object, reason: str) -> None:
    data = F.simrec_data()
    data["val"][0]["bbox"] = bbox
    paths = F.make_simrec(tmp_path, data)
    with pytest.raises(DataError, match=r"refcoco\.json: ref refcoco/1/0: box .*" + re.escape(reason)):
        read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco")
    ds = read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco", on_error="skip")
    assert reason in reasons(ds)["ref refcoco/1/0"] and "refcoco/1/0" not in by_id(ds)


def test_xyxy_given_where_xywh_expected_is_caught_when_it_leaves_the_image(tmp_path: Path) -> None:
    data = F.simrec_data()
    data["val"][1]["bbox"] = [0, 30, 48, 64]  # the xyxy of that box, in an xywh file: 30 + 64 > 64
    paths = F.make_simrec(tmp_path, data)
    with pytest.raises(DataError, match=r"outside the 48x64 image"):
        read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco")


# ---- sentences ----------------------------------------------------------------------------------------------


def test_very_long_sentence(tmp_path: Path) -> None:
    data = F.simrec_data()
    data["val"][0]["refs"] = ["word " * 400]  # 1999 characters > max_text_chars=1000
    paths = F.make_simrec(tmp_path, data)
    with pytest.raises(DataError, match="sentence of 1999 characters exceeds max_text_chars=1000"):
        read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco")
    ds = read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco", on_error="skip")
    assert "exceeds max_text_chars" in reasons(ds)["ref refcoco/1/0"]


@pytest.mark.parametrize("text", ["\t\n ", "\u3000\u2003", "\u200b\u200b", "\u200e\ufeff"],
                         ids=["ascii-whitespace", "unicode-spaces", "zero-width-spaces", "direction-mark-and-bom"])
def test_whitespace_and_invisible_sentences_are_empty(tmp_path: Path, text: str) -> None:
    b = DatasetBuilder("t", tmp_path, on_error="skip")
    b.add_image(ImageRecord("1", "a.jpg", 10, 10, "0"))
    assert not b.add_ref(ref_id="r", image_id="1", text=text, split="train", box=None)
    assert b.errors[0]["reason"] == "empty sentence"


def test_text_that_is_not_a_string_and_malformed_phrase_markup(tmp_path: Path) -> None:
    data = F.simrec_data()
    data["val"][0]["refs"] = [7, ["a", "list"]]
    paths = F.make_simrec(tmp_path / "s", data)
    ds = read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco", on_error="skip")
    why = reasons(ds)
    assert why["ref refcoco/1/0"] == "text is int, not a string" and why["ref refcoco/1/1"] == "text is list, not a string"
    sentences = dict(F.FLICKR_SENTENCES)
    sentences["1001"] = ["[/EN#20/animals A dog runs ."]
    paths = F.make_flickr30k(tmp_path / "f", sentences=sentences)
    with pytest.raises(DataError, match=r"Sentences/1001\.txt: sentence 1001:0: malformed phrase markup"):
        read_flickr30k(paths["root"], paths["image_root"])
    ds = read_flickr30k(paths["root"], paths["image_root"], on_error="skip")
    assert "malformed phrase markup" in reasons(ds)["sentence 1001:0"]


EMOJI_RTL = {
    "emoji": "the 🐶 next to the 🚲 👍🏽",
    "rtl": "הכלב השחור ליד האופניים",
    "arabic": "الرجل على اليسار",
    "mixed": "the man (الرجل) on the left 😀",
    "combining": unicodedata.normalize("NFD", "the café chair"),
}


def test_emoji_and_rtl_sentences_are_kept_and_tokenized(tmp_path: Path) -> None:
    import open_clip

    from grounding.teachers.clip import tokenize

    data = F.simrec_data()
    data["train"][0]["refs"] = list(EMOJI_RTL.values())
    paths = F.make_simrec(tmp_path, data)
    ds = read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco")
    texts = [by_id(ds)[f"refcoco/0/{k}"].text for k in range(len(EMOJI_RTL))]
    assert texts == [unicodedata.normalize("NFC", t) for t in EMOJI_RTL.values()]  # kept, NFC
    ds.save(tmp_path / "prepared")
    back = CanonicalDataset.load(tmp_path / "prepared")
    assert back.fingerprint() == ds.fingerprint() and back.refs == ds.refs
    tok = tokenize(open_clip.get_tokenizer("ViT-B-32"), texts, 77)
    assert (tok.n_tokens > 2).all() and not tok.truncated.any()  # every text gives real tokens


# ---- ids and paths ------------------------------------------------------------------------------------------


def test_duplicate_ids_in_a_dataset_and_in_simrec(tmp_path: Path) -> None:
    im = ImageRecord("1", "a.jpg", 10, 10, "0")
    with pytest.raises(DataError, match="duplicate image_id '1'"):
        CanonicalDataset("d", tmp_path, [im, ImageRecord("1", "b.jpg", 10, 10, "0")], [])
    r = RefRecord("r", "1", "a", "train")
    with pytest.raises(DataError, match="duplicate ref_id 'r'"):
        CanonicalDataset("d", tmp_path, [im], [r, r])
    data = F.simrec_data()
    data["val"][1]["mask_id"] = data["val"][0]["mask_id"]  # two annotations, one mask id -> same ref ids
    paths = F.make_simrec(tmp_path / "s", data)
    with pytest.raises(DataError, match="ref refcoco/1/0: duplicate ref_id"):
        read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco")


@pytest.mark.parametrize("line, reason", [("../1000", "not a plain file name"), ("a/b", "not a plain file name"),
                                          ("..", "not a plain file name")], ids=["parent-prefix", "subdir", "parent"])
def test_flickr30k_ids_with_path_parts_are_refused(tmp_path: Path, line: str, reason: str) -> None:
    paths = F.make_flickr30k(tmp_path, splits={"train": ["1000", line], "val": ["1001"], "test": ["1002"]})
    with pytest.raises(DataError, match=r"train\.txt: image .*" + reason):
        read_flickr30k(paths["root"], paths["image_root"])
    ds = read_flickr30k(paths["root"], paths["image_root"], on_error="skip")
    assert reason in reasons(ds)[f"image {line}"] and "1000:0:0" in by_id(ds)


def test_malicious_transvg_pth_is_refused_without_running_it(tmp_path: Path) -> None:
    paths = F.make_transvg(tmp_path)
    marker = tmp_path / "pwned"
    torch.save([F.Pwned(f"touch {marker}")], paths["root"] / "unc" / "unc_val.pth")
    with pytest.raises(DataError, match=r"unc_val\.pth: torch\.load\(weights_only=True\) refused"):
        read_transvg(paths["root"], "unc", paths["coco"])
    assert not marker.exists()


# ---- regressions found by tests/test_fuzz.py ---------------------------------------------------------------


def test_regression_refer_unhashable_and_non_finite_values(tmp_path: Path) -> None:
    """Fuzz finds: an id that is a list or dict raised TypeError; width `Infinity` raised OverflowError."""
    paths = F.make_refcoco(tmp_path)
    inst = F.refer_instances()
    inst["annotations"][0]["id"] = [10]
    F.write_refer(paths["root"], "refcoco", "unc", F.refer_refs(), inst)
    with pytest.raises(DataError, match=r"instances\.json: an entry of 'annotations' has id \[10\]"):
        read_refer(paths["root"], "refcoco", "unc", paths["image_root"])
    refs = F.refer_refs()
    refs[0]["ann_id"] = {"a": 1}
    refs[1]["split"] = ["val"]
    inst = F.refer_instances()
    inst["images"][1]["width"] = float("inf")
    inst["annotations"][2]["category_id"] = [1]
    F.write_refer(paths["root"], "refcoco", "unc", refs, inst)
    ds = read_refer(paths["root"], "refcoco", "unc", paths["image_root"], on_error="skip", splits=["train", "val",
                                                                                                     "testA"])
    why = reasons(ds)
    assert "ann_id of type dict is not an id" in why["ref #0 (ref_id 100)"]
    assert "split of type list" in why["ref #1 (ref_id 101)"]
    assert "no usable file_name/width/height" in why["image 2"] and ds.refs == []


@pytest.mark.parametrize("segmentation, reason", [
    ([[0, 0, 1e12, 0, 1e12, 1e12]], "far outside"),
    ([[0, 0, 10, float("nan"), 5, 5]], "far outside"),
    ({"size": [48, 64], "counts": "not an RLE ~~~"}, "outside '0'..'o'"),
    ({"size": [48, 64], "counts": "0"}, "sum to 0, not 48*64"),
    ({"size": [48, 64], "counts": [3072, -1, 1]}, "not non-negative integers"),
], ids=["huge-polygon", "nan-polygon", "rle-bad-characters", "rle-too-short", "rle-negative-run"])
def test_regression_segmentations_never_reach_pycocotools_unchecked(segmentation: object, reason: str) -> None:
    """A huge polygon made pycocotools allocate by its extent; malformed RLE strings reached its C decoder."""
    with pytest.raises(ValueError, match=re.escape(reason)):
        coco_rle(segmentation, 48, 64)


def test_regression_damaged_pth_archive_is_a_data_error(tmp_path: Path) -> None:
    """Fuzz find: a damaged .pth made torch's weights-only unpickler raise IndexError (pop from empty list)."""
    p = tmp_path / "unc_train.pth"
    torch.save(F.transvg_rows()["unc"]["train"], p)
    data = bytearray(p.read_bytes())
    data[0] ^= 0x01  # "PK" -> "QK": the first local header's signature (the fuzzer's find)
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"unc_train\.pth: not a readable torch file \(IndexError"):
        load_torch_list(p)
    p.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DataError, match=r"unc_train\.pth: not a readable torch file"):
        load_torch_list(p)


def test_regression_transvg_img_file_without_a_name(tmp_path: Path) -> None:
    rows = F.transvg_rows()
    rows["unc"]["train"].append(("/", "m", [1, 2, 3, 4], "root", []))
    paths = F.make_transvg(tmp_path, rows)
    ds = read_transvg(paths["root"], "unc", paths["coco"], on_error="skip")
    assert "img_file '/'" in reasons(ds)["ref unc/train/2"]


def test_regression_flickr30k_infinite_size_and_binary_split_file(tmp_path: Path) -> None:
    paths = F.make_flickr30k(tmp_path)
    xml = paths["root"] / "Annotations" / "1001.xml"
    xml.write_text(xml.read_text().replace("<width>64</width>", "<width>inf</width>"))
    ds = read_flickr30k(paths["root"], paths["image_root"], on_error="skip")
    assert "not a positive integer size" in reasons(ds)["image 1001"]
    (paths["root"] / "val.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"val\.txt: not UTF-8 text"):
        read_flickr30k(paths["root"], paths["image_root"])


@pytest.mark.parametrize("split", ["", "  "], ids=["empty", "blank"])
def test_regression_empty_split_is_a_recorded_skip(tmp_path: Path, split: str) -> None:
    """An empty split name raised from RefRecord even under on_error=skip; now a recorded bad item."""
    paths = F.make_simrec(tmp_path, {split: F.simrec_data()["val"], "train": F.simrec_data()["train"]})
    ds = read_simrec(paths["json_path"], paths["image_root"], dataset="refcoco", on_error="skip")
    assert "is not a non-empty string" in reasons(ds)["ref refcoco/1/0"] and ds.splits() == {"train": 2}


@pytest.mark.parametrize("content, match", [
    ("half", "not a readable prepared dataset|truncated prepared dataset"),
    ("[1, 2]", "expected a JSON object, found list"),
    ('{"format_version": 1}', "malformed prepared dataset"),
    ('{"format_version": 0}', "unknown dataset format version 0"),
    ('{"format_version": "1"}', "no integer format_version"),
    ('{"format_version": 7}', "format version 7 is newer"),
], ids=["truncated", "list", "no-keys", "version-zero", "version-string", "version-newer"])
@pytest.mark.parametrize("refs", [True, False], ids=["whole", "images-only"])
def test_regression_prepared_dataset_json_damage(tmp_path: Path, content: str, match: str, refs: bool) -> None:
    """Truncated or malformed dataset.json raised JSONDecodeError / KeyError / AttributeError; now DataError,
    whether the file is read whole or streamed for its images (``refs=False``)."""
    paths = F.make_refcoco(tmp_path / "r")
    read_refer(paths["root"], "refcoco", "unc", paths["image_root"]).save(tmp_path / "p")
    f = tmp_path / "p" / "dataset.json"
    f.write_text(f.read_text()[: len(f.read_text()) // 2] if content == "half" else content)
    with pytest.raises(DataError, match=match):
        CanonicalDataset.load(tmp_path / "p", refs=refs)


# ---- shard sets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["half", "tail", "zero"])
def test_truncated_hdf5_shard(tmp_path: Path, cut: str) -> None:
    write_set(tmp_path / "s")
    shard = tmp_path / "s" / "shard-00001.h5"
    data = shard.read_bytes()
    shard.write_bytes({"half": data[: len(data) // 2], "tail": data[:-100], "zero": b""}[cut])
    with pytest.raises(ShardError, match=r"shard-00001\.h5: cannot read shard"):
        ShardSet(tmp_path / "s")
    problems = verify_shard_set(tmp_path / "s").problems
    assert any("shard-00001.h5: size" in p for p in problems) and any("sha256" in p for p in problems)
    write_set(tmp_path / "s")  # a rerun replaces the damaged shard and keeps the others
    assert verify_shard_set(tmp_path / "s").ok


def test_flipped_byte_is_caught_by_verify_not_by_lazy_open(tmp_path: Path) -> None:
    import h5py

    write_set(tmp_path / "s")
    shard = tmp_path / "s" / "shard-00001.h5"
    with h5py.File(shard, "r") as f:
        offset = f["embedding"].id.get_offset()  # inside the values of a fixed field
    data = bytearray(shard.read_bytes())
    data[offset + 3] ^= 0x01
    shard.write_bytes(bytes(data))
    assert len(ShardSet(tmp_path / "s")) == 10  # the lazy reader does not re-hash (by design: verify does)
    with pytest.raises(ShardError, match=r"verification failed: shard-00001\.h5: sha256"):
        ShardSet(tmp_path / "s", verify=True)


@pytest.mark.parametrize("edit, match", [
    (lambda d: "not json {", "not valid JSON"),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "format_version"}), "no format_version"),
    (lambda d: json.dumps({**d, "format_version": 99}), "format version 99 is newer"),
    (lambda d: json.dumps({**d, "format_version": "1"}), "no format_version"),
    (lambda d: json.dumps({**d, "fields": [{"name": "x"}]}), "malformed manifest"),
    (lambda d: json.dumps({**d, "shards": "none"}), "malformed manifest"),
], ids=["garbage", "no-version", "newer-version", "string-version", "bad-field", "bad-shards"])
def test_manifest_damage_and_unknown_format(tmp_path: Path, edit, match: str) -> None:
    write_set(tmp_path / "s")
    m = tmp_path / "s" / "manifest.json"
    m.write_text(edit(json.loads(m.read_text())))
    with pytest.raises(ShardError, match=match):
        ShardSet(tmp_path / "s")
    assert not verify_shard_set(tmp_path / "s").ok


@pytest.mark.parametrize("version", [0, -1, True], ids=["zero", "negative", "true"])
def test_manifest_older_than_any_release_is_refused(tmp_path: Path, version: object) -> None:
    write_set(tmp_path / "s")
    m = tmp_path / "s" / "manifest.json"
    m.write_text(json.dumps({**json.loads(m.read_text()), "format_version": version}))
    with pytest.raises(ShardError):
        ShardSet(tmp_path / "s")


def test_shard_key_ending_in_nul(tmp_path: Path) -> None:
    """Keys are stored as fixed-width bytes (a trailing NUL would read back stripped): refused up front."""
    with pytest.raises(ValueError, match="NUL"):
        ShardWriter(tmp_path / "s", spec(4), ["a\x00", "b"], progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()


def _fill_disk_at(out: Path, name: str) -> Path:
    """Make ``out/name`` a link to /dev/full: every write to it fails with ENOSPC, as on a full disk."""
    link = out / name
    os.symlink("/dev/full", link)
    return link


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("target", ["shard-00001.h5.tmp-{pid}", "manifest.json.tmp-{pid}"], ids=["shard", "manifest"])
def test_disk_full_during_write(tmp_path: Path, target: str) -> None:
    write_set(tmp_path / "ref")
    out, keys = tmp_path / "s", [f"img{i:05d}" for i in range(10)]
    with pytest.raises(OSError) as e:
        with ShardWriter(out, spec(4), keys, progress=False) as w:
            _fill_disk_at(out, target.format(pid=os.getpid()))  # after the writer cleaned old temporaries
            for k in w.todo():
                w.add(k, row(int(k[3:])))
    assert e.value.errno == errno.ENOSPC
    assert not (out / "manifest.json").exists()  # nothing committed
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardSet(out)
    kept = sorted(p.name for p in out.glob("shard-*.h5"))
    assert kept == (["shard-00000.h5"] if target.startswith("shard") else
                    ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"])
    write_set(out)  # space is back: the rerun removes the temporary, resumes, and commits the same bytes
    assert digests(out) == digests(tmp_path / "ref")


# ---- params -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, match", [
    ("shards.rows_per_shard=many", r"shards\.rows_per_shard: Input should be a valid integer"),
    ("progress=maybe", r"progress: Input should be a valid boolean"),
    ("dataset=[1, 2]", r"dataset: Input should be a valid dictionary"),
    ("teachers.clip.prompts=a photo", r"teachers\.clip\.prompts: Input should be a valid list"),
    ("seed=1.5", r"seed: Input should be a valid integer"),
    ("dataset.on_error=ignore", r"dataset\.on_error: Input should be 'fail' or 'skip'"),
], ids=["int-as-word", "bool-as-word", "section-as-list", "list-as-string", "int-as-float", "not-a-choice"])
def test_wrong_params_types(override: str, match: str) -> None:
    with pytest.raises(C.ConfigError, match=match):
        C.load(ROOT / "params.yaml", [override])


def test_params_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("- just\n- a list\n")
    with pytest.raises(C.ConfigError, match="top level must be a mapping, got list"):
        C.load(tmp_path / "p.yaml")


@pytest.mark.parametrize("override", ["dataset.synthetic.n_images=abc", "dataset.synthetic.colour=red"],
                         ids=["n_images-as-word", "unknown-key"])
def test_regression_synthetic_options_are_config_errors(override: str) -> None:
    """A bad dataset.synthetic value raised a plain ValueError from the generator config (CLI traceback)."""
    from grounding.data.prepare import synthetic_config

    with pytest.raises(C.ConfigError, match=r"dataset\.synthetic: "):
        synthetic_config(C.load(ROOT / "params.yaml", [override]))


# ---- the matrix itself --------------------------------------------------------------------------------------
NODE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]`]+)\])?`")


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test")}


def _literals(node: ast.AST) -> set[str]:
    """The ids pytest can derive from constants under ``node``: strings as written, numbers and bools as str."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, (str, int, float, bool)):
            out.add(str(n.value))
        elif isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant):
            out.add(f"-{n.operand.value}")
    return out


def _param_id_exists(param: str, decorators: list[ast.expr], module: ast.AST) -> bool:
    """Whether ``param`` splits at '-' into pieces that are each a literal of the parametrize decorators, a
    pytest positional id ``<argname><index>``, or (for values built at run time) a string of the module."""
    pieces = _literals(ast.Module(body=[ast.Expr(d) for d in decorators], type_ignores=[]))
    argnames = {a.strip() for p in pieces for a in p.split(",")}
    module_strings = _literals(module)

    def ok(piece: str) -> bool:
        m = re.fullmatch(r"([A-Za-z_]\w*?)(\d+)", piece)
        return piece in pieces or (m is not None and m.group(1) in argnames) or piece in module_strings

    tokens = param.split("-")
    reach = {0}
    for j in range(1, len(tokens) + 1):
        if any(i in reach and ok("-".join(tokens[i:j])) for i in range(j)):
            reach.add(j)
    return len(tokens) in reach


def test_every_node_id_in_the_matrix_exists() -> None:
    """Each row of docs/bad_inputs.md names a test (file, function and, for parametrized tests, a parameter
    id made of values written in its decorator, or strings of its file for values built at run time); each
    named test exists. Checked from the source (no import), so it stays fast."""
    text = MATRIX.read_text(encoding="utf-8")
    header = ["input", "where", "outcome", "test"]
    body, in_matrix = [], False
    for ln in text.splitlines():  # rows of the tables whose header is the matrix header (others are results)
        if not ln.startswith("|"):
            in_matrix = False
        elif [c.strip() for c in ln.strip("|").split("|")] == header:
            in_matrix = True
        elif in_matrix and not set(ln) <= set("|-: "):
            body.append(ln)
    assert len(body) >= 50
    missing = []
    for ln in body:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), f"row needs input | where | outcome | test: {ln}"
        nodes = NODE.findall(cells[3])
        assert nodes, f"row without a test node id: {ln}"
        for file, func, param in nodes:
            path = ROOT / file
            fns = _functions(path) if path.exists() else {}
            if func not in fns:
                missing.append(f"{file}::{func}")
                continue
            if param:
                decorators = [d for d in fns[func].decorator_list if "parametrize" in ast.unparse(d)]
                module = ast.parse(path.read_text(encoding="utf-8"))
                if not decorators or not _param_id_exists(param, decorators, module):
                    missing.append(f"{file}::{func}[{param}]")
    assert not missing, f"docs/bad_inputs.md names tests that do not exist: {missing}"
