"""Data-parallel training (issue 25): the per-rank batch slices, global-batch BatchNorm, precision settings,
and 2-process gloo runs of ``student-rec-pseudo``, ``refclip-train``, ``student-nce-distill`` and
``student-bicm`` against 1-process runs with the same global batch.

Why the 2-process runs match (and within what): every rank draws the same global batches (same seed and
generator calls) and trains on its slice; DDP *averages* the ranks' gradients, and the loss of each rank
is weighted (``world * n_local / n_global``, :func:`grounding.distributed.local_weight`) so that the
average is the gradient of the global batch mean; RefCLIP's contrastive loss and NCE+Distill's losses are
taken on the gathered embeddings of the whole batch (their negatives are the global batch's); BatchNorm statistics are the global
batch's (:class:`grounding.distributed.GlobalBatchNorm`: gloo has no SyncBatchNorm); dropout is 0 here
(torch's dropout masks are drawn per rank, not per sample). What is left is float reduction order (sums
split across ranks, E[x²]-E[x]² for the BN variance), so the test allows ``ATOL`` on weights and ``RTOL``
on the curves' losses, and asserts that the metrics are equal.
"""

from __future__ import annotations

import builtins
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from grounding import config, stages
from grounding import distributed as D
from grounding import runtime as R
from grounding.data.schema import CanonicalDataset
from grounding.shards import ShardSet
from grounding.students import bicm as B
from grounding.students import common as C

sys.path.insert(0, str(Path(__file__).parent))
from test_refclip import MS_SETS, _darknet_anchors  # noqa: E402
from test_students_rec import _params as _student_params  # noqa: E402
from test_students_rec import _stand_in_teachers  # noqa: E402
from test_students_weak import make_params as _weak_params  # noqa: E402
from test_students_weak import write_teachers as _weak_teachers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATOL = 2e-4  # weights after training, 2 processes vs 1 (float summation order only)
#: RefCLIP biases whose exact gradient is 0 (a bias added to every anchor, or to every attention logit,
#: shifts all logits of a softmax alike): their gradient is rounding noise, which Adam scales up to steps
#: of about lr, so they differ by ~lr between any two summation orders; every other weight agrees to ~1e-7
SOFTMAX_SHIFT_BIASES = ("linear_vs.bias", "lang_encoder.att_flat.mlp.linear.bias")
#: BiCM's KAM MLP: the biases of the Linear layers before its BatchNorms (BatchNorm subtracts the batch mean,
#: so their exact gradient is 0 and Adam turns rounding noise into steps, as SOFTMAX_SHIFT_BIASES) and the
#: running means that follow them
KAM_BN_SHIFT = ("net.0.bias", "net.3.bias", "net.1.running_mean", "net.4.running_mean")
RTOL = 1e-4  # per-epoch mean losses
REC_SETS = ["students.rec.epochs=2", "students.rec.batch_images=2", "students.rec.dropout=0",
            "students.rec.random_resize=[32,64]", "students.rec.ema_decay=0.9"]
#: NCE+Distill forks distill / λ = 0 after lambda_step steps (both variants compared); 16 training images,
#: batches of 8 captions (4 a rank); BiCM's KAM batches of 64 candidate rows (32 a rank, global BatchNorm)
WEAK_SETS = ["students.nce_distill.steps=12", "students.nce_distill.lambda_step=4", "students.bicm.kam_epochs=3"]
REFCLIP_SETS = [*MS_SETS, "refclip.epochs=3", "refclip.batch_size=16", "refclip.dropout=0",
                "dataset.synthetic.n_images=24"]


