"""The ``prepare`` stage: user files (or the synthetic generator) -> canonical dataset on disk."""

from __future__ import annotations

import logging
from pathlib import Path

from grounding.config import ConfigError, Params
from grounding.data.schema import CanonicalDataset

log = logging.getLogger(__name__)


def synthetic_config(params: Params):
    """The generator config from ``dataset.synthetic`` (the global ``seed`` is the default seed)."""
    from grounding.data.synthetic import SyntheticConfig

    options = {"seed": params.seed, **params.dataset.synthetic}
    try:
        return SyntheticConfig(**options)
    except (TypeError, ValueError) as e:  # unknown key / bad value type or range
        raise ConfigError(f"dataset.synthetic: {e}") from None


def prepare(params: Params, out_dir: str | Path | None = None) -> CanonicalDataset:
    """Build the canonical dataset named in ``params.dataset`` and save it under ``out_dir`` (default
    ``data/prepared/<name>``): the synthetic generator's output (its config in ``source.config``) or the
    user's files read in their format. Whether it needs rebuilding is the stage engine's decision."""
    ds_params = params.dataset
    out = Path(out_dir) if out_dir is not None else params.prepared_dir()
    if ds_params.format == "synthetic":
        from grounding.data import synthetic

        ds = synthetic.generate(synthetic_config(params), out, progress=params.progress)
        ds.name = ds_params.name
    else:
        from grounding.data.readers import read

        if not ds_params.root:
            raise ConfigError(f"dataset.root is required for format {ds_params.format!r}")
        image_root = ds_params.image_root or ds_params.root
        ds = read(ds_params.format, ds_params.root, image_root, name=ds_params.name,
                  on_error=ds_params.on_error, **ds_params.options)
    ds.save(out)
    return ds


def run_prepare(params: Params) -> Path:
    """Stage ``prepare``: the canonical dataset under ``data/prepared/<name>``."""
    prepare(params)
    return params.prepared_dir()
