"""Kill/resume trials: SIGKILL a real teacher stage at random moments, rerun it, and check the result.

A tiny synthetic dataset is prepared in a temporary directory with its own params file (small
``rows_per_shard``, so there are many shards). Then:

1. a reference run (``grounding.stages.run``, uninterrupted, in this process) gives the expected bytes;
2. one uninterrupted ``grounding run STAGE --no-deps`` in a fresh process and one through the fault driver
   (below) check that neither the process nor the driver changes a byte, and time when each fault point is
   reached;
3. every trial starts the stage in a fresh output directory through the fault driver, SIGKILLs it at one
   moment, checks what a reader sees in what the killed run left behind (no manifest: ``ShardSet`` raises
   ``ShardError``, ``verify_shard_set`` and ``grounding shards verify`` fail, ``is_complete`` is False; every
   file under a final ``shard-*.h5`` / ``manifest.json`` name is byte-identical to the reference one, so no
   partial file is ever under a name a reader trusts), reruns the plain CLI (``--rerun library``: through
   the library in this process, faster, what the pytest wrapper uses), and checks that the rerun kept
   every finished shard (same inode) and that the final directory is byte-identical (sha256 of every file,
   same file names) to the reference run.

Moments: uniform random times (``time``: from the start of the process; ``write-time``: from the first fault
point, i.e. inside the writing phase), and moments aimed at fault points, each reached through the
driver (a wrapper in the child process only; no library code is changed): ``dataset`` (an HDF5 shard half
written under its temporary name), ``rename-shard`` (fsynced temporary shard, rename not yet done),
``renamed-shard`` (renamed, directory not fsynced, no manifest), ``manifest-half`` (half of the manifest's
bytes written to its temporary file) and ``rename-manifest`` (manifest temporary complete, not renamed).
The driver pauses ``--pause`` seconds at every fault point so a kill can land inside it.

    python benchmarks/kill_resume.py [--trials 20] [--seed 0] [--images 24] [--rows-per-shard 2]
                                     [--stage gt-boxes] [--pause 0.03] [--rerun cli|library]
                                     [--json benchmarks/out/kill_resume.json]

Prints one line per trial and ``passed/trials`` at the end; exit status 1 when any trial failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The ``grounding`` package every process of one benchmark imports: a snapshot taken at start (see
#: :func:`main`), so that an edit of the working tree during the run cannot change the stage key midway.
CODE = Path(os.environ.get("KILL_RESUME_CODE", ROOT))
SHARD_RE = re.compile(r"^shard-\d{5}\.h5$")
#: Fault points the driver reports (one line each in the events file) and pauses at.
KINDS = ("dataset", "rename-shard", "renamed-shard", "manifest-half", "rename-manifest")
#: Each full run of trials includes at least these aimed moments (the rest are drawn at random).
REQUIRED = ("rename-shard", "manifest-half", "dataset", "rename-manifest", "renamed-shard", "rename-shard",
            "manifest-half")


# ---- child side: the fault driver ----------------------------------------------------------------------
def install_fault_hooks(events: Path, pause: float) -> None:
    """Wrap, in this process only, the calls a shard-set write goes through so that each fault point
    appends ``<time> <kind> <detail>`` to ``events`` and sleeps ``pause`` seconds (the kill window)."""
    import h5py

    from grounding.shards import manifest as manifest_mod

    log = open(events, "a", buffering=1, encoding="utf-8")

    def emit(kind: str, detail: str = "") -> None:
        log.write(f"{time.time():.6f} {kind} {detail}\n")
        log.flush()
        time.sleep(pause)

    real_replace = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        name = os.path.basename(os.fsdecode(dst))
        if SHARD_RE.match(name):
            emit("rename-shard", name)
            real_replace(src, dst, *args, **kwargs)
            emit("renamed-shard", name)
        elif name == "manifest.json":
            emit("rename-manifest", name)
            real_replace(src, dst, *args, **kwargs)
        else:
            real_replace(src, dst, *args, **kwargs)

    os.replace = replace  # type: ignore[assignment]

    real_create = h5py.Group.create_dataset

    def create_dataset(self: h5py.Group, name: str, *args: Any, **kwargs: Any) -> Any:
        fname = os.path.basename(self.file.filename)
        if ".tmp-" in fname:
            emit("dataset", f"{fname.split('.tmp-')[0]}:{self.name.rstrip('/')}/{name}".replace(":/", ":"))
        return real_create(self, name, *args, **kwargs)

    h5py.Group.create_dataset = create_dataset  # type: ignore[method-assign]

    class _HalfThenRest:
        """A file whose ``write`` stores half the bytes, reports ``manifest-half``, then the rest."""

        def __init__(self, f: Any) -> None:
            self._f = f

        def write(self, data: bytes) -> int:
            half = len(data) // 2
            self._f.write(data[:half])
            self._f.flush()
            emit("manifest-half", "manifest.json")
            return half + self._f.write(data[half:])

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

        def __enter__(self) -> "_HalfThenRest":
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

    def manifest_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = open(path, mode, *args, **kwargs)
        if "w" in mode and os.path.basename(os.fsdecode(path)).startswith("manifest.json.tmp"):
            return _HalfThenRest(f)
        return f

    manifest_mod.open = manifest_open  # type: ignore[attr-defined]  # module global shadows the builtin


def child(argv: list[str]) -> None:
    """``kill_resume.py child EVENTS PAUSE -- <grounding CLI args>``: the CLI with fault hooks installed."""
    events, pause, sep, *cli_args = argv
    assert sep == "--", argv
    install_fault_hooks(Path(events), float(pause))
    from grounding.cli import app

    app(args=cli_args, prog_name="grounding")


# ---- parent side ---------------------------------------------------------------------------------------
def digests(d: Path) -> dict[str, str]:
    """sha256 of every file directly in ``d`` (empty if ``d`` does not exist)."""
    if not d.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def read_events(path: Path) -> list[tuple[float, str, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            out.append((float(parts[0]), parts[1], parts[2]))
    return out


@dataclass
class Trial:
    index: int
    kind: str                      # "time", "write-time" or a fault point of KINDS
    target: str                    # the event detail aimed at, or the delay in seconds
    killed_after: str = ""         # the last event the child reported before it died
    kill_at_s: float = 0.0         # seconds from start to SIGKILL
    after_kill: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    rerun_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


class Bench:
    """Workspace, params and the commands of one set of trials."""

    def __init__(self, work: Path, stage: str, images: int, rows_per_shard: int, pause: float) -> None:
        self.work, self.stage, self.pause = work, stage, pause
        self.params = work / "params.yaml"
        doc = {
            "device": "cpu", "seed": 0, "progress": False,
            "dataset": {"name": "synthetic", "format": "synthetic", "synthetic": {"n_images": images}},
            "shards": {"rows_per_shard": rows_per_shard},
            "paths": {"prepared": str(work / "prepared"), "teachers": str(work / "teachers"),
                      "students": str(work / "students"), "metrics": str(work / "metrics"),
                      "models": str(work / "models")},
        }
        self.params.write_text(json.dumps(doc, indent=1), encoding="utf-8")  # JSON is YAML
        self.env = {**os.environ, "PYTHONPATH": str(CODE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DO_NOT_TRACK": "1"}

    def overrides(self, teachers: Path) -> list[str]:
        return [f"paths.teachers={teachers}"]

    def cli_args(self, teachers: Path) -> list[str]:
        return ["run", self.stage, "--no-deps", "--params", str(self.params),
                *(a for o in self.overrides(teachers) for a in ("--set", o))]

    def out_dir(self, teachers: Path) -> Path:
        return teachers / self.stage / "synthetic"

    def prepare(self) -> None:
        """The canonical dataset (and any other upstream stage of the target), once, in this process;
        upstream outputs land in the shared ``teachers`` folder, so every trial's run finds them there
        only if the stage reads them through params.paths: gt-boxes / wordnet-labels read only the dataset."""
        from grounding import config, stages

        p = config.load(self.params)
        for name in stages.plan([self.stage])[:-1]:
            stages.run(name, p)

    def in_process_run(self, teachers: Path) -> float:
        """The stage through the library (``grounding.stages.run``) in this process; returns its wall time."""
        from grounding import config, stages

        t0 = time.perf_counter()
        stages.run(self.stage, config.load(self.params, self.overrides(teachers)))
        return time.perf_counter() - t0

    def cli_run(self, teachers: Path) -> float:
        """The real CLI in a fresh process, uninterrupted; returns its wall time."""
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "grounding.cli", *self.cli_args(teachers)], env=self.env,
                             cwd=self.work, capture_output=True, text=True)  # cwd: `-m` puts it first on sys.path
        if res.returncode != 0:
            raise RuntimeError(f"CLI run failed ({res.returncode}):\n{res.stdout[-1000:]}\n{res.stderr[-2000:]}")
        return time.perf_counter() - t0

    def start_driven(self, teachers: Path, events: Path) -> subprocess.Popen:
        """The CLI in a fresh process under the fault driver."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "child", str(events), str(self.pause), "--",
               *self.cli_args(teachers)]
        return subprocess.Popen(cmd, env=self.env, cwd=self.work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)


