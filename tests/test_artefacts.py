"""Single-file artefacts: written atomically with a sidecar; a failed build leaves nothing committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from grounding.artefacts import read_provenance, sidecar, write_artefact
from grounding.shards.keys import file_sha256


def test_write_artefact_commits_file_then_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "m" / "w.pt"
    write_artefact(out, "k1", lambda tmp: tmp.write_text("a"), {"stage": "x"})
    meta = read_provenance(out)
    assert out.read_text() == "a" and meta["key"] == "k1" and meta["sha256"] == file_sha256(out)
    assert meta["provenance"] == {"stage": "x"}
    write_artefact(out, "k2", lambda tmp: tmp.write_text("b"))  # no currency check here: the engine decides
    assert out.read_text() == "b" and read_provenance(out)["key"] == "k2"
    assert sorted(p.name for p in out.parent.iterdir()) == ["w.pt", "w.pt.json"]


def test_failed_build_uncommits_and_leaves_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "w.pt"
    write_artefact(out, "k1", lambda tmp: tmp.write_text("a"))

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_artefact(out, "k2", broken)
    assert not sidecar(out).exists()  # the old file no longer passes as committed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
    with pytest.raises(RuntimeError, match="did not write"):
        write_artefact(out, "k3", lambda tmp: None)
