"""Everything the command line shows: one table renderer, one JSON printer, and the text of each
command's result. The library returns data (dataclasses, dicts, Arrow tables); this module turns
it into terminal output. Tables, results and narration go to stdout; progress, per-step summaries
and errors to stderr (``err_console``), so ``--json`` and ``--format csv`` output stays clean.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # the renderers take library types; importing them here would load torch
    import pyarrow as pa

    from embedstore.demo import DemoResult
    from embedstore.drr import DrrSummary
    from embedstore.evaluate import EvalResult
    from embedstore.experiment import ExperimentResult
    from embedstore.extract import ExtractSummary
    from embedstore.interchange import ExportSummary, ImportSummary
    from embedstore.query import QueryResult
    from embedstore.runs import Run
    from embedstore.store import GcReport, VerifyReport
    from embedstore.train import TrainingResult

__all__ = [
    "Col",
    "console",
    "err_console",
    "print_json",
    "print_table",
    "progress_status",
]

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


# ------------------------------------------------------------------------------------------------
# The two primitives: JSON and tables
# ------------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        return _jsonable(to_dict() if callable(to_dict) else asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def print_json(obj: Any) -> None:
    """Raw JSON on stdout (never through rich, which would wrap long lines and break it)."""
    typer.echo(json.dumps(_jsonable(obj), indent=2, default=str))


@dataclass(frozen=True)
class Col:
    """A table column: ``right`` aligns numbers, ``wrap`` folds long cells instead of keeping
    each on one line."""

    header: str
    right: bool = False
    wrap: bool = False


def print_table(
    columns: Sequence[Col],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    caption: str | None = None,
    boxed: bool = True,
    compact: bool = False,
    align: str = "left",
) -> None:
    """The one table renderer. ``boxed``: a grid (query results, lists); otherwise a plain header
    rule (reports). ``compact`` collapses the padding between columns so wide reports fit 80
    columns. ``align`` places title and caption. Cells are shown literally (no rich markup)."""
    t = Table(title=None if title is None else escape(title), title_justify=align,  # type: ignore[arg-type]
              caption=None if caption is None else escape(caption), caption_justify=align,  # type: ignore[arg-type]
              **({} if boxed else {"box": box.SIMPLE_HEAD, "pad_edge": False}),
              **({"collapse_padding": True, "padding": (0, 1)} if compact else {}))
    for c in columns:
        t.add_column(c.header, justify="right" if c.right else "left",
                     **({"overflow": "fold"} if c.wrap else {"no_wrap": True}))
    for row in rows:
        t.add_row(*(escape(cell) for cell in row))
    console.print(t)


def _line(text: str, *, err: bool = False) -> None:
    """One line of prose through rich (wrapped to the terminal), shown literally."""
    (err_console if err else console).print(text, markup=False)


# ------------------------------------------------------------------------------------------------
# Progress text (the rich bars in cli/progress.py show it in their last column)
# ------------------------------------------------------------------------------------------------


def progress_status(status: object) -> str:
    """The short text a progress bar shows for a step's status data."""
    # Look the types up among loaded modules: importing embedstore.extract here would load
    # torch, open_clip and transformers (~25 s on 2 busy cores) on every bar of other commands.
    extract_mod, drr_mod = sys.modules.get("embedstore.extract"), sys.modules.get("embedstore.drr")
    if status is None:
        return ""
    if extract_mod is not None and isinstance(status, extract_mod.ExtractSummary):
        return f"new {status.done} cached {status.cached} failed {status.failed}"
    if drr_mod is not None and isinstance(status, drr_mod.DrrSummary):
        return f"rendered {status.written} reused {status.reused} failed {status.failed}"
    if isinstance(status, Mapping):  # a training-log row
        auc = status.get("val_auc")
        return (f"loss {status.get('train_loss', float('nan')):.3f}"
                + (f" val AUC {auc:.3f}" if auc is not None else ""))
    return str(status)


def step_done(result: object) -> None:
    """A finished step inside a longer command (extraction, one trained run)."""
    from embedstore.extract import ExtractSummary
    from embedstore.runs import Run

    if isinstance(result, ExtractSummary):
        _line(extract_summary_line(result), err=True)
    elif isinstance(result, Run):
        _line(run_line(result), err=True)


