"""The synthetic dataset: determinism, exact boxes and masks, unambiguous sentences, splits, nouns, config."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from grounding.data.schema import CanonicalDataset
from grounding.data.synthetic import (
    CLASSES,
    COLOURS,
    GENERATOR_VERSION,
    NOUNS,
    SPLITS,
    SyntheticConfig,
    generate,
    iter_synthetic,
    synthesize_image,
)


@pytest.fixture(scope="module")
def gen40(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticConfig, Path, CanonicalDataset]:
    cfg = SyntheticConfig(n_images=40, seed=3)
    out = tmp_path_factory.mktemp("syn40")
    return cfg, out, generate(cfg, out, progress=False)


@pytest.fixture(scope="module")
def images40(gen40: tuple[SyntheticConfig, Path, CanonicalDataset]) -> list:
    return list(iter_synthetic(gen40[0]))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- determinism -----------------------------------------------------------------------------------------


def test_same_seed_same_fingerprint_and_bytes(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_images=12, seed=7)
    a = generate(cfg, tmp_path / "a", progress=False)
    b = generate(cfg, tmp_path / "b", progress=False)
    assert a.fingerprint() == b.fingerprint()
    assert len(a.images) == 12
    for im in a.images:
        fa, fb = a.image_path(im), b.image_path(im)
        assert fa.read_bytes() == fb.read_bytes()
        assert _sha(fa) == _sha(fb) == im.sha256
    assert not (tmp_path / "a" / "dataset.json").exists()  # generate never saves; the caller does


def test_rerun_leaves_identical_files_alone(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_images=4, seed=1)
    ds = generate(cfg, tmp_path, progress=False)
    stats = {im.image_id: ds.image_path(im).stat() for im in ds.images}
    ds2 = generate(cfg, tmp_path, progress=False)
    assert ds2.fingerprint() == ds.fingerprint()
    for im in ds2.images:
        st = ds2.image_path(im).stat()
        assert (st.st_ino, st.st_mtime_ns) == (stats[im.image_id].st_ino, stats[im.image_id].st_mtime_ns)
    # a damaged file is rewritten
    victim = ds.image_path(ds.images[0])
    victim.write_bytes(b"not a jpeg")
    generate(cfg, tmp_path, progress=False)
    assert _sha(victim) == ds.images[0].sha256


def test_different_seed_different_fingerprint(tmp_path: Path) -> None:
    a = generate(SyntheticConfig(n_images=5, seed=0), tmp_path / "a", progress=False)
    b = generate(SyntheticConfig(n_images=5, seed=1), tmp_path / "b", progress=False)
    assert a.fingerprint() != b.fingerprint()


def test_image_does_not_depend_on_dataset_size() -> None:
    small = list(iter_synthetic(SyntheticConfig(n_images=5, seed=2)))
    big = list(iter_synthetic(SyntheticConfig(n_images=12, seed=2)))
    assert len(small) == 5 and len(big) == 12
    for s, b in zip(small, big):
        assert s.image.tobytes() == b.image.tobytes()
        assert (s.image_id, s.split, s.objects, s.refs) == (b.image_id, b.split, b.objects, b.refs)
    assert synthesize_image(SyntheticConfig(n_images=1, seed=2), 11).image.tobytes() == big[11].image.tobytes()


def test_save_load_roundtrip(gen40, tmp_path: Path) -> None:
    _, _, ds = gen40
    ds.save(tmp_path)
    back = CanonicalDataset.load(tmp_path)
    assert back.fingerprint() == ds.fingerprint()
    assert back.source["format"] == "synthetic"
    assert back.source["generator_version"] == GENERATOR_VERSION
    assert back.source["config"]["n_images"] == 40


# ---- images, boxes, masks ----------------------------------------------------------------------------------


def test_records_and_ids(gen40) -> None:
    cfg, out, ds = gen40
    assert ds.image_root == out / "images"
    assert [im.image_id for im in ds.images] == [f"syn{i:06d}" for i in range(40)]
    for im in ds.images:
        assert im.path == f"{im.image_id}.jpg" and ds.image_path(im).is_file()
    for r in ds.refs:
        assert re.fullmatch(r"syn\d{6}-\d+", r.ref_id) and r.ref_id.startswith(r.image_id + "-")
        assert r.category in CLASSES and r.text and r.split in SPLITS
    assert len(ds.refs) >= 2 * 40  # several sentences per image


def test_sizes_vary_and_are_non_square(gen40) -> None:
    cfg, _, ds = gen40
    sizes = {(im.width, im.height) for im in ds.images}
    assert all(cfg.min_size <= w <= cfg.max_size and cfg.min_size <= h <= cfg.max_size for w, h in sizes)
    assert sum(w != h for w, h in sizes) >= 30
    assert len({w for w, _ in sizes}) > 10 and len({h for _, h in sizes}) > 10
    from PIL import Image

    for im in ds.images[:5]:  # the files decode to the recorded size
        with Image.open(ds.image_path(im)) as f:
            assert f.size == (im.width, im.height) and f.format == "JPEG"


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_boxes_are_tight_boxes_of_masks(gen40) -> None:
    _, _, ds = gen40
    index = ds.image_index
    for r in ds.refs:
        im = index[r.image_id]
        x1, y1, x2, y2 = r.box
        assert 0 <= x1 < x2 <= im.width and 0 <= y1 < y2 <= im.height
        assert r.mask["size"] == [im.height, im.width] and isinstance(r.mask["counts"], str)
        m = mask_utils.decode({"size": r.mask["size"], "counts": r.mask["counts"].encode("ascii")})
        assert m.shape == (im.height, im.width) and m.sum() > 0
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        assert (x1, y1, x2, y2) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)


def test_objects_do_not_overlap(images40) -> None:
    for s in images40:
        assert 1 <= len(s.objects)
        boxes = [o.box for o in s.objects]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (s.image_id, a, b)
        for o in s.objects:
            assert o.cls in CLASSES and o.colour in COLOURS and o.area > 0


# ---- sentences ---------------------------------------------------------------------------------------------

_MODIFIERS = {
    "left", "right", "above", "below", "under", "over", "beneath", "top", "bottom", "topmost", "lowest",
    "leftmost", "rightmost", "farthest", "small", "little", "large", "big", "larger", "bigger", "largest",
    "biggest", "smaller", "smallest", "that", "of",
}
_CLASS_RE = "|".join(CLASSES)
_COLOUR_RE = "|".join(COLOURS)
_PLAIN = [
    re.compile(rf"^(?:the )?(?P<colour>{_COLOUR_RE}) (?P<cls>{_CLASS_RE})$"),
    re.compile(rf"^the (?P<cls>{_CLASS_RE}) in (?P<colour>{_COLOUR_RE})$"),
    re.compile(rf"^(?:the )?(?P<cls>{_CLASS_RE})$"),
]
_RELATION = re.compile(
    rf"^(?:the )?(?P<tcol>{_COLOUR_RE} )?(?P<tcls>{_CLASS_RE}) (?:that is )?"
    rf"(?P<rel>left of|to the left of|right of|to the right of|above|over|below|under|beneath) "
    rf"the (?P<lcol>{_COLOUR_RE}) (?P<lcls>{_CLASS_RE})$"
)
_SUPERLATIVE = re.compile(
    rf"^the (?P<sup>largest|biggest|larger|bigger|smallest|smaller) (?P<col>{_COLOUR_RE} )?(?P<cls>{_CLASS_RE})$"
)


def _matching(objects, cls: str, colour: str | None) -> list[int]:
    return [i for i, o in enumerate(objects) if o.cls == cls and (colour is None or o.colour == colour)]


def test_sentences_refer_uniquely_independent_checker(images40) -> None:
    """Re-check sentences of simple forms with a parser that shares no code with the generator."""
    checked = {"plain": 0, "relation": 0, "superlative": 0}
    for s in images40:
        objs = s.objects
        for r in s.refs:
            text = r.text
            words = set(text.split())
            if not words & _MODIFIERS:
                for pat in _PLAIN:
                    m = pat.match(text)
                    if m:
                        found = _matching(objs, m["cls"], m.groupdict().get("colour"))
                        assert found == [r.target], (s.image_id, text, found)
                        checked["plain"] += 1
                        break
            m = _RELATION.match(text)
            if m:
                lands = _matching(objs, m["lcls"], m["lcol"])
                assert len(lands) == 1, (s.image_id, text)  # the landmark itself is unambiguous
                t, land = objs[r.target].box, objs[lands[0]].box
                side = m["rel"].split()[-2] if m["rel"].endswith(" of") else m["rel"]
                ok = {"left": t[2] <= land[0], "right": t[0] >= land[2], "above": t[3] <= land[1],
                      "over": t[3] <= land[1], "below": t[1] >= land[3], "under": t[1] >= land[3],
                      "beneath": t[1] >= land[3]}[side]
                assert ok, (s.image_id, text)
                assert objs[r.target].cls == m["tcls"]
                checked["relation"] += 1
            m = _SUPERLATIVE.match(text)
            if m:
                col = m["col"].strip() if m["col"] else None
                group = _matching(objs, m["cls"], col)
                assert r.target in group, (s.image_id, text)
                areas = {i: objs[i].area for i in group}
                pick = max if m["sup"] in ("largest", "biggest", "larger", "bigger") else min
                assert pick(areas, key=areas.get) == r.target, (s.image_id, text)
                checked["superlative"] += 1
    assert checked["plain"] >= 20 and checked["relation"] >= 1, checked


def test_sentence_metadata_consistent(images40) -> None:
    kinds = set()
    for s in images40:
        texts = [r.text for r in s.refs]
        assert len(texts) == len(set(texts))
        for r in s.refs:
            target = s.objects[r.target]
            assert r.noun in r.text
            assert (r.noun, target.cls, r.noun_relation) in {(n.noun, n.cls, n.relation) for n in NOUNS}
            kinds.add(r.kind)
            if r.kind == "relation":
                assert r.landmark is not None and r.landmark != r.target
    assert {"noun", "colour", "extreme", "relation"} <= kinds


def test_some_nouns_differ_from_class(images40) -> None:
    rels = [r.noun_relation for s in images40 for r in s.refs]
    other = [r for s in images40 for r in s.refs if r.noun != s.objects[r.target].cls]
    assert len(other) >= 10
    assert {"synonym", "hypernym", "hyponym"} <= set(rels)


def test_nouns_table() -> None:
    assert len(set(CLASSES)) == len(CLASSES)
    for c in CLASSES:
        assert (c, c, "exact") in {(n.noun, n.cls, n.relation) for n in NOUNS}
    for n in NOUNS:
        assert n.cls in CLASSES and n.relation in {"exact", "synonym", "hyponym", "hypernym", "none"}
        assert (n.relation == "exact") == (n.noun == n.cls)


def test_all_splits_present(gen40) -> None:
    _, _, ds = gen40
    splits = ds.splits()
    assert set(splits) == set(SPLITS)
    assert splits["train"] > max(splits["val"], splits["testA"], splits["testB"])
    per_image = {}
    for r in ds.refs:
        assert per_image.setdefault(r.image_id, r.split) == r.split  # one split per image


# ---- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_images": 0}, "n_images"),
        ({"min_size": 500, "max_size": 300}, "min_size"),
        ({"min_objects": 4, "max_objects": 2}, "min_objects"),
        ({"split_fractions": (0.5, 0.1, 0.1, 0.1)}, "sum to 1"),
        ({"split_fractions": (0.7, 0.3)}, "split_fractions"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"seed": -1}, "seed"),
        ({"noun_variation": 1.5}, "noun_variation"),
        ({"n_images": 2.5}, "integer"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


def test_config_is_frozen() -> None:
    cfg = SyntheticConfig()
    assert (cfg.n_images, cfg.min_size, cfg.max_size, cfg.jpeg_quality) == (240, 240, 640, 90)
    with pytest.raises(AttributeError):
        cfg.n_images = 3  # type: ignore[misc]
