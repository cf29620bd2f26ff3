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


def test_exports_round_trip_through_the_readers(trained: config.Params) -> None:
    """The stage's SimREC export (integer iids, COCO-named image links, one mask per item) reads back
    through the project's reader with every box exact; tests/test_export.py checks all formats in depth."""
    ds = CanonicalDataset.load(trained.prepared_dir())
    ps = ShardSet(trained.teacher_dir("refclip-pseudo"))
    out = trained.teacher_dir("refclip-export") / "simrec"
    prov = json.loads((out / "provenance.json").read_text())
    dropped = {d["ref_id"] for d in prov["dropped"]}
    expected = {r.ref_id: tuple(float(v) for v in ps.get(r.ref_id)["box"]) if r.split == "train" else r.box
                for r in ds.refs if r.ref_id not in dropped}
    doc = json.loads((out / "anns" / "refcoco.json").read_text())
    ref_of = {it["mask_id"]: it["ref_id"] for items in doc.values() for it in items}
    back = read_simrec(out / "anns" / "refcoco.json", out / "images" / "coco", dataset="refcoco")
    assert back.errors == [] and len(back.refs) == len(expected) == len(ref_of)
    assert {ref_of[int(r.ref_id.split("/")[1])]: r.box for r in back.refs} == expected
    assert len(list((out / "masks" / "refcoco").glob("*.npy"))) == len(ref_of)
    item = doc["train"][0]
    assert set(item) >= {"iid", "bbox", "cat_id", "refs", "mask_id"} and isinstance(item["iid"], int)
    assert prov["pseudo_splits"] == ["train"] and prov["boxes_by_split"]["val"] == {"gt": len(doc["val"])}