def stage(i: int, n: int, title: str) -> None:
    console.rule(f"[bold][{i}/{n}] {escape(title)}")


def message(text: str) -> None:
    _line(text)


# ------------------------------------------------------------------------------------------------
# synth / manifest / index
# ------------------------------------------------------------------------------------------------


def synth_result(res: Mapping[str, Any]) -> None:
    typer.echo(f"Wrote {res['n_patients']} patients ({res['n_positive']} PE-positive) to "
               f"{res['manifest_path']} in {res['seconds']:.1f} s.")
    if res.get("preview_path"):
        typer.echo(f"Preview of a few cases: {res['preview_path']}")


def manifest_summary(s: Mapping[str, Any]) -> None:
    typer.echo(f"OK: {s['rows']} studies, {s['patients']} patients; by modality {s['by_modality']}; "
               f"by split {s['by_split']}; labelled {s['labelled']}.")


def import_result(r: Any, *, patients: bool = True) -> None:
    """An importer's ``ImportResult``: manifest path, rows, (patients), exclusions."""
    who = f"{r.n_rows} studies, {r.n_patients} patients" if patients else f"{r.n_rows} series"
    typer.echo(f"Wrote {r.manifest_path}: {who}; excluded {dict(r.excluded) or 'none'}.")


def pairing_summary(s: Mapping[str, Any]) -> None:
    """``embedstore pairs``: the rule, then per split CTPAs with/without a CXR, pairs, drops."""
    def dropped(d: Mapping[str, Any], key: str) -> str:
        return str(sum(d[key].values()))

    cols = [Col("split"), Col("CTPA", True), Col("with CXR", True), Col("without", True),
            Col("pairs", True), Col("explicit dropped", True), Col("derived dropped", True)]
    rows = [[str(name), str(d["ctpa"]), str(d["ctpa_with_cxr"]), str(d["ctpa_without_cxr"]),
             str(d["pairs"]), dropped(d, "dropped_explicit"), dropped(d, "dropped_derived")]
            for name, d in [*s["by_split"].items(), ("all", s)]]
    verb = "Rule set" if s.get("changed") else "Rule"
    print_table(cols, rows, title=f"{verb}: {s['rule_text']}", boxed=False)
    why = {k: s["dropped_explicit"][k] for k in s["dropped_explicit"] if s["dropped_explicit"][k]}
    if why:
        _line("explicit pair_id pairs dropped by the rule: "
              + ", ".join(f"{k} x{v}" for k, v in why.items()))
    if s["explicit_undated"]:
        _line(f"{s['explicit_undated']} explicit pairs kept without a gap check (no acquired_at)")


def index_built(r: Mapping[str, Any]) -> None:
    typer.echo(f"{'Built' if r['rebuilt'] else 'Verified'} {r['kind']} index of {r['ntotal']} vectors: "
               f"{r['path']}")
    p, rc = r.get("params") or {}, r.get("recall_check")
    knobs = [f"{k} {p[k]}" for k in ("nlist", "nprobe", "pq_m", "pq_nbits", "ef_search", "train_size")
             if k in p]
    if rc:
        knobs.append(f"recall@10 {rc['recall@10']:.3f} on {rc['n_queries']} sampled rows "
                     f"(target {rc['target']:g}{'' if rc['met'] else ', NOT met'})")
    if "build_s" in p and r.get("rebuilt"):
        knobs.append(f"built in {p['build_s']:.1f} s")
    if knobs:
        typer.echo("  " + ", ".join(knobs))


# ------------------------------------------------------------------------------------------------
# extract
# ------------------------------------------------------------------------------------------------


def extract_summary_line(s: ExtractSummary) -> str:
    parts = [f"{s.modality} [{s.encoder_key}]: {s.selected} selected, {s.done} embedded"]
    if s.done:
        parts[-1] += f" ({s.items_per_s:.1f}/s)"
    parts.append(f"{s.cached} cached" + (" (nothing to do)" if s.cached == s.selected else ""))
    if s.failed:
        reasons = ", ".join(f"{k} x{v}" for k, v in sorted(s.failures_by_reason.items()))
        parts.append(f"{s.failed} FAILED ({reasons}; see `embedstore query STORE "
                     f"\"SELECT * FROM failures\"`)")
    else:
        parts.append("0 failed")
    if s.interrupted:
        parts.append("INTERRUPTED: re-run to resume")
    return "; ".join(parts) + f" in {s.seconds:.1f} s."


