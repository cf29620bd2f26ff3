"""Stage ``gt-boxes``: the distinct GT boxes of every image as an image-level shard set (oracle proposals)."""

from __future__ import annotations

from pathlib import Path

from grounding import __version__
from grounding.codeset import code_version
from grounding.config import Params
from grounding.data.gt import GT_FIELDS_MEANING, class_list, gt_regions
from grounding.data.schema import CanonicalDataset
from grounding.shards import FieldSpec


def run_gt_boxes(params: Params) -> Path:
    """Write ``data/teachers/gt-boxes/<dataset>``: boxes (float32 xyxy original pixels), labels, size."""
    from grounding.stage_writer import dataset_extra, write_stage

    ds = CanonicalDataset.load(params.prepared_dir())
    classes = class_list(ds)
    out = params.teacher_dir("gt-boxes")
    regions = dict(gt_regions(ds, classes))
    fields = (
        FieldSpec("boxes", "float32", (4,), ragged=True, meaning=GT_FIELDS_MEANING["boxes"]),
        FieldSpec("labels", "int32", (), ragged=True, meaning=GT_FIELDS_MEANING["labels"]),
        FieldSpec("size", "int32", (2,), meaning=GT_FIELDS_MEANING["size"]),
    )
    return write_stage(
        params, stage="gt-boxes", code=code_version(__name__), level="image",
        fields=fields, item_keys=[im.image_id for im in ds.images],
        rows=lambda todo: ((k, regions[k]) for k in todo), stage_params={"classes": classes},
        inputs={"dataset": ds.fingerprint()}, teacher={"name": "ground-truth", "package": __version__},
        extra={**dataset_extra(params, ds, out), "classes": classes}, out_dir=out,
    )
