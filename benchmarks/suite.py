"""The benchmark suite: runs every benchmark script (each a side-by-side ratio measured in one run), then
collects their JSON outputs into ``benchmarks/results.json`` and the markdown table
``benchmarks/results.md`` that the README includes.

    python benchmarks/suite.py [--only shard_io,teacher_throughput,...] [--collect-only]

``make bench`` runs it. Each benchmark writes ``benchmarks/out/<name>.json``; ``--collect-only`` rebuilds
the table from those files without rerunning anything. Prints the device each benchmark used (CUDA when
present: device ``auto``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

#: name -> (arguments of ``benchmarks/<name>.py``, what it needs first)
COMMANDS: dict[str, tuple[list[str], str]] = {
    "shard_io": ([], "nothing"),
    "teacher_throughput": (["--only", "frcnn,fcos,yolo,clip", "--random-weights"], "grounding run prepare"),
    "refclip_train_speed": ([], "grounding run yolo-anchors"),
    "student_step": ([], "nothing (random tiny CLIP)"),
    "orchestration_overhead": ([], "nothing (builds a temporary project)"),
    "incremental": ([], "nothing (temporary dataset)"),
    "kill_resume": (["--json", "benchmarks/out/kill_resume.json"], "nothing (temporary dataset)"),
    "scale": (["--sizes", "10000", "100000", "--set", "teachers.yolo.input_size=224"],
              "nothing (generates 10k and 100k images, ~1.4 GB, deleted after; ~45 min on 2 cores)"),
    "peers": ([], "the bench extra (pip install -e .[bench]); ~8 min on 2 cores"),
    "class_probs_topk": ([], "nothing"),
}


def _r(x: Any, nd: int = 3) -> str:
    return f"{x:.{nd}f}" if isinstance(x, (int, float)) else str(x)


def rows_shard_io(d: dict) -> list[tuple[str, str, str]]:
    return [("shard I/O: `ShardSet.get` vs np.memmap (random reads)", _r(d["ratio_shardset_vs_memmap"], 2), "cpu"),
            ("shard I/O: `ShardSet.get` vs one .npy per row", _r(d["ratio_shardset_vs_npy_per_row"], 1), "cpu")]


def rows_teacher_throughput(d: dict) -> list[tuple[str, str, str]]:
    return [(f"teacher stage ÷ bare model images/s: {r['teacher']}", _r(r["ratio"]), r.get("device", "?"))
            for r in d["results"]]


def rows_refclip_train_speed(d: dict) -> list[tuple[str, str, str]]:
    return [("RefCLIP training: online YOLO s/step ÷ cached-anchor s/step", _r(d["speedup_cached_over_online"], 1),
             d["device"])]


def rows_student_step(d: dict) -> list[tuple[str, str, str]]:
    dev = d.get("device", "cpu")
    return [(f"student-epmvg step: cached teacher ÷ no teacher ({d['teacher_model']})", _r(d["cached_over_no_teacher"], 2), dev),
            (f"student-epmvg step: online CLIP ÷ cached ({d['teacher_model']})", _r(d["online_over_cached"], 2), dev)]


def rows_incremental(d: dict) -> list[tuple[str, str, str]]:
    out = []
    for stage, r in d["stages"].items():
        out.append((f"+{d['images_grown'] - d['images']} images on {d['images']}: {stage} rows computed ÷ full run",
                    _r(r["rows_ratio"]), d.get("device", "cpu")))
        out.append((f"  … {stage} seconds ÷ full run (byte-identical: {r['byte_identical']})", _r(r["seconds_ratio"], 2),
                    d.get("device", "cpu")))
    return out


def rows_kill_resume(d: dict) -> list[tuple[str, str, str]]:
    return [(f"kill/resume: SIGKILLed `{d['stage']}` reruns byte-identical, partial sets refused", f"{d['passed']}/{d['trials']}",
             "cpu")]


def rows_orchestration_overhead(d: dict) -> list[tuple[str, str, str]]:
    return [(f"no-op `dvc repro` seconds ÷ first run ({d['n_stages']} stages, {d['n_images']} images)",
             f"{d['noop_dvc_repro_s']:.1f} s / {d['first_run_s']:.0f} s = {d['ratio_noop_dvc_vs_first']:.4f}", "cpu"),
            ("cached Prefect flow run seconds ÷ first run",
             f"{d['cached_flow_s']:.1f} s / {d['first_run_s']:.0f} s = {d['ratio_cached_flow_vs_first']:.4f}", "cpu")]


def rows_scale(d: dict) -> list[tuple[str, str, str]]:
    lo, hi = str(min(d["sizes"])), str(max(d["sizes"]))
    out = []
    for stage, ratio in d["peak_rss_ratio"].items():
        a, b = d["runs"][lo][stage], d["runs"][hi][stage]
        out.append((f"scale: `{stage}` peak RSS {hi} ÷ {lo} images ({b['peak_rss_mb']:.0f} / {a['peak_rss_mb']:.0f} MB)",
                    _r(ratio), d.get("device", "cpu")))
        out.append((f"  … {stage} at {hi} images: images/s last ÷ first tenth of the shards ({b['images_per_s']:.0f} img/s, "
                    f"{b['shards']} shards, {b['total_mb']:.0f} MB)", _r(b["throughput_last_over_first_tenth"], 2),
                    d.get("device", "cpu")))
    return out


def rows_peers(d: dict) -> list[tuple[str, str, str]]:
    out = []
    for w, wr in d["workloads"].items():
        p = wr["peers"]
        ss, key = p.get("ShardSet", {}), p.get("ShardSet.get (by key)", {})
        out.append((f"peers, {w}: ShardSet random reads ÷ np.memmap (by row id / by key)",
                    f"{_r(ss.get('random_reads_per_s_vs_memmap'), 2)} / {_r(key.get('random_reads_per_s_vs_memmap'), 2)}",
                    "cpu"))
        others = {n: v.get("epoch_rows_per_s_vs_memmap") for n, v in p.items()
                  if n not in ("ShardSet", "np.memmap") and v.get("epoch_rows_per_s_vs_memmap")}
        best = max(others, key=others.get) if others else None
        out.append((f"  … {w}: shuffled epoch ÷ np.memmap, ShardSet (best other: {best})",
                    f"{_r(ss.get('epoch_rows_per_s_vs_memmap'), 2)} ({_r(others.get(best), 2)})", "cpu"))
    return out


def rows_class_probs_topk(d: list) -> list[tuple[str, str, str]]:
    return [(f"top-{r['k']} class probs ÷ dense float16 bytes/image (sigma {r['sigma']:g}; max abs(p - p_dense))",
             f"{r['bytes_topk'] / r['bytes_dense_f16']:.3f} ({r['max_abs_err']:.1e})", "cpu") for r in d if r["k"] == 32]


def _generic(d: dict, name: str) -> list[tuple[str, str, str]]:
    """Benchmarks that name their own headline figures in ``summary``: ``{label: value}``."""
    dev = d.get("device", d.get("meta", {}).get("device", "cpu"))
    return [(f"{name}: {k}", _r(v), dev) for k, v in d.get("summary", {}).items()]


EXTRACT: dict[str, Callable[[dict], list[tuple[str, str, str]]]] = {
    "shard_io": rows_shard_io,
    "teacher_throughput": rows_teacher_throughput,
    "refclip_train_speed": rows_refclip_train_speed,
    "student_step": rows_student_step,
    "incremental": rows_incremental,
    "kill_resume": rows_kill_resume,
    "orchestration_overhead": rows_orchestration_overhead,
    "scale": rows_scale,
    "peers": rows_peers,
    "class_probs_topk": rows_class_probs_topk,
}


def run(name: str) -> float:
    args, _ = COMMANDS[name]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], check=True, cwd=HERE.parent)
    return time.perf_counter() - t0


def collect(names: list[str], out: Path = OUT) -> dict[str, Any]:
    rows, missing = [], []
    for name in names:
        path = out / f"{name}.json"
        if not path.exists():
            missing.append(name)
            continue
        d = json.loads(path.read_text())
        for label, value, device in EXTRACT.get(name, lambda d, n=name: _generic(d, n))(d):
            rows.append({"benchmark": name, "figure": label, "value": value, "device": device,
                         "command": f"python benchmarks/{name}.py {' '.join(COMMANDS[name][0])}".strip()})
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return {"machine": machine, "rows": rows, "missing": missing}


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['machine']}, {m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}, "
             f"GPU: {m['cuda'] or 'none'}.", "", "| figure | value | device | command |", "|---|---:|---|---|"]
    lines += [f"| {r['figure']} | {r['value']} | {r['device']} | `{r['command']}` |" for r in res["rows"]]
    if res["missing"]:
        lines += ["", f"Not run: {', '.join(res['missing'])}."]
    return "\n".join(lines) + "\n"


def hand_written(old: str) -> str:
    """The ``## `` sections written by hand below the generated table (kept when the table is rebuilt)."""
    i = old.find("\n## ")
    return old[i:] if i >= 0 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(COMMANDS), help=f"comma-separated subset of {list(COMMANDS)}")
    ap.add_argument("--collect-only", action="store_true", help="rebuild the table from benchmarks/out/*.json")
    ap.add_argument("--out-dir", type=Path, default=OUT, help="where the benchmarks' JSON outputs are read "
                    "(default benchmarks/out)")
    a = ap.parse_args()
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = set(names) - set(COMMANDS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {list(COMMANDS)}")
    print(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else 'cpu'}")
    if not a.collect_only:
        for name in names:
            print(f"== {name} (needs: {COMMANDS[name][1]})", flush=True)
            print(f"   {run(name):.0f} s", flush=True)
    res = collect(names, a.out_dir)
    if not res["rows"]:  # a fresh clone has no benchmarks/out: never replace the committed table with an empty one
        raise SystemExit(f"error: nothing collected: no output of {', '.join(names)} under {a.out_dir}; "
                         f"benchmarks/results.md and results.json left as they are (run the benchmarks first, "
                         f"without --collect-only)")
    (HERE / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    old = (HERE / "results.md").read_text() if (HERE / "results.md").exists() else ""
    (HERE / "results.md").write_text(markdown(res) + hand_written(old))
    print(markdown(res))


if __name__ == "__main__":
    main()
