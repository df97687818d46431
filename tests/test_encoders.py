"""Contract tests for the frozen encoder registry (embedstore.models.encoders).

Every registered encoder runs the contract tests (parametrised over ``list_encoders()``), so a
newly registered encoder is tested automatically. Family-specific tests follow.
"""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import replace
from pathlib import Path

import embedstore.models.encoders.openclip as oc_mod
import open_clip
import pytest
import torch
from embedstore.models.encoders import (
    DEFAULT_WINDOWS,
    EncoderCard,
    EncoderSpec,
    FrozenEncoder,
    apply_windows,
    create_encoder,
    describe_encoder,
    get_encoder_spec,
    list_encoders,
    list_families,
    register_encoder,
    registry,
    state_dict_hash,
)
from embedstore.models.errors import EncoderError, UnknownEncoderError
from safetensors.torch import save_file
from torch import nn

ENCODERS_DIR = Path(__file__).resolve().parents[1] / "models" / "encoders"
JIT_DEPRECATED = "ignore:.*torch.jit.*deprecated:FutureWarning"  # torch's, not ours


def _input(enc: FrozenEncoder, b: int = 2, seed: int = 0, max_slices: int = 8) -> torch.Tensor:
    """A small seeded batch of what the encoder takes (volumes cut to ``max_slices`` for speed)."""
    g = torch.Generator().manual_seed(seed)
    if enc.input_kind == "image":
        return torch.rand(b, 1, *enc.input_size, generator=g)  # (B, 1, H, W) in [0, 1]
    s, h, w = enc.input_size
    s = max(min(s, max_slices), int(enc.spec.params.get("slab", 1)))
    return torch.rand(b, s, h, w, generator=g) * 1600 - 1100  # (B, S, H, W) HU in [-1100, 500]


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register encoders without leaking them into other tests."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


# ------------------------------------------------------------------ contract, every encoder


@pytest.mark.parametrize("name", list_encoders())
class TestEncoderContract:
    def test_shape_dtype_finite(self, name: str) -> None:
        enc = create_encoder(name)
        assert enc.input_kind in ("image", "volume")
        assert len(enc.input_size) == (2 if enc.input_kind == "image" else 3)
        with torch.inference_mode():
            y = enc(_input(enc, b=3))
        assert y.shape == (3, enc.embed_dim)
        assert y.dtype == torch.float32
        assert torch.isfinite(y).all()

    def test_deterministic_for_seed_and_global_rng_untouched(self, name: str) -> None:
        spec = get_encoder_spec(name)
        state = torch.get_rng_state()
        a, b = create_encoder(spec), create_encoder(spec)
        assert torch.equal(torch.get_rng_state(), state), "creating an encoder moved the global RNG"
        c = create_encoder(replace(spec, seed=spec.seed + 1))
        x = _input(a)
        with torch.inference_mode():
            ya, yb, yc = a(x), b(x), c(x)
        assert torch.equal(ya, yb)
        assert a.weights_hash() == b.weights_hash() and a.fingerprint() == b.fingerprint()
        assert a.weights_hash() != c.weights_hash()
        assert not torch.allclose(ya, yc)

    def test_frozen(self, name: str) -> None:
        enc = create_encoder(name)
        assert not enc.training and not any(m.training for m in enc.modules())
        assert all(not p.requires_grad for p in enc.parameters())
        enc.train()  # a frozen encoder stays in eval mode whatever a parent module does
        assert not any(m.training for m in enc.modules())
        assert not enc(_input(enc)).requires_grad

    def test_input_matters(self, name: str) -> None:
        enc = create_encoder(name)
        with torch.inference_mode():
            y0, y1 = enc(_input(enc, seed=0)), enc(_input(enc, seed=1))
        rel = (y0 - y1).norm() / y0.norm()
        assert rel > 1e-3, f"{name}: outputs barely depend on the input (rel diff {rel:.2e})"

    def test_weights_hash_tracks_one_weight(self, name: str) -> None:
        enc = create_encoder(name)
        h0, f0 = enc.weights_hash(), enc.fingerprint()
        assert len(h0) == 64 and int(h0, 16) >= 0
        p = next(p for p in enc.parameters() if p.is_floating_point())
        orig = p.view(-1)[0].clone()
        with torch.no_grad():
            p.view(-1)[0] = orig + 0.5
        assert enc.weights_hash() != h0 and enc.fingerprint() != f0
        with torch.no_grad():
            p.view(-1)[0] = orig
        assert enc.weights_hash() == h0 and enc.fingerprint() == f0

    def test_card_matches_the_encoder_and_enters_the_fingerprint(self, name: str) -> None:
        spec = get_encoder_spec(name)
        assert spec.card is not None, f"{name} is registered without a card"
        assert EncoderCard.from_json(spec.card.to_json()) == spec.card
        enc = create_encoder(spec)  # create_encoder checks the card against the encoder
        assert spec.card.embed_dim == enc.embed_dim
        assert tuple(spec.card.input_size) == enc.input_size
        other = replace(spec, card=spec.card.with_overrides({"licence": "another licence"}))
        assert create_encoder(other).fingerprint() != enc.fingerprint()

    def test_spec_json_round_trip(self, name: str) -> None:
        spec = get_encoder_spec(name)
        assert spec.name == name
        again = EncoderSpec.from_json(spec.to_json())
        assert again == spec and hash(again) == hash(spec) and again.to_json() == spec.to_json()
        assert EncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        assert describe_encoder(name)
        info = json.loads(json.dumps(create_encoder(spec).describe()))
        assert info["spec"] == spec.identity_dict() and info["card"] == spec.card.to_dict()


