"""Single-file artefacts (model weights, metrics) written atomically with a provenance sidecar.

``write_artefact(path, key, build, provenance)`` calls ``build(tmp_path)``, renames the file into place and
then writes ``<path>.json`` (the stage's key, the file's sha256 and the provenance): a crash never leaves a
sidecar beside a file it does not describe. Whether the artefact needs building at all is decided once, by
the stage engine (:mod:`grounding.stages`); this module only writes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from grounding.shards.keys import file_sha256
from grounding.shards.manifest import atomic_write_bytes

log = logging.getLogger(__name__)


def sidecar(path: Path) -> Path:
    """The provenance file beside ``path``."""
    return path.with_name(path.name + ".json")


def write_artefact(path: str | os.PathLike[str], key: str, build: Callable[[Path], None],
                   provenance: Mapping[str, Any] | None = None) -> Path:
    """Build ``path`` through ``build(tmp)`` and commit it with a sidecar recording ``key`` and its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side = sidecar(path)
    if side.exists():
        side.unlink()  # un-commit the old artefact before replacing it
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        build(tmp)
        if not tmp.is_file():
            raise RuntimeError(f"build for {path} did not write its output")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"key": key, "sha256": file_sha256(path), "provenance": dict(provenance or {})}
    atomic_write_bytes(side, (json.dumps(meta, sort_keys=True, indent=1) + "\n").encode("utf-8"))
    return path


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of an artefact (key, sha256, provenance); ``{}`` when absent."""
    side = sidecar(Path(path))
    return json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
