"""The detector caching stages (``frcnn-proposals``, ``fcos-points``, ``yolo-anchors``): build the teacher
its params name (:func:`build_detector`, the only constructor), run it over the prepared dataset, write its
shard set. Backends import only the interface in :mod:`grounding.teachers.detectors`; this module imports
the backends, so there is no import cycle."""

from __future__ import annotations

from pathlib import Path

import torch

from grounding.config import Params
from grounding.data.schema import CanonicalDataset
from grounding.overlap import overlapped
from grounding.teachers.detectors import Detector, TEACHERS, iter_rows, resolve_weights


def run_detector_stage(params: Params, teacher: str, *, out_dir: Path | None = None) -> Path:
    """Build teacher ``teacher`` from params, run it over the prepared dataset, write its shard set."""
    from grounding.runtime import resolve_device
    from grounding.codeset import code_version
    from grounding.stage_writer import dataset_extra, write_stage

    ds = CanonicalDataset.load(params.prepared_dir(), refs=False)  # images only: memory flat in sentences
    weights = resolve_weights(params, teacher)
    det = build_detector(teacher, params, weights, device=resolve_device(params.device))
    out = out_dir or params.teacher_dir(det.stage)
    cfg = det.cfg
    extra = {**dataset_extra(params, ds, out), "classes": det.classes, "weights_file": str(weights),
             "device": det.device.type, "torch": torch.__version__, **det.extra()}
    return write_stage(
        params, stage=det.stage, code=code_version(__name__),
        level=det.level, fields=det.fields(), item_keys=[im.image_id for im in ds.images],
        rows=lambda todo: overlapped(iter_rows(det, ds, todo, batch_size=cfg.batch_size, num_workers=cfg.num_workers)),
        stage_params=det.output_params(), inputs={"dataset": ds.fingerprint()}, teacher=det.identity(),
        extra=extra, out_dir=out,
    )


def build_detector(teacher: str, params: Params, weights: Path, device: torch.device | str = "cpu") -> Detector:
    """The detector of ``teacher`` with the backend its params name (``KeyError`` listing teachers)."""
    if teacher not in TEACHERS:
        raise KeyError(f"unknown detector teacher {teacher!r}; teachers are {sorted(TEACHERS)}")
    backend = getattr(params.teachers, teacher).backend
    if teacher == "frcnn":
        if backend == "mmdet":
            from grounding.teachers.detectors.mmdet import MMDetRCNNDetector as cls
        else:
            from grounding.teachers.detectors.torchvision_rcnn import FasterRCNNDetector as cls
    elif teacher == "fcos":
        if backend == "mmdet":
            from grounding.teachers.detectors.mmdet import MMDetFCOSDetector as cls
        else:
            from grounding.teachers.detectors.fcos import FCOSDetector as cls
    elif backend == "darknet":
        from grounding.teachers.detectors.darknet_stage import DarknetDetector as cls
    else:
        from grounding.teachers.detectors.yolo import YoloDetector as cls
    return cls(params, weights, device)


def run_frcnn_proposals(params: Params) -> Path:
    """Stage ``frcnn-proposals``: top detections, class probabilities and RoI features per image."""
    return run_detector_stage(params, "frcnn")


def run_fcos_points(params: Params) -> Path:
    """Stage ``fcos-points``: every P5 point of the FCOS head per image."""
    return run_detector_stage(params, "fcos")


def run_yolo_anchors(params: Params) -> Path:
    """Stage ``yolo-anchors``: the kept stride-32 cells (features, boxes, confidence) per image."""
    return run_detector_stage(params, "yolo")