def fault_points(ref_dir: Path) -> list[tuple[str, str]]:
    """Every ``(kind, detail)`` the driver will report while writing a set equal to ``ref_dir``."""
    import h5py

    points: list[tuple[str, str]] = []
    for shard in sorted(p.name for p in ref_dir.iterdir() if SHARD_RE.match(p.name)):
        names: list[str] = []
        with h5py.File(ref_dir / shard, "r") as f:
            f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
        points += [("dataset", f"{shard}:{n}") for n in names]
        points += [("rename-shard", shard), ("renamed-shard", shard)]
    return points + [("manifest-half", "manifest.json"), ("rename-manifest", "manifest.json")]


def _wait_for_event(proc: subprocess.Popen, events: Path, kind: str, detail: str, timeout: float) -> float | None:
    """Poll until the child reports ``kind detail``; returns the event time, None if the child ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for t, k, d in read_events(events):
            if k == kind and d == detail:
                return t
        if proc.poll() is not None:
            return None
        time.sleep(0.002)
    raise TimeoutError(f"event {kind} {detail} not reached in {timeout:.0f} s")


def check_after_kill(out: Path, ref: dict[str, str], stage_key: str) -> tuple[dict[str, Any], list[str]]:
    """What a reader sees in a killed run's directory: nothing valid unless the manifest was committed."""
    from typer.testing import CliRunner

    from grounding.cli import app
    from grounding.shards import ShardError, ShardSet, is_complete, verify_shard_set

    problems: list[str] = []
    files = digests(out)
    finals = sorted(n for n in files if SHARD_RE.match(n))
    temps = sorted(n for n in files if ".tmp-" in n)
    state: dict[str, Any] = {"shards_done": len(finals), "temp_files": temps, "manifest": "manifest.json" in files}
    for name in [*finals, "manifest.json"]:
        if name in files and files[name] != ref.get(name):
            problems.append(f"{name} present under its final name but differs from the reference (partial file)")
    unknown = sorted(set(files) - set(ref) - set(temps) - {".grounding-lock"})  # a killed writer's lock file
    # stays behind (the OS released the lock; the rerun takes it over and removes it)
    if unknown:
        problems.append(f"unexpected files {unknown}")
    verify_cli = CliRunner().invoke(app, ["shards", "verify", str(out)])
    if state["manifest"]:  # committed before the kill: must be the whole, valid set
        if set(finals) != {n for n in ref if SHARD_RE.match(n)}:
            problems.append("manifest committed while shards are missing")
        if not verify_shard_set(out).ok or verify_cli.exit_code != 0:
            problems.append("committed set does not verify")
        state["reader"] = "committed set, verifies"
        return state, problems
    try:
        ShardSet(out)
        problems.append("ShardSet opened an uncommitted set")
    except ShardError as e:
        state["reader"] = "ShardError (" + ("no manifest.json" if "no manifest.json" in str(e) else str(e)[:60]) + ")"
    try:
        ShardSet(out, verify=True)
        problems.append("ShardSet(verify=True) opened an uncommitted set")
    except ShardError:
        pass
    if verify_shard_set(out).ok:
        problems.append("verify_shard_set passed an uncommitted set")
    if verify_cli.exit_code == 0:
        problems.append("`grounding shards verify` exited 0 on an uncommitted set")
    if is_complete(out, stage_key):
        problems.append("is_complete() is True for an uncommitted set")
    return state, problems


