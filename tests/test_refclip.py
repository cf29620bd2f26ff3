"""RefCLIP on cached anchors: the loss (hand-checked), training that learns and is deterministic, the
checkpoint format, pseudo-boxes, Acc@0.5 metrics, and export round trips through the project's readers.

The anchor shard set here is an *oracle* stand-in for `yolo-anchors` (same schema): the kept anchors of
each synthetic image are its objects' GT boxes plus distractors, with features that encode class and
colour. That isolates RefCLIP from the quality of the bootstrapped detector (tested in its own suite)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from grounding import config, stages
from grounding.data import synthetic as S
from grounding.data.schema import CanonicalDataset
from grounding.data.simrec import read_simrec
from grounding.data.transvg import read_transvg
from grounding.refclip.loss import anchor_contrastive_loss, published_contrastive_loss
from grounding.refclip.model import RefCLIP, RefCLIPConfig, RefCLIPNet, from_checkpoint
from grounding.refclip.text import build_vocab, encode
from grounding.shards import FieldSpec, ShardSet, ShardSetSpec, ShardWriter

N_IMAGES = 40
FEAT = 24


def test_loss_matches_hand_computation() -> None:
    # 2 items, 2 anchors each. scores[t, i, k]
    s = torch.tensor([[[2.0, 1.0], [0.5, 3.0]],
                      [[1.5, -1.0], [0.0, 4.0]]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    same = torch.eye(2, dtype=torch.bool)
    # sentence 0: positive = max(2, 1) = 2; negatives = image 1's top-2 = 3.0, 0.5
    l0 = -np.log(np.exp(2) / (np.exp(2) + np.exp(3.0) + np.exp(0.5)))
    # sentence 1: positive = max(0, 4) = 4; negatives = image 0's top-2 = 1.5, -1.0
    l1 = -np.log(np.exp(4) / (np.exp(4) + np.exp(1.5) + np.exp(-1.0)))
    got = anchor_contrastive_loss(s, mask, same, n_neg=2, temperature=1.0)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # n_neg=1 keeps only the best anchor of the other image; a padded anchor is never chosen
    l0_1 = -np.log(np.exp(2) / (np.exp(2) + np.exp(3.0)))
    l1_1 = -np.log(np.exp(4) / (np.exp(4) + np.exp(1.5)))
    assert anchor_contrastive_loss(s, mask, same, n_neg=1).item() == pytest.approx((l0_1 + l1_1) / 2, rel=1e-6)
    masked = mask.clone()
    masked[1, 1] = False  # image 1's 4.0/3.0 anchor is padding
    l0_m = -np.log(np.exp(2) / (np.exp(2) + np.exp(0.5)))
    l1_m = -np.log(np.exp(0.0) / (np.exp(0.0) + np.exp(1.5) + np.exp(-1.0)))
    assert anchor_contrastive_loss(s, masked, same, n_neg=2).item() == pytest.approx((l0_m + l1_m) / 2, rel=1e-6)


def test_same_image_items_are_not_negatives() -> None:
    s = torch.tensor([[[2.0], [9.0]], [[9.0], [2.0]]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    both_same = torch.ones(2, 2, dtype=torch.bool)  # two sentences of one image
    assert anchor_contrastive_loss(s, mask, both_same, n_neg=1).item() == pytest.approx(0.0, abs=1e-6)
    assert anchor_contrastive_loss(s, mask, torch.eye(2, dtype=torch.bool), n_neg=1).item() > 5


def test_vocab_encode_and_checkpoint_round_trip() -> None:
    vocab = build_vocab(["the red circle", "a Red square!", "über-blue"])
    assert vocab == ["PAD", "UNK", "CLS", "the", "red", "circle", "a", "square", "über", "blue"]  # first seen
    ids, trunc = encode(["the red circle left of the blue star", ""], vocab, max_len=4)
    assert ids.shape == (2, 4) and trunc.tolist() == [True, False] and ids[0].tolist() == [3, 4, 5, 1]
    assert ids[1].tolist() == [0, 0, 0, 0]  # the public encoding: an empty sentence is all padding
    model = RefCLIP(RefCLIPConfig(vocab_size=len(vocab), features="p5-cells", feature_dim=8, word_dim=16,
                                  hidden=32, heads=4, ff_size=64))
    from grounding.refclip.model import checkpoint

    buf = Path(__file__).parent / "_ckpt_tmp.pt"
    try:
        torch.save(checkpoint(model, vocab), buf)
        m2, v2 = from_checkpoint(torch.load(buf, weights_only=True))
    finally:
        buf.unlink(missing_ok=True)
    assert v2 == vocab
    x = torch.randn(3, 5, 8)
    model.eval()
    assert torch.equal(model(x, ids), m2(x, ids))


def _oracle_feature(cls: str, colour: str, rng: np.random.Generator) -> np.ndarray:
    v = np.zeros(FEAT, np.float32)
    v[S.CLASSES.index(cls)] = 1.0
    v[len(S.CLASSES) + S.COLOURS.index(colour)] = 1.0
    return v + rng.normal(0, 0.05, FEAT).astype(np.float32)


def _oracle_anchors(params: config.Params, ds: CanonicalDataset) -> None:
    """A `yolo-anchors`-shaped shard set whose kept anchors are GT objects plus two distractors (weaker
    features of a random class and colour, so no anchor is an image-unique fingerprint to memorise)."""
    cfg = S.SyntheticConfig(n_images=N_IMAGES, seed=params.seed)
    rng = np.random.default_rng(0)
    fields = (FieldSpec("boxes", "float32", (4,), ragged=True), FieldSpec("scores", "float32", (), ragged=True),
              FieldSpec("features", "float16", (FEAT,), ragged=True),
              FieldSpec("cell_index", "int32", (), ragged=True))
    spec = ShardSetSpec(stage="yolo-anchors", stage_key="oracle", level="region", fields=fields,
                        rows_per_shard=16, teacher={"name": "oracle"})
    keys = [im.image_id for im in ds.images]
    with ShardWriter(params.teacher_dir("yolo-anchors"), spec, keys, progress=False) as w:
        for k in w.todo():
            img = S.synthesize_image(cfg, int(k[3:]))
            boxes = [o.box for o in img.objects]
            feats = [_oracle_feature(o.cls, o.colour, rng) for o in img.objects]
            for _ in range(2):  # distractors: background clutter that looks like some shape of some colour
                x, y = rng.uniform(0, 100, 2)
                boxes.append((x, y, x + 20, y + 20))
                feats.append(_oracle_feature(str(rng.choice(S.CLASSES)), str(rng.choice(S.COLOURS)), rng) * 0.5)
            n = len(boxes)
            w.add(k, {"boxes": np.array(boxes, np.float32), "scores": rng.uniform(0, 1, n).astype(np.float32),
                      "features": np.stack(feats), "cell_index": np.arange(n, dtype=np.int32)})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> config.Params:
    tmp = tmp_path_factory.mktemp("refclip")
    p = config.load(None, [f"dataset.synthetic.n_images={N_IMAGES}", "progress=false",
                           *(f"paths.{k}={tmp}/{k}" for k in ("prepared", "teachers", "models", "metrics")),
                           "refclip.epochs=30", "refclip.lr=0.003", "refclip.batch_size=32", "refclip.hidden=64",
                           "refclip.word_dim=32", "refclip.heads=4", "refclip.ff_size=128",
                           "refclip.features=p5-cells"])
    stages.run("prepare", p)
    _oracle_anchors(p, CanonicalDataset.load(p.prepared_dir()))
    for name in ("refclip-train", "refclip-pseudo", "refclip-export"):
        stages.run(name, p)
    return p


def test_training_learns_to_pick_the_referred_anchor(trained: config.Params) -> None:
    report = json.loads((Path(trained.paths.metrics) / "refclip.json").read_text())["refclip"]
    train = report["train"]
    assert train["upper_bound"] == 1.0  # the oracle anchors contain every GT box
    assert train["acc"] > train["random_anchor"] + 0.25, train
    assert report["val"]["acc"] > report["val"]["random_anchor"] + 0.2, report["val"]
    curve = json.loads((Path(trained.paths.metrics) / "refclip-train-curve.json").read_text())
    assert len(curve) == 30 and curve[-1]["loss"] < curve[0]["loss"]


def test_training_is_deterministic_and_checkpoint_is_safe(trained: config.Params, tmp_path: Path) -> None:
    from grounding.refclip.train import model_path

    weights = model_path(trained)
    ckpt = torch.load(weights, weights_only=True)  # plain tensors, strings and numbers only
    again = trained.model_copy(update={"paths": trained.paths.model_copy(update={"models": str(tmp_path)})})
    stages.run("refclip-train", again)
    ckpt2 = torch.load(model_path(again), weights_only=True)
    assert ckpt["vocab"] == ckpt2["vocab"]
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, ckpt2["state_dict"][k]), k


def test_pseudo_boxes_and_rerun_is_no_op(trained: config.Params) -> None:
    pseudo_dir = trained.teacher_dir("refclip-pseudo")
    ps = ShardSet(pseudo_dir)
    ds = CanonicalDataset.load(trained.prepared_dir())
    assert len(ps) == len(ds.refs) and ps.manifest.level == "sentence"
    assert ps.manifest.teacher["name"] == "refclip" and len(ps.manifest.teacher["weights_sha256"]) == 64
    anchors = ShardSet(trained.teacher_dir("yolo-anchors"))
    ref = ds.refs[0]
    row = ps.get(ref.ref_id)
    kept = anchors.get(ref.image_id)["boxes"]
    assert np.array_equal(row["box"], kept[int(row["anchor_rank"])])  # the box of the chosen kept anchor
    before = {p.name: p.stat().st_mtime_ns for p in pseudo_dir.iterdir()}
    stages.run("refclip-pseudo", trained)
    assert {p.name: p.stat().st_mtime_ns for p in pseudo_dir.iterdir()} == before


def _by_text(ds: CanonicalDataset) -> dict[tuple[str, str, str], tuple]:
    images = ds.image_index
    return {(r.split, images[r.image_id].path, r.text): r.box for r in ds.refs}


def test_exports_round_trip_through_the_readers(trained: config.Params) -> None:
    ds = CanonicalDataset.load(trained.prepared_dir())
    ps = ShardSet(trained.teacher_dir("refclip-pseudo"))
    out = trained.teacher_dir("refclip-export")
    expected = {}
    images = ds.image_index
    for r in ds.refs:
        box = tuple(float(v) for v in ps.get(r.ref_id)["box"]) if r.split == "train" else r.box
        expected.setdefault((r.split, images[r.image_id].path, r.text), set()).add(box)

    simrec = read_simrec(out / "simrec" / f"{ds.name}.json", ds.image_root, dataset="synthetic",
                         image_pattern="{iid}.jpg", on_error="skip")
    transvg = read_transvg(out / "transvg", "unc", ds.image_root, on_error="skip")
    for back in (simrec, transvg):
        got = {}
        for (split, path, text), box in _by_text(back).items():
            got.setdefault((split, path, text), set()).add(box)
        assert back.errors == [] and len(back.refs) == len(ds.refs)
        assert got == expected
    doc = json.loads((out / "simrec" / f"{ds.name}.json").read_text())
    item = doc["train"][0]
    assert set(item) >= {"iid", "bbox", "cat_id", "refs", "mask_id"}
    prov = json.loads((out / "simrec" / f"{ds.name}.provenance.json").read_text())
    assert prov["pseudo_splits"] == ["train"] and prov["boxes_by_split"]["val"] == {"gt": len(doc["val"])}


def test_export_cli(trained: config.Params, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from grounding.cli import app

    sets = [f"--set=paths.{k}={getattr(trained.paths, k)}" for k in ("prepared", "teachers", "models", "metrics")]
    sets.append(f"--set=dataset.synthetic.n_images={N_IMAGES}")
    res = CliRunner().invoke(app, ["export", "pseudo", "--format", "transvg", "-o", str(tmp_path / "tv"),
                                   "--transvg-dataset", "referit", *sets])
    assert res.exit_code == 0, res.output
    rows = torch.load(tmp_path / "tv" / "referit" / "referit_train.pth", weights_only=True)
    ps = ShardSet(trained.teacher_dir("refclip-pseudo"))
    ds = CanonicalDataset.load(trained.prepared_dir())
    first = next(r for r in ds.refs if r.split == "train")
    assert list(rows[0][2]) == [float(v) for v in ps.get(first.ref_id)["box"]]  # referit: xyxy as is
    res = CliRunner().invoke(app, ["export", "pseudo", "--format", "coco", "-o", str(tmp_path / "x"), *sets])
    assert res.exit_code == 1 and "unknown export format" in res.output
