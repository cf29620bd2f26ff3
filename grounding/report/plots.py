"""The report's plots as PNG files (matplotlib, Agg backend: no display, no fonts fetched)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")
    _pyplot().close(fig)
    return out


def histograms(values: Mapping[str, np.ndarray], title: str, out: Path, bins: int = 30) -> Path | None:
    """One histogram per field (``{name: 1-D values}``) side by side; ``None`` when there is nothing."""
    values = {k: v for k, v in values.items() if len(v)}
    if not values:
        return None
    plt = _pyplot()
    n = len(values)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.6), squeeze=False)
    for ax, (name, v) in zip(axes[0], values.items()):
        ax.hist(v, bins=bins, color="#3a7bd5")
        ax.set_title(f"{name} (n={len(v):,})", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def accuracy_bars(acc: Mapping[str, Mapping[str, float]], out: Path) -> Path | None:
    """Grouped bars of Acc@0.5 (``{student: {split: accuracy in [0, 1]}}``), one group per student."""
    if not acc:
        return None
    plt = _pyplot()
    splits = sorted({s for v in acc.values() for s in v})
    names = list(acc)
    x = np.arange(len(names))
    w = 0.8 / max(len(splits), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 1.5), 3.0))
    for i, split in enumerate(splits):
        ax.bar(x + i * w, [100 * acc[n].get(split, np.nan) for n in names], w, label=split)
    ax.set_xticks(x + w * (len(splits) - 1) / 2, names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("Acc@0.5 (%)")
    ax.legend(fontsize=7)
    return _save(fig, out)


def curve_plot(series: Mapping[str, list[dict[str, float]]], title: str, out: Path, max_panels: int = 4) -> Path | None:
    """Training curves: one panel per numeric column (``loss`` first, at most ``max_panels``), one line per
    series, x = ``epoch`` (or ``step``, else the row index)."""
    if not series:
        return None
    cols: list[str] = []
    for rows in series.values():
        for r in rows:
            for k, v in r.items():
                if k not in ("epoch", "step", "seed") and isinstance(v, (int, float)) and not isinstance(v, bool) \
                        and k not in cols:
                    cols.append(k)
    cols = sorted(cols, key=lambda c: (c != "loss", c))[:max_panels]
    if not cols:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 2.6), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for label, rows in series.items():
            xs = [r.get("epoch", r.get("step", i)) for i, r in enumerate(rows) if col in r]
            ys = [r[col] for r in rows if col in r]
            ax.plot(xs, ys, marker=".", label=label or None)
        ax.set_title(col, fontsize=9)
        ax.tick_params(labelsize=7)
        if any(series):
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)