# ---- unit checks ---------------------------------------------------------------------------------------
class _World:
    """Pretend to be rank ``r`` of ``n`` (the helpers read only rank() and world_size())."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, r: int, n: int) -> None:
        monkeypatch.setattr(D, "rank", lambda: r)
        monkeypatch.setattr(D, "world_size", lambda: n)


def test_shard_batch_slices_are_disjoint_cover_the_batch_and_keep_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = [7, 3, 9, 1, 4, 8]
    parts = []
    for r in range(3):
        _World(monkeypatch, r, 3)
        parts.append(D.shard_batch(batch))
    assert parts == [[7, 3], [9, 1], [4, 8]]  # equal counts, contiguous, in the global order
    groups = {7: "a", 3: "a", 9: "b", 1: "c", 4: "c", 8: "d"}
    parts = []
    for r in range(2):
        _World(monkeypatch, r, 2)
        parts.append(D.shard_batch(batch, groups))
    assert parts == [[7, 3, 9], [1, 4, 8]]  # by image: a, b | c, d — no image on two ranks
    assert sorted(i for p in parts for i in p) == sorted(batch)
    assert D.local_weight(3, 6) == 1.0 and D.local_weight(1, 4) == 0.5
    with pytest.raises(ValueError, match="batch_images = 5 is not divisible by the 2 processes"):
        D.check_divisible(5, "batch_images")
    assert D.global_batches_usable([[1, 2, 3], [4]]) == [[1, 2, 3]]  # a rank would get nothing from [4]


def test_single_process_helpers_are_no_ops() -> None:
    assert (D.rank(), D.world_size(), D.is_main()) == (0, 1, True)
    assert D.shard_batch([3, 1, 2]) == [3, 1, 2] and D.from_main("x") == "x" and D.all_reduce_mean(2.5) == 2.5
    m = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(m, torch.device("cpu")) is m and D.global_batchnorm(m, torch.device("cpu")) is m
    assert not D.init_from_env(torch.device("cpu"))  # WORLD_SIZE unset: nothing to initialise


def test_precision_param_key_and_cpu_fallback(caplog: pytest.LogCaptureFixture) -> None:
    assert config.load(None).train.precision == "fp32" and config.load(None).train.key_params() == {}
    assert config.load(None, ["train.precision=bf16"]).train.key_params() == {"precision": "bf16"}
    with pytest.raises(config.ConfigError, match="train.precision"):
        config.load(None, ["train.precision=fp8"])
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING"):
        assert R.effective_precision("fp16", cpu) == "fp32"
    assert "CPU training stays fp32" in caplog.text
    assert isinstance(R.autocast("bf16", cpu), type(R.autocast("fp32", cpu)))  # no autocast on CPU
    assert not R.grad_scaler("fp16", cpu).is_enabled()


# ---- 2 processes vs 1 --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _guard_writes(root: str) -> None:
    """Make any write under ``root`` by this process an error (open for writing, mkdir, rename, HDF5)."""
    import h5py

    def bad(what: str, path: object) -> None:
        if str(os.path.abspath(str(path))).startswith(root):
            raise PermissionError(f"rank {D.rank()} wrote {what} {path}")

    real_open, real_mkdir, real_replace, real_h5 = builtins.open, os.mkdir, os.replace, h5py.File.__init__

    def open_(file, mode="r", *a, **k):  # type: ignore[no-untyped-def]
        if any(c in mode for c in "wax+"):
            bad("open", file)
        return real_open(file, mode, *a, **k)

    def h5(self, name, mode="r", *a, **k):  # type: ignore[no-untyped-def]
        if mode != "r":
            bad("h5py", name)
        return real_h5(self, name, mode, *a, **k)

    builtins.open = open_
    os.mkdir = lambda p, *a, **k: (bad("mkdir", p), real_mkdir(p, *a, **k))[1]
    os.replace = lambda s, d, *a, **k: (bad("replace", d), real_replace(s, d, *a, **k))[1]
    h5py.File.__init__ = h5


def _worker(rank: int, world: int, port: int, stage: str | tuple[str, ...], p: config.Params, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    D.init_from_env(torch.device("cpu"))
    if rank != 0:
        _guard_writes(root)
    try:
        for name in (stage,) if isinstance(stage, str) else stage:
            R.run_on_ranks(name, lambda: stages.run(name, p))
    finally:
        D.shutdown()


def _outputs(base: Path, tag: str) -> list[str]:
    return [f"paths.{k}={base}/{tag}/{k}" for k in ("students", "models", "metrics")]


def _same_weights(a: Path, b: Path, key: str, skip: tuple[str, ...] = (), sub: str | None = None) -> float:
    """Largest ``|w2 - w1|`` over the floating tensors of two checkpoints' ``[key]`` (``[key][sub]`` when
    ``sub`` is given; ``skip``: names left out)."""
    sa, sb = (torch.load(p, weights_only=True)[key] for p in (a, b))
    if sub is not None:
        sa, sb = sa[sub], sb[sub]
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa
               if sa[k].is_floating_point() and k not in skip)


def _close_curves(a: Path, b: Path) -> None:
    ca, cb = json.loads(a.read_text()), json.loads(b.read_text())
    assert len(ca) == len(cb)
    for x, y in zip(ca, cb):
        assert x["epoch"] == y["epoch"] and x["loss"] == pytest.approx(y["loss"], rel=RTOL, abs=1e-6)



def _process_count_in_no_key(stage: str, one: config.Params, two: config.Params, tmp_path: Path) -> None:
    """The process count enters no key: the engine's stage keys are equal, and the two prediction sets' keys
    differ only through the weights' sha256 they record (1 and 2 processes round differently)."""
    assert stages.stage_key(stage, one)[0] == stages.stage_key(stage, two)[0]
    m1, m2 = (ShardSet(tmp_path / t / "students" / stage / one.dataset.name).manifest for t in ("one", "two"))
    assert m1.params == m2.params and m1.inputs == m2.inputs

    def others(teacher: dict) -> dict:
        return {k: v for k, v in teacher.items() if k != "weights_sha256"}

    assert others(m1.teacher) == others(m2.teacher) and m1.teacher["weights_sha256"] != ""

