"""Encoder specs, the FrozenEncoder base class and the name -> spec registry.

A registry name is a string written into every artifact; the spec behind it says how the
encoder is built (family + JSON params + weights source + seed) and the fingerprint adds a
hash of the actual weight bytes, so two stores can tell whether their vectors are comparable.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from embedstore.models.domain import Modality
from embedstore.models.encoders.card import EncoderCard, check_card
from embedstore.models.errors import EncoderError, UnknownEncoderError
from torch import nn

__all__ = [
    "EncoderSpec",
    "FrozenEncoder",
    "list_encoders",
    "get_encoder_spec",
    "describe_encoder",
    "register_encoder",
    "create_encoder",
    "register_family",
    "list_families",
    "loads_weights",
    "require_card",
    "state_dict_hash",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SPEC_KEYS = ("name", "family", "params", "weights", "seed", "card")


# ---------------------------------------------------------------- JSON-able frozen params


def _freeze(value: Any, where: str) -> Any:
    """Deep-copy ``value`` into immutable JSON-shaped data (dict -> mappingproxy, list -> tuple)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EncoderError(
                f"Encoder params: {where} is {value!r}; only finite numbers are JSON-able.",
                reason="bad_spec",
            )
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k in sorted(value, key=str):
            if not isinstance(k, str):
                raise EncoderError(
                    f"Encoder params: key {k!r} in {where} is a {type(k).__name__}; "
                    "use string keys (JSON objects only have string keys).",
                    reason="bad_spec",
                )
            out[k] = _freeze(value[k], f"{where}.{k}")
        return types.MappingProxyType(out)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise EncoderError(
        f"Encoder params: {where} is a {type(value).__name__} ({value!r:.60}); params must be "
        "JSON-able (None, bool, int, float, str, lists and dicts of them).",
        reason="bad_spec",
    )


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


# ---------------------------------------------------------------- families


@dataclass(frozen=True)
class _Family:
    build: Callable[[EncoderSpec], FrozenEncoder]
    validate: Callable[[Mapping[str, Any]], None]
    description: str
    loads_weights: Callable[[EncoderSpec], bool]


_FAMILIES: dict[str, _Family] = {}


def register_family(
    family: str,
    build: Callable[[EncoderSpec], FrozenEncoder],
    *,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
    description: str = "",
    loads_weights: Callable[[EncoderSpec], bool] | None = None,
    overwrite: bool = False,
) -> None:
    """Add an encoder family: ``build(spec) -> FrozenEncoder`` and ``validate(params)``.

    ``validate`` raises :class:`EncoderError` for bad params; it runs whenever an
    :class:`EncoderSpec` of this family is built, so bad specs fail before any weights load.
    ``loads_weights(spec)`` says whether a spec takes trained weights from somewhere (default:
    ``spec.weights is not None``); such a spec needs a card (see :func:`register_encoder`).
    """
    if family in _FAMILIES and not overwrite:
        raise EncoderError(
            f"Encoder family {family!r} is already registered; pass overwrite=True to replace it.",
            reason="duplicate_family",
        )
    _FAMILIES[family] = _Family(build, validate or (lambda params: None), description,
                                loads_weights or (lambda spec: spec.weights is not None))


def list_families() -> list[str]:
    """Names of the registered encoder families, sorted."""
    return sorted(_FAMILIES)


