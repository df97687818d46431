"""Frozen encoder registry: ``list_encoders`` / ``get_encoder_spec`` / ``create_encoder`` /
``register_encoder``, and the families ``open_clip``, ``volume25d``, ``torchscript`` and ``hf``
(transformers checkpoints). Each registered encoder has a card (``card.py``).

See docs/ENCODERS.md for bringing your own weights and what the fingerprint covers.
"""

# Importing the family modules registers them with the registry.
from embedstore.models.encoders import hf as hf
from embedstore.models.encoders import openclip as openclip
from embedstore.models.encoders import torchscript as torchscript
from embedstore.models.encoders import volume25d as volume25d
from embedstore.models.encoders.card import EncoderCard, check_card
from embedstore.models.encoders.hf import HFImageEncoder, hf_spec
from embedstore.models.encoders.openclip import OpenClipImageEncoder
from embedstore.models.encoders.registry import (
    EncoderSpec,
    FrozenEncoder,
    create_encoder,
    describe_encoder,
    get_encoder_spec,
    list_encoders,
    list_families,
    loads_weights,
    register_encoder,
    register_family,
    require_card,
    state_dict_hash,
)
from embedstore.models.encoders.torchscript import ScriptedEncoder
from embedstore.models.encoders.volume25d import DEFAULT_WINDOWS, Volume25DEncoder, apply_windows

__all__ = [
    "EncoderCard",
    "check_card",
    "loads_weights",
    "require_card",
    "EncoderSpec",
    "FrozenEncoder",
    "create_encoder",
    "describe_encoder",
    "get_encoder_spec",
    "list_encoders",
    "list_families",
    "register_encoder",
    "register_family",
    "state_dict_hash",
    "OpenClipImageEncoder",
    "Volume25DEncoder",
    "ScriptedEncoder",
    "HFImageEncoder",
    "hf_spec",
    "DEFAULT_WINDOWS",
    "apply_windows",
]
