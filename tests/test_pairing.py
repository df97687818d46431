"""Pairing rules: patients and dates from the importers, the rule stored with the store's manifest
(max gap, CXR before CTPA, nearest or every CXR, explicit pairs filtered too), `embedstore pairs`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embedstore.cli.app import app
from typer.testing import CliRunner

from embedstore.errors import ConfigError, ManifestError, StoreLockedError
from embedstore.manifest import import_paired_csv, import_rspect, load_manifest, validate_manifest
from embedstore.pairing import PairingRule, aggregate_per_ctpa, parse_duration
from embedstore.pseudonym import pseudonymise
from embedstore.store import open_store

KEY = b"pairing-test-key-0123456789"
H = 3_600_000_000  # one hour in microseconds
T0 = 1_700_000_000_000_000


# ------------------------------------------------------------------------------------------------
# importers: real (pseudonymised) patients, acquired_at, splits per patient
# ------------------------------------------------------------------------------------------------


def _paired_csv(tmp_path: Path, rows: list[dict[str, str]]) -> tuple[Path, Path, Path]:
    ct, cxr = tmp_path / "ct", tmp_path / "cxr"
    ct.mkdir(exist_ok=True), cxr.mkdir(exist_ok=True)
    for r in rows:
        (ct / f"{r['CT_Accession_number']}.npy").write_bytes(b"ct")
        (cxr / f"{r['cxr_Accession_number']}.dcm").write_bytes(b"cxr")
    src = tmp_path / "pairs.csv"
    with src.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return src, ct, cxr


def _cohort_rows(n: int = 30) -> list[dict[str, str]]:
    rows = [{"MRN": f"MRN{i:04d}", "CT_Accession_number": f"CT{i:04d}",
             "cxr_Accession_number": f"XR{i:04d}", "PE": str(i % 2),
             "ct_time": f"2024-03-{1 + i % 27:02d}T12:00", "cxr_time": f"2024-03-{1 + i % 27:02d}T02:30"}
            for i in range(n)]
    # patient MRN0007: a second CTPA work-up a year later, with its own CXR
    rows.append({"MRN": "MRN0007", "CT_Accession_number": "CT9007", "cxr_Accession_number": "XR9007",
                 "PE": "0", "ct_time": "2025-03-08T12:00", "cxr_time": "2025-03-08T09:00"})
    return rows


def test_two_ctpa_workups_of_one_patient_share_patient_and_split(tmp_path: Path) -> None:
    src, ct, cxr = _paired_csv(tmp_path, _cohort_rows())
    res = import_paired_csv(src, ct_dir=ct, cxr_dir=cxr, out_dir=tmp_path / "out", key=KEY,
                            patient_column="MRN", ct_time_column="ct_time",
                            cxr_time_column="cxr_time")
    assert (res.n_rows, res.n_patients, res.excluded) == (62, 30, {})
    t = load_manifest(res.manifest_path).table
    text = (tmp_path / "out" / "manifest.csv").read_text()
    assert "MRN" not in text and "CT9" not in text, "identifiers must not reach the manifest"
    pid = pseudonymise("MRN0007", KEY)  # the same keyed hash as the accessions
    mine = [r for r in t.to_pylist() if r["patient_id"] == pid]
    assert sorted(r["modality"] for r in mine) == ["CTPA", "CTPA", "CXR", "CXR"]
    assert len({r["split"] for r in mine}) == 1
    assert len({r["pair_id"] for r in mine}) == 2  # two work-ups, two pairs
    by_sid = {r["study_id"]: r for r in mine}
    ct2 = by_sid[f"{pseudonymise('CT9007', KEY)}-CTPA"]
    assert ct2["acquired_at"].isoformat() == "2025-03-08T12:00:00"
    # every patient sits in one split
    split_of: dict[str, set[str]] = {}
    for r in t.to_pylist():
        split_of.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(v) == 1 for v in split_of.values())
    assert json.loads(pq.read_schema(res.manifest_path).metadata[b"embedstore.manifest"])[
        "patient_ids"] == "patient_column"


def test_import_paired_cli_passes_patient_and_time_columns(tmp_path: Path, monkeypatch) -> None:
    src, ct, cxr = _paired_csv(tmp_path, _cohort_rows(6))
    monkeypatch.setenv("EMBEDSTORE_PSEUDONYM_KEY", KEY.decode())
    r = CliRunner().invoke(app, ["manifest", "import-paired", str(src), "--ct-dir", str(ct),
                                 "--cxr-dir", str(cxr), "--out", str(tmp_path / "out"),
                                 "--patient-column", "MRN", "--ct-time-column", "ct_time",
                                 "--cxr-time-column", "cxr_time"])
    assert r.exit_code == 0, r.output
    assert "14 studies, 7 patients" in r.output
    t = load_manifest(tmp_path / "out" / "manifest.parquet").table
    assert t["acquired_at"].null_count == 0
    assert pseudonymise("MRN0007", KEY) in t["patient_id"].to_pylist()


def test_without_patient_column_each_ct_accession_is_a_patient(tmp_path: Path) -> None:
    src, ct, cxr = _paired_csv(tmp_path, _cohort_rows(4))
    res = import_paired_csv(src, ct_dir=ct, cxr_dir=cxr, out_dir=tmp_path / "out", key=KEY)
    t = load_manifest(res.manifest_path).table
    assert res.n_patients == 5 and t["acquired_at"].null_count == t.num_rows


def test_one_ctpa_on_several_rows_pairs_several_cxrs(tmp_path: Path) -> None:
    rows = [{"MRN": "M1", "CT_Accession_number": "CT1", "cxr_Accession_number": x, "PE": "1"}
            for x in ("XR1", "XR2")]
    rows.append({"MRN": "M1", "CT_Accession_number": "CT2", "cxr_Accession_number": "XR1", "PE": "1"})
    src, ct, cxr = _paired_csv(tmp_path, rows)
    res = import_paired_csv(src, ct_dir=ct, cxr_dir=cxr, out_dir=tmp_path / "out", key=KEY,
                            patient_column="MRN")
    assert res.excluded == {"cxr_paired_twice": 1}
    t = load_manifest(res.manifest_path).table
    ct1 = pseudonymise("CT1", KEY)
    assert sorted((r["modality"], r["pair_id"] == ct1) for r in t.to_pylist()) == [
        ("CTPA", False), ("CTPA", True), ("CXR", True), ("CXR", True)]


def test_importer_errors_name_the_column_and_row(tmp_path: Path) -> None:
    rows = _cohort_rows(3)
    rows[1]["ct_time"] = "yesterday"
    src, ct, cxr = _paired_csv(tmp_path, rows)
    with pytest.raises(ManifestError, match=r"--patient-column 'PatientID' is not a column"):
        import_paired_csv(src, ct_dir=ct, cxr_dir=cxr, out_dir=tmp_path / "o", key=KEY,
                          patient_column="PatientID")
    with pytest.raises(ManifestError, match=r"Paired CSV row 2, ct_time: 'yesterday' is not an ISO"):
        import_paired_csv(src, ct_dir=ct, cxr_dir=cxr, out_dir=tmp_path / "o", key=KEY,
                          ct_time_column="ct_time")
    clash = [dict(rows[0], MRN="MRN0000"), dict(rows[0], MRN="MRN0001", cxr_Accession_number="XR9")]
    (tmp_path / "c").mkdir()
    src, ct, cxr = _paired_csv(tmp_path / "c", clash)
    with pytest.raises(ManifestError, match="row 2: its CT accession is on row 1 too, with another patient"):
        import_paired_csv(src, ct_dir=ct, cxr_dir=cxr, out_dir=tmp_path / "o2", key=KEY,
                          patient_column="MRN")


def test_rspect_patient_column_groups_studies_of_one_patient(tmp_path: Path) -> None:
    images = tmp_path / "train"
    lines = []
    for study, patient in (("1.2.1", "P1"), ("1.2.2", "P1"), ("1.2.3", "P2")):
        (images / study / f"{study}.9").mkdir(parents=True)
        lines += [[study, f"{study}.9", f"{study}.9.{k}", 1, 0, patient] for k in range(2)]
    src = tmp_path / "train.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "negative_exam_for_pe", "indeterminate", "PatientID"])
        w.writerows(lines)
    res = import_rspect(src, images_dir=images, out_dir=tmp_path / "out", key=KEY,
                        patient_column="PatientID")
    t = load_manifest(res.manifest_path).table
    assert res.n_patients == 2 and t.num_rows == 3
    assert sorted(t["patient_id"].to_pylist()).count(pseudonymise("P1", KEY)) == 2


def test_a_patient_spanning_two_splits_is_refused(tmp_path: Path) -> None:
    t = pa.table({"patient_id": ["A", "A"], "study_id": ["a1", "a2"], "modality": ["CTPA", "CTPA"],
                  "path": ["x", "y"], "acquired_at": pa.nulls(2, pa.timestamp("us")),
                  "label_pe": pa.array([1, 0], pa.int8()), "split": ["train", "test"]})
    msg = ("row 2 (study_id 'a2'): its patient is in split 'test' here but in 'train' in row 1; "
           "splits are per patient (no patient may cross splits).")
    with pytest.raises(ManifestError) as e:
        validate_manifest(t, check_paths=False)
    assert str(e.value) == msg
    s = open_store(tmp_path / "s", create=True)
    with pytest.raises(ManifestError, match="no patient may cross splits"):
        s.attach_manifest(t)
    assert not s.manifest_path.exists()


# ------------------------------------------------------------------------------------------------
# the rule
# ------------------------------------------------------------------------------------------------


def _manifest() -> pa.Table:
    rows = [  # patient, study, modality, hours from T0 (None = undated), label, pair_id, split
        ("P1", "p1-ct", "CTPA", 0, 1, None, "train"),
        ("P1", "p1-cx-before", "CXR", -10, None, None, "train"),
        ("P1", "p1-cx-after", "CXR", 5, None, None, "train"),  # nearer, but after the CTPA
        ("P2", "p2-ct", "CTPA", 0, 0, "e2", "train"),
        ("P2", "p2-cx", "CXR", -30, None, "e2", "train"),  # explicit, 30 h before
        ("P3", "p3-ct", "CTPA", 0, 1, "e3", "val"),
        ("P3", "p3-cx", "CXR", 2, None, "e3", "val"),  # explicit, 2 h after
        ("P4", "p4-ct", "CTPA", None, 0, "e4", "val"),
        ("P4", "p4-cx", "CXR", None, None, "e4", "val"),  # explicit, undated
        ("P5", "p5-ct", "CTPA", 0, 1, None, "test"),
        ("P5", "p5-cx-1", "CXR", -1, None, None, "test"),
        ("P5", "p5-cx-5", "CXR", -5, None, None, "test"),
        ("P5", "p5-cx-20", "CXR", -20, None, None, "test"),
        ("P6", "p6-ct", "CTPA", 0, 0, None, "test"),  # no CXR at all
    ]
    return pa.table({
        "patient_id": [r[0] for r in rows], "study_id": [r[1] for r in rows],
        "modality": [r[2] for r in rows], "path": [f"img/{r[1]}" for r in rows],
        "acquired_at": pa.array([None if r[3] is None else T0 + r[3] * H for r in rows],
                                pa.timestamp("us")),
        "label_pe": pa.array([r[4] for r in rows], pa.int8()),
        "pair_id": pa.array([r[5] for r in rows], pa.string()), "split": [r[6] for r in rows],
    })


@pytest.fixture
def store(tmp_path: Path):
    s = open_store(tmp_path / "store", create=True)
    s.attach_manifest(_manifest())
    return s


def _pairs(store) -> set[tuple[str, str]]:
    return {(r["ctpa_study_id"], r["cxr_study_id"])
            for r in store.sql("SELECT * FROM pairs").to_pylist()}


def test_default_rule_is_the_nearest_cxr_within_48h_either_side(store) -> None:
    assert store.pairing_rule() == PairingRule(48.0, False, False)
    assert _pairs(store) == {("p1-ct", "p1-cx-after"), ("p2-ct", "p2-cx"), ("p3-ct", "p3-cx"),
                             ("p4-ct", "p4-cx"), ("p5-ct", "p5-cx-1")}


def test_cxr_before_ctpa_within_24h_filters_explicit_pairs_too(store) -> None:
    r = CliRunner().invoke(app, ["pairs", str(store.root), "--cxr-before-ctpa", "--max-gap", "24h",
                                 "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["rule"] == {"max_gap_hours": 24.0, "cxr_before_ctpa": True, "multi_cxr": False}
    assert s["changed"] is True
    # P1: the CXR after the CTPA is dropped, the one 10 h before pairs; P2's explicit pair is
    # 30 h apart and P3's is after its CTPA: both dropped and counted; P4's undated one is kept.
    assert _pairs(store) == {("p1-ct", "p1-cx-before"), ("p4-ct", "p4-cx"), ("p5-ct", "p5-cx-1")}
    assert s["dropped_explicit"] == {"cxr_after_ctpa": 1, "over_max_gap": 1, "not_nearest": 0}
    assert s["dropped_derived"] == {"cxr_after_ctpa": 1, "over_max_gap": 0, "not_nearest": 2}
    assert (s["ctpa"], s["ctpa_with_cxr"], s["ctpa_without_cxr"], s["pairs"]) == (6, 3, 3, 3)
    assert s["explicit_undated"] == 1
    assert s["by_split"]["train"]["ctpa_with_cxr"] == 1 and s["by_split"]["val"]["pairs"] == 1
    assert s["by_split"]["train"]["dropped_explicit"]["over_max_gap"] == 1
    why = {(r["ctpa_study_id"], r["cxr_study_id"]): r["drop_reason"]
           for r in store.sql("SELECT * FROM pair_candidates").to_pylist()}
    assert why[("p2-ct", "p2-cx")] == "over_max_gap" and why[("p3-ct", "p3-cx")] == "cxr_after_ctpa"
    assert why[("p1-ct", "p1-cx-after")] == "cxr_after_ctpa"
    # a fresh open reads the rule back from the store; a re-attached manifest keeps it
    assert open_store(store.root).pairing_rule() == PairingRule(24.0, True, False)
    store.attach_manifest(_manifest())
    assert store.pairing_rule() == PairingRule(24.0, True, False)
    # options not given keep their value: only the side changes here
    r = CliRunner().invoke(app, ["pairs", str(store.root), "--either-side", "--json"])
    assert json.loads(r.stdout)["rule"] == {"max_gap_hours": 24.0, "cxr_before_ctpa": False,
                                           "multi_cxr": False}
    assert ("p3-ct", "p3-cx") in _pairs(store) and ("p2-ct", "p2-cx") not in _pairs(store)


def test_all_cxr_gives_several_rows_per_ctpa_and_they_all_train(store) -> None:
    store.set_pairing_rule(PairingRule(24.0, cxr_before_ctpa=True, multi_cxr=True))
    got = store.sql("SELECT ctpa_study_id, count(*) AS n FROM pairs GROUP BY 1 ORDER BY 1")
    assert dict(zip(*got.to_pydict().values(), strict=True)) == {"p1-ct": 1, "p4-ct": 1, "p5-ct": 3}
    from embedstore.train import _pairs as train_pairs

    assert train_pairs(store, "train", None) == [("p1-cx-before", "p1-ct")]
    store.set_pairing_rule(PairingRule(48.0, multi_cxr=True))
    assert train_pairs(store, "train", None) == [
        ("p1-cx-after", "p1-ct"), ("p1-cx-before", "p1-ct"), ("p2-cx", "p2-ct")]
    r = CliRunner().invoke(app, ["pairs", str(store.root), "--nearest-cxr"])
    assert r.exit_code == 0, r.output
    assert "Rule set: the nearest CXR within 48 h, CXR either side of the CTPA" in r.output
    assert train_pairs(store, "train", None) == [("p1-cx-after", "p1-ct"), ("p2-cx", "p2-ct")]


def test_pairs_without_options_only_reads(store) -> None:
    before = store.manifest_path.stat().st_mtime_ns
    r = CliRunner().invoke(app, ["pairs", str(store.root)])
    assert r.exit_code == 0, r.output
    assert "Rule: the nearest CXR within 48 h, CXR either side of the CTPA" in r.output
    assert "1 explicit pairs kept without a gap check (no acquired_at)" in r.output
    assert store.manifest_path.stat().st_mtime_ns == before


@pytest.mark.parametrize(("text", "hours"), [("24h", 24.0), ("90m", 1.5), ("2d", 48.0),
                                             ("1.5h", 1.5), ("1w", 168.0), (" 36 H ", 36.0)])
def test_parse_duration(text: str, hours: float) -> None:
    assert parse_duration(text) == pytest.approx(hours)


@pytest.mark.parametrize(("value", "line"), [
    ("24x", "Error: Invalid duration '24x' for --max-gap: give a number and a unit, m (minutes), "
            "h (hours), d (days) or w (weeks), e.g. 90m, 24h, 2d."),
    ("24", "Error: Invalid duration '24' for --max-gap: give a number and a unit, m (minutes), "
           "h (hours), d (days) or w (weeks), e.g. 90m, 24h, 2d."),
    ("0h", "Error: --max-gap must be a positive duration, got '0h' (e.g. 24h)."),
])
def test_bad_duration_is_one_error_line_and_changes_nothing(store, value: str, line: str) -> None:
    before = store.manifest_path.read_bytes()
    r = CliRunner().invoke(app, ["pairs", str(store.root), "--max-gap", value])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [line]
    assert store.manifest_path.read_bytes() == before


def test_setting_the_rule_is_refused_while_another_writer_holds_the_store(store) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from embedstore.store.lock import Lock; Lock(Path(sys.argv[1]), None).acquire(); "
         "print('held', flush=True); sys.stdin.read()", str(store.root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError):
            store.set_pairing_rule(PairingRule(12.0))
        r = CliRunner().invoke(app, ["pairs", str(store.root), "--max-gap", "12h"])
        assert r.exit_code == 1 and r.output.startswith("Error: ")
        r = CliRunner().invoke(app, ["pairs", str(store.root), "--json"])  # reading needs no lock
        assert r.exit_code == 0 and json.loads(r.stdout)["rule"]["max_gap_hours"] == 48.0
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    store.set_pairing_rule(PairingRule(12.0))
    assert open_store(store.root).pairing_rule().max_gap_hours == 12.0


def test_rule_needs_a_manifest_and_valid_values(tmp_path: Path) -> None:
    s = open_store(tmp_path / "s", create=True)
    with pytest.raises(ManifestError, match="has no manifest"):
        s.set_pairing_rule(PairingRule())
    for bad in (0, -1.0, float("inf"), True, "24h"):
        with pytest.raises(ConfigError, match="max_gap_hours must be a positive number"):
            PairingRule(max_gap_hours=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="multi_cxr must be true or false"):
        PairingRule(multi_cxr="yes")  # type: ignore[arg-type]
    assert PairingRule.from_dict({"pair_max_gap_hours": 6}) == PairingRule(6.0)  # old stores


# ------------------------------------------------------------------------------------------------
# evaluation: several CXRs per CTPA -> one score per CTPA
# ------------------------------------------------------------------------------------------------


def test_aggregate_per_ctpa_mean_and_max() -> None:
    ids = ["b", "a", "b", "c", "b"]
    scores = np.array([0.2, 0.9, 0.6, 0.5, 0.1])
    labels = np.array([1, 0, 1, 1, 1])
    got_ids, mean, y = aggregate_per_ctpa(ids, scores, labels)
    assert got_ids == ["a", "b", "c"]
    np.testing.assert_allclose(mean, [0.9, 0.3, 0.5])
    np.testing.assert_array_equal(y, [0, 1, 1])
    _, mx, _ = aggregate_per_ctpa(ids, scores, how="max")
    np.testing.assert_allclose(mx, [0.9, 0.6, 0.5])
    with pytest.raises(ConfigError, match="CTPA 'b' has pairs with different labels"):
        aggregate_per_ctpa(ids, scores, np.array([1, 0, 0, 1, 1]))
    with pytest.raises(ConfigError, match="Unknown per-CTPA aggregation 'median'"):
        aggregate_per_ctpa(ids, scores, how="median")