# ------------------------------------------------------------------ registry and spec


def test_builtins_present() -> None:
    names = set(list_encoders())
    assert {"demo-cxr", "demo-ctpa", "test-tiny-vit", "test-tiny-ctpa", "test-tiny-resnet"} <= names
    assert set(list_families()) >= {"open_clip", "volume25d", "torchscript"}
    assert create_encoder("demo-ctpa").input_size == (64, 128, 128)


def test_unknown_encoder_lists_choices() -> None:
    with pytest.raises(UnknownEncoderError) as ei:
        create_encoder("vit-x")
    msg = str(ei.value)
    assert msg.startswith("Unknown encoder 'vit-x'. Available:")
    assert "test-tiny-vit" in msg and "demo-ctpa" in msg
    assert isinstance(ei.value, KeyError) and ei.value.reason == "unknown_encoder"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"name": "bad name!"}, "Encoder name 'bad name!' is invalid"),
        ({"family": "nope"}, "unknown family 'nope'. Available families: hf, open_clip"),
        ({"params": {"arch": "es-vit-tiny-32", "x": {1, 2}}}, "params must be JSON-able"),
        ({"params": {"arch": "es-vit-tiny-32", "init": float("nan")}}, "only finite numbers"),
        ({"params": {"arch": "nope-arch"}}, "unknown arch 'nope-arch'. Available:"),
        ({"params": {"arch": "es-vit-tiny-32", "init": "xavier"}}, "Valid: auto, open_clip"),
        ({"params": {"arch": "es-vit-tiny-32", "colour": 1}}, "unknown params ['colour']"),
        ({"seed": -1}, "seed must be an int"),
        ({"seed": True}, "seed must be an int"),
        ({"weights": ""}, "weights must be a non-empty string"),
    ],
)
def test_spec_validation(kwargs: dict, fragment: str) -> None:
    base = {"name": "x", "family": "open_clip", "params": {"arch": "es-vit-tiny-32"}}
    with pytest.raises(EncoderError) as ei:
        EncoderSpec(**{**base, **kwargs})
    assert fragment in str(ei.value)


def test_spec_is_deeply_frozen() -> None:
    params = {"arch": "es-vit-tiny-32", "vision_overrides": {"image_size": [32, 32]}}
    spec = EncoderSpec(name="x", family="open_clip", params=params)
    params["vision_overrides"]["image_size"] = [64, 64]  # the caller's dict, not the spec
    assert spec.params["vision_overrides"]["image_size"] == (32, 32)
    with pytest.raises(TypeError):
        spec.params["arch"] = "other"  # type: ignore[index]
    with pytest.raises(AttributeError):
        spec.seed = 3  # type: ignore[misc]
    d = spec.to_dict()
    d["params"]["arch"] = "changed"
    assert spec.params["arch"] == "es-vit-tiny-32"


