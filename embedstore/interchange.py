"""Embeddings in and out of a store: ``export_embeddings`` and ``import_embeddings``.

An export is one Parquet file that pandas, polars, DuckDB and pyarrow read without embedstore
(docs/INTERCHANGE.md)::

    study_id      string                       the store's (pseudonymous) study id
    patient_id    string                       the store's (pseudonymous) patient id
    split         string                       train | val | test (null: not in the manifest)
    label_pe      int8                         0 / 1 / null (unlabelled or not in the manifest)
    content_hash  string                       the pixels' hash the row key was built from
    cache_key     string                       the row key (an extraction over the same images
                                               with the same encoder finds it cached)
    vector        fixed_size_list<float32>[D]  the embedding

    key-value metadata "embedstore.export": JSON {export_schema_version, embedstore_version,
      exported_at, modality, encoder_key, dim, store_dtype, rows, manifest_fingerprint,
      vector_column, spec}; "embedstore.card": the encoder card (JSON)

No DICOM value is ever written: the ids are the manifest's, which importers pseudonymise.

``import_embeddings`` creates (or adds to) a set from such a file, from any Parquet file with an
id column and a vector column, or from an ``.npy`` (N, D) array plus a CSV of ids, row for row.
Vectors are attached to studies of the store's manifest (``manifest=`` attaches one first): an id
that is not a study of that modality refuses the whole file (docs/DECISIONS.md). A file written
by ``export_embeddings`` brings its identity (set key, spec, card, row keys), so an export
imported into a new store is the same set bit for bit; any other file needs an encoder card.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from embedstore._fsio import atomic_path
from embedstore.domain import Modality
from embedstore.errors import (
    ConfigError,
    EncoderError,
    InterchangeError,
    ManifestError,
    StoreNotFoundError,
)
from embedstore.models.encoders import EncoderCard
from embedstore.store import open_store
from embedstore.store.format import NAME_RE, PROVENANCE_KEY, iso, utcnow

__all__ = [
    "EXPORT_SCHEMA_VERSION",
    "EXPORT_META_KEY",
    "CARD_META_KEY",
    "VECTOR_COLUMN",
    "FORMATS",
    "ExportSummary",
    "ImportSummary",
    "export_embeddings",
    "import_embeddings",
    "imported_set_spec",
    "read_export_metadata",
]

#: Bumped when the export's columns or metadata change meaning.
EXPORT_SCHEMA_VERSION = 1
EXPORT_META_KEY = b"embedstore.export"
CARD_META_KEY = b"embedstore.card"
VECTOR_COLUMN = "vector"
FORMATS = ("parquet", "npy")
IMPORTED_FAMILY = "imported"
_EXAMPLES = 3
_SET_KEY_HEX = 10  # as embedstore.identity
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # an encoder name (models/encoders)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("embedstore")
    except Exception:  # noqa: BLE001 - a source tree without installed metadata
        return "unknown"


def _examples(values: Sequence[str]) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:_EXAMPLES])
    return shown + (", ..." if len(values) > _EXAMPLES else "")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    modality: str
    encoder_key: str
    rows: int
    dim: int
    manifest_fingerprint: str | None
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _choose_set(store: Any, modality: str | Modality | None, encoder_key: str | None) -> Any:
    sets = store.sets()
    m = None if modality is None else Modality.parse(modality).value
    found = [s for s in sets if (m is None or s.modality == m)
             and (encoder_key is None or s.encoder_key == encoder_key)]
    have = [f"{s.modality}/{s.encoder_key}" for s in sets]
    if not found:
        asked = "/".join(x for x in (m, encoder_key) if x) or "any set"
        raise StoreNotFoundError(
            f"No embedding set {asked!r} in store {str(store.root)!r}. Available: "
            f"{have or 'none (run `embedstore extract` or `embedstore import-embeddings` first)'}.")
    if len(found) > 1:
        raise ConfigError(
            f"Store {str(store.root)!r} has {len(found)} embedding sets: "
            f"{[f'{s.modality}/{s.encoder_key}' for s in found]}. Choose one with --modality "
            "and --encoder KEY.")
    return found[0]


def _manifest_columns(store: Any, study_ids: pa.Array) -> tuple[pa.Array, pa.Array]:
    """split and label_pe of ``study_ids`` from the attached manifest (nulls where absent)."""
    n = len(study_ids)
    if not store.manifest_path.exists():
        return pa.nulls(n, pa.string()), pa.nulls(n, pa.int8())
    man = pq.read_table(store.manifest_path, columns=["study_id", "split", "label_pe"])
    idx = pc.index_in(study_ids, value_set=man["study_id"].combine_chunks())
    split = pc.take(man["split"].combine_chunks().cast(pa.string()), idx)
    label = pc.take(man["label_pe"].combine_chunks().cast(pa.int8()), idx)
    return split, label


def export_embeddings(store_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                      modality: str | Modality | None = None,
                      encoder_key: str | None = None) -> ExportSummary:
    """Write one embedding set (the only one, or the one ``modality``/``encoder_key`` name) to
    ``out`` as Parquet (see the module docstring); the write is atomic."""
    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise ConfigError(f"Export file {out.name!r} must end in .parquet.")
    st = open_store(store_path)
    info = _choose_set(st, modality, encoder_key)
    es = st.load(info.modality, info.encoder_key)
    meta = es.meta
    n, dim = es.vectors.shape
    flat = pa.array(np.ascontiguousarray(es.vectors, dtype=np.float32).reshape(-1))
    vectors = pa.FixedSizeListArray.from_arrays(flat, dim)
    sids = meta["study_id"].combine_chunks()
    split, label = _manifest_columns(st, sids)
    spec = dict(info.spec)
    prov = spec.get(PROVENANCE_KEY) or {}
    manifest_fp = prov.get("manifest_fingerprint")
    doc = {
        "export_schema_version": EXPORT_SCHEMA_VERSION,
        "embedstore_version": _version(),
        "exported_at": iso(utcnow()),
        "modality": info.modality,
        "encoder_key": info.encoder_key,
        "dim": int(dim),
        "store_dtype": info.dtype,
        "rows": int(n),
        "manifest_fingerprint": manifest_fp,
        "vector_column": VECTOR_COLUMN,
        "spec": spec,
    }
    table = pa.table({
        "study_id": sids,
        "patient_id": meta["patient_id"].combine_chunks().cast(pa.string()),
        "split": split,
        "label_pe": label,
        "content_hash": meta["content_hash"].combine_chunks().cast(pa.string()),
        "cache_key": meta["cache_key"].combine_chunks().cast(pa.string()),
        VECTOR_COLUMN: vectors,
    })
    table = table.replace_schema_metadata({
        EXPORT_META_KEY: json.dumps(doc, sort_keys=True).encode(),
        CARD_META_KEY: json.dumps(spec.get("card"), sort_keys=True).encode(),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return ExportSummary(path=out, modality=info.modality, encoder_key=info.encoder_key, rows=int(n),
                         dim=int(dim), manifest_fingerprint=manifest_fp, bytes=out.stat().st_size)


# ----------------------------------------------------------------------------------------------
# Import: reading the file
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportSummary:
    store: Path
    modality: str
    encoder_key: str
    rows: int  # vectors in the file
    written: int  # rows committed by this import
    unchanged: int  # rows whose identical row key was already in the set
    not_in_file: int  # studies of the modality in the manifest without a vector in the file
    source: str  # "embedstore export" or "card"
    source_dtype: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["store"] = str(self.store)
        return d


@dataclass
class _Loaded:
    ids: list[str]
    vectors: np.ndarray  # (N, D) float32
    source_dtype: str
    patient_ids: list[str | None] | None = None
    content_hashes: list[str] | None = None
    cache_keys: list[str] | None = None
    export: dict[str, Any] | None = None  # the embedstore.export metadata, when present


def read_export_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``embedstore.export`` metadata of a Parquet file (None when it has none)."""
    try:
        md = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise InterchangeError(f"{Path(path).name!r} is not a readable Parquet file ({e}).") from e
    raw = md.get(EXPORT_META_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise InterchangeError(f"{Path(path).name!r}: its {EXPORT_META_KEY.decode()!r} metadata "
                               f"is not JSON ({e}). Re-export the set.") from e
    if not isinstance(doc, dict):
        raise InterchangeError(f"{Path(path).name!r}: its {EXPORT_META_KEY.decode()!r} metadata "
                               "is not a JSON object. Re-export the set.")
    return doc


def _ids_of(col: pa.ChunkedArray | pa.Array, name: str, what: str) -> list[str]:
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            or pa.types.is_integer(col.type)):
        raise InterchangeError(f"{what}: id column {name!r} has type {col.type}; it must hold "
                               "strings (or integers).")
    if col.null_count:
        raise InterchangeError(f"{what}: id column {name!r} has {col.null_count} empty value(s); "
                               "every vector needs its study id.")
    ids = [str(v) for v in col.cast(pa.string()).to_pylist()]
    empty = sum(1 for v in ids if not v.strip())
    if empty:
        raise InterchangeError(f"{what}: id column {name!r} has {empty} blank value(s); every "
                               "vector needs its study id.")
    return ids


