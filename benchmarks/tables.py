"""The README's demo tables, generated from the committed results of `benchmarks/demo_time.py`.

Reads ``benchmarks/results/demo-seed0.json`` and ``demo-seed1.json`` (``make demo``'s small budget, training
seeds 0 and 1) and ``demo-full-seed0.json`` (``make demo-full``), and writes the block between
``<!-- tables:demo:begin -->`` and ``<!-- tables:demo:end -->`` in README.md: what each demo costs (wall
and CPU seconds, load average, per stage), the teachers' figures, RefCLIP and the students, every accuracy
as seed 0 / seed 1 with the spread. ``--check`` only compares (exit 1 when the README differs);
``tests/test_tables.py`` does the same.

    python benchmarks/tables.py            # rewrite the block in README.md
    python benchmarks/tables.py --check    # exit 1 if README.md is not what the results give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- tables:demo:begin -->", "<!-- tables:demo:end -->"
SPLITS = ("train", "val", "testA", "testB")
FILES = {"s0": "demo-seed0.json", "s1": "demo-seed1.json", "full": "demo-full-seed0.json"}

Result = dict[str, Any]
Getter = Callable[[Result], Any]


def budget_of(r: Result) -> dict[str, Any]:
    """The training lengths a results file records (bootstrap epochs / CLIP steps, the length of each training
    curve) and, where recorded, the sha256 of the params.yaml it ran: two files of one budget agree on them."""
    b, m = r.get("bootstraps", {}), r.get("metrics", {})
    return {"params_sha256": r.get("params_sha256"), "clip_steps": dig(b, "clip", "training", "steps"),
            **{t: dig(b, t, "epochs") for t in ("frcnn", "fcos", "yolo")},
            **{c: len(m.get(f"{c}-curve.json") or []) for c in
               ("refclip-train", "student-rec-pseudo", "student-epmvg", "student-pbrec", "student-nce-distill",
                "student-bicm")}}


def load_results(directory: Path = RESULTS) -> dict[str, Result]:
    """The results files by role (``s0``, ``s1``, ``full``); a missing seed 0 is a one-line error; a missing
    seed 1, or one of another budget than seed 0's (:func:`budget_of`), becomes ``{"unmeasured": why}``, whose
    cells are dashes; a missing full-budget file leaves its columns out (the block then says it was not
    measured)."""
    out = {}
    for role, name in FILES.items():
        path = directory / name
        if path.is_file():
            out[role] = json.loads(path.read_text())
        elif role == "s0":
            raise SystemExit(f"error: {path}: missing; run `{_command(role)}`")
        elif role == "s1":
            out[role] = {"unmeasured": f"`{name}` is missing"}
    a, b = budget_of(out["s0"]), budget_of(out["s1"])
    if "unmeasured" not in out["s1"] and any(a[k] != b[k] for k in a if k != "params_sha256" or a[k] and b[k]):
        out["s1"] = {"unmeasured": f"`{FILES['s1']}` is of another budget than seed 0's"}
    return out


def _command(role: str) -> str:
    return {"s0": "python benchmarks/demo_time.py --out benchmarks/results/demo-seed0.json",
            "s1": "python benchmarks/demo_time.py --seed 1 --out benchmarks/results/demo-seed1.json",
            "full": "python benchmarks/demo_time.py --budget full --out benchmarks/results/demo-full-seed0.json"}[role]


def dig(doc: Any, *path: str) -> Any:
    """``doc[p0][p1]...``, ``None`` where a key is missing."""
    for p in path:
        if not isinstance(doc, dict) or p not in doc:
            return None
        doc = doc[p]
    return doc


def fmt(v: Any, pct: bool) -> str:
    """A figure: percent with one decimal (``pct``) or a fraction with three; ``–`` when absent."""
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def pair(a: Any, b: Any, pct: bool) -> str:
    """``seed 0 / seed 1``."""
    return f"{fmt(a, pct)} / {fmt(b, pct)}"


def spread(a: Any, b: Any, pct: bool) -> str:
    """``|seed 0 - seed 1|`` in the figure's unit."""
    return "–" if a is None or b is None else fmt(abs(a - b), pct)


def metric(name: str, *path: str) -> Getter:
    """A getter of ``result["metrics"][name][path...]``."""
    return lambda r: dig(r.get("metrics", {}), name, *path)


# ---- cost ----------------------------------------------------------------------------------------------------