def test_spec_from_dict_and_json_errors() -> None:
    with pytest.raises(EncoderError, match=r"unknown \['colour'\].*Valid keys: name, family"):
        EncoderSpec.from_dict({"name": "x", "family": "open_clip", "colour": 1})
    with pytest.raises(EncoderError, match=r"missing \['family'\]"):
        EncoderSpec.from_dict({"name": "x"})
    with pytest.raises(EncoderError, match="not valid JSON"):
        EncoderSpec.from_json("{nope")


def test_fingerprint_ignores_weights_location_but_not_bytes(tmp_path: Path) -> None:
    src = create_encoder(replace(get_encoder_spec("test-tiny-vit"), seed=5))
    a = tmp_path / "a.safetensors"
    save_file({k: v.contiguous() for k, v in src.visual.state_dict().items()}, str(a))
    b = tmp_path / "moved" / "b.safetensors"
    b.parent.mkdir()
    shutil.copy(a, b)
    ea, eb = create_encoder("test-tiny-vit", weights=str(a)), create_encoder("test-tiny-vit", weights=str(b))
    assert ea.spec.weights == str(a) and ea.spec != eb.spec
    assert ea.fingerprint() == eb.fingerprint()
    assert ea.fingerprint() != create_encoder("test-tiny-vit").fingerprint()


def test_register_encoder(scratch_registry: None) -> None:
    spec = replace(get_encoder_spec("test-tiny-vit"), seed=9)
    register_encoder("my-vit", spec, description="a seed-9 tiny ViT")
    assert "my-vit" in list_encoders() and describe_encoder("my-vit") == "a seed-9 tiny ViT"
    got = get_encoder_spec("my-vit")
    assert got.name == "my-vit" and got.seed == 9
    with pytest.raises(EncoderError, match="already registered"):
        register_encoder("my-vit", spec, description="again")
    register_encoder("my-vit", replace(spec, seed=10), description="again", overwrite=True)
    assert get_encoder_spec("my-vit").seed == 10
    register_encoder("lazy", lambda: 42, description="broken factory")  # type: ignore[arg-type]
    with pytest.raises(EncoderError, match="returned int, not an EncoderSpec"):
        get_encoder_spec("lazy")


def test_spec_pickles_and_deepcopies() -> None:
    import copy
    import pickle

    spec = get_encoder_spec("test-tiny-ctpa")
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert copy.deepcopy(spec) == spec


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_device_is_an_encoder_error() -> None:
    with pytest.raises(EncoderError, match="Cannot move encoder 'test-tiny-vit' to device 'cuda'"):
        create_encoder("test-tiny-vit", device="cuda")


def test_bad_device_and_bad_argument() -> None:
    with pytest.raises(EncoderError, match="not a torch device"):
        create_encoder("test-tiny-vit", device="gpu0")
    with pytest.raises(EncoderError, match="registry name or an EncoderSpec"):
        create_encoder(3)  # type: ignore[arg-type]