def _vectors_of_arrow(col: pa.ChunkedArray, name: str, what: str) -> tuple[np.ndarray, str]:
    """A list / fixed-size-list column of floats -> (N, D) array of its own dtype."""
    arr = col.combine_chunks()
    t = arr.type
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise InterchangeError(f"{what}: vector column {name!r} has type {t}; it must be a list "
                               "of floats, ideally fixed_size_list<float32>[D].")
    vt = t.value_type
    if not pa.types.is_floating(vt):
        raise InterchangeError(f"{what}: vector column {name!r} holds {vt}; embeddings must be "
                               "float16, float32 or float64.")
    if arr.null_count:
        raise InterchangeError(f"{what}: vector column {name!r} has {arr.null_count} empty "
                               "vector(s); drop those rows or fill them.")
    lengths = np.asarray(pc.list_value_length(arr).to_numpy(zero_copy_only=False))
    n = len(arr)
    if n and (lengths != lengths[0]).any():
        uniq = sorted(set(lengths.tolist()))
        raise InterchangeError(f"{what}: vectors in column {name!r} have different lengths "
                               f"{_examples([str(u) for u in uniq])}; all must have one dimension.")
    dim = int(lengths[0]) if n else 0
    flat = arr.flatten()
    if flat.null_count:
        raise InterchangeError(f"{what}: vector column {name!r} has {flat.null_count} null "
                               "element(s) inside vectors.")
    values = flat.to_numpy(zero_copy_only=False).reshape(n, dim)  # (N, D)
    return values, str(values.dtype)


