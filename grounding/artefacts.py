"""Keyed single-file artefacts (model weights, metrics): built once per key, with a provenance sidecar.

``build_once(path, key, build, provenance)`` calls ``build(tmp_path)`` only when ``path`` does not already
hold the output of the same key (checked through ``<path>.json``: key and sha256 of the file). The file is
written under a temporary name and renamed, then the sidecar is written: a crash never leaves a file
that passes the check.
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


def is_current(path: str | os.PathLike[str], key: str) -> bool:
    """True when ``path`` exists with a sidecar of this ``key`` whose sha256 matches the file."""
    path = Path(path)
    side = sidecar(path)
    if not path.is_file() or not side.is_file():
        return False
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return meta.get("key") == key and meta.get("sha256") == file_sha256(path)


def build_once(path: str | os.PathLike[str], key: str, build: Callable[[Path], None],
               provenance: Mapping[str, Any] | None = None) -> Path:
    """Make ``path`` the output of ``key``: reuse it when current, else ``build(tmp)`` and commit."""
    path = Path(path)
    if is_current(path, key):
        log.info("%s: up to date (key %s)", path, key[:12])
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    side = sidecar(path)
    if side.exists():
        side.unlink()  # un-commit the old artefact before replacing it
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    build(tmp)
    if not tmp.is_file():
        raise RuntimeError(f"build for {path} did not write its output")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    meta = {"key": key, "sha256": file_sha256(path), "provenance": dict(provenance or {})}
    atomic_write_bytes(side, (json.dumps(meta, sort_keys=True, indent=1) + "\n").encode("utf-8"))
    return path


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of an artefact (key, sha256, provenance); ``{}`` when absent."""
    side = sidecar(Path(path))
    return json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
