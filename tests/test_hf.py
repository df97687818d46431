"""The ``hf`` encoder family through the CLI, offline: a tiny random-init transformers ViT saved
with ``save_pretrained`` extracts through ``--encoder hf:DIR``, its card is printed and stored,
and its weights are really the ones on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from embedstore.cli.app import app
from typer.testing import CliRunner

from embedstore.phantom import PhantomSpec
from embedstore.store import open_store
from embedstore.synth import synthesize_cohort

transformers = pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the hub


def _save_vit(out: Path, *, seed: int = 0, perturb: bool = False, processor: bool = True) -> Path:
    """hidden 32, 2 layers, 32 px, patch 8: a ViT small enough for the fast suite."""
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = transformers.ViTModel(cfg)
    if perturb:
        with torch.no_grad():
            model.embeddings.patch_embeddings.projection.weight.view(-1)[0] += 0.5
    model.save_pretrained(out)
    if processor:
        transformers.ViTImageProcessor(size={"height": 32, "width": 32},
                                       image_mean=[0.5, 0.5, 0.5],
                                       image_std=[0.25, 0.25, 0.25]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf-cohort")
    synthesize_cohort(out, n_patients=4, seed=5, spec=PhantomSpec.with_shape((8, 32, 32)),
                      workers=1)
    return out


def _extract(store: Path, cohort: Path, *extra: str) -> dict:
    r = runner.invoke(app, ["extract", str(store), "-m", str(cohort / "manifest.parquet"),
                            "--modality", "cxr", "--workers", "0", "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_hf_dir_extracts_with_its_card_printed_and_stored(cohort: Path, tmp_path: Path) -> None:
    vit = _save_vit(tmp_path / "tiny-vit")
    store = tmp_path / "s"
    s = _extract(store, cohort, "--encoder", f"hf:{vit}")
    assert s["encoder_key"].startswith("hf-vit-") and (s["done"], s["failed"]) == (4, 0)
    shown = runner.invoke(app, ["encoders", "--card", f"hf:{vit}", "--json"])
    assert shown.exit_code == 0, shown.output
    card = json.loads(shown.stdout)["card"]
    assert card["mean"] == [0.5] * 3 and card["std"] == [0.25] * 3  # from the processor config
    assert (card["input_size"], card["resize"], card["embed_dim"]) == ([32, 32], "stretch", 32)
    (info,) = open_store(store).sets()
    assert info.spec["card"] == card and info.spec["preprocess"]["cxr_resize"] == "stretch"
    assert str(tmp_path) not in json.dumps(info.spec)
    text = runner.invoke(app, ["encoders", "--card", f"hf:{vit}"])
    assert "resize       stretch" in text.stdout and "pretrained   true" in text.stdout

    # the same checkpoint in another folder: recognised by its weights, nothing recomputed
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(vit, moved)
    again = _extract(store, cohort, "--encoder", f"hf:{moved}")
    assert (again["encoder_key"], again["done"], again["cached"]) == (s["encoder_key"], 0, 4)

    # one weight changed on disk: other vectors, another set
    bumped = _save_vit(tmp_path / "bumped", perturb=True)
    other = _extract(store, cohort, "--encoder", f"hf:{bumped}")
    assert other["encoder_key"] != s["encoder_key"] and other["done"] == 4
    st = open_store(store)
    a, b = st.load("CXR", s["encoder_key"]), st.load("CXR", other["encoder_key"])
    assert a.study_ids == b.study_ids and not np.allclose(a.vectors, b.vectors)


def test_a_card_file_next_to_the_weights_overrides_and_enters_the_key(
        cohort: Path, tmp_path: Path) -> None:
    vit = _save_vit(tmp_path / "vit")
    plain = _extract(tmp_path / "s", cohort, "--encoder", f"hf:{vit}")
    (vit / "embedstore_card.toml").write_text('licence = "CC-BY-4.0"\nsource = "our lab"\n')
    shown = json.loads(runner.invoke(app, ["encoders", "--card", f"hf:{vit}", "--json"]).stdout)
    assert (shown["card"]["licence"], shown["card"]["source"]) == ("CC-BY-4.0", "our lab")
    carded = _extract(tmp_path / "s", cohort, "--encoder", f"hf:{vit}")
    assert carded["encoder_key"] != plain["encoder_key"] and carded["done"] == 4


def test_an_hf_dir_without_an_image_processor_needs_a_card(cohort: Path, tmp_path: Path) -> None:
    vit = _save_vit(tmp_path / "bare", processor=False)
    r = runner.invoke(app, ["extract", str(tmp_path / "s"), "-m", str(cohort / "manifest.parquet"),
                            "--modality", "cxr", "--workers", "0", "--encoder", f"hf:{vit}"])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
    assert r.exit_code == 1 and len(errors) == 1, r.output
    assert "cannot derive card field 'resize'" in errors[0] and "Traceback" not in r.output
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"resize": "stretch", "input_size": [32, 32],
                                "mean": [0.5] * 3, "std": [0.5] * 3}))
    ok = _extract(tmp_path / "s", cohort, "--encoder", f"hf:{vit}", "--card", str(card))
    assert ok["done"] == 4


@pytest.mark.parametrize("pool", ["auto", "cls", "mean"])
def test_the_encoder_is_the_saved_model_with_the_cards_normalisation(
        tmp_path: Path, pool: str) -> None:
    from embedstore.models.encoders import create_encoder, hf_spec

    vit = _save_vit(tmp_path / "vit", seed=3)
    enc = create_encoder(hf_spec(vit, pool=pool))
    ref = transformers.ViTModel.from_pretrained(vit, local_files_only=True).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, 1, H, W)
    with torch.inference_mode():
        out = ref(pixel_values=(x.expand(-1, 3, -1, -1) - 0.5) / 0.25)
        want = {"auto": out.pooler_output, "cls": out.last_hidden_state[:, 0],
                "mean": out.last_hidden_state.mean(1)}[pool]
        assert torch.allclose(enc(x), want, atol=1e-5)


def test_a_2_5d_ct_encoder_over_an_hf_model(tmp_path: Path) -> None:
    from embedstore.models.encoders import EncoderCard, EncoderSpec, create_encoder, hf_spec

    from embedstore.identity import preprocess_for

    vit = _save_vit(tmp_path / "vit")
    inner = hf_spec(vit)
    card = EncoderCard(modality="CTPA", input_size=(8, 32, 32), embed_dim=32, resize="fit",
                       hu_clip=(-1024.0, 3071.0), hu_windows=((700.0, 100.0), (1500.0, -600.0),
                                                              (400.0, -800.0)),
                       mean=inner.card.mean, std=inner.card.std, pretrained=True,
                       licence="test", source="test")
    spec = EncoderSpec(name="ct-hf", family="volume25d", weights=str(vit), card=card,
                       params={"inner": {"family": "hf", "params": inner.to_dict()["params"]},
                               "input_size": [8, 32, 32], "pool": "max"})
    enc = create_encoder(spec)  # the inner hf model takes the volume spec's weights
    vol = torch.rand(1, 8, 32, 32, generator=torch.Generator().manual_seed(0)) * 1500 - 1000
    with torch.inference_mode():
        assert enc(vol).shape == (1, 32)
    assert preprocess_for(enc, "CTPA").ct_shape == (8, 32, 32)
