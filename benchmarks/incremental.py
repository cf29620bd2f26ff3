"""Incremental extension: work of rerunning a teacher stage after the dataset grew by ``--extra`` (10%)
against a from-scratch run of the grown dataset, measured side by side in one run. Goal: rows ratio and
seconds ratio <= 0.15, and the merged set equal to the scratch set file by file.

    python benchmarks/incremental.py [--stages clip-image clip-text] [--images 200] [--extra 0.1]
        [--rows-per-shard 16] [--batch-size 16] [--model grounding-tiny-clip]

Synthetic dataset (deterministic per image: growing ``n_images`` appends images whose ids sort last), a
fixed CLIP teacher (random weights of ``--model`` saved to a local file, so the teacher does not change
with the dataset; a bootstrapped teacher would be retrained on the grown dataset and change every row).
Per stage: run on ``--images`` images, grow the dataset in place, rerun (timed: "extension"), then run the
grown dataset in a second directory (timed: "full"); rows = rows the stage computed (handed to the
writer); seconds = the whole stage call (dataset load, keys, teacher build, reuse checks, compute, writes);
compute = seconds spent inside the stage's row generator (decoding + teacher forward, incl. the lazy model
build). Writes ``benchmarks/out/incremental.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _params(root: Path, n_images: int, rows_per_shard: int, clip: dict[str, Any]) -> Any:
    from grounding import config as C

    return C.from_dict({
        "device": "cpu", "progress": False, "seed": 0,
        "dataset": {"synthetic": {"n_images": n_images}},
        "shards": {"rows_per_shard": rows_per_shard},
        "paths": {k: str(root / k) for k in ("prepared", "teachers", "students", "metrics", "models")},
        "teachers": {"clip": clip},
    })


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def incremental(stages_: list[str], n_images: int = 200, extra: float = 0.1, rows_per_shard: int = 16,
                batch_size: int = 16, model: str = "grounding-tiny-clip",
                workdir: Path | None = None) -> dict[str, Any]:
    """Measure rows and seconds of the extension and of the full run per stage; returns the figures."""
    from grounding import config as C
    from grounding import stage_writer, stages
    from grounding.shards import ShardWriter, verify_shard_set
    from grounding.teachers import clip as T
    from grounding.teachers.clip_bootstrap import state_dict_bytes

    work = Path(workdir or tempfile.mkdtemp(prefix="incremental_"))
    n1 = n_images + round(n_images * extra)
    computed: list[str] = []
    compute = [0.0]
    add, write_stage = ShardWriter.add, stage_writer.write_stage

    def counting_add(w: ShardWriter, key: str, row: Any) -> None:
        computed.append(key)
        add(w, key, row)

    def timed_write_stage(*args: Any, rows: Any, **kw: Any) -> Any:
        def timed(todo: list[str]) -> Any:
            it = iter(rows(todo))
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    compute[0] += time.perf_counter() - t0
                yield item

        return write_stage(*args, rows=timed, **kw)

    ShardWriter.add = counting_add  # type: ignore[method-assign]
    stage_writer.write_stage = timed_write_stage  # stage modules import it at call time
    try:
        torch.manual_seed(0)
        weights = work / "clip-random.pt"
        weights.write_bytes(state_dict_bytes(T.create_model(T.model_spec(C.ClipParams(model=model)))))
        clip = {"model": model, "pretrained": str(weights), "batch_size": batch_size, "num_workers": 1}
        a, b = work / "a", work / "b"
        old, grown, scratch = (_params(a, n_images, rows_per_shard, clip), _params(a, n1, rows_per_shard, clip),
                               _params(b, n1, rows_per_shard, clip))
        stages.run("prepare", old)
        for s in stages_:
            stages.run(s, old)
        stages.run("prepare", grown)
        stages.run("prepare", scratch)
        results: dict[str, Any] = {}
        for s in stages_:
            computed.clear()
            compute[0] = 0.0
            t0 = time.perf_counter()
            stages.run(s, grown)
            t_ext, rows_ext, c_ext = time.perf_counter() - t0, len(computed), compute[0]
            computed.clear()
            compute[0] = 0.0
            t0 = time.perf_counter()
            stages.run(s, scratch)
            t_full, rows_full, c_full = time.perf_counter() - t0, len(computed), compute[0]
            same = _digests(grown.teacher_dir(s)) == _digests(scratch.teacher_dir(s))
            results[s] = {
                "rows_extension": rows_ext, "rows_full": rows_full, "rows_ratio": round(rows_ext / rows_full, 4),
                "seconds_extension": round(t_ext, 3), "seconds_full": round(t_full, 3),
                "seconds_ratio": round(t_ext / t_full, 4), "compute_extension": round(c_ext, 3),
                "compute_full": round(c_full, 3), "compute_ratio": round(c_ext / c_full, 4), "byte_identical": same,
                "verifies": verify_shard_set(grown.teacher_dir(s)).ok,
            }
    finally:
        ShardWriter.add = add  # type: ignore[method-assign]
        stage_writer.write_stage = write_stage
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return {"images": n_images, "images_grown": n1, "rows_per_shard": rows_per_shard, "batch_size": batch_size,
            "model": model, "stages": results, "torch_threads": torch.get_num_threads(),
            "machine": platform.platform(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=["clip-image", "clip-text"])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--extra", type=float, default=0.1)
    ap.add_argument("--rows-per-shard", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default="grounding-tiny-clip")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "incremental.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    r = incremental(a.stages, a.images, a.extra, a.rows_per_shard, a.batch_size, a.model)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=1) + "\n")
    print(f"{r['images']} -> {r['images_grown']} images, rows_per_shard {r['rows_per_shard']}, model {r['model']}")
    print(f"{'stage':<12} {'rows ext/full':>14} {'ratio':>6} {'s ext/full':>14} {'ratio':>6} "
          f"{'compute ext/full':>16} {'ratio':>6}  identical verifies")
    for s, x in r["stages"].items():
        print(f"{s:<12} {x['rows_extension']:>6}/{x['rows_full']:<7} {x['rows_ratio']:>6.3f} "
              f"{x['seconds_extension']:>6.2f}/{x['seconds_full']:<7.2f} {x['seconds_ratio']:>6.3f} "
              f"{x['compute_extension']:>7.2f}/{x['compute_full']:<8.2f} {x['compute_ratio']:>6.3f}  "
              f"{x['byte_identical']!s:<9} {x['verifies']}")


if __name__ == "__main__":
    main()