def cost_table(res: dict[str, Result]) -> list[str]:
    """Wall / CPU seconds of each demo, the load beside them, and per stage."""
    cols = [("`make demo`, seed 0", res["s0"]), ("`make demo`, seed 1", res["s1"]),
            *([("`make demo-full`, seed 0", res["full"])] if "full" in res else [])]
    rows: list[tuple[str, Callable[[Result], str]]] = [
        ("recipe wall seconds (after install)", lambda r: f"{r['make_demo_wall_s']:.0f}"),
        ("stages: wall / CPU seconds", lambda r: f"{r['stages_wall_s']:.0f} / {r['stages_cpu_s']:.0f}"),
        ("load average, 1 min: mean (max) over the run", lambda r: f"{r['load_average']['mean_1min']:.1f} "
                                                                   f"({r['load_average']['max_1min']:.1f})"),
        ("measured (UTC)", lambda r: r["date"]),
        ("recipe in one go", lambda r: "no: stopped at the report, finished by `--resume`" if r.get("resumed") else "yes"),
    ]
    out = ["| | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    out += [f"| {label} | " + " | ".join("–" if "unmeasured" in r else get(r) for _, r in cols) + " |"
            for label, get in rows]
    has_full = "full" in res
    out += ["", "| stage | seed 0: wall s | seed 0: CPU s | seed 1: wall s | seed 1: CPU s |"
            + (" full: wall s | full: CPU s |" if has_full else ""), "|---|" + "---:|" * (6 if has_full else 4)]
    others = [{s["stage"]: s for s in res[k].get("stages", [])} for k in ("s1", "full") if k in res]
    for s in res["s0"]["stages"]:
        cells = [_num(s["wall_s"]), _num(s["cpu_s"])]
        for o in others:
            cells += [_num(o.get(s["stage"], {}).get("wall_s")), _num(o.get(s["stage"], {}).get("cpu_s"))]
        out.append(f"| `{s['stage']}` | " + " | ".join(cells) + " |")
    return out


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


# ---- teachers ------------------------------------------------------------------------------------------------

def _recall(stage: str, split: str = "val") -> Getter:
    return lambda r: dig(r, "recall", stage, split, "recall")


def _wordnet(key: str) -> Getter:
    return lambda r: dig(r.get("metrics", {}), f"wordnet-labels/{r.get('dataset')}.json", key)


TEACHERS: list[tuple[str, Getter, Getter | None]] = [  # label, figure, chance (or None)
    ("Faster R-CNN proposal recall@0.5, val (100/image)", _recall("frcnn-proposals"), None),
    ("FCOS P5-point recall@0.5, val", _recall("fcos-points"), None),
    ("SimREC YOLOv3 (darknet) kept-cell recall@0.5, val (17 cells x 4 boxes)", _recall("yolo-anchors"), None),
    ("same, train", _recall("yolo-anchors", "train"), None),
    ("WordNet soft-label argmax = GT class (all sentences)", _wordnet("argmax_accuracy"), None),
    ("WordNet coverage (a class matched)", _wordnet("coverage"), None),
    ("CLIP text→image R@1, val", metric("clip.json", "text_to_image_r1"), metric("clip.json", "text_to_image_r1_chance")),
    ("CLIP text→image R@5, val", metric("clip.json", "text_to_image_r5"), metric("clip.json", "text_to_image_r5_chance")),
    ("CLIP crop→phrase, val (frcnn crops)", metric("clip.json", "crop_to_phrase_acc"),
     metric("clip.json", "crop_to_phrase_chance")),
    ("QAM pointing game, val", metric("clip.json", "qam_pointing"), metric("clip.json", "qam_pointing_chance")),
    ("QAM P_t Acc@0.5 (Thr_a 0.7), val", metric("clip.json", "qam_acc"), None),
]


def teacher_table(res: dict[str, Result]) -> list[str]:
    has_full = "full" in res
    out = ["| figure | seed 0 / seed 1 | spread | chance |" + (" full budget (seed 0) |" if has_full else ""),
           "|---|" + "---:|" * (4 if has_full else 3)]
    for label, get, chance in TEACHERS:
        a, b = get(res["s0"]), get(res["s1"])
        c = fmt(chance(res["s0"]), False) if chance else "–"
        full = f" {fmt(get(res['full']), False)} |" if has_full else ""
        out.append(f"| {label} | {pair(a, b, False)} | {spread(a, b, False)} | {c} |{full}")
    return out


# ---- per-split accuracies (RefCLIP, students) ----------------------------------------------------------------

def _refclip(key: str) -> Callable[[Result, str], Any]:
    return lambda r, s: dig(r.get("metrics", {}), "refclip.json", "refclip", s, key)


def _student(stage: str, *path: str) -> Callable[[Result, str], Any]:
    return lambda r, s: dig(r.get("metrics", {}), f"{stage}.json", *path, s)


REFCLIP = [
    ("RefCLIP (its pseudo-boxes on train)", _refclip("acc")),
    ("· random kept cell", _refclip("random_anchor")),
    ("· most confident kept cell", _refclip("most_confident_anchor")),
    ("· upper bound (any kept cell)", _refclip("upper_bound")),
]

