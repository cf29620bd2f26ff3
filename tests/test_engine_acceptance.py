"""Acceptance of the stage engine (issue 18): on a tiny built DAG, appending a comment to any library module
makes exactly the stages whose derived code set holds it stale, for both `dvc status` and the engine's
status; reverting makes both report every stage current again. One edit per module covers all stages."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.test_orchestration import FAST, copy_project, env_with_venv

pytestmark = pytest.mark.slow

#: The built stages: a shard set, a bootstrap (model file + sidecar), a teacher reading it, a trained model.
BUILT = ("prepare", "gt-boxes", "bootstrap-yolo", "yolo-anchors")


def _dvc_stale(dvc_repo) -> set[str]:
    """The built stages whose deps (code, params, data) DVC finds changed against dvc.lock, in-process
    (DVC's Python API, what `dvc status` reports as "changed deps"; no process start per call)."""
    with dvc_repo.lock:  # what `dvc status` holds while it checks
        return {s.name for s in dvc_repo.index.stages if s.name in BUILT and s.changed_deps()}


def _engine_stale(repo: Path) -> set[str]:
    from grounding import codeset, config, stages

    codeset._file_digest.cache_clear()  # sources changed on disk since the last call
    params = config.load(repo / "params.yaml")
    return {n for n in BUILT if not stages.status(n, params).current}


@pytest.mark.timeout(2400)  # the build dominates: minutes on 2 loaded cores
def test_each_module_edit_stales_exactly_its_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from grounding import codeset, stages

    from dvc.repo import Repo

    repo = copy_project(tmp_path / "repo", ["dataset.synthetic.n_images=8", "progress=false",
                                            "shards.rows_per_shard=4", *FAST])
    r = subprocess.run(["dvc", "repro", *BUILT], cwd=repo, env=env_with_venv(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout
    monkeypatch.chdir(repo)
    monkeypatch.setattr(codeset, "ROOT", repo)  # the engine hashes the copy's sources
    for cache in (codeset._file_digest, codeset.direct_imports, codeset.code_modules):
        cache.cache_clear()
    sets = {n: set(stages.get(n).code_files()) for n in BUILT}
    dvc_repo = Repo(str(repo))
    assert _dvc_stale(dvc_repo) == set() and _engine_stale(repo) == set()
    modules = sorted(set().union(*sets.values()) - {stages.get(n).entry for n in BUILT})
    assert len(modules) > 20
    mismatches = []
    for rel in modules:
        path = repo / rel
        original = path.read_bytes()
        stat = os.stat(path)
        path.write_bytes(original + b"\n# edited by the acceptance test\n")
        want = {n for n, files in sets.items() if rel in files}
        got_dvc, got_engine = _dvc_stale(dvc_repo), _engine_stale(repo)
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        if not (got_dvc == want == got_engine):
            mismatches.append((rel, sorted(want), sorted(got_dvc), sorted(got_engine)))
    assert not mismatches, mismatches
    assert _dvc_stale(dvc_repo) == set() and _engine_stale(repo) == set()
    dvc_repo.close()