# ------------------------------------------------------------------------------------------------
# store: query, info, verify, gc, encoders
# ------------------------------------------------------------------------------------------------


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def arrow_table(table: pa.Table, *, max_rows: int = 200) -> None:
    rows = [[_cell(v) for v in r.values()] for r in table.slice(0, max_rows).to_pylist()]
    caption = None
    if table.num_rows > max_rows:
        caption = f"{table.num_rows - max_rows} more rows not shown (use --format csv --out FILE)"
    print_table([Col(name, wrap=True) for name in table.column_names], rows, caption=caption,
                align="center")


def query_result(res: QueryResult) -> None:
    if res.path is not None:
        _line(f"Wrote {res.table.num_rows} rows to {res.path}")
    elif res.data is not None:
        console.file.write(res.data.decode())
    else:
        arrow_table(res.table)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def store_info(info: Mapping[str, Any]) -> None:
    cols = [Col(c) for c in ("modality", "encoder key", "family", "dim", "dtype", "rows", "old rows")]
    rows = [[str(s.get("modality")), str(s.get("encoder_key")),
             str((s.get("spec") or {}).get("encoder", {}).get("family", "")),
             str(s.get("dim")), str(s.get("dtype")), str(s.get("count")), str(s.get("superseded", 0))]
            for s in info.get("sets", [])]
    print_table(cols, rows, title=f"embedstore {info.get('root')}", boxed=False)
    extra = [f"studies in manifest: {info.get('manifest_rows', 0)}",
             f"runs: {info.get('runs', 0)}",
             f"size on disk: {_size(float(info.get('size_bytes', 0)))}",
             f"schema_version: {info.get('schema_version')}"]
    fails = (info.get("failures") or {}).get("by_reason") or {}
    if fails:
        extra.append("failures: " + ", ".join(f"{k} x{v}" for k, v in fails.items()))
    _line("; ".join(extra))


def verify_report(rep: VerifyReport) -> None:
    d = rep.to_dict()
    if d["problems"]:
        _line(f"{len(d['problems'])} problem(s) in {d['rows_checked']} committed rows of "
              f"{d['sets_checked']} set(s) (nothing was modified):")
        for p in d["problems"]:
            _line("  - " + ", ".join(f"{k}={v}" for k, v in p.items() if v not in (None, "")))
    else:
        _line(f"OK: {d['rows_checked']} committed rows in {d['sets_checked']} set(s) "
              "verified, no problems.")


def upgrade_report(store: object, rep: dict[str, Any]) -> None:
    if rep["from_version"] == rep["to_version"]:
        _line(f"Nothing to do: {store} is already schema_version {rep['to_version']}.")
    else:
        _line(f"Upgraded {store} from schema_version {rep['from_version']} to "
              f"{rep['to_version']}: {rep['rows']} rows in {rep['segments']} segments, "
              f"{rep['failure_logs']} failure logs.")


def gc_report(rep: GcReport) -> None:
    kept_n = sum(rep.unreferenced_rows.values()) if not rep.drop_unreferenced else 0
    kept_line = (f"Kept {kept_n} rows of studies that are not in the current manifest "
                 "(re-attach the manifest that lists them, or pass --drop-unreferenced to remove "
                 "them).")
    if rep.nothing_to_do:
        _line("Nothing to collect: no superseded rows, unreferenced sets or orphan files.")
        if kept_n:
            _line(kept_line)
        return
    d = rep.to_dict()
    items: list[str] = []
    for key, label in (("superseded_rows", "superseded rows"),
                       ("unreferenced_rows", "rows of studies no longer in the manifest")):
        if key == "unreferenced_rows" and not rep.drop_unreferenced:
            continue
        for set_name, n in d[key].items():
            if n:
                items.append(f"{n} {label} in {set_name}")
    for key, label in (("unreferenced_sets", "unreferenced set"), ("orphan_temp_files", "orphan temp file"),
                       ("empty_segments", "empty segment of a crashed writer")):
        items += [f"{label}: {x}" for x in d[key]]
    _line(f"{'Would remove' if rep.dry_run else 'Removed'}:")
    for it in items:
        _line(f"  - {it}")
    if kept_n:
        _line(kept_line)
    if rep.dry_run:
        _line("Dry run: nothing was changed. Re-run with --yes to remove them.")
    else:
        _line(f"Freed {_size(float(d.get('bytes_freed', 0)))}.")


