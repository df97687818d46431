"""``open_clip`` family: the image tower of any open_clip architecture, for radiographs.

Params::

    arch      open_clip model name (``open_clip.list_models()``, including the tiny ``es-*``
              configs in model_configs/), or ``"hf-hub:org/repo"`` / ``"local-dir:/path"``
              (config *and* weights from there)
    init      "auto" (default) or "open_clip": only used for a random init (no weights).
              "auto" re-initialises ModifiedResNet towers (see ``_init_resnet``); ViTs keep
              open_clip's construction-time init (torch defaults; ``init_parameters`` is a no-op)
    vision_overrides   optional dict merged into the arch's ``vision_cfg`` (e.g. image_size,
              pool_type) before building

``spec.weights``: None (seeded random init), a local file (open_clip checkpoint ``.pt``/
``.pth``/``.bin``, or a ``.safetensors`` state dict of the visual tower or of the full
model), or an open_clip pretrained tag of ``arch`` (needs network on first use).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from embedstore.models.encoders.registry import EncoderSpec, FrozenEncoder, _thaw, register_family
from embedstore.models.errors import EncoderError
from torch import nn

__all__ = [
    "OpenClipImageEncoder",
    "MODEL_CONFIG_DIR",
    "TINY_CONFIGS",
    "load_state_dict_file",
    "prepare_image",
    "check_image_batch",
]

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_SCHEMAS = ("hf-hub:", "local-dir:")
_INITS = ("auto", "open_clip")


def _register_model_configs() -> tuple[str, ...]:
    """Register the tiny configs with open_clip and check each one really landed.

    ``add_model_config`` silently skips JSON lacking embed_dim / vision_cfg / text_cfg, so a
    malformed file would only surface much later as "model config not found".
    """
    paths = sorted(MODEL_CONFIG_DIR.glob("*.json"))
    names = tuple(p.stem for p in paths)
    if names and not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    missing = [n for n in names if n not in open_clip.list_models()]
    if missing:
        raise EncoderError(
            f"open_clip did not register the model configs {missing} from {MODEL_CONFIG_DIR}: each "
            "JSON needs 'embed_dim', 'vision_cfg' and 'text_cfg' (open_clip skips it silently).",
            reason="bad_model_config",
        )
    return names


#: Names of the tiny open_clip architectures shipped in model_configs/.
TINY_CONFIGS: tuple[str, ...] = _register_model_configs()


class _DropOpenClipNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    # open_clip logs "No pretrained weights loaded ..." on the root logger for every random
    # init; that is the normal case here, so keep it off the user's terminal.
    flt = _DropOpenClipNoise()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


# ---------------------------------------------------------------- weights files


def load_state_dict_file(path: str | os.PathLike[str], *, what: str) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a torch checkpoint (``weights_only=True``) as a flat
    state dict: unwraps ``{"state_dict": ...}`` and strips DataParallel's ``module.`` prefix."""
    p = Path(path)
    if not p.is_file():
        raise EncoderError(
            f"{what}: weights file {str(p)!r} does not exist. Pass an existing local file "
            "(.safetensors, .pt, .pth or .bin).",
            reason="weights_not_found",
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / pickle raise many types for a bad file
        raise EncoderError(
            f"{what}: cannot read weights file {str(p)!r} ({type(e).__name__}: {e}). Expected a "
            "safetensors file or a torch checkpoint saved with plain tensors (weights_only).",
            reason="weights_unreadable",
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        raise EncoderError(
            f"{what}: {str(p)!r} holds no state dict of tensors (got {type(obj).__name__}). "
            "Save model.state_dict() (or {'state_dict': ...}).",
            reason="weights_unreadable",
        )
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _visual_state_dict(sd: dict[str, torch.Tensor], visual: nn.Module) -> dict[str, torch.Tensor]:
    """Keep the image tower's part of a full-model (``visual.*``) state dict."""
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    # A checkpoint trained at another resolution: interpolate the ViT position grid like open_clip.
    holder = nn.Module()
    holder.visual = visual
    full = {"visual." + k: v for k, v in sd.items()}
    open_clip.model.resize_pos_embed(full, holder)
    return {k[len("visual."):]: v for k, v in full.items()}


def _load_visual(visual: nn.Module, path: str, spec: EncoderSpec) -> None:
    sd = _visual_state_dict(load_state_dict_file(path, what=f"Encoder {spec.name!r}"), visual)
    own = visual.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        detail = "; ".join(
            f"{label} {len(keys)}: {few(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                ("shape mismatch", shapes))
            if keys
        )
        raise EncoderError(
            f"Encoder {spec.name!r}: weights file {path!r} does not fit arch "
            f"{spec.params['arch']!r} ({detail}). Use the arch the checkpoint was trained with, "
            "or a visual-tower / full open_clip state dict of this arch.",
            reason="weights_mismatch",
        )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k].to(t.dtype))


