"""Pydantic models of ``params.yaml``: one section per concern, unknown keys refused, clear errors.

``load(path, overrides=["dataset.synthetic.n_images=40"])`` reads the file, applies ``--set`` style
overrides (values parsed as YAML) and validates the result the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DATASET_FORMATS = ("synthetic", "refcoco", "refcoco+", "refcocog", "referit", "simrec", "transvg", "flickr30k")


class ConfigError(ValueError):
    """Bad parameters: the message names the key and the problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetParams(_Section):
    """Which dataset to prepare. ``synthetic`` is the embedded default; the others read user files.

    ``root``/``image_root`` are paths to local files (annotation root and image directory); ``options``
    are passed to the reader (e.g. ``dataset: unc``, ``split_by: unc``, ``box_format: xywh``).
    """

    name: str = "synthetic"
    format: Literal[DATASET_FORMATS] = "synthetic"  # type: ignore[valid-type]
    root: str | None = None
    image_root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    on_error: Literal["fail", "skip"] = "fail"
    synthetic: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_is_a_dir_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"dataset name {v!r} must be a plain directory name")
        return v


class ShardParams(_Section):
    """Shard layout: rows per shard file (the unit of atomic writes and of resume)."""

    rows_per_shard: int = Field(1024, ge=1)


class PathParams(_Section):
    """Where stage outputs go (relative to the working directory)."""

    prepared: str = "data/prepared"
    teachers: str = "data/teachers"
    students: str = "data/students"
    metrics: str = "data/metrics"
    models: str = "models"


# ---- teachers (each section is owned by the module that implements the teacher) ----------------------
class DetectorParams(_Section):
    """A detector teacher (``teachers.frcnn``, ``teachers.fcos``). Filled in by the detector stages."""

    backend: Literal["torchvision", "mmdet"] = "torchvision"
    weights: str | None = None


class YoloParams(_Section):
    """The YOLOv3 anchor teacher (``teachers.yolo``). Filled in by the detector stages."""

    weights: str | None = None
    keep_ratio: float = Field(0.1, gt=0, le=1)


class ClipParams(_Section):
    """The CLIP teacher (``teachers.clip``). Filled in by the CLIP stages."""

    pretrained: str | None = None


class WordnetParams(_Section):
    """WordNet soft labels (``teachers.wordnet``). Filled in by the WordNet stage."""


class TeachersParams(_Section):
    """One section per teacher."""

    frcnn: DetectorParams = DetectorParams()
    fcos: DetectorParams = DetectorParams()
    yolo: YoloParams = YoloParams()
    clip: ClipParams = ClipParams()
    wordnet: WordnetParams = WordnetParams()


class Params(_Section):
    """The whole ``params.yaml``."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    progress: bool = True
    dataset: DatasetParams = DatasetParams()
    shards: ShardParams = ShardParams()
    paths: PathParams = PathParams()
    teachers: TeachersParams = TeachersParams()

    def prepared_dir(self) -> Path:
        return Path(self.paths.prepared) / self.dataset.name

    def teacher_dir(self, stage: str) -> Path:
        return Path(self.paths.teachers) / stage / self.dataset.name


def apply_override(doc: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict in place; ``value`` is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value")
    path, raw = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {assignment!r} has an empty key")
    node = doc
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw)


def from_dict(doc: dict[str, Any], *, source: str = "params") -> Params:
    """Validate a params mapping; errors list every bad key with its dotted path."""
    try:
        return Params.model_validate(doc or {})
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{source}: invalid parameters\n" + "\n".join(lines)) from None


def load(path: str | os.PathLike[str] | None = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read and validate ``params.yaml`` (missing file: all defaults) with ``--set`` overrides."""
    doc: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        doc = loaded or {}
    elif path is not None and str(path) != "params.yaml":
        raise ConfigError(f"{path}: params file not found")
    for o in overrides:
        apply_override(doc, o)
    return from_dict(doc, source=str(path))
