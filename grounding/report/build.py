"""Write the static report site: ``index.html`` (every shard set: size, rows, verification), one page per
set (provenance, score histograms, recorded errors) with a paged gallery of its rows rendered worst first,
and ``metrics.html`` (students' accuracies and training curves). Only the rows shown are rendered."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from grounding.report import html as H
from grounding.report.collect import (MetricsFile, SetInfo, curve_series, find_metrics, find_sets, row_quality,
                                      scalar_items, score_values)
from grounding.units import human_bytes

log = logging.getLogger(__name__)

MAX_BOXES = 10  # boxes drawn per field in a gallery image (teachers' top-K come score-sorted)


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and what it holds."""

    index: Path
    sets: int
    rendered: int
    seconds: float


def _slug(path: Path, roots: list[Path]) -> str:
    """A file-system-safe, unique folder name for a set (its path below the root that holds it)."""
    p = path.resolve()
    rel = next((p.relative_to(r) for r in roots if p.is_relative_to(r)), Path(p.name))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(rel.parts)) or "set"


def build_report(roots: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str], *, per_page: int = 24,
                 max_pages: int = 2, verify: bool = True) -> ReportResult:
    """Write the site for the shard sets and metrics under ``roots`` into ``out`` (replaced if it holds
    an earlier report); returns the index path. ``per_page`` rows per gallery page, at most
    ``max_pages`` pages per set."""
    if per_page < 1 or max_pages < 0:
        raise ValueError(f"per_page must be >= 1 and max_pages >= 0 (got {per_page}, {max_pages})")
    t0 = time.perf_counter()
    roots = [Path(r) for r in roots]
    for r in roots:  # before anything is deleted
        if not r.is_dir():
            raise FileNotFoundError(f"{r}: no such directory (give the data directory, e.g. `data`)")
    out = Path(out)
    if out.exists() and not (out / "index.html").is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not a report (no index.html); pick an empty or new directory")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "style.css").write_text(H.STYLE)
    sets = find_sets(roots, verify=verify)
    metrics = find_metrics(roots)
    resolved = [r.resolve() for r in roots]
    rendered = 0
    rows = []
    used: set[str] = set()
    for info in sets:
        slug = base = _slug(info.path, resolved)
        n = 1
        while slug in used:  # the same relative path under two roots
            n += 1
            slug = f"{base}-{n}"
        used.add(slug)
        rendered += _set_pages(info, out / "sets" / slug, per_page, max_pages)
        m = info.manifest
        rows.append((H.link(f"sets/{slug}/index.html", info.title), H.escape(str(info.path)),
                     H.escape(m.level if m else "-"), f"{m.n_rows:,}" if m else "-",
                     str(len(m.shards)) if m else "-", human_bytes(info.size),
                     H.status(info.verified) if m else f'<span class="bad">unreadable</span> {H.escape(info.error)}',
                     str(len(m.errors)) if m else "-"))
    body = [f"<p>{len(sets)} shard sets under {H.escape(', '.join(map(str, roots)))}. "
            f'{H.link("metrics.html", "Students’ metrics and training curves")} '
            f"({sum(not m.curve for m in metrics)} metrics files, {sum(m.curve for m in metrics)} curves).</p>",
            H.table(("set", "path", "level", "rows", "shards", "size", "verification", "errors"), rows, raw=True)]
    if not sets:
        body.append("<p>No shard sets found (run a stage first, e.g. <code>grounding run gt-boxes</code>).</p>")
    (out / "index.html").write_text(H.page("grounding report", "\n".join(body), "style.css"))
    _metrics_page(metrics, out)
    return ReportResult(out / "index.html", len(sets), rendered, round(time.perf_counter() - t0, 2))


def _set_pages(info: SetInfo, d: Path, per_page: int, max_pages: int) -> int:
    """The set's page and gallery pages; returns how many rows were rendered."""
    from grounding.shards import ShardError, ShardSet

    d.mkdir(parents=True, exist_ok=True)
    crumbs = [("../../index.html", "index")]
    css = "../../style.css"
    m = info.manifest
    if m is None:
        (d / "index.html").write_text(H.page(info.title, H.pre(info.error), css, crumbs))
        return 0
    body = [f"<p>{m.n_rows:,} {H.escape(m.level)}-level rows in {len(m.shards)} shards, {human_bytes(info.size)}, "
            f"at <code>{H.escape(str(info.path))}</code>. Verification: {H.status(info.verified)}</p>",
            "<h2>Provenance</h2>", H.kv_table(_provenance(m))]
    rendered = 0
    try:
        shards = ShardSet(info.path)
    except ShardError as e:
        body.append(f"<p class='bad'>cannot open: {H.escape(str(e))}</p>")
        shards = None
    if shards is not None:
        with shards:
            from grounding.report import plots

            hist = plots.histograms(score_values(shards), m.stage, d / "hist.png")
            if hist is not None:
                body += ["<h2>Scores</h2>", H.img("hist.png", f"histograms of {m.stage}")]
            body.append("<h2>Fields</h2>")
            body.append(H.table(("field", "dtype", "row shape", "meaning"),
                                [(f.name, f.dtype, ("K, " if f.ragged else "") + ", ".join(map(str, f.shape)), f.meaning)
                                 for f in m.fields]))
            n_pages, rendered, note = _gallery(shards, d, per_page, max_pages, crumbs)
            body.append("<h2>Gallery</h2>")
            if n_pages:
                body.append(f"<p>{H.escape(note)} {H.link('gallery-1.html', 'open the gallery')}</p>")
                body.append(H.pager(0, n_pages))
            else:
                body.append(f"<p>{H.escape(note)}</p>")
    body.append(f"<h2>Recorded errors ({len(m.errors)})</h2>")
    if m.errors:
        body.append(H.table(("item", "reason"), [(e.get("item", ""), e.get("reason", "")) for e in m.errors[:500]]))
    else:
        body.append("<p>none</p>")
    (d / "index.html").write_text(H.page(f"{m.stage} · {info.path}", "\n".join(body), css, crumbs))
    return rendered


