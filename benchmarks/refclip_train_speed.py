"""RefCLIP training speed: training steps on the cached ``yolo-anchors`` shard set against the same steps
running the frozen YOLOv3 online (decode + letterbox + forward + top keep_ratio cells per batch, as a
pipeline without the cache would do every epoch), measured side by side in one run, same model init, same
batches, same recipe (``refclip.features``: multiscale reads the three maps, p5-cells the kept features).
The point of caching the anchors.

    python benchmarks/refclip_train_speed.py [--steps 20] [--online-steps 3] [--set key=value ...]

Needs the ``yolo-anchors`` stage output and the YOLO weights it was made with (``grounding run
yolo-anchors``). Prints which device it used; writes ``benchmarks/out/refclip_train_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from grounding import config as C
from grounding.data.images import load_rgb
from grounding.data.schema import CanonicalDataset
from grounding.refclip.model import build_model
from grounding.refclip.recipe import make_optimizer
from grounding.refclip.text import build_vocab, encode
from grounding.refclip.train import _loss, batches, load_anchor_table, model_config, train_sentences
from grounding.runtime import resolve_device, seed_everything
from grounding.shards import ShardSet
from grounding import stages
from grounding.teachers.detectors.stage import build_detector


def _step(model, opt, sched, visual, mask: torch.Tensor, ids: torch.Tensor, same: torch.Tensor,
          rp: C.RefclipParams) -> float:
    loss = _loss(model(visual, ids), mask, same, rp)
    opt.zero_grad()
    loss.backward()
    if rp.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), rp.grad_clip)
    opt.step()
    sched.step()
    return loss.detach().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], help="params override")
    ap.add_argument("--steps", type=int, default=20, help="cached training steps timed")
    ap.add_argument("--online-steps", type=int, default=3, help="online (YOLO every step) training steps timed")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/refclip_train_speed.json"))
    a = ap.parse_args()
    params = C.load(a.params, ["progress=false", *a.set])
    rp, device = params.refclip, resolve_device(params.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device: {device}, features: {rp.features}")
    ds = CanonicalDataset.load(params.prepared_dir())
    anchors = ShardSet(params.teacher_dir(rp.anchors_from))
    sents = [s for s in train_sentences(ds) if s[1] in anchors]
    images = sorted({s[1] for s in sents})
    t0 = time.perf_counter()
    table = load_anchor_table(anchors, images, rp.features)
    load_s = time.perf_counter() - t0
    row = table.row
    rows = torch.tensor([row[s[1]] for s in sents])
    vocab = build_vocab(r.text for r in ds.refs)
    ids, _ = encode([s[2] for s in sents], vocab, rp.max_len)
    gen = seed_everything(params.seed)
    cfg = model_config(table, anchors, vocab, rp)
    init = build_model(cfg).state_dict()
    plan = batches(len(sents), rp.batch_size, gen)
    steps_per_epoch = len(plan)
    plan = (plan * (1 + max(a.steps, a.online_steps) // max(len(plan), 1)))

    def fresh():
        m = build_model(cfg)
        m.load_state_dict(init)
        m.to(device).train()
        return (m, *make_optimizer(m, rp, steps_per_epoch))

    # cached: the visual input read from the anchor shard set each step (what refclip-train does; multiscale
    # maps memory-mapped per batch unless they fit in memory, as refclip-train preloads them)
    preloaded = table.preload()
    model, opt, sched = fresh()
    mask = table.mask.to(device)
    r0 = rows[plan[0]]
    _step(model, opt, sched, table.visual(r0, device), mask[r0], ids[plan[0]].to(device), r0[:, None] == r0[None, :],
          rp)  # warm-up
    sync()
    t0 = time.perf_counter()
    for b in plan[1:1 + a.steps]:
        r = rows[b]
        _step(model, opt, sched, table.visual(r, device), mask[r], ids[b].to(device), r[:, None] == r[None, :], rp)
    sync()
    cached_s = (time.perf_counter() - t0) / a.steps

    # online: decode + letterbox + frozen detector forward for the batch's images every step
    det = build_detector("yolo", params, stages.run("bootstrap-yolo", params).path, device=device)
    letterbox = det.letterbox_fn()
    by_id = {im.image_id: im for im in ds.images}
    model, opt, sched = fresh()

    def online_batch(b: torch.Tensor):
        ims = sorted({sents[i][1] for i in b.tolist()})
        canv = torch.stack([letterbox(load_rgb(ds.image_root, by_id[i]))[0] for i in ims]).to(device)
        with torch.inference_mode():
            raw = det.forward(canv)
        local = {iid: j for j, iid in enumerate(ims)}
        r = torch.tensor([local[sents[i][1]] for i in b.tolist()])
        valid = mask[torch.tensor([row[i] for i in ims])]  # degenerate-anchor mask (boxes as cached)
        if rp.features == "multiscale":
            vis = tuple(torch.stack([x[k] for x in raw]).float().clone() for k in ("map_s8", "map_s16", "map_s32"))
            vis = (*vis, torch.stack([x["kept_cells"] for x in raw]).long())
        else:
            k = max(len(x["features"]) for x in raw)
            vis = torch.zeros(len(ims), k, table.features.shape[-1], device=device)
            for j, x in enumerate(raw):
                vis[j, : len(x["features"])] = x["features"].float()
            valid = valid[:, :k]
        return vis[r] if not isinstance(vis, tuple) else (*[v[r] for v in vis],), valid[r], r

    vis, m, r = online_batch(plan[0])  # warm-up
    _step(model, opt, sched, vis, m, ids[plan[0]].to(device), r[:, None] == r[None, :], rp)
    sync()
    t0 = time.perf_counter()
    for b in plan[1:1 + a.online_steps]:
        vis, m, r = online_batch(b)
        _step(model, opt, sched, vis, m, ids[b].to(device), r[:, None] == r[None, :], rp)
    sync()
    online_s = (time.perf_counter() - t0) / a.online_steps

    res = {
        "device": str(device), "features": rp.features, "maps_preloaded": preloaded, "sentences": len(sents), "images": len(images), "batch_size": rp.batch_size,
        "steps_per_epoch": steps_per_epoch, "anchor_table_load_s": round(load_s, 3),
        "cached_s_per_step": round(cached_s, 4), "online_s_per_step": round(online_s, 4),
        "cached_epochs_per_s": round(1 / (cached_s * steps_per_epoch), 3),
        "online_epochs_per_s": round(1 / (online_s * steps_per_epoch), 4),
        "speedup_cached_over_online": round(online_s / cached_s, 1),
        "meta": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                 "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__},
    }
    print(f"| refclip-train | cached {res['cached_s_per_step']:.4f} s/step | online YOLO {res['online_s_per_step']:.4f}"
          f" s/step | cached is {res['speedup_cached_over_online']}x faster |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