def encoder_list(rows: Sequence[Mapping[str, Any]]) -> None:
    def card(r: Mapping[str, Any]) -> str:
        if r.get("modality") is None:
            return "no card"
        size = "x".join(str(v) for v in r["input_size"])
        return f"{r['modality']} {size} -> {r['embed_dim']}" + (
            "" if r["pretrained"] else ", random init")

    print_table([Col("name", wrap=True), Col("family", wrap=True), Col("card", wrap=True),
                 Col("params", wrap=True)],
                [[r["name"], r["family"], card(r), json.dumps(r["params"], default=str)]
                 for r in rows],
                title="registered encoders (`embedstore encoders --card NAME` for one card)",
                align="center")


def encoder_card(data: Mapping[str, Any]) -> None:
    """One encoder's card (``embedstore encoders --card NAME``) as ``field: value`` lines."""
    card = data["card"]
    head = f"Card of {data['name']} ({data['family']})"
    if data.get("derived"):
        head += ": derived (random-init encoder registered without a card)"
    typer.echo(head)
    width = max(len(k) for k in card)
    for k, v in card.items():
        text = json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)
        typer.echo(f"  {k.ljust(width)}  {text}")


# ------------------------------------------------------------------------------------------------
# export / import-embeddings / drr
# ------------------------------------------------------------------------------------------------


def export_result(r: ExportSummary) -> None:
    typer.echo(f"Wrote {r.path}: {r.rows} {r.modality} vectors of dim {r.dim} from set "
               f"{r.encoder_key} ({_size(r.bytes)}; fixed_size_list<float32>[{r.dim}] column "
               "'vector', card and spec in the Parquet metadata).")


def import_embeddings_result(r: ImportSummary) -> None:
    line = (f"{r.modality} [{r.encoder_key}] from {r.source}: {r.rows} vectors, {r.written} "
            f"written, {r.unchanged} unchanged")
    if r.not_in_file:
        line += f"; {r.not_in_file} {r.modality} studies of the manifest have no vector"
    if r.source_dtype != "float32":
        line += f"; {r.source_dtype} cast to float32"
    typer.echo(line + ".")


def drr_result(r: DrrSummary) -> None:
    line = f"DRRs in {r.out_dir}: {r.selected} CT series, {r.written} rendered, {r.reused} reused"
    if r.failed:
        reasons = ", ".join(f"{k} x{v}" for k, v in sorted(r.failures_by_reason.items()))
        line += f", {r.failed} FAILED ({reasons}; see drr_failures.jsonl)"
    typer.echo(line + f" in {r.seconds:.1f} s.")
    for sid, warns in sorted(r.warnings.items()):
        typer.echo(f"  {sid}: {'; '.join(warns)}")
    if r.manifest_path is not None:
        typer.echo(f"Manifest: {r.manifest_path} (embed the DRRs with `embedstore extract STORE "
                   f"--manifest {r.manifest_path} --modality cxr`).")


# ------------------------------------------------------------------------------------------------
# train / eval / neighbors / demo
# ------------------------------------------------------------------------------------------------


def run_line(run: Run) -> str:
    """``teacher run t0: validation AUC 0.625 (best epoch 1, 0.0 s) -> PATH``, from its metrics."""
    m = run.metrics
    chosen = f"alpha {m['alpha']:g}" if "alpha" in m else f"best epoch {int(m['best_epoch']) + 1}"
    return (f"{run.kind} run {run.run_id}: validation AUC {float(m['val_auc']):.3f} "
            f"({chosen}, {float(m['seconds']):.1f} s) -> {run.path}")


def sweep_comparison(res: TrainingResult) -> None:
    for point, run in res.sweep:
        _line(f"  {point}: val AUC {run.metrics['val_auc']:.3f} ({run.run_id})", err=True)


def eval_start(n_runs: int, split: str) -> None:
    _line(f"Evaluating {n_runs} run(s) on the {split} split ...", err=True)


