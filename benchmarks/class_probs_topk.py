"""Top-k class probabilities (issue 23 item 3): bytes per image and error of the rebuilt p(z|x).

Per image 100 regions x 1601 columns (Visual Genome: 1600 classes + background). The probabilities are a
softmax of Gaussian logits at several scales (``sigma``: larger = peakier, as a trained detector; there is
no Visual Genome detector here, so the tail shape is synthetic). For each k: bytes per image of the top-k
fields (float16 values + int32 indices + float32 residual) against dense float16 (what frcnn-proposals
stores) and float32; max |p - p_dense| of the rebuilt p (residual spread evenly) against the float32
softmax, next to the error of the dense float16 field itself; and the max error of the NCE+Distill soft
target ``t ∝ y · p(z|x)`` over the 100 regions (grounding.soft_targets.region_targets) for a phrase label of
3 random classes (often in no region's top k: the worst case) and for one that is a region's top class.

    python benchmarks/class_probs_topk.py [--images 20]
    python benchmarks/class_probs_topk.py --compare DENSE_SET TOPK_SET   # two frcnn-proposals sets
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from grounding import class_probs as cp
from grounding.soft_targets import region_targets

R, C1 = 100, 1601


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def measure(images: int, ks: tuple[int, ...], sigmas: tuple[float, ...], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for sigma in sigmas:
        ps = [softmax(rng.standard_normal((R, C1)) * sigma) for _ in range(images)]
        labels = np.zeros((images, 2, C1 - 1), np.float32)  # phrase 0: 3 random classes; 1: a region's top class
        for i in range(images):
            labels[i, 0, rng.choice(C1 - 1, 3, replace=False)] = 1 / 3
            labels[i, 1, int(ps[i][rng.integers(R), 1:].argmax())] = 1
        t_dense, _ = region_targets(labels, np.stack(ps)[..., 1:])
        f16_err = max(float(np.abs(p.astype(np.float16).astype(np.float32) - p).max()) for p in ps)
        for k in ks:
            encs = [cp.encode_topk(p, k) for p in ps]
            q = np.stack([cp.dense(e, C1) for e in encs])
            t_q, _ = region_targets(labels, q[..., 1:])
            out.append({"sigma": sigma, "k": k, "bytes_topk": sum(a.nbytes for a in encs[0].values()),
                        "bytes_dense_f16": R * C1 * 2, "bytes_dense_f32": R * C1 * 4,
                        "max_abs_err": float(np.abs(q - np.stack(ps)).max()), "max_abs_err_dense_f16": f16_err,
                        "mean_top1_mass": float(np.mean([p.max(1).mean() for p in ps])),
                        "mean_rest": float(np.mean([e[cp.TOPK_REST].mean() for e in encs])),
                        "max_target_err_random_label": float(np.abs(t_q - t_dense)[:, 0].max()),
                        "max_target_err_aligned_label": float(np.abs(t_q - t_dense)[:, 1].max())})
    return out


def table(rows: list[dict]) -> str:
    lines = [f"Top-k class probabilities, {R} regions x {C1} columns per image (synthetic softmax of N(0, sigma^2) "
             f"logits); dense float16 {R * C1 * 2 / 1e3:.1f} KB, float32 {R * C1 * 4 / 1e3:.1f} KB per image", "",
             "| sigma | mean top-1 p | k | KB/image top-k | vs dense f16 | mean residual | max abs(p - p_dense) | "
             "(dense f16 field) | max soft-target error: random label | aligned label |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sigma']:g} | {r['mean_top1_mass']:.3f} | {r['k']} | {r['bytes_topk'] / 1e3:.1f} | "
                     f"{r['bytes_topk'] / r['bytes_dense_f16']:.3f} | {r['mean_rest']:.3f} | {r['max_abs_err']:.2e} | "
                     f"{r['max_abs_err_dense_f16']:.1e} | {r['max_target_err_random_label']:.2e} | "
                     f"{r['max_target_err_aligned_label']:.2e} |")
    return "\n".join(lines)


def compare_sets(dense_dir: Path, topk_dir: Path) -> dict:
    """Two ``frcnn-proposals`` sets of the same images, one ``class_probs: dense``, one ``topk``: class-prob
    bytes per image of each and max |p - p_dense| of the rebuilt probabilities (rows with equal boxes only:
    both sets come from the same weights, so every row should qualify)."""
    from grounding.shards import ShardSet

    d, t = ShardSet(dense_dir), ShardSet(topk_dir)
    n_cols = d.fields[cp.DENSE].shape[0]
    fd, ft = cp.stored_fields(d.fields), cp.stored_fields(t.fields)
    bytes_d = bytes_t = 0
    err, compared = 0.0, 0
    for k in d.keys:
        rd, rt = d.get(k), t.get(k)
        bytes_d += sum(rd[f].nbytes for f in fd)
        bytes_t += sum(rt[f].nbytes for f in ft)
        if rd["boxes"].shape == rt["boxes"].shape and np.array_equal(rd["boxes"], rt["boxes"]):
            err = max(err, float(np.abs(cp.dense(rt, n_cols) - cp.dense(rd, n_cols)).max(initial=0.0)))
            compared += 1
    return {"images": len(d), "columns": n_cols, "k": t.fields[cp.TOPK_VALUES].shape[0],
            "bytes_per_image_dense": bytes_d / len(d), "bytes_per_image_topk": bytes_t / len(d),
            "max_abs_err_vs_dense_field": err, "rows_compared": compared}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("DENSE_SET", "TOPK_SET"),
                    help="instead: two frcnn-proposals shard sets (dense, topk): bytes/image and max |p - p_dense|")
    ap.add_argument("--out", default="benchmarks/out/class_probs_topk.json")
    a = ap.parse_args()
    if a.compare:
        r = compare_sets(*a.compare)
        print(json.dumps(r, indent=1))
        return
    rows = measure(a.images, (8, 32, 128), (2.0, 4.0, 8.0))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