def test_image_input_validation() -> None:
    enc = create_encoder("test-tiny-vit")
    with pytest.raises(EncoderError, match=r"takes images \(B, 1, H, W\).*got \(2, 32, 32\)"):
        enc(torch.rand(2, 32, 32))
    with pytest.raises(EncoderError, match="dtype torch.uint8"):
        enc(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(EncoderError, match="no per-slice tokens"):
        enc.forward_tokens(torch.rand(1, 1, 32, 32))


def test_image_resize_and_grey_equals_rgb() -> None:
    enc = create_encoder("test-tiny-vit")
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        y = enc(x)
        assert torch.allclose(enc(x.expand(-1, 3, -1, -1)), y)
        big = torch.nn.functional.interpolate(x, size=(64, 64), mode="nearest")
        y_big = enc(big)  # resized back to 32 px inside (antialiased)
    assert y_big.shape == y.shape
    assert torch.nn.functional.cosine_similarity(y_big, y).min() > 0.9


# ------------------------------------------------------------------ open_clip family


def test_model_configs_registered() -> None:
    stems = {p.stem for p in (ENCODERS_DIR / "model_configs").glob("*.json")}
    assert stems and stems == set(oc_mod.TINY_CONFIGS)
    assert stems <= set(open_clip.list_models())


def test_model_config_lacking_text_cfg_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "es-broken-cfg.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}}))
    monkeypatch.setattr(oc_mod, "MODEL_CONFIG_DIR", tmp_path)
    with pytest.raises(EncoderError, match=r"did not register the model configs \['es-broken-cfg'\]"):
        oc_mod._register_model_configs()


def _save_visual(enc: FrozenEncoder, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in enc.visual.state_dict().items()}, str(path))


@pytest.mark.parametrize("name", ["test-tiny-vit", "test-tiny-resnet"])
def test_load_visual_safetensors(name: str, tmp_path: Path) -> None:
    src = create_encoder(replace(get_encoder_spec(name), seed=1))
    _save_visual(src, tmp_path / "visual.safetensors")
    enc = create_encoder(name, weights=str(tmp_path / "visual.safetensors"))
    rand = create_encoder(name)
    x = _input(enc, b=3)
    with torch.inference_mode():
        y, y_src, y_rand = enc(x), src(x), rand(x)
    assert torch.equal(y, y_src) and enc.weights_hash() == src.weights_hash()
    assert enc.weights_hash() != rand.weights_hash() and not torch.allclose(y, y_rand)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_load_full_open_clip_checkpoint(fmt: str, tmp_path: Path) -> None:
    torch.manual_seed(123)
    model = open_clip.create_model("es-vit-tiny-32", pretrained=None).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "pt":  # what open_clip's trainer writes: DDP prefix inside {"state_dict": ...}
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        save_file(sd, str(path))
    enc = create_encoder("test-tiny-vit", weights=str(path))
    want = model.visual.state_dict()
    got = enc.visual.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = model.visual((x.expand(-1, 3, -1, -1) - mean) / std)
        assert torch.allclose(enc(x), expected, atol=1e-6)
    assert enc.weights_hash() != create_encoder("test-tiny-vit").weights_hash()


def test_mismatched_checkpoint(tmp_path: Path) -> None:
    _save_visual(create_encoder("test-tiny-resnet"), tmp_path / "rn.safetensors")
    with pytest.raises(EncoderError) as ei:
        create_encoder("test-tiny-vit", weights=str(tmp_path / "rn.safetensors"))
    msg = str(ei.value)
    assert ei.value.reason == "weights_mismatch"
    assert "does not fit arch 'es-vit-tiny-32'" in msg and "missing" in msg and "unexpected" in msg
    # same keys, different shapes: a 64-px checkpoint of another width
    other = create_encoder(EncoderSpec(name="w", family="open_clip", params={
        "arch": "es-vit-tiny-32", "vision_overrides": {"width": 48}}))
    _save_visual(other, tmp_path / "wide.safetensors")
    with pytest.raises(EncoderError, match="shape mismatch"):
        create_encoder("test-tiny-vit", weights=str(tmp_path / "wide.safetensors"))


def test_unreadable_or_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="neither an existing file nor a pretrained tag") as ei:
        create_encoder("test-tiny-vit", weights=str(tmp_path / "absent.safetensors"))
    assert ei.value.reason == "weights_not_found"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(EncoderError, match="cannot read weights file") as ei:
        create_encoder("test-tiny-vit", weights=str(junk))
    assert ei.value.reason == "weights_unreadable"
    notsd = tmp_path / "notsd.pt"
    torch.save({"lr": 0.1}, notsd)
    with pytest.raises(EncoderError, match="holds no state dict of tensors"):
        create_encoder("test-tiny-vit", weights=str(notsd))


