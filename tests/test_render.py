"""The CLI's rendering of library data: exact text where scripts or eyes depend on it.

The expected strings were printed by the pre-refactor implementation (the library printed
then) for the same data, so these tests pin the command line's output across the move.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from embedstore.cli import render
from embedstore.cli.progress import RichReporter
from rich.console import Console

from embedstore.evaluate import EvalResult
from embedstore.extract import ExtractSummary
from embedstore.progress import NullBar
from embedstore.store import GcReport, Problem, VerifyReport


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> dict[str, io.StringIO]:
    """Both consoles at 80 columns into buffers (a real terminal's width would vary)."""
    bufs = {"out": io.StringIO(), "err": io.StringIO()}
    monkeypatch.setattr(render, "console", Console(file=bufs["out"], width=80, highlight=False))
    monkeypatch.setattr(render, "err_console", Console(file=bufs["err"], width=80, highlight=False))
    return bufs


def _eval_result(**kw: object) -> EvalResult:
    base: dict = dict(
        split="test", n=10, n_pos=5,
        models=[
            {"key": "ctpa_only", "auc": 0.2, "auc_ci": [0.0, 0.481], "accuracy": 0.3,
             "sensitivity": 0.0, "specificity": 0.6},
            {"key": "cxr_only", "auc": 0.8, "auc_ci": [0.44, 1.0], "accuracy": 0.7,
             "sensitivity": 0.8, "specificity": 0.6},
            {"key": "distilled", "auc": 0.2, "auc_ci": [0.0, 0.6], "accuracy": 0.3,
             "sensitivity": 0.0, "specificity": 0.6, "delta_auc_vs_cxr_only": -0.6,
             "delta_auc_ci": [-1.0, 0.08]},
        ],
        comparisons=[],
        retrieval=[
            {"key": "distilled", "recall@1": 0.4, "recall@5": 0.8, "recall@10": 1.0,
             "median_rank": 2.0, "n_db": 10},
            {"key": "shuffled_control", "recall@1": 0.0, "recall@5": 0.7, "recall@10": 1.0,
             "median_rank": 4.0, "n_db": 10},
        ],
        config={"seed": 0},
        notes=["thresholds note", "CI note",
               "Distilled - CXR-only: dAUC -0.600, 95% CI [-1.000, +0.080] (includes 0: not "
               "significant); DeLong p = 0.0935."],
        out_dir=Path("/reports/r1"), report=Path("/reports/r1/report.html"))
    base.update(kw)
    return EvalResult(**base)


EVAL_TEXT = (
    "test split: 10 patients, 5 with PE; thresholds chosen on validation\n"
    "                                                   \n"
    " model              AUC [95% CI]   acc  sens  spec \n"
    " ───────────────────────────────────────────────── \n"
    " ctpa_only  0.200 [0.000, 0.481]  0.30  0.00  0.60 \n"
    " cxr_only   0.800 [0.440, 1.000]  0.70  0.80  0.60 \n"
    " distilled  0.200 [0.000, 0.600]  0.30  0.00  0.60 \n"
    "                                                   \n"
    "Paired ΔAUC on the same test patients (95% CI: patient bootstrap)\n"
    "                                    \n"
    " model             ΔAUC vs cxr_only \n"
    " ────────────────────────────────── \n"
    " distilled  -0.600 [-1.000, +0.080] \n"
    "                                    \n"
    "ctpa_only: CTPA teacher | cxr_only: radiograph classifier | distilled: CXR -> \n"
    "diffusion prior -> teacher | ridge_mean_only: the teacher on the prior's ridge \n"
    "mean (no diffusion) | prior_plain: the prior without ridge mean | softlabel_kd: \n"
    "a CXR head on the teacher's soft labels | ridge_*: deterministic ablations\n"
    "Retrieval: the patient's own CTPA among the split's,    \n"
    "queried with the generated embedding                    \n"
    "                                                        \n"
    " query               R@1    R@5   R@10  median rank  of \n"
    " ────────────────────────────────────────────────────── \n"
    " distilled         0.400  0.800  1.000            2  10 \n"
    " shuffled_control  0.000  0.700  1.000            4  10 \n"
    "                                                        \n"
    "- Distilled - CXR-only: dAUC -0.600, 95% CI [-1.000, +0.080] (includes 0: not \n"
    "significant); DeLong p = 0.0935.\n"
    "Report: /reports/r1/report.html\n"
)


def test_eval_table_is_the_papers_table(screen: dict[str, io.StringIO]) -> None:
    render.eval_result(_eval_result())
    assert screen["out"].getvalue() == EVAL_TEXT
    assert screen["err"].getvalue() == ""


def test_eval_result_to_dict_is_metrics_json_in_its_key_order() -> None:
    d = _eval_result().to_dict()
    assert list(d) == ["split", "n", "n_pos", "models", "comparisons", "retrieval", "config",
                       "notes", "out_dir", "report"]
    assert d["out_dir"] == "/reports/r1" and d["report"] == "/reports/r1/report.html"
    full = _eval_result(report=None, sampling_grid={"distilled": []}, uncertainty={"distilled": {}},
                        label_efficiency=[{"fraction": 0.1}]).to_dict()
    assert list(full) == ["split", "n", "n_pos", "models", "comparisons", "retrieval",
                          "sampling_grid", "uncertainty", "label_efficiency", "config", "notes",
                          "out_dir"]
    assert full["label_efficiency"] == [{"fraction": 0.1}]


@pytest.mark.parametrize(("summary", "line"), [
    (ExtractSummary("CXR", "demo-cxr-78a98daa8f", selected=40, done=40, seconds=3.8),
     "CXR [demo-cxr-78a98daa8f]: 40 selected, 40 embedded (10.5/s); 0 cached; 0 failed in 3.8 s."),
    (ExtractSummary("CTPA", "k", selected=5, cached=5, seconds=0.2),
     "CTPA [k]: 5 selected, 0 embedded; 5 cached (nothing to do); 0 failed in 0.2 s."),
    (ExtractSummary("CXR", "k", selected=6, done=2, cached=1, failed=3, seconds=2.0,
                    failures_by_reason={"undecodable": 1, "path_not_found": 2}, interrupted=True),
     "CXR [k]: 6 selected, 2 embedded (1.0/s); 1 cached; 3 FAILED (path_not_found x2, "
     "undecodable x1; see `embedstore query STORE \"SELECT * FROM failures\"`); INTERRUPTED: "
     "re-run to resume in 2.0 s."),
], ids=["embedded", "cached", "failed"])
def test_extract_summary_line(summary: ExtractSummary, line: str) -> None:
    assert render.extract_summary_line(summary) == line


def test_finished_steps_go_to_stderr(screen: dict[str, io.StringIO]) -> None:
    run = SimpleNamespace(kind="teacher", run_id="t0", path=Path("/s/runs/t0"),
                          metrics={"val_auc": 0.625, "best_epoch": 0, "seconds": 0.012})
    ridge = SimpleNamespace(kind="ridge_logit", run_id="r1", path=Path("/s/runs/r1"),
                            metrics={"val_auc": 0.875, "best_epoch": 2, "seconds": 0.5, "alpha": 0.1})
    assert render.run_line(run) == ("teacher run t0: validation AUC 0.625 (best epoch 1, 0.0 s) "
                                    "-> /s/runs/t0")
    assert render.run_line(ridge) == ("ridge_logit run r1: validation AUC 0.875 (alpha 0.1, 0.5 s) "
                                      "-> /s/runs/r1")
    RichReporter().done(ExtractSummary("CTPA", "k", selected=5, cached=5, seconds=0.2))
    assert screen["err"].getvalue() == ("CTPA [k]: 5 selected, 0 embedded; 5 cached (nothing to "
                                        "do); 0 failed in 0.2 s.\n")
    assert screen["out"].getvalue() == ""


def test_progress_status_text() -> None:
    assert render.progress_status(ExtractSummary("CXR", "k", done=3, cached=2, failed=1)) == \
        "new 3 cached 2 failed 1"
    assert render.progress_status({"epoch": 3, "train_loss": 0.7154, "val_auc": 0.625}) == \
        "loss 0.715 val AUC 0.625"
    assert render.progress_status({"epoch": 3, "train_loss": 0.7154, "val_auc": None}) == "loss 0.715"
    assert render.progress_status(None) == ""


def test_gc_and_verify_reports(screen: dict[str, io.StringIO]) -> None:
    dry = GcReport(dry_run=True, superseded_rows={"CXR/k": 1, "CTPA/k": 0},
                   orphan_temp_files=("sets/x/c.partial",))
    render.gc_report(dry)
    render.gc_report(GcReport(dry_run=False, superseded_rows={"CXR/k": 1}, bytes_freed=1 << 20))
    render.gc_report(GcReport(dry_run=True))
    render.verify_report(VerifyReport(problems=(), sets_checked=2, rows_checked=80))
    render.verify_report(VerifyReport(problems=(Problem("orphan_temp_file", "sets/c.partial",
                                                        "killed", "warning"),),
                                      sets_checked=2, rows_checked=81))
    assert screen["out"].getvalue() == (
        "Would remove:\n"
        "  - 1 superseded rows in CXR/k\n"
        "  - orphan temp file: sets/x/c.partial\n"
        "Dry run: nothing was changed. Re-run with --yes to remove them.\n"
        "Removed:\n"
        "  - 1 superseded rows in CXR/k\n"
        "Freed 1.0 MB.\n"
        "Nothing to collect: no superseded rows, unreferenced sets or orphan files.\n"
        "OK: 80 committed rows in 2 set(s) verified, no problems.\n"
        "1 problem(s) in 81 committed rows of 2 set(s) (nothing was modified):\n"
        "  - kind=orphan_temp_file, path=sets/c.partial, detail=killed, severity=warning\n")


def test_tables_show_data_literally(screen: dict[str, io.StringIO]) -> None:
    # a manifest value that looks like rich markup is data: shown as typed, not styled away
    render.neighbor_table("S[1]", [{"rank": 1, "study_id": "[bold]x", "cosine": 0.5, "age": None}])
    out = screen["out"].getvalue()
    assert "nearest studies to S[1]" in " ".join(out.split()) and "[bold]x" in out
    [header] = [ln for ln in out.splitlines() if "rank" in ln]
    assert header.split() == ["┃", "rank", "┃", "study_id", "┃", "cosine", "┃", "age", "┃"]


@dataclass
class _WithToDict:
    path: Path

    def to_dict(self) -> dict:
        return {"path": self.path, "t": (1, 2)}


def test_one_json_printer(capsys: pytest.CaptureFixture[str]) -> None:
    render.print_json(_WithToDict(Path("/a")))
    assert json.loads(capsys.readouterr().out) == {"path": "/a", "t": [1, 2]}
    render.print_json({"when": object, "n": 1})  # anything else falls back to str()
    assert json.loads(capsys.readouterr().out)["n"] == 1


def test_progress_bars_off_by_environment(monkeypatch: pytest.MonkeyPatch,
                                          screen: dict[str, io.StringIO]) -> None:
    monkeypatch.setenv("EMBEDSTORE_NO_PROGRESS", "1")
    with RichReporter().bar("extract CXR", 3) as bar:
        assert isinstance(bar, NullBar)
        bar.update(3, status=ExtractSummary("CXR", "k", done=3))
    assert screen["err"].getvalue() == ""
    monkeypatch.delenv("EMBEDSTORE_NO_PROGRESS")
    with RichReporter().bar("extract CXR", None) as bar:
        bar.update(3, total=3, status=ExtractSummary("CXR", "k", done=3))
    err = screen["err"].getvalue()
    assert err.startswith("extract CXR") and "3/3" in err and "new 3 cached 0 failed 0" in err
