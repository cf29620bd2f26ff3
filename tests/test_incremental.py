"""Incremental extension: a dataset grown by 10% recomputes only the rows of changed shards (the new items
plus those of the old set's last shard when it was partial), and the merged shard set verifies and equals a
from-scratch run of the grown dataset, file by file and row by row.

Stage tests run the real stages on a small synthetic set (the generator is deterministic per image, so
``n_images`` 40 -> 44 keeps the first 40 images and sentences and appends 4 images whose ids sort last),
with ``rows_per_shard`` 8. Writer tests use the deterministic rows of ``_writer_proc``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from grounding import config as C
from grounding import stage_writer, stages
from grounding.data.schema import CanonicalDataset
from grounding.shards import Manifest, ShardError, ShardSet, ShardSetSpec, ShardWriter, file_sha256, verify_shard_set
from grounding.shards.keys import content_base
from grounding.shards.manifest import FORMAT_VERSION, MANIFEST
from grounding.shards.writer import SHARD_PATTERN

sys.path.insert(0, str(Path(__file__).parent))
from _writer_proc import FIELDS, row  # noqa: E402

RPS = 8
MICRO_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ---- helpers -------------------------------------------------------------------------------------------
def make_params(root: Path, n_images: int, *, name: str = "synthetic", reuse_from: list[str] | None = None,
                clip: dict[str, Any] | None = None) -> C.Params:
    doc: dict[str, Any] = {
        "device": "cpu", "progress": False, "seed": 0,
        "dataset": {"name": name, "synthetic": {"n_images": n_images, "min_size": 64, "max_size": 160}},
        "shards": {"rows_per_shard": RPS, "reuse_from": reuse_from or []},
        "paths": {k: str(root / k) for k in ("prepared", "teachers", "students", "metrics", "models")},
    }
    if clip is not None:
        doc["teachers"] = {"clip": {"batch_size": 4, "num_workers": 0, **clip}}
    return C.from_dict(doc)


class Counter:
    """Counts the rows the stage hands to the writer (the rows it computed) by patching ShardWriter.add."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[str] = []
        add, skip = ShardWriter.add, ShardWriter.skip

        def counting_add(w: ShardWriter, key: str, r: Any) -> None:
            self.keys.append(str(key))
            add(w, key, r)

        def counting_skip(w: ShardWriter, key: str, reason: str) -> None:
            self.keys.append(str(key))
            skip(w, key, reason)

        monkeypatch.setattr(ShardWriter, "add", counting_add)
        monkeypatch.setattr(ShardWriter, "skip", counting_skip)

    def take(self) -> list[str]:
        out, self.keys = self.keys, []
        return out


def digests(d: Path, *, manifest: bool = True) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if manifest or p.name != MANIFEST}


def assert_same_rows(a: Path, b: Path) -> None:
    sa, sb = ShardSet(a), ShardSet(b)
    assert sa.keys == sb.keys
    for k in sa.keys:
        ra, rb = sa.get(k), sb.get(k)
        assert ra.keys() == rb.keys()
        for f in ra:
            assert ra[f].dtype == rb[f].dtype and ra[f].shape == rb[f].shape
            assert ra[f].tobytes() == rb[f].tobytes(), (k, f)