def test_resnet_bn3_fix() -> None:
    """open_clip zeroes bn3.weight, killing every residual branch of a random frozen ResNet."""
    x = _input(create_encoder("test-tiny-resnet"), b=2)

    def branch_matters(enc: FrozenEncoder) -> bool:
        conv3 = enc.visual.layer1[0].conv3.weight
        with torch.inference_mode():
            y0 = enc(x)
            conv3.mul_(3.0)
            return not torch.allclose(enc(x), y0)

    raw = create_encoder(EncoderSpec(name="raw", family="open_clip",
                                     params={"arch": "es-rn-tiny-64", "init": "open_clip"}))
    bn3 = [p for n, p in raw.visual.named_parameters()
           if n.startswith("layer") and n.endswith("bn3.weight")]
    assert bn3 and all(torch.count_nonzero(p) == 0 for p in bn3)
    assert not branch_matters(raw)

    fixed = create_encoder("test-tiny-resnet")
    bn3 = [p for n, p in fixed.visual.named_parameters()
           if n.startswith("layer") and n.endswith("bn3.weight")]
    assert all(torch.all(p == 1) for p in bn3)
    assert branch_matters(fixed)
    with torch.inference_mode():  # He init: outputs no longer tiny
        assert fixed(x).norm(dim=1).mean() > raw(x).norm(dim=1).mean()


@pytest.mark.parametrize("name", ["test-tiny-vit", "demo-cxr"])
def test_vit_random_init_not_degenerate(name: str) -> None:
    """With avg pooling the input-dependent part of a random ViT's output is substantial
    (the class token of an untrained ViT is ~99 % the same vector for every image)."""
    enc = create_encoder(name)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(12, 1, 8, 8, generator=g), size=enc.input_size,
                                        mode="bilinear")
    with torch.inference_mode():
        y = enc(x)  # (12, D)
    share = ((y - y.mean(0)).pow(2).sum() / y.pow(2).sum()).item()
    assert share > 0.05, f"input-dependent variance share {share:.4f}"


# ------------------------------------------------------------------ volume25d family


def _ctpa(**params: object) -> EncoderSpec:
    """test-tiny-ctpa with other params (and no card: its card describes the registered params)."""
    spec = get_encoder_spec("test-tiny-ctpa")
    return replace(spec, params={**spec.to_dict()["params"], **params}, card=None)


def test_apply_windows_known_values() -> None:
    hu = torch.tensor([-1000.0, -850.0, -600.0, 100.0, 450.0, 2000.0])[None, :]  # (1, 6) as (H, W)
    got = apply_windows(hu, DEFAULT_WINDOWS)  # (3, 1, 6)
    expected = torch.tensor([
        [0.0, 0.0, 0.0, 0.5, 1.0, 1.0],  # W700/L100: [-250, 450]
        [350 / 1500, 500 / 1500, 0.5, 1450 / 1500, 1.0, 1.0],  # W1500/L-600: [-1350, 150]
        [0.0, 0.375, 1.0, 1.0, 1.0, 1.0],  # W400/L-800: [-1000, -600]
    ])
    assert got.shape == (3, 1, 6)
    assert torch.allclose(got[:, 0], expected, atol=1e-6)
    assert apply_windows(torch.zeros(2, 5, 4, 4)).shape == (2, 5, 3, 4, 4)


@pytest.mark.parametrize("pool, factor", [("mean", 1), ("max", 1), ("meanmax", 2)])
def test_volume_pooling(pool: str, factor: int) -> None:
    enc = create_encoder(_ctpa(pool=pool))
    x = _input(enc, b=2)
    with torch.inference_mode():
        tokens, y = enc.forward_tokens(x), enc(x)
    d = enc.inner.embed_dim
    assert enc.embed_dim == factor * d and y.shape == (2, factor * d)
    assert tokens.shape == (2, 4, d)  # 8 slices at stride 2
    expected = {"mean": tokens.mean(1), "max": tokens.amax(1),
                "meanmax": torch.cat([tokens.mean(1), tokens.amax(1)], 1)}[pool]
    assert torch.allclose(y, expected)


