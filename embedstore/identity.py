"""Cache identity: the one place that says when two embeddings are the same (docs/STORE_FORMAT.md).

    encoder fingerprint = sha256(spec identity JSON + "\\n" + weights hash)        (models/)
        spec identity   = family, architecture params, seed and card; the weights *location*
                          replaced by a placeholder (the bytes are hashed instead)
        weights hash    = sha256 over the state dict's tensors (sorted keys; dtype, shape, bytes)
    preprocess fingerprint = PreprocessSpec.fingerprint(), built from the encoder's card
    set key  = <encoder name>-<first 10 hex of sha256(encoder fp + preprocess fp)>
    row key  = sha256(schema version, content hash, preprocess fp, encoder fp)  (store.make_cache_key)
    stored spec = what a reopened set is compared on, plus "provenance" (recorded, not compared)

What never enters a key: paths (of weights, studies or the manifest), the manifest itself (adding
patients must not invalidate embeddings), row order, the device, the time. The manifest's
fingerprint and the weights file's *name* are written as provenance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedstore.domain import Modality
from embedstore.errors import ConfigError
from embedstore.models.encoders import EncoderCard, FrozenEncoder, loads_weights, require_card
from embedstore.preprocess import AIR_HU, PreprocessSpec
from embedstore.store import make_cache_key
from embedstore.store.format import PROVENANCE_KEY

__all__ = [
    "SetIdentity",
    "set_identity",
    "card_for",
    "preprocess_for",
    "provenance",
]

_SET_KEY_HEX = 10


def card_for(encoder: FrozenEncoder) -> EncoderCard:
    """The card extraction applies: the spec's own, or, for a random-init encoder registered
    without one, a card derived from the encoder (the preprocessing used before cards existed:
    radiographs padded to the input size, CT fitted to it after clipping to [-1024, 3071] HU).
    An encoder that loads trained weights without a card is refused (EncoderError ``no_card``)."""
    spec = encoder.spec
    if spec.card is not None:
        return spec.card
    if loads_weights(spec):
        require_card(spec)  # raises: no silent default for trained weights
    facts = encoder.card_facts()
    ct = encoder.input_kind == "volume"
    return EncoderCard(
        modality=Modality.CTPA if ct else Modality.CXR,
        input_size=tuple(encoder.input_size),
        embed_dim=encoder.embed_dim,
        resize="fit" if ct else "pad",
        hu_clip=(AIR_HU, 3071.0) if ct else None,
        hu_windows=tuple(facts.get("hu_windows") or ()),
        mean=facts.get("mean"),
        std=facts.get("std"),
        pretrained=False,
        licence="n/a: random init",
        source="derived by embedstore for a random-init encoder registered without a card",
    )


def preprocess_for(encoder: FrozenEncoder, modality: str | Modality) -> PreprocessSpec:
    """The preprocessing spec of ``encoder`` for ``modality``, from its card."""
    m = Modality.parse(modality)
    card = card_for(encoder)
    if card.modality is not m:
        raise ConfigError(
            f"Encoder {encoder.spec.name!r} has a {card.modality} card, so it cannot embed "
            f"{m} studies. Use a {m} encoder (see `embedstore encoders`)."
        )
    return PreprocessSpec.for_card(card)


def provenance(*, manifest_fingerprint: str | None = None, weights: str | None = None
               ) -> dict[str, Any]:
    """How a set was made, recorded beside its identity and never compared: the manifest's
    fingerprint and the weights' file name (a name, not a path: paths may carry identifiers)."""
    return {
        "manifest_fingerprint": manifest_fingerprint,
        "weights_file": None if weights is None else Path(str(weights)).name,
    }


@dataclass(frozen=True)
class SetIdentity:
    """Everything that identifies an embedding set: encoder (``describe()``), the card applied
    and the preprocessing spec. Build it with :func:`set_identity`."""

    encoder: Mapping[str, Any]
    card: EncoderCard
    preprocess: PreprocessSpec

    @property
    def modality(self) -> Modality:
        return self.preprocess.modality

    @property
    def encoder_fingerprint(self) -> str:
        return str(self.encoder["fingerprint"])

    @property
    def preprocess_fingerprint(self) -> str:
        return self.preprocess.fingerprint()

    @property
    def set_key(self) -> str:
        """``<name>-<10 hex>``: the set's folder name in the store."""
        fp = hashlib.sha256((self.encoder_fingerprint + self.preprocess_fingerprint).encode())
        return f"{self.encoder['name']}-{fp.hexdigest()[:_SET_KEY_HEX]}"

    def row_key(self, content_hash: str) -> str:
        """The cache key of one study's embedding in this set (see the module docstring)."""
        return make_cache_key(content_hash=content_hash, preprocess=self.preprocess_fingerprint,
                              encoder_fingerprint=self.encoder_fingerprint)

    def spec(self, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The spec stored with the set (``spec.json``). Everything but ``provenance`` is
        compared when the set is reopened; none of it holds a path."""
        enc = {k: v for k, v in dict(self.encoder["spec"]).items() if k != "card"}
        out: dict[str, Any] = {
            "encoder": enc,
            "card": self.card.to_dict(),
            "encoder_fingerprint": self.encoder_fingerprint,
            "weights_hash": self.encoder["weights_hash"],
            "preprocess": self.preprocess.to_dict(),
            "preprocess_fingerprint": self.preprocess_fingerprint,
            "modality": self.modality.value,
            "embed_dim": int(self.encoder["embed_dim"]),
        }
        if provenance is not None:
            out[PROVENANCE_KEY] = dict(provenance)
        return out


def set_identity(encoder: FrozenEncoder, preprocess: PreprocessSpec | None = None
                 ) -> SetIdentity:
    """The identity of ``encoder``'s set under ``preprocess`` (default: from its card)."""
    card = card_for(encoder)
    pp = preprocess if preprocess is not None else PreprocessSpec.for_card(card)
    return SetIdentity(encoder=encoder.describe(), card=card, preprocess=pp)
