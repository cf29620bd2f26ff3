"""The README's demo tables are what `benchmarks/tables.py` generates from the committed results files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)


def test_readme_demo_tables_are_the_generated_ones() -> None:
    """Fails when README.md's block between the markers differs from what the committed
    benchmarks/results/demo-*.json give (rerun `python benchmarks/tables.py`)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = tables.render(tables.load_results())
    assert block in text, "README.md demo tables are stale: run `python benchmarks/tables.py`"
    assert text.count(tables.BEGIN) == 1 and text.count(tables.END) == 1


def fake(seed: int, val: float, wall: float = 500.0) -> dict:
    acc = {"train": 0.1, "val": val, "testA": 0.3, "testB": 0.4}
    return {
        "budget": "small", "seed": seed, "resumed": None, "overrides": [] if seed == 0 else ["seed=1"], "date": "2026-12-06 23:00 UTC",
        "make_demo_wall_s": wall, "stages_wall_s": wall - 60, "stages_cpu_s": 400.0,
        "load_average": {"mean_1min": 3.25, "max_1min": 6.0}, "stages": [{"stage": "prepare", "wall_s": 9.5, "cpu_s": 4.8}],
        "environment": {"cpu_count": 2, "processor": "AMD EPYC", "torch": "2.14.1", "cpu_capability": "AVX512"}, "dataset": "synthetic", "images": 240,
        "recall": {"frcnn-proposals": {"val": {"recall": val}}},
        "metrics": {"student-pbrec.json": {"acc50": acc}, "clip.json": {"text_to_image_r5": val,
                                                                         "text_to_image_r5_chance": 0.2}},
    }


def test_render_shows_both_seeds_and_the_spread() -> None:
    block = tables.render({"s0": fake(0, 0.25), "s1": fake(1, 0.30), "full": fake(0, 0.5, wall=2000.0)})
    lines = block.splitlines()
    assert lines[0] == tables.BEGIN and lines[-1] == tables.END
    pbrec = next(ln for ln in lines if ln.startswith("| student-pbrec |"))
    assert pbrec == "| student-pbrec | 10.0 / 10.0 | 25.0 / 30.0 | 30.0 / 30.0 | 40.0 / 40.0 | 5.0 | 50.0 |"
    frcnn = next(ln for ln in lines if ln.startswith("| Faster R-CNN"))
    assert frcnn.endswith("| 0.250 / 0.300 | 0.050 | – | 0.500 |")
    r5 = next(ln for ln in lines if "R@5" in ln)
    assert r5.endswith("| 0.250 / 0.300 | 0.050 | 0.200 | 0.500 |")
    assert "| recipe wall seconds (after install) | 500 | 500 | 2000 |" in lines
    assert "| `prepare` | 9.5 | 4.8 | 9.5 | 4.8 | 9.5 | 4.8 |" in lines
    assert "| · λ = 0 (no distillation) | – / – | – / – | – / – | – / – | – | – |" in lines  # absent: a dash


def test_replace_block_needs_one_pair_of_markers() -> None:
    text = f"a\n{tables.BEGIN}\nold\n{tables.END}\nb\n"
    assert tables.replace_block(text, f"{tables.BEGIN}\nnew\n{tables.END}") == f"a\n{tables.BEGIN}\nnew\n{tables.END}\nb\n"
    with pytest.raises(SystemExit, match="exactly one"):
        tables.replace_block("no markers", "x")


def test_missing_seed0_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "demo-seed1.json").write_text(json.dumps(fake(1, 0.2)))
    with pytest.raises(SystemExit, match=r"demo-seed0.json: missing; run `python benchmarks/demo_time.py --out"):
        tables.load_results(tmp_path)


def test_without_the_full_budget_file_its_columns_are_left_out() -> None:
    block = tables.render({"s0": fake(0, 0.25), "s1": fake(1, 0.30)})
    assert "| student-pbrec | 10.0 / 10.0 | 25.0 / 30.0 | 30.0 / 30.0 | 40.0 / 40.0 | 5.0 |" in block.splitlines()
    assert "`make demo-full` was not measured" in block and "| recipe wall seconds (after install) | 500 | 500 |" in block


def test_seed1_of_another_budget_or_missing_is_shown_as_unmeasured(tmp_path: Path) -> None:
    """A seed-1 file whose training lengths differ from seed 0's (an older params.yaml) gives dashes and says
    so, as a missing one does; it never lends its figures to the current budget."""
    s0, s1 = fake(0, 0.25), fake(1, 0.30)
    s0["bootstraps"], s1["bootstraps"] = {"frcnn": {"epochs": 3}}, {"frcnn": {"epochs": 1}}
    (tmp_path / "demo-seed0.json").write_text(json.dumps(s0))
    (tmp_path / "demo-seed1.json").write_text(json.dumps(s1))
    res = tables.load_results(tmp_path)
    assert "another budget" in res["s1"]["unmeasured"]
    lines = tables.render(res).splitlines()
    assert next(ln for ln in lines if ln.startswith("| student-pbrec |")).startswith("| student-pbrec | 10.0 / – |")
    assert "| recipe wall seconds (after install) | 500 | – |" in lines
    assert any("seed 1 not measured for this budget" in ln for ln in lines)
    s1["bootstraps"] = s0["bootstraps"]
    (tmp_path / "demo-seed1.json").write_text(json.dumps(s1))
    assert "unmeasured" not in tables.load_results(tmp_path)["s1"]
    (tmp_path / "demo-seed1.json").unlink()
    assert "missing" in tables.load_results(tmp_path)["s1"]["unmeasured"]
