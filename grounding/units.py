"""Human-readable quantities for tables and reports."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``n`` bytes as ``"512 B"``, ``"1.5 KB"``, ... (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