def _provenance(m) -> list[tuple[str, object]]:
    weights = {k: v for k, v in m.teacher.items() if "sha256" in k}
    return [("stage", m.stage), ("stage key", m.stage_key), ("teacher", m.teacher),
            ("weights sha256", weights or "-"), ("params", m.params),
            ("inputs (dataset fingerprint, upstream keys)", m.inputs),
            ("code version", f"grounding {m.package_version}, shard format v{m.format_version}"
                             + (f", content base {m.content_base[:16]}" if m.content_base else "")),
            ("rows per shard", m.rows_per_shard),
            *((f"extra.{k}", v) for k, v in sorted(m.extra.items()) if len(str(v)) < 400)]


def _gallery(shards, d: Path, per_page: int, max_pages: int, crumbs) -> tuple[int, int, str]:
    """Render the first ``per_page * max_pages`` rows (worst first) into gallery pages."""
    from grounding.data.schema import DataError
    from grounding.render import dataset_of, render_loaded
    from grounding.shards import ShardError

    m = shards.manifest
    if m.level not in ("image", "region", "sentence") or max_pages == 0 or len(shards) == 0:
        return 0, 0, f"no gallery for {m.level}-level rows" if len(shards) else "no rows"
    try:
        ds = dataset_of(shards)
    except (ShardError, DataError, OSError) as e:
        return 0, 0, f"no gallery: {e}"
    gt = {r.ref_id: tuple(r.box) for r in ds.refs if r.box is not None} if m.level == "sentence" else {}
    gt_images: dict[str, np.ndarray] = {}
    if m.level in ("image", "region"):
        by_image: dict[str, set] = {}
        for r in ds.refs:
            if r.box is not None:
                by_image.setdefault(r.image_id, set()).add(tuple(r.box))
        gt_images = {k: np.array(sorted(v), dtype=np.float64).reshape(-1, 4) for k, v in by_image.items()}
    keys, captions = row_quality(shards, gt, gt_images)
    shown = keys[:per_page * max_pages]
    n_pages = (len(shown) + per_page - 1) // per_page
    order = "worst first by " + next(iter(captions.values())).rsplit(" ", 1)[0] if captions else "in key order"
    note = f"{len(shown)} of {len(keys):,} rows, {order}, {per_page} per page; at most {MAX_BOXES} boxes per field drawn."
    rendered = 0
    for p in range(1, n_pages + 1):
        figs = []
        for key in shown[(p - 1) * per_page:p * per_page]:
            name = f"img/{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}.jpg"
            cap = f"{key}" + (f" · {captions[key]}" if key in captions else "")
            try:
                render_loaded(shards, ds, key, d / name, caption=captions.get(key), max_boxes=MAX_BOXES)
            except (KeyError, ShardError, DataError, OSError) as e:
                cap += f" · not rendered: {e}"
                name = ""
            rendered += bool(name)
            if name:
                figs.append((name, cap))
        body = f"<p>{H.escape(note)}</p>\n{H.pager(p, n_pages)}\n{H.gallery(figs)}\n{H.pager(p, n_pages)}"
        (d / f"gallery-{p}.html").write_text(H.page(f"{m.stage} · gallery page {p}/{n_pages}", body,
                                                    "../../style.css", [*crumbs, ("index.html", m.stage)]))
    return n_pages, rendered, note


def _metrics_page(metrics: list[MetricsFile], out: Path) -> None:
    from grounding.report import plots

    d = out / "metrics"
    body: list[str] = []
    acc = {mf.name: mf.doc["acc50"] for mf in metrics if not mf.curve and isinstance(mf.doc, dict)
           and isinstance(mf.doc.get("acc50"), dict)
           and all(isinstance(v, (int, float)) for v in mf.doc["acc50"].values())}
    if acc:
        plots.accuracy_bars(acc, d / "acc50.png")
        body += ["<h2>Students: Acc@0.5</h2>", H.img("metrics/acc50.png", "Acc@0.5 per student and split"),
                 H.table(("student", *sorted({s for v in acc.values() for s in v})),
                         [(n, *(f"{100 * v[s]:.1f} %" if s in v else "-" for s in sorted({s for v in acc.values() for s in v})))
                          for n, v in acc.items()])]
    curves = [mf for mf in metrics if mf.curve]
    if curves:
        body.append("<h2>Training curves</h2>")
    for mf in curves:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", mf.name) + ".png"
        png = plots.curve_plot(curve_series(mf.doc), mf.name, d / name)
        body.append(f"<h3>{H.escape(mf.name)}</h3>")
        body.append(H.img(f"metrics/{name}", f"training curve {mf.name}") if png else "<p>no numeric columns</p>")
    others = [mf for mf in metrics if not mf.curve]
    if others:
        body.append("<h2>Metrics files</h2>")
    for mf in others:
        body += [f"<h3>{H.escape(mf.name)} <span class='mono'>({H.escape(str(mf.path))})</span></h3>",
                 H.kv_table(scalar_items(mf.doc))]
    if not metrics:
        body.append("<p>No metrics files found (students write <code>data/metrics/*.json</code>).</p>")
    (out / "metrics.html").write_text(H.page("metrics and training curves", "\n".join(body), "style.css",
                                             [("index.html", "index")]))
