"""``hf`` family: the vision backbone of a Hugging Face ``transformers`` checkpoint (ViT, DINOv2,
Swin ... anything ``AutoModel`` builds that takes ``pixel_values``), for radiographs.

Params::

    config      the model's config as a dict (``config.json`` without bookkeeping keys): the
                architecture is part of the spec, so it is part of the fingerprint
    pool        "auto" (default: ``pooler_output`` when the model returns one, else the CLS
                token) | "pooler" | "cls" (``last_hidden_state[:, 0]``) | "mean" (of all tokens)
    image_size  [H, W] the model takes (images of another size are resized to it)
    mean, std   per-channel normalisation of the [0, 1] input, or null for none

``spec.weights``: a local directory written by ``save_pretrained`` (read with
``local_files_only=True``), a hub id (only where you have network; ``HF_HUB_OFFLINE`` is
respected), or None for a random init from ``spec.seed`` and ``config``. Every weight of the
model must be in the checkpoint (a missing one would be randomly initialised: refused), except an
unused pooler, which is then dropped. :func:`hf_spec` builds a spec and its card from a
directory (config + image processor config). ``transformers`` is imported only when needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from embedstore.models.domain import Modality
from embedstore.models.encoders.card import EncoderCard
from embedstore.models.encoders.registry import EncoderSpec, FrozenEncoder, _thaw, register_family
from embedstore.models.errors import EncoderError
from torch import nn

__all__ = ["HFImageEncoder", "POOLS", "hf_spec", "hf_config_dict"]

POOLS = ("auto", "pooler", "cls", "mean")
_PARAMS = ("config", "pool", "image_size", "mean", "std")
# config.json keys that record where or with what a checkpoint was saved, not what it is
_BOOKKEEPING = ("_name_or_path", "transformers_version", "_commit_hash", "architectures",
                "dtype", "torch_dtype", "id2label", "label2id", "_attn_implementation_autoset")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - a dependency of embedstore
        raise EncoderError(
            "The hf encoder family needs the `transformers` package: pip install transformers.",
            reason="missing_dependency",
        ) from e
    return transformers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # transformers prints a progress bar and a load report for every from_pretrained
    tlog = _transformers().utils.logging
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A ``PretrainedConfig`` as the JSON-able dict an ``hf`` spec stores (bookkeeping removed;
    the full dict, not the diff against defaults, so a changed default is a new identity)."""
    d = json.loads(config.to_json_string(use_diff=False))
    return {k: v for k, v in d.items() if k not in _BOOKKEEPING}


