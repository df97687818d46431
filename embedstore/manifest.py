"""Cohort manifests: one row per imaging study, validated with errors that name the row.

Schema (documented in data_manifests/README.md):

    patient_id  str   pseudonymous patient identifier
    study_id    str   unique per row
    modality    str   "CXR" | "CTPA"
    path        str   file (radiograph) or series folder (CT), relative to the manifest's folder
    acquired_at timestamp (ISO 8601 in CSV)
    label_pe    int   0 / 1 / null (unlabelled)
    split       str   "train" | "val" | "test", constant per patient
    pair_id     str   optional: explicit CXR/CTPA pairing
    ...         any extra columns (age, sex, site, ...) flow through to SQL (`studies` view)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from embedstore._fsio import atomic_path
from embedstore.domain import Modality
from embedstore.errors import ManifestCorruptError, ManifestError
from embedstore.pseudonym import load_pseudonym_key, pseudonymise
from embedstore.statefile import read_parquet_state

__all__ = [
    "REQUIRED_COLUMNS",
    "MODALITIES",
    "SPLITS",
    "Manifest",
    "assign_splits",
    "write_manifest",
    "load_manifest",
    "validate_manifest",
    "import_paired_csv",
    "import_rspect",
    "label_subset",
    "ImportResult",
    "summarize_manifest",
    "import_paired_csv_with_env_key",
    "import_rspect_with_env_key",
]

REQUIRED_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "study_id",
    "modality",
    "path",
    "acquired_at",
    "label_pe",
    "split",
)
MODALITIES: tuple[Modality, ...] = tuple(Modality)  # the values of the enum, for old imports
SPLITS: tuple[str, ...] = ("train", "val", "test")
METADATA_KEY = b"embedstore.manifest"


def _unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (stable across runs and machines)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_splits(
    patient_ids: Iterable[str],
    fractions: Sequence[float] = (0.6, 0.15, 0.25),
    seed: int = 0,
) -> dict[str, str]:
    """Deterministic patient-level split assignment.

    Patients are ordered by a seeded hash of their id and cut at the cumulative fractions, so the
    split sizes are exact (up to rounding) and a patient's split does not depend on which other
    patients are present beyond the ordering. Same ids + same seed -> same splits, everywhere.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ManifestError(
            f"Split fractions must be three non-negative numbers summing to 1, got {list(fractions)}."
        )
    ids = sorted(set(patient_ids), key=lambda p: (_unit_hash("split", seed, p), p))
    n = len(ids)
    n_train = round(fractions[0] * n)
    n_val = round(fractions[1] * n)
    out: dict[str, str] = {}
    for i, pid in enumerate(ids):
        out[pid] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return out


def label_subset(patient_ids: Iterable[str], fraction: float, seed: int = 0) -> set[str]:
    """Deterministic patient-level subset keeping labels for ``fraction`` of the patients."""
    if not 0.0 <= fraction <= 1.0:
        raise ManifestError(f"--label-fraction must be in [0, 1], got {fraction}.")
    ids = sorted(set(patient_ids), key=lambda p: (_unit_hash("labels", seed, p), p))
    k = round(fraction * len(ids))
    return set(ids[:k])


def _to_table(rows: pa.Table | Sequence[Mapping[str, object]]) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if not rows:
        raise ManifestError("The manifest has no rows.")
    cols: dict[str, list[object]] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, [])
    for r in rows:
        for k in cols:
            cols[k].append(r.get(k))
    return pa.table(cols)


