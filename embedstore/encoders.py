"""Which encoder a command means: registry names, ``hf:PATH`` checkpoints, weights and card files.

``resolve_spec`` turns what a user typed (``--encoder``, ``--weights``, ``--card``) into one
:class:`EncoderSpec` with its card; ``registered_encoders`` and ``encoder_card`` return the data
``embedstore encoders`` prints. Card files are TOML or JSON objects of card fields
(docs/ENCODERS.md), overriding the registered or derived card field by field; for ``hf:``
encoders a file named ``embedstore_card.toml`` (or ``.json``) next to the weights is read when no
``--card`` is given, and it may also set ``pool`` (auto | pooler | cls | mean).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import tomllib

from embedstore.errors import ConfigError
from embedstore.models.encoders import (
    EncoderCard,
    EncoderSpec,
    create_encoder,
    describe_encoder,
    get_encoder_spec,
    hf_spec,
    list_encoders,
)

__all__ = [
    "HF_PREFIX",
    "CARD_FILE_NAMES",
    "parse_encoder_list",
    "load_card_file",
    "resolve_spec",
    "registered_encoders",
    "encoder_card",
]

HF_PREFIX = "hf:"
CARD_FILE_NAMES = ("embedstore_card.toml", "embedstore_card.json")
_OPTIONS = ("pool",)  # encoder options a card file may carry (hf only); not card fields


def parse_encoder_list(text: str | None) -> list[str | None]:
    """``"a,b"`` -> ``["a", "b"]``; None or "" -> ``[None]`` (the modality's default)."""
    if not text or not text.strip():
        return [None]
    names = [t.strip() for t in text.split(",")]
    if any(not n for n in names):
        raise ConfigError(f"--encoder {text!r} has an empty name; give names separated by commas.")
    if len(set(names)) != len(names):
        raise ConfigError(f"--encoder {text!r} names an encoder twice.")
    return list(names)


def load_card_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A TOML or JSON card file -> (card field overrides, encoder options such as ``pool``)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"Cannot read card file {p.name!r} ({e.strerror}). Pass an existing "
                          ".toml or .json file.") from e
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
        raise ConfigError(f"Card file {p.name!r} is not valid {kind}: {e}.") from e
    if not isinstance(data, dict):
        raise ConfigError(f"Card file {p.name!r} must hold an object of card fields.")
    options = {k: data.pop(k) for k in _OPTIONS if k in data}
    return data, options


def _card_file_next_to(folder: Path) -> Path | None:
    for name in CARD_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_spec(name: str, *, weights: str | None = None, card_file: str | None = None
                 ) -> EncoderSpec:
    """The spec (with its card) for a registry name or ``hf:PATH``, local weights and a card file.

    Nothing is downloaded: an ``hf:`` directory is read with ``local_files_only``; a hub id
    needs network (and respects ``HF_HUB_OFFLINE``).
    """
    if name.startswith(HF_PREFIX):
        src = name[len(HF_PREFIX):]
        if not src:
            raise ConfigError("--encoder hf: needs a directory written by save_pretrained "
                              "(hf:PATH) or, with network, a hub id (hf:org/name).")
        if weights is not None:
            raise ConfigError(f"--weights is for registered encoders; {name!r} brings its own "
                              "weights (the directory's model.safetensors).")
        file = Path(card_file) if card_file else (
            _card_file_next_to(Path(src)) if Path(src).is_dir() else None)
        overrides, options = load_card_file(file) if file else ({}, {})
        return hf_spec(src, card_overrides=overrides, pool=str(options.get("pool", "auto")))
    spec = get_encoder_spec(name)
    if weights is not None:
        spec = replace(spec, weights=str(weights))
    if card_file:
        overrides, options = load_card_file(card_file)
        if options:
            raise ConfigError(f"Card file option(s) {sorted(options)} apply to hf: encoders "
                              f"only, not to {name!r}.")
        card = (spec.card.with_overrides(overrides) if spec.card is not None
                else EncoderCard.from_dict(overrides))
        spec = replace(spec, card=card)
    return spec


def registered_encoders() -> list[dict[str, Any]]:
    """Name, family, params, description and card summary of every registered encoder."""
    rows = []
    for name in list_encoders():
        spec = get_encoder_spec(name)
        card = spec.card
        rows.append({
            "name": name,
            "family": spec.family,
            "params": spec.to_dict().get("params", {}),
            "description": describe_encoder(name),
            "modality": None if card is None else card.modality.value,
            "input_size": None if card is None else list(card.input_size),
            "embed_dim": None if card is None else card.embed_dim,
            "pretrained": None if card is None else card.pretrained,
        })
    return rows


def encoder_card(name: str, *, weights: str | None = None, card_file: str | None = None
                 ) -> dict[str, Any]:
    """The card extraction would apply for ``name`` (a registry name or ``hf:PATH``), as data:
    ``{"name", "family", "derived", "card": {...}}``. ``derived`` is true for a random-init
    encoder registered without a card (built here to read its input size)."""
    from embedstore.identity import card_for

    spec = resolve_spec(name, weights=weights, card_file=card_file)
    derived = spec.card is None
    card = spec.card if spec.card is not None else card_for(create_encoder(spec))
    return {"name": spec.name, "family": spec.family, "derived": derived,
            "card": card.to_dict()}