# ---------------------------------------------------------------- spec


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one frozen encoder; validated when built, round-tripped through JSON.

    ``params`` is family-specific and deep-frozen (read it like a dict); ``weights`` is a
    weights source (a local file, or what the family documents) or ``None`` for a random
    init drawn deterministically from ``seed``; ``card`` says what the encoder expects of its
    input (:class:`EncoderCard`; a dict is parsed) and is covered by the fingerprint.
    """

    name: str
    family: str
    params: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    seed: int = 0
    card: EncoderCard | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise EncoderError(
                f"Encoder name {self.name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (it becomes part of store keys and file names).",
                reason="bad_spec",
            )
        if self.family not in _FAMILIES:
            raise EncoderError(
                f"Encoder {self.name!r}: unknown family {self.family!r}. "
                f"Available families: {', '.join(list_families())}.",
                reason="unknown_family",
            )
        if not isinstance(self.params, Mapping):
            raise EncoderError(
                f"Encoder {self.name!r}: params must be a mapping, got {type(self.params).__name__}.",
                reason="bad_spec",
            )
        object.__setattr__(self, "params", _freeze(self.params, "params"))
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise EncoderError(
                f"Encoder {self.name!r}: weights must be a non-empty string or None, "
                f"got {self.weights!r}.",
                reason="bad_spec",
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise EncoderError(
                f"Encoder {self.name!r}: seed must be an int in [0, 2**63), got {self.seed!r}.",
                reason="bad_spec",
            )
        if isinstance(self.card, Mapping):
            object.__setattr__(self, "card", EncoderCard.from_dict(self.card))
        elif self.card is not None and not isinstance(self.card, EncoderCard):
            raise EncoderError(
                f"Encoder {self.name!r}: card must be an EncoderCard, a dict of its fields or "
                f"None, got {type(self.card).__name__}.",
                reason="bad_spec",
            )
        _FAMILIES[self.family].validate(self.params)

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __reduce__(self) -> tuple[Any, ...]:
        # mappingproxy params do not pickle; rebuild (and re-validate) from the plain dict
        return (EncoderSpec.from_dict, (self.to_dict(),))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able dict (a deep copy; mutating it does not touch the spec). ``card``
        appears only when the spec has one."""
        d = {
            "name": self.name,
            "family": self.family,
            "params": _thaw(self.params),
            "weights": self.weights,
            "seed": self.seed,
        }
        if self.card is not None:
            d["card"] = self.card.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderSpec:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise :class:`EncoderError`."""
        if not isinstance(d, Mapping):
            raise EncoderError(
                f"An encoder spec must be a JSON object, got {type(d).__name__}.", reason="bad_spec"
            )
        unknown = sorted(set(d) - set(_SPEC_KEYS))
        missing = [k for k in ("name", "family") if k not in d]
        if unknown or missing:
            raise EncoderError(
                f"Encoder spec keys: unknown {unknown}, missing {missing}. "
                f"Valid keys: {', '.join(_SPEC_KEYS)}.",
                reason="bad_spec",
            )
        return cls(
            name=d["name"],
            family=d["family"],
            params=d.get("params") or {},
            weights=d.get("weights"),
            seed=d.get("seed", 0),
            card=d.get("card"),
        )

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): equal specs give equal strings."""
        return _canonical(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> EncoderSpec:
        """Parse :meth:`to_json` output (or any JSON object with the spec's keys)."""
        try:
            d = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise EncoderError(f"Encoder spec is not valid JSON: {e}.", reason="bad_spec") from e
        return cls.from_dict(d)

    def identity_dict(self) -> dict[str, Any]:
        """What the fingerprint covers: the spec (card included) without the weights *location*
        (the weight bytes are hashed instead, so moving a checkpoint keeps the fingerprint, and
        no path, which may carry identifiers, is written into artifacts)."""
        d = self.to_dict()
        d["weights"] = None if self.weights is None else "<hashed>"
        return d

    def identity_json(self) -> str:
        """Canonical JSON of :meth:`identity_dict`."""
        return _canonical(self.identity_dict())


# ---------------------------------------------------------------- encoder base class


def state_dict_hash(module: nn.Module) -> str:
    """sha256 hex over a module's state dict: sorted keys, each with dtype, shape and raw bytes."""
    h = hashlib.sha256()
    sd = module.state_dict()
    for k in sorted(sd):
        t = sd[k]
        if not isinstance(t, torch.Tensor):
            continue  # TorchScript state dicts may carry non-tensor attributes
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FrozenEncoder(nn.Module):
    """A frozen (eval mode, no grad) encoder: images ``(B,1,H,W)`` in [0,1] or CT volumes
    ``(B,S,H,W)`` in Hounsfield units -> embeddings ``(B, embed_dim)`` float32.

    Subclasses set ``embed_dim``, ``input_kind`` (``"image"`` or ``"volume"``) and
    ``input_size`` (``(H, W)`` or the nominal ``(S, H, W)`` preprocessing should produce).
    ``train()`` is a no-op that keeps the module in eval mode.
    """

    def __init__(self, spec: EncoderSpec, *, embed_dim: int, input_kind: str,
                 input_size: tuple[int, ...]):
        super().__init__()
        if input_kind not in ("image", "volume"):
            raise EncoderError(
                f"Encoder {spec.name!r}: input_kind {input_kind!r} is invalid; use 'image' or 'volume'.",
                reason="bad_spec",
            )
        self.spec = spec
        self.embed_dim = int(embed_dim)
        self.input_kind = input_kind
        self.input_size = tuple(int(s) for s in input_size)
        self._hash_cache: tuple[tuple[Any, ...], str] | None = None

    # -- frozen behaviour -------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenEncoder:
        # Set the flag directly: exported programs (torch.export) refuse .eval()/.train().
        for m in self.modules():
            m.training = False
        return self

    def _freeze(self) -> FrozenEncoder:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    # -- interface ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Per-slice embeddings ``(B, S', D)``; only volume encoders that keep them have it."""
        raise EncoderError(
            f"Encoder {self.spec.name!r} ({self.spec.family}, {self.input_kind} input) has no "
            "per-slice tokens; use a volume25d encoder.",
            reason="no_tokens",
        )

    @property
    def device(self) -> torch.device:
        for t in self.state_dict().values():
            if isinstance(t, torch.Tensor):
                return t.device
        return torch.device("cpu")

    # -- identity -----------------------------------------------------------------------
    def weights_hash(self) -> str:
        """sha256 hex over this encoder's state dict (sorted keys; dtype, shape and bytes)."""
        # Cached per tensor version: an in-place weight edit bumps ``_version`` and rehashes.
        sd = self.state_dict(keep_vars=True)
        stamp = tuple(
            (k, v.data_ptr(), v._version) if isinstance(v, torch.Tensor) else (k, repr(v))
            for k, v in sorted(sd.items())
        )
        if self._hash_cache is None or self._hash_cache[0] != stamp:
            self._hash_cache = (stamp, state_dict_hash(self))
        return self._hash_cache[1]

    def fingerprint(self) -> str:
        """sha256 hex of the spec's identity JSON (card included, weights location excluded)
        + the weights hash."""
        payload = self.spec.identity_json() + "\n" + self.weights_hash()
        return hashlib.sha256(payload.encode()).hexdigest()

    def card_facts(self) -> dict[str, Any]:
        """What a card must agree with (:func:`check_card`): input kind and size and output dim;
        subclasses add the normalisation (``mean``/``std``) and CT windows (``hu_windows``)
        they apply themselves."""
        return {"input_kind": self.input_kind, "input_size": self.input_size,
                "embed_dim": self.embed_dim}

    def describe(self) -> dict[str, Any]:
        """JSON-able summary to write into artifacts: identity spec (no weights location),
        card, hashes, shapes. The cache identity (``embedstore.identity``) is built from it."""
        return {
            "name": self.spec.name,
            "family": self.spec.family,
            "spec": self.spec.identity_dict(),
            "card": None if self.spec.card is None else self.spec.card.to_dict(),
            "weights_hash": self.weights_hash(),
            "fingerprint": self.fingerprint(),
            "embed_dim": self.embed_dim,
            "input_kind": self.input_kind,
            "input_size": list(self.input_size),
        }

    def extra_repr(self) -> str:
        return (f"name={self.spec.name!r}, family={self.spec.family!r}, embed_dim={self.embed_dim}, "
                f"input_kind={self.input_kind!r}, input_size={self.input_size}")


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Entry:
    make: Callable[[], EncoderSpec]
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_encoder(
    name: str,
    spec_or_factory: EncoderSpec | Callable[[], EncoderSpec],
    *,
    description: str,
    overwrite: bool = False,
) -> None:
    """Register ``name`` -> spec (or a zero-argument callable returning one, resolved lazily).

    The spec is stored under ``name`` (its ``name`` field is rebound to it). Re-registering an
    existing name raises :class:`EncoderError` unless ``overwrite=True``. A spec that loads
    trained weights (:func:`loads_weights`) must carry a card: extraction builds the
    preprocessing from it, and a pretrained encoder never gets a silent default.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise EncoderError(
            f"Encoder name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-'.",
            reason="bad_spec",
        )
    if name in _REGISTRY and not overwrite:
        raise EncoderError(
            f"Encoder {name!r} is already registered; pick another name or pass overwrite=True.",
            reason="duplicate_encoder",
        )
    if isinstance(spec_or_factory, EncoderSpec):
        spec = replace(spec_or_factory, name=name)
        require_card(spec)

        def make() -> EncoderSpec:
            return spec
    elif callable(spec_or_factory):
        factory = spec_or_factory

        def make() -> EncoderSpec:
            s = factory()
            if not isinstance(s, EncoderSpec):
                raise EncoderError(
                    f"The factory registered for encoder {name!r} returned "
                    f"{type(s).__name__}, not an EncoderSpec.",
                    reason="bad_spec",
                )
            s = replace(s, name=name) if s.name != name else s
            require_card(s)
            return s
    else:
        raise EncoderError(
            f"register_encoder({name!r}, ...) needs an EncoderSpec or a callable returning one, "
            f"got {type(spec_or_factory).__name__}.",
            reason="bad_spec",
        )
    _REGISTRY[name] = _Entry(make, description)


def loads_weights(spec: EncoderSpec) -> bool:
    """Whether ``spec`` takes trained weights (a file, a tag, a hub id) rather than a seeded
    random init; what counts is the family's ``loads_weights``."""
    return bool(_FAMILIES[spec.family].loads_weights(spec))


def require_card(spec: EncoderSpec) -> None:
    """Raise :class:`EncoderError` (``no_card``) when ``spec`` loads weights but has no card."""
    if spec.card is None and loads_weights(spec):
        raise EncoderError(
            f"Encoder {spec.name!r} loads trained weights but has no card, so embedstore cannot "
            "know the preprocessing it was trained with (input size, resize, HU window, "
            "normalisation). Give it one: register_encoder(..., EncoderSpec(..., "
            "card=EncoderCard(...))), or `--card FILE` on the command line (docs/ENCODERS.md).",
            reason="no_card",
        )


def list_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownEncoderError(
            f"Unknown encoder {name!r}. Available: {', '.join(list_encoders())}. "
            "Register your own with register_encoder(name, EncoderSpec(...), description=...).",
        ) from None


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec registered under ``name``; :class:`UnknownEncoderError` lists the choices."""
    return _entry(name).make()


def describe_encoder(name: str) -> str:
    """The one-line description registered with ``name``."""
    return _entry(name).description


def create_encoder(
    name_or_spec: str | EncoderSpec,
    *,
    weights: str | None = None,
    device: str | torch.device = "cpu",
) -> FrozenEncoder:
    """Build a frozen encoder from a registry name or a spec, in eval mode with no grads.

    ``weights`` (a path or a family-specific source) overrides ``spec.weights``; it is recorded
    in the returned encoder's spec, and its bytes enter :meth:`FrozenEncoder.fingerprint`.
    A spec's card is checked against the built encoder (:func:`check_card`).
    """
    if isinstance(name_or_spec, EncoderSpec):
        spec = name_or_spec
    elif isinstance(name_or_spec, str):
        spec = get_encoder_spec(name_or_spec)
    else:
        raise EncoderError(
            f"create_encoder takes a registry name or an EncoderSpec, got "
            f"{type(name_or_spec).__name__}.",
            reason="bad_spec",
        )
    if weights is not None:
        spec = replace(spec, weights=str(weights))
    encoder = _FAMILIES[spec.family].build(spec)
    if not isinstance(encoder, FrozenEncoder):
        raise EncoderError(
            f"Family {spec.family!r} built a {type(encoder).__name__}, not a FrozenEncoder.",
            reason="bad_family",
        )
    if spec.card is not None:
        check_card(spec.card, encoder.card_facts(), spec.name)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EncoderError(
            f"Device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.",
            reason="bad_device",
        ) from e
    try:
        encoder = encoder.to(dev)
    except (RuntimeError, AssertionError) as e:  # e.g. "Torch not compiled with CUDA enabled"
        raise EncoderError(
            f"Cannot move encoder {spec.name!r} to device {str(dev)!r} ({e}). Use device='cpu' "
            "or a device this machine has.",
            reason="device_unavailable",
        ) from e
    return encoder._freeze()


# ---------------------------------------------------------------- built-in encoders
# All random-init (NOT pretrained): frozen random features are enough for the synthetic demo
# and the tests, and need no network. Factories defer validation until the families exist.
# Their cards reproduce the preprocessing extraction used before cards existed: radiographs
# padded to the tower's size, CT fitted to input_size after clipping to [-1024, 3071] HU.

#: open_clip's OPENAI_DATASET_MEAN / _STD, which the es-* towers normalise with.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DEMO_WINDOWS = ((700.0, 100.0), (1500.0, -600.0), (400.0, -800.0))
_LICENCE = "Apache-2.0 (embedstore); random init, no trained weights"


def _card(modality: str, size: tuple[int, ...], dim: int, arch: str,
          windows: tuple[tuple[float, float], ...] = ()) -> EncoderCard:
    ct = modality == "CTPA"
    return EncoderCard(
        modality=Modality(modality), input_size=size, embed_dim=dim,
        resize="fit" if ct else "pad", hu_clip=(-1024.0, 3071.0) if ct else None,
        hu_windows=windows, mean=_CLIP_MEAN, std=_CLIP_STD, pretrained=False,
        licence=_LICENCE,
        source=f"random init from seed 0 (open_clip config {arch} in models/encoders/model_configs)",
    )


def _builtin(name: str, family: str, params: dict[str, Any], description: str,
             card: EncoderCard) -> None:
    register_encoder(name, lambda: EncoderSpec(name=name, family=family, params=params, seed=0,
                                                card=card),
                     description=description)


def _tiny_vit() -> dict[str, Any]:
    return {"family": "open_clip", "params": {"arch": "es-vit-tiny-32"}}


_builtin("demo-cxr", "open_clip", {"arch": "es-vit-cxr-w256"},
         "random-init ViT (2 layers, width 256, 128 px, patch 16, avg pool, 512-d) for radiographs; "
         "not pretrained",
         _card("CXR", (128, 128), 512, "es-vit-cxr-w256"))
_builtin("demo-ctpa", "volume25d",
         {"inner": {"family": "open_clip", "params": {"arch": "es-vit-ct-128"}},
          "windows": [list(w) for w in ((700, 100), (1500, -600), (400, -800))],
          "stride": 2, "slab": 1, "pool": "max", "chunk": 64, "input_size": [64, 128, 128]},
         "2.5D CT encoder: random-init ViT (2 layers, width 64, 128 px, patch 16, avg pool) on "
         "3 CT windows, every 2nd slice, max-pooled; not pretrained",
         _card("CTPA", (64, 128, 128), 128, "es-vit-ct-128", _DEMO_WINDOWS))
_builtin("test-tiny-vit", "open_clip", {"arch": "es-vit-tiny-32"},
         "minimal random-init ViT (1 layer, width 32, 32 px) for fast tests",
         _card("CXR", (32, 32), 16, "es-vit-tiny-32"))
_builtin("test-tiny-resnet", "open_clip", {"arch": "es-rn-tiny-64"},
         "minimal random-init ModifiedResNet (64 px) with the seeded bn3 / He re-init",
         _card("CXR", (64, 64), 32, "es-rn-tiny-64"))
_builtin("test-tiny-ctpa", "volume25d",
         {"inner": _tiny_vit(), "stride": 2, "slab": 1, "pool": "meanmax", "chunk": 5,
          "input_size": [8, 32, 32]},
         "minimal 2.5D CT encoder over test-tiny-vit (meanmax pooling) for fast tests",
         _card("CTPA", (8, 32, 32), 32, "es-vit-tiny-32", _DEMO_WINDOWS))
