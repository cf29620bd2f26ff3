"""Weakly supervised students on cached teachers (issue 10): NCE+Distill and BiCM.

The teacher shard sets here are small stand-ins with the real schemas (``frcnn-proposals``,
``wordnet-labels``, ``clip-*``, ``qam``), written by this file on a 16-image synthetic set: proposals are the
images' GT objects plus random distractors, with class posteriors and features that carry the class; CLIP
embeddings are noisy class vectors; QAM maps peak on the referent. That isolates the students from the
quality of the bootstrapped teachers. Checked: the student's training-batch target p̂ equals an
independent NumPy computation, the students beat the random / largest-proposal baselines, two runs give
identical metrics, and no teacher model is built or run (the stages read shards only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grounding import config, stage_writer, stages
from grounding.boxes import box_iou
from grounding.data.schema import CanonicalDataset
from grounding.shards import FieldSpec, ShardSet
from grounding.students import bicm as B
from grounding.students import nce_distill as N

N_IMAGES = 16
CLASSES = ["circle", "ellipse", "square", "rhombus", "triangle", "hexagon", "star", "cross", "ring", "heart"]
FEAT, DIM, GRID = 24, 16, 4


def make_params(root: Path, *extra: str) -> config.Params:
    return config.load(None, [
        f"dataset.synthetic.n_images={N_IMAGES}", "dataset.synthetic.min_size=96", "dataset.synthetic.max_size=192",
        "progress=false", "shards.rows_per_shard=64",
        *(f"paths.{k}={root}/{k}" for k in ("prepared", "teachers", "students", "metrics", "models")),
        "students.nce_distill.steps=200", "students.nce_distill.batch_size=8", "students.nce_distill.embed_dim=32",
        "students.nce_distill.hidden=32", "students.nce_distill.word_dim=16", "students.nce_distill.lambda_step=20",
        "students.nce_distill.lr=0.003",
        "students.bicm.kam_epochs=5", "students.bicm.kam_hidden=32", "students.bicm.kam_batch_size=64",
        "students.bicm.kam_lr=0.001", *extra])


def _objects(ds: CanonicalDataset) -> dict[str, list[tuple[tuple[float, ...], str]]]:
    """Distinct (GT box, category) per image, from the refs (the oracle proposals)."""
    out: dict[str, list[tuple[tuple[float, ...], str]]] = {im.image_id: [] for im in ds.images}
    for r in ds.refs:
        if r.box is not None and (r.box, r.category) not in out[r.image_id]:
            out[r.image_id].append((r.box, r.category))
    return out


def _class_vec(c: str) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[CLASSES.index(c)] = 1.0
    return v


def write_teachers(params: config.Params, crops_from: str = "frcnn-proposals") -> None:
    """Stand-in teacher shard sets with the real stage names, schemas and provenance."""
    ds = CanonicalDataset.load(params.prepared_dir())
    fp = ds.fingerprint()
    objs = _objects(ds)
    rng = np.random.default_rng(0)
    index = ds.image_index
    props: dict[str, dict[str, np.ndarray]] = {}
    for im, os_ in objs.items():
        w, h = index[im].width, index[im].height
        boxes, probs, feats, cls = [], [], [], []
        for box, c in os_:
            boxes.append(box)
            p = np.full(len(CLASSES) + 1, 0.02, np.float32)
            p[1 + CLASSES.index(c)] = 0.8
            probs.append(p / p.sum())
            feats.append(np.eye(FEAT, dtype=np.float32)[CLASSES.index(c)] + rng.normal(0, 0.1, FEAT))
            cls.append(CLASSES.index(c))
        for _ in range(6):  # distractors: background-ish boxes of a random class
            x, y = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
            boxes.append((x, y, x + rng.uniform(8, w * 0.4), y + rng.uniform(8, h * 0.4)))
            p = rng.dirichlet(np.ones(len(CLASSES) + 1)).astype(np.float32)
            p[0] += 1.0
            probs.append(p / p.sum())
            feats.append(rng.normal(0, 0.3, FEAT))
            cls.append(int(np.argmax(p[1:])))
        order = rng.permutation(len(boxes))
        props[im] = {"boxes": np.array(boxes, np.float32)[order], "class_probs": np.array(probs, np.float16)[order],
                     "features": np.array(feats, np.float16)[order], "labels": np.array(cls, np.int32)[order],
                     "scores": rng.uniform(0.1, 0.9, len(boxes)).astype(np.float32),
                     "size": np.array([w, h], np.int32)}
    image_keys = [im.image_id for im in ds.images]
    ref_keys = [r.ref_id for r in ds.refs]
    extra = {"classes": CLASSES}

    def write(stage: str, level: str, fields: tuple[FieldSpec, ...], keys: list[str], row, inputs=None,
              stage_params=None) -> Path:
        return stage_writer.write_stage(params, stage=stage, code="test", level=level, fields=fields,
                                  item_keys=keys, rows=lambda todo: ((k, row(k)) for k in todo),
                                  stage_params=stage_params or {}, inputs=inputs or {"dataset": fp},
                                  teacher={"name": f"stand-in {stage}"}, extra=extra,
                                  out_dir=params.teacher_dir(stage))

    prop_path = write("frcnn-proposals", "image", (
        FieldSpec("boxes", "float32", (4,), ragged=True), FieldSpec("scores", "float32", (), ragged=True),
        FieldSpec("labels", "int32", (), ragged=True), FieldSpec("class_probs", "float16", (11,), ragged=True),
        FieldSpec("features", "float16", (FEAT,), ragged=True), FieldSpec("size", "int32", (2,))),
        image_keys, lambda k: props[k])
    cat = {r.ref_id: r.category for r in ds.refs}
    covered = {k: i % 4 != 3 for i, k in enumerate(ref_keys)}  # a quarter of phrases get no WordNet label
    write("wordnet-labels", "sentence", (FieldSpec("label", "float16", (len(CLASSES),)),), ref_keys,
          lambda k: {"label": (_class_vec(cat[k])[:len(CLASSES)] * covered[k]).astype(np.float16)})
    noise = np.random.default_rng(1)
    unit = lambda v: (v / np.linalg.norm(v)).astype(np.float16)  # noqa: E731
    text = {k: unit(_class_vec(cat[k]) + noise.normal(0, 0.3, DIM)) for k in ref_keys}
    write("clip-text", "sentence", (FieldSpec("embedding", "float16", (DIM,)),), ref_keys,
          lambda k: {"embedding": text[k]})
    write("clip-image", "image", (FieldSpec("embedding", "float16", (DIM,)),), image_keys,
          lambda k: {"embedding": unit(sum(_class_vec(c) for _, c in objs[k]) + noise.normal(0, 0.3, DIM))})
    write("clip-classes", "class", (FieldSpec("embedding", "float16", (DIM,)), FieldSpec("index", "int32", ())),
          CLASSES, lambda k: {"embedding": unit(_class_vec(k) + 0.05), "index": np.int32(CLASSES.index(k))})
    src = ShardSet(params.teacher_dir(crops_from))

    def crop_row(k: str) -> dict[str, np.ndarray]:
        boxes = src.get(k, ["boxes"])["boxes"]
        emb = [unit(_class_vec(CLASSES[int(l)]) * (1.0 if p.max() > 0.5 else 0.3) + noise.normal(0, 0.3, DIM))
               for l, p in zip(props[k]["labels"], props[k]["class_probs"].astype(np.float32))][:len(boxes)]
        return {"boxes": boxes, "embedding": np.stack(emb), "proposal_index": np.arange(len(boxes), dtype=np.int32)}

    write("clip-crops", "region", (FieldSpec("boxes", "float32", (4,), ragged=True),
                                   FieldSpec("embedding", "float16", (DIM,), ragged=True),
                                   FieldSpec("proposal_index", "int32", (), ragged=True)),
          image_keys, crop_row, inputs={"dataset": fp, crops_from: src.manifest.stage_key},
          stage_params={"crops_from": crops_from, "max_crops_per_image": 100})
    refs = {r.ref_id: r for r in ds.refs}

    def qam_row(k: str) -> dict[str, np.ndarray]:
        r = refs[k]
        w, h = index[r.image_id].width, index[r.image_id].height
        m = noise.uniform(0, 0.3, (GRID, GRID)).astype(np.float32)
        cx, cy = (r.box[0] + r.box[2]) / 2, (r.box[1] + r.box[3]) / 2
        m[min(int(cy / h * GRID), GRID - 1), min(int(cx / w * GRID), GRID - 1)] = 1.0
        b = np.array(r.box, np.float32) + noise.normal(0, 4, 4).astype(np.float32)
        return {"map": m.astype(np.float16), "box": b}

    write("qam", "sentence", (FieldSpec("map", "float16", (GRID, GRID)), FieldSpec("box", "float32", (4,))),
          ref_keys, qam_row)
    assert prop_path.exists()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> config.Params:
    root = tmp_path_factory.mktemp("weak")
    p = make_params(root)
    stages.run("prepare", p)
    write_teachers(p)
    return p


def _metrics(p: config.Params, stage: str) -> dict:
    return json.loads((Path(p.paths.metrics) / f"{stage}.json").read_text())


def _without_speed(m: dict) -> dict:
    return {k: v for k, v in m.items() if "per_s" not in k}


def _fresh(world: config.Params, root: Path, *extra: str) -> config.Params:
    """Same prepared dataset and teacher shards, separate student outputs."""
    return make_params(root, *extra).model_copy(update={"paths": world.paths.model_copy(update={
        "students": str(root / "students"), "metrics": str(root / "metrics"), "models": str(root / "models")})})


@pytest.fixture(scope="module")
def ran(world: config.Params) -> dict[str, dict]:
    return {s: (stages.run(s, world).path, _metrics(world, s)) for s in ("student-nce-distill", "student-bicm")}


# ---- NCE+Distill -------------------------------------------------------------------------------------------
def test_batch_target_equals_independent_numpy(world: config.Params) -> None:
    ds = CanonicalDataset.load(world.prepared_dir())
    props = ShardSet(world.teacher_dir("frcnn-proposals"))
    labels = ShardSet(world.teacher_dir("wordnet-labels"))
    train = [r for r in ds.refs if r.split == "train"]
    regions = N.load_regions(props, ds, sorted({r.image_id for r in ds.refs}), geometry=True)
    lab = N.soft_labels(labels, [r.ref_id for r in train], regions.classes)
    caps = N.build_captions(train, regions, lab, ["<pad>", "<unk>"], 8)
    batch = np.array([2, 0, 3])
    got, valid = N.batch_targets(caps, regions, batch)
    for b, i in enumerate(batch):  # independent: loops over the raw shard rows
        image = ds.refs[[r.ref_id for r in ds.refs].index(next(k for k in caps.ref_ids[i] if k))].image_id
        raw = props.get(image)
        probs = raw["class_probs"].astype(np.float64)[:, 1:]
        for p, k in enumerate(caps.ref_ids[i]):
            want = np.zeros(got.shape[-1])
            if k:
                y = labels.get(k)["label"].astype(np.float64)
                t = np.array([sum(y[z] * probs[r, z] for z in range(len(y))) for r in range(len(probs))])
                if t.sum() > 0:
                    want[:len(t)] = t / t.sum()
            assert bool(valid[b, p]) == (want.sum() > 0)
            np.testing.assert_allclose(got[b, p].numpy(), want, atol=1e-6)
    assert valid.any() and not valid.all()


@pytest.mark.slow
def test_forked_variants_equal_separate_runs(world: config.Params) -> None:
    """The λ = 0 prefix shared by both variants is trained once and forked: same weights as separate runs."""
    ds = CanonicalDataset.load(world.prepared_dir())
    train = [r for r in ds.refs if r.split == "train"]
    regions = N.load_regions(ShardSet(world.teacher_dir("frcnn-proposals")), ds, sorted({r.image_id for r in ds.refs}), True)
    lab = N.soft_labels(ShardSet(world.teacher_dir("wordnet-labels")), [r.ref_id for r in train], regions.classes)
    vocab = ["<pad>", "<unk>", *sorted({w for r in train for w in r.text.split()})]
    caps = N.build_captions(train, regions, lab, vocab, 8)
    cfg = N.NceDistillConfig(len(vocab), regions.features.shape[-1], 16, 8, 16, 8)
    np_ = world.students.nce_distill.model_copy(update={"steps": 6, "lambda_step": 3, "batch_size": 4})
    both = N.train(caps, regions, cfg, np_, seed=0, variants=("distill", "no_distill"))
    for name in ("distill", "no_distill"):
        alone = N.train(caps, regions, cfg, np_, seed=0, variants=(name,))[name][0].state_dict()
        for k, v in both[name][0].state_dict().items():
            assert torch.equal(v, alone[k]), (name, k)
    assert not torch.equal(both["distill"][0].region[0].weight, both["no_distill"][0].region[0].weight)
    assert [p["lambda"] for p in both["distill"][1]][-1] == 1.0


def test_staircase_lambda() -> None:
    assert [N.staircase(s, 200, 3) for s in (0, 199, 200, 399, 400, 650, 10_000)] == [0, 0, 1, 1, 2, 3, 3]
    assert N.staircase(10_000, 200, 1) == 1


@pytest.mark.slow
def test_nce_distill_beats_baselines_and_writes_contract(ran: dict, world: config.Params) -> None:
    out, m = ran["student-nce-distill"]
    assert set(m["acc50"]) == set(m["n"]) and "train" in m["acc50"]
    for split in m["acc50"]:
        assert m["baselines"]["upper_bound"][split] == 1.0  # the stand-in proposals hold every GT box
    for split in ("train", "val"):
        if split in m["acc50"]:
            assert m["acc50"][split] > m["baselines"]["random"][split] + 0.1, m
            assert m["acc50"][split] > m["baselines"]["largest"][split], m
    assert set(m["no_distill"]) == set(m["acc50"]) and m["throughput_samples_per_s"] > 0
    curve = json.loads((Path(world.paths.metrics) / "student-nce-distill-curve.json").read_text())
    assert curve[-1]["step"] == 200 and curve[-1]["lambda"] == 3.0 and "no_distill_loss" in curve[0]
    pred = ShardSet(out)
    assert pred.manifest.level == "sentence" and len(pred) == len(CanonicalDataset.load(world.prepared_dir()).refs)
    assert pred.manifest.inputs["proposals"] == ShardSet(world.teacher_dir("frcnn-proposals")).manifest.stage_key


@pytest.mark.slow
def test_bicm_ablation_rows_measured_and_beat_baselines(ran: dict, world: config.Params) -> None:
    _, m = ran["student-bicm"]
    for row in ("com", "com+qam", "com+qam+kam", "com@argmax", "com+qam+kam@argmax", "qam_box"):
        assert set(m[row]) == set(m["acc50"]), row
    assert m["acc50"] == m["com+qam+kam"]
    assert m["kam"]["pseudo_labels"] > 0 and 0 <= m["kam"]["pseudo_label_precision"] <= 1
    for split in m["acc50"]:
        assert m["acc50"][split] > m["baselines"]["random"][split], (split, m)
        assert m["acc50"][split] > m["baselines"]["largest"][split], (split, m)
        assert m["com+qam@argmax"][split] > m["baselines"]["random"][split] + 0.2, (split, m)
    assert ShardSet(ran["student-bicm"][0]).manifest.inputs["qam"] == ShardSet(world.teacher_dir("qam")).manifest.stage_key


@pytest.mark.slow
def test_rerun_is_no_op_and_second_training_identical(ran: dict, world: config.Params, tmp_path: Path) -> None:
    for stage, (out, m) in ran.items():  # same key: nothing retrained or rewritten
        mtime = (out / "shard-00000.h5").stat().st_mtime_ns
        assert stages.run(stage, world).path == out and (out / "shard-00000.h5").stat().st_mtime_ns == mtime
    again = _fresh(world, tmp_path)
    for stage, (out, m) in ran.items():
        out2 = stages.run(stage, again).path
        assert _without_speed(_metrics(again, stage)) == _without_speed(m), stage
        assert ShardSet(out2).manifest.stage_key == ShardSet(out).manifest.stage_key
        assert (out2 / "shard-00000.h5").read_bytes() == (out / "shard-00000.h5").read_bytes()


# ---- BiCM pieces -------------------------------------------------------------------------------------------
def test_box_means_and_upsampled_map() -> None:
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    boxes = np.array([[0, 0, 4, 3], [1, 1, 3, 2], [1.2, 0.5, 1.8, 1.0], [10, 10, 20, 20]], np.float32)
    got = B.box_means(m, boxes)
    np.testing.assert_allclose(got[:2], [m.mean(), m[1:2, 1:3].mean()])
    assert got[2] == m[0:1, 1:2].mean()  # rounded outwards to whole pixels
    assert got[3] == m[2, 3]  # clipped into the image, at least one pixel
    up = B.upsample_map(np.array([[0, 1], [0, 0]], np.float32), 8, 6)
    assert up.shape == (6, 8) and up.min() == 0 and up.max() == 1 and up[0, 7] == 1
    assert not B.upsample_map(np.ones((2, 2), np.float32), 4, 4).any()


def test_select_largest_above_mean() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 30, 30], [0, 0, 100, 100]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert B.select(scores, boxes, "argmax") == 0
    assert B.select(scores, boxes, "largest_above_mean") == 1  # 100x100 is below the mean
    assert B.select(np.zeros(4), boxes, "largest_above_mean") == 3


def test_candidates_pt_takes_best_class_and_nearest_crop() -> None:
    crops = B.ImageCrops(np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32),
                         np.eye(2, 4, dtype=np.float32), np.array([0, 1]))
    class_emb = np.eye(3, 4, dtype=np.float32)
    q = np.array([0, 1, 0, 0], np.float32)
    c = B.candidates(crops, class_emb, q, np.zeros((2, 2), np.float32), np.array([18, 22, 41, 39]), 50, 50)
    assert c.crop.tolist() == [0, 1, 1] and c.cls.tolist() == [0, 1, 1]
    np.testing.assert_allclose(c.s_pq, [0, 1, 1]) and np.testing.assert_allclose(c.s_cq, [0, 1, 1])
    assert not c.s_td.any()  # flat map


def test_bicm_refuses_crops_of_gt_boxes(world: config.Params, tmp_path: Path) -> None:
    p = make_params(tmp_path)
    stages.run("prepare", p)
    stages.run("gt-boxes", p)
    write_teachers(p, crops_from="gt-boxes")
    with pytest.raises(ValueError, match="oracle"):
        stages.run("student-bicm", p)


# ---- no teacher is run -------------------------------------------------------------------------------------
@pytest.mark.slow  # a fresh interpreter importing torch
def test_students_import_no_teacher_module() -> None:
    code = ("import sys, grounding.students.nce_distill, grounding.students.bicm, grounding.stages as s\n"
            "bad = sorted(m for m in sys.modules if m.startswith('grounding.teachers'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_no_teacher_forward_during_student_stages(world: config.Params, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip
    import torchvision.models.detection as tvd

    from grounding.teachers import clip_model as tclip
    from grounding.teachers.detectors import stage as tdet

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a student stage built or ran a teacher model")

    for mod, name in ((tclip, "build_teacher"), (tclip, "create_model"), (tdet, "build_detector"),
                      (open_clip, "create_model"), (open_clip, "create_model_and_transforms"),
                      (tvd, "fasterrcnn_resnet50_fpn"), (tvd, "fcos_resnet50_fpn")):
        monkeypatch.setattr(mod, name, boom)
    monkeypatch.setattr(torch.nn.Module, "__call__", _only_student_modules(torch.nn.Module.__call__))
    p = _fresh(world, tmp_path, "students.nce_distill.steps=5", "students.bicm.kam_epochs=1")
    for stage in ("student-nce-distill", "student-bicm"):
        stages.run(stage, p)
        assert (Path(p.paths.metrics) / f"{stage}.json").is_file()


def _only_student_modules(call):
    """``nn.Module.__call__`` that refuses any module defined outside the students (and torch itself)."""

    def guarded(self: torch.nn.Module, *a: object, **k: object):
        mod = type(self).__module__
        if not (mod.startswith("torch.") or mod.startswith("grounding.students")):
            raise AssertionError(f"forward of {type(self).__qualname__} ({mod}) during a student stage")
        return call(self, *a, **k)

    return guarded


def test_iou_helper_sanity() -> None:  # the upper bound is "best proposal by IoU"
    assert box_iou(np.array([[0, 0, 2, 2]], np.float32), np.array([[0, 0, 2, 2]], np.float32))[0, 0] == 1


def test_regions_from_topk_class_probs_match_dense(world: config.Params, tmp_path: Path) -> None:
    """A top-k proposal set (issue 23: ``class_probs_topk`` + ``class_probs_index`` + ``class_probs_rest``)
    loads into the same Regions as the dense one, p(z|x) within the residual spread; targets close."""
    from grounding import class_probs as cp
    from grounding.shards import ShardSetSpec, ShardWriter

    ds = CanonicalDataset.load(world.prepared_dir())
    dense = ShardSet(world.teacher_dir("frcnn-proposals"))
    fields = tuple(f for f in dense.manifest.fields if f.name != "class_probs") + (
        FieldSpec(cp.TOPK_VALUES, "float16", (4,), ragged=True), FieldSpec(cp.TOPK_INDEX, "int32", (4,), ragged=True),
        FieldSpec(cp.TOPK_REST, "float32", (), ragged=True))
    spec = ShardSetSpec(stage="frcnn-proposals", stage_key="topk", level="image", fields=fields, rows_per_shard=4,
                        extra=dense.manifest.extra, inputs=dense.manifest.inputs)
    with ShardWriter(tmp_path / "topk", spec, dense.keys, progress=False) as w:
        for k in w.todo():
            r = dense.get(k)
            w.add(k, {**{f: v for f, v in r.items() if f != "class_probs"}, **cp.encode_topk(r["class_probs"], 4)})
    topk = ShardSet(tmp_path / "topk")
    ids = sorted({r.image_id for r in ds.refs})
    a, b = N.load_regions(dense, ds, ids, geometry=False), N.load_regions(topk, ds, ids, geometry=False)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.mask, b.mask)
    err = np.abs(a.class_probs - b.class_probs)[a.mask]
    assert 0 < err.max() < 0.05  # 11 columns, 4 kept: the stand-in's tails are flat
    labels = ShardSet(world.teacher_dir("wordnet-labels"))
    train = [r for r in ds.refs if r.split == "train"]
    lab = N.soft_labels(labels, [r.ref_id for r in train], a.classes)
    ta, va = N.batch_targets(N.build_captions(train, a, lab, ["<pad>", "<unk>"], 8), a, np.arange(4))
    tb, vb = N.batch_targets(N.build_captions(train, b, lab, ["<pad>", "<unk>"], 8), b, np.arange(4))
    assert torch.equal(va, vb) and (ta - tb).abs().max() < 0.1


def test_kam_pairs_each_image_with_its_most_similar_query_over_the_whole_query_set() -> None:
    """Seed 001 §3.5: the unpaired setting searches every query; the image's own sentences only by option."""
    from grounding.data.schema import RefRecord

    e = lambda *v: np.array(v, np.float32) / np.linalg.norm(v)  # noqa: E731
    refs = [RefRecord("a-0", "A", "x", "train"), RefRecord("a-1", "A", "y", "train"),
            RefRecord("b-0", "B", "z", "train"), RefRecord("c-0", "C", "w", "val")]
    # image A is closest to B's sentence (cos 1) and, among its own, to a-1 (cos .6 vs 0); c-0 (val) is not in
    # the train query set although it is as close to A
    text = {"a-0": e(0, 1, 0), "a-1": e(0.6, 0, 0.8), "b-0": e(1, 0, 0), "c-0": e(1, 0.01, 0)}
    image = {"A": e(1, 0, 0), "B": e(0, 0, 1)}
    inp = B.Inputs({}, np.zeros((1, 3), np.float32), image, text, {}, {}, {})
    bp = config.BicmParams()
    assert bp.kam_pairing == "all_queries"
    got = {im: r.ref_id for im, r in B.kam_queries(inp, refs, bp).items()}
    assert got == {"A": "b-0", "B": "a-1"}  # A takes B's sentence (cos 1 > .6), B takes A's a-1 (cos .8 > 0)
    own = {im: r.ref_id for im, r in B.kam_queries(inp, refs, bp.model_copy(update={"kam_pairing": "own_sentences"})).items()}
    assert own == {"A": "a-1", "B": "b-0"}
    # a foreign query is scored by COM only: S_TD 0 and no P_t row
    crops = B.ImageCrops(np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32), np.stack([e(1, 0, 0), e(0, 1, 0)]),
                         np.array([0, 0]))
    c = B.com_candidates(crops, np.stack([e(1, 1, 0)]), e(1, 0, 0))
    assert c.s_pq.tolist() == pytest.approx([1, 0]) and c.s_cq.tolist() == pytest.approx([np.sqrt(0.5)] * 2)
    assert len(c.boxes) == 2 and c.s_td.tolist() == [0, 0]


