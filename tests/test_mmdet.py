"""The mmdet backend of the Faster R-CNN and FCOS teachers against mmdet's own inference.

Runs only where mmdet 3.3 and mmcv 2.x *with its compiled ops* are installed (``make mmdet``: a ~35-60 min
source build on 2 cores, so not part of ``make test``/CI; elsewhere ``backend: mmdet`` is refused at param
validation, tests/test_detectors.py). Models are built from configs shipped inside the mmdet package with
random weights saved as a local mmengine-style checkpoint, as a user's COCO checkpoint would be.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from grounding import config as C
from grounding.data.images import load_rgb
from grounding.data.schema import CanonicalDataset
from grounding.shards import ShardSet
from grounding.teachers.detectors import letterbox_image
from grounding.teachers.detectors.stage import build_detector
from grounding.teachers.detectors.mmdet import mmdet_available, mmdet_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not mmdet_available(), reason="mmdet + mmcv ops not installed (`make mmdet`)")]

ARCH = {"frcnn": "faster-rcnn_r50_fpn_1x_coco", "fcos": "fcos_r50-caffe_fpn_gn-head_1x_coco"}
STAGE = {"frcnn": "frcnn-proposals", "fcos": "fcos-points"}
SIZE = 320


def _checkpoint(teacher: str, path: Path) -> Path:
    from mmdet.apis import init_detector

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "checkpoint is None, use COCO classes by default"
        m = init_detector(str(mmdet_config(ARCH[teacher])), checkpoint=None, device="cpu")
    torch.save({"meta": {"dataset_meta": {"classes": list(m.dataset_meta["classes"])}}, "state_dict": m.state_dict()},
               path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[C.Params, CanonicalDataset]:
    from grounding import stages

    root = tmp_path_factory.mktemp("mmdet")
    teachers = {t: {"backend": "mmdet", "arch": a, "weights": str(_checkpoint(t, root / f"{t}.pt")),
                    "input_size": SIZE, "batch_size": 2, "num_workers": 0} for t, a in ARCH.items()}
    teachers["frcnn"]["score_thresh"] = 0.0
    p = C.from_dict({"device": "cpu", "progress": False,
                     "dataset": {"synthetic": {"n_images": 3, "min_size": 64, "max_size": 200}},
                     "paths": {k: str(root / k) for k in ("prepared", "teachers", "students", "metrics", "models")},
                     "teachers": teachers})
    stages.run("prepare", p)
    for t in ARCH:
        stages.run(STAGE[t], p)
    return p, CanonicalDataset.load(p.prepared_dir())


def _canvas(p: C.Params, ds: CanonicalDataset, teacher: str, image_id: str):
    det = build_detector(teacher, p, Path(getattr(p.teachers, teacher).weights))
    canvas, lb = letterbox_image(load_rgb(ds.image_root, ds.image_index[image_id]), SIZE, det.pad_rgb)
    return det, canvas, lb


def test_frcnn_rows_equal_mmdet_predict(world) -> None:
    """Boxes, scores and labels of the cached rows are mmdet's own ``predict`` (same NMS settings), mapped
    back through the letterbox; class probabilities come back background-first."""
    p, ds = world
    s = ShardSet(p.teacher_dir("frcnn-proposals"))
    assert s.manifest.teacher["library"] == "mmdet" and len(s.manifest.extra["classes"]) == 80
    for image_id in s.keys:
        det, canvas, lb = _canvas(p, ds, "frcnn", image_id)
        det.model.roi_head.test_cfg.score_thr = 0.0
        with torch.no_grad():
            ref = det.model.predict(det._normalise(canvas[None]), det._samples(1), rescale=False)[0].pred_instances
        row = s.get(image_id)
        assert len(row["boxes"]) == len(ref.bboxes) == 100
        np.testing.assert_allclose(row["boxes"], lb.inverse(ref.bboxes.numpy()), atol=1e-3)
        np.testing.assert_allclose(row["scores"], ref.scores.numpy(), atol=1e-6)
        np.testing.assert_array_equal(row["labels"], ref.labels.numpy())
        k = np.arange(len(row["labels"]))
        np.testing.assert_allclose(row["class_probs"][k, row["labels"] + 1], row["scores"], rtol=2e-3, atol=1e-5)
        assert row["features"].shape[1] == det.model.roi_head.bbox_head.fc_cls.in_features


def test_fcos_p5_points_equal_mmdet_decoding(world) -> None:
    """P5 points, decoded boxes, class and centerness logits equal mmdet's priors + ``bbox_coder.decode`` on
    the stride-32 level of the caffe-style config (BGR mean, no channel flip: the model's own preprocessing)."""
    p, ds = world
    s = ShardSet(p.teacher_dir("fcos-points"))
    g = SIZE // 32
    for image_id in s.keys:
        det, canvas, lb = _canvas(p, ds, "fcos", image_id)
        m = det.model
        with torch.no_grad():
            cls, reg, ctr = m.bbox_head(m.extract_feat(det._normalise(canvas[None])))
        i = [int(st[0]) if isinstance(st, (tuple, list)) else int(st) for st in m.bbox_head.strides].index(32)
        priors = m.bbox_head.prior_generator.single_level_grid_priors((g, g), i, device="cpu")
        boxes = m.bbox_head.bbox_coder.decode(priors, reg[i][0].permute(1, 2, 0).reshape(-1, 4),
                                              max_shape=(SIZE, SIZE))
        row = s.get(image_id)
        inside = row["inside"].astype(bool)  # (points over the padding map outside the image, unclipped)
        assert inside.sum() >= 1
        np.testing.assert_allclose(row["points"][inside], lb.inverse(np.tile(priors[:, :2].numpy(), 2))[inside, :2],
                                   atol=1e-3)
        np.testing.assert_allclose(row["boxes"], np.clip(lb.inverse(boxes.numpy()), 0, np.tile(row["size"], 2)),
                                   atol=1e-2)
        np.testing.assert_allclose(row["class_logits"], cls[i][0].reshape(80, -1).T.numpy(), atol=1e-4)
        np.testing.assert_allclose(row["centerness"], ctr[i][0].reshape(-1).numpy(), atol=1e-4)


def test_preprocessing_follows_the_config() -> None:
    """pytorch-style configs see RGB normalised by RGB statistics, caffe-style ones BGR minus a BGR mean."""
    from mmdet.apis import init_detector

    from grounding.teachers.detectors.mmdet import preprocess_like_mmdet

    x = torch.rand(1, 3, 32, 32)  # a multiple of the preprocessor's pad_size_divisor: no padding
    for arch in ARCH.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp = init_detector(str(mmdet_config(arch)), checkpoint=None, device="cpu").data_preprocessor
        bgr_uint8_like = [(x.flip(1) * 255.0)[0]]  # what mmdet's loader hands its preprocessor
        ref = dp({"inputs": bgr_uint8_like, "data_samples": None}, training=False)["inputs"]
        np.testing.assert_allclose(preprocess_like_mmdet(x, dp).numpy(), ref.numpy(), atol=1e-4)
