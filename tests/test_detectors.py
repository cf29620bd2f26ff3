"""Detector teachers: cached rows equal direct model calls, exact letterbox mapping, stage keys, odd images.

Fast: random-weight tiny models at small input sizes on a 6-image synthetic set. The slow end-to-end
test (bootstrap + extraction + recall) is marked ``slow``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from grounding import config as C
from grounding.boxes import Letterbox
from grounding.data.images import load_rgb
from grounding.data.schema import CanonicalDataset, ImageRecord, RefRecord
from grounding.data.synthetic import CLASSES
from grounding.shards import ItemFailed, ShardSet
from grounding.teachers.detectors import (
    IMAGENET_MEAN,
    TEACHERS,
    keep_count,
    letterbox_image,
    load_checkpoint,
    save_checkpoint,
)
from grounding.teachers.detectors.fcos import build_fcos
from grounding.teachers.detectors.stage import build_detector
from grounding.teachers.detectors.torchvision_rcnn import build_faster_rcnn
from grounding.teachers.detectors.yolo import import_ultralytics, model_config

SIZES = {"frcnn": 128, "fcos": 128, "yolo": 128}


def make_doc(root: Path, **teachers: dict) -> dict:
    """A params mapping for a test world under ``root`` (tests edit copies of it, then validate)."""
    return {
        "device": "cpu", "progress": False, "seed": 0,
        "dataset": {"synthetic": {"n_images": 6, "min_size": 64, "max_size": 200}},
        "shards": {"rows_per_shard": 4},
        "paths": {k: str(root / k) for k in ("prepared", "teachers", "students", "metrics", "models")},
        "teachers": {t: {"input_size": SIZES[t], "batch_size": 2, "num_workers": 0,
                         **({"backend": "ultralytics"} if t == "yolo" else {}), **teachers.get(t, {})}
                     for t in TEACHERS},
    }


def make_params(root: Path, **teachers: dict) -> C.Params:
    return C.from_dict(make_doc(root, **teachers))


def random_checkpoint(path: Path, teacher: str, params: C.Params, seed: int = 0) -> Path:
    """A random-init tiny teacher saved like the bootstrap saves it."""
    torch.manual_seed(seed)
    n = len(CLASSES)
    if teacher == "frcnn":
        model, meta = build_faster_rcnn("tiny", n + 1, input_size=SIZES[teacher]), {"arch": "tiny"}
    elif teacher == "fcos":
        model, meta = build_fcos("tiny", n, input_size=SIZES[teacher]), {"arch": "tiny"}
    else:
        import_ultralytics(params)
        from ultralytics.nn.tasks import DetectionModel

        cfg = model_config("yolov3.yaml", n, 0.33, 0.125)
        model, meta = DetectionModel(cfg=cfg, nc=n, verbose=False), {"config": cfg}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model.state_dict(), classes=list(CLASSES), **meta)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, C.Params]:
    """A prepared 6-image synthetic set and random weights for the three teachers."""
    from grounding import stages

    root = tmp_path_factory.mktemp("det")
    base = make_params(root)
    stages.run("prepare", base)
    weights = {t: {"weights": str(random_checkpoint(root / "w" / f"{t}.pt", t, base))} for t in TEACHERS}
    return root, make_params(root, **weights)


def doc_of(params: C.Params) -> dict:
    """An editable copy of the params this test module set (its own sections only)."""
    doc = {"device": params.device, "progress": params.progress, "seed": params.seed,
           "dataset": params.dataset.model_dump(mode="json"), "shards": params.shards.model_dump(mode="json"),
           "paths": params.paths.model_dump(mode="json"),
           "teachers": {t: getattr(params.teachers, t).model_dump(mode="json") for t in TEACHERS}}
    return copy.deepcopy(doc)


def with_teacher(params: C.Params, teacher: str, **changes: object) -> C.Params:
    doc = doc_of(params)
    doc["teachers"][teacher].update(changes)
    return C.from_dict(doc)


def run_stage(params: C.Params, teacher: str) -> ShardSet:
    from grounding import stages

    return ShardSet(stages.run(TEACHERS[teacher], params).path)


def direct_canvas(params: C.Params, teacher: str, ds: CanonicalDataset, image_id: str):
    det = build_detector(teacher, params, Path(getattr(params.teachers, teacher).weights))
    img = load_rgb(ds.image_root, ds.image_index[image_id])
    canvas, lb = letterbox_image(img, det.input_size, det.pad_rgb)
    return det, canvas, lb


# ---- letterbox ---------------------------------------------------------------------------------------------
def test_letterbox_maps_boxes_exactly_on_a_non_square_image() -> None:
    img = Image.new("RGB", (300, 120), (0, 0, 0))
    box = np.array([[60.0, 30.0, 180.0, 90.0]], np.float32)
    ImageDraw.Draw(img).rectangle([60, 30, 179, 89], fill=(255, 0, 0))
    canvas, lb = letterbox_image(img, 96, IMAGENET_MEAN)
    assert canvas.shape == (3, 96, 96) and (lb.new_w, lb.new_h, lb.dx, lb.dy) == (96, 38, 0, 29)
    # padding is exactly the pad colour, the image occupies exactly [dx, dx+new_w) x [dy, dy+new_h)
    assert torch.all(canvas[:, :lb.dy] == torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
    assert torch.all(canvas[:, lb.dy + lb.new_h:] == torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
    # the red rectangle lands where Letterbox.forward says (within the 1-pixel blur of bilinear resizing)
    red = ((canvas[0] > 0.9) & (canvas[1] < 0.1)).nonzero()
    found = np.array([red[:, 1].min(), red[:, 0].min(), red[:, 1].max() + 1, red[:, 0].max() + 1], np.float32)
    assert np.abs(found - lb.forward(box)[0]).max() <= 1.0
    # and maps back exactly, also through the float32 row stored in the shards
    np.testing.assert_allclose(lb.inverse(lb.forward(box)), box, atol=1e-4)
    stored = Letterbox.from_array(lb.as_array())
    np.testing.assert_array_equal(stored.inverse(lb.forward(box)), lb.inverse(lb.forward(box)))


def test_letterbox_geometry_matches_ultralytics(world) -> None:
    root, params = world
    import_ultralytics(params)
    from ultralytics.data.augment import LetterBox

    for w, h in [(640, 427), (333, 500), (17, 415), (1000, 3)]:
        lb = Letterbox.fit(w, h, 416)
        theirs = LetterBox(new_shape=(416, 416), auto=False, scale_fill=False, scaleup=True, center=True)(
            image=np.zeros((h, w, 3), np.uint8))
        inside = np.argwhere((theirs != 114).all(-1))  # their pad is 114; their resized black image is 0
        assert (inside[:, 1].min(), inside[:, 0].min()) == (lb.dx, lb.dy), (w, h)
        assert (inside[:, 1].max() + 1 - lb.dx, inside[:, 0].max() + 1 - lb.dy) == (lb.new_w, lb.new_h), (w, h)


# ---- cached == direct model call ---------------------------------------------------------------------------
def test_frcnn_cached_rows_equal_direct_model_call(world) -> None:
    root, params = world
    shards = run_stage(params, "frcnn")
    ds = CanonicalDataset.load(params.prepared_dir())
    assert shards.manifest.extra["classes"] == list(CLASSES) and shards.manifest.level == "region"
    assert shards.manifest.teacher["weights_sha256"] == load_checkpoint(params.teachers.frcnn.weights).sha256
    for image_id in shards.keys[:3]:
        det, canvas, lb = direct_canvas(params, "frcnn", ds, image_id)
        seen: dict[str, torch.Tensor] = {}
        det.model.roi_heads.box_head.register_forward_hook(lambda m, i, o: seen.update(feats=o))
        det.model.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: seen.update(logits=o[0]))
        with torch.no_grad():
            out = det.model([canvas])[0]  # torchvision's own forward + postprocess (canvas pixels)
        row = shards.get(image_id)
        assert len(row["boxes"]) == min(100, len(out["boxes"])) > 0
        np.testing.assert_allclose(row["boxes"], lb.inverse(out["boxes"].numpy()), atol=1e-3)
        np.testing.assert_allclose(row["scores"], out["scores"].numpy(), atol=1e-5)
        np.testing.assert_array_equal(row["labels"], out["labels"].numpy() - 1)
        assert ((row["boxes"] >= 0) & (row["boxes"] <= np.tile(row["size"], 2))).all()
        # each detection's probability vector and feature is the one of an RoI of the direct call
        probs = torch.softmax(seen["logits"], -1).numpy()
        d_p = np.abs(row["class_probs"].astype(np.float32)[:, None] - probs[None]).max(-1).min(-1)
        d_f = np.abs(row["features"].astype(np.float32)[:, None] - seen["feats"].numpy()[None]).max(-1).min(-1)
        assert d_p.max() < 2e-3 and d_f.max() < 2e-2 * max(1.0, float(seen["feats"].abs().max()))
        np.testing.assert_allclose(row["scores"], row["class_probs"][np.arange(len(row["labels"])),
                                                                      row["labels"] + 1], rtol=2e-3, atol=1e-4)


def test_fcos_cached_rows_equal_direct_model_call(world) -> None:
    root, params = world
    shards = run_stage(params, "fcos")
    ds = CanonicalDataset.load(params.prepared_dir())
    g = SIZES["fcos"] // 32
    assert shards.manifest.level == "image" and shards.fields["boxes"].shape == (g * g, 4)
    for image_id in shards.keys[:3]:
        det, canvas, lb = direct_canvas(params, "fcos", ds, image_id)
        seen: dict[str, object] = {}
        det.model.head.register_forward_hook(lambda m, i, o: seen.update(head=o, feats=i[0]))
        det.model.anchor_generator.register_forward_hook(lambda m, i, o: seen.update(anchors=o))
        with torch.no_grad():
            det.model([canvas])
        sizes = [f.shape[-1] for f in seen["feats"]]
        start = sum(s * s for s in sizes[:sizes.index(g)])
        sl = slice(start, start + g * g)
        rel = seen["head"]["bbox_regression"][0, sl].numpy()
        anc = seen["anchors"][0][sl].numpy()
        ctr, wh = (anc[:, :2] + anc[:, 2:]) / 2, anc[:, 2:] - anc[:, :2]
        xyxy = np.concatenate([ctr - rel[:, :2] * wh, ctr + rel[:, 2:] * wh], 1)
        row = shards.get(image_id)
        np.testing.assert_allclose(row["boxes"], lb.inverse(xyxy), atol=1e-3)
        np.testing.assert_allclose(row["class_logits"], seen["head"]["cls_logits"][0, sl].numpy(), atol=1e-5)
        np.testing.assert_allclose(row["centerness"], seen["head"]["bbox_ctrness"][0, sl, 0].numpy(), atol=1e-5)
        # points and ltrb are consistent with the boxes in original pixels
        unclipped = np.concatenate([row["points"] - row["ltrb"][:, :2], row["points"] + row["ltrb"][:, 2:]], 1)
        np.testing.assert_allclose(np.clip(unclipped, 0, np.tile(row["size"], 2)), row["boxes"], atol=1e-3)
        assert row["inside"].sum() >= 1


def test_yolo_cached_rows_equal_direct_model_call(world) -> None:
    root, params = world
    shards = run_stage(params, "yolo")
    ds = CanonicalDataset.load(params.prepared_dir())
    g = SIZES["yolo"] // 32
    k = keep_count(g * g, params.teachers.yolo.keep_ratio)
    assert shards.manifest.extra["kept_per_image"] == k == math.ceil(0.1 * g * g)
    for image_id in shards.keys[:3]:
        det, canvas, lb = direct_canvas(params, "yolo", ds, image_id)
        assert torch.all(canvas[:, 0, 0] == 114 / 255) or lb.dx == lb.dy == 0
        with torch.no_grad():
            y, preds = det.model(canvas[None])
        y, p5 = y[0, :, -g * g:].numpy(), preds["feats"][-1][0].flatten(1).T.numpy()
        conf = y[4:].max(0)
        order = np.argsort(-conf, kind="stable")[:k]
        xywh = y[:4, order].T
        xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        row = shards.get(image_id)
        np.testing.assert_array_equal(row["cell_index"], order)
        np.testing.assert_allclose(row["scores"], conf[order], atol=1e-5)
        np.testing.assert_allclose(row["cell_scores"], conf, atol=1e-5)
        np.testing.assert_allclose(row["boxes"], lb.inverse(xyxy), atol=1e-3)
        np.testing.assert_allclose(row["features"].astype(np.float32), p5[order], rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(row["labels"], y[4:, order].argmax(0))


# ---- stage keys --------------------------------------------------------------------------------------------
def test_unchanged_inputs_do_no_work_and_relevant_changes_make_new_keys(world, monkeypatch) -> None:
    root, params = world
    out = {t: run_stage(params, t) for t in TEACHERS}
    keys = {t: s.manifest.stage_key for t, s in out.items()}
    import grounding.teachers.detectors as D

    def boom(*a, **k):
        raise AssertionError("a complete, same-key stage ran its model")

    monkeypatch.setattr(D.Detector, "detect", boom)
    for t in TEACHERS:  # nothing to do: same key, model never called; num_workers/batch_size do not matter
        assert run_stage(with_teacher(params, t, num_workers=1, batch_size=3), t).manifest.stage_key == keys[t]
    monkeypatch.undo()
    other = random_checkpoint(root / "w" / "frcnn-other.pt", "frcnn", params, seed=1)
    changed = {
        "frcnn weights": ("frcnn", {"weights": str(other)}),
        "frcnn input size": ("frcnn", {"input_size": 160}),
        "fcos input size": ("fcos", {"input_size": 160}),
        "yolo keep_ratio": ("yolo", {"keep_ratio": 0.5}),
        "yolo input size": ("yolo", {"input_size": 160}),
    }
    for what, (t, change) in changed.items():
        doc = doc_of(with_teacher(params, t, **change))
        doc["paths"]["teachers"] = str(root / "keys" / what.replace(" ", "-"))
        p = C.from_dict(doc)
        assert run_stage(p, t).manifest.stage_key != keys[t], what


# ---- odd images and on_error -------------------------------------------------------------------------------
def odd_dataset(root: Path) -> Path:
    """A hand-made dataset: an image smaller than one stride, 1xN and Nx1 strips, a panorama, a corrupt file."""
    images = root / "odd" / "images"
    images.mkdir(parents=True)
    specs = {"a-tiny": (9, 7), "b-strip": (1, 300), "c-strip": (300, 1), "d-pano": (12000, 90)}
    recs, refs = [], []
    for name, (w, h) in specs.items():
        arr = (np.arange(w * h * 3) % 251).astype(np.uint8).reshape(h, w, 3)
        Image.fromarray(arr).save(images / f"{name}.png")
        recs.append(ImageRecord(name, f"{name}.png", w, h, "0" * 64))
    (images / "e-bad.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    recs.append(ImageRecord("e-bad", "e-bad.jpg", 50, 40, "0" * 64))
    for r in recs:
        refs.append(RefRecord(f"{r.image_id}-0", r.image_id, "the thing", "val", (0.0, 0.0, float(r.width),
                                                                                  float(r.height)), "circle"))
    CanonicalDataset("odd", images, recs, refs).save(root / "prepared" / "odd")
    return root


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_tiny_strip_and_panorama_work_and_bad_images_follow_on_error(world, teacher: str) -> None:
    root, params = world
    odd_root = root / f"odd-{teacher}"
    odd_dataset(odd_root)
    doc = doc_of(params)
    doc["dataset"].update(name="odd", format="simrec", on_error="skip")
    doc["paths"].update(prepared=str(odd_root / "prepared"), teachers=str(odd_root / "teachers"))
    p = C.from_dict(doc)
    shards = run_stage(p, teacher)
    errors = shards.manifest.errors
    assert [e["item"] for e in errors] == ["e-bad"] and "ImageError" in errors[0]["reason"]
    assert shards.keys == ["a-tiny", "b-strip", "c-strip", "d-pano"]
    for key in shards.keys:
        row = shards.get(key)
        w, h = (int(v) for v in row["size"])
        lb = Letterbox.from_array(row["letterbox"])
        assert (lb.orig_w, lb.orig_h) == (w, h) and lb.new_w >= 1 and lb.new_h >= 1
        boxes = row["boxes"]
        assert len(boxes) > 0 and np.isfinite(boxes).all()
        assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= w).all()
        assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= h).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
    doc["dataset"]["on_error"] = "fail"
    doc["paths"]["teachers"] = str(odd_root / "teachers-fail")
    with pytest.raises(ItemFailed, match="e-bad"):
        run_stage(C.from_dict(doc), teacher)


# ---- weights files, params ------------------------------------------------------------------------------------
def test_pickled_checkpoints_are_refused_and_class_count_checked(tmp_path: Path, world) -> None:
    root, params = world
    torch.save({"model": Path("/etc")}, tmp_path / "pickled.pt")  # an arbitrary pickled object: refused
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_checkpoint(tmp_path / "missing.pt")
    p = with_teacher(params, "frcnn", classes=["a", "b"])
    with pytest.raises(ValueError, match="2 class names from params"):
        _ = build_detector("frcnn", p, Path(p.teachers.frcnn.weights)).classes


def test_mmdet_backend_fails_clearly_at_param_validation(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("mmcv._ext") if importlib.util.find_spec("mmcv") else None:
        pytest.skip("mmcv with ops is installed here")
    with pytest.raises(C.ConfigError, match=r"mmdet backend needs mmdet\+mmcv with ops; see README for `make mmdet`"):
        C.from_dict({"teachers": {"frcnn": {"backend": "mmdet"}}})
    with pytest.raises(C.ConfigError, match="multiple of 32"):
        C.from_dict({"teachers": {"yolo": {"input_size": 100}}})


def test_keep_count() -> None:
    assert keep_count(169, 0.1) == 17 and keep_count(169, 1.0) == 169 and keep_count(5, 0.01) == 1
    assert keep_count(100, 0.1) == 10


# ---- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bootstrap_extract_and_recall_end_to_end(tmp_path: Path) -> None:
    """Bootstrap three tiny teachers on a small synthetic set, cache their outputs, report recall."""
    from grounding import stages
    from grounding.artefacts import read_provenance
    from grounding.teachers.bootstrap import bootstrap_path
    from grounding.teachers.detectors.recall import recall_table

    boot = {"epochs": 2, "batch_size": 4, "input_size": 128}
    doc = make_doc(tmp_path)
    doc["dataset"]["synthetic"]["n_images"] = 16
    for t in TEACHERS:
        doc["teachers"][t]["bootstrap"] = dict(boot)
    p = C.from_dict(doc)
    stages.run("prepare", p)
    for t in TEACHERS:
        weights = stages.run(f"bootstrap-{t}", p).path
        assert weights == bootstrap_path(p, t) and read_provenance(weights)["provenance"]["teacher"] == t
        ckpt = load_checkpoint(weights)
        assert ckpt.meta["classes"] == list(CLASSES)
        mtime = weights.stat().st_mtime_ns
        assert stages.run(f"bootstrap-{t}", p).path.stat().st_mtime_ns == mtime  # same key: not retrained
        shards = ShardSet(stages.run(TEACHERS[t], p).path)
        assert shards.manifest.teacher["weights_sha256"] == ckpt.sha256
    table = recall_table(p, split="train")
    assert set(table) == set(TEACHERS.values())
    for stage, r in table.items():
        assert r["gt_boxes"] > 0 and 0.0 <= r["recall"] <= 1.0, (stage, r)
    (tmp_path / "recall.json").write_text(json.dumps(table))


# ---- mmdet adapter: layout conversions (no mmdet needed) -------------------------------------------------
def test_mmdet_rcnn_conversion_puts_background_first_and_selects_like_torchvision() -> None:
    from grounding.teachers.detectors.mmdet import rcnn_detections

    # two RoIs, C = 2 classes; mmdet order [class0, class1, background]
    cls_score = torch.tensor([[0.0, 4.0, 1.0],    # RoI 0: class 1
                              [3.0, 0.0, 0.5]])   # RoI 1: class 0
    decoded = torch.tensor([[0, 0, 10, 10, 20, 20, 60, 70],      # RoI 0: class-0 box, class-1 box
                            [5, 5, 50, 40, 0, 0, 1, 1]], dtype=torch.float32)
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    props = [torch.tensor([[0, 0, 64, 64], [0, 0, 64, 64]], dtype=torch.float32)]
    d = rcnn_detections(cls_score, decoded, feats, props, 128, score_thresh=0.3, nms_thresh=0.5,
                        detections_per_img=100)[0]
    p = torch.softmax(cls_score, -1)
    # kept: RoI 0 as class 1 (p=.93) and RoI 1 as class 0 (p=.84); nothing else clears 0.3
    assert d["labels"].tolist() == [2, 1] and d["roi"].tolist() == [0, 1]
    np.testing.assert_allclose(d["scores"], [p[0, 1], p[1, 0]], rtol=1e-6)
    np.testing.assert_allclose(d["boxes"], [[20, 20, 60, 70], [5, 5, 50, 40]])
    np.testing.assert_allclose(d["class_probs"][:, 0], [p[0, 2], p[1, 2]], rtol=1e-6)  # background first
    np.testing.assert_allclose(d["class_probs"][:, 1:], p[[0, 1], :2], rtol=1e-6)
    np.testing.assert_array_equal(d["features"], feats)


def test_mmdet_fcos_level_conversion() -> None:
    from grounding.teachers.detectors.mmdet import fcos_level_points

    c, h, w = 3, 2, 3
    cls = torch.arange(c * h * w, dtype=torch.float32).view(c, h, w)
    ltrb = torch.tensor([10.0, 20.0, 30.0, 40.0]).view(4, 1, 1).expand(4, h, w)
    ctr = torch.arange(h * w, dtype=torch.float32).view(1, h, w)
    out = fcos_level_points(cls, ltrb, ctr, 32, 96)
    i = 1 * w + 1  # cell (y=1, x=1): mmdet's point at ((1 + .5) * 32, (1 + .5) * 32)
    np.testing.assert_allclose(out["points"][i], [48, 48])
    np.testing.assert_allclose(out["boxes"][i], [38, 28, 78, 88])
    np.testing.assert_allclose(out["boxes"][2], [70, 0, 96, 56])  # (y=0, x=2) clipped to the 96 canvas
    np.testing.assert_allclose(out["class_logits"][i], cls[:, 1, 1])
    assert out["centerness"].tolist() == ctr.flatten().tolist()


def test_colour_shape_labels_come_from_the_generator(world) -> None:
    """The attribute-aware YOLO bootstrap relabels each GT box with its object's colour and shape: 80 classes,
    the shape part always the original class, the colour the generator drew (checked against the pixels)."""
    from grounding.data.synthetic import COLOUR_NAMES, COLOUR_RGB
    from grounding.teachers.bootstrap import colour_shape_samples, detector_classes, train_samples

    _, params = world
    ds = CanonicalDataset.load(params.prepared_dir())
    shape_classes = detector_classes(ds)
    samples = train_samples(ds, shape_classes)
    classes, relabelled = colour_shape_samples(ds, samples)
    assert len(classes) == len(CLASSES) * len(COLOUR_NAMES) == len(set(classes))
    assert [s[0] for s in relabelled] == [s[0] for s in samples]
    seen = set()
    for (image_id, boxes, shapes), (_, boxes2, labels) in zip(samples, relabelled):
        assert np.array_equal(boxes, boxes2)
        img = np.asarray(load_rgb(ds.image_root, ds.image_index[image_id])).astype(float)
        for b, shape, lab in zip(boxes.astype(int), shapes, labels):
            colour, name = classes[lab].split(" ")
            assert name == shape_classes[shape]
            x1, y1, x2, y2 = b
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2  # every synthetic shape covers its box centre
            if name not in ("ring", "cross", "star", "heart"):
                pixel = img[cy, cx]
                nearest = min(COLOUR_NAMES, key=lambda c: np.abs(np.array(COLOUR_RGB[c]) - pixel).sum())
                assert nearest == colour, (image_id, classes[lab], pixel)
            seen.add(colour)
    assert len(seen) >= 3


def test_frcnn_topk_class_probs_rebuild_the_dense_ones(world) -> None:
    """``class_probs: topk`` (issue 23): top-k float16 + int32 indices + residual instead of the dense field;
    a new stage key; the rebuilt p(z|x) matches the dense run's within float16 rounding on the top k."""
    from grounding import class_probs as cp

    root, params = world
    dense_set = run_stage(params, "frcnn")
    doc = doc_of(params)
    doc["teachers"]["frcnn"].update(class_probs="topk", class_probs_k=3)
    doc["paths"]["teachers"] = str(root / "teachers-topk")  # beside the dense set, which the other tests read
    topk_set = run_stage(C.from_dict(doc), "frcnn")
    assert topk_set.manifest.stage_key != dense_set.manifest.stage_key
    assert "class_probs" not in topk_set.fields and set(cp.TOPK_FIELDS) <= set(topk_set.fields)
    assert topk_set.manifest.params["class_probs"] == {"encoding": "topk", "k": 3}
    assert "class_probs" not in dense_set.manifest.params  # dense sets keep their key
    c1 = len(CLASSES) + 1
    for image_id in dense_set.keys[:3]:
        d, t = dense_set.get(image_id), topk_set.get(image_id)
        np.testing.assert_array_equal(d["boxes"], t["boxes"])
        assert t[cp.TOPK_INDEX].dtype == np.int32 and t[cp.TOPK_VALUES].shape == (len(d["boxes"]), 3)
        q, p = cp.dense(t, c1), d["class_probs"].astype(np.float32)
        np.testing.assert_allclose(np.take_along_axis(q, t[cp.TOPK_INDEX].astype(np.int64), 1),
                                   np.take_along_axis(p, t[cp.TOPK_INDEX].astype(np.int64), 1), atol=2e-3)
        np.testing.assert_allclose(q.sum(1), 1, atol=3e-3)