def test_nce_distill_architecture_and_schedule_as_the_paper(tmp_path: Path) -> None:
    """Seed 002 §4.1: two FC layers per branch, 2-layer 300-d LSTM max-pooled, Adam 1e-4, λ reaches b."""
    p = config.NceDistillParams()
    assert (p.word_dim, p.hidden, p.lstm_layers, p.embed_dim, p.lr) == (300, 300, 2, 512, 1e-4)
    assert N.staircase(p.steps - 1, p.lambda_step, p.lambda_max) == p.lambda_max  # b within the default schedule
    cfg = N.NceDistillConfig(vocab_size=6, feature_dim=3, embed_dim=4, word_dim=2, hidden=3, max_len=4)
    torch.manual_seed(0)
    m = N.NceDistill(cfg).eval()
    assert [type(x).__name__ for x in m.region] == ["Linear", "ReLU", "Linear"]
    assert [type(x).__name__ for x in m.phrase] == ["Linear", "ReLU", "Linear"] and m.lstm.num_layers == 2
    # max pooling over the real tokens: the phrase embedding is phrase(max_t h_t), padding left out
    ids = torch.tensor([[2, 3, 4, 0]])
    with torch.no_grad():
        hs, _ = m.lstm(m.embedding(ids[:, :3]))
        want = torch.nn.functional.normalize(m.phrase(hs.amax(dim=1)), dim=-1)
        assert torch.allclose(m.embed_phrases(ids), want, atol=1e-6)
    # GloVe from a local file: the vocabulary's rows, fixed
    (tmp_path / "glove.txt").write_text("red 1 2\nsquare 3 4\nother 5 6\n")
    vec, found = N.load_glove(tmp_path / "glove.txt", ["<pad>", "<unk>", "red", "square", "blue"], 2)
    assert found == 2 and vec.tolist() == [[0, 0], [0, 0], [1, 2], [3, 4], [0, 0]]
    g = N.NceDistill(N.NceDistillConfig(5, 3, 4, 2, 3, 4), vec)
    assert not g.embedding.weight.requires_grad and torch.equal(g.embedding.weight, vec)
    with pytest.raises(ValueError, match="glove.txt:1.*word_dim=3"):
        N.load_glove(tmp_path / "glove.txt", ["red"], 3)


