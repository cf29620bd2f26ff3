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


# ---- the stage engine (issue 18) -------------------------------------------------------------------------------
def test_committed_dvc_yaml_is_the_generated_one() -> None:
    from grounding.dvcgen import dvc_yaml

    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), "dvc.yaml is stale: run `grounding dvc-yaml > dvc.yaml`"


def test_dvc_yaml_deps_filled_from_params_yaml_are_the_registry_edges() -> None:
    """DVC fills ``${a.b}`` in dvc.yaml from params.yaml; so filled, each stage's data deps are outputs of
    exactly its upstream stages for params.yaml (the stage a ``*_from`` param names, not a fixed default)."""
    import re
    from functools import reduce

    from grounding import config

    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = config.load(ROOT / "params.yaml")

    def fill(path: str) -> str:
        return re.sub(r"\$\{([\w.]+)\}", lambda m: str(reduce(lambda d, k: d[k], m[1].split("."), values)), path)

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    made_by = {fill(o if isinstance(o, str) else next(iter(o))): name for name, st in dvc.items()
               for kind in ("outs", "metrics", "plots") for o in st.get(kind, [])}
    assert any("${students.rec.pseudo_from}" in d for d in dvc["student-rec-pseudo"]["deps"])
    for name, st in dvc.items():
        ups = [made_by[fill(d)] for d in st["deps"] if fill(d) in made_by]
        assert ups == list(stages.get(name).upstream(params)), name


def test_no_import_cycles_in_the_library() -> None:
    from grounding import codeset

    assert codeset.cycles(codeset.import_graph()) == []


def test_layering_over_the_derived_import_graph() -> None:
    """Students (every file) never reach a teacher (grounding/teachers, grounding/refclip) through any chain of
    imports; grounding/shards and grounding/boxes.py reach no model code."""
    from grounding import codeset

    graph = codeset.import_graph()
    teachers = ("grounding.teachers", "grounding.refclip")
    for mod in (m for m in graph if m.startswith("grounding.students")):
        bad = [m for m in codeset.code_modules(mod) if m.startswith(teachers)]
        assert not bad, f"{mod} reaches teacher modules {bad}"
    for mod in (m for m in graph if m.startswith("grounding.shards") or m == "grounding.boxes"):
        bad = [m for m in codeset.code_modules(mod) if m.startswith((*teachers, "grounding.students"))]
        assert not bad, f"{mod} reaches model code {bad}"


def test_code_set_follows_every_import_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``import grounding.x``, ``from grounding import x`` (x a submodule), ``from grounding.x import y`` (y a
    submodule or a name), relative imports, imports inside functions, and package ``__init__``s."""
    from grounding import codeset

    pkg = tmp_path / "grounding"
    files = {"__init__.py": "", "a.py": "from grounding import b\nfrom .sub import leaf\n",
             "b.py": "def f():\n    import grounding.c\n", "c.py": "from grounding.sub.leaf import NAME\n",
             "sub/__init__.py": "", "sub/leaf.py": "from ..d import x\nNAME = 1\n", "d.py": "x = 1\n",
             "unused.py": ""}
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setattr(codeset, "ROOT", tmp_path)
    for cache in (codeset._file_digest, codeset.direct_imports, codeset.code_modules):
        cache.cache_clear()
    try:
        assert codeset.code_set("grounding.a") == tuple(f"grounding/{f}" for f in sorted(
            ["__init__.py", "a.py", "b.py", "c.py", "d.py", "sub/__init__.py", "sub/leaf.py"]))
        before = codeset.code_version("grounding.a")
        (pkg / "d.py").write_text("x = 1\n# a comment\n")
        codeset._file_digest.cache_clear()
        assert codeset.code_version("grounding.a") != before
    finally:
        for cache in (codeset._file_digest, codeset.direct_imports, codeset.code_modules):
            cache.cache_clear()


def test_every_stage_declares_resolvable_params_and_a_registered_entry() -> None:
    from grounding import config

    p = config.Params()
    for s in stages.STAGES.values():
        for dotted in s.params:
            stages.param_value(p, dotted)  # KeyError when it names no params.yaml path
        module, fn = s.compute.split(":")
        assert (ROOT / s.entry).is_file() and (ROOT / module.replace(".", "/")).with_suffix(".py").is_file()
        assert f"def {fn}(" in (ROOT / module.replace(".", "/")).with_suffix(".py").read_text()
