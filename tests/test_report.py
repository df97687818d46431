"""Figures are real PNGs; the HTML report is one self-contained, escaped file with every figure."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from embedstore.errors import ConfigError
from embedstore.plots import (
    plot_auc_vs_sampling,
    plot_label_efficiency,
    plot_reliability,
    plot_roc,
    plot_uncertainty_vs_error,
)
from embedstore.report import format_cell, markdown_table, write_html_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _scores(seed: int, signal: float, n: int = 200):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    logit = signal * (y - 0.4) * 3 + rng.normal(size=n)
    return y, 1 / (1 + np.exp(-logit))


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    curves = {
        "CTPA-only": _scores(0, 1.5),
        "Distilled CXR": _scores(0, 0.8),
        "CXR-only": _scores(0, 0.3),
    }
    paths = {
        "ROC curves": plot_roc(curves, out / "roc.png", n_resamples=200),
        "Reliability": plot_reliability(curves, out / "reliability.png"),
        "AUC vs sampling": plot_auc_vs_sampling(
            [
                {
                    "num_samples": n,
                    "steps": s,
                    "auc": 0.6 + 0.02 * np.log2(n) + s / 1000,
                    "lo": 0.55,
                    "hi": 0.8,
                }
                for n in (1, 2, 4, 8, 16)
                for s in (10, 50)
            ],
            out / "sampling.png",
            references={"CXR-only": 0.59, "ridge": 0.70},
        ),
        "Uncertainty vs error": plot_uncertainty_vs_error(
            np.random.default_rng(1).random(300),
            np.random.default_rng(1).random(300) * 0.5 + np.random.default_rng(2).random(300) * 0.3,
            out / "uncertainty.png",
        ),
        "Label efficiency": plot_label_efficiency(
            [
                {
                    "fraction": f,
                    "model": m,
                    "auc": a + 0.1 * f,
                    "lo": a + 0.1 * f - 0.05,
                    "hi": a + 0.1 * f + 0.05,
                }
                for f in (0.05, 0.1, 0.25, 0.5, 1.0)
                for m, a in (("CXR-only", 0.55), ("distilled", 0.65))
            ],
            out / "label_eff.png",
            references={"CTPA-only (teacher)": 0.87},
        ),
    }
    return paths


def test_plots_write_nonempty_pngs_and_close_figures(figures):
    import matplotlib.pyplot as plt

    for caption, p in figures.items():
        w, h = _png_size(p)
        assert w >= 600 and h >= 500, caption  # readable at 150 dpi, not a thumbnail
        assert p.stat().st_size > 10_000, caption  # something was drawn
    assert plt.get_fignums() == []  # nothing left open in pyplot


def test_plots_are_deterministic(tmp_path):
    y, p = _scores(3, 1.0)
    a = plot_roc({"m": (y, p)}, tmp_path / "a.png", n_resamples=100)
    b = plot_roc({"m": (y, p)}, tmp_path / "b.png", n_resamples=100)
    assert a.read_bytes() == b.read_bytes()
    c = plot_roc({"m": (y, p[::-1])}, tmp_path / "c.png", n_resamples=100)
    assert c.read_bytes() != a.read_bytes()


def test_plot_input_errors(tmp_path):
    with pytest.raises(ConfigError, match="at least one"):
        plot_roc({}, tmp_path / "x.png")
    with pytest.raises(ConfigError, match=r"lacks \['hi'\]"):
        plot_label_efficiency(
            [{"fraction": 1, "model": "m", "auc": 0.5, "lo": 0.4}], tmp_path / "x.png"
        )


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action"):
                self.refs.append((tag, name, value or ""))


def test_html_report_is_self_contained_and_references_every_figure(figures, tmp_path):
    rows = [
        {"model": "CTPA-only", "auc": 0.871, "auc_ci": [0.80, 0.93], "sensitivity": 0.8},
        {
            "model": "<b>distilled</b>",
            "auc": 0.72,
            "auc_ci": [0.63, 0.8],
            "sensitivity": float("nan"),
        },
    ]
    note = "Diffusion < ridge here: <script>alert(1)</script>"
    path = write_html_report(
        tmp_path / "report" / "report.html",
        title="PE evaluation & more",
        table_rows=rows,
        figures=figures,
        configs={"distilled": {"lr": 1e-3, "note": "</pre><img src=x>"}},
        notes=[note],
        retrieval=[{"model": "distilled", "recall@1": 0.2, "median_rank": 4.0}],
    )
    doc = path.read_text()
    parser = _Refs()
    parser.feed(doc)
    assert parser.refs, "the report should embed its figures"
    for tag, attr, value in parser.refs:
        assert value.startswith("data:image/png;base64,"), (tag, attr, value[:40])
    assert "script" not in parser.tags and "link" not in parser.tags
    assert not re.search(r"url\(|@import|https?://", doc)
    # every figure is embedded byte for byte, with its caption
    embedded = [base64.b64decode(v.split(",", 1)[1]) for _, _, v in parser.refs]
    for caption, p in figures.items():
        assert p.read_bytes() in embedded
        assert caption in doc
    assert len(embedded) == len(figures)
    # caller text is escaped, not interpreted
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert "&lt;b&gt;distilled&lt;/b&gt;" in doc
    assert "&lt;/pre&gt;&lt;img src=x&gt;" in doc
    assert "<details><summary>distilled</summary>" in doc
    assert "[0.800, 0.930]" in doc and "recall@1" in doc
    assert "PE evaluation &amp; more" in doc


def test_html_report_refuses_missing_or_non_png_figure(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read") as e:
        write_html_report(
            tmp_path / "r.html", title="t", table_rows=[], figures={"ROC": tmp_path / "nope.png"}
        )
    assert e.value.reason == "missing_figure"
    txt = tmp_path / "fake.png"
    txt.write_text("not a png")
    with pytest.raises(ConfigError, match="not a PNG"):
        write_html_report(tmp_path / "r.html", title="t", table_rows=[], figures={"ROC": txt})
    assert not (tmp_path / "r.html").exists()


def test_markdown_table():
    rows = [
        {"model": "a|b", "auc": 0.87123, "auc_ci": (0.8, 0.93), "n": 120},
        {"model": "c", "auc": None, "auc_ci": [0.5, 0.6]},
    ]
    md = markdown_table(rows, ["model", "auc", "auc_ci", "n"])
    lines = md.strip().splitlines()
    assert lines[0] == "| model | auc | auc_ci | n |"
    assert lines[1] == "|:---|---:|---:|---:|"
    assert lines[2] == "| a\\|b | 0.871 | [0.800, 0.930] | 120 |"
    assert lines[3] == "| c | \u2013 | [0.500, 0.600] | \u2013 |"
    renamed = markdown_table(rows, {"model": "Model", "auc": "AUC"})
    assert renamed.splitlines()[0] == "| Model | AUC |"
    assert format_cell(np.float32(0.5)) == "0.500" and format_cell(True) == "yes"
