"""Keyed single-file artefacts: built once per key, rebuilt on a new key or a damaged file."""

from __future__ import annotations

from pathlib import Path

from grounding.artefacts import build_once, is_current, read_provenance


def test_build_once_reuses_and_rebuilds(tmp_path: Path) -> None:
    calls: list[str] = []

    def build(content: str):
        def _b(tmp: Path) -> None:
            calls.append(content)
            tmp.write_text(content)
        return _b

    out = tmp_path / "m" / "w.pt"
    build_once(out, "k1", build("a"), {"stage": "x"})
    build_once(out, "k1", build("a"))
    assert calls == ["a"] and out.read_text() == "a" and read_provenance(out)["provenance"] == {"stage": "x"}
    build_once(out, "k2", build("b"))
    assert calls == ["a", "b"] and out.read_text() == "b"
    out.write_text("tampered")
    assert not is_current(out, "k2")
    build_once(out, "k2", build("b"))
    assert calls == ["a", "b", "b"] and is_current(out, "k2")
