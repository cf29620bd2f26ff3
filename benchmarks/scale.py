"""Scale: the image-level teacher stages ``clip-image`` and ``yolo-anchors`` (tiny teachers, random weights:
speed and memory do not depend on what the weights learnt) over synthetic datasets of growing size.

For each size the synthetic generator streams images to disk (``grounding run prepare``; image ``i`` is drawn
from its own seed, so the generator holds one image at a time), then each stage runs in its own process.
Reported per (size, stage): peak RSS of the stage process (``wait4`` ``ru_maxrss``: the largest of the
process and its DataLoader workers), wall time, images/s, throughput stability across the run (images/s of
each finished shard from the shard files' mtimes: last tenth of the shards ÷ first tenth, and their
coefficient of variation), and shard count / sizes. The headline figure is the peak-RSS ratio of the
largest size to the smallest (goal ≤ 1.2 for 10k → 100k): stages keep only image records in memory
(``CanonicalDataset.load(..., refs=False)`` streams the sentences through the fingerprint check) and write
shards as rows stream in.

    python benchmarks/scale.py [--sizes 10000 100000] [--min-size 128 --max-size 256]
        [--stages clip-image yolo-anchors] [--set teachers.yolo.input_size=224] [--workdir DIR] [--keep]

Writes ``benchmarks/out/scale.json``. Disk: about 14 KB per image at 128-256 px (1.4 GB for 100k images;
deleted afterwards unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _random_weights(work: Path) -> dict[str, str]:
    """Random-init tiny CLIP and tiny YOLOv3 checkpoints saved as the bootstrap saves them."""
    sys.path.insert(0, str(HERE))
    from teacher_throughput import _random_weights as detector_weights

    from grounding import config as C
    from grounding.teachers import clip as T
    from grounding.teachers.clip_bootstrap import state_dict_bytes

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip = work / "clip-random.pt"
    clip.write_bytes(state_dict_bytes(T.create_model(T.model_spec(C.ClipParams()))))
    yolo = detector_weights(C.from_dict({"device": "cpu"}), "yolo", work)
    return {"clip": str(clip), "yolo": str(yolo)}


def _params_file(work: Path, n: int, min_size: int, max_size: int, weights: dict[str, str], device: str) -> Path:
    doc = {
        "device": device, "progress": False, "seed": 0,
        "dataset": {"name": f"scale{n}", "synthetic": {"n_images": n, "min_size": min_size, "max_size": max_size}},
        "paths": {k: str(work / k) for k in ("prepared", "teachers", "students", "metrics", "models")},
        "teachers": {"clip": {"pretrained": weights["clip"], "device": device},
                     "yolo": {"weights": weights["yolo"]}},
    }
    path = work / f"params-{n}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak RSS (``ru_maxrss``) and the main process's RSS sampled every 0.5 s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append((round(time.perf_counter() - t0, 1), _rss_kb(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "rss_samples_mb": [(t, round(kb / 1024, 1)) for t, kb in samples[:: max(1, len(samples) // 40)]]}


def shard_stats(out: Path) -> dict[str, Any]:
    """Shard count/sizes and per-shard throughput (rows of each shard ÷ time since the previous shard)."""
    from grounding.shards.reader import ShardSet

    s = ShardSet(out)
    files = sorted(out.glob("shard-*.h5"), key=lambda p: p.stat().st_mtime)
    sizes = [p.stat().st_size for p in files]
    rows = {e.file: e.rows for e in s.manifest.shards}
    times = [p.stat().st_mtime for p in files]
    rates = []
    for i in range(1, len(files)):
        n = rows.get(files[i].name, 0)
        if n and times[i] > times[i - 1]:
            rates.append(n / (times[i] - times[i - 1]))
    tenth = max(1, len(rates) // 10)
    stability = (statistics.fmean(rates[-tenth:]) / statistics.fmean(rates[:tenth])) if len(rates) >= 2 else None
    cv = statistics.pstdev(rates) / statistics.fmean(rates) if len(rates) >= 2 else None
    return {"rows": len(s), "shards": len(files), "total_mb": round(sum(sizes) / 2**20, 1),
            "shard_mb_median": round(statistics.median(sizes) / 2**20, 2) if sizes else 0,
            "bytes_per_row": round(sum(sizes) / max(1, len(s)), 1),
            "rows_per_s_median": round(statistics.median(rates), 1) if rates else None,
            "throughput_last_over_first_tenth": round(stability, 3) if stability else None,
            "throughput_cv": round(cv, 3) if cv is not None else None}


def scale(sizes: list[int], stages: list[str], min_size: int, max_size: int, work: Path, device: str,
          keep: bool, overrides: list[str] | None = None) -> dict[str, Any]:
    grounding = [sys.executable, "-m", "grounding.cli"]
    weights = _random_weights(work / "weights")
    sets = [x for o in overrides or [] for x in ("--set", o)]
    from grounding.runtime import resolve_device

    res: dict[str, Any] = {"sizes": sizes, "image_side_px": [min_size, max_size],
                           "device": resolve_device(device).type,
                           "overrides": overrides or [], "torch_threads": torch.get_num_threads(),
                           "weights": "random tiny (grounding-tiny-clip, yolov3 x0.33/x0.125)", "runs": {}}
    try:
        for n in sizes:
            pf = _params_file(work, n, min_size, max_size, weights, device)
            print(f"== {n} images: prepare", flush=True)
            run = {"prepare": run_measured([*grounding, "run", "prepare", "--params", str(pf)])}
            ds_dir = work / "prepared" / f"scale{n}"
            run["prepare"]["dataset_json_mb"] = round((ds_dir / "dataset.json").stat().st_size / 2**20, 1)
            run["prepare"]["images_mb"] = round(sum(p.stat().st_size for p in (ds_dir / "images").iterdir()) / 2**20)
            for stage in stages:
                print(f"== {n} images: {stage}", flush=True)
                r = run_measured([*grounding, "run", stage, "--no-deps", "--params", str(pf), *sets])
                r.update(shard_stats(work / "teachers" / stage / f"scale{n}"))
                r["images_per_s"] = round(n / r["seconds"], 1)
                run[stage] = r
                print(f"   {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB, {r['shards']} shards, "
                      f"{r['images_per_s']:.1f} img/s, last/first tenth {r['throughput_last_over_first_tenth']}",
                      flush=True)
            res["runs"][str(n)] = run
            if not keep:
                shutil.rmtree(ds_dir / "images", ignore_errors=True)
        lo, hi = str(min(sizes)), str(max(sizes))
        res["peak_rss_ratio"] = {s: round(res["runs"][hi][s]["peak_rss_mb"] / res["runs"][lo][s]["peak_rss_mb"], 3)
                                 for s in stages}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    res.update(machine=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--stages", nargs="+", default=["clip-image", "yolo-anchors"])
    ap.add_argument("--min-size", type=int, default=128)
    ap.add_argument("--max-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", type=Path, default=HERE / "out" / "scale")
    ap.add_argument("--keep", action="store_true", help="keep the datasets and shard sets")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="params override for the stage runs, e.g. teachers.yolo.input_size=224")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "scale.json")
    a = ap.parse_args()
    r = scale(sorted(a.sizes), a.stages, a.min_size, a.max_size, a.workdir, a.device, a.keep, a.overrides)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=1) + "\n")
    print(f"{'images':>8} {'stage':<13} {'peak RSS MB':>11} {'s':>7} {'img/s':>7} {'last/first':>10} {'cv':>6} "
          f"{'shards':>6} {'MB':>7} {'B/row':>7}")
    for n, run in r["runs"].items():
        for s in a.stages:
            x = run[s]
            print(f"{n:>8} {s:<13} {x['peak_rss_mb']:>11.0f} {x['seconds']:>7.0f} {x['images_per_s']:>7.1f} "
                  f"{str(x['throughput_last_over_first_tenth']):>10} {str(x['throughput_cv']):>6} {x['shards']:>6} "
                  f"{x['total_mb']:>7.1f} {x['bytes_per_row']:>7.0f}")
    print("peak RSS ratio largest/smallest:", r["peak_rss_ratio"])


if __name__ == "__main__":
    main()
