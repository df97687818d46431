"""Cache identity (embedstore.identity): each input that must change a key changes it; paths, the
manifest and row order do not. Fast: the 1-layer test encoders, no images."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from embedstore.models.encoders import create_encoder, get_encoder_spec, list_encoders
from safetensors.torch import save_file

from embedstore.domain import Modality
from embedstore.errors import EncoderError, StoreFormatError
from embedstore.identity import card_for, preprocess_for, provenance, set_identity
from embedstore.manifest import Manifest
from embedstore.preprocess import PreprocessSpec
from embedstore.store import open_store
from embedstore.store.format import PROVENANCE_KEY, compared_spec

NAME = "test-tiny-vit"
CONTENT = "c0" * 32


@pytest.fixture(scope="module")
def base():  # type: ignore[no-untyped-def]
    return set_identity(create_encoder(NAME))


def _weights(path: Path, seed: int) -> Path:
    """The visual tower of test-tiny-vit drawn from another seed, as a safetensors file."""
    enc = create_encoder(replace(get_encoder_spec(NAME), seed=seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in enc.visual.state_dict().items()}, str(path))
    return path


def _changed(a, b) -> tuple[bool, bool]:  # type: ignore[no-untyped-def]
    return a.set_key != b.set_key, a.row_key(CONTENT) != b.row_key(CONTENT)


def test_keys_have_the_documented_shape(base) -> None:  # type: ignore[no-untyped-def]
    assert base.set_key.startswith(f"{NAME}-") and len(base.set_key) == len(NAME) + 11
    assert len(base.row_key(CONTENT)) == 64
    assert base.row_key(CONTENT) != base.row_key("c1" * 32)  # the content is in the row key
    again = set_identity(create_encoder(NAME))
    assert (again.set_key, again.row_key(CONTENT)) == (base.set_key, base.row_key(CONTENT))


def test_preprocessing_changes_both_keys(base) -> None:  # type: ignore[no-untyped-def]
    other = set_identity(create_encoder(NAME), replace(base.preprocess, cxr_resize="stretch"))
    assert _changed(base, other) == (True, True)


def test_the_card_changes_both_keys(base) -> None:  # type: ignore[no-untyped-def]
    spec = get_encoder_spec(NAME)
    # a card field that does not change the preprocessing: only the fingerprint can carry it
    relicensed = replace(spec, card=spec.card.with_overrides({"licence": "CC-BY-4.0"}))
    other = set_identity(create_encoder(relicensed))
    assert other.preprocess == base.preprocess
    assert _changed(base, other) == (True, True)
    assert other.spec()["card"]["licence"] == "CC-BY-4.0"


def test_weights_and_seed_change_both_keys(base, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    enc = create_encoder(NAME)
    with torch.no_grad():
        next(enc.parameters()).view(-1)[0] += 0.25  # one weight
    assert _changed(base, set_identity(enc)) == (True, True)
    reseeded = create_encoder(replace(get_encoder_spec(NAME), seed=1))
    assert _changed(base, set_identity(reseeded)) == (True, True)
    loaded = create_encoder(NAME, weights=str(_weights(tmp_path / "w.safetensors", seed=3)))
    assert _changed(base, set_identity(loaded)) == (True, True)


def test_the_weights_path_changes_nothing_compared(tmp_path: Path) -> None:
    a = _weights(tmp_path / "site-a" / "ckpt.safetensors", seed=3)
    b = tmp_path / "elsewhere" / "renamed.safetensors"
    b.parent.mkdir()
    shutil.copy(a, b)
    ia = set_identity(create_encoder(NAME, weights=str(a)))
    ib = set_identity(create_encoder(NAME, weights=str(b)))
    assert _changed(ia, ib) == (False, False)
    sa = ia.spec(provenance(weights=str(a)))
    sb = ib.spec(provenance(weights=str(b)))
    assert compared_spec(sa) == compared_spec(sb)
    assert sa[PROVENANCE_KEY]["weights_file"] == "ckpt.safetensors"  # a name, not a path
    assert str(tmp_path) not in json.dumps(sa) and "site-a" not in json.dumps(sa)


def _manifest(rows: list[dict]) -> Manifest:
    t = pa.Table.from_pylist(rows)
    return Manifest(table=t, base_dir=Path("/nowhere"), metadata={})


def test_the_manifest_is_provenance_only_and_row_order_free(base) -> None:  # type: ignore[no-untyped-def]
    rows = [{"patient_id": f"P{i}", "study_id": f"S{i}", "modality": "CXR", "path": f"{i}.dcm",
             "split": "train"} for i in range(5)]
    fp = _manifest(rows).fingerprint
    assert _manifest(rows[::-1]).fingerprint == fp  # row order does not matter
    grown = _manifest([*rows, {**rows[0], "patient_id": "P9", "study_id": "S9"}]).fingerprint
    assert grown != fp
    s1 = base.spec(provenance(manifest_fingerprint=fp))
    s2 = base.spec(provenance(manifest_fingerprint=grown))
    assert s1[PROVENANCE_KEY]["manifest_fingerprint"] == fp
    assert compared_spec(s1) == compared_spec(s2)


def test_a_reopened_set_compares_everything_but_provenance(base, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = open_store(tmp_path / "s", create=True)
    first = base.spec(provenance(manifest_fingerprint="m1", weights=None))
    with store.writer("CXR", base.set_key, dim=16, spec=first):
        pass
    moved = base.spec(provenance(manifest_fingerprint="m2", weights="/other/place.safetensors"))
    with store.writer("CXR", base.set_key, dim=16, spec=moved):
        pass  # provenance differs: accepted
    (info,) = store.sets()
    assert info.spec[PROVENANCE_KEY]["manifest_fingerprint"] == "m1"  # how the set was first made
    other = {**first, "preprocess_fingerprint": "0" * 64}
    with pytest.raises(StoreFormatError, match="already exists"):
        store.writer("CXR", base.set_key, dim=16, spec=other).open()


def test_a_pretrained_encoder_without_a_card_is_refused(tmp_path: Path) -> None:
    bare = replace(get_encoder_spec(NAME), card=None)
    enc = create_encoder(bare, weights=str(_weights(tmp_path / "w.safetensors", seed=3)))
    with pytest.raises(EncoderError, match="loads trained weights but has no card") as ei:
        card_for(enc)
    assert ei.value.reason == "no_card"


def test_a_random_encoder_without_a_card_gets_the_old_default() -> None:
    for name, modality in (("test-tiny-vit", Modality.CXR), ("test-tiny-ctpa", Modality.CTPA)):
        enc = create_encoder(replace(get_encoder_spec(name), card=None))
        card = card_for(enc)
        assert not card.pretrained and "derived" in card.source
        assert preprocess_for(enc, modality) == _old_default(enc, modality)


def _old_default(enc, modality: Modality) -> PreprocessSpec:  # type: ignore[no-untyped-def]
    """What extract built before cards existed (``_preprocess_for``: input size, defaults)."""
    size = tuple(enc.input_size)
    if modality is Modality.CTPA:
        return PreprocessSpec(modality="CTPA", ct_shape=size)  # type: ignore[arg-type]
    return PreprocessSpec(modality="CXR", cxr_size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list_encoders())
def test_builtin_cards_reproduce_the_preprocessing_before_cards(name: str) -> None:
    enc = create_encoder(name)
    modality = Modality.CTPA if enc.input_kind == "volume" else Modality.CXR
    pp = preprocess_for(enc, modality)
    assert pp == _old_default(enc, modality)
    assert pp.fingerprint() == _old_default(enc, modality).fingerprint()


def test_a_card_of_another_modality_is_refused() -> None:
    with pytest.raises(Exception, match="has a CXR card, so it cannot embed CTPA"):
        preprocess_for(create_encoder(NAME), "ctpa")