def expected_todo(item_keys: list[str], n_old: int) -> list[str]:
    """Items an extension must compute: from the first shard holding a new item (the old set's last,
    partial shard, if any, recomputed whole: its rows could be carried over, but a teacher's rows may depend
    on the batch they were computed in, and only shard-aligned batches match a scratch run) to the end."""
    return item_keys[(n_old // RPS) * RPS:]


def item_keys_of(params: C.Params, level: str) -> list[str]:
    ds = CanonicalDataset.load(params.prepared_dir())
    return [im.image_id for im in ds.images] if level == "image" else [r.ref_id for r in ds.refs]


def extend_and_compare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: list[str], level: str,
                       n0: int = 40, n1: int = 44, **kw: Any) -> None:
    """Run ``names`` on ``n0`` images, grow the dataset to ``n1`` in place and rerun (counting the rows
    computed), then run the grown dataset from scratch elsewhere and compare."""
    a, b = tmp_path / "a", tmp_path / "b"
    count = Counter(monkeypatch)
    pa = make_params(a, n0, **kw)
    for stage in ["prepare", *names]:
        stages.run(stage, pa)
    old_keys = {s: item_keys_of(pa, level) for s in names}
    assert len(count.take()) == len(names) * len(old_keys[names[0]])

    pa = make_params(a, n1, **kw)  # the grown dataset, same name and output directories
    stages.run("prepare", pa)
    new_keys = item_keys_of(pa, level)
    assert new_keys[:len(old_keys[names[0]])] == old_keys[names[0]]  # new items sort after the old ones
    for stage in names:
        stages.run(stage, pa)
        computed = count.take()
        assert computed == expected_todo(new_keys, len(old_keys[stage])), stage
        assert len(computed) <= (n1 - n0) * len(new_keys) / n1 + RPS  # the new rows plus one partial shard
        assert verify_shard_set(pa.teacher_dir(stage)).ok

    pb = make_params(b, n1, **kw)
    for stage in ["prepare", *names]:
        stages.run(stage, pb)
        if stage == "prepare":
            continue
        assert count.take() == new_keys
        # same stage key, same manifest (dataset_dir is relative and both trees have the same shape), same files
        assert digests(pa.teacher_dir(stage)) == digests(pb.teacher_dir(stage)), stage
        assert_same_rows(pa.teacher_dir(stage), pb.teacher_dir(stage))


# ---- real stages ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n0,n1", [(40, 44), (36, 40)])
def test_gt_boxes_extension_computes_only_new_rows_and_equals_scratch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n0: int, n1: int) -> None:
    extend_and_compare(tmp_path, monkeypatch, ["gt-boxes"], "image", n0, n1)


@pytest.mark.slow
def test_wordnet_labels_extension_sentence_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extend_and_compare(tmp_path, monkeypatch, ["wordnet-labels"], "sentence")


def _clip_weights(root: Path) -> dict[str, Any]:
    """A micro open_clip config and random weights saved like the bootstrap saves them (a fixed teacher)."""
    from grounding.teachers import clip as T
    from grounding.teachers.clip_bootstrap import state_dict_bytes

    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "micro-clip-incremental.json"
    cfg.write_text(json.dumps(MICRO_CLIP), encoding="utf-8")
    cp = C.ClipParams(model_config=str(cfg))
    torch.manual_seed(0)
    weights = root / "w0.pt"
    weights.write_bytes(state_dict_bytes(T.create_model(T.model_spec(cp))))
    return {"model_config": str(cfg), "pretrained": str(weights)}


@pytest.mark.slow
def test_clip_image_and_text_extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    clip = _clip_weights(tmp_path / "clip")
    extend_and_compare(tmp_path, monkeypatch, ["clip-image"], "image", clip=clip)
    extend_and_compare(tmp_path / "t", monkeypatch, ["clip-text"], "sentence", clip=clip)


def test_reuse_from_another_dataset_copies_unchanged_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    count = Counter(monkeypatch)
    old = make_params(tmp_path / "a", 40)
    stages.run("prepare", old)
    stages.run("gt-boxes", old)
    count.take()
    grown = make_params(tmp_path / "a", 44, name="synthetic-10pc", reuse_from=["synthetic"])
    stages.run("prepare", grown)
    stages.run("gt-boxes", grown)
    keys = item_keys_of(grown, "image")
    assert count.take() == keys[40:]
    assert verify_shard_set(grown.teacher_dir("gt-boxes")).ok
    assert verify_shard_set(old.teacher_dir("gt-boxes")).ok  # the donor is untouched
    scratch = make_params(tmp_path / "b", 44, name="synthetic-10pc")
    stages.run("prepare", scratch)
    stages.run("gt-boxes", scratch)
    assert digests(grown.teacher_dir("gt-boxes")) == digests(scratch.teacher_dir("gt-boxes"))