# ---------------------------------------------------------------- random init fixes


def _init_resnet(visual: nn.Module, gen: torch.Generator) -> None:
    """Seeded re-init for a random ModifiedResNet tower.

    open_clip zeroes every ``bn3.weight`` (a training trick), which makes each residual branch
    output exactly zero in a frozen random network; torch's default conv init then shrinks the
    signal by ~sqrt(3) per conv, so outputs are tiny. We draw convs from He-normal
    (fan_out, ReLU) and set ``bn3.weight = 1`` so every branch contributes.
    """
    with torch.no_grad():
        for m in visual.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=gen)
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            for name, p in layer.named_parameters():
                if name.endswith("bn3.weight"):
                    p.fill_(1.0)


# ---------------------------------------------------------------- the encoder


def prepare_image(
    x: torch.Tensor, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """(B,1|3,H,W) in [0,1] -> (B,3,*size) normalised: resize (antialiased bilinear) if needed,
    repeat grey to 3 channels, subtract mean / divide std."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                          antialias=x.shape[-2] > size[0] or x.shape[-1] > size[1])
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    return (x - mean.to(x.dtype)) / std.to(x.dtype)


def check_image_batch(x: torch.Tensor, name: str) -> None:
    """Raise :class:`EncoderError` unless ``x`` is a float (B, 1|3, H, W) tensor."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise EncoderError(
            f"Encoder {name!r} takes images (B, 1, H, W) in [0, 1] (or (B, 3, H, W)); got "
            f"{shape}. Add the channel axis with x[:, None].",
            reason="bad_input",
        )
    if not x.is_floating_point():
        raise EncoderError(
            f"Encoder {name!r} takes float images in [0, 1]; got dtype {x.dtype}. "
            "Scale integer pixels to [0, 1] first (preprocess does this).",
            reason="bad_input",
        )


