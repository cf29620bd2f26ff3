"""params.yaml validation and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from grounding import config as C

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_validate() -> None:
    p = C.load(ROOT / "params.yaml")
    assert p.dataset.format == "synthetic" and p.shards.rows_per_shard >= 1


def test_overrides_are_parsed_and_validated(tmp_path: Path) -> None:
    p = C.load(ROOT / "params.yaml", ["dataset.synthetic.n_images=12", "shards.rows_per_shard=7", "device=cpu"])
    assert p.dataset.synthetic["n_images"] == 12 and p.shards.rows_per_shard == 7 and p.device == "cpu"
    with pytest.raises(C.ConfigError, match="shards.rows_per_shard"):
        C.load(ROOT / "params.yaml", ["shards.rows_per_shard=0"])
    with pytest.raises(C.ConfigError, match="dataset.colour"):
        C.load(ROOT / "params.yaml", ["dataset.colour=1"])
    with pytest.raises(C.ConfigError, match="not of the form"):
        C.load(ROOT / "params.yaml", ["dataset.name"])
    with pytest.raises(C.ConfigError, match="dataset.format"):
        C.load(ROOT / "params.yaml", ["dataset.format=coco"])
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(tmp_path / "missing.yaml")


def test_dump_and_reload_round_trips() -> None:
    p = C.load(ROOT / "params.yaml")
    assert C.from_dict(p.model_dump(mode="json", by_alias=True)) == p  # what the Prefect flow sends to tasks
