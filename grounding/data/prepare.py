"""The ``prepare`` stage: user files (or the synthetic generator) -> canonical dataset on disk."""

from __future__ import annotations

import logging
from pathlib import Path

from grounding.config import ConfigError, Params
from grounding.data.schema import DATASET_FILE, CanonicalDataset, DataError, read_source
from grounding.codeset import code_version
from grounding.shards.keys import digest

log = logging.getLogger(__name__)


def synthetic_config(params: Params):
    """The generator config from ``dataset.synthetic`` (the global ``seed`` is the default seed)."""
    from grounding.data.synthetic import SyntheticConfig

    options = {"seed": params.seed, **params.dataset.synthetic}
    try:
        return SyntheticConfig(**options)
    except (TypeError, ValueError) as e:  # unknown key / bad value type or range
        raise ConfigError(f"dataset.synthetic: {e}") from None


def prepare(params: Params, out_dir: str | Path | None = None, *, refs: bool = True) -> CanonicalDataset:
    """Build the canonical dataset named in ``params.dataset`` and save it under ``out_dir``
    (default ``data/prepared/<name>``). The synthetic dataset is regenerated only when its config or
    generator code changed; real formats are always re-read (DVC reruns this stage when files change).
    ``refs=False``: an up-to-date synthetic dataset is checked without holding its sentences (what the
    stage run does, so ``grounding run clip-image`` at 100k images stays lean)."""
    ds_params = params.dataset
    out = Path(out_dir) if out_dir is not None else params.prepared_dir()
    if ds_params.format == "synthetic":
        from dataclasses import asdict

        from grounding.data import synthetic

        cfg = synthetic_config(params)
        key = digest({"config": asdict(cfg), "code": code_version(__name__)})
        existing = _existing_key(out)
        if existing == key:
            log.info("synthetic dataset %s is up to date (key %s)", out, key[:12])
            return CanonicalDataset.load(out, refs=refs)
        ds = synthetic.generate(cfg, out, progress=params.progress)
        ds.name = ds_params.name
        ds.source = {**ds.source, "prepare_key": key}
    else:
        from grounding.data.readers import read

        if not ds_params.root:
            raise ConfigError(f"dataset.root is required for format {ds_params.format!r}")
        image_root = ds_params.image_root or ds_params.root
        ds = read(ds_params.format, ds_params.root, image_root, name=ds_params.name,
                  on_error=ds_params.on_error, **ds_params.options)
    ds.save(out)
    return ds


def _existing_key(out: Path) -> str | None:
    path = out / DATASET_FILE
    if not path.exists():
        return None
    try:
        return read_source(path).get("prepare_key")
    except (OSError, DataError):
        return None


def run_prepare(params: Params) -> Path:
    """Stage ``prepare``: the canonical dataset under ``data/prepared/<name>`` (sentences not held)."""
    prepare(params, refs=False)
    return params.prepared_dir()