def plan_trials(n: int, rng: random.Random, points: list[tuple[str, str]], t_run: float,
                t_write: float) -> list[Trial]:
    """``n`` moments: the REQUIRED aimed ones first (as many as fit), the rest half random times (``time``
    from the start of the process, ``write-time`` from the first fault point) and half random fault points;
    each aimed moment picks one occurrence of its fault point at random."""
    kinds = list(REQUIRED[:n])
    while len(kinds) < n:  # half of the rest at random times (mostly inside the writing phase)
        u = rng.random()
        kinds.append("write-time" if u < 0.4 else "time" if u < 0.5 else rng.choice(KINDS))
    rng.shuffle(kinds)
    by_kind: dict[str, list[str]] = {}
    for k, d in points:
        by_kind.setdefault(k, []).append(d)
    trials = []
    for i, kind in enumerate(kinds):
        if kind == "time":
            trials.append(Trial(i, kind, f"{rng.uniform(0.0, t_run):.3f}"))
        elif kind == "write-time":
            trials.append(Trial(i, kind, f"{rng.uniform(0.0, t_write):.3f}"))
        else:
            trials.append(Trial(i, kind, rng.choice(by_kind[kind])))
    return trials


def run_trial(b: Bench, trial: Trial, ref: dict[str, str], stage_key: str, rng: random.Random, *,
              rerun: str = "cli") -> Trial:
    """One kill, the checks on what it left, one rerun (``cli``: a fresh process; ``library``: here)."""
    teachers = b.work / f"trial-{trial.index:02d}"
    events = b.work / f"trial-{trial.index:02d}.events"
    out = b.out_dir(teachers)
    for attempt in range(4):  # a random time past the end of this (faster) run: draw again within it
        shutil.rmtree(teachers, ignore_errors=True)
        events.unlink(missing_ok=True)
        proc = b.start_driven(teachers, events)
        t0 = time.time()
        if trial.kind in ("time", "write-time"):
            start = t0
            if trial.kind == "write-time":
                while not read_events(events) and proc.poll() is None:
                    time.sleep(0.002)
                seen = read_events(events)
                start = seen[0][0] if seen else time.time()
            deadline = start + float(trial.target)
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.002)
        else:
            if _wait_for_event(proc, events, trial.kind, trial.target, timeout=300) is None:
                err = proc.stderr.read() if proc.stderr else ""
                trial.problems.append(f"child ended before reaching {trial.kind} {trial.target}: {err[-400:]}")
                return trial
            time.sleep(rng.uniform(0.0, 0.8 * b.pause))  # somewhere inside the pause window
        if proc.poll() is None:
            break
        if trial.kind in ("time", "write-time") and proc.returncode == 0 and attempt < 3:
            seen = read_events(events)
            span = time.time() - t0 if trial.kind == "time" else (seen[-1][0] - seen[0][0] if seen else 1.0)
            trial.target = f"{rng.uniform(0.0, 0.9 * span):.3f}"
            if proc.stderr:
                proc.stderr.close()
            continue
        trial.problems.append(f"child finished (rc {proc.returncode}) before the kill at {trial.target}")
        return trial
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    trial.kill_at_s = round(time.time() - t0, 3)
    seen = read_events(events)
    trial.killed_after = f"{seen[-1][1]} {seen[-1][2]}" if seen else "(startup: no fault point reached)"
    inodes = {p.name: p.stat().st_ino for p in out.glob("shard-*.h5")} if out.is_dir() else {}
    trial.after_kill, problems = check_after_kill(out, ref, stage_key)
    trial.problems.extend(problems)
    try:
        trial.rerun_s = round(b.cli_run(teachers) if rerun == "cli" else b.in_process_run(teachers), 2)
    except Exception as e:  # noqa: BLE001 - any failure of the rerun is the trial's result
        trial.problems.append(f"rerun failed: {type(e).__name__}: {str(e)[:400]}")
        return trial
    final = digests(out)
    if final != ref:
        diff = sorted(n for n in set(final) | set(ref) if final.get(n) != ref.get(n))
        trial.problems.append(f"final set differs from the uninterrupted run in {diff}")
    rewritten = [n for n, ino in inodes.items() if (out / n).exists() and (out / n).stat().st_ino != ino]
    if rewritten:
        trial.problems.append(f"finished shards recomputed instead of kept: {rewritten}")
    if trial.ok:
        shutil.rmtree(teachers, ignore_errors=True)
    return trial


