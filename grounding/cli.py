"""``grounding``: run stages, prepare datasets, inspect / verify / render shard sets."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from grounding import config as C
from grounding.units import human_bytes

app = typer.Typer(help="Reproducible teacher pipeline for weakly supervised visual grounding.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Prepare and describe canonical datasets.", no_args_is_help=True)
shards_app = typer.Typer(help="Inspect, verify and render shard sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(shards_app, name="shards")
export_app = typer.Typer(help="Export pseudo-labels for existing students.", no_args_is_help=True)
app.add_typer(export_app, name="export")
weights_app = typer.Typer(help="Convert trusted pickled checkpoints into weights-only files.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
prefect_app = typer.Typer(help="A local Prefect server for the flow (127.0.0.1, PREFECT_HOME under the project).",
                          no_args_is_help=True)
app.add_typer(prefect_app, name="prefect")
_WIDTH = None if sys.stdout.isatty() else 200  # piped output (logs, CI): wide tables, nothing truncated
console = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)

ParamsOpt = typer.Option("params.yaml", "--params", "-p", help="params file")
SetOpt = typer.Option(None, "--set", "-s", help="override a param: key.path=value (repeatable)")
WaitOpt = typer.Option(False, "--wait", help="wait for another writer of the same output to finish "
                       "(default: fail at once naming it)")


def _params(path: str, overrides: list[str] | None) -> C.Params:
    try:
        return C.load(path, overrides or [])
    except C.ConfigError as e:
        from grounding.errors import one_line

        _fail(one_line(e)[0], 2)


def _fail(msg: str, code: int = 1) -> None:
    """Print ``error: msg`` as one line (never wrapped, no markup read from ``msg``) and exit with ``code``."""
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(msg)}", soft_wrap=True)
    raise typer.Exit(code)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log at INFO level")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("run")
def run_stage(stage: str = typer.Argument(..., help="stage name (see `grounding stages`)"),
              params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt,
              deps: bool = typer.Option(True, "--deps/--no-deps", help="bring upstream stages up to date first"),
              wait: bool = WaitOpt,
              nproc: int = typer.Option(1, "--nproc", min=1, help="processes on this machine: N > 1 launches "
                                        "`torchrun --standalone --nproc_per_node N` on the same stage and params "
                                        "(data-parallel training stages; the others run on rank 0)")) -> None:
    """Run one stage (or reuse its cached output) and print where the output is."""
    from grounding import distributed as D
    from grounding import runtime as R
    from grounding import stages

    p = _params(params, [*(set_ or []), *(["shards.wait=true"] if wait else [])])
    try:
        names = stages.plan([stage], p) if deps else [stages.get(stage).name]
    except KeyError as e:
        _fail(str(e.args[0]) if e.args else str(e), 2)
    except C.ConfigError as e:  # a *_from param naming no teacher stage
        _fail(str(e), 2)
    if nproc > 1 and not D.launched():
        args = ["run", stage, "--params", params, *[a for s in set_ or [] for a in ("--set", s)],
                "--deps" if deps else "--no-deps", *(["--wait"] if wait else [])]
        raise typer.Exit(_torchrun(nproc, args))
    if D.launched():
        D.init_from_env(R.resolve_device(p.device))
    try:
        for name in names:
            r = R.run_on_ranks(name, lambda: _run_one(name, p))
            if D.is_main() and r is not None:
                console.print(f"[green]{name}[/green] → {r.path}" + (" [dim](up to date)[/dim]" if r.hit else ""))
    finally:
        D.shutdown()


def _torchrun(nproc: int, args: list[str]) -> int:
    """Run ``grounding <args>`` under ``torchrun --standalone --nproc_per_node nproc`` (torch.distributed.run's
    module entry, this Python); returns its exit code."""
    import subprocess

    verbose = ["-v"] if logging.getLogger().getEffectiveLevel() <= logging.INFO else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "grounding.cli", *verbose, *args]
    err.print(f"launching: {' '.join(cmd[1:])}", soft_wrap=True, markup=False)
    return subprocess.call(cmd)


def _run_one(name: str, p: C.Params) -> "stages.StageResult":  # noqa: F821 - imported lazily
    """``stages.run`` of one stage (its upstream already planned); a known error (grounding.errors) becomes
    one line and exit code 1 (2: params)."""
    from grounding import errors, stages

    try:
        return stages.run(name, p, deps=False)
    except errors.KNOWN as e:  # OSError: missing file, disk full, ...
        msg, code = errors.one_line(e, f"stage {name}")
        _fail(msg, code)
        raise  # unreachable: _fail exits


@app.command("status")
def stage_status(names: Optional[List[str]] = typer.Argument(None, help="stages (default: every stage)"),
                 params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Report each stage as current or stale (and why) without running anything; exit code 1 when any is
    stale."""
    from grounding import stages

    p = _params(params, set_)
    try:
        wanted = [stages.get(n).name for n in names] if names else list(stages.STAGES)
    except KeyError as e:
        _fail(str(e.args[0]) if e.args else str(e), 2)
    stale = 0
    for name in wanted:
        try:
            st = stages.status(name, p)
        except C.ConfigError as e:  # a *_from param naming no teacher stage
            _fail(str(e), 2)
        stale += not st.current
        print(f"{name}\t{'current' if st.current else 'stale'}\t{st.reason}")
    raise typer.Exit(1 if stale else 0)