def _ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _delta(m: Mapping[str, Any], ref: str) -> str:
    key = f"delta_auc_vs_{ref}"
    if key not in m:
        return ""
    lo, hi = m["delta_auc_ci" if ref == "cxr_only" else f"{key}_ci"]
    return f"{m[key]:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def eval_result(res: EvalResult) -> None:
    """The paper-style table and the paired-delta table (each fits 80 columns), the retrieval
    diagnostics, notes, report path."""
    rows = [[m["key"], f"{m['auc']:.3f} {_ci(m['auc_ci'])}", f"{m['accuracy']:.2f}",
             f"{m['sensitivity']:.2f}", f"{m['specificity']:.2f}"] for m in res.models]
    _line(f"{res.split} split: {res.n} patients, {res.n_pos} with PE; thresholds chosen on "
          "validation")
    print_table([Col("model"), *(Col(c, right=True) for c in
                                 ("AUC [95% CI]", "acc", "sens", "spec"))],
                rows, boxed=False, compact=True)
    refs = [r for r in ("cxr_only", "distilled")
            if any(f"delta_auc_vs_{r}" in m for m in res.models)]
    deltas = [[m["key"], *(_delta(m, r) for r in refs)] for m in res.models
              if any(f"delta_auc_vs_{r}" in m for r in refs)]
    if deltas:
        _line("Paired ΔAUC on the same test patients (95% CI: patient bootstrap)")
        print_table([Col("model"), *(Col(f"ΔAUC vs {r}", right=True) for r in refs)], deltas,
                    boxed=False, compact=True)
    _line("ctpa_only: CTPA teacher | cxr_only: radiograph classifier | distilled: CXR -> "
          "diffusion prior -> teacher | ridge_mean_only: the teacher on the prior's ridge mean "
          "(no diffusion) | prior_plain: the prior without ridge mean | softlabel_kd: a CXR "
          "head on the teacher's soft labels | ridge_*: deterministic ablations")
    if res.retrieval:
        print_table([Col("query"), *(Col(c, right=True) for c in
                                     ("R@1", "R@5", "R@10", "median rank", "of"))],
                    [[r["key"], f"{r['recall@1']:.3f}", f"{r['recall@5']:.3f}",
                      f"{r['recall@10']:.3f}", f"{r['median_rank']:.0f}", str(r["n_db"])]
                     for r in res.retrieval],
                    boxed=False, compact=True,
                    title="Retrieval: the patient's own CTPA among the split's, queried with the "
                          "generated embedding")
    for n in res.notes[2:]:  # the first two say how thresholds and CIs were made: report only
        _line(f"- {n}")
    _line(f"Report: {res.report}")


def neighbor_table(study_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
    # the table keeps to the columns that fit a terminal; --json carries every manifest column
    names = [c for c in ("rank", "study_id", "cosine", "label_pe", "split", "site", "age", "sex")
             if any(c in r for r in rows)]
    print_table([Col(c, right=c in ("rank", "cosine", "age")) for c in names],
                [["" if r.get(c) is None else str(r.get(c)) for c in names] for r in rows],
                title=f"nearest studies to {study_id} (cosine; --json for every column)")


def experiment_result(res: ExperimentResult) -> None:
    arms = res.summary["arms"]
    n_seeds = arms[0]["n_seeds"] if arms else 0
    cols = [Col("labels", right=True), Col("arm"), Col("mean AUC", right=True),
            Col("95% CI", right=True), Col("sd", right=True)]
    rows = [[f"{r['label_fraction']:g}", r["arm"], f"{r['auc_mean']:.3f}",
             f"[{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]", f"{r['auc_sd']:.3f}"]
            for r in sorted(arms, key=lambda r: r["label_fraction"])]
    print_table(cols, rows, boxed=False, compact=True,
                title=f"Experiment {res.experiment_id}: test AUC over {n_seeds} seeds "
                      "(CI: seeds, then patients)")
    for v in res.summary["verdicts"]:
        _line(f"  {v}")
    _line(f"{res.cells_trained} cells trained, {res.cells_reused} reused, {res.seconds:.0f} s. "
          f"Report: {res.report}")


def demo_result(res: DemoResult) -> None:
    eval_result(res.evaluation)
    if res.experiment is not None:
        _line("")
        experiment_result(res.experiment)
    t = res.timings_s
    parts = ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in t.items() if k != "total_s")
    _line(f"Results table: {res.results_path}   ({t['total_s']:.0f} s in total: {parts})")
