"""HTML building blocks of the report pages: every piece of text goes through `esc` (artifacts
hold model output and editor replies, which may contain anything), and a page is one
self-contained file — inline CSS, images as `data:` URIs, no script, no network."""

from __future__ import annotations

import base64
import html
import json
from typing import Any, Iterable, Sequence

from nslora_plugin.core.util import redact
from nslora_plugin.apps.report.plots import PLOTS_MISSING

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1f24;
       max-width: 1120px; margin: 0 auto; padding: 12px 24px 48px; background: #fff; }
h1 { font-size: 24px; margin: 12px 0 2px; }
h2 { font-size: 19px; margin: 32px 0 8px; padding-top: 8px; border-top: 1px solid #d8dee4; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: #57606a; margin: 0 0 12px; }
nav { margin: 8px 0 16px; font-size: 13px; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid #d8dee4; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
pre, .prompt { background: #f6f8fa; border: 1px solid #d8dee4; border-radius: 4px; padding: 8px 10px;
       white-space: pre-wrap; word-break: break-word; font: 12.5px/1.4 ui-monospace, Menlo, Consolas, monospace;
       margin: 4px 0 10px; }
ins { background: #d3f8d3; color: #0a4d0a; text-decoration: none; }
del { background: #ffd7d5; color: #82071e; }
img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
.note { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 4px; padding: 6px 10px; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 12px; font-weight: 600;
         color: #fff; white-space: nowrap; }
.accepted { background: #2ca02c; } .rejected { background: #d62728; } .fault { background: #ff7f0e; }
.symbolic { background: #7b3fb5; } .numerical { background: #7f7f7f; } .resume { background: #1f77b4; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0 12px; }
.card { border: 1px solid #d8dee4; border-radius: 6px; padding: 6px 12px; flex: 1 1 104px; }
.card b { display: block; font-size: 18px; }
.card span { color: #57606a; font-size: 12px; }
details { margin: 4px 0 8px; } summary { cursor: pointer; color: #0969da; }
.candidate { border: 1px solid #d8dee4; border-radius: 6px; padding: 6px 12px; margin: 10px 0; }
.muted { color: #57606a; }
"""


def esc(value: Any) -> str:
    """`value` as HTML text (None as an en dash), with any secret this process knows scrubbed
    (the artifacts are scrubbed when written; this is the second net)."""
    return "–" if value is None else html.escape(redact(str(value)), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: floats rounded, the rest as text, escaped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return esc(f"{value:.{digits}f}")
    if isinstance(value, (dict, list)):
        return esc(json.dumps(value, ensure_ascii=False, default=str))
    return esc(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric: Sequence[int] = (),
          raw: Sequence[int] = ()) -> str:
    """A table; `numeric` columns are right-aligned, `raw` columns are HTML already (escaped by
    the caller), every other cell is formatted and escaped here."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = cell if i in raw else fmt(cell)
            cells.append(f'<td class="num">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        return '<p class="muted">none</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv_table(items: Iterable[tuple[str, Any]]) -> str:
    return table(["key", "value"], [(k, v) for k, v in items])


def badge(kind: str, text: str | None = None) -> str:
    return f'<span class="badge {esc(kind)}">{esc(text or kind)}</span>'


def image(png: bytes | None, alt: str) -> str:
    """An embedded PNG, or the note that says why there is none."""
    if png is None:
        return f'<p class="note">{esc(PLOTS_MISSING)}</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def section(id_: str, title: str, body: str) -> str:
    return f'<section id="{esc(id_)}"><h2>{esc(title)}</h2>\n{body}\n</section>\n'


def document(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole page: title, a table of contents, and the sections as (id, title, body HTML)."""
    nav = "".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t, _ in sections)
    parts = "".join(section(i, t, b) for i, t, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{esc(title)}</h1>\n<p class=\"sub\">{esc(subtitle)}</p>\n<nav>{nav}</nav>\n"
            f"{parts}</body>\n</html>\n")
