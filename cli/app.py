"""The ``embedstore`` command line: one thin command per verb over the library.

Each command parses options, makes one library call, renders the returned data (``render``: a
table, or JSON with ``--json``) and maps library errors to ``Error: <message>`` on stderr with
exit code 1. Long calls get the rich reporter (``progress.RichReporter``): the library reports
progress through it and never prints.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from embedstore.cli import render
from embedstore.cli.progress import RichReporter

from embedstore.domain import Modality
from embedstore.errors import DISK_ERRNOS, USER_ERRORS, disk_write_error
from embedstore.progress import NULL_REPORTER, Reporter

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="embedstore",
    help="Embedding store and feature cache for cross-modal (CXR -> CTPA) imaging research.\n\n"
    "Typical flow: synth (or bring a manifest) -> extract -> train -> eval. `embedstore demo` runs it all.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train heads and the diffusion prior on cached embeddings.",
                        no_args_is_help=True)
index_app = typer.Typer(help="FAISS indexes over stored embeddings.", no_args_is_help=True)
manifest_app = typer.Typer(help="Validate and import cohort manifests.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(index_app, name="index")
app.add_typer(manifest_app, name="manifest")

StoreArg = Annotated[Path, typer.Argument(help="Store directory.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def _user_errors(fn: F) -> F:
    """Translate library errors into one ``Error: ...`` line and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(1) from None
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            # a full disk or a failing device met outside the store's own writes
            typer.echo(f"Error: {disk_write_error(e, e.filename or 'a file')}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted. Everything committed so far is kept; re-run to resume.", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _reporter(json_out: bool = False) -> Reporter:
    """Rich bars and step lines, or nothing when stdout carries JSON."""
    return NULL_REPORTER if json_out else RichReporter()


# ------------------------------------------------------------------------------------------------
# synth / manifest
# ------------------------------------------------------------------------------------------------


@app.command()
@_user_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the cohort (DICOM + manifest).")],
    patients: Annotated[int, typer.Option("--patients", "-n", min=1, help="Number of patients.")] = 200,
    seed: Annotated[int, typer.Option(help="Cohort seed (deterministic output).")] = 0,
    workers: Annotated[int | None, typer.Option(help="Processes (default: all cores).")] = None,
    preview: Annotated[bool, typer.Option(help="Also render preview.png of a few cases.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Write a synthetic paired CTPA/CXR phantom cohort as real DICOM plus manifest.parquet/.csv."""
    from embedstore.synth import run_synth

    res = run_synth(out_dir, n_patients=patients, seed=seed, workers=workers, preview=preview,
                    reporter=_reporter(json_out))
    if json_out:
        render.print_json(res)
    else:
        render.synth_result(res)


@manifest_app.command("validate")
@_user_errors
def manifest_validate(
    manifest: Annotated[Path, typer.Argument(help="manifest.parquet or .csv (or its folder).")],
    check_paths: Annotated[bool, typer.Option(help="Check that every path exists.")] = True,
) -> None:
    """Validate a manifest; the first bad row is named with the fix."""
    from embedstore.manifest import summarize_manifest

    render.manifest_summary(summarize_manifest(manifest, check_paths=check_paths))


@manifest_app.command("import-paired")
@_user_errors
def manifest_import_paired(
    csv_path: Annotated[Path, typer.Argument(help="CSV with CT_Accession_number, cxr_Accession_number, PE.")],
    ct_dir: Annotated[Path, typer.Option(help="Folder with one file/folder per CT accession.")],
    cxr_dir: Annotated[Path, typer.Option(help="Folder with one file per CXR accession.")],
    out: Annotated[Path, typer.Option(help="Output folder for manifest + pseudonymised links.")],
    seed: Annotated[int, typer.Option(help="Seed of the patient-level split.")] = 0,
    patient_column: Annotated[str | None, typer.Option(help="Column identifying the patient (pseudonymised; splits are per patient). Default: each CT accession is its own patient.")] = None,
    ct_time_column: Annotated[str | None, typer.Option(help="Column with the CTPA's ISO 8601 acquisition date-time (becomes acquired_at).")] = None,
    cxr_time_column: Annotated[str | None, typer.Option(help="Column with the CXR's ISO 8601 acquisition date-time (becomes acquired_at).")] = None,
) -> None:
    """Import the published method's paired CSV (accessions are pseudonymised with your key)."""
    from embedstore.manifest import import_paired_csv_with_env_key

    render.import_result(import_paired_csv_with_env_key(
        csv_path, ct_dir=ct_dir, cxr_dir=cxr_dir, out_dir=out, seed=seed,
        patient_column=patient_column, ct_time_column=ct_time_column,
        cxr_time_column=cxr_time_column))


@manifest_app.command("import-rspect")
@_user_errors
def manifest_import_rspect(
    train_csv: Annotated[Path, typer.Argument(help="RSPECT train.csv (one row per image).")],
    images: Annotated[Path, typer.Option(help="Folder holding <StudyUID>/<SeriesUID>/ series.")],
    out: Annotated[Path, typer.Option(help="Output folder for manifest + pseudonymised links.")],
    seed: Annotated[int, typer.Option(help="Seed of the patient-level split.")] = 0,
    patient_column: Annotated[str | None, typer.Option(help="Column identifying the patient, added to the CSV (pseudonymised). Default: each StudyInstanceUID is its own patient.")] = None,
) -> None:
    """Import RSNA RSPECT train.csv, one CTPA row per series; indeterminate exams are excluded."""
    from embedstore.manifest import import_rspect_with_env_key

    render.import_result(import_rspect_with_env_key(train_csv, images_dir=images, out_dir=out,
                                                    seed=seed, patient_column=patient_column),
                         patients=False)


# ------------------------------------------------------------------------------------------------
# extract / store
# ------------------------------------------------------------------------------------------------


@app.command()
@_user_errors
def extract(
    store: StoreArg,
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="Manifest (.parquet/.csv).")],
    modality: Annotated[Modality, typer.Option(case_sensitive=False, help="Modality to embed.")],
    encoder: Annotated[str | None, typer.Option(help="Encoder name, hf:DIR (a transformers save_pretrained folder), or several separated by commas, run in turn (default: the demo encoder of the modality; see `embedstore encoders`).")] = None,
    weights: Annotated[Path | None, typer.Option(help="Local weights file for the encoder.")] = None,
    card: Annotated[Path | None, typer.Option(help="Card file (TOML/JSON) overriding the encoder's card fields (see `embedstore encoders --card NAME`).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Encoder batch size.")] = 16,
    workers: Annotated[int | None, typer.Option(min=0, help="Decode processes (0 = inline; default: one per core).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    where: Annotated[str | None, typer.Option(help="SQL predicate over `studies` choosing the cohort.")] = None,
    shard: Annotated[str | None, typer.Option(help="K/N: this job's deterministic share (or torchrun's RANK/WORLD_SIZE).")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first failed study.")] = False,
    max_memory: Annotated[str | None, typer.Option(help="Memory for decoding: worker buffers + decoded studies waiting for the encoder, e.g. 8GB, 8GiB, 50% (default: half the RAM). A study needing more is refused (over_memory_budget).")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Also retry studies quarantined because a decode worker died on them (worker_died); other failures are always retried.")] = False,
    missing_rescale: Annotated[str, typer.Option(help="CT slices without RescaleSlope/Intercept: refuse (reason missing_rescale), assume-1024 or assume-0 (slope 1, that intercept; changes their cache key).")] = "refuse",
    json_out: JsonOpt = False,
) -> None:
    """Embed a modality's studies into STORE; resumes automatically; exit 1 if any study failed.

    A study whose decode worker dies (out of memory, crashing decoder) is recorded as worker_died
    and skipped by later runs unless --retry-failed. SIGINT/SIGTERM stop after committing what
    is embedded (exit 1, one "Error: Interrupted by ..." line). With several encoders
    (--encoder a,b) each runs in turn and gets its own summary line.
    """
    from embedstore.encoders import parse_encoder_list
    from embedstore.extract import ExtractConfig, extract_each, parse_shard

    cfg = ExtractConfig(modality=modality, weights=str(weights) if weights else None,
                        card=str(card) if card else None, batch_size=batch_size, workers=workers,
                        device=device, where=where, shard=parse_shard(shard), strict=strict,
                        max_memory=max_memory, retry_failed=retry_failed,
                        missing_rescale=missing_rescale)
    reporter = _reporter(json_out)
    bars, bar = contextlib.ExitStack(), []

    def start(i: int, name: str) -> None:  # one bar per encoder
        bars.close()
        bar[:] = [bars.enter_context(reporter.bar(f"extract {cfg.modality} {name}", None))]

    with bars:
        summaries = extract_each(store, manifest, cfg, parse_encoder_list(encoder), on_start=start,
                                 on_progress=lambda s, total: bar[0].update(
                                     s.done + s.cached + s.failed, total=total, status=s))
    for summary in summaries:
        reporter.done(summary)
    if json_out:
        render.print_json(summaries[0] if len(summaries) == 1 else summaries)
    if any(s.failed for s in summaries):
        raise typer.Exit(1)


@app.command()
@_user_errors
def query(
    store: StoreArg,
    sql: Annotated[str, typer.Argument(help="One read-only SELECT over studies, embeddings, pairs, pair_candidates, failures, runs, experiments.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, csv, json or parquet.")] = "table",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before the query is interrupted.")] = 30.0,
) -> None:
    """Run read-only SQL over the store's catalog (writes, ATTACH, SET, file access are refused)."""
    from embedstore.query import query as query_

    render.query_result(query_(store, sql, fmt=fmt, out=out, timeout_s=timeout))


@app.command()
@_user_errors
def pairs(
    store: StoreArg,
    max_gap: Annotated[str | None, typer.Option("--max-gap", metavar="DURATION", help="Largest CXR-CTPA gap, e.g. 24h, 90m, 2d.")] = None,
    cxr_before_ctpa: Annotated[bool | None, typer.Option("--cxr-before-ctpa/--either-side", help="Only CXRs acquired no later than their CTPA, or either side.")] = None,
    all_cxr: Annotated[bool | None, typer.Option("--all-cxr/--nearest-cxr", help="Every CXR within the rule per CTPA (all train the prior), or the nearest one.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the CXR-CTPA pairing rule and its counts per split; with options, set the rule.

    The rule applies to explicit pair_id pairs too: those outside it are dropped and counted (the pair_candidates view says why). Setting needs the store's writer lock.
    """
    from embedstore.pairing import configure_pairs

    res = configure_pairs(store, max_gap=max_gap, cxr_before_ctpa=cxr_before_ctpa,
                          multi_cxr=all_cxr)
    if json_out:
        render.print_json(res)
    else:
        render.pairing_summary(res)


@app.command()
@_user_errors
def info(store: StoreArg, json_out: JsonOpt = False) -> None:
    """What is in a store: modalities, encoder keys and specs, counts, failures, size on disk."""
    from embedstore.store import open_store

    info = open_store(store).info()
    if json_out:
        render.print_json(info)
    else:
        render.store_info(info)


@app.command()
@_user_errors
def verify(store: StoreArg, json_out: JsonOpt = False) -> None:
    """Check every committed row (checksums, shapes, fill values, alignment); modifies nothing."""
    from embedstore.store import open_store

    rep = open_store(store).verify()
    if json_out:
        render.print_json(rep)
    else:
        render.verify_report(rep)
    if not rep.ok:
        raise typer.Exit(1)


@app.command()
@_user_errors
def gc(
    store: StoreArg,
    yes: Annotated[bool, typer.Option("--yes", help="Actually remove (default: dry run listing).")] = False,
    drop_unreferenced: Annotated[bool, typer.Option("--drop-unreferenced", help="Also remove rows of studies that are not in the current manifest (kept by default).")] = False,
) -> None:
    """Remove superseded embeddings and orphan files (dry run unless --yes)."""
    from embedstore.store import open_store

    render.gc_report(open_store(store).gc(dry_run=not yes, drop_unreferenced=drop_unreferenced))


@app.command()
@_user_errors
def upgrade(store: StoreArg, json_out: JsonOpt = False) -> None:
    """Rewrite a schema_version 1 store in place as schema_version 2 (commit logs become Parquet
    parts; vectors are not copied). Idempotent; needs the store to be idle."""
    from embedstore.store import upgrade_store

    rep = upgrade_store(store).to_dict()
    if json_out:
        render.print_json(rep)
    else:
        render.upgrade_report(store, rep)


@app.command()
@_user_errors
def encoders(
    card: Annotated[str | None, typer.Option("--card", metavar="NAME", help="Print the card of this encoder (a registered name or hf:DIR) instead of the list.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the registered frozen encoders, or print one encoder's card."""
    from embedstore.encoders import encoder_card, registered_encoders

    data: Any = encoder_card(card) if card is not None else registered_encoders()
    if json_out:
        render.print_json(data)
    elif card is not None:
        render.encoder_card(data)
    else:
        render.encoder_list(data)


# ------------------------------------------------------------------------------------------------
# export / import-embeddings / drr
# ------------------------------------------------------------------------------------------------


@app.command()
@_user_errors
def export(
    store: StoreArg,
    out: Annotated[Path, typer.Argument(help="Parquet file to write (.parquet).", show_default=False)],
    modality: Annotated[Modality | None, typer.Option(case_sensitive=False, help="Modality of the set (needed when the store has several sets).")] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder key of the set (see `embedstore info`).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write one embedding set as Parquet: pseudonymous ids, split, label, a fixed_size_list<float32>
    vector column; the encoder card, spec, set key and manifest fingerprint in the file's
    metadata. Readable by pyarrow, pandas, polars and DuckDB without embedstore."""
    from embedstore.interchange import export_embeddings

    res = export_embeddings(store, out, modality=modality, encoder_key=encoder)
    if json_out:
        render.print_json(res)
    else:
        render.export_result(res)


@app.command("import-embeddings")
@_user_errors
def import_embeddings(
    store: StoreArg,
    file: Annotated[Path, typer.Argument(help="Embeddings: a .parquet (an embedstore export or any file with an id and a vector column) or an (N, D) .npy.", show_default=False)],
    modality: Annotated[Modality, typer.Option(case_sensitive=False, help="Modality of the vectors.")],
    id_column: Annotated[str, typer.Option(help="Column holding the manifest's study_id (in the Parquet file, or in the --ids CSV).")] = "study_id",
    fmt: Annotated[str | None, typer.Option("--format", help="parquet or npy (default: from the suffix).")] = None,
    ids: Annotated[Path | None, typer.Option(help="npy only: CSV with a header and the id column, one row per row of the array.")] = None,
    vector_column: Annotated[str | None, typer.Option(help="parquet only: the vector column (default 'vector', else the only list column).")] = None,
    card: Annotated[Path | None, typer.Option(help="Card file (TOML/JSON) of the encoder that made the vectors; required unless FILE is an embedstore export.")] = None,
    name: Annotated[str | None, typer.Option(help="Encoder name of the new set (with --card; default 'imported').")] = None,
    manifest: Annotated[Path | None, typer.Option("--manifest", "-m", help="Attach this manifest first (needed when the store has none; paths are not checked).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create (or add to) an embedding set from precomputed vectors, without images. Ids must be
    study ids of the store's manifest; everything is checked before anything is written."""
    from embedstore.interchange import import_embeddings as import_

    res = import_(store, file, modality=modality, id_column=id_column, fmt=fmt, ids_file=ids,
                  vector_column=vector_column, card=card, name=name, manifest=manifest)
    if json_out:
        render.print_json(res)
    else:
        render.import_embeddings_result(res)


@app.command()
@_user_errors
def drr(
    source: Annotated[Path, typer.Argument(help="A manifest (or a folder holding manifest.parquet): its CTPA rows; or one CT series folder.", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="Empty or new folder for the DX files and the DRR manifest.", show_default=False)],
    where: Annotated[str | None, typer.Option(help="SQL predicate over `studies` choosing the CT series (manifest source).")] = None,
    patient_id: Annotated[str | None, typer.Option(help="Lone series: its pseudonymous patient id (never read from the DICOM).")] = None,
    study_id: Annotated[str | None, typer.Option(help="Lone series: its study id (default <patient-id>-CT).")] = None,
    split: Annotated[str, typer.Option(help="Lone series: its split in the DRR manifest.")] = "test",
    size: Annotated[int, typer.Option(help="DRR side in pixels (32-4096).")] = 512,
    view: Annotated[str, typer.Option(help="ViewPosition written: AP or PA.")] = "AP",
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering series.")] = 1,
    json_out: JsonOpt = False,
) -> None:
    """Render a frontal DRR of CT series as DICOM DX files plus a manifest pairing each DRR (a CXR
    row, study id <ct>-DRR) with its CT; `extract --modality cxr` embeds them."""
    from embedstore.drr import DrrSpec, run_drr_source

    res = run_drr_source(source, out_dir, patient_id=patient_id, study_id=study_id, split=split,
                         where=where, workers=workers, spec=DrrSpec(size=size, view=view),
                         reporter=_reporter(json_out))
    if json_out:
        render.print_json(res)
    else:
        render.drr_result(res)
    if res.failed:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------
# train / eval / index / neighbors / demo
# ------------------------------------------------------------------------------------------------

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file with any of these options.")]
WhereOpt = Annotated[str | None, typer.Option(help="SQL predicate over `studies` choosing the cohort.")]
FracOpt = Annotated[float | None, typer.Option(help="Keep labels for this patient-level fraction of the training split.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed (training and label subset).")]
NameOpt = Annotated[str | None, typer.Option(help="Run id (default: <kind>-<time>-<rand>).")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu or cuda.")]


def _train(kind: str, store: Path, options: dict[str, Any], config: Path | None,
           sweep: list[str] | None = None) -> None:
    from embedstore.train import run_training

    res = run_training(kind, store, options={k: v for k, v in options.items() if v is not None},
                       config_file=config, sweep=sweep or [], reporter=_reporter())
    render.sweep_comparison(res)


def _classifier_command(kind: str, doc: str) -> None:
    """Register `train teacher` / `train cxr`: the same options over another modality."""

    @_user_errors
    def command(
        store: StoreArg,
        encoder: Annotated[str | None, typer.Option(help="Encoder key in the store (default: the only one of this modality).")] = None,
        head: Annotated[str | None, typer.Option(help="linear or mlp.")] = None,
        epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
        lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
        label_fraction: FracOpt = None, where: WhereOpt = None, seed: SeedOpt = None,
        name: NameOpt = None, device: DeviceOpt = None, config: ConfigOpt = None,
    ) -> None:
        _train(kind, store, dict(encoder=encoder, head=head, epochs=epochs, lr=lr,
                                 label_fraction=label_fraction, where=where, seed=seed, name=name,
                                 device=device), config)

    command.__doc__ = doc
    command.__name__ = f"train_{kind}"
    train_app.command(kind)(command)


_classifier_command("teacher", "CTPA teacher classifier on cached CTPA embeddings.")
_classifier_command("cxr", "Radiograph-only baseline classifier on cached CXR embeddings.")


@train_app.command("prior")
@_user_errors
def train_prior(
    store: StoreArg,
    teacher: Annotated[str, typer.Option(help="Teacher run id (or prefix, or latest:teacher).")] = "latest:teacher",
    cxr_encoder: Annotated[str | None, typer.Option(help="CXR encoder key (default: the only one).")] = None,
    ctpa_encoder: Annotated[str | None, typer.Option(help="CTPA encoder key (default: the teacher's).")] = None,
    lam: Annotated[float | None, typer.Option("--lambda", help="Weight of the teacher-consistency BCE term.")] = None,
    mu: Annotated[float | None, typer.Option(help="Weight of the label BCE term on the labelled subset.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    label_fraction: FracOpt = None, where: WhereOpt = None, seed: SeedOpt = None,
    name: NameOpt = None, device: DeviceOpt = None, config: ConfigOpt = None,
    sweep: Annotated[list[str] | None, typer.Option(help="Grid, e.g. --sweep lambda=0,0.1,1 (repeatable).")] = None,
    preset: Annotated[str | None, typer.Option(help="default, or paper: the published recipe (causal transformer, T=64, 0.8 MSE + 0.2 teacher BCE; see docs/METHOD.md).")] = None,
    tokens: Annotated[int | None, typer.Option(help="--preset paper only: 4 tokens, or 81 (the published layout, 77 null tokens first).")] = None,
    published_nograd: Annotated[bool, typer.Option("--published-nograd", help="--preset paper only: reproduce the published bug (teacher term under no_grad).")] = False,
) -> None:
    """Diffusion prior CXR -> CTPA-teacher embedding, with a teacher loss that really trains.

    --preset paper trains the published recipe instead (a paper_prior run)."""
    _train("prior", store, dict(teacher=teacher, cxr_encoder=cxr_encoder, ctpa_encoder=ctpa_encoder,
                                lam=lam, mu=mu, epochs=epochs, label_fraction=label_fraction,
                                where=where, seed=seed, name=name, device=device, preset=preset,
                                tokens=tokens, published_nograd=published_nograd or None),
           config, sweep)


@train_app.command("baselines")
@_user_errors
def train_baselines(
    store: StoreArg,
    teacher: Annotated[str, typer.Option(help="Teacher run id (or prefix, or latest:teacher).")] = "latest:teacher",
    cxr_encoder: Annotated[str | None, typer.Option(help="CXR encoder key (default: the only one).")] = None,
    where: WhereOpt = None, seed: SeedOpt = None, config: ConfigOpt = None,
) -> None:
    """Label-free ablations on all training pairs: ridge CXR -> teacher logit, ridge CXR -> CTPA
    embedding, and softlabel_kd (a CXR head trained on the teacher's soft labels)."""
    _train("baselines", store, dict(teacher=teacher, cxr_encoder=cxr_encoder, where=where, seed=seed),
           config)


@app.command("eval")
@_user_errors
def eval_(
    store: StoreArg,
    run: Annotated[list[str], typer.Option("--run", help="Run(s) to evaluate (id, prefix or latest:<kind>).")],
    compare: Annotated[list[str] | None, typer.Option(help="Also compare against these runs (paired, same test patients).")] = None,
    split: Annotated[str, typer.Option(help="Split to report (thresholds always come from val).")] = "test",
    out: Annotated[Path | None, typer.Option(help="Report folder (default STORE/reports/<time>).")] = None,
    samples: Annotated[int, typer.Option(help="Diffusion samples per CXR.")] = 8,
    bootstrap: Annotated[int, typer.Option(min=200, help="Bootstrap resamples for CIs.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap / sampling seed.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Paper-style table (AUC + 95% CI, accuracy, sensitivity, specificity), ROC/calibration plots,
    paired DeLong comparisons, retrieval diagnostics and a self-contained HTML report."""
    from embedstore.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(runs=tuple(run) + tuple(compare or ()), split=split, out_dir=out,
                     num_samples=samples, n_bootstrap=bootstrap, seed=seed)
    if not json_out:
        render.eval_start(len(cfg.runs), cfg.split)
    res = evaluate(store, cfg)
    if json_out:
        render.print_json(res)
    else:
        render.eval_result(res)


class _StageBars:
    """``index build``'s progress callback: one bar per build stage (sample, train, add, recall)."""

    def __init__(self, reporter: Reporter):
        self._reporter, self._stage, self._cm, self._bar = reporter, None, None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.close()
            self._stage, self._cm = stage, self._reporter.bar(f"index {stage}", total)
            self._bar = self._cm.__enter__()
        self._bar.update(done, total=total)

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = self._bar = None


@index_app.command("build")
@_user_errors
def index_build(
    store: StoreArg,
    encoder: Annotated[str, typer.Option(help="Encoder key of the embedding set.")],
    modality: Annotated[Modality | None, typer.Option(case_sensitive=False, help="cxr or ctpa (default: the set's own).")] = None,
    kind: Annotated[str | None, typer.Option(
        help="auto, flat, ivf, ivfpq, opq or hnsw (default: what the index was built with, else "
             "auto: flat up to 10^5 vectors, IVF-Flat while they fit in 8 GiB, IVF-PQ above).")] = None,
    nlist: Annotated[int | None, typer.Option(min=1, help="IVF lists (default: ~sqrt(N), a power of 2).")] = None,
    m: Annotated[int | None, typer.Option("--m", min=1, help="PQ sub-quantizers = bytes per vector at 8 bits (default D/8).")] = None,
    nbits: Annotated[int | None, typer.Option(min=1, max=16, help="Bits per PQ code (default 8).")] = None,
    nprobe: Annotated[int | None, typer.Option(min=1, help="Lists searched to start the recall check from.")] = None,
    sample: Annotated[int | None, typer.Option(min=1, help="Training sample size (default 40 x nlist).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Build (or fully verify and reuse) the FAISS index of an embedding set, with a recall check."""
    from embedstore.retrieval import build_store_index

    bars = _StageBars(_reporter(json_out))
    try:
        r = build_store_index(store, encoder_key=encoder, modality=modality, kind=kind, nlist=nlist,
                              pq_m=m, pq_nbits=nbits, nprobe=nprobe, train_size=sample,
                              progress=bars)
    finally:
        bars.close()
    if json_out:
        render.print_json(r)
    else:
        render.index_built(r)


@app.command()
@_user_errors
def neighbors(
    store: StoreArg,
    study_id: Annotated[str, typer.Argument(help="Query study.")],
    k: Annotated[int, typer.Option("-k", min=1, help="Number of neighbours.")] = 10,
    encoder: Annotated[str | None, typer.Option(help="Encoder key (default: the study's only one).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Nearest studies (cosine) with their labels and metadata, for case review."""
    from embedstore.retrieval import neighbors as neighbors_

    rows = neighbors_(store, study_id, k=k, encoder_key=encoder)
    if json_out:
        render.print_json(rows)
    else:
        render.neighbor_table(study_id, rows)


@app.command()
@_user_errors
def experiment(
    store: StoreArg,
    config: Annotated[Path, typer.Option("--config", help="Experiment TOML: arms, label fractions, seeds, compared pairs (see docs/EXPERIMENTS.md).")],
    workers: Annotated[int | None, typer.Option(help="Cells trained at once (default: CPU count; 0 = in this process).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Every arm x label fraction x seed as ordinary runs, resumable; hierarchical CIs, verdicts, report."""
    from embedstore.experiment import run_experiment

    res = run_experiment(store, config, workers=workers, reporter=_reporter(json_out))
    if json_out:
        render.print_json(res.to_dict())
    else:
        render.experiment_result(res)


def _number_list(text: str, kind: type, option: str) -> tuple[Any, ...]:
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of "
                                 f"{kind.__name__}s, e.g. {'0.1,0.5' if kind is float else '4,5,6'}.",
                                 param_hint=option) from e


@app.command()
@_user_errors
def demo(
    workdir: Annotated[Path, typer.Argument(help="Working folder (cohort, store, report).")] = Path("demo"),
    patients: Annotated[int | None, typer.Option(help="Cohort size (default 800).")] = None,
    seed: Annotated[int, typer.Option(help="Cohort and training seed.")] = 0,
    label_fraction: Annotated[float, typer.Option(help="Labelled fraction of training patients.")] = 0.25,
    fractions: Annotated[str, typer.Option(help="Label-efficiency curve fractions ('' to skip).")] = "0.1,0.25,0.5,1.0",
    experiment_seeds: Annotated[str, typer.Option(help="Seeds of the closing multi-seed experiment ('' to skip).")] = "4,5,6",
) -> None:
    """The whole pipeline on the built-in synthetic cohort: synth -> extract -> train -> eval."""
    from embedstore.demo import run_demo

    res = run_demo(workdir, patients=patients, seed=seed, label_fraction=label_fraction,
                   fractions=_number_list(fractions, float, "--fractions"),
                   experiment_seeds=_number_list(experiment_seeds, int, "--experiment-seeds"),
                   reporter=_reporter())
    render.demo_result(res)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
