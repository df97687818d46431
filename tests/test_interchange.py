"""Embeddings in and out: export -> import round trip, readers without embedstore, refusals.

A tiny synthetic cohort (6 patients, 32 x 32 radiographs) is extracted once with the test
encoder; every test exports or imports that set. The readers run in a subprocess started with
``python -S`` from a folder outside the repository, so ``import embedstore`` fails there: the
export is proven readable by pyarrow, DuckDB, pandas and polars alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from embedstore.cli.app import app
from typer.testing import CliRunner

from embedstore.errors import ConfigError, InterchangeError, ManifestError
from embedstore.extract import ExtractConfig, extract
from embedstore.interchange import (
    CARD_META_KEY,
    EXPORT_META_KEY,
    export_embeddings,
    import_embeddings,
)
from embedstore.phantom import PhantomSpec
from embedstore.store import open_store
from embedstore.synth import synthesize_cohort

ENC = "test-tiny-vit"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(cohort manifest, extracted store, set key)."""
    root = tmp_path_factory.mktemp("interchange")
    spec = PhantomSpec.with_shape((8, 32, 32), prevalence=0.5)
    synthesize_cohort(root / "cohort", n_patients=6, seed=3, spec=spec, workers=1)
    manifest = root / "cohort" / "manifest.parquet"
    res = extract(root / "A", manifest, ExtractConfig(modality="cxr", encoder=ENC, workers=0))
    assert res.done == 6
    return manifest, root / "A", res.encoder_key


