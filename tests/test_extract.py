"""Extraction's cache identity on a tiny synthetic cohort (fast: 6 patients, 32 x 32 images)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import embedstore.extract as extract_mod
from embedstore.extract import ExtractConfig, extract
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