def test_item_hashes_follow_item_content(tmp_path: Path) -> None:
    """Image items hash the image record and its sentences, sentence items the sentence and its image; an
    edit touches only the items it concerns. gt-boxes keys its dataset-wide class list as a stage param."""
    from dataclasses import asdict, replace

    p = make_params(tmp_path, 6)
    stages.run("prepare", p)
    stages.run("gt-boxes", p)
    m = Manifest.load(p.teacher_dir("gt-boxes"))
    assert m.params["classes"] == m.extra["classes"] and m.content_base
    ds = CanonicalDataset.load(p.prepared_dir())
    images, refs = [asdict(i) for i in ds.images], [asdict(r) for r in ds.refs]
    img_keys, ref_keys = [i.image_id for i in ds.images], [r.ref_id for r in ds.refs]
    h_img = stage_writer.dataset_item_hashes(images, refs, "image", img_keys)
    h_ref = stage_writer.dataset_item_hashes(images, refs, "sentence", ref_keys)
    assert h_img is not None and h_ref is not None and len(set(h_img)) == 6 and len(set(h_ref)) == len(refs)
    edited = [asdict(replace(r, text=r.text + " x")) if i == 0 else asdict(r) for i, r in enumerate(ds.refs)]
    e_img = stage_writer.dataset_item_hashes(images, edited, "image", img_keys)
    e_ref = stage_writer.dataset_item_hashes(images, edited, "sentence", ref_keys)
    assert [a != b for a, b in zip(h_img, e_img)] == [k == ds.refs[0].image_id for k in img_keys]
    assert [a != b for a, b in zip(h_ref, e_ref)] == [k == ds.refs[0].ref_id for k in ref_keys]
    assert stage_writer.dataset_item_hashes(images, refs, "image", ["not-an-image"]) is None
    assert stage_writer.dataset_item_hashes(images, refs, "region", img_keys) is None


# ---- the writer ----------------------------------------------------------------------------------------
def _spec(key: str, items: list[str], *, params: dict[str, Any] | None = None) -> ShardSetSpec:
    p = params or {"n": 1}
    return ShardSetSpec(stage="test", stage_key=key, level="image", fields=FIELDS, rows_per_shard=4, params=p,
                        inputs={"dataset": key}, content_base=content_base("test", "code", None, p, {"dataset": key}))


def _hashes(items: list[str]) -> list[str]:
    return [hashlib.sha256(k.encode()).hexdigest() for k in items]


def _write(out: Path, n: int, *, key: str | None = None, hashes: list[str] | None = None,
           params: dict[str, Any] | None = None, fail_after: int | None = None,
           reuse_from: Path | None = None) -> tuple[ShardWriter, list[str]]:
    items = [f"img{i:05d}" for i in range(n)]
    w = ShardWriter(out, _spec(key or f"ds-{n}", items, params=params), items, progress=False,
                    item_hashes=hashes or _hashes(items), reuse_from=reuse_from)
    computed: list[str] = []
    with w:
        for k in w.todo():
            if fail_after is not None and len(computed) == fail_after:
                raise RuntimeError("killed")
            w.add(k, row(int(k[3:])))
            computed.append(k)
    return w, computed


def test_writer_keeps_shards_with_unchanged_content(tmp_path: Path) -> None:
    _write(tmp_path / "s", 18)
    w, computed = _write(tmp_path / "s", 20)
    assert computed == [f"img{i:05d}" for i in range(16, 20)]  # shard 4 (2 old + 2 new items) only
    assert w.reused == {0: "kept", 1: "kept", 2: "kept", 3: "kept"}
    _write(tmp_path / "ref", 20)
    assert digests(tmp_path / "s") == digests(tmp_path / "ref")
    # one item's content changes: only its shard is recomputed
    items = [f"img{i:05d}" for i in range(20)]
    h = _hashes(items)
    h[5] = "changed"
    w, computed = _write(tmp_path / "s", 20, key="ds-20-edited", hashes=h)
    assert computed == items[4:8] and sorted(w.reused) == [0, 2, 3, 4]
    # different params: nothing is reused
    w, computed = _write(tmp_path / "s", 20, key="ds-20-p2", params={"n": 2})
    assert len(computed) == 20 and not w.reused


def test_writer_content_keys_recorded_and_verified(tmp_path: Path) -> None:
    w, _ = _write(tmp_path / "s", 10)
    m = Manifest.load(tmp_path / "s")
    assert m.format_version == FORMAT_VERSION and m.content_base and len({s.content_key for s in m.shards}) == 3
    with h5py.File(tmp_path / "s" / m.shards[0].file, "r") as f:
        assert f.attrs["content_key"] == m.shards[0].content_key and "stage_key" not in f.attrs
    doc = json.loads((tmp_path / "s" / MANIFEST).read_text())
    doc["shards"][0]["content_key"] = "0" * 64
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(doc))
    report = verify_shard_set(tmp_path / "s")
    assert not report.ok and "content key" in report.problems[0]