@pytest.fixture(scope="module")
def exported(source: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, store, _ = source
    out = tmp_path_factory.mktemp("export") / "cxr.parquet"
    export_embeddings(store, out)
    return out


def _cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output.strip().splitlines()[-1] if r.output.strip() else ""


# ----------------------------------------------------------------------------------------------
# Round trip
# ----------------------------------------------------------------------------------------------


def test_export_then_import_into_a_new_store_is_the_same_set_bit_for_bit(
        source: tuple[Path, Path, str], exported: Path, tmp_path: Path) -> None:
    manifest, store_a, key = source
    code, line = _cli("import-embeddings", tmp_path / "B", exported, "--modality", "cxr",
                      "-m", manifest)
    assert code == 0, line
    assert line == f"CXR [{key}] from embedstore export: 6 vectors, 6 written, 0 unchanged."
    a, b = open_store(store_a), open_store(tmp_path / "B")
    la, lb = a.load("CXR", key), b.load("CXR", key)
    assert la.vectors.dtype == lb.vectors.dtype == np.float32
    assert la.vectors.tobytes() == lb.vectors.tobytes()
    for col in ("study_id", "patient_id", "cache_key", "content_hash"):
        assert la.meta[col].to_pylist() == lb.meta[col].to_pylist(), col
    (sa,), (sb,) = a.sets(), b.sets()
    strip = lambda s: {k: v for k, v in s.items() if k != "provenance"}  # noqa: E731
    assert strip(sa.spec) == strip(sb.spec) and sa.spec["card"] == sb.spec["card"]
    assert sb.spec["provenance"]["imported_from"]["file"] == exported.name
    assert b.verify().ok
    # again: every row key is already there
    again = import_embeddings(tmp_path / "B", exported, modality="cxr")
    assert (again.written, again.unchanged) == (0, 6)


def test_imported_rows_are_cache_hits_for_a_later_extraction(
        source: tuple[Path, Path, str], exported: Path, tmp_path: Path) -> None:
    manifest, _, key = source
    import_embeddings(tmp_path / "B", exported, modality="cxr", manifest=manifest)
    res = extract(tmp_path / "B", manifest, ExtractConfig(modality="cxr", encoder=ENC, workers=0))
    assert (res.encoder_key, res.done, res.cached) == (key, 0, 6)


def test_npy_with_an_ids_csv_and_a_card_imports(source: tuple[Path, Path, str],
                                                 tmp_path: Path) -> None:
    manifest, store_a, key = source
    loaded = open_store(store_a).load("CXR", key)
    ids = loaded.study_ids
    rev = list(range(len(ids)))[::-1]  # any row order: the store orders by study_id
    np.save(tmp_path / "v.npy", loaded.vectors[rev].astype(np.float64))
    pacsv.write_csv(pa.table({"sid": [ids[i] for i in rev]}), tmp_path / "ids.csv")
    card = open_store(store_a).sets()[0].spec["card"]
    (tmp_path / "card.json").write_text(json.dumps(card))
    res = import_embeddings(tmp_path / "B", tmp_path / "v.npy", modality="cxr", id_column="sid",
                            ids_file=tmp_path / "ids.csv", card=tmp_path / "card.json",
                            name="collab", manifest=manifest)
    assert res.encoder_key.startswith("collab-") and res.written == 6
    assert res.source == "card" and res.source_dtype == "float64"
    got = open_store(tmp_path / "B").load("CXR", res.encoder_key)
    assert got.study_ids == ids
    assert got.vectors.tobytes() == loaded.vectors.tobytes()  # float32 -> float64 -> float32
    (info,) = open_store(tmp_path / "B").sets()
    assert info.spec["card"] == card and info.spec["encoder"]["family"] == "imported"
    assert open_store(tmp_path / "B").verify().ok
    # the same card and name again: the same set, nothing rewritten
    again = import_embeddings(tmp_path / "B", tmp_path / "v.npy", modality="cxr", id_column="sid",
                              ids_file=tmp_path / "ids.csv", card=tmp_path / "card.json",
                              name="collab")
    assert (again.encoder_key, again.written, again.unchanged) == (res.encoder_key, 0, 6)


# ----------------------------------------------------------------------------------------------
# The export without embedstore
# ----------------------------------------------------------------------------------------------


def _bare_python(code: str, cwd: Path) -> str:
    """Run ``code`` with only site-packages on the path (no .pth files, so no editable
    embedstore) from a folder outside the repository; returns stdout."""
    site = sysconfig.get_paths()["purelib"]
    paths = [site]
    shared = Path(site) / "zz_main_site.pth"  # a worktree venv reusing main's packages
    if shared.exists():
        paths += shared.read_text().split()
    prelude = (f"import sys; sys.path[:0] = {paths!r}\n"
               "try:\n    import embedstore\nexcept ImportError:\n    pass\n"
               "else:\n    raise SystemExit('embedstore is importable here')\n")
    r = subprocess.run([sys.executable, "-S", "-c", prelude + code], cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_the_export_is_plain_parquet(source: tuple[Path, Path, str], exported: Path) -> None:
    _, store_a, key = source
    loaded = open_store(store_a).load("CXR", key)
    schema = pq.read_schema(exported)
    assert schema.field("vector").type == pa.list_(pa.float32(), 16)  # fixed_size_list<float32>[16]
    doc = json.loads(schema.metadata[EXPORT_META_KEY])
    assert (doc["encoder_key"], doc["dim"], doc["rows"], doc["modality"]) == (key, 16, 6, "CXR")
    assert doc["export_schema_version"] == 1 and doc["embedstore_version"]
    assert doc["manifest_fingerprint"] == open_store(store_a).sets()[0].spec["provenance"][
        "manifest_fingerprint"]
    assert json.loads(schema.metadata[CARD_META_KEY]) == doc["spec"]["card"]
    assert schema.names == ["study_id", "patient_id", "split", "label_pe", "content_hash",
                            "cache_key", "vector"]
    man = pq.read_table(source[0]).to_pylist()
    by_id = {r["study_id"]: r for r in man}
    t = pq.read_table(exported).to_pylist()
    assert [r["study_id"] for r in t] == loaded.study_ids
    for r in t:
        assert r["patient_id"] == by_id[r["study_id"]]["patient_id"]
        assert (r["split"], r["label_pe"]) == (by_id[r["study_id"]]["split"],
                                               by_id[r["study_id"]]["label_pe"])


def test_pyarrow_and_duckdb_alone_read_the_export(source: tuple[Path, Path, str], exported: Path,
                                                  tmp_path: Path) -> None:
    _, store_a, key = source
    loaded = open_store(store_a).load("CXR", key)
    np.save(tmp_path / "want.npy", loaded.vectors)
    out = _bare_python(f"""
import json, numpy as np, pyarrow.parquet as pq, duckdb
want = np.load({str(tmp_path / 'want.npy')!r})
t = pq.read_table({str(exported)!r})
assert str(t.schema.field('vector').type) == 'fixed_size_list<element: float>[16]'
v = t['vector'].combine_chunks().flatten().to_numpy().reshape(-1, 16)
assert v.tobytes() == want.tobytes()
card = json.loads(t.schema.metadata[b'embedstore.card'])
con = duckdb.connect()
# Parquet has no fixed-size list: DuckDB reads FLOAT[] (the size lives in the Arrow schema
# that pyarrow and polars read); every row has D values and casts to the ARRAY type
typ = con.sql("SELECT DISTINCT typeof(vector), len(vector) FROM '{exported}'").fetchall()
fixed = con.sql("SELECT typeof(vector::FLOAT[16]) FROM '{exported}' LIMIT 1").fetchall()[0][0]
rows = con.sql("SELECT study_id, vector FROM '{exported}' ORDER BY study_id").fetchall()
d = np.array([r[1] for r in rows], dtype=np.float32)
assert d.tobytes() == want.tobytes()
print(json.dumps({{"duckdb": typ, "cast": fixed, "n": len(rows), "card_dim": card['embed_dim']}}))
""", tmp_path)
    assert json.loads(out) == {"duckdb": [["FLOAT[]", 16]], "cast": "FLOAT[16]", "n": 6,
                               "card_dim": 16}


def test_pandas_and_polars_alone_read_the_export(source: tuple[Path, Path, str], exported: Path,
                                                 tmp_path: Path) -> None:
    pytest.importorskip("polars", reason="polars is not installed (pip install polars to run)")
    _, store_a, key = source
    np.save(tmp_path / "want.npy", open_store(store_a).load("CXR", key).vectors)
    out = _bare_python(f"""
import numpy as np, pandas as pd, polars as pl
want = np.load({str(tmp_path / 'want.npy')!r})
df = pd.read_parquet({str(exported)!r})
assert np.stack(df['vector'].to_list()).astype(np.float32).tobytes() == want.tobytes()
p = pl.read_parquet({str(exported)!r})
assert str(p.schema['vector']) == 'Array(Float32, shape=(16,))', p.schema['vector']
assert p['vector'].to_numpy().astype(np.float32).tobytes() == want.tobytes()
print(len(df), p.height)
""", tmp_path)
    assert out.split() == ["6", "6"]


# ----------------------------------------------------------------------------------------------
# Refusals (exact Error: lines)
# ----------------------------------------------------------------------------------------------


def _foreign(tmp_path: Path, ids: list[str], vectors: np.ndarray, name: str = "f.parquet",
             **extra: list) -> Path:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    t = pa.table({"sid": ids, "emb": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
                  **extra})
    pq.write_table(t, tmp_path / name)
    return tmp_path / name


@pytest.fixture()
def card_file(source: tuple[Path, Path, str], tmp_path: Path) -> Path:
    card = open_store(source[1]).sets()[0].spec["card"]
    (tmp_path / "card.json").write_text(json.dumps(card))
    return tmp_path / "card.json"


def test_ids_not_in_the_manifest_are_refused_with_counts_and_examples(
        source: tuple[Path, Path, str], card_file: Path, tmp_path: Path) -> None:
    manifest, store_a, key = source
    good = open_store(store_a).load("CXR", key)
    ids = ["NOPE-3", "NOPE-1", "NOPE-2", "NOPE-4", *good.study_ids[:2]]
    f = _foreign(tmp_path, ids, np.ones((6, 16)))
    code, line = _cli("import-embeddings", tmp_path / "B", f, "--modality", "cxr", "--id-column",
                      "sid", "--card", card_file, "-m", manifest)
    assert code == 1
    assert line == ("Error: Embeddings file 'f.parquet': 4 of 6 study ids are not in the store's "
                    "manifest, e.g. 'NOPE-3', 'NOPE-1', 'NOPE-2', .... Ids must be the manifest's "
                    "study_id (pseudonymised as the manifest was); attach the right manifest with "
                    "--manifest.")
    assert not (tmp_path / "B").exists()  # checked before anything was written


def test_ids_of_another_modality_are_refused(source: tuple[Path, Path, str], card_file: Path,
                                             tmp_path: Path) -> None:
    manifest, _, _ = source
    ct = [r["study_id"] for r in pq.read_table(manifest).to_pylist() if r["modality"] == "CTPA"]
    f = _foreign(tmp_path, ct[:2], np.ones((2, 16)))
    code, line = _cli("import-embeddings", tmp_path / "B", f, "--modality", "cxr", "--id-column",
                      "sid", "--card", card_file, "-m", manifest)
    assert code == 1
    assert line == (f"Error: Embeddings file 'f.parquet': 2 of 2 study ids are not CXR studies in "
                    f"the manifest, e.g. {ct[0]!r}, {ct[1]!r} (CTPA). Import each modality "
                    "separately with its --modality.")


def test_dimension_nan_duplicates_and_patient_mismatch(
        source: tuple[Path, Path, str], card_file: Path, tmp_path: Path) -> None:
    manifest, store_a, key = source
    ids = open_store(store_a).load("CXR", key).study_ids
    base = ["import-embeddings", tmp_path / "B", None, "--modality", "cxr", "--id-column", "sid",
            "--card", card_file, "-m", manifest]

    def run(f: Path) -> tuple[int, str]:
        return _cli(*[f if a is None else a for a in base])

    assert run(_foreign(tmp_path, ids[:2], np.ones((2, 8)))) == (
        1, "Error: Embeddings file 'f.parquet' has 8-dimensional vectors but the card's embed_dim "
           "is 16. Fix the card or the file.")
    v = np.ones((3, 16))
    v[1, 3], v[2, 0] = np.nan, np.inf
    assert run(_foreign(tmp_path, ids[:3], v)) == (
        1, f"Error: Embeddings file 'f.parquet': 2 vector(s) hold NaN or inf (as float32), e.g. "
           f"studies {ids[1]!r}, {ids[2]!r}. Fix or drop them; nothing was imported.")
    assert run(_foreign(tmp_path, [ids[0], ids[1], ids[0]], np.ones((3, 16)))) == (
        1, f"Error: Embeddings file 'f.parquet': 1 study id(s) appear more than once, e.g. "
           f"{ids[0]!r}. Give one vector per study.")
    f = _foreign(tmp_path, ids[:2], np.ones((2, 16)), patient_id=["SYN-9999", "SYN-9998"])
    assert run(f) == (
        1, f"Error: Embeddings file 'f.parquet': 2 row(s) carry a patient_id other than the "
           f"manifest's for their study, e.g. studies {ids[0]!r}, {ids[1]!r}. The file and the "
           "manifest do not describe the same cohort (or were pseudonymised with other keys).")
    assert not (tmp_path / "B").exists()


def test_unreadable_and_malformed_files(source: tuple[Path, Path, str], card_file: Path,
                                        tmp_path: Path) -> None:
    manifest = source[0]
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all" * 10)
    code, line = _cli("import-embeddings", tmp_path / "B", tmp_path / "junk.parquet", "--modality",
                      "cxr", "--card", card_file, "-m", manifest)
    assert code == 1 and line.startswith("Error: 'junk.parquet' is not a readable Parquet file (")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pacsv.write_csv(pa.table({"study_id": ["x"]}), tmp_path / "ids.csv")
    code, line = _cli("import-embeddings", tmp_path / "B", tmp_path / "obj.npy", "--modality",
                      "cxr", "--ids", tmp_path / "ids.csv", "--card", card_file, "-m", manifest)
    # refused before anything is unpickled (allow_pickle=False; mmap refuses object dtypes)
    assert code == 1 and line.startswith("Error: Embeddings file 'obj.npy' is not a readable "
                                         ".npy array (")
    np.save(tmp_path / "v.npy", np.ones((3, 16), dtype=np.float32))
    code, line = _cli("import-embeddings", tmp_path / "B", tmp_path / "v.npy", "--modality", "cxr",
                      "--ids", tmp_path / "ids.csv", "--card", card_file, "-m", manifest)
    assert (code, line) == (1, "Error: Embeddings file 'v.npy' has 3 rows but ids file 'ids.csv' "
                               "has 1; they must match row for row.")
    np.save(tmp_path / "i.npy", np.ones((1, 16), dtype=np.int32))
    code, line = _cli("import-embeddings", tmp_path / "B", tmp_path / "i.npy", "--modality", "cxr",
                      "--ids", tmp_path / "ids.csv", "--card", card_file, "-m", manifest)
    assert (code, line) == (1, "Error: Embeddings file 'i.npy' has dtype int32; embeddings must "
                               "be float16, float32 or float64.")
    pq.write_table(pa.table({"study_id": ["a"], "emb": pa.array([[1, 2]], pa.list_(pa.int64()))}),
                   tmp_path / "ints.parquet")
    code, line = _cli("import-embeddings", tmp_path / "B", tmp_path / "ints.parquet",
                      "--modality", "cxr", "--card", card_file, "-m", manifest)
    assert (code, line) == (1, "Error: Embeddings file 'ints.parquet': vector column 'emb' holds "
                               "int64; embeddings must be float16, float32 or float64.")


def test_a_foreign_file_needs_a_card_and_a_store_needs_a_manifest(
        source: tuple[Path, Path, str], exported: Path, tmp_path: Path) -> None:
    manifest, store_a, key = source
    ids = open_store(store_a).load("CXR", key).study_ids
    f = _foreign(tmp_path, ids[:2], np.ones((2, 16)))
    with pytest.raises(ConfigError, match="carries no encoder card"):
        import_embeddings(tmp_path / "B", f, modality="cxr", id_column="sid", manifest=manifest)
    (tmp_path / "card.json").write_text(json.dumps(open_store(store_a).sets()[0].spec["card"]))
    code, line = _cli("import-embeddings", tmp_path / "B", f, "--modality", "cxr", "--id-column",
                      "sid", "--card", tmp_path / "card.json", "--name", "bad name", "-m", manifest)
    assert (code, line) == (1, "Error: --name 'bad name' is invalid: use 1-64 letters, digits, "
                               "'.', '_' or '-', starting with a letter or digit (it starts the "
                               "set key).")
    code, line = _cli("import-embeddings", tmp_path / "B", exported, "--modality", "cxr")
    assert (code, line) == (1, f"Error: Store {str(tmp_path / 'B')!r} has no manifest, so "
                               "imported vectors cannot be attached to studies. Pass --manifest M "
                               "(a manifest whose study_id the file's ids are).")
    with pytest.raises(ManifestError):
        import_embeddings(tmp_path / "B", exported, modality="cxr")
    code, line = _cli("import-embeddings", tmp_path / "B", exported, "--modality", "ctpa",
                      "-m", manifest)
    assert (code, line) == (1, "Error: Embeddings file 'cxr.parquet' holds CXR embeddings, not "
                               "CTPA. Pass --modality cxr.")


def test_an_export_whose_metadata_was_edited_is_refused(
        source: tuple[Path, Path, str], exported: Path, tmp_path: Path) -> None:
    manifest = source[0]
    t = pq.read_table(exported)
    doc = json.loads(t.schema.metadata[EXPORT_META_KEY])
    doc["spec"]["card"]["licence"] = "CC0 (edited)"  # the card no longer matches the set key
    doc["spec"]["encoder_fingerprint"] = "0" * 64
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata,
                                              EXPORT_META_KEY: json.dumps(doc).encode()}),
                   tmp_path / "edited.parquet")
    with pytest.raises(InterchangeError, match="does not match its spec") as e:
        import_embeddings(tmp_path / "B", tmp_path / "edited.parquet", modality="cxr",
                          manifest=manifest)
    assert doc["encoder_key"] in str(e.value)


