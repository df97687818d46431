"""Extraction's cache identity on a tiny synthetic cohort (fast: 6 patients, 32 x 32 images)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import embedstore.extract as extract_mod
from embedstore.errors import UnknownEncoderError
from embedstore.extract import ExtractConfig, extract, extract_each
from embedstore.manifest import load_manifest, write_manifest
from embedstore.phantom import PhantomSpec
from embedstore.store import open_store
from embedstore.synth import synthesize_cohort

CXR_ENC = "test-tiny-vit"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-cohort")
    spec = PhantomSpec.with_shape((8, 32, 32), prevalence=0.5)
    synthesize_cohort(out, n_patients=6, seed=3, spec=spec, workers=1)
    return out


def _cfg(**kw: object) -> ExtractConfig:
    return ExtractConfig(modality="cxr", encoder=CXR_ENC, workers=0, **kw)  # type: ignore[arg-type]


def test_a_changed_preprocessing_spec_is_a_new_set_with_nothing_cached(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s"
    first = extract(store, cohort / "manifest.parquet", _cfg())
    assert (first.done, first.cached) == (6, 0)
    again = extract(store, cohort / "manifest.parquet", _cfg())
    assert (again.done, again.cached, again.encoder_key) == (0, 6, first.encoder_key)

    original = extract_mod._preprocess_for

    def stretched(encoder, modality):  # type: ignore[no-untyped-def]
        return dataclasses.replace(original(encoder, modality), cxr_resize="stretch")

    monkeypatch.setattr(extract_mod, "_preprocess_for", stretched)
    changed = extract(store, cohort / "manifest.parquet", _cfg())
    # same encoder, same pixels, other preprocessing: a new set, every row recomputed
    assert changed.encoder_key != first.encoder_key
    assert (changed.done, changed.cached, changed.failed) == (6, 0, 0)
    st = open_store(store)
    old, new = st.load("CXR", first.encoder_key), st.load("CXR", changed.encoder_key)
    assert old.study_ids == new.study_ids
    assert not set(old.meta["cache_key"].to_pylist()) & set(new.meta["cache_key"].to_pylist())
    specs = {s.encoder_key: s.spec for s in st.sets()}
    assert specs[changed.encoder_key]["preprocess"]["cxr_resize"] == "stretch"


def _weights(path: Path, seed: int) -> str:
    """test-tiny-vit's visual tower drawn from another seed, as a safetensors file."""
    from embedstore.models.encoders import create_encoder, get_encoder_spec
    from safetensors.torch import save_file

    enc = create_encoder(dataclasses.replace(get_encoder_spec(CXR_ENC), seed=seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in enc.visual.state_dict().items()}, str(path))
    return str(path)


def test_the_same_weights_at_another_path_are_recognised_by_their_hash(
        cohort: Path, tmp_path: Path) -> None:
    store, m = tmp_path / "s", cohort / "manifest.parquet"
    first_file = _weights(tmp_path / "site-a" / "ckpt.safetensors", seed=7)
    first = extract(store, m, _cfg(weights=first_file))
    assert (first.done, first.cached) == (6, 0)
    moved = tmp_path / "moved" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.copy(first_file, moved)
    again = extract(store, m, _cfg(weights=str(moved)))
    assert (again.done, again.cached, again.failed, again.encoder_key) == (0, 6, 0, first.encoder_key)
    other = extract(store, m, _cfg(weights=_weights(tmp_path / "site-a" / "other.safetensors", 8)))
    assert other.encoder_key != first.encoder_key and (other.done, other.cached) == (6, 0)
    specs = {s.encoder_key: s.spec for s in open_store(store).sets()}
    assert specs[first.encoder_key]["provenance"]["weights_file"] == "ckpt.safetensors"
    assert str(tmp_path) not in json.dumps(specs)  # no path in any stored spec


def test_a_grown_manifest_keeps_the_set_and_is_recorded_as_provenance(
        cohort: Path, tmp_path: Path) -> None:
    full = load_manifest(cohort / "manifest.parquet", check_paths=False)
    patients = sorted(set(full.table["patient_id"].to_pylist()))
    part = full.table.filter(pc.is_in(full.table["patient_id"], pa.array(patients[:4])))
    # a manifest of 4 of the 6 patients, its paths made absolute so it can live elsewhere
    part = part.set_column(part.column_names.index("path"), "path", pa.array(
        [str(full.resolve(p)) for p in part["path"].to_pylist()]))
    small = write_manifest(part, tmp_path / "m4", check_paths=False)
    store = tmp_path / "s"
    first = extract(store, small, _cfg())
    grown = extract(store, cohort / "manifest.parquet", _cfg())
    assert grown.encoder_key == first.encoder_key
    assert (first.done, grown.done, grown.cached) == (4, 2, 4)
    (info,) = open_store(store).sets()
    assert info.spec["provenance"]["manifest_fingerprint"] == load_manifest(
        small, check_paths=False).fingerprint