def test_killed_extension_resumes_and_equals_scratch(tmp_path: Path) -> None:
    _write(tmp_path / "s", 16)
    with pytest.raises(RuntimeError, match="killed"):
        _write(tmp_path / "s", 24, fail_after=5)  # dies inside the second new shard
    assert not (tmp_path / "s" / MANIFEST).exists()  # the old set was un-committed before anything changed
    with pytest.raises(ShardError):
        ShardSet(tmp_path / "s")
    w, computed = _write(tmp_path / "s", 24)
    assert computed == [f"img{i:05d}" for i in range(20, 24)]  # kept: 4 old shards + the finished new one
    _write(tmp_path / "ref", 24)
    assert digests(tmp_path / "s") == digests(tmp_path / "ref")
    assert verify_shard_set(tmp_path / "s").ok


def test_damaged_old_shard_is_recomputed_not_reused(tmp_path: Path) -> None:
    _write(tmp_path / "s", 16)
    shard = tmp_path / "s" / SHARD_PATTERN.format(1)
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF  # a flipped byte in the data, attributes and keys still read fine
    shard.write_bytes(bytes(data))
    w, computed = _write(tmp_path / "s", 20)
    assert computed == [f"img{i:05d}" for i in [*range(4, 8), *range(16, 20)]]
    _write(tmp_path / "ref", 20)
    assert digests(tmp_path / "s") == digests(tmp_path / "ref")


def test_reuse_from_source_copies_and_checks_hashes(tmp_path: Path) -> None:
    _write(tmp_path / "src", 16)
    before = digests(tmp_path / "src")
    w, computed = _write(tmp_path / "dst", 20, reuse_from=tmp_path / "src")
    assert computed == [f"img{i:05d}" for i in range(16, 20)]
    assert w.reused == {i: "copied" for i in range(4)}
    assert digests(tmp_path / "src") == before
    _write(tmp_path / "ref", 20)
    assert digests(tmp_path / "dst") == digests(tmp_path / "ref")
    # a source whose shard does not match its manifest donates nothing for that shard
    shard = tmp_path / "src" / SHARD_PATTERN.format(2)
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    w, computed = _write(tmp_path / "dst2", 20, reuse_from=tmp_path / "src")
    assert computed == [f"img{i:05d}" for i in [*range(8, 12), *range(16, 20)]]
    assert not list((tmp_path / "dst2").glob("*.tmp*"))


def test_item_hashes_need_a_content_base(tmp_path: Path) -> None:
    items = ["a", "b"]
    spec = ShardSetSpec(stage="test", stage_key="k", level="image", fields=FIELDS)
    with pytest.raises(ValueError, match="go together"):
        ShardWriter(tmp_path / "s", spec, items, progress=False, item_hashes=_hashes(items))
    with pytest.raises(ValueError, match="item hashes for"):
        ShardWriter(tmp_path / "s", _spec("k", items), items, progress=False, item_hashes=["x"])


def test_version_1_sets_still_read_and_verify(tmp_path: Path) -> None:
    """A set written before content addresses (format 1: shards carry the set's stage key) stays valid."""
    out = tmp_path / "s"
    items = [f"img{i:05d}" for i in range(6)]
    with ShardWriter(out, ShardSetSpec(stage="test", stage_key="v1-key", level="image", fields=FIELDS,
                                       rows_per_shard=4), items, progress=False) as w:
        for k in w.todo():
            w.add(k, row(int(k[3:])))
    doc = json.loads((out / MANIFEST).read_text())
    doc["format_version"] = 1
    doc.pop("content_base")
    for s in doc["shards"]:
        with h5py.File(out / s["file"], "r+") as f:
            del f.attrs["content_key"]
            f.attrs["stage_key"] = "v1-key"
            f.attrs["format_version"] = 1
        s.pop("content_key")
        s["sha256"], s["size"] = file_sha256(out / s["file"]), (out / s["file"]).stat().st_size
    (out / MANIFEST).write_text(json.dumps(doc))
    assert verify_shard_set(out).ok
    s = ShardSet(out)
    assert s.keys == items and s.manifest.format_version == 1
    np.testing.assert_array_equal(s.get("img00005")["label"], row(5)["label"])