def test_region_features_standardised_with_training_statistics() -> None:
    feats = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [0.0, 0.0]], [[5.0, 50.0], [7.0, 70.0], [9.0, 90.0]]])
    mask = np.array([[True, True, False], [True, True, True]])
    regions = N.Regions(["a", "b"], np.zeros((2, 3, 4), np.float32), mask, feats, np.zeros((2, 3, 1), np.float32),
                        np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int32), ["x"])
    mean, std = N.standardise(regions, [0])  # stats of image a's two real regions: mean (2, 20), std (1, 10)
    assert mean.tolist() == [2, 20] and std.tolist() == [1, 10]
    assert regions.features[0].tolist() == [[-1, -1], [1, 1], [0, 0]]  # padding stays 0
    assert regions.features[1, 2].tolist() == [7, 7]


def test_l_rp_is_summed_over_a_captions_phrases() -> None:
    """Eq. 4 sums over the phrases of a caption: two phrases with targets count twice one phrase's loss."""
    regions = N.Regions(["a"], np.zeros((1, 2, 4), np.float32), np.array([[True, True]]), torch.zeros(1, 2, 3),
                        np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32), np.ones((1, 2), np.float32),
                        np.zeros((1, 2), np.int32), ["x", "y"])
    vocab = ["<pad>", "<unk>", "x", "y"]
    from grounding.data.schema import RefRecord

    refs = [RefRecord("a-0", "a", "x", "train"), RefRecord("a-1", "a", "y", "train")]
    lab = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    cfg = N.NceDistillConfig(4, 3, 4, 2, 3, 2)
    torch.manual_seed(0)
    m = N.NceDistill(cfg)
    both = N.build_captions(refs, regions, lab, vocab, 2)
    # all-zero region features: both regions score alike, log softmax = log(1/2) for every phrase
    _, l_rp, n = N.losses(m, both, regions, np.array([0]), 0.5)
    assert n == 2 and float(l_rp.detach()) == pytest.approx(2 * np.log(2), rel=1e-5)
