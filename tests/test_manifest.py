"""Manifest schema: one test per validation error, splits, label subsets, both importers."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pytest

from embedstore.errors import ManifestError
from embedstore.manifest import (
    assign_splits,
    import_paired_csv,
    import_rspect,
    label_subset,
    load_manifest,
    write_manifest,
)

KEY = b"test-key-not-secret"


def _rows(tmp_path: Path) -> list[dict[str, object]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "a.dcm").write_bytes(b"x")
    return [
        {"patient_id": "P1", "study_id": "S1", "modality": "CTPA", "path": "a",
         "acquired_at": "2024-01-01T10:00:00", "label_pe": 1, "split": "train", "site": "A"},
        {"patient_id": "P1", "study_id": "S2", "modality": "CXR", "path": "a.dcm",
         "acquired_at": "2024-01-01T08:00:00", "label_pe": 1, "split": "train", "site": "A"},
        {"patient_id": "P2", "study_id": "S3", "modality": "CXR", "path": "a.dcm",
         "acquired_at": None, "label_pe": None, "split": "test", "site": "B"},
    ]


def test_round_trip_keeps_extra_columns_and_types(tmp_path: Path) -> None:
    path = write_manifest(_rows(tmp_path), tmp_path, metadata={"k": "v"})
    m = load_manifest(path)
    assert m.table.num_rows == 3
    assert m.table["site"].to_pylist() == ["A", "A", "B"]
    assert m.table["label_pe"].type == pa.int8()
    assert m.table["acquired_at"].type == pa.timestamp("us")
    assert m.metadata == {"k": "v"}
    assert m.resolve("a") == tmp_path.resolve() / "a"
    # The CSV twin loads to the same content.
    m2 = load_manifest(tmp_path / "manifest.csv")
    assert m2.table.select(["study_id", "label_pe", "split"]).equals(
        m.table.select(["study_id", "label_pe", "split"]))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rows: [{k: v for k, v in r.items() if k != "split"} for r in rows],
         "missing required column(s) ['split']"),
        (lambda rows: rows + [dict(rows[0])], "row 4 (study_id 'S1'): duplicate study_id"),
        (lambda rows: [rows[0], {**rows[1], "split": "val"}, rows[2]],
         "row 2 (study_id 'S2'): its patient is in split 'val' here but in 'train' in row 1"),
        (lambda rows: [rows[0], {**rows[1], "modality": "MRI"}, rows[2]],
         "row 2 (study_id 'S2'): unknown modality 'MRI'"),
        (lambda rows: [rows[0], rows[1], {**rows[2], "label_pe": 2}],
         "row 3 (study_id 'S3'): label_pe must be 0, 1 or empty, got 2"),
        (lambda rows: [rows[0], rows[1], {**rows[2], "path": "nowhere.dcm"}],
         "row 3 (study_id 'S3'): path 'nowhere.dcm' does not exist"),
        (lambda rows: [rows[0], rows[1], {**rows[2], "split": "holdout"}],
         "row 3 (study_id 'S3'): unknown split 'holdout'"),
        (lambda rows: [rows[0], rows[1], {**rows[2], "study_id": None}],
         "row 3: column 'study_id' is empty"),
    ],
    ids=["missing_column", "duplicate_study", "patient_two_splits", "unknown_modality",
         "bad_label", "missing_path", "unknown_split", "empty_value"],
)
def test_validation_errors_name_the_row(tmp_path: Path, mutate, message: str) -> None:
    with pytest.raises(ManifestError) as exc:
        write_manifest(mutate(_rows(tmp_path)), tmp_path)
    assert message in str(exc.value)
    assert not (tmp_path / "manifest.parquet").exists(), "nothing is written for a bad manifest"


def test_bad_timestamp_is_reported(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    rows[0]["acquired_at"] = "last tuesday"
    with pytest.raises(ManifestError, match="acquired_at"):
        write_manifest(rows, tmp_path)


def test_example_manifest_validates_without_paths() -> None:
    ex = Path(__file__).parents[1] / "data_manifests" / "example_manifest.csv"
    m = load_manifest(ex, check_paths=False)
    assert set(m.table["modality"].to_pylist()) == {"CXR", "CTPA"}
    assert m.table["label_pe"].to_pylist()[-1] is None


def test_assign_splits_is_deterministic_patient_level_and_order_free() -> None:
    ids = [f"P{i:04d}" for i in range(200)]
    a = assign_splits(ids, seed=3)
    b = assign_splits(list(reversed(ids)), seed=3)
    c = assign_splits(ids, seed=4)
    assert a == b
    assert a != c
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 120, "val": 30, "test": 50}
    with pytest.raises(ManifestError, match="summing to 1"):
        assign_splits(ids, fractions=(0.5, 0.5, 0.5))


def test_label_subset_fraction_and_determinism() -> None:
    ids = [f"P{i}" for i in range(100)]
    s = label_subset(ids, 0.25, seed=1)
    assert len(s) == 25 and s == label_subset(reversed(ids), 0.25, seed=1)
    assert s != label_subset(ids, 0.25, seed=2)
    with pytest.raises(ManifestError):
        label_subset(ids, 1.5)


def test_import_paired_csv_pseudonymises_accessions(tmp_path: Path) -> None:
    ct, cxr = tmp_path / "ct", tmp_path / "cxr"
    ct.mkdir(), cxr.mkdir()
    rows = [("ACC9001", "ACC7001", "1"), ("ACC9002", "ACC7002", "0"), ("ACC9003", "ACC7003", "1")]
    for c, x, _ in rows[:2]:
        (ct / f"{c}.npy").write_bytes(b"ct")
        (cxr / f"{x}.dcm").write_bytes(b"cxr")
    src = tmp_path / "pairs.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["CT_Accession_number", "cxr_Accession_number", "PE"])
        w.writerows(rows)
    out = tmp_path / "cohort"
    res = import_paired_csv(src, ct_dir=ct, cxr_dir=cxr, out_dir=out, key=KEY, seed=0)
    assert res.n_rows == 4 and res.excluded == {"file_not_found": 1}
    m = load_manifest(res.manifest_path)
    text = (out / "manifest.csv").read_text() + str(m.table.to_pylist())
    assert "ACC" not in text, "accession numbers must not reach the manifest"
    assert sorted(m.table["label_pe"].to_pylist()) == [0, 0, 1, 1]
    assert m.resolve(m.table["path"][0].as_py()).read_bytes() in (b"ct", b"cxr")
    # Pairs share pair_id and split; pseudonyms depend on the key.
    by_pair: dict[str, set[str]] = {}
    for r in m.table.to_pylist():
        by_pair.setdefault(r["pair_id"], set()).add(r["modality"])
    assert all(v == {"CXR", "CTPA"} for v in by_pair.values())
    res2 = import_paired_csv(src, ct_dir=ct, cxr_dir=cxr, out_dir=tmp_path / "c2", key=b"another-test-key-0123")
    assert set(load_manifest(res2.manifest_path).table["study_id"].to_pylist()).isdisjoint(
        m.table["study_id"].to_pylist())


def test_import_rspect_excludes_indeterminate(tmp_path: Path) -> None:
    images = tmp_path / "train"
    header = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "pe_present_on_image",
              "negative_exam_for_pe", "indeterminate", "central_pe"]
    lines = []
    exams = {  # study: (negative_exam_for_pe, indeterminate, central)
        "1.2.1": (0, 0, 1),  # positive
        "1.2.2": (1, 0, 0),  # negative
        "1.2.3": (0, 1, 0),  # indeterminate: negative_exam_for_pe is 0 but it is NOT positive
    }
    for study, (neg, ind, central) in exams.items():
        (images / study / f"{study}.9").mkdir(parents=True)
        for k in range(3):
            lines.append([study, f"{study}.9", f"{study}.9.{k}", 0, neg, ind, central])
    src = tmp_path / "train.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(lines)
    res = import_rspect(src, images_dir=images, out_dir=tmp_path / "out", key=KEY)
    assert res.excluded == {"indeterminate": 1}
    m = load_manifest(res.manifest_path)
    assert m.table.num_rows == 2
    assert sorted(m.table["label_pe"].to_pylist()) == [0, 1]
    assert m.table["n_images"].to_pylist() == [3, 3]
    assert "1.2.1" not in (tmp_path / "out" / "manifest.csv").read_text()
