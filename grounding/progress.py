"""One progress bar for every long loop (teachers' rows, bootstraps' and students' training): rows done of
the total, rows/s and ETA on stderr; a silent stand-in when progress is off (``progress: false``)."""

from __future__ import annotations

from typing import Any


class _Silent:
    """The bar's interface doing nothing (progress off)."""

    total: int | None = None
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **_: Any) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, *, unit: str = "row", enabled: bool = True) -> Any:
    """A tqdm bar counting ``unit``s toward ``total`` (``None``: unknown yet; set ``bar.total`` later and
    ``bar.refresh()``), showing rate and ETA: ``desc: 40%|####  | 960/2400 row [00:12<00:18, 80.0 row/s, loss=..]``.
    Use as a context manager or call ``close()``."""
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True, smoothing=0.1)