def _normalise(table: pa.Table) -> pa.Table:
    """Cast the required columns to their canonical types (strings, timestamp, int8 label)."""
    out = table
    for name in ("patient_id", "study_id", "modality", "path", "split"):
        if name in out.column_names:
            i = out.column_names.index(name)
            out = out.set_column(i, name, pc.cast(out[name], pa.string()))
    if "pair_id" in out.column_names:
        i = out.column_names.index("pair_id")
        out = out.set_column(i, "pair_id", pc.cast(out["pair_id"], pa.string()))
    if "acquired_at" in out.column_names:
        col = out["acquired_at"]
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            try:
                col = pc.cast(col, pa.timestamp("us"))
            except pa.ArrowInvalid as e:
                raise ManifestError(
                    f"Column 'acquired_at' must hold ISO 8601 timestamps: {e}"
                ) from e
        elif pa.types.is_timestamp(col.type):
            col = pc.cast(col, pa.timestamp("us"))
        i = out.column_names.index("acquired_at")
        out = out.set_column(i, "acquired_at", col)
    if "label_pe" in out.column_names:
        col = out["label_pe"]
        i = out.column_names.index("label_pe")
        if not (pa.types.is_integer(col.type) or pa.types.is_null(col.type)):
            if pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
                pass  # validated below, then cast
            elif pa.types.is_string(col.type):
                col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
        out = out.set_column(i, "label_pe", col)
    return out


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the table plus the folder that relative paths resolve against."""

    table: pa.Table
    base_dir: Path
    metadata: Mapping[str, object]

    def __len__(self) -> int:
        return self.table.num_rows

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.base_dir / p

    def rows(self, modality: str | Modality | None = None) -> list[dict[str, object]]:
        t = self.table
        if modality is not None:
            t = t.filter(pc.equal(t["modality"], Modality.parse(modality).value))
        return t.to_pylist()

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical content (used to record which manifest made an artifact)."""
        sink = pa.BufferOutputStream()
        pq.write_table(self.table.sort_by("study_id"), sink)
        return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _row_name(table: pa.Table, i: int) -> str:
    sid = table["study_id"][i].as_py() if "study_id" in table.column_names else None
    return f"row {i + 1}" + (f" (study_id {sid!r})" if sid is not None else "")