def test_volume_slabs_windows_and_chunks() -> None:
    enc = create_encoder(_ctpa(slab=3, stride=2, chunk=64))
    x = torch.rand(2, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 1600 - 1100
    # 9 slices, slabs of 3 at stride 2: starts 0, 2, 4, 6
    with torch.inference_mode():
        tokens = enc.forward_tokens(x)
        assert tokens.shape == (2, 4, enc.inner.embed_dim)
        # token (b=1, k=2) is the inner encoder on the windowed mean of slices 4..6
        img = apply_windows(x[1:2, 4:7].mean(1), DEFAULT_WINDOWS)  # (1, 3, 32, 32)
        assert torch.allclose(tokens[1, 2], enc.inner(img)[0], atol=1e-5)
        # chunking only bounds memory
        one = create_encoder(_ctpa(slab=3, stride=2, chunk=1))
        assert torch.allclose(one.forward_tokens(x), tokens, atol=1e-5)
        # integer HU (as stored in DICOM) gives the same as float HU
        xi = x.round().to(torch.int16)
        assert torch.allclose(enc(xi), enc(xi.float()))


def test_volume_single_window_and_input_errors() -> None:
    enc = create_encoder(_ctpa(windows=[[400, -800]], slab=4))
    x = _input(enc, b=1)
    with torch.inference_mode():
        assert enc(x).shape == (1, enc.embed_dim)
    with pytest.raises(EncoderError, match=r"takes CT volumes \(B, S, H, W\)"):
        enc(torch.zeros(8, 32, 32))
    with pytest.raises(EncoderError, match="thinner than one slab"):
        enc(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"pool": "sum"}, "Valid: mean, max, meanmax"),
        ({"windows": [[700, 100], [1500, -600]]}, "give 1 or 3 [width, level] pairs"),
        ({"windows": [[0, 100]]}, "width > 0"),
        ({"stride": 0}, "params['stride'] must be an int >= 1"),
        ({"inner": {"family": "open_clip", "params": {"arch": "es-vit-tiny-32"}, "seed": 3}},
         "takes the volume spec's seed and weights"),
        ({"inner": {"family": "volume25d", "params": {}}}, "not another volume25d"),
        ({"inner": {"family": "open_clip", "params": {"arch": "nope"}}}, "unknown arch 'nope'"),
        ({"input_size": [64, 128]}, "must be [S, H, W]"),
    ],
)
def test_volume_spec_validation(params: dict, fragment: str) -> None:
    with pytest.raises(EncoderError) as ei:
        _ctpa(**params)
    assert fragment in str(ei.value)


def test_volume_weights_go_to_inner(tmp_path: Path) -> None:
    src = create_encoder(replace(get_encoder_spec("test-tiny-ctpa"), seed=4))
    _save_visual(src.inner, tmp_path / "inner.safetensors")
    enc = create_encoder("test-tiny-ctpa", weights=str(tmp_path / "inner.safetensors"))
    x = _input(enc)
    with torch.inference_mode():
        assert torch.equal(enc(x), src(x))
    assert enc.weights_hash() == src.weights_hash()
    assert enc.weights_hash() != create_encoder("test-tiny-ctpa").weights_hash()


# ------------------------------------------------------------------ torchscript family


class _UserImageNet(nn.Module):
    """A user's image network: (B, C, H, W) -> (B, 8); C = 1 or 3 (grey or windows)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))  # (B, 8)


class _UserVolumeNet(nn.Module):
    """A 'CTPA teacher without its last layer': (B, S, H, W) HU -> (B, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.unsqueeze(1) + 1000.0) / 1000.0  # (B, 1, S, H, W)
        return self.fc(torch.relu(self.conv(x)).mean((2, 3, 4)))  # (B, 5)


def _export(module: nn.Module, example: torch.Tensor, path: Path, dynamic: bool = True) -> None:
    module.eval()
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=shapes), str(path))


def _ts_spec(kind: str, dim: int, size: list[int]) -> EncoderSpec:
    return EncoderSpec(name="user-net", family="torchscript",
                       params={"input_kind": kind, "embed_dim": dim, "input_size": size})


