"""Plain HTML for the report: every text goes through :func:`html.escape`, every link is a relative file
path, the stylesheet is a local file. No script, no external URL."""

from __future__ import annotations

import json
from html import escape
from typing import Any, Iterable, Sequence

STYLE = """body{font-family:sans-serif;margin:1.2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;
text-align:left;vertical-align:top}th{background:#eee}code,.mono{font-family:monospace;font-size:12px}
.ok{color:#080;font-weight:bold}.bad{color:#b00;font-weight:bold}.na{color:#888}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.gallery figure{margin:0;border:1px solid #ddd;padding:3px}
.gallery img{max-width:320px;max-height:360px;display:block}figcaption{font-size:12px;max-width:320px}
nav.pager a,nav.pager span{margin-right:.5em}nav.crumbs{margin-bottom:.6em;font-size:13px}
pre{background:#f6f6f6;padding:.4em;overflow-x:auto;font-size:12px;max-height:24em}
"""


def page(title: str, body: str, css: str, crumbs: Sequence[tuple[str, str]] = ()) -> str:
    """A whole document. ``css``: relative path of the stylesheet; ``crumbs``: ``[(href, text)]``."""
    nav = ""
    if crumbs:
        nav = '<nav class="crumbs">' + " › ".join(link(h, t) for h, t in crumbs) + "</nav>\n"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f'<link rel="stylesheet" href="{escape(css)}"></head>\n<body>\n{nav}<h1>{escape(title)}</h1>\n'
            f"{body}\n</body></html>\n")


def link(href: str, text: str) -> str:
    return f'<a href="{escape(href)}">{escape(text)}</a>'


def img(src: str, alt: str) -> str:
    return f'<img src="{escape(src)}" alt="{escape(alt)}">'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (then the caller built them with this module)."""
    cell = (lambda c: c) if raw else escape
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(str(c))}</td>" for c in r) + "</tr>\n" for r in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"


def kv_table(items: Iterable[tuple[str, Any]]) -> str:
    """Two columns: key, value (non-strings as compact JSON)."""
    rows = [(k, v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in items]
    return table(("key", "value"), rows)


def pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def status(verified: list[str] | None) -> str:
    """Verification cell: OK, FAIL (first problem) or not checked."""
    if verified is None:
        return '<span class="na">not checked</span>'
    if not verified:
        return '<span class="ok">OK</span>'
    return f'<span class="bad">FAIL</span> {escape(verified[0])}' + (f" (+{len(verified) - 1} more)" if len(verified) > 1 else "")


def pager(current: int, n_pages: int, name: str = "gallery-{}.html") -> str:
    """Links to every gallery page (``name`` formatted with the 1-based page number); current unlinked."""
    parts = []
    if current > 1:
        parts.append(link(name.format(current - 1), "‹ previous"))
    for p in range(1, n_pages + 1):
        parts.append(f"<span>{p}</span>" if p == current else link(name.format(p), str(p)))
    if current < n_pages:
        parts.append(link(name.format(current + 1), "next ›"))
    return '<nav class="pager">' + " ".join(parts) + "</nav>"


def gallery(figures: Iterable[tuple[str, str]]) -> str:
    """Figures ``[(img src, caption)]`` in a wrapping grid."""
    items = "".join(f"<figure>{img(src, cap)}<figcaption>{escape(cap)}</figcaption></figure>\n"
                    for src, cap in figures)
    return f'<div class="gallery">\n{items}</div>'