def run(trials: int = 20, seed: int = 0, images: int = 24, rows_per_shard: int = 2, stage: str = "gt-boxes",
        pause: float = 0.03, workdir: Path | None = None, *, check_driver: bool = True, rerun: str = "cli",
        verbose: bool = True) -> dict[str, Any]:
    """Run the whole benchmark; returns a summary dict (``passed``, ``trials``, per-trial records).

    ``check_driver`` adds one uninterrupted run under the fault driver (same bytes as the reference, the
    fault points it reports are the expected ones, and its timing for random-time moments); ``rerun``
    picks how each killed run is resumed (``cli``: the real CLI in a fresh process; ``library``: here).
    """
    from grounding.shards import Manifest

    say = print if verbose else (lambda *a, **k: None)
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="kill-resume-")) if own else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        b = Bench(work, stage, images, rows_per_shard, pause)
        b.prepare()
        t_ref = b.in_process_run(work / "ref")
        ref_dir = b.out_dir(work / "ref")
        ref = digests(ref_dir)
        key = Manifest.load(ref_dir).stage_key
        n_shards = sum(1 for n in ref if SHARD_RE.match(n))
        points = fault_points(ref_dir)
        t_run, t_write, t_cli = 10.0, 0.05 * len(points) * max(pause, 0.001) / 0.03, None
        if check_driver:
            t_cli = b.cli_run(work / "cli")
            if digests(b.out_dir(work / "cli")) != ref:
                raise RuntimeError("the CLI run in a fresh process gave other bytes than the library run")
            events = work / "driven.events"
            t0 = time.time()
            proc = b.start_driven(work / "driven", events)
            _, err = proc.communicate()
            t_run = time.time() - t0
            if proc.returncode != 0 or digests(b.out_dir(work / "driven")) != ref:
                raise RuntimeError(f"the fault driver changed the result (rc {proc.returncode}): {err[-2000:]}")
            schedule = read_events(events)
            if sorted((k, d) for _, k, d in schedule) != sorted(points):
                raise RuntimeError("the fault points reported differ from those expected from the reference set")
            t_write = schedule[-1][0] - schedule[0][0] + pause
        say(f"{stage}: {images} images, {n_shards} shards of {rows_per_shard} rows, {len(points)} fault points; "
            f"library run {t_ref:.1f} s" + (f", CLI run {t_cli:.1f} s, driven run {t_run:.1f} s "
                                             f"(writing phase {t_write:.1f} s, pause {pause} s per point)"
                                             if check_driver else ""))
        rng = random.Random(seed)
        done: list[Trial] = []
        for trial in plan_trials(trials, rng, points, t_run, t_write):
            trial = run_trial(b, trial, ref, key, rng, rerun=rerun)
            done.append(trial)
            st = trial.after_kill
            say(f"trial {trial.index + 1:2d} {'ok  ' if trial.ok else 'FAIL'} kill {trial.kind:15s} "
                f"{trial.target:26s} at {trial.kill_at_s:6.2f} s, after {trial.killed_after:42s} "
                f"left {st.get('shards_done', '?'):>2}/{n_shards} shards, {len(st.get('temp_files', []))} tmp, "
                f"manifest {'yes' if st.get('manifest') else 'no '}; reader: {st.get('reader', '-')}; "
                f"rerun {trial.rerun_s:.1f} s" + ("" if trial.ok else f"\n    problems: {trial.problems}"))
        passed = sum(t.ok for t in done)
        summary = {
            "stage": stage, "images": images, "rows_per_shard": rows_per_shard, "shards": n_shards,
            "fault_points": len(points), "pause_s": pause, "seed": seed, "rerun": rerun,
            "library_run_s": round(t_ref, 2), "cli_run_s": None if t_cli is None else round(t_cli, 2),
            "driven_run_s": round(t_run, 2) if check_driver else None, "passed": passed, "trials": len(done),
            "kinds": {k: sum(t.kind == k for t in done) for k in ("time", "write-time", *KINDS)},
            "left_after_kill": {
                "no_files": sum(t.after_kill.get("shards_done") == 0 and not t.after_kill.get("temp_files")
                                for t in done),
                "partial_temp_file": sum(bool(t.after_kill.get("temp_files")) for t in done),
                "some_shards_no_manifest": sum(0 < t.after_kill.get("shards_done", 0)
                                               and not t.after_kill.get("manifest") for t in done),
                "committed": sum(bool(t.after_kill.get("manifest")) for t in done),
            },
            "records": [{**asdict(t), "ok": t.ok} for t in done],
        }
        say(f"{passed}/{len(done)}")
        return summary
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        child(argv[1:])
        return 0
    if "KILL_RESUME_CODE" not in os.environ:  # run everything from a snapshot of the library code
        snap = Path(tempfile.mkdtemp(prefix="kill-resume-code-"))
        try:
            for pkg in ("grounding", "stages"):  # stages/<x>.py enter the stage keys too
                shutil.copytree(ROOT / pkg, snap / pkg, ignore=shutil.ignore_patterns("__pycache__"))
            env = {**os.environ, "KILL_RESUME_CODE": str(snap),
                   "PYTHONPATH": str(snap) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            return subprocess.call([sys.executable, str(Path(__file__).resolve()), *argv], env=env)
        finally:
            shutil.rmtree(snap, ignore_errors=True)
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--rows-per-shard", type=int, default=2)
    ap.add_argument("--stage", default="gt-boxes")
    ap.add_argument("--pause", type=float, default=0.03, help="seconds the driver waits at each fault point")
    ap.add_argument("--rerun", choices=("cli", "library"), default="cli",
                    help="resume each killed run with the CLI in a fresh process (default) or in this process")
    ap.add_argument("--no-check-driver", action="store_true",
                    help="skip the uninterrupted CLI and driven runs (faster; random-time moments then use a guess)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the workspace here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here")
    a = ap.parse_args(argv)
    summary = run(a.trials, a.seed, a.images, a.rows_per_shard, a.stage, a.pause, a.workdir, rerun=a.rerun,
                  check_driver=not a.no_check_driver)
    import grounding

    summary["code"] = str(Path(grounding.__file__).parent.parent)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0 if summary["passed"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
