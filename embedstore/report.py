"""The evaluation report: one self-contained HTML file, plus a Markdown table helper.

The HTML embeds every figure as a base64 ``data:`` URI and inlines its CSS, so the single file can
be mailed or attached to a ticket and still opens offline. Every piece of caller-provided text
(model names, notes, config values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from embedstore._fsio import atomic_write_bytes
from embedstore.errors import ConfigError

__all__ = ["write_html_report", "markdown_table", "format_cell"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; } h2 { font-size: 1.3rem; margin-top: 2rem;
     border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.meta { color: #666; font-size: .9rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .92rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; white-space: nowrap; }
th { background: #f2f4f7; } td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.2rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: .92rem; margin-top: .3rem; }
details { margin: .4rem 0; } summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f8fa; padding: .7rem; overflow-x: auto; font-size: .82rem; }
ul.notes li { margin: .25rem 0; }
"""


def format_cell(value, digits: int = 3) -> str:
    """Human text for a table cell: floats to ``digits`` decimals, a 2-list as ``[lo, hi]``,
    None/NaN as an en dash, dicts as compact JSON."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "\u2013"
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            return (
                f"[{format_cell(float(value[0]), digits)}, {format_cell(float(value[1]), digits)}]"
            )
        return ", ".join(format_cell(v, digits) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    try:  # numpy scalars
        import numpy as np

        if isinstance(value, np.generic):
            return format_cell(value.item(), digits)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return str(value)


def _columns(
    rows: Sequence[Mapping], columns: Sequence[str] | Mapping[str, str] | None
) -> list[tuple[str, str]]:
    """(key, header) pairs: given columns, or every key in first-seen order."""
    if columns is None:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        return [(k, k) for k in keys]
    if isinstance(columns, Mapping):
        return [(str(k), str(v)) for k, v in columns.items()]
    return [(str(k), str(k)) for k in columns]


def markdown_table(
    rows: Sequence[Mapping],
    columns: Sequence[str] | Mapping[str, str] | None = None,
    *,
    digits: int = 3,
) -> str:
    """A GitHub-flavoured Markdown table of ``rows``; ``columns`` are keys (or key -> header);
    missing values print as an en dash and pipes in text are escaped."""
    cols = _columns(rows, columns)
    if not cols:
        raise ConfigError(
            "markdown_table needs at least one column, got none.", reason="bad_config"
        )

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(esc(h) for _, h in cols) + " |",
        "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(cols))) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(esc(format_cell(r.get(k), digits)) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def _html_table(rows: Sequence[Mapping], columns=None, digits: int = 3) -> str:
    cols = _columns(rows, columns)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    body = "\n".join(
        "<tr>"
        + "".join(f"<td>{html.escape(format_cell(r.get(k), digits))}</td>" for k, _ in cols)
        + "</tr>"
        for r in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _png_data_uri(caption: str, png: str | os.PathLike) -> str:
    p = Path(png)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"Figure {caption!r} points at {p}, which cannot be read ({e.strerror}); write the "
            "figure first or drop it from the report.",
            reason="missing_figure",
        ) from e
    if not data.startswith(_PNG_MAGIC):
        raise ConfigError(
            f"Figure {caption!r} at {p} is not a PNG file; the report embeds PNGs only.",
            reason="missing_figure",
        )
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def write_html_report(
    path: str | os.PathLike,
    *,
    title: str,
    table_rows: Sequence[Mapping],
    figures: Mapping[str, str | os.PathLike],
    configs: Mapping[str, Mapping] | None = None,
    notes: Sequence[str] = (),
    retrieval: Sequence[Mapping] | None = None,
    columns: Sequence[str] | Mapping[str, str] | None = None,
    comparisons: Sequence[Mapping] | None = None,
) -> Path:
    """Write the single-file HTML report and return its path.

    Sections: results table (``columns`` selects/renames keys; default every key), paired
    comparisons, retrieval diagnostics, notes, figures (each embedded as a data URI with
    ``alt`` and a caption naming its source file) and each run's config in a ``<details>``
    block. Nothing is fetched from outside the file."""
    path = Path(path)
    figure_html = []
    for i, (caption, png) in enumerate(figures.items(), start=1):
        uri = _png_data_uri(caption, png)
        name = Path(png).name
        figure_html.append(
            f'<figure id="fig-{i}" data-source="{html.escape(name)}">'
            f'<img src="{uri}" alt="{html.escape(caption)}">'
            f"<figcaption>Figure {i}. {html.escape(caption)} "
            f'<span class="meta">({html.escape(name)})</span></figcaption></figure>'
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">Generated {html.escape(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))} '
        "by embedstore. Self-contained: figures are embedded; nothing is loaded from elsewhere.</p>",
        "<h2>Results</h2>",
        _html_table(table_rows, columns) if table_rows else "<p>No results.</p>",
    ]
    if comparisons:
        parts += ["<h2>Paired comparisons</h2>", _html_table(comparisons)]
    if retrieval:
        parts += [
            "<h2>Retrieval diagnostics</h2>",
            "<p>Each generated CTPA embedding queried against the test set's real CTPA embeddings "
            "(cosine, exact search); rank 1 = its own patient's scan.</p>",
            _html_table(retrieval),
        ]
    if notes:
        items = "".join(f"<li>{html.escape(str(n))}</li>" for n in notes)
        parts += ["<h2>Notes</h2>", f'<ul class="notes">{items}</ul>']
    if figure_html:
        parts += ["<h2>Figures</h2>", *figure_html]
    if configs:
        parts.append("<h2>Run configurations</h2>")
        for name, cfg in configs.items():
            text = json.dumps(cfg, indent=2, sort_keys=True, default=str)
            parts.append(
                f"<details><summary>{html.escape(str(name))}</summary><pre>{html.escape(text)}</pre></details>"
            )
    parts.append("</body></html>")
    doc = "\n".join(parts) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, doc.encode("utf-8"))
    return path