def test_export_names_the_sets_to_choose_from(source: tuple[Path, Path, str], tmp_path: Path
                                               ) -> None:
    _, store_a, key = source
    code, line = _cli("export", store_a, tmp_path / "x.parquet", "--modality", "ctpa")
    assert (code, line) == (1, f"Error: No embedding set 'CTPA' in store {str(store_a)!r}. "
                               f"Available: ['CXR/{key}'].")
    code, line = _cli("export", store_a, tmp_path / "x.csv")
    assert (code, line) == (1, "Error: Export file 'x.csv' must end in .parquet.")
    code, line = _cli("export", store_a, tmp_path / "x.parquet", "--encoder", key)
    assert code == 0 and line.startswith(f"Wrote {tmp_path / 'x.parquet'}: 6 CXR vectors of dim 16")


def test_a_float16_set_round_trips_as_float16(source: tuple[Path, Path, str], tmp_path: Path
                                              ) -> None:
    manifest, store_a, key = source
    a = open_store(store_a)
    (info,) = a.sets()
    loaded = a.load("CXR", key)
    half = open_store(tmp_path / "H", create=True)
    half.attach_manifest(pq.read_table(manifest))
    with half.writer("CXR", key, dim=16, spec=info.spec, dtype="float16") as w:
        w.add_many(study_ids=loaded.study_ids, patient_ids=loaded.meta["patient_id"].to_pylist(),
                   cache_keys=loaded.meta["cache_key"].to_pylist(),
                   content_hashes=loaded.meta["content_hash"].to_pylist(),
                   vectors=loaded.vectors.astype(np.float16))
    export_embeddings(tmp_path / "H", tmp_path / "h.parquet")
    assert json.loads(pq.read_schema(tmp_path / "h.parquet").metadata[EXPORT_META_KEY])[
        "store_dtype"] == "float16"
    res = import_embeddings(tmp_path / "C", tmp_path / "h.parquet", modality="cxr",
                            manifest=manifest)
    (copy,) = open_store(tmp_path / "C").sets()
    assert copy.dtype == "float16" and res.written == 6
    want = loaded.vectors.astype(np.float16).astype(np.float32)
    assert open_store(tmp_path / "C").load("CXR", key).vectors.tobytes() == want.tobytes()


