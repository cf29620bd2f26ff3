"""Issue 23 item 4: overlapped decode / forward / write in teacher stages (grounding/overlap.py)."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from grounding import overlap
from grounding.overlap import Pinnable, overlapped, prefetch_loader

sys.path.insert(0, str(Path(__file__).parent))
from test_detectors import make_params, random_checkpoint  # noqa: E402


def test_overlapped_keeps_order_and_runs_ahead_of_a_slow_consumer() -> None:
    produced: list[int] = []

    def rows():
        for i in range(50):
            produced.append(i)
            yield i

    got = []
    for i in overlapped(rows(), depth=8):
        if i == 0:
            time.sleep(0.2)  # the producer runs ahead meanwhile, at most depth items (+ the one it holds)
            assert 8 <= len(produced) <= 10
        got.append(i)
    assert got == list(range(50))
    assert list(overlapped(iter(range(5)), depth=0)) == list(range(5))  # depth 0: in the caller's thread


def test_producer_errors_reach_the_consumer_after_the_rows_before_them() -> None:
    def rows():
        yield 1
        yield 2
        raise RuntimeError("forward failed")

    got = []
    with pytest.raises(RuntimeError, match="forward failed"):
        for r in overlapped(rows(), depth=4):
            got.append(r)
    assert got == [1, 2]


def test_a_consumer_that_stops_stops_and_closes_the_producer() -> None:
    closed = threading.Event()

    def rows():
        try:
            for i in range(10**9):
                yield i
        finally:
            closed.set()

    before = threading.active_count()
    with pytest.raises(ValueError):
        for r in overlapped(rows(), depth=4):
            if r == 3:
                raise ValueError("writer failed")
    assert closed.wait(5) and threading.active_count() == before


@dataclass(frozen=True)
class _Item(Pinnable):
    index: int
    tensor: torch.Tensor | None


def test_loader_keeps_dataset_order_with_workers_and_pins_only_on_cuda() -> None:
    data = [_Item(i, torch.full((2,), float(i))) for i in range(9)]
    dl = prefetch_loader(data, batch_size=2, num_workers=2, device="cpu", collate_fn=list)  # type: ignore[arg-type]
    assert not dl.pin_memory and dl.prefetch_factor == 4
    assert [it.index for b in dl for it in b] == list(range(9))
    assert _Item(0, None).pin_memory() == _Item(0, None)  # nothing to pin: itself
    if torch.cuda.is_available():
        assert prefetch_loader(data, batch_size=2, num_workers=0, device="cuda", collate_fn=list).pin_memory
        assert data[1].pin_memory().tensor.is_pinned()


@pytest.mark.parametrize("teacher", ["frcnn", "fcos"])
def test_stage_bytes_are_identical_with_and_without_the_overlap(tmp_path: Path, teacher: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from grounding import stages
    from grounding.teachers.detectors.stage import run_detector_stage

    base = make_params(tmp_path)
    stages.run("prepare", base)
    w = str(random_checkpoint(tmp_path / "w" / f"{teacher}.pt", teacher, base))
    with_workers = make_params(tmp_path, **{teacher: {"weights": w, "num_workers": 2}})
    in_process = make_params(tmp_path, **{teacher: {"weights": w, "num_workers": 0}})
    a = run_detector_stage(with_workers, teacher, out_dir=tmp_path / "overlapped")
    monkeypatch.setattr(overlap, "DEPTH", 0)  # sequential: decode, forward, write one after the other
    b = run_detector_stage(in_process, teacher, out_dir=tmp_path / "sequential")
    files = sorted(p.name for p in a.iterdir() if p.is_file())
    assert files == sorted(p.name for p in b.iterdir() if p.is_file()) and "manifest.json" in files
    for name in files:
        if name != "manifest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # the manifests differ only where they name the output directory / the params that differ
    import json

    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    assert ma["stage_key"] == mb["stage_key"] and ma["shards"] == mb["shards"]