@pytest.mark.parametrize("dynamic", [True, False])
def test_export_image_program_round_trip(dynamic: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _UserImageNet().eval()
    _export(net, torch.rand(2, 1, 16, 16), tmp_path / "net.pt2", dynamic=dynamic)
    enc = create_encoder(_ts_spec("image", 8, [16, 16]), weights=str(tmp_path / "net.pt2"))
    assert enc.fixed_batch == (None if dynamic else 2)
    x = torch.rand(5, 1, 16, 16)  # 5 is not the exported batch: chunked + padded when static
    with torch.inference_mode():
        assert torch.allclose(enc(x), net(x), atol=1e-6)
    again = create_encoder(_ts_spec("image", 8, [16, 16]), weights=str(tmp_path / "net.pt2"))
    assert again.weights_hash() == enc.weights_hash()
    torch.manual_seed(1)
    _export(_UserImageNet(), torch.rand(2, 1, 16, 16), tmp_path / "other.pt2")
    other = create_encoder(_ts_spec("image", 8, [16, 16]), weights=str(tmp_path / "other.pt2"))
    assert other.weights_hash() != enc.weights_hash()


@pytest.mark.filterwarnings(JIT_DEPRECATED)
def test_torchscript_volume_program_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _UserVolumeNet().eval()
    torch.jit.save(torch.jit.script(net), str(tmp_path / "teacher.pt"))
    enc = create_encoder(_ts_spec("volume", 5, [6, 12, 12]), weights=str(tmp_path / "teacher.pt"))
    assert enc.input_kind == "volume" and enc.embed_dim == 5
    x = torch.rand(3, 6, 12, 12) * 1000 - 1000
    with torch.inference_mode():
        assert torch.allclose(enc(x), net(x), atol=1e-6)
    assert enc.weights_hash() == state_dict_hash(nn.ModuleDict({"module": net}))


def test_torchscript_errors(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="needs its program file"):
        create_encoder(_ts_spec("image", 8, [16, 16]))
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a program")
    with pytest.raises(EncoderError, match="is not a torch.export program"):
        create_encoder(_ts_spec("image", 8, [16, 16]), weights=str(junk))
    _export(_UserImageNet(), torch.rand(2, 1, 16, 16), tmp_path / "net.pt2")
    wrong = create_encoder(_ts_spec("image", 7, [16, 16]), weights=str(tmp_path / "net.pt2"))
    with pytest.raises(EncoderError, match=r"returned \(2, 8\), expected \(2, 7\)"):
        wrong(torch.rand(2, 1, 16, 16))
    with pytest.raises(EncoderError, match=r"input_size \[16\] must be 2 positive ints"):
        _ts_spec("image", 8, [16])
    with pytest.raises(EncoderError, match="missing \\['embed_dim'\\]"):
        EncoderSpec(name="u", family="torchscript", params={"input_kind": "image", "input_size": [1, 1]})


def test_volume25d_over_user_program(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _UserImageNet().eval()
    _export(net, torch.rand(2, 3, 16, 16), tmp_path / "net.pt2")
    spec = EncoderSpec(name="user-ctpa", family="volume25d", weights=str(tmp_path / "net.pt2"), params={
        "inner": {"family": "torchscript",
                  "params": {"input_kind": "image", "embed_dim": 8, "input_size": [16, 16]}},
        "stride": 1, "pool": "mean", "input_size": [4, 16, 16]})
    enc = create_encoder(spec)
    x = torch.rand(2, 4, 16, 16) * 1000 - 1000
    with torch.inference_mode():
        expected = torch.stack([net(apply_windows(x[b])).mean(0) for b in range(2)])
        assert torch.allclose(enc(x), expected, atol=1e-5)


# ------------------------------------------------------------------ layering and GPU


def test_encoders_never_import_embedstore_outside_models() -> None:
    for path in ENCODERS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                if m.startswith("embedstore"):
                    assert m.startswith("embedstore.models"), f"{path.name} imports {m}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list_encoders())
def test_cuda_bf16_autocast_matches_cpu(name: str) -> None:
    cpu = create_encoder(name)
    gpu = create_encoder(name, device="cuda")
    assert gpu.weights_hash() == cpu.weights_hash()
    x = _input(cpu, b=4)
    with torch.inference_mode():
        want = cpu(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = gpu(x.cuda())
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    cos = torch.nn.functional.cosine_similarity(got.cpu(), want, dim=1)
    assert cos.min() > 0.99, f"{name}: min cosine {cos.min():.4f}"


# ------------------------------------------------------------------ cards


def _card(**kw: object) -> dict:
    base = {"modality": "CTPA", "input_size": [64, 128, 128], "embed_dim": 512,
            "resize": "spacing", "spacing_mm": [2.0, 1.5, 1.5], "hu_clip": [-1024, 3071],
            "hu_windows": [[400, 40]], "mean": [0.5], "std": [0.25], "pretrained": True,
            "licence": "CC-BY-NC-4.0", "source": "example"}
    return {**base, **kw}


def test_card_json_round_trip_and_defaults() -> None:
    card = EncoderCard.from_dict(_card())
    assert EncoderCard.from_json(card.to_json()) == card
    assert card.orientation == "axial-IS" and card.intensity == "hu"
    assert json.loads(card.to_json())["modality"] == "CTPA"
    assert card.with_overrides({"notes": "x"}).notes == "x"


@pytest.mark.parametrize("kw, fragment", [
    ({"modality": "MRI"}, "Unknown modality 'MRI'"),
    ({"input_size": [128, 128]}, "input_size must be 3 integers"),
    ({"resize": "pad"}, "resize must be one of fit, spacing for CTPA"),
    ({"spacing_mm": None}, "spacing_mm must be (dz, dy, dx)"),
    ({"resize": "fit"}, "spacing_mm must be None unless"),
    ({"hu_clip": [100, -100]}, "hu_clip must be (low, high)"),
    ({"hu_windows": [[0, 40]]}, "width > 0"),
    ({"mean": [0.5], "std": [0.0]}, "std must be 1 positive numbers"),
    ({"mean": None}, "both given or both None"),
    ({"orientation": "axial-SI"}, "orientation must be one of axial-IS"),
    ({"licence": " "}, "licence must be a non-empty string"),
    ({"colour": 1}, "unknown ['colour']"),
    ({"modality": "CXR", "input_size": [32, 32], "resize": "pad", "spacing_mm": None,
      "hu_clip": None, "hu_windows": [[400, 40]]}, "hu_windows must be empty"),
])
def test_card_validation_names_the_field(kw: dict, fragment: str) -> None:
    with pytest.raises(EncoderError) as ei:
        EncoderCard.from_dict(_card(**kw))
    assert fragment in str(ei.value) and ei.value.reason == "bad_card"


def test_a_card_must_describe_the_encoder_it_is_on() -> None:
    spec = get_encoder_spec("test-tiny-vit")
    for field, value in (("embed_dim", 17), ("input_size", (64, 64)), ("mean", (0.5, 0.5, 0.5))):
        extra = {"std": (0.2, 0.2, 0.2)} if field == "mean" else {}
        bad = replace(spec, card=replace(spec.card, **{field: value, **extra}))
        with pytest.raises(EncoderError, match=f"its card says {field}=") as ei:
            create_encoder(bad)
        assert ei.value.reason == "card_mismatch"
    ct = get_encoder_spec("test-tiny-ctpa")
    with pytest.raises(EncoderError, match="its card says hu_windows="):
        create_encoder(replace(ct, card=replace(ct.card, hu_windows=((400.0, 40.0),))))


def test_registering_trained_weights_without_a_card_is_refused(scratch_registry: None) -> None:
    bare = replace(get_encoder_spec("test-tiny-vit"), card=None)
    register_encoder("my-random", bare, description="random init: no card needed")
    with pytest.raises(EncoderError, match="loads trained weights but has no card") as ei:
        register_encoder("my-trained", replace(bare, weights="w.safetensors"), description="x")
    assert ei.value.reason == "no_card"
    register_encoder("my-lazy", lambda: replace(bare, weights="w.safetensors"), description="x")
    with pytest.raises(EncoderError, match="has no card"):
        get_encoder_spec("my-lazy")  # a factory is checked when resolved