def test_ragged_null_and_blank_vectors_or_ids_are_refused(
        source: tuple[Path, Path, str], card_file: Path, tmp_path: Path) -> None:
    manifest, store_a, key = source
    ids = open_store(store_a).load("CXR", key).study_ids
    cases = [
        (pa.table({"study_id": ids[:2], "vector": pa.array([[1.0] * 16, [1.0] * 15],
                                                           pa.list_(pa.float32()))}),
         "Error: Embeddings file 'c.parquet': vectors in column 'vector' have different lengths "
         "'15', '16'; all must have one dimension."),
        (pa.table({"study_id": ids[:2], "vector": pa.array([[1.0] * 16, None],
                                                           pa.list_(pa.float32(), 16))}),
         "Error: Embeddings file 'c.parquet': vector column 'vector' has 1 empty vector(s); drop "
         "those rows or fill them."),
        (pa.table({"study_id": [ids[0], None], "vector": pa.array([[1.0] * 16] * 2,
                                                                  pa.list_(pa.float32(), 16))}),
         "Error: Embeddings file 'c.parquet': id column 'study_id' has 1 empty value(s); every "
         "vector needs its study id."),
    ]
    for table, want in cases:
        pq.write_table(table, tmp_path / "c.parquet")
        assert _cli("import-embeddings", tmp_path / "B", tmp_path / "c.parquet", "--modality",
                    "cxr", "--card", card_file, "-m", manifest) == (1, want)
    assert not (tmp_path / "B").exists()