def _pick_vector_column(schema: pa.Schema, wanted: str | None, what: str) -> str:
    if wanted is not None:
        if wanted not in schema.names:
            raise InterchangeError(f"{what}: no vector column {wanted!r}. Columns: {schema.names}.")
        return wanted
    if VECTOR_COLUMN in schema.names:
        return VECTOR_COLUMN
    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
             or pa.types.is_fixed_size_list(f.type)]
    if len(lists) == 1:
        return lists[0]
    raise InterchangeError(f"{what}: cannot tell which column holds the vectors (list columns: "
                           f"{lists or 'none'}). Name it with --vector-column.")


def _read_parquet(path: Path, id_column: str, vector_column: str | None) -> _Loaded:
    what = f"Embeddings file {path.name!r}"
    export = read_export_metadata(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InterchangeError(f"{what} is not a readable Parquet file ({e}).") from e
    if id_column not in table.column_names:
        raise InterchangeError(f"{what}: no id column {id_column!r}. Columns: "
                               f"{table.column_names}. Name it with --id-column.")
    vcol = _pick_vector_column(table.schema, vector_column, what)
    ids = _ids_of(table[id_column], id_column, what)
    vectors, dtype = _vectors_of_arrow(table[vcol], vcol, what)

    def strings(name: str) -> list[Any] | None:
        if name not in table.column_names or name == id_column:
            return None
        return table[name].cast(pa.string()).to_pylist()

    return _Loaded(ids=ids, vectors=vectors, source_dtype=dtype, patient_ids=strings("patient_id"),
                   content_hashes=strings("content_hash") if export else None,
                   cache_keys=strings("cache_key") if export else None, export=export)


def _read_npy(path: Path, ids_file: Path | None, id_column: str) -> _Loaded:
    what = f"Embeddings file {path.name!r}"
    if ids_file is None:
        raise ConfigError(f"--format npy needs --ids FILE.csv: a CSV with a header and a "
                          f"{id_column!r} column, one row per row of {path.name!r}.")
    try:
        # allow_pickle=False: an .npy from elsewhere must not run code when loaded
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise InterchangeError(f"{what} is not a readable .npy array ({e}).") from e
    if not isinstance(arr, np.ndarray):
        raise InterchangeError(f"{what} holds several arrays (an .npz?); give one (N, D) .npy.")
    if arr.ndim != 2:
        raise InterchangeError(f"{what} has shape {arr.shape}; it must be (N, D): one row per study.")
    if arr.dtype.kind != "f":
        raise InterchangeError(f"{what} has dtype {arr.dtype}; embeddings must be float16, "
                               "float32 or float64.")
    try:
        ids_table = pacsv.read_csv(ids_file, convert_options=pacsv.ConvertOptions(
            column_types={id_column: pa.string(), "patient_id": pa.string()},
            strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError) as e:
        raise InterchangeError(f"Ids file {ids_file.name!r} is not a readable CSV ({e}).") from e
    if id_column not in ids_table.column_names:
        raise InterchangeError(f"Ids file {ids_file.name!r}: no id column {id_column!r}. "
                               f"Columns: {ids_table.column_names}. Name it with --id-column.")
    ids = _ids_of(ids_table[id_column], id_column, f"Ids file {ids_file.name!r}")
    if len(ids) != arr.shape[0]:
        raise InterchangeError(f"{what} has {arr.shape[0]} rows but ids file {ids_file.name!r} "
                               f"has {len(ids)}; they must match row for row.")
    pids = (ids_table["patient_id"].to_pylist() if "patient_id" in ids_table.column_names
            and id_column != "patient_id" else None)
    return _Loaded(ids=ids, vectors=np.asarray(arr), source_dtype=str(arr.dtype), patient_ids=pids)


# ----------------------------------------------------------------------------------------------
# Import: identity and checks
# ----------------------------------------------------------------------------------------------


def _card_from_file(card_file: str | os.PathLike[str]) -> EncoderCard:
    from embedstore.encoders import load_card_file

    fields, options = load_card_file(card_file)
    if options:
        raise ConfigError(f"Card file option(s) {sorted(options)} apply to hf: encoders, not to "
                          "imported embeddings.")
    return EncoderCard.from_dict(fields)


def imported_set_spec(card: EncoderCard, name: str) -> tuple[str, dict[str, Any]]:
    """Set key and stored spec of vectors that come with a card only (no encoder to hash):
    the encoder fingerprint covers the name, the family ``imported`` and the card."""
    from embedstore.identity import SetIdentity
    from embedstore.preprocess import PreprocessSpec

    spec = {"name": name, "family": IMPORTED_FAMILY, "params": {}, "weights": None, "seed": 0,
            "card": card.to_dict()}
    fp = hashlib.sha256(_canonical({k: spec[k] for k in ("name", "family", "card")}).encode())
    ident = SetIdentity(encoder={"name": name, "spec": spec, "fingerprint": fp.hexdigest(),
                                 "weights_hash": None, "embed_dim": card.embed_dim},
                        card=card, preprocess=PreprocessSpec.for_card(card))
    return ident.set_key, ident.spec()


def _check_export(doc: dict[str, Any], modality: Modality, dim: int, what: str
                  ) -> tuple[str, dict[str, Any]]:
    """The set key and spec an export carries, checked against itself and the vectors."""
    version = doc.get("export_schema_version")
    if version != EXPORT_SCHEMA_VERSION:
        raise InterchangeError(f"{what} has export_schema_version {version!r}; this embedstore "
                               f"reads {EXPORT_SCHEMA_VERSION}. Re-export it with this version.")
    spec, key = doc.get("spec"), doc.get("encoder_key")
    if not isinstance(spec, dict) or not isinstance(key, str) or not NAME_RE.match(key):
        raise InterchangeError(f"{what}: its export metadata lacks a valid spec or encoder_key. "
                               "Re-export the set.")
    if doc.get("modality") != modality.value:
        raise InterchangeError(f"{what} holds {doc.get('modality')} embeddings, not {modality}. "
                               f"Pass --modality {str(doc.get('modality')).lower()}.")
    if int(doc.get("dim", -1)) != dim or int(spec.get("embed_dim", -1)) != dim:
        raise InterchangeError(f"{what}: its metadata says dim {doc.get('dim')!r} but the vectors "
                               f"have {dim}. The file is damaged; re-export it.")
    try:
        EncoderCard.from_dict(spec.get("card") or {})
        enc_fp, pp_fp = str(spec["encoder_fingerprint"]), str(spec["preprocess_fingerprint"])
        name = str(spec["encoder"]["name"])
    except (KeyError, TypeError, EncoderError) as e:
        raise InterchangeError(f"{what}: its export metadata has no valid card or fingerprints "
                               f"({e}). Re-export the set.") from e
    expect = f"{name}-{hashlib.sha256((enc_fp + pp_fp).encode()).hexdigest()[:_SET_KEY_HEX]}"
    if expect != key:
        raise InterchangeError(f"{what}: its encoder_key {key!r} does not match its spec (which "
                               f"gives {expect!r}); the metadata was edited. Re-export the set.")
    return key, {k: v for k, v in spec.items() if k != PROVENANCE_KEY}


def _check_vectors(loaded: _Loaded, what: str) -> np.ndarray:
    n = len(loaded.ids)
    if n == 0:
        raise InterchangeError(f"{what} has no rows.")
    dups = sorted(s for s, k in Counter(loaded.ids).items() if k > 1)
    if dups:
        raise InterchangeError(f"{what}: {len(dups)} study id(s) appear more than once, e.g. "
                               f"{_examples(dups)}. Give one vector per study.")
    if loaded.vectors.shape[1] == 0:
        raise InterchangeError(f"{what}: its vectors have dimension 0.")
    with np.errstate(over="ignore"):  # float64 beyond float32's range -> inf, refused below
        vectors = np.ascontiguousarray(loaded.vectors, dtype=np.float32)  # (N, D)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        ids = [loaded.ids[i] for i in np.flatnonzero(bad)]
        raise InterchangeError(f"{what}: {len(ids)} vector(s) hold NaN or inf (as float32), e.g. "
                               f"studies {_examples(ids)}. Fix or drop them; nothing was imported.")
    return vectors


def _check_ids(loaded: _Loaded, manifest: pa.Table, modality: Modality, what: str
               ) -> tuple[list[str], int]:
    """Patient ids (from the manifest) of the file's ids; refuses unknown ids, ids of another
    modality and patient ids that disagree. Returns them and the manifest studies of the
    modality that the file has no vector for."""
    sid = [str(s) for s in manifest["study_id"].to_pylist()]
    mod = manifest["modality"].to_pylist()
    pid = [str(p) for p in manifest["patient_id"].to_pylist()]
    row = {s: i for i, s in enumerate(sid)}
    unknown = [s for s in loaded.ids if s not in row]
    if unknown:
        raise InterchangeError(
            f"{what}: {len(unknown)} of {len(loaded.ids)} study ids are not in the store's "
            f"manifest, e.g. {_examples(unknown)}. Ids must be the manifest's study_id "
            "(pseudonymised as the manifest was); attach the right manifest with --manifest.")
    other = [s for s in loaded.ids if mod[row[s]] != modality.value]
    if other:
        raise InterchangeError(
            f"{what}: {len(other)} of {len(loaded.ids)} study ids are not {modality} studies in "
            f"the manifest, e.g. {_examples(other)} ({mod[row[other[0]]]}). Import each modality "
            "separately with its --modality.")
    patients = [pid[row[s]] for s in loaded.ids]
    if loaded.patient_ids is not None:
        wrong = [s for s, a, b in zip(loaded.ids, loaded.patient_ids, patients, strict=True)
                 if a is not None and a != b]
        if wrong:
            raise InterchangeError(
                f"{what}: {len(wrong)} row(s) carry a patient_id other than the manifest's for "
                f"their study, e.g. studies {_examples(wrong)}. The file and the manifest do not "
                "describe the same cohort (or were pseudonymised with other keys).")
    wanted = {s for s, m in zip(sid, mod, strict=True) if m == modality.value}
    return patients, len(wanted - set(loaded.ids))


def _manifest_for(store_path: Path, manifest: str | os.PathLike[str] | None
                  ) -> tuple[pa.Table, str, bool]:
    """The manifest the file's ids are checked against: the one given (attached only once the
    checks pass) or the store's. Returns the table, its fingerprint and whether it is new."""
    from embedstore.manifest import Manifest, load_manifest

    if manifest is not None:
        man = load_manifest(manifest, check_paths=False)  # no images are read: paths need not exist
        return man.table, man.fingerprint, True
    attached = store_path / "manifest.parquet"
    if not (store_path / "store.json").exists() or not attached.exists():
        raise ManifestError(
            f"Store {str(store_path)!r} has no manifest, so imported vectors cannot be attached "
            "to studies. Pass --manifest M (a manifest whose study_id the file's ids are).")
    table = pq.read_table(attached)
    fp = Manifest(table=table.replace_schema_metadata(None), base_dir=store_path,
                  metadata={}).fingerprint
    return table, fp, False


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = {".parquet": "parquet", ".npy": "npy"}.get(path.suffix.lower())
        if fmt is None:
            raise ConfigError(f"Cannot tell the format of {path.name!r} from its suffix. Pass "
                              f"--format, one of {list(FORMATS)}.")
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown --format {fmt!r}. Available: {list(FORMATS)}.")
    return fmt


def import_embeddings(
    store_path: str | os.PathLike[str],
    file: str | os.PathLike[str],
    *,
    modality: str | Modality,
    id_column: str = "study_id",
    fmt: str | None = None,
    ids_file: str | os.PathLike[str] | None = None,
    vector_column: str | None = None,
    card: str | os.PathLike[str] | None = None,
    name: str | None = None,
    manifest: str | os.PathLike[str] | None = None,
) -> ImportSummary:
    """Create (or add to) an embedding set of ``store_path`` from an embeddings file.

    ``fmt`` parquet (``id_column`` + a vector column) or npy (an (N, D) array + ``ids_file``, a
    CSV with ``id_column``); default from the suffix. An embedstore export brings its identity;
    any other file needs ``card`` (TOML/JSON card fields) and gets the set key
    ``<name>-<hash of name and card>`` (``name`` default ``imported``). ``manifest`` is attached
    first (paths are not checked). Everything is checked before anything is written:
    InterchangeError names the problem, its count and three examples.
    """
    path = Path(file)
    m = Modality.parse(modality)
    if not path.is_file():
        raise InterchangeError(f"Embeddings file {str(path)!r} does not exist.")
    fmt = _format_of(path, fmt)
    what = f"Embeddings file {path.name!r}"
    if fmt == "parquet":
        if ids_file is not None:
            raise ConfigError("--ids is for --format npy; a Parquet file holds its own id column.")
        loaded = _read_parquet(path, id_column, vector_column)
    else:
        if vector_column is not None:
            raise ConfigError("--vector-column is for --format parquet.")
        loaded = _read_npy(path, None if ids_file is None else Path(ids_file), id_column)
    vectors = _check_vectors(loaded, what)
    dim = int(vectors.shape[1])

    dtype = "float32"
    if loaded.export is not None:
        if card is not None or name is not None:
            raise ConfigError(f"{what} is an embedstore export: it carries its own card and set "
                              "key; drop --card and --name.")
        key, spec = _check_export(loaded.export, m, dim, what)
        if loaded.export.get("store_dtype") == "float16":
            dtype = "float16"
        source = "embedstore export"
    else:
        if card is None:
            raise ConfigError(f"{what} carries no encoder card (it is not an embedstore export). "
                              "Pass --card card.json|toml describing the encoder that made it "
                              "(fields: docs/ENCODERS.md).")
        c = _card_from_file(card)
        if c.modality is not m:
            raise InterchangeError(f"The card describes a {c.modality} encoder, but --modality is "
                                   f"{m}. Fix one of them.")
        if c.embed_dim != dim:
            raise InterchangeError(f"{what} has {dim}-dimensional vectors but the card's "
                                   f"embed_dim is {c.embed_dim}. Fix the card or the file.")
        if name is not None and not _NAME.match(name):
            raise ConfigError(f"--name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or "
                              "'-', starting with a letter or digit (it starts the set key).")
        key, spec = imported_set_spec(c, name or IMPORTED_FAMILY)
        source = "card"

    from embedstore.store.lock import Lock

    root = Path(store_path).expanduser().resolve()
    man, man_fp, new_manifest = _manifest_for(root, manifest)
    patients, not_in_file = _check_ids(loaded, man, m, what)  # before anything is written
    st = open_store(root, create=new_manifest)
    lock = Lock(st.root, None).acquire()  # the manifest and the set change together
    try:
        if new_manifest:
            st.attach_manifest(man)
        order = sorted(range(len(loaded.ids)), key=loaded.ids.__getitem__)
        ids = [loaded.ids[i] for i in order]
        if loaded.cache_keys is not None and loaded.content_hashes is not None \
                and None not in loaded.cache_keys and None not in loaded.content_hashes:
            keys = [loaded.cache_keys[i] for i in order]
            hashes = [loaded.content_hashes[i] for i in order]
        else:
            # no pixels were hashed: the row's "content" is its vector bytes
            hashes = ["imported:" + hashlib.sha256(vectors[i].tobytes()).hexdigest()
                      for i in order]
            keys = [hashlib.sha256(_canonical({"set": key, "content": h}).encode()).hexdigest()
                    for h in hashes]
        prov = {"manifest_fingerprint": man_fp, "weights_file": None,
                "imported_from": {"file": path.name, "format": fmt, "source": source,
                                  "source_dtype": loaded.source_dtype,
                                  "exported_at": (loaded.export or {}).get("exported_at")}}
        with st.writer(m.value, key, dim=dim, spec={**spec, PROVENANCE_KEY: prov}, dtype=dtype,
                       capacity=len(ids)) as w:
            done = w.committed(keys)
            todo = [j for j, k in enumerate(keys) if k not in done]
            if todo:
                w.add_many(study_ids=[ids[j] for j in todo],
                           patient_ids=[patients[order[j]] for j in todo],
                           cache_keys=[keys[j] for j in todo],
                           content_hashes=[hashes[j] for j in todo],
                           vectors=vectors[np.asarray(order)[todo]])
    finally:
        lock.release()
    return ImportSummary(store=st.root, modality=m.value, encoder_key=key, rows=len(ids),
                         written=len(todo), unchanged=len(ids) - len(todo),
                         not_in_file=not_in_file, source=source,
                         source_dtype=loaded.source_dtype)