def validate_manifest(
    table: pa.Table, base_dir: Path | None = None, *, check_paths: bool = True
) -> pa.Table:
    """Validate and normalise a manifest table; raise ManifestError naming the first bad row."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"Manifest is missing required column(s) {missing}. Required: {list(REQUIRED_COLUMNS)}."
        )
    table = _normalise(table)
    n = table.num_rows
    if n == 0:
        raise ManifestError("The manifest has no rows.")
    for col in ("patient_id", "study_id", "modality", "path", "split"):
        nulls = table[col].null_count
        if nulls:
            i = table[col].to_pylist().index(None)
            raise ManifestError(f"{_row_name(table, i)}: column '{col}' is empty.")
    seen: dict[str, int] = {}
    for i, sid in enumerate(table["study_id"].to_pylist()):
        if sid in seen:
            raise ManifestError(
                f"{_row_name(table, i)}: duplicate study_id (first seen in row {seen[sid] + 1}). "
                "study_id must be unique."
            )
        seen[sid] = i
    for i, m in enumerate(table["modality"].to_pylist()):
        if m not in {x.value for x in Modality}:
            raise ManifestError(
                f"{_row_name(table, i)}: unknown modality {m!r}. Valid: "
                f"{[x.value for x in Modality]}."
            )
    split_of: dict[str, tuple[str, int]] = {}
    for i, (pid, s) in enumerate(
        zip(table["patient_id"].to_pylist(), table["split"].to_pylist(), strict=True)
    ):
        if s not in SPLITS:
            raise ManifestError(f"{_row_name(table, i)}: unknown split {s!r}. Valid: {list(SPLITS)}.")
        if pid in split_of and split_of[pid][0] != s:
            raise ManifestError(
                f"{_row_name(table, i)}: its patient is in split {s!r} here but in "
                f"{split_of[pid][0]!r} in row {split_of[pid][1] + 1}; splits are per patient "
                "(no patient may cross splits)."
            )
        split_of.setdefault(pid, (s, i))
    labels = table["label_pe"].to_pylist()
    clean: list[int | None] = []
    for i, v in enumerate(labels):
        if v is None or (isinstance(v, float) and v != v):
            clean.append(None)
            continue
        if isinstance(v, str):
            v = v.strip()
        if v in (0, 1, "0", "1", True, False) and not (isinstance(v, float) and v not in (0.0, 1.0)):
            clean.append(int(v))
        else:
            raise ManifestError(
                f"{_row_name(table, i)}: label_pe must be 0, 1 or empty, got {v!r}."
            )
    table = table.set_column(
        table.column_names.index("label_pe"), "label_pe", pa.array(clean, pa.int8())
    )
    if table["acquired_at"].type != pa.timestamp("us") and table["acquired_at"].null_count < n:
        raise ManifestError(
            f"Column 'acquired_at' must hold timestamps, got type {table['acquired_at'].type}."
        )
    if check_paths:
        if base_dir is None:
            raise ManifestError("check_paths needs the manifest's folder (base_dir).")
        for i, p in enumerate(table["path"].to_pylist()):
            full = Path(p) if os.path.isabs(p) else base_dir / p
            if not full.exists():
                raise ManifestError(
                    f"{_row_name(table, i)}: path {p!r} does not exist (relative paths resolve "
                    f"against the manifest's folder {str(base_dir)!r})."
                )
    return table


def write_manifest(
    rows: pa.Table | Sequence[Mapping[str, object]],
    out_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, object] | None = None,
    name: str = "manifest",
    check_paths: bool = True,
) -> Path:
    """Validate ``rows`` and write ``out_dir/<name>.parquet`` (+ ``.csv``); return the parquet path.

    ``metadata`` (JSON-serialisable) is stored in the Parquet schema metadata, e.g. the phantom spec.
    """
    out = Path(out_dir)
    table = validate_manifest(_to_table(rows), out, check_paths=check_paths)
    meta = {METADATA_KEY: json.dumps(dict(metadata or {}), sort_keys=True, default=str).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    out.mkdir(parents=True, exist_ok=True)
    pq_path = out / f"{name}.parquet"
    with atomic_path(pq_path) as tmp:
        pq.write_table(table, tmp)
    with atomic_path(out / f"{name}.csv") as tmp:
        pacsv.write_csv(table.replace_schema_metadata(None), tmp)
    return pq_path


def load_manifest(path: str | os.PathLike[str], *, check_paths: bool = True) -> Manifest:
    """Load a Parquet or CSV manifest and validate it (ManifestError names the bad row)."""
    p = Path(path)
    if p.is_dir():
        for cand in ("manifest.parquet", "manifest.csv"):
            if (p / cand).exists():
                p = p / cand
                break
        else:
            raise ManifestError(f"No manifest.parquet or manifest.csv in folder {str(p)!r}.")
    if not p.exists():
        raise ManifestError(f"Manifest file {str(p)!r} does not exist.")
    try:
        if p.suffix == ".parquet":
            table = read_parquet_state(p, "Manifest", error=ManifestCorruptError, fix=(
                "Write it again from its source (a torn copy? compare it with the original); "
                "`embedstore manifest validate` checks it."))
        elif p.suffix in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if p.suffix == ".tsv" else ",")
            conv = pacsv.ConvertOptions(
                column_types={
                    "patient_id": pa.string(),
                    "study_id": pa.string(),
                    "pair_id": pa.string(),
                    "label_pe": pa.string(),
                    "path": pa.string(),
                },
                strings_can_be_null=True,
            )
            table = pacsv.read_csv(p, parse_options=opts, convert_options=conv)
        else:
            raise ManifestError(f"Manifest {str(p)!r} must be .parquet or .csv, got {p.suffix!r}.")
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"Could not read manifest {str(p)!r}: {e}") from e
    meta_raw = (table.schema.metadata or {}).get(METADATA_KEY)
    try:
        metadata = json.loads(meta_raw) if meta_raw else {}
    except ValueError as e:
        raise ManifestCorruptError(f"Manifest {str(p)!r} has unreadable {METADATA_KEY.decode()} "
                                   f"metadata ({e}). Write it again with embedstore.manifest.",
                                   reason="not_json", path=str(p)) from e
    table = validate_manifest(table, p.parent.resolve(), check_paths=check_paths)
    return Manifest(table=table, base_dir=p.parent.resolve(), metadata=metadata)


# ----------------------------------------------------------------------------------------------
# Importers for the formats the published method used
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportResult:
    manifest_path: Path
    n_rows: int
    n_patients: int
    excluded: Mapping[str, int]  # reason -> count


def _link(out_dir: Path, name: str, target: Path) -> str:
    """Point ``out_dir/links/<name>`` at ``target`` and return the manifest-relative path.

    Source files are often named by accession number or UID; linking them under their pseudonym
    keeps those identifiers out of the manifest, the catalog and every log line.
    """
    links = out_dir / "links"
    links.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) if target.is_file() else ""
    link = links / f"{name}{suffix}"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
    return str(link.relative_to(out_dir))


def _find_by_stem(folder: Path, stem: str) -> Path | None:
    """The file or folder in ``folder`` named ``stem`` (with any extension), if exactly one."""
    direct = folder / stem
    if direct.exists():
        return direct
    hits = [p for p in folder.glob(f"{stem}.*")]
    return hits[0] if len(hits) == 1 else None


def _timestamp(value: str | None, where: str) -> object:
    """An ISO 8601 date or date-time from a CSV cell (None when empty); ManifestError names it."""
    from datetime import datetime

    if value is None or not str(value).strip():
        return None
    try:
        return datetime.fromisoformat(str(value).strip())
    except ValueError as e:
        raise ManifestError(
            f"{where}: {value!r} is not an ISO 8601 date or date-time (e.g. 2024-03-01T10:15)."
        ) from e


def import_paired_csv(
    csv_path: str | os.PathLike[str],
    *,
    ct_dir: str | os.PathLike[str],
    cxr_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    key: bytes,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.15, 0.25),
    patient_column: str | None = None,
    ct_time_column: str | None = None,
    cxr_time_column: str | None = None,
) -> ImportResult:
    """Import the published method's paired CSV (``CT_Accession_number, cxr_Accession_number, PE``).

    Each row pairs one CTPA with one CXR; each accession names one file (or series folder) in
    ``ct_dir`` / ``cxr_dir``. Accession numbers are identifying, so they are replaced by keyed
    pseudonyms in every column and the files are reached through ``out_dir/links/``. Rows whose
    files are missing are excluded and counted, never silently dropped.

    ``patient_column`` names the column identifying the patient (pseudonymised with the same
    key): splits are then assigned per patient, so two CTPA work-ups of one patient share a
    split. Without it each CT accession is taken as its own patient (metadata says so).
    ``ct_time_column`` / ``cxr_time_column`` name ISO 8601 acquisition date-times, which become
    ``acquired_at`` (dates shifted per patient are fine when the shift is the same for all of a
    patient's studies: only gaps are used). A CT accession on several rows is one CTPA paired
    with several CXRs (its ``pair_id``); a CXR already paired with another CTPA keeps its first
    pair, and the later row adds only its CTPA and is counted as ``cxr_paired_twice``.
    """
    src = Path(csv_path)
    if not src.exists():
        raise ManifestError(f"Paired CSV {str(src)!r} does not exist.")
    need = ["CT_Accession_number", "cxr_Accession_number", "PE"]
    extra = [c for c in (patient_column, ct_time_column, cxr_time_column) if c]
    table = pacsv.read_csv(
        src, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in need + extra}, strings_can_be_null=True)
    )
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise ManifestError(f"Paired CSV is missing column(s) {missing}; expected {need}.")
    for opt, col in (("--patient-column", patient_column), ("--ct-time-column", ct_time_column),
                     ("--cxr-time-column", cxr_time_column)):
        if col and col not in table.column_names:
            raise ManifestError(
                f"{opt} {col!r} is not a column of {str(src)!r}. Columns: {table.column_names}.")
    out = Path(out_dir)
    ct_root, cxr_root = Path(ct_dir), Path(cxr_dir)
    for d, what in ((ct_root, "--ct-dir"), (cxr_root, "--cxr-dir")):
        if not d.is_dir():
            raise ManifestError(f"{what} {str(d)!r} is not a folder.")
    excluded: dict[str, int] = {}

    def exclude(reason: str) -> None:
        excluded[reason] = excluded.get(reason, 0) + 1

    studies: dict[str, dict[str, object]] = {}  # study_id -> row (insertion order = CSV order)
    sources: dict[str, Path] = {}
    first_row: dict[str, int] = {}
    for i, r in enumerate(table.to_pylist()):
        ct_acc, cxr_acc, pe = (r[c] for c in need)
        where = f"Paired CSV row {i + 1}"
        if not ct_acc or not cxr_acc:
            exclude("missing_accession")
            continue
        if (pe or "").strip() not in ("0", "1"):
            raise ManifestError(f"{where}: PE must be 0 or 1, got {pe!r}.")
        patient = r[patient_column] if patient_column else ct_acc
        if not patient or not str(patient).strip():
            exclude("missing_patient")
            continue
        ct_path, cxr_path = _find_by_stem(ct_root, ct_acc), _find_by_stem(cxr_root, cxr_acc)
        if ct_path is None or cxr_path is None:
            exclude("file_not_found")
            continue
        pid, ct_pseudo = pseudonymise(str(patient), key), pseudonymise(ct_acc, key)
        ct_sid, cxr_sid = f"{ct_pseudo}-CTPA", f"{pseudonymise(cxr_acc, key)}-CXR"
        ct_at = _timestamp(r[ct_time_column], f"{where}, {ct_time_column}") if ct_time_column else None
        cxr_at = (_timestamp(r[cxr_time_column], f"{where}, {cxr_time_column}")
                  if cxr_time_column else None)
        ct_row = studies.get(ct_sid)
        if ct_row is not None:  # the same CTPA with another CXR
            if ct_row["patient_id"] != pid or ct_row["label_pe"] != int(pe):
                raise ManifestError(
                    f"{where}: its CT accession is on row {first_row[ct_sid] + 1} too, with "
                    "another " + ("patient" if ct_row["patient_id"] != pid else "PE label")
                    + "; one CTPA has one patient and one label. Fix the CSV.")
        cxr_row = studies.get(cxr_sid)
        if cxr_row is not None and cxr_row["patient_id"] != pid:
            raise ManifestError(f"{where}: its CXR accession belongs to another patient on row "
                                f"{first_row[cxr_sid] + 1}. Fix the CSV.")
        todo = [(ct_sid, "CTPA", ct_path, ct_at)]
        if cxr_row is not None and cxr_row["pair_id"] != ct_pseudo:
            exclude("cxr_paired_twice")  # the CTPA stays (teacher, derived pairs), unpaired here
        else:
            todo.append((cxr_sid, "CXR", cxr_path, cxr_at))
        for sid, mod, path, at in todo:
            if sid not in studies:
                studies[sid] = {"patient_id": pid, "study_id": sid, "modality": mod,
                                "acquired_at": at, "label_pe": int(pe), "pair_id": ct_pseudo}
                sources[sid] = path
                first_row[sid] = i
    if not studies:
        raise ManifestError(f"No usable rows in {str(src)!r} (excluded: {excluded}).")
    splits = assign_splits([r["patient_id"] for r in studies.values()], fractions, seed)  # type: ignore[misc]
    rows = [{**r, "path": _link(out, str(sid), sources[sid]), "split": splits[str(r["patient_id"])]}
            for sid, r in studies.items()]
    rows_t = _to_table(rows)
    rows_t = rows_t.set_column(rows_t.column_names.index("acquired_at"), "acquired_at",
                               pa.array([r["acquired_at"] for r in rows], pa.timestamp("us")))
    patients = len(set(splits))
    path = write_manifest(rows_t, out, metadata={
        "importer": "paired_csv", "seed": seed, "excluded": excluded,
        "split_fractions": list(fractions),
        "patient_ids": "patient_column" if patient_column else "one per CT accession",
        "acquired_at": bool(ct_time_column and cxr_time_column)})
    return ImportResult(path, len(rows), patients, excluded)


_RSPECT_EXAM_FLAGS = (
    "rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1", "leftsided_pe", "rightsided_pe", "central_pe",
    "chronic_pe", "acute_and_chronic_pe", "qa_motion", "qa_contrast", "flow_artifact",
    "true_filling_defect_not_pe",
)


def import_rspect(
    train_csv: str | os.PathLike[str],
    *,
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    key: bytes,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.15, 0.25),
    check_paths: bool = True,
    patient_column: str | None = None,
) -> ImportResult:
    """Import RSNA RSPECT ``train.csv`` (one row per image) as one CTPA row per series.

    RSPECT names no patients, so each StudyInstanceUID is taken as one patient, unless
    ``patient_column`` names a column added to the CSV that identifies patients (pseudonymised
    with the same key; splits are then per patient).

    ``label_pe = 1 - negative_exam_for_pe``, except that **indeterminate** exams (whose
    ``negative_exam_for_pe`` is 0 too) are excluded and counted rather than called positive.
    Series folders are expected at ``images_dir/<StudyInstanceUID>/<SeriesInstanceUID>``.
    """
    src = Path(train_csv)
    if not src.exists():
        raise ManifestError(f"RSPECT CSV {str(src)!r} does not exist.")
    table = pacsv.read_csv(src, convert_options=pacsv.ConvertOptions(
        column_types={patient_column: pa.string()} if patient_column else {}))
    need = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "negative_exam_for_pe",
            "indeterminate"]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise ManifestError(f"RSPECT CSV is missing column(s) {missing}; expected at least {need}.")
    if patient_column is not None and patient_column not in table.column_names:
        raise ManifestError(f"--patient-column {patient_column!r} is not a column of {str(src)!r}. "
                            f"Columns: {table.column_names}.")
    flags = [c for c in _RSPECT_EXAM_FLAGS if c in table.column_names]
    keys = ["StudyInstanceUID", "SeriesInstanceUID"] + ([patient_column] if patient_column else [])
    agg = table.group_by(keys).aggregate(
        [("SOPInstanceUID", "count"), ("negative_exam_for_pe", "min"),
         ("negative_exam_for_pe", "max"), ("indeterminate", "max")]
        + [(f, "max") for f in flags]
    )
    images = Path(images_dir)
    excluded: dict[str, int] = {}
    staged: list[dict[str, object]] = []
    seen_series: set[tuple[str, str]] = set()
    for r in agg.to_pylist():
        series = (r["StudyInstanceUID"], r["SeriesInstanceUID"])
        if series in seen_series:
            raise ManifestError(
                f"RSPECT CSV: a series of study {r['StudyInstanceUID']!r} has rows with different "
                f"{patient_column!r} values; one series belongs to one patient. Fix the CSV.")
        seen_series.add(series)
        if patient_column and (r[patient_column] is None or not str(r[patient_column]).strip()):
            excluded["missing_patient"] = excluded.get("missing_patient", 0) + 1
            continue
        if r["negative_exam_for_pe_min"] != r["negative_exam_for_pe_max"]:
            excluded["inconsistent_exam_label"] = excluded.get("inconsistent_exam_label", 0) + 1
            continue
        if r["indeterminate_max"] == 1:
            excluded["indeterminate"] = excluded.get("indeterminate", 0) + 1
            continue
        folder = images / r["StudyInstanceUID"] / r["SeriesInstanceUID"]
        if check_paths and not folder.is_dir():
            excluded["series_folder_not_found"] = excluded.get("series_folder_not_found", 0) + 1
            continue
        pid = pseudonymise(str(r[patient_column or "StudyInstanceUID"]), key)
        sid = pseudonymise(r["SeriesInstanceUID"], key)
        row: dict[str, object] = {
            "patient_id": pid, "study_id": f"{sid}-CTPA", "modality": "CTPA", "path": folder,
            "acquired_at": None, "label_pe": 1 - int(r["negative_exam_for_pe_min"]),
            "n_images": r["SOPInstanceUID_count"],
        }
        row.update({f: r[f"{f}_max"] for f in flags})
        staged.append(row)
    if not staged:
        raise ManifestError(f"No usable series in {str(src)!r} (excluded: {excluded}).")
    out = Path(out_dir)
    splits = assign_splits([r["patient_id"] for r in staged], fractions, seed)
    for r in staged:
        r["split"] = splits[r["patient_id"]]  # type: ignore[index]
        folder = r["path"]
        r["path"] = _link(out, str(r["study_id"]), folder) if check_paths else str(folder)  # type: ignore[arg-type]
    t = _to_table(staged)
    t = t.set_column(t.column_names.index("acquired_at"), "acquired_at",
                     pa.nulls(t.num_rows, pa.timestamp("us")))
    path = write_manifest(t, out, check_paths=check_paths, metadata={
        "importer": "rspect", "seed": seed, "excluded": excluded, "split_fractions": list(fractions)})
    return ImportResult(path, t.num_rows, len(set(splits)), excluded)


def summarize_manifest(path: str | os.PathLike[str], *, check_paths: bool = True) -> dict[str, object]:
    """Validate a manifest and count its rows by modality, split and label."""
    m = load_manifest(path, check_paths=check_paths)
    t = m.table

    def counts(col: str) -> dict[str, int]:
        vals = t[col].to_pylist()
        return {str(k): vals.count(k) for k in sorted(set(vals), key=str)}

    return {
        "rows": t.num_rows,
        "patients": len(set(t["patient_id"].to_pylist())),
        "by_modality": counts("modality"),
        "by_split": counts("split"),
        "labelled": t.num_rows - t["label_pe"].null_count,
    }


def import_paired_csv_with_env_key(csv_path: str | os.PathLike[str], **kwargs: object) -> ImportResult:
    """``import_paired_csv`` with the pseudonymisation key from the environment (refuses without)."""
    return import_paired_csv(csv_path, key=load_pseudonym_key(synthetic=False), **kwargs)  # type: ignore[arg-type]


def import_rspect_with_env_key(train_csv: str | os.PathLike[str], **kwargs: object) -> ImportResult:
    """``import_rspect`` with the pseudonymisation key from the environment (refuses without)."""
    return import_rspect(train_csv, key=load_pseudonym_key(synthetic=False), **kwargs)  # type: ignore[arg-type]