STUDENTS = [
    ("student-pbrec", _student("student-pbrec", "acc50")),
    ("· FCOS upper bound (best cached P5 box)", _student("student-pbrec", "baselines", "FCOS upper bound")),
    ("student-rec-pseudo (EMA)", _student("student-rec-pseudo", "acc50")),
    ("· raw weights", _student("student-rec-pseudo", "acc50_raw")),
    ("student-epmvg, distill", _student("student-epmvg", "variants", "distill", "mean")),
    ("· `distill: false`", _student("student-epmvg", "variants", "no distill", "mean")),
    ("centred box (mean train GT size)", _student("student-epmvg", "baselines", "centred box")),
    ("student-nce-distill", _student("student-nce-distill", "acc50")),
    ("· λ = 0 (no distillation)", _student("student-nce-distill", "no_distill")),
    ("· teacher target p̂ as a grounder", _student("student-nce-distill", "baselines", "teacher_target")),
    ("· random proposal", _student("student-nce-distill", "baselines", "random")),
    ("· largest proposal", _student("student-nce-distill", "baselines", "largest")),
    ("· most confident proposal", _student("student-nce-distill", "baselines", "most_confident")),
    ("· upper bound (best of 100 proposals)", _student("student-nce-distill", "baselines", "upper_bound")),
    ("student-bicm: COM", _student("student-bicm", "com")),
    ("· + QAM", _student("student-bicm", "com+qam")),
    ("· + QAM + KAM (the method)", _student("student-bicm", "com+qam+kam")),
    ("· COM with argmax instead of the largest-above-average rule", _student("student-bicm", "com@argmax")),
]


def split_table(res: dict[str, Result], rows: list[tuple[str, Callable[[Result, str], Any]]], pct: bool) -> list[str]:
    """Per split ``seed 0 / seed 1``, the val spread and val at the full budget."""
    has_full = "full" in res
    out = ["| model | " + " | ".join(SPLITS) + " | val spread |" + (" val, full budget |" if has_full else ""),
           "|---|" + "---:|" * (len(SPLITS) + (2 if has_full else 1))]
    for label, get in rows:
        cells = [pair(get(res["s0"], s), get(res["s1"], s), pct) for s in SPLITS]
        cells.append(spread(get(res["s0"], "val"), get(res["s1"], "val"), pct))
        if has_full:
            cells.append(fmt(get(res["full"], "val"), pct))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def _n(res: Result) -> str:
    n = dig(res, "metrics", "student-nce-distill.json", "n") or {}
    return " / ".join(str(n.get(s, "?")) for s in SPLITS)


def render(res: dict[str, Result]) -> str:
    """The whole generated block, markers included."""
    s0, env = res["s0"], res["s0"]["environment"]
    if "unmeasured" in res["s1"]:
        seed1 = (f"not measured for this budget ({res['s1']['unmeasured']}: its columns are dashes; "
                 f"`{_command('s1')}`)")
    else:
        seed1 = "adds " + (", ".join(f"`{o}`" for o in res["s1"]["overrides"] if o != "progress=false") or "nothing")
    full = ("the last column: `make demo-full`'s budget (params.yaml + `params-full.yaml`), seed 0" if "full" in res
            else "`make demo-full` was not measured for these files (`" + _command("full") + "`)")
    lines = [
        BEGIN,
        "<!-- generated by `python benchmarks/tables.py` from benchmarks/results/demo-*.json: do not edit by hand -->",
        "",
        f"**What the demo costs** (`python benchmarks/demo_time.py`: the Makefile's `demo` recipe on a fresh copy "
        f"of the project, install skipped; per stage the `python -m stages.*` process DVC ran, imports included; "
        f"CPU = its own and its children's seconds; {env['cpu_count']} cores, {env['processor']}, torch "
        f"{env['torch']}, {env['cpu_capability']}; seed 1 {seed1}; {full}. The machine's 1-minute load "
        "average during each run is below: other jobs on the machine inflate both wall and CPU seconds):",
        "",
        *cost_table(res),
        "",
        f"**Teachers** ({s0.get('images', '?')} synthetic images; seed 0 / seed 1 of `make demo`; `data/metrics/` and "
        "`grounding.teachers.detectors.recall`):",
        "",
        *teacher_table(res),
        "",
        "**RefCLIP on the cached YOLOv3 cells** (`data/metrics/refclip.json`; Acc@0.5 as a fraction, seed 0 / seed 1):",
        "",
        *split_table(res, REFCLIP, pct=False),
        "",
        f"**Students** (Acc@0.5 %, seed 0 / seed 1 of `make demo`; `data/metrics/student-*.json`; n = {_n(s0)} "
        "sentences for train / val / testA / testB):",
        "",
        *split_table(res, STUDENTS, pct=True),
        END,
    ]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with the marked block replaced; the markers must each be there once, in order."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"error: README.md: needs exactly one {BEGIN} ... {END} block")
    return text[:i] + block + text[j + len(END):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare only: exit 1 when README.md differs")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--results", default=str(RESULTS), help="directory of the demo-*.json results")
    args = ap.parse_args()
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    new = replace_block(text, render(load_results(Path(args.results))))
    if args.check:
        if new != text:
            print(f"error: {readme}: the demo tables differ from `python benchmarks/tables.py`'s; rerun it",
                  file=sys.stderr)
            raise SystemExit(1)
        print(f"{readme}: demo tables up to date")
        return
    readme.write_text(new, encoding="utf-8")
    print(f"{readme}: demo tables written")


if __name__ == "__main__":
    main()
