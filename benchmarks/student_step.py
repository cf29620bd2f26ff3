"""Seconds per training step of ``student-epmvg``: teacher embeddings read from the cached shard sets vs
the CLIP teacher run online in the same loop (decode + preprocess the batch's images, tokenize, encode),
vs no distillation, on the same batch, in one run (modes interleaved ``--repeats`` times; median).

    python benchmarks/student_step.py [--model grounding-tiny-clip] [--images 24] [--steps 4] [--repeats 3]
        [--set students.epmvg.input_size=128 ...]

Goal: cached <= 1.1x no-teacher; the online / cached ratio is what the cache saves. The student is the
``students.epmvg`` section of params.yaml (plus ``--set`` overrides); the teacher is an open_clip model with
random weights (speed does not depend on what they learnt; ``grounding-tiny-clip`` is the synthetic
default's teacher, ``ViT-B-32`` the paper's scale). Images: the synthetic generator, in a temporary directory.
Writes ``benchmarks/out/student_step.json`` and prints a table. (Only this benchmark imports
grounding.teachers: the library's students never do.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def student_step(model: str = "grounding-tiny-clip", n_images: int = 24, steps: int = 4, repeats: int = 3,
                 overrides: Sequence[str] = (), threads: int = 1, workdir: Path | None = None) -> dict[str, Any]:
    from grounding import config as CFG
    from grounding.data import synthetic
    from grounding.data.images import load_rgb
    from grounding.runtime import seed_everything
    from grounding.shards import FieldSpec, ShardSetSpec, ShardWriter
    from grounding.students import epmvg as E
    from grounding.students.common import image_batches, param_groups
    from grounding.students import rec as R
    from grounding.teachers import clip as T

    torch.set_num_threads(threads)
    work = Path(workdir or tempfile.mkdtemp(prefix="student_step_"))
    try:
        ds = synthetic.generate(synthetic.SyntheticConfig(n_images=n_images, seed=0), work / "prepared" / "synthetic",
                                progress=False)
        ds.save(work / "prepared" / "synthetic")
        params = CFG.load("params.yaml", [*overrides, "progress=false", f"teachers.clip.model={model}",
                                        *(f"paths.{k}={work / k}" for k in ("prepared", "teachers", "students",
                                                                             "metrics", "models"))])
        spec = T.model_spec(params.teachers.clip)
        torch.manual_seed(0)
        net = T.create_model(spec).requires_grad_(False)
        teacher = T.ClipTeacher(spec, T.teacher_identity(spec, "fp32", "random-init-seed-0"), torch.device("cpu"),
                                None, extra={"weights_file": "random"}, prebuilt=net)
        tf = T.transform_of(spec.preprocess)
        images = ds.image_index

        # cache the teacher once (what the clip-image / clip-text stages do), same schema
        fp = ds.fingerprint()

        def write(stage: str, level: str, rows: dict[str, np.ndarray]) -> None:
            fs = (FieldSpec("embedding", "float16", (teacher.embed_dim,)),)
            sp = ShardSetSpec(stage=stage, stage_key=f"bench-{stage}", level=level, fields=fs, rows_per_shard=1024,
                              inputs={"dataset": fp})
            with ShardWriter(params.teacher_dir(stage), sp, sorted(rows), progress=False) as w:
                for k in w.todo():
                    w.add(k, {"embedding": rows[k].astype(np.float16)})

        img_emb = T.encode_images(teacher, torch.stack([tf(load_rgb(ds.image_root, im)) for im in ds.images]))
        write("clip-image", "image", {im.image_id: e.numpy() for im, e in zip(ds.images, img_emb)})
        tok = T.tokenize(teacher.tokenizer, [r.text for r in ds.refs], spec.context_length)
        txt_emb = T.encode_texts(teacher, tok.tokens)
        write("clip-text", "sentence", {r.ref_id: e.numpy() for r, e in zip(ds.refs, txt_emb)})

        ep = params.students.epmvg
        data, _, sets = E.epmvg_data(params, ds)
        clip_dim = teacher.embed_dim
        batch = max(image_batches(data.image_of, ep.batch_images, torch.Generator().manual_seed(0)), key=len)
        for im in set(data.image_of[int(i)] for i in batch):
            data.canvases.get(im)  # decode the student's canvases outside the timing (all modes share them)

        def online(b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            refs = [data.refs[int(i)] for i in b]
            ims = sorted({r.image_id for r in refs})
            pix = torch.stack([tf(load_rgb(ds.image_root, images[i])) for i in ims])
            e_img = T.encode_images(teacher, pix)
            where = {i: k for k, i in enumerate(ims)}
            t = T.tokenize(teacher.tokenizer, [r.text for r in refs], spec.context_length)
            e_txt = T.encode_texts(teacher, t.tokens)
            return e_img[[where[r.image_id] for r in refs]], e_txt

        modes = {"no teacher": None, "cached (shards)": E.cached_teacher(data), "online CLIP": online}
        seed_everything(0)
        student = R.RecStudent(R.RecConfig.from_params(ep)).train()
        opt = torch.optim.AdamW(param_groups(student, ep.lr, ep.lr_backbone, ep.weight_decay))
        losses = {m: E.epmvg_loss(data, ep, fn, clip_dim) for m, fn in modes.items()}

        def step(mode: str) -> None:
            loss, _ = losses[mode](student, batch, ep.input_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for m in modes:  # warm-up
            step(m)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(repeats):
            for m in modes:
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(m)
                times[m].append((time.perf_counter() - t0) / steps)
        med = {m: statistics.median(v) for m, v in times.items()}
        return {
            "teacher_model": model, "student": {k: getattr(ep, k) for k in ("input_size", "depth", "width", "d_model",
                                                                           "fusion_layers", "batch_images")},
            "sentences_per_step": len(batch), "images_per_step": len({data.image_of[int(i)] for i in batch}),
            "steps": steps, "repeats": repeats, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "machine": platform.processor() or platform.machine(),
            "seconds_per_step": {m: round(v, 4) for m, v in med.items()},
            "all_seconds_per_step": {m: [round(x, 4) for x in v] for m, v in times.items()},
            "cached_over_no_teacher": round(med["cached (shards)"] / med["no teacher"], 3),
            "online_over_cached": round(med["online CLIP"] / med["cached (shards)"], 3),
        }
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def table(r: dict[str, Any]) -> str:
    s = r["seconds_per_step"]
    return "\n".join([
        f"| student-epmvg step ({r['sentences_per_step']} sentences, {r['images_per_step']} images; teacher "
        f"{r['teacher_model']}; {r['torch_threads']} thread(s)) | s/step |",
        "|---|---|",
        *(f"| {m} | {v:.4f} |" for m, v in s.items()),
        f"| cached / no teacher (goal <= 1.1) | {r['cached_over_no_teacher']} |",
        f"| online / cached | {r['online_over_cached']} |",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="grounding-tiny-clip", help="open_clip teacher architecture (random weights)")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override key.path=value")
    ap.add_argument("--out", default="benchmarks/out/student_step.json")
    a = ap.parse_args()
    r = student_step(a.model, a.images, a.steps, a.repeats, a.overrides, a.threads)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(r, indent=1) + "\n")
    print(table(r))


if __name__ == "__main__":
    main()