class HFImageEncoder(FrozenEncoder):
    """A transformers vision model behind the image contract: (B,1,H,W) in [0,1] -> (B,D)."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, embed_dim: int,
                 size: tuple[int, int], channels: int, mean: tuple[float, ...] | None,
                 std: tuple[float, ...] | None, pool: str):
        super().__init__(spec, embed_dim=embed_dim, input_kind="image", input_size=size)
        self.model = model
        self.channels = channels
        self.pool = pool
        self._norm = (mean, std)
        m = mean if mean is not None else (0.0,) * channels
        s = std if std is not None else (1.0,) * channels
        self.register_buffer("pixel_mean", torch.tensor(m, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1))

    def card_facts(self) -> dict[str, Any]:
        return {**super().card_facts(), "mean": self._norm[0], "std": self._norm[1]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from embedstore.models.encoders.openclip import check_image_batch

        check_image_batch(x, self.spec.name)
        if tuple(x.shape[-2:]) != self.input_size:
            x = nn.functional.interpolate(x, size=self.input_size, mode="bilinear",
                                          align_corners=False, antialias=True)
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)  # (B, C, H, W) grey repeated
        x = (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if self.pool == "pooler" or (self.pool == "auto" and pooled is not None):
            if pooled is None:
                raise EncoderError(
                    f"Encoder {self.spec.name!r}: pool 'pooler' but the model returns no "
                    "pooler_output; use pool 'cls' or 'mean'.", reason="bad_spec")
            y = pooled
        elif self.pool == "mean":
            y = out.last_hidden_state.mean(1)  # (B, T, D) -> (B, D)
        else:
            y = out.last_hidden_state[:, 0]  # (B, D) the CLS token
        y = y.reshape(y.shape[0], -1)
        if y.shape[1] != self.embed_dim:
            raise EncoderError(
                f"Encoder {self.spec.name!r} returned {y.shape[1]}-d vectors but its config says "
                f"{self.embed_dim}; set pool explicitly.", reason="bad_spec")
        return y.float()


def _validate(params: Mapping[str, Any]) -> None:
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise EncoderError(f"hf encoder: unknown params {unknown}. Valid: {', '.join(_PARAMS)}.",
                           reason="bad_spec")
    cfg = params.get("config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model_type"), str):
        raise EncoderError(
            "hf encoder: params['config'] must be the model's config dict with a 'model_type' "
            "(build the spec with hf_spec(directory)).", reason="bad_spec")
    if params.get("pool", "auto") not in POOLS:
        raise EncoderError(f"hf encoder: pool {params.get('pool')!r} is invalid. Valid: "
                           f"{', '.join(POOLS)}.", reason="bad_spec")
    size = params.get("image_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise EncoderError(f"hf encoder: image_size must be [H, W], got {_thaw(size)!r}.",
                           reason="bad_spec")
    mean, std = params.get("mean"), params.get("std")
    channels = int(cfg.get("num_channels", 3))
    if (mean is None) != (std is None):
        raise EncoderError("hf encoder: give both mean and std, or neither.", reason="bad_spec")
    if mean is not None and not (
            len(mean) == channels == len(std)
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*mean, *std))
            and all(v > 0 for v in std)):
        raise EncoderError(
            f"hf encoder: mean/std must be {channels} finite numbers each (std > 0), got "
            f"{_thaw(mean)!r} / {_thaw(std)!r}.", reason="bad_spec")


def _build(spec: EncoderSpec) -> HFImageEncoder:
    tf = _transformers()
    p = spec.params
    cfg = _thaw(p["config"])
    pool = str(p.get("pool", "auto"))
    with _quiet():
        try:
            config = tf.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise EncoderError(f"Encoder {spec.name!r}: transformers cannot build this config "
                               f"({type(e).__name__}: {e}).", reason="bad_spec") from e
        if spec.weights is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                model = tf.AutoModel.from_config(config)
        else:
            src = spec.weights
            local = Path(src).is_dir()
            try:
                model, info = tf.AutoModel.from_pretrained(
                    src, config=config, local_files_only=local or _offline(),
                    output_loading_info=True)
            except (OSError, ValueError) as e:
                hint = ("a directory written by save_pretrained with its weights" if local else
                        "a hub id needs network (or its files in the local cache with "
                        "HF_HUB_OFFLINE=1); otherwise pass a local directory")
                raise EncoderError(
                    f"Encoder {spec.name!r}: cannot load weights from {Path(src).name!r} "
                    f"({type(e).__name__}: {e}); expected {hint}.",
                    reason="weights_not_found") from e
            missing = sorted(info.get("missing_keys") or ())
            bad = sorted(info.get("mismatched_keys") or ())
            if missing and all(k.startswith("pooler.") for k in missing) and pool != "pooler":
                model.pooler = None  # not in the checkpoint and not used: drop its random init
                missing = []
            if missing or bad:
                raise EncoderError(
                    f"Encoder {spec.name!r}: the checkpoint lacks {len(missing)} weights of this "
                    f"architecture ({', '.join(missing[:4])}) and mismatches {len(bad)}; they "
                    "would be randomly initialised. Save the whole backbone (AutoModel) with "
                    "save_pretrained.", reason="weights_mismatch")
    model = model.float()
    size = (int(p["image_size"][0]), int(p["image_size"][1]))
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    if hidden <= 0:
        sizes = getattr(config, "hidden_sizes", None)  # conv backbones (ResNet, ConvNeXt)
        hidden = int(sizes[-1]) if sizes else 0
    pooler = getattr(model, "pooler", None)
    if pool in ("auto", "pooler") and isinstance(pooler, nn.Module) and any(
            True for _ in pooler.parameters()):
        hidden = int(getattr(config, "pooler_output_size", None) or hidden)
    if hidden <= 0:
        raise EncoderError(f"Encoder {spec.name!r}: no hidden_size in its config to read the "
                           "embedding width from.", reason="bad_spec")
    mean = None if p.get("mean") is None else tuple(float(v) for v in p["mean"])
    std = None if p.get("std") is None else tuple(float(v) for v in p["std"])
    channels = int(getattr(config, "num_channels", 3))
    return HFImageEncoder(spec, model, hidden, size, channels, mean, std, pool)


register_family(
    "hf",
    _build,
    validate=_validate,
    description="vision backbone of a transformers checkpoint (save_pretrained dir or hub id)",
)


# ---------------------------------------------------------------- spec + card from a directory


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def _size_of(proc: Any) -> tuple[tuple[int, int] | None, str | None, dict[str, str]]:
    """(input size, resize mode, problems) from an image processor's resize/crop settings."""
    problems: dict[str, str] = {}
    size = getattr(proc, "size", None)
    get = (lambda k: size.get(k)) if isinstance(size, Mapping) else (
        lambda k: getattr(size, k, None))
    if not getattr(proc, "do_resize", True) or size is None:
        problems["resize"] = "the image processor does not resize"
        return None, None, problems
    h, w, short = get("height"), get("width"), get("shortest_edge")
    crop = getattr(proc, "crop_size", None)
    cget = (lambda k: crop.get(k)) if isinstance(crop, Mapping) else (
        lambda k: getattr(crop, k, None))
    if h and w and not getattr(proc, "do_center_crop", False):
        return (int(h), int(w)), "stretch", problems
    if short and getattr(proc, "do_center_crop", False) and crop is not None and (
            cget("height") == cget("width") == short):
        return (int(short), int(short)), "crop", problems
    problems["resize"] = (f"the image processor's resize/crop (size {size}, crop {crop}) is "
                          "none of pad / stretch / crop to the same size")
    problems["input_size"] = problems["resize"]
    return None, None, problems