@pytest.mark.slow
def test_rec_pseudo_on_two_processes_matches_one(tmp_path: Path) -> None:
    """student-rec-pseudo, 2 gloo processes (torch.multiprocessing) vs 1, batch_images 2 = 1 image a rank;
    rank 1 may not write anything under the run's directory."""
    base = _student_params(tmp_path, *REC_SETS)
    stages.run("prepare", base)
    ds = CanonicalDataset.load(base.prepared_dir())
    _stand_in_teachers(base, ds)
    train_images = {r.image_id for r in ds.refs if r.split == "train"}
    assert len(train_images) % 2 == 0  # every global batch has 2 images: nothing skipped on 2 processes
    one, two = (_student_params(tmp_path, *REC_SETS, *_outputs(tmp_path, t)) for t in ("one", "two"))
    for p in (one, two):
        Path(p.paths.metrics).mkdir(parents=True)
        (Path(p.paths.metrics) / "refclip.json").write_text((Path(base.paths.metrics) / "refclip.json").read_text())
    stages.run("student-rec-pseudo", one)
    mp.spawn(_worker, args=(2, _free_port(), "student-rec-pseudo", two, str(tmp_path)), nprocs=2, join=True)
    stage = "student-rec-pseudo"
    m1, m2 = (json.loads((tmp_path / t / "metrics" / f"{stage}.json").read_text()) for t in ("one", "two"))
    assert m1["acc50"] == m2["acc50"] and m1["acc50_raw"] == m2["acc50_raw"]
    _close_curves(*(tmp_path / t / "metrics" / f"{stage}-curve.json" for t in ("one", "two")))
    for key in ("state_dict", "raw_state_dict"):
        diff = _same_weights(C.model_path(one, stage), C.model_path(two, stage), key)
        print(f"{stage} {key}: max |w2 - w1| = {diff:.2e}")
        assert diff < ATOL
    _process_count_in_no_key(stage, one, two, tmp_path)


@pytest.mark.slow
def test_refclip_train_via_grounding_run_nproc_2_matches_one(tmp_path: Path) -> None:
    """refclip-train (multiscale: the fusion's BatchNorms are global-batch) launched by `grounding run
    --nproc 2` (torchrun, gloo) vs 1 process; same key, same checkpoint within ATOL, same curve."""
    common = ["progress=false", f"paths.prepared={tmp_path}/prepared", f"paths.teachers={tmp_path}/teachers",
              *REFCLIP_SETS]
    one = config.load(None, [*common, *_outputs(tmp_path, "one")])
    stages.run("prepare", one)
    _darknet_anchors(one, CanonicalDataset.load(one.prepared_dir()))
    stages.run("refclip-train", one)
    sets = [a for s in [*common, *_outputs(tmp_path, "two")] for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "grounding.cli", "run", "refclip-train", "--no-deps", "--nproc", "2",
                           *sets], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[:4000]
    assert "torch.distributed.run --standalone --nproc_per_node=2" in proc.stderr
    assert proc.stdout.count("refclip-train") == 1  # rank 0 alone prints
    m1, m2 = (tmp_path / t / "models" / "refclip" / f"{one.dataset.name}.pt" for t in ("one", "two"))
    diff = _same_weights(m1, m2, "state_dict", SOFTMAX_SHIFT_BIASES)
    print(f"refclip-train: max |w2 - w1| = {diff:.2e} (softmax-shift biases left out)")
    assert diff < ATOL
    k1, k2 = (json.loads(Path(str(m) + ".json").read_text())["key"] for m in (m1, m2))
    assert k1 == k2
    _close_curves(*(tmp_path / t / "metrics" / "refclip-train-curve.json" for t in ("one", "two")))
    assert not list((tmp_path / "two").rglob("*.tmp-*"))
    assert np.isfinite(json.loads((tmp_path / "two" / "metrics" / "refclip-train-curve.json").read_text())[-1]["loss"])