@app.command("dvc-yaml")
def dvc_yaml(params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Print dvc.yaml as generated from the stage registry (`grounding dvc-yaml > dvc.yaml`); a real dataset
    in the params makes its `root` and `image_root` deps of `prepare`."""
    from grounding.dvcgen import dvc_yaml as generate

    sys.stdout.write(generate(_params(params, set_)))


@app.command("stages")
def list_stages() -> None:
    """List the registered stages."""
    from grounding import stages

    t = Table("stage", "what it does")
    for s in stages.STAGES.values():
        t.add_row(s.name, s.description)
    console.print(t)


@app.command("demo")
def demo(params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt,
         render_dir: str = typer.Option("data/demo", help="where the example picture goes"),
         wait: bool = WaitOpt) -> None:
    """Run the main job (every stage of the pipeline) on the configured dataset, the synthetic default
    unless params say otherwise, and print where each output is."""
    from grounding import stages
    from grounding.render import render_row
    from grounding.shards import ShardSet
    from grounding.summary import timed_run

    p = _params(params, [*(set_ or []), *(["shards.wait=true"] if wait else [])])
    t = Table("stage", "rows", "seconds", "cache", "headline", "output", title="grounding demo")
    last = None
    total = 0.0
    for name in stages.PIPELINE:
        r = timed_run(name, p, _run_one)
        if r.rows is not None:
            last = r.out
        total += r.seconds
        t.add_row(name, "-" if r.rows is None else f"{r.rows:,}", f"{r.seconds:.1f}",
                  "[green]cache hit[/green]" if r.status == "cache hit" else "computed", r.metric, str(r.out))
    t.add_row("total", "", f"{total:.1f}", "", "", "")
    console.print(t)
    if last is not None:
        s = ShardSet(last)
        key = s.keys[0]
        png = render_row(last, key, Path(render_dir) / f"{s.manifest.stage}-{key}.png")
        console.print(f"example row rendered: {png}")
        console.print(f"inspect: grounding shards ls data; grounding shards info {last}")


@app.command("report")
def report_cmd(dirs: List[str] = typer.Argument(..., help="directories searched for shard sets and metrics/*.json"),
               out: str = typer.Option("report", "--out", "-o", help="output directory (an earlier report there is replaced)"),
               per_page: int = typer.Option(24, help="gallery rows per page"),
               pages: int = typer.Option(2, help="at most this many gallery pages per shard set"),
               verify: bool = typer.Option(True, "--verify/--no-verify", help="re-hash every shard (verification column)")) -> None:
    """Write a static HTML report (opens from disk, no server, no external URL): every shard set with its
    provenance, score histograms, a gallery of rows worst first and recorded errors; metrics and curves."""
    from grounding.report import build_report

    try:
        r = build_report(dirs, out, per_page=per_page, max_pages=pages, verify=verify)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e), 2)
    console.print(f"report: {r.sets} shard sets, {r.rendered} rows rendered in {r.seconds:.1f} s → {r.index}")


# ---- data -----------------------------------------------------------------------------------------
@data_app.command("prepare")
def data_prepare(
    format: str = typer.Option(None, "--format", "-f", help=f"one of {', '.join(C.DATASET_FORMATS)}"),
    root: Optional[str] = typer.Option(None, "--root", help="annotation root (format-specific layout)"),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="image directory (default: --root)"),
    name: Optional[str] = typer.Option(None, "--name", help="dataset name: output under data/prepared/<name>"),
    option: Optional[List[str]] = typer.Option(None, "--option", "-o", help="reader option key=value"),
    on_error: Optional[str] = typer.Option(None, "--on-error", help="fail (default) or skip (recorded)"),
    params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt,
) -> None:
    """Read a dataset (or generate the synthetic one) into the canonical form."""
    from grounding.data.prepare import prepare
    from grounding.data.schema import DataError

    overrides = list(set_ or [])
    for flag, value in (("format", format), ("root", root), ("image_root", image_root), ("name", name),
                        ("on_error", on_error)):
        if value is not None:
            overrides.append(f"dataset.{flag}={json.dumps(value)}")
    overrides += [f"dataset.options.{o}" for o in option or []]
    p = _params(params, overrides)
    try:
        ds = prepare(p)
    except (DataError, C.ConfigError, KeyError) as e:
        _fail(str(e))
    console.print(f"prepared [bold]{ds.name}[/bold]: {len(ds.images)} images, {len(ds.refs)} sentences, "
                  f"{len(ds.errors)} skipped → {p.prepared_dir()} (fingerprint {ds.fingerprint()[:12]})")


@data_app.command("stats")
def data_stats(path: Optional[str] = typer.Argument(None, help="prepared dataset dir (default from params)"),
               params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Counts per split, box and sentence statistics of a prepared dataset."""
    from grounding.data.schema import CanonicalDataset, DataError
    from grounding.data.stats import dataset_stats

    target = Path(path) if path else _params(params, set_).prepared_dir()
    try:
        ds = CanonicalDataset.load(target)
    except DataError as e:
        _fail(str(e))
    st = dataset_stats(ds)
    console.print(f"[bold]{ds.name}[/bold] ({target}) fingerprint {ds.fingerprint()[:12]}, "
                  f"format {ds.source.get('format', '?')}, {st['images']} images, {st['skipped']} skipped items")
    t = Table("split", "images", "sentences", "with box", "words/sentence", "box area / image", "box w×h (median)")
    for split, s in st["splits"].items():
        t.add_row(split, str(s["images"]), str(s["sentences"]), str(s["with_box"]), f"{s['words_mean']:.1f}",
                  f"{s['area_frac_mean']:.3f}", f"{s['box_w_median']:.0f}×{s['box_h_median']:.0f}")
    console.print(t)
    if st["categories"]:
        console.print("categories: " + ", ".join(f"{c} ({n})" for c, n in st["categories"].items()))


# ---- shards ---------------------------------------------------------------------------------------
def _open(path: str):
    from grounding.shards import ShardError, ShardSet

    try:
        return ShardSet(path)
    except ShardError as e:
        _fail(str(e))


@shards_app.command("ls")
def shards_ls(root: str = typer.Argument("data", help="directory searched for shard sets")) -> None:
    """Table of the shard sets under ROOT: stage, level, rows, size, key, teacher."""
    from grounding.shards import Manifest, ShardError

    if not Path(root).is_dir():
        _fail(f"{root}: no such directory (give the directory that holds the shard sets, e.g. data)")
    t = Table("path", "stage", "level", "rows", "shards", "size", "key", "teacher", "errors")
    found = 0
    for mpath in sorted(Path(root).rglob("manifest.json")):
        try:
            m = Manifest.load(mpath.parent)
        except ShardError as e:
            t.add_row(str(mpath.parent), "[red]unreadable[/red]", "", "", "", "", "", str(e)[:40], "")
            continue
        found += 1
        teacher = m.teacher.get("name") or m.teacher.get("model") or m.teacher.get("library") or "-"
        t.add_row(str(mpath.parent), m.stage, m.level, f"{m.n_rows:,}", str(len(m.shards)),
                  human_bytes(sum(s.size for s in m.shards)), m.stage_key[:12], str(teacher), str(len(m.errors)))
    console.print(t if found or t.row_count else f"no shard sets under {root}")


@shards_app.command("info")
def shards_info(path: str) -> None:
    """Manifest of one shard set: provenance, fields, shards, recorded errors."""
    s = _open(path)
    m = s.manifest
    console.print(f"[bold]{m.stage}[/bold] at {path}: {m.n_rows:,} {m.level} rows in {len(m.shards)} shards "
                  f"(format v{m.format_version}, grounding {m.package_version})")
    console.print(f"stage key  {m.stage_key}")
    console.print(f"teacher    {json.dumps(m.teacher, sort_keys=True)}")
    console.print(f"params     {json.dumps(m.params, sort_keys=True)}")
    console.print(f"inputs     {json.dumps(m.inputs, sort_keys=True)}")
    extra = {k: (v if len(json.dumps(v)) < 200 else f"<{type(v).__name__} of {len(v)}>") for k, v in m.extra.items()}
    console.print(f"extra      {json.dumps(extra, sort_keys=True)}")
    t = Table("field", "dtype", "row shape", "meaning")
    for f in m.fields:
        t.add_row(f.name, f.dtype, ("K, " if f.ragged else "") + ", ".join(map(str, f.shape)), f.meaning)
    console.print(t)
    st = Table("shard", "rows", "items", "first key", "last key", "size", "sha256")
    for sh in m.shards:
        st.add_row(sh.file, str(sh.rows), f"{sh.item_start}+{sh.item_count}", str(sh.first_key), str(sh.last_key),
                   human_bytes(sh.size), sh.sha256[:12])
    console.print(st)
    if m.errors:
        et = Table("item", "reason", title=f"{len(m.errors)} recorded errors")
        for e in m.errors[:50]:
            et.add_row(e.get("item", ""), e.get("reason", ""))
        console.print(et)


def summarize(arr: np.ndarray, max_values: int = 8) -> str:
    """A one-line summary of an array: values when small, else shape and min/mean/max."""
    if arr.size <= max_values:
        return np.array2string(arr, precision=3, separator=", ", max_line_width=200)
    a = arr.astype(np.float64)
    return f"min {a.min():.4g} mean {a.mean():.4g} max {a.max():.4g} norm {np.linalg.norm(a):.4g}"


@shards_app.command("show")
def shards_show(path: str, key: str) -> None:
    """One row: every field's dtype, shape and values (summarised when large)."""
    from grounding.shards import ShardError

    s = _open(path)
    try:
        row = s.get(key)
    except KeyError as e:
        _fail(str(e.args[0]))
    except (ShardError, OSError) as e:
        _fail(str(e))
    si, ri = s.locate(key)
    t = Table("field", "dtype", "shape", "value", title=f"{key} ({s.manifest.shards[si].file}, row {ri})")
    for name, v in row.items():
        t.add_row(name, str(v.dtype), str(tuple(v.shape)), summarize(v))
    console.print(t)


@shards_app.command("verify")
def shards_verify(paths: List[str] = typer.Argument(..., help="shard set directories")) -> None:
    """Re-hash every shard and check the schema; non-zero exit on any mismatch."""
    from grounding.shards import verify_shard_set

    bad = 0
    for path in paths:
        r = verify_shard_set(path, progress=True)
        if r.ok:
            console.print(f"[green]OK[/green] {path}: {r.checked} shards, {r.rows:,} rows")
        else:
            bad += 1
            for p in r.problems:
                err.print(f"[red]FAIL[/red] {path}: {p}")
    if bad:
        raise typer.Exit(1)


@shards_app.command("render")
def shards_render(path: str, key: str, out: str = typer.Option(..., "--out", "-o", help="output PNG"),
                  dataset: Optional[str] = typer.Option(None, help="prepared dataset dir (default: from manifest)")) -> None:
    """Draw one row over its image (boxes labelled, heat maps, sentence as title) into a PNG."""
    from grounding.data.schema import DataError
    from grounding.render import render_row
    from grounding.shards import ShardError

    try:
        dest = render_row(path, key, out, dataset=dataset)
    except (KeyError, ShardError, DataError) as e:
        _fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    except OSError as e:  # unwritable --out (permissions, a file as parent directory, a read-only disk)
        _fail(f"--out {out}: cannot write the picture ({e.strerror or e}); choose a writable path")
    console.print(f"wrote {dest}")


@export_app.command("pseudo")
def export_pseudo_cmd(
    format: Optional[str] = typer.Option(None, "--format", "-f",
                                         help="simrec | refclip | transvg (default: refclip.export_format)"),
    out: str = typer.Option(..., "--out", "-o", help="export directory (laid out as the loader's config expects)"),
    layout: Optional[str] = typer.Option(None, "--layout", help="file naming: refcoco | referit "
                                                                "(default: refclip.export_layout)"),
    shard_dir: Optional[str] = typer.Option(None, "--from", help="pseudo-box shard set (default: refclip-pseudo)"),
    transvg_dataset: Optional[str] = typer.Option(None, help="TransVG dataset: unc, unc+, gref, gref_umd (refcoco "
                                                             "layout), referit, flickr (referit layout)"),
    pseudo_split: Optional[List[str]] = typer.Option(None, "--pseudo-split", help="splits given pseudo-boxes (default: train)"),
    params: str = ParamsOpt, set_: Optional[List[str]] = SetOpt,
) -> None:
    """Write RefCLIP pseudo-labels (training splits) and GT (other splits) as files a student's published
    loader reads as is (SimREC / RefCLIP JSON + images + masks, TransVG .pth + images)."""
    from grounding.data.schema import CanonicalDataset, DataError
    from grounding.refclip.export import export_pseudo, images_inside
    from grounding.shards import ShardError

    from grounding import errors

    p = _params(params, set_)
    src = Path(shard_dir) if shard_dir else p.teacher_dir("refclip-pseudo")
    splits = pseudo_split or ["train"]
    try:
        ds = CanonicalDataset.load(p.prepared_dir())
        _check_pseudo_source(src, ds, splits)
        files = export_pseudo(src, ds, out, format or p.refclip.export_format,
                              layout=layout or p.refclip.export_layout, pseudo_splits=splits,
                              transvg_dataset=transvg_dataset or p.refclip.transvg_dataset,
                              copy_images=images_inside(ds, p.paths.prepared))
    except (*errors.KNOWN, ValueError) as e:
        _fail(*errors.one_line(e))
    for f in files:
        console.print(f"wrote {f}")


def _check_pseudo_source(src: Path, ds, splits: list[str]) -> None:
    """Refuse unknown ``--pseudo-split`` names (ConfigError naming the dataset's splits) and a ``--from`` set
    holding no pseudo-box for any sentence of those splits (DataError naming the set and the stage that
    writes pseudo-boxes), instead of an export of GT only."""
    from grounding.data.schema import DataError
    from grounding.shards import ShardSet

    have = sorted({r.split for r in ds.refs})
    bad = [s for s in splits if s not in have]
    if bad:
        raise C.ConfigError(f"--pseudo-split {', '.join(bad)}: no such split in dataset {ds.name!r}; its splits "
                            f"are {', '.join(have)}")
    ss = ShardSet(src)
    m = ss.manifest
    wanted = [r.ref_id for r in ds.refs if r.split in splits]
    if m.level != "sentence" or "box" not in {f.name for f in m.fields} or not any(k in ss for k in wanted):
        raise DataError(f"--from {src}: shard set of stage {m.stage} ({m.level} level) holds no pseudo-box for "
                        f"the {len(wanted)} sentences of split(s) {', '.join(splits)}; pseudo-boxes are written "
                        f"by the refclip-pseudo stage (`grounding run refclip-pseudo`, output "
                        f"data/teachers/refclip-pseudo/<dataset>)")


# ---- prefect --------------------------------------------------------------------------------------------
PrefectHomeOpt = typer.Option(".prefect", "--home", help="PREFECT_HOME of the server (its SQLite database and log)")


@prefect_app.command("up")
def prefect_up(port: Optional[int] = typer.Option(None, help="port on 127.0.0.1 (default: 4200 when free, else a "
                                                              "free one)"),
               home: str = PrefectHomeOpt,
               timeout: float = typer.Option(120, help="seconds to wait for the server's /api/health")) -> None:
    """Start `prefect server start` on 127.0.0.1 in the background, wait until /api/health answers, and print
    the exports for the clients: `eval "$(grounding prefect up)"`."""
    from grounding import prefect_server as P

    err.print(f"starting a Prefect server on {P.HOST} (PREFECT_HOME={Path(home).resolve()}), waiting up to "
              f"{timeout:.0f} s for /api/health ...")
    try:
        st = P.up(Path(home), port, timeout)
    except (RuntimeError, OSError) as e:
        _fail(str(e))
    err.print(f"Prefect server up: pid {st['pid']}, {st['api_url']} (stop it: grounding prefect down)")
    print(f"export PREFECT_API_URL={st['api_url']} PREFECT_HOME={Path(home).resolve()}")


@prefect_app.command("down")
def prefect_down(home: str = PrefectHomeOpt) -> None:
    """Stop the server `grounding prefect up` started under --home."""
    from grounding import prefect_server as P

    st = P.down(Path(home))
    if st is None:
        _fail(f"{home}: no server started by `grounding prefect up` recorded there")
    console.print(f"stopped the Prefect server (pid {st['pid']}, {st['api_url']})")


# ---- weights ----------------------------------------------------------------------------------------------
@weights_app.command("import")
def weights_import(
    src: str = typer.Argument(..., help="a checkpoint that stages refuse (ultralytics .pt, torch.save(model), ...)"),
    out: str = typer.Option(..., "--out", "-o", help="weights-only output (.safetensors: safetensors; else torch)"),
    trust: bool = typer.Option(False, "--trust", help="unpickle SRC (runs code from it): only for files you trust"),
    force: bool = typer.Option(False, "--force", help="overwrite OUT and OUT.json"),
) -> None:
    """Unpickle SRC (only with --trust), write its state dict weights-only to OUT and its provenance to
    OUT.json (source sha256, library and version, class names, model config); stages accept OUT."""
    from grounding.weights import WeightsError, import_weights, sidecar_path

    if not trust:
        _fail(f"{src}: refusing to unpickle without --trust (loading a pickled checkpoint runs code from it). "
              f"Re-run `grounding weights import {src} -o {out} --trust` only if you trust the file; nothing "
              "was written", 2)
    try:
        rec = import_weights(src, out, trust=True, force=force)
    except (WeightsError, OSError) as e:
        _fail(str(e))
    lib = rec["library"]
    console.print(f"wrote {out} ({rec['num_tensors']} tensors from {rec['extracted_from']}, {lib['name']} "
                  f"{lib['version']}, {len(rec['classes'] or [])} class names) and {sidecar_path(out)}")


if __name__ == "__main__":
    app()
