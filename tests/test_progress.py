"""Progress bars of the training loops: rows done of the whole run's total, rows/s and ETA; silent when off."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from grounding.progress import progress_bar
from grounding.students.common import fit


def test_progress_bar_rate_eta_and_silent(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(40, "job", unit="row") as bar:
        for _ in range(4):
            bar.update(10)
    err = capsys.readouterr().err
    assert "job" in err and "40/40" in err and "row/s" in err and re.search(r"\[\d\d:\d\d<\d\d:\d\d", err)
    with progress_bar(40, "quiet", enabled=False) as bar:
        bar.update(40)
        bar.set_postfix(loss=1.0)
    assert capsys.readouterr().err == "" and bar.n == 40


def test_student_fit_counts_rows_over_all_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Linear(2, 1)
    tp = SimpleNamespace(lr=1e-2, lr_backbone=1e-3, weight_decay=0.0, lr_drop=[], lr_gamma=0.1, epochs=3,
                         input_size=32, random_resize=[])
    x = torch.randn(7, 2)

    def loss_fn(m: torch.nn.Module, batch: np.ndarray, size: int) -> tuple[torch.Tensor, dict[str, float]]:
        return m(x[torch.from_numpy(batch)]).pow(2).mean(), {}

    batches = lambda g: [np.arange(0, 4), np.arange(4, 7)]  # noqa: E731 - 7 sentences per epoch
    curve = fit(model, batches, loss_fn, tp, generator=torch.Generator(), progress=True, desc="toy-student")
    err = capsys.readouterr().err
    assert len(curve) == 3
    assert "toy-student" in err and "21/21" in err and "row/s" in err and "epoch=3" in err
    fit(model, batches, loss_fn, tp, generator=torch.Generator(), progress=False)
    assert capsys.readouterr().err == ""


def test_bicm_kam_bar(capsys: pytest.CaptureFixture[str]) -> None:
    from grounding.students.bicm import train_kam

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 8)).astype(np.float32), rng.integers(0, 2, 10)
    bp = SimpleNamespace(kam_hidden=4, kam_lr=1e-2, kam_epochs=2, kam_batch_size=4)
    _, curve, _ = train_kam(x, y, bp, seed=0, progress=True)
    err = capsys.readouterr().err
    assert len(curve) == 2 and "KAM" in err and "20/20" in err and "row/s" in err
