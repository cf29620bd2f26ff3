"""DVC, Prefect and the stage registry describe the same pipeline."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from grounding import stages
from pipelines.flow import TARGETS, stages_for

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_stages_are_registered_thin_entry_points() -> None:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in dvc.items():
        assert name in stages.STAGES, f"dvc stage {name} is not in grounding.stages.STAGES"
        module = st["cmd"].split("python -m ", 1)[1].split()[0]
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.exists() and len(path.read_text().splitlines()) <= 20, f"{path} missing or not thin"
        assert f'main("{name}")' in path.read_text()
        assert any(d.startswith("stages/") for d in st["deps"])
        for dep in stages.get(name).needs:
            assert dep in dvc, f"{name} needs {dep}, which dvc.yaml lacks"
    assert sorted(dvc) == sorted(stages.STAGES), "dvc.yaml and the stage registry list different stages"


def test_prefect_deployments_match_targets() -> None:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = [d["name"] for d in doc["deployments"]]
    assert sorted(names) == sorted(TARGETS)
    for d in doc["deployments"]:
        module, fn = d["entrypoint"].split(":")
        mod = importlib.import_module(module.removesuffix(".py").replace("/", "."))
        assert getattr(mod, fn).name == "grounding"
        assert d["parameters"]["target"] == d["name"]


def test_plan_orders_dependencies_and_rejects_unknown() -> None:
    order = stages_for("all")
    for name in order:
        for dep in stages.get(name).needs:
            assert order.index(dep) < order.index(name)
    with pytest.raises(KeyError, match="unknown target"):
        stages_for("nope")