class OpenClipImageEncoder(FrozenEncoder):
    """An open_clip image tower behind the image contract: (B,1,H,W) in [0,1] -> (B,D)."""

    def __init__(self, spec: EncoderSpec, visual: nn.Module, embed_dim: int,
                 size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(spec, embed_dim=embed_dim, input_kind="image", input_size=size)
        self.visual = visual
        # Persistent buffers: the normalisation is part of what the weights hash covers.
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self._norm = (tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def card_facts(self) -> dict[str, Any]:
        return {**super().card_facts(), "mean": self._norm[0], "std": self._norm[1]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.spec.name)
        x = prepare_image(x, self.input_size, self.pixel_mean, self.pixel_std)  # (B, 3, h, w)
        y = self.visual(x)
        if isinstance(y, tuple):  # output_tokens=True towers return (pooled, tokens)
            y = y[0]
        return y.float()  # (B, D)


def _validate(params: Mapping[str, Any]) -> None:
    unknown = sorted(set(params) - {"arch", "init", "vision_overrides"})
    if unknown:
        raise EncoderError(
            f"open_clip encoder: unknown params {unknown}. Valid: arch, init, vision_overrides.",
            reason="bad_spec",
        )
    arch = params.get("arch")
    if not isinstance(arch, str) or not arch:
        raise EncoderError(
            "open_clip encoder: params['arch'] is required, e.g. 'es-vit-tiny-32' or 'ViT-B-16' "
            "(see open_clip.list_models()).",
            reason="bad_spec",
        )
    if not arch.startswith(_SCHEMAS) and arch not in open_clip.list_models():
        raise EncoderError(
            f"open_clip encoder: unknown arch {arch!r}. Available: "
            f"{', '.join(open_clip.list_models())}; or 'hf-hub:org/repo' / 'local-dir:/path'.",
            reason="bad_spec",
        )
    if params.get("init", "auto") not in _INITS:
        raise EncoderError(
            f"open_clip encoder: init {params.get('init')!r} is invalid. Valid: {', '.join(_INITS)}.",
            reason="bad_spec",
        )
    vo = params.get("vision_overrides")
    if vo is not None and not isinstance(vo, Mapping):
        raise EncoderError(
            f"open_clip encoder: vision_overrides must be a dict of vision_cfg fields, got {vo!r}.",
            reason="bad_spec",
        )


def _build(spec: EncoderSpec) -> OpenClipImageEncoder:
    arch: str = spec.params["arch"]
    weights = spec.weights
    kwargs: dict[str, Any] = {}
    overrides = spec.params.get("vision_overrides")
    if overrides:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise EncoderError(
                f"Encoder {spec.name!r}: no config for arch {arch!r} to apply vision_overrides to.",
                reason="bad_spec",
            )
        # open_clip's constructors take plain dicts / lists, not our frozen params
        kwargs["vision_cfg"] = {**cfg["vision_cfg"], **_thaw(overrides)}

    pretrained: str | None = None
    weights_file: str | None = None
    if weights is not None:
        if os.path.isfile(weights):
            weights_file = weights
        elif not arch.startswith(_SCHEMAS) and weights in open_clip.list_pretrained_tags_by_model(arch):
            pretrained = weights  # downloads on first use: needs network
        else:
            tags = open_clip.list_pretrained_tags_by_model(arch) if not arch.startswith(_SCHEMAS) else []
            raise EncoderError(
                f"Encoder {spec.name!r}: weights {weights!r} is neither an existing file nor a "
                f"pretrained tag of arch {arch!r} (tags: {', '.join(tags) or 'none'}). Pass a local "
                ".safetensors/.pt file, or set arch='hf-hub:org/repo' for hub weights.",
                reason="weights_not_found",
            )

    # Fork the CPU RNG so a random init is a function of spec.seed and leaves global state alone.
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.default_generator.manual_seed(spec.seed)
        try:
            model = open_clip.create_model(arch, pretrained=pretrained, **kwargs)
        except (RuntimeError, ValueError, OSError, TypeError, KeyError) as e:
            hint = ("it needs network on first use; download the weights where you have network "
                    "and pass the local file instead" if pretrained or arch.startswith("hf-hub:")
                    else "check params['arch'] and vision_overrides")
            raise EncoderError(
                f"Encoder {spec.name!r}: open_clip could not build {arch!r} "
                f"({type(e).__name__}: {e}); {hint}.",
                reason="build_failed",
            ) from e
        visual = model.visual
        random_init = weights is None and not arch.startswith(_SCHEMAS)
        if random_init and spec.params.get("init", "auto") == "auto":
            if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
                gen = torch.Generator().manual_seed(spec.seed)
                _init_resnet(visual, gen)
    del model  # the text tower is never used

    if weights_file is not None:
        _load_visual(visual, weights_file, spec)

    pp = getattr(visual, "preprocess_cfg", None) or {}
    size = pp.get("size", getattr(visual, "image_size", 224))
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean = tuple(pp.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(pp.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    embed_dim = int(getattr(visual, "output_dim", 0) or _probe_dim(visual, size))
    return OpenClipImageEncoder(spec, visual.float(), embed_dim, size, mean, std)


def _probe_dim(visual: nn.Module, size: tuple[int, int]) -> int:
    with torch.no_grad():
        y = visual.eval()(torch.zeros(1, 3, *size))
    return int((y[0] if isinstance(y, tuple) else y).shape[-1])


register_family(
    "open_clip",
    _build,
    validate=_validate,
    description="image tower of an open_clip architecture (random-init, local file, or hub)",
    loads_weights=lambda spec: spec.weights is not None or str(spec.params["arch"]).startswith(
        _SCHEMAS),  # hf-hub: / local-dir: archs bring their own weights
)