def hf_spec(
    source: str | os.PathLike[str],
    *,
    card_overrides: Mapping[str, Any] | None = None,
    pool: str = "auto",
) -> EncoderSpec:
    """An ``hf`` spec with its card for a ``save_pretrained`` directory (or a hub id).

    The card comes from the image processor config (size and resize policy, mean/std,
    rescale) and the model config (image size, width), then ``card_overrides`` (e.g. a card file
    next to the weights: licence, source, or a resize policy the processor cannot express).
    Anything that cannot be derived and is not overridden raises :class:`EncoderError`.
    """
    tf = _transformers()
    src = str(source)
    local = Path(src).is_dir()
    overrides = dict(card_overrides or {})
    with _quiet():
        try:
            config = tf.AutoConfig.from_pretrained(src, local_files_only=local or _offline())
        except (OSError, ValueError) as e:
            raise EncoderError(
                f"hf:{Path(src).name}: no transformers config there ({type(e).__name__}). Give a "
                "directory written by save_pretrained (config.json + weights).",
                reason="weights_not_found") from e
        try:
            proc = tf.AutoImageProcessor.from_pretrained(src, local_files_only=local or _offline())
        except (OSError, ValueError, KeyError):
            proc = None  # no preprocessor_config.json: the card must come from the overrides
    cfg = hf_config_dict(config)
    model_type = str(cfg.get("model_type", "model"))
    name = "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "-", model_type)[:60]
    image_size = _pair(getattr(config, "image_size", None))
    problems: dict[str, str] = {}
    derived: dict[str, Any] = {
        "modality": Modality.CXR.value,
        "pretrained": True,
        "licence": "unknown: see the checkpoint's own model card",
        # no path: it may carry identifiers, and a moved checkpoint must keep its identity
        "source": (f"transformers {model_type} checkpoint (save_pretrained directory)" if local
                   else f"Hugging Face hub: {src}"),
    }
    if proc is None:
        problems.update({"resize": "there is no preprocessor_config.json",
                         "input_size": "there is no preprocessor_config.json",
                         "mean": "there is no preprocessor_config.json"})
    else:
        size, resize, more = _size_of(proc)
        problems.update(more)
        if size is not None:
            derived.update(input_size=list(size), resize=resize)
        factor = getattr(proc, "rescale_factor", 1 / 255)
        if not getattr(proc, "do_rescale", True) or not math.isclose(float(factor), 1 / 255):
            problems["intensity"] = (f"the processor rescales by {factor} (do_rescale "
                                     f"{getattr(proc, 'do_rescale', None)}), not 1/255 to [0, 1]")
        if getattr(proc, "do_normalize", False):
            derived.update(mean=[float(v) for v in proc.image_mean],
                           std=[float(v) for v in proc.image_std])
        else:
            derived.update(mean=None, std=None)
    if "input_size" not in derived and image_size is not None and "input_size" not in problems:
        derived["input_size"] = list(image_size)
    merged = {**derived, **overrides}
    for field_name, why in problems.items():
        if field_name not in overrides:
            fix = (' (intensity = "unit" confirms the model takes [0, 1] images)'
                   if field_name == "intensity" else "")
            raise EncoderError(
                f"hf:{Path(src).name}: cannot derive card field {field_name!r}: {why}. Set it in "
                f"a card file{fix}: --card FILE, or embedstore_card.toml next to the weights.",
                reason="no_card")
    hw = _pair(merged.get("input_size"))
    model_size = image_size or hw
    if model_size is None:
        raise EncoderError(f"hf:{Path(src).name}: no image size in the config or the card.",
                           reason="no_card")
    embed_dim = int(getattr(config, "hidden_size", 0) or (getattr(config, "hidden_sizes", None)
                                                          or [0])[-1])
    if pool in ("auto", "pooler") and getattr(config, "pooler_output_size", None):
        embed_dim = int(config.pooler_output_size)
    merged.setdefault("embed_dim", embed_dim)
    card = EncoderCard.from_dict(merged)
    params = {"config": cfg, "pool": pool, "image_size": list(model_size),
              "mean": None if card.mean is None else list(card.mean),
              "std": None if card.std is None else list(card.std)}
    return EncoderSpec(name=name, family="hf", params=params, weights=src, seed=0, card=card)