def test_several_encoders_in_turn_report_one_summary_each(cohort: Path, tmp_path: Path) -> None:
    store = tmp_path / "s"
    cfg = ExtractConfig(modality="cxr", workers=0)
    out = extract_each(store, cohort / "manifest.parquet", cfg, [CXR_ENC, "test-tiny-resnet"])
    assert [s.encoder_key.rsplit("-", 1)[0] for s in out] == [CXR_ENC, "test-tiny-resnet"]
    assert [(s.done, s.cached) for s in out] == [(6, 0), (6, 0)]
    assert {s.encoder_key for s in open_store(store).sets()} == {s.encoder_key for s in out}
    with pytest.raises(UnknownEncoderError):  # every name is checked before any runs
        extract_each(tmp_path / "s2", cohort / "manifest.parquet", cfg, [CXR_ENC, "vit-x"])
    assert not (tmp_path / "s2" / "sets").exists() or not open_store(tmp_path / "s2").sets()


def test_cli_extract_with_two_encoders_reports_each(cohort: Path, tmp_path: Path) -> None:
    from embedstore.cli.app import app
    from typer.testing import CliRunner

    args = ["extract", str(tmp_path / "s"), "-m", str(cohort / "manifest.parquet"), "--modality",
            "CXR", "--workers", "0", "--encoder", f"{CXR_ENC},test-tiny-resnet"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [(x["done"], x["cached"]) for x in rows] == [(6, 0), (6, 0)]
    text = CliRunner().invoke(app, args)
    lines = [ln for ln in text.output.splitlines() if "selected" in ln]
    assert len(lines) == 2 and all("0 embedded; 6 cached" in ln for ln in lines), text.output
    assert lines[0].startswith(f"CXR [{rows[0]['encoder_key']}]")
    bad = CliRunner().invoke(app, [*args[:-1], f"{CXR_ENC},", "--json"])
    assert bad.exit_code == 1 and "Error: --encoder" in bad.output


def _relisted(cohort: Path, out: Path, *, suffix: str) -> Path:
    """The cohort's CXR studies listed again under new study (and patient) ids, same files."""
    full = load_manifest(cohort / "manifest.parquet", check_paths=False)
    t = full.table.filter(pc.equal(full.table["modality"], "CXR"))
    t = t.set_column(t.column_names.index("path"), "path",
                     pa.array([str(full.resolve(p)) for p in t["path"].to_pylist()]))
    for col in ("study_id", "patient_id"):
        t = t.set_column(t.column_names.index(col), col,
                         pa.array([f"{v}{suffix}" for v in t[col].to_pylist()]))
    return write_manifest(t, out, check_paths=False)


def test_new_study_ids_with_known_pixels_get_their_own_rows(cohort: Path, tmp_path: Path) -> None:
    # issue 10, item 2: content-addressed reuse must still create the row for each study id
    store = tmp_path / "s"
    first = extract(store, cohort / "manifest.parquet", _cfg())
    old = open_store(store).load("CXR", first.encoder_key)
    old_vec = dict(zip(old.study_ids, old.vectors, strict=True))
    relisted = _relisted(cohort, tmp_path / "m2", suffix="-again")
    again = extract(store, relisted, _cfg())
    assert again.failed == 0 and again.done + again.cached == 6
    st = open_store(store)
    es = st.load("CXR", first.encoder_key, where="true")
    ids = set(es.study_ids)
    new_ids = set(load_manifest(relisted, check_paths=False).table["study_id"].to_pylist())
    assert new_ids <= ids, f"no rows for {sorted(new_ids - ids)}"
    by_id = dict(zip(es.study_ids, es.vectors, strict=True))
    for sid in new_ids:  # the same pixels give the same vector
        assert (by_id[sid] == old_vec[sid.removesuffix("-again")]).all()


def test_a_refused_writer_changes_nothing_in_the_store(cohort: Path, tmp_path: Path) -> None:
    # issue 10, item 1: a second extract with another manifest, refused because the store is
    # locked, must not have replaced manifest.parquet (gc would then drop the committed rows)
    from embedstore.store.lock import Lock

    store = tmp_path / "s"
    extract(store, cohort / "manifest.parquet", _cfg())
    manifest_file = open_store(store).manifest_path
    before = manifest_file.read_bytes()
    other = _relisted(cohort, tmp_path / "m2", suffix="-other")
    held = Lock(open_store(store).root, None).acquire()  # another writer holds the store
    try:
        import subprocess
        import sys

        code = ("import sys; from embedstore.extract import ExtractConfig, extract; "
                "from embedstore.errors import StoreLockedError\n"
                "try:\n    extract(sys.argv[1], sys.argv[2], ExtractConfig(modality='cxr', "
                f"encoder='{CXR_ENC}', workers=0))\n"
                "except StoreLockedError:\n    sys.exit(3)\n")
        res = subprocess.run([sys.executable, "-c", code, str(store), str(other)], check=False,
                             capture_output=True, text=True)
        assert res.returncode == 3, res.stderr[-2000:]
    finally:
        held.release()
    assert manifest_file.read_bytes() == before