def test_export_cli(trained: config.Params, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from grounding.cli import app

    sets = [f"--set=paths.{k}={getattr(trained.paths, k)}" for k in ("prepared", "teachers", "models", "metrics")]
    sets.append(f"--set=dataset.synthetic.n_images={N_IMAGES}")
    res = CliRunner().invoke(app, ["export", "pseudo", "--format", "transvg", "-o", str(tmp_path / "tv"),
                                   "--transvg-dataset", "unc", *sets])
    assert res.exit_code == 0, res.output
    rows = torch.load(tmp_path / "tv" / "data" / "unc" / "unc_train.pth", weights_only=True)
    prov = json.loads((tmp_path / "tv" / "provenance.json").read_text())
    ps = ShardSet(trained.teacher_dir("refclip-pseudo"))
    box = ps.get(prov["rows"]["train"]["ref_ids"][0])["box"].astype(np.float64)
    x, y, w, h = rows[0][2]  # integers: TransVG's int cast keeps them, then x2 = x + w
    assert all(isinstance(v, int) for v in rows[0][2])
    assert np.abs(np.array([x, y, x + w, y + h]) - box).max() <= 0.5
    res = CliRunner().invoke(app, ["export", "pseudo", "--format", "coco", "-o", str(tmp_path / "x"), *sets])
    assert res.exit_code == 2 and "unknown export format" in res.output


# ---- RefCLIP as published (multiscale) on a darknet-layout cache (CONTRACT-20), issue 21's degenerate mask ----

G = 4  # a 128-px canvas: 4x4 stride-32 cells
CH = (8, 16, 24)  # (C8, C16, C32) of a width-scaled detector
K_KEPT = 9  # up to 5 objects + 1 all-degenerate cell + 2 distractors + noise


def _public_contrast(vis: torch.Tensor, lan: torch.Tensor) -> torch.Tensor:
    """The public getContrast written out from its description: top-2 anchors per (text, image), logits =
    every image's best + every other image's second best, target = own image."""
    sim = torch.einsum("avd,bd->bav", vis, lan)  # [text, image, anchor]
    top = sim.topk(2, dim=-1).values
    b = sim.shape[0]
    second = top[..., 1][~torch.eye(b, dtype=torch.bool)].view(b, b - 1)
    return torch.nn.functional.cross_entropy(torch.cat([top[..., 0], second], 1), torch.arange(b))


def test_published_loss_is_getcontrast() -> None:
    g = torch.Generator().manual_seed(0)
    vis, lan = torch.randn(5, 6, 8, generator=g), torch.randn(5, 8, generator=g)
    scores = torch.einsum("ikh,th->tik", vis, lan)
    mask = torch.ones(5, 6, dtype=torch.bool)
    assert published_contrastive_loss(scores, mask).item() == pytest.approx(_public_contrast(vis, lan).item(), rel=1e-6)
    # it differs from eq4 with same-image exclusion when two items show one image
    same = torch.eye(5, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    assert anchor_contrastive_loss(scores, mask, same).item() != pytest.approx(published_contrastive_loss(scores, mask).item())


def test_public_tokeniser_and_annotation_vocab(tmp_path: Path) -> None:
    from grounding.refclip.text import annotation_texts, tokenize

    assert tokenize("The man's LEFT-hand/side, (red)!") == ["the", "mans", "left", "hand", "side", "red"]
    ann = tmp_path / "refcoco.json"
    ann.write_text(json.dumps({"train": [{"refs": ["red ball", "ball left"]}], "val": [{"refs": ["blue cube"]}]}))
    assert build_vocab(annotation_texts(ann)) == ["PAD", "UNK", "CLS", "red", "ball", "left", "blue", "cube"]
    ann.write_text(json.dumps({"train": [{"bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(ValueError, match=r"refcoco.json: train\[0\] has no 'refs'"):
        annotation_texts(ann)


def test_word_vectors_from_a_glove_file(tmp_path: Path) -> None:
    from grounding.refclip.text import load_word_vectors

    glove = tmp_path / "glove.txt"
    glove.write_text("red 1 2 3\nBall 4 5 6\nunk 7 8 9\n")
    v = load_word_vectors(glove, ["PAD", "UNK", "red", "ball", "zebra"], dim=3)
    assert v.tolist() == [[0, 0, 0], [7, 8, 9], [1, 2, 3], [0, 0, 0], [0, 0, 0]]  # exact, then lower-cased
    with pytest.raises(ValueError, match="word_dim is 4; set refclip.word_dim=3"):
        load_word_vectors(glove, ["red"], dim=4)
    with pytest.raises(ValueError, match="does not exist"):
        load_word_vectors(tmp_path / "nope.txt", ["red"])


def test_wcosine_schedule_and_ramped_ema() -> None:
    from grounding.refclip.recipe import make_ema, wcosine_factor

    lr, warm, total = 1e-4, 30, 250
    assert wcosine_factor(0, lr, warm, total, 1e-7, 1e-6) * lr == pytest.approx(1e-7)
    assert wcosine_factor(15, lr, warm, total, 1e-7, 1e-6) * lr == pytest.approx(1e-7 + 15 * (lr - 1e-7) / 30)
    assert wcosine_factor(warm, lr, warm, total, 1e-7, 1e-6) == pytest.approx(1.0)
    assert wcosine_factor(total, lr, warm, total, 1e-7, 1e-6) * lr == pytest.approx(1e-6)
    m = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(m, 0.9997)
    m.weight.data.fill_(1.0)
    ema.update_parameters(m)  # first update: a copy
    m.weight.data.fill_(0.0)
    ema.update_parameters(m)  # n = 1: decay (1 + 1) / (1 + 10)
    assert ema.module.weight.item() == pytest.approx(2 / 11)


def test_module_names_are_the_public_state_dict() -> None:
    from grounding.refclip.model import RefCLIPConfig

    net = RefCLIPNet(RefCLIPConfig(vocab_size=10))  # published sizes: C (256, 512, 1024), fused 1024, 512, 3 SA
    sd = net.state_dict()
    # 1 embedding + 4 GRU + 3 x 16 SA + 6 AttFlat + 2 linear_vs + 2 linear_ts + 11 darknet convs x 6
    assert len(sd) == 129
    shapes = {"lang_encoder.embedding.weight": (10, 300), "lang_encoder.lstm.weight_ih_l0": (1536, 300),
              "lang_encoder.sa_list.2.mhatt.linear_merge.weight": (512, 512),
              "lang_encoder.sa_list.0.ffn.mlp.fc.linear.weight": (2048, 512),
              "lang_encoder.sa_list.1.norm2.bias": (512,), "lang_encoder.att_flat.mlp.linear.weight": (1, 256),
              "lang_encoder.att_flat.linear_merge.weight": (512, 512), "linear_vs.weight": (512, 1024),
              "linear_ts.weight": (512, 512), "multi_scale_manner.up_modules.1.1.conv.weight": (512, 1024, 1, 1),
              "multi_scale_manner.up_modules.0.2.conv.weight": (512, 512, 3, 3),
              "multi_scale_manner.down_modules.0.1.conv.weight": (512, 768, 1, 1),
              "multi_scale_manner.down_modules.1.1.batch_norm.running_var": (512,),
              "multi_scale_manner.down_modules.1.1.conv.weight": (512, 1536, 1, 1),
              "multi_scale_manner.top_proj.conv.weight": (1024, 1536, 1, 1),
              "multi_scale_manner.mid_proj.conv.weight": (1024, 1536, 1, 1),
              "multi_scale_manner.bot_proj.conv.weight": (1024, 768, 1, 1)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    fused = net.multi_scale_manner(torch.randn(1, 256, 52, 52), torch.randn(1, 512, 26, 26),
                                   torch.randn(1, 1024, 13, 13))
    assert fused.shape == (1, 1024, 13, 13)


DEGENERATE = np.array([-40.0, -40.0, -5.0, -5.0], np.float32)  # wholly above-left of the image (padding)


def _darknet_anchors(params: config.Params, ds: CanonicalDataset) -> None:
    """A CONTRACT-20 darknet `yolo-anchors` stand-in: each object sits in its own kept cell whose s32 map
    vector encodes class and colour; in that cell the most objective of the 4 boxes lies wholly on the
    padding (degenerate) and the next is the GT box. One cell per image has only degenerate boxes and the
    strongest feature. Two distractor cells carry weaker random features."""
    rng = np.random.default_rng(1)
    cfg = S.SyntheticConfig(n_images=N_IMAGES, seed=params.seed)
    c8, c16, c32 = CH
    fields = (FieldSpec("map_s32", "float16", (c32, G, G)), FieldSpec("map_s16", "float16", (c16, 2 * G, 2 * G)),
              FieldSpec("map_s8", "float16", (c8, 4 * G, 4 * G)), FieldSpec("cell_boxes", "float32", (G * G, 4, 4)),
              FieldSpec("cell_objectness", "float32", (G * G, 4)), FieldSpec("cell_scores", "float32", (G * G,)),
              FieldSpec("kept_cells", "int32", (K_KEPT,)), FieldSpec("letterbox", "float32", (8,)),
              FieldSpec("size", "int32", (2,)))
    extra = {"grid": [G, G], "strides": [32, 16, 8], "channels": {"s32": c32, "s16": c16, "s8": c8},
             "kept_per_image": K_KEPT}
    spec = ShardSetSpec(stage="yolo-anchors", stage_key="oracle-darknet", level="image", fields=fields,
                        rows_per_shard=16, teacher={"name": "oracle-darknet"}, extra=extra)
    with ShardWriter(params.teacher_dir("yolo-anchors"), spec, [im.image_id for im in ds.images], progress=False) as w:
        for k in w.todo():
            img = S.synthesize_image(cfg, int(k[3:]))
            wh = np.array(img.image.size, np.int32)
            s32 = rng.normal(0, 0.05, (c32, G, G)).astype(np.float32)
            boxes = np.tile(np.array([10, 10, 30, 30], np.float32), (G * G, 4, 1))
            obj = rng.uniform(0.1, 0.3, (G * G, 4)).astype(np.float32)
            cells = rng.permutation(G * G)
            used = []
            for o, c in zip(img.objects, cells):
                s32[:FEAT, c // G, c % G] = _oracle_feature(o.cls, o.colour, rng)[:FEAT] * 2
                boxes[c, 0], obj[c, 0] = DEGENERATE, 0.99
                boxes[c, 1], obj[c, 1] = o.box, 0.9
                used.append(c)
            bad = cells[len(used)]  # all 4 boxes degenerate, the strongest feature of all
            s32[:, bad // G, bad % G] = 5.0
            boxes[bad] = DEGENERATE
            for c in cells[len(used) + 1:len(used) + 3]:
                s32[:FEAT, c // G, c % G] = _oracle_feature(str(rng.choice(S.CLASSES)), str(rng.choice(S.COLOURS)),
                                                            rng)[:FEAT]
                boxes[c, 1] = [5, 5, 25, 25]
            kept = np.sort(cells[:K_KEPT])  # fixed K per cache; the rest are noise cells
            w.add(k, {"map_s32": s32.astype(np.float16),
                      "map_s16": rng.normal(0, 0.1, (c16, 2 * G, 2 * G)).astype(np.float16),
                      "map_s8": rng.normal(0, 0.1, (c8, 4 * G, 4 * G)).astype(np.float16),
                      "cell_boxes": boxes, "cell_objectness": obj, "cell_scores": obj.mean(1),
                      "kept_cells": kept.astype(np.int32),
                      "letterbox": np.zeros(8, np.float32), "size": wh})


MS_SETS = ["refclip.features=multiscale", "refclip.epochs=25", "refclip.lr=0.003", "refclip.batch_size=32",
           "refclip.hidden=32", "refclip.word_dim=16", "refclip.heads=4", "refclip.ff_size=64",
           "refclip.n_self_attention=1", "refclip.fusion_hidden=16", "refclip.warmup_epochs=1"]


@pytest.fixture(scope="module")
def multiscale(tmp_path_factory: pytest.TempPathFactory) -> config.Params:
    tmp = tmp_path_factory.mktemp("refclip-ms")
    p = config.load(None, [f"dataset.synthetic.n_images={N_IMAGES}", "progress=false",
                           *(f"paths.{k}={tmp}/{k}" for k in ("prepared", "teachers", "models", "metrics")),
                           *MS_SETS])
    stages.run("prepare", p)
    _darknet_anchors(p, CanonicalDataset.load(p.prepared_dir()))
    for name in ("refclip-train", "refclip-pseudo"):
        stages.run(name, p)
    return p


def test_multiscale_learns_and_never_selects_a_degenerate_box(multiscale: config.Params) -> None:
    report = json.loads((Path(multiscale.paths.metrics) / "refclip.json").read_text())
    assert report["features"] == "multiscale" and report["sentences_without_valid_anchor"] == 0
    train = report["refclip"]["train"]
    assert train["upper_bound"] == 1.0
    # the published loss counts other batch items of the same image as negatives; on 40 images (5 sentences
    # each, batch 32) that is frequent and caps what it learns here: measured 0.22 vs random 0.08
    assert train["acc"] > 2 * train["random_anchor"] and train["acc"] > train["random_anchor"] + 0.1, train
    ds = CanonicalDataset.load(multiscale.prepared_dir())
    ps = ShardSet(multiscale.teacher_dir("refclip-pseudo"))
    sizes = {im.image_id: (im.width, im.height) for im in ds.images}
    for r in ds.refs:
        b = ps.get(r.ref_id)["box"]
        w, h = sizes[r.image_id]
        assert b[2] > b[0] and b[3] > b[1] and b.min() >= 0 and b[2] <= w and b[3] <= h, (r.ref_id, b)
    ckpt = torch.load(Path(multiscale.paths.models) / "refclip" / "synthetic.pt", weights_only=True)
    assert ckpt["config"]["features"] == "multiscale" and ckpt["config"]["word_vectors"] is None  # learned


def test_degenerate_anchors_are_masked_in_the_table(multiscale: config.Params) -> None:
    from grounding.refclip.anchors import load_anchor_table
    from grounding.refclip.train import best_anchor

    anchors = ShardSet(multiscale.teacher_dir("yolo-anchors"))
    ids = sorted(anchors)[:6]
    table = load_anchor_table(anchors, ids, "multiscale")
    for i, k in enumerate(ids):
        r = anchors.get(k)
        kept = r["kept_cells"]
        all_bad = [j for j, c in enumerate(kept) if (r["cell_boxes"][c] == DEGENERATE).all()]
        assert len(all_bad) == 1 and not table.mask[i, all_bad[0]]  # a cell with only degenerate boxes is out
        assert table.mask[i].sum() == len(kept) - 1
        assert not (table.boxes[i][table.mask[i].numpy()] == np.clip(DEGENERATE, 0, None)).all(axis=1).any()

    class Loudest(torch.nn.Module):  # scores a cell by the sum of its s32 vector: the degenerate cell wins
        cfg = RefCLIPConfig(vocab_size=3, max_len=4)

        def embed_anchors(self, visual):
            s8, s16, s32, kept = visual
            flat = s32.flatten(2).transpose(1, 2)
            return flat.gather(1, kept.unsqueeze(-1).expand(-1, -1, flat.shape[-1])).sum(-1, keepdim=True)

        def embed_text(self, ids):
            return torch.ones(len(ids), 1)

    pick, score, _ = best_anchor(Loudest(), table, ["a"] * len(ids), list(range(len(ids))), ["PAD", "UNK", "CLS"])
    assert table.mask[torch.arange(len(ids)), pick].all() and torch.isfinite(score).all()


def test_degenerate_p5_anchor_is_masked(tmp_path: Path) -> None:
    from grounding.refclip.anchors import load_anchor_table
    from grounding.refclip.train import best_anchor

    fields = (FieldSpec("boxes", "float32", (4,), ragged=True), FieldSpec("scores", "float32", (), ragged=True),
              FieldSpec("features", "float16", (2,), ragged=True), FieldSpec("cell_index", "int32", (), ragged=True),
              FieldSpec("size", "int32", (2,)))
    spec = ShardSetSpec(stage="yolo-anchors", stage_key="p5", level="region", fields=fields, rows_per_shard=4)
    with ShardWriter(tmp_path / "a", spec, ["x"], progress=False) as w:  # 100 x 50 image; anchor 1 on the padding
        w.add("x", {"boxes": np.array([[0, 0, 20, 20], [10, 50, 40, 80], [5, 5, 9, 9]], np.float32),
                    "scores": np.array([0.2, 0.9, 0.5], np.float32),
                    "features": np.array([[1, 0], [9, 9], [0, 1]], np.float16),
                    "cell_index": np.arange(3, dtype=np.int32), "size": np.array([100, 50], np.int32)})
    table = load_anchor_table(ShardSet(tmp_path / "a"), ["x"], "p5-cells")
    assert table.mask.tolist() == [[True, False, True]]

    class Sum(torch.nn.Module):
        cfg = RefCLIPConfig(vocab_size=3, max_len=4)

        def embed_anchors(self, feats):
            return feats.float().sum(-1, keepdim=True)

        def embed_text(self, ids):
            return torch.ones(len(ids), 1)

    pick, _, _ = best_anchor(Sum(), table, ["a"], [0], ["PAD", "UNK", "CLS"])
    assert pick.tolist() == [0]  # anchor 1 scores highest but is degenerate; the most confident valid is 2
    conf = np.where(table.mask.numpy(), table.confidence, -np.inf).argmax(1)
    assert conf.tolist() == [2]


def _public_checkpoint(net: RefCLIPNet, path: Path, prefix: str = "module.") -> None:
    sd = {f"{prefix}{k}": v for k, v in net.state_dict().items()}
    sd[f"{prefix}visual_encoder.module_list.0.conv.weight"] = torch.randn(4, 3, 3, 3)  # the frozen detector
    torch.save({"epoch": 7, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []},
                "scheduler": {"last_epoch": 3}, "lr": 1e-4}, path)


def test_public_checkpoint_goes_straight_into_refclip_pseudo(multiscale: config.Params, tmp_path: Path) -> None:
    from grounding.refclip.model import RefCLIPConfig
    from grounding.refclip.text import annotation_texts

    ds = CanonicalDataset.load(multiscale.prepared_dir())
    ann = tmp_path / "anns.json"  # a RefCLIP annotation file: its refs, in order, define the vocabulary
    ann.write_text(json.dumps({"train": [{"refs": [r.text]} for r in ds.refs if r.split == "train"],
                               "val": [{"refs": [r.text]} for r in ds.refs if r.split != "train"]}))
    vocab = build_vocab(annotation_texts(ann))
    torch.manual_seed(3)
    net = RefCLIPNet(RefCLIPConfig(vocab_size=len(vocab), channels=CH, fusion_hidden=20, word_dim=12, hidden=24,
                                   n_sa=2, heads=4, ff_size=40)).eval()
    ckpt = tmp_path / "det_best.pth"
    _public_checkpoint(net, ckpt)
    teachers = tmp_path / "teachers"
    p = multiscale.model_copy(update={"paths": multiscale.paths.model_copy(update={"teachers": str(teachers)}),
                                      "refclip": multiscale.refclip.model_copy(update={
                                          "checkpoint": str(ckpt), "vocab_from": str(ann), "heads": 4})})
    import shutil

    shutil.copytree(multiscale.teacher_dir("yolo-anchors"), p.teacher_dir("yolo-anchors"))
    stages.run("refclip-pseudo", p)
    ps = ShardSet(p.teacher_dir("refclip-pseudo"))
    assert ps.manifest.teacher["public_checkpoint"] is True and len(ps) == len(ds.refs)
    # the pseudo-box of a sentence is what the loaded public weights pick, computed here directly
    from grounding.refclip.anchors import load_anchor_table

    ref = next(r for r in ds.refs if r.split == "val")
    table = load_anchor_table(ShardSet(p.teacher_dir("yolo-anchors")), [ref.image_id])
    ids, _ = encode([ref.text], vocab, p.refclip.max_len)
    with torch.no_grad():
        sc = net(table.visual(torch.tensor([0])), ids)[0, 0].masked_fill(~table.mask[0], float("-inf"))
    assert np.array_equal(ps.get(ref.ref_id)["box"], table.boxes[0, int(sc.argmax())])

    # mismatches: a clear error naming the file and the keys
    from grounding.refclip.public import load_public_checkpoint

    bad = tmp_path / "bad.pth"
    sd = torch.load(ckpt, weights_only=True)
    del sd["state_dict"]["module.linear_vs.bias"]
    sd["state_dict"]["module.linear_vs.extra"] = torch.zeros(1)
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"bad.pth: .*missing keys: linear_vs.bias; unexpected keys: linear_vs.extra"):
        load_public_checkpoint(bad, str(ann), p.refclip)
    with pytest.raises(ValueError, match="carries no vocabulary"):
        load_public_checkpoint(ckpt, None, p.refclip)
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"train": [{"refs": ["one two"]}]}))
    with pytest.raises(ValueError, match=r"gives 5 tokens, the checkpoint's embedding has \d+ rows"):
        load_public_checkpoint(ckpt, str(short), p.refclip)


def test_training_with_frozen_glove_vectors(tmp_path: Path) -> None:
    from grounding.refclip.anchors import AnchorTable
    from grounding.refclip.train import train_refclip

    glove = tmp_path / "glove.txt"
    glove.write_text("red 1 0 0 0\nblue 0 1 0 0\nball 0 0 1 0\n")
    rp = config.load(None, [f"refclip.word_vectors={glove}", "refclip.word_dim=4", "refclip.hidden=8",
                            "refclip.heads=2", "refclip.ff_size=16", "refclip.epochs=2", "refclip.batch_size=2",
                            "refclip.features=p5-cells", "refclip.n_self_attention=1"]).refclip
    n, k = 4, 3
    table = AnchorTable([f"i{i}" for i in range(n)], "p5-cells", torch.ones(n, k, dtype=torch.bool),
                        np.zeros((n, k, 4), np.float32), np.zeros((n, k), np.int32), np.zeros((n, k), np.float32),
                        [np.zeros((k, 4), np.float32)] * n, features=torch.randn(n, k, 5))
    texts = ["red ball", "blue ball", "red thing", "blue"]
    model, vocab, curve = train_refclip(table, texts, [0, 1, 2, 3], rp, seed=0, device=torch.device("cpu"),
                                        progress=False)
    emb = model.lang_encoder.embedding.weight
    assert not emb.requires_grad and model.cfg.word_vectors == str(glove) and len(curve) == 2
    assert emb[vocab.index("red")].tolist() == [1, 0, 0, 0] and emb[vocab.index("thing")].tolist() == [0, 0, 0, 0]


def test_on_epoch_hook_sees_the_eval_model_and_leaves_training_alone() -> None:
    from grounding.refclip.anchors import AnchorTable
    from grounding.refclip.train import train_refclip

    rp = config.load(None, ["refclip.word_dim=4", "refclip.hidden=8", "refclip.heads=2", "refclip.ff_size=16",
                            "refclip.epochs=3", "refclip.batch_size=2", "refclip.features=p5-cells",
                            "refclip.n_self_attention=1"]).refclip
    n, k = 4, 3
    table = AnchorTable([f"i{i}" for i in range(n)], "p5-cells", torch.ones(n, k, dtype=torch.bool),
                        np.zeros((n, k, 4), np.float32), np.zeros((n, k), np.int32), np.zeros((n, k), np.float32),
                        [np.zeros((k, 4), np.float32)] * n, features=torch.randn(n, k, 5, generator=torch.Generator().manual_seed(0)))
    texts = ["red ball", "blue ball", "red thing", "blue"]
    modes: list[bool] = []

    def hook(model: torch.nn.Module) -> dict[str, float]:
        modes.append(model.training)
        return {"probe": float(len(modes))}

    common = dict(seed=0, device=torch.device("cpu"), progress=False)
    plain, _, curve0 = train_refclip(table, texts, [0, 1, 2, 3], rp, **common)
    hooked, _, curve = train_refclip(table, texts, [0, 1, 2, 3], rp, on_epoch=hook, **common)
    assert modes == [False, False, False] and [c["probe"] for c in curve] == [1.0, 2.0, 3.0]
    assert [c["loss"] for c in curve] == [c["loss"] for c in curve0]  # the hook changes nothing in training
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), hooked.state_dict().values()))
