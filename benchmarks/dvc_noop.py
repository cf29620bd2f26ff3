"""What bounds a no-op ``dvc status`` / ``dvc repro`` of the generated dvc.yaml, without building the DAG.

On a temporary copy of the repository every stage's outputs are placeholders (a directory holding one small
file, or a small file) and ``dvc commit -f`` records them with today's deps in ``dvc.lock``: the lock then
has every stage at its real size (each stage lists its derived code set, ~35 files), and nothing needs to
run. Then measured, median of ``--repeats`` fresh processes, once with DVC's YAML parsed by ruamel's pure-
Python parser and once by its C parser (``ruamel.yaml.clib``; skipped when it is not importable):

* ``version_s``: ``dvc --version`` (the process start floor);
* ``status_s``: ``dvc status`` (no targets: dvc.yaml and dvc.lock parsed about once);
* ``repro_targets_s``: ``dvc repro`` with every stage as an explicit target (what
  benchmarks/orchestration_overhead.py runs): DVC collects each target on its own and re-parses dvc.yaml,
  dvc.lock and params.yaml for each, so the cost grows as targets x (dvc.yaml + dvc.lock size);
* ``repro_s``: ``dvc repro`` with no targets (the same stages: the registry's pipeline is all of dvc.yaml).

``--dir-deps`` adds a second copy whose dvc.yaml lists each ``grounding/<package>/`` directory once instead of
its files (``__pycache__`` in .dvcignore), timed interleaved with the first: the over-approximating deps.

The pure parser is forced by a shim ``_ruamel_yaml`` module that fails to import (ruamel.yaml then falls back
to Python); the C parser by ``--c-yaml DIR`` (a ``pip install --target DIR ruamel.yaml.clib``) or the venv's.

    python benchmarks/dvc_noop.py [--repeats 3] [--c-yaml DIR] [--dir-deps] [--keep]

Writes ``benchmarks/out/dvc_noop.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.orchestration_overhead import VENV_BIN, copy_repo, timed  # noqa: E402


def placeholder_outputs(repo: Path) -> int:
    """Create every registry output of every stage in ``repo`` as a placeholder; the number created.
    A template with a file suffix becomes a small file, any other a directory with one small file."""
    import yaml

    from grounding.config import PathParams
    from grounding.stages import STAGES

    name = yaml.safe_load((repo / "params.yaml").read_text())["dataset"]["name"]
    n = 0
    for s in STAGES.values():
        for o in s.outputs:
            p = repo / o.path.format(dataset=name, **PathParams().model_dump())
            if p.suffix:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("{}\n")
            else:
                p.mkdir(parents=True, exist_ok=True)
                (p / "placeholder.txt").write_text("placeholder\n")
            n += 1
    return n


def collapse_package_deps(repo: Path) -> None:
    """Rewrite ``repo``'s dvc.yaml so each stage lists a ``grounding/<package>`` directory once in place of its
    ``grounding/<package>/*.py`` files, and make DVC ignore ``__pycache__`` (else compiling stales the dir)."""
    import re

    out: list[str] = []
    seen: set[str] = set()
    for line in (repo / "dvc.yaml").read_text().split("\n"):
        if re.match(r"  \S", line):
            seen = set()  # a new stage
        m = re.match(r"    - (grounding/[^/]+)/[^/]+\.py$", line)
        if m and m.group(1) in seen:
            continue
        if m:
            seen.add(m.group(1))
            line = f"    - {m.group(1)}"
        out.append(line)
    (repo / "dvc.yaml").write_text("\n".join(out))
    with open(repo / ".dvcignore", "a") as f:
        f.write("\n__pycache__\n")


def yaml_env(base: dict[str, str], tmp: Path, mode: str, c_yaml: str | None) -> dict[str, str]:
    """``base`` with PYTHONPATH set so DVC's ruamel.yaml uses the pure (``mode='pure'``) or C parser."""
    shim = tmp / "pure-yaml"
    shim.mkdir(exist_ok=True)
    (shim / "_ruamel_yaml.py").write_text("raise ImportError('pure-Python YAML forced by dvc_noop.py')\n")
    path = [str(shim)] if mode == "pure" else [c_yaml] if c_yaml else []
    return {**base, "PYTHONPATH": os.pathsep.join([*path, base.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def c_yaml_available(env: dict[str, str]) -> bool:
    """Whether ``_ruamel_yaml`` (ruamel's C parser) imports under ``env``."""
    import subprocess

    return subprocess.run([sys.executable, "-c", "import _ruamel_yaml"], env=env).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--c-yaml", default=None, help="a directory holding ruamel.yaml.clib (pip install --target)")
    ap.add_argument("--dir-deps", action="store_true", help="also time a copy with package directories as deps")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "dvc_noop.json"))
    args = ap.parse_args()

    import yaml

    from grounding.stages import STAGES

    tmp = Path(tempfile.mkdtemp(prefix="dvc-noop-"))
    base = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    try:
        repo = copy_repo(tmp / "repo", ["progress=false"])
        n_out = placeholder_outputs(repo)
        repos = {"files": repo}
        if args.dir_deps:
            repos["dirs"] = tmp / "repo-dirs"
            shutil.copytree(repo, repos["dirs"], symlinks=True)
            collapse_package_deps(repos["dirs"])
        result: dict = {"stages": len(STAGES), "outputs": n_out,
                        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
        for v, r in repos.items():
            timed(["dvc", "commit", "-f", "-q"], r, base)
            stages = yaml.safe_load((r / "dvc.yaml").read_text())["stages"].values()
            result[v] = {"deps": sum(len(st["deps"]) for st in stages),
                         "dvc_yaml_lines": (r / "dvc.yaml").read_text().count("\n"),
                         "dvc_lock_lines": (r / "dvc.lock").read_text().count("\n")}
        print(result, flush=True)
        cmds = {"version_s": ["dvc", "--version"], "status_s": ["dvc", "status"],
                "repro_targets_s": ["dvc", "repro", *STAGES], "repro_s": ["dvc", "repro"]}
        modes = ["pure", "c"] if c_yaml_available(yaml_env(base, tmp, "c", args.c_yaml)) else ["pure"]
        runs = {(v, m): {k: [] for k in cmds} for v in repos for m in modes}
        for _ in range(args.repeats):  # variants and modes interleaved: the same load for each
            for (v, m), row in runs.items():
                env = yaml_env(base, tmp, m, args.c_yaml)
                for k, cmd in cmds.items():
                    dt, log = timed(cmd, repos[v], env)
                    assert "Running stage" not in log, log
                    row[k].append(round(dt, 3))
        for (v, m), row in runs.items():
            result[v][m] = {k: round(statistics.median(x), 3) for k, x in row.items()} | {"runs": row}
            print(v, m, {k: result[v][m][k] for k in cmds}, flush=True)
        result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
        print("load average before / after:", result["loadavg_before"], result["loadavg_after"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        if args.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