def _kam_rows(p: config.Params) -> torch.Tensor:
    """The KAM MLP's input rows of every sentence's candidates (what student-bicm scores with it)."""
    ds = CanonicalDataset.load(p.prepared_dir())
    inp = B.load_inputs(p, ds, ds.refs)
    cands = B.score_all(inp, ds, ds.refs)
    return torch.from_numpy(np.concatenate([B.kam_features(inp.image_emb[r.image_id], inp.crops[r.image_id], inp.class_emb,
                                                           inp.text_emb[r.ref_id], cands[r.ref_id]) for r in ds.refs]))


def _kam_weights_differ(a: Path, b: Path, x: torch.Tensor) -> float:
    """Largest ``|w2 - w1|`` of two KAM checkpoints outside the directions the training loss cannot see
    (:data:`KAM_BN_SHIFT`, and the first layer's weights on input columns constant over ``x``: each acts as
    one more bias before a BatchNorm)."""
    sa, sb = (torch.load(p, weights_only=True)["state"] for p in (a, b))
    varying = x.std(dim=0) > 0
    sa["net.0.weight"], sb["net.0.weight"] = sa["net.0.weight"][:, varying], sb["net.0.weight"][:, varying]
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa
               if sa[k].is_floating_point() and k not in KAM_BN_SHIFT)


@pytest.mark.slow
def test_nce_distill_and_bicm_on_two_processes_match_one(tmp_path: Path) -> None:
    """student-nce-distill (in-batch negatives over the gathered global batch) and student-bicm (KAM MLP,
    global BatchNorm), 2 gloo processes vs 1 with the same global batches; rank 1 writes nothing."""
    base = _weak_params(tmp_path / "base", *WEAK_SETS)
    stages.run("prepare", base)
    _weak_teachers(base)
    weak = ("student-nce-distill", "student-bicm")
    one, two = (_weak_params(tmp_path / "base", *WEAK_SETS, *_outputs(tmp_path, t)) for t in ("one", "two"))
    for stage in weak:
        stages.run(stage, one)
    mp.spawn(_worker, args=(2, _free_port(), weak, two, str(tmp_path)), nprocs=2, join=True)
    for stage in weak:
        m1, m2 = (json.loads((tmp_path / t / "metrics" / f"{stage}.json").read_text()) for t in ("one", "two"))
        for k in ("acc50", "no_distill", "com", "com+qam", "com+qam+kam"):  # the ablation rows too
            assert m1.get(k) == m2.get(k), k
        _close_curves(*(tmp_path / t / "metrics" / f"{stage}-curve.json" for t in ("one", "two")))
        _process_count_in_no_key(stage, one, two, tmp_path)
    paths = {stage: (C.model_path(one, stage), C.model_path(two, stage)) for stage in weak}
    for sub in ("distill", "no_distill"):
        diff = _same_weights(*paths["student-nce-distill"], "states", sub=sub)
        print(f"student-nce-distill {sub}: max |w2 - w1| = {diff:.2e}")
        assert diff < ATOL
    x = _kam_rows(base)
    diff = _kam_weights_differ(*paths["student-bicm"], x)
    scores = []
    for path in paths["student-bicm"]:
        ck = torch.load(path, weights_only=True)
        kam = B.KamMLP(ck["dim"], ck["hidden"])
        kam.load_state_dict(ck["state"])
        with torch.no_grad():
            scores.append(kam.eval()(x))
    print(f"student-bicm KAM: max |w2 - w1| = {diff:.2e} (BatchNorm-shift directions left out), with them "
          f"{_same_weights(*paths['student-bicm'], 'state'):.2e}; KAM scores max |s2 - s1| = "
          f"{float((scores[1] - scores[0]).abs().max()):.2e}")
    assert diff < ATOL
