"""Encoder cards: what an encoder expects of its input and where it comes from.

A card is part of an encoder's spec, so it enters the encoder's fingerprint (a changed card is a
new embedding set), and extraction builds its preprocessing from it: no pretrained encoder gets a
silent default. When an encoder is created, the card is checked against what the encoder itself
reports (input kind and size, output dim and, where the encoder applies them, its normalisation
and CT windows), so a card cannot describe another network than the one that runs.

Fields (docs/ENCODERS.md has the table)::

    modality     CXR | CTPA
    input_size   (H, W) for CXR, (S, H, W) for CTPA: what preprocessing hands the encoder
    embed_dim    output width
    resize       CXR: "pad" (keep aspect, pad black) | "stretch" | "crop" (cover, center-crop);
                 CTPA: "fit" (whole field of view onto input_size) | "spacing" (resample to
                 spacing_mm about the centre, then crop or pad with air)
    spacing_mm   CTPA with resize "spacing": (dz, dy, dx) in mm; otherwise None
    orientation  CXR "display" (rows top to bottom as displayed); CTPA "axial-IS" (axial slices
                 ordered inferior to superior): what embedstore delivers
    intensity    CXR "unit" ([0, 1] after modality LUT, VOI and MONOCHROME1 inversion, bright =
                 dense); CTPA "hu" (Hounsfield units)
    hu_clip      CTPA: HU range clipped before resampling (None: no clip)
    hu_windows   CTPA: (width, level) windows the encoder applies to HU ((): it takes raw HU)
    antialias    CTPA: block mean before shrinking; radiographs are always antialiased
    mean, std    normalisation the encoder applies to its [0, 1] channels (None: none / its own)
    pretrained   whether weights come from training (False: random init)
    licence      licence note of the weights
    source       where the weights come from (no local paths: they may carry identifiers)
    notes        free text
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from embedstore.models.domain import Modality
from embedstore.models.errors import ConfigError, EncoderError

__all__ = ["CARD_VERSION", "EncoderCard", "RESIZE_MODES", "check_card"]

CARD_VERSION = 1
#: Resize policies per modality (the first is the default of a derived card).
RESIZE_MODES: dict[Modality, tuple[str, ...]] = {
    Modality.CXR: ("pad", "stretch", "crop"),
    Modality.CTPA: ("fit", "spacing"),
}
_ORIENTATIONS = {Modality.CXR: ("display",), Modality.CTPA: ("axial-IS",)}
_INTENSITIES = {Modality.CXR: ("unit",), Modality.CTPA: ("hu",)}
_MAX_SIDE = 4096


def _bad(field_name: str, value: Any, want: str) -> EncoderError:
    return EncoderError(f"Encoder card: {field_name} must be {want}, got {value!r}.",
                        reason="bad_card")


def _floats(value: Any, name: str, *, n: int | None = None, positive: bool = False
            ) -> tuple[float, ...]:
    want = (f"{n} " if n else "") + ("positive" if positive else "finite") + " numbers"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise _bad(name, value, want)
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
                positive and v <= 0):
            raise _bad(name, value, want)
        out.append(float(v))
    if (n is not None and len(out) != n) or not out:
        raise _bad(name, value, want)
    return tuple(out)


@dataclass(frozen=True)
class EncoderCard:
    """What an encoder expects (validated when built, JSON round trip; see the module doc)."""

    modality: Modality
    input_size: tuple[int, ...]
    embed_dim: int
    resize: str
    licence: str
    source: str
    pretrained: bool = False
    spacing_mm: tuple[float, float, float] | None = None
    orientation: str | None = None  # None -> the modality's only option
    intensity: str | None = None  # None -> the modality's only option
    hu_clip: tuple[float, float] | None = None
    hu_windows: tuple[tuple[float, float], ...] = ()
    antialias: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    notes: str = ""
    version: int = CARD_VERSION

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            m = Modality.parse(self.modality)
        except ConfigError as e:
            raise EncoderError(f"Encoder card: {e}", reason="bad_card") from None
        set_(self, "modality", m)
        ct = m is Modality.CTPA
        n = 3 if ct else 2
        size = self.input_size
        if isinstance(size, (str, bytes)) or not hasattr(size, "__iter__") or len(
                tuple(size)) != n or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_SIDE
                for v in size):
            raise _bad("input_size", size, f"{n} integers in [1, {_MAX_SIDE}] for {m}"
                       + (" (S, H, W)" if ct else " (H, W)"))
        set_(self, "input_size", tuple(size))
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or (
                self.embed_dim < 1):
            raise _bad("embed_dim", self.embed_dim, "a positive integer")
        if self.resize not in RESIZE_MODES[m]:
            raise _bad("resize", self.resize, f"one of {', '.join(RESIZE_MODES[m])} for {m}")
        if self.spacing_mm is not None:
            if not (ct and self.resize == "spacing"):
                raise _bad("spacing_mm", self.spacing_mm,
                           "None unless modality is CTPA and resize is 'spacing'")
            set_(self, "spacing_mm", _floats(self.spacing_mm, "spacing_mm", n=3, positive=True))
        elif ct and self.resize == "spacing":
            raise _bad("spacing_mm", None, "(dz, dy, dx) in mm when resize is 'spacing'")
        for name, table in (("orientation", _ORIENTATIONS), ("intensity", _INTENSITIES)):
            v = getattr(self, name)
            if v is None:
                set_(self, name, table[m][0])
            elif v not in table[m]:
                raise _bad(name, v, f"one of {', '.join(table[m])} for {m} (what embedstore "
                           "delivers; convert inside the encoder otherwise)")
        if self.hu_clip is not None:
            if not ct:
                raise _bad("hu_clip", self.hu_clip, "None for a radiograph card")
            lo, hi = _floats(self.hu_clip, "hu_clip", n=2)
            if lo >= hi:
                raise _bad("hu_clip", self.hu_clip, "(low, high) with low < high")
            set_(self, "hu_clip", (lo, hi))
        windows = self.hu_windows or ()
        if windows and not ct:
            raise _bad("hu_windows", windows, "empty for a radiograph card")
        parsed = []
        for wl in windows:
            w, lv = _floats(wl, "hu_windows", n=2)
            if w <= 0:
                raise _bad("hu_windows", windows, "(width, level) pairs with width > 0")
            parsed.append((w, lv))
        set_(self, "hu_windows", tuple(parsed))
        if not isinstance(self.antialias, bool) or (not ct and not self.antialias):
            raise _bad("antialias", self.antialias,
                       "true or false for CTPA; true for CXR (radiographs are always antialiased)")
        if (self.mean is None) != (self.std is None):
            raise _bad("mean/std", (self.mean, self.std), "both given or both None")
        if self.mean is not None:
            mean = _floats(self.mean, "mean")
            std = _floats(self.std, "std", n=len(mean), positive=True)
            if len(mean) not in (1, 3):
                raise _bad("mean", self.mean, "1 or 3 numbers (one per channel)")
            set_(self, "mean", mean)
            set_(self, "std", std)
        if not isinstance(self.pretrained, bool):
            raise _bad("pretrained", self.pretrained, "true or false")
        for name in ("licence", "source"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise _bad(name, v, "a non-empty string")
        if not isinstance(self.notes, str):
            raise _bad("notes", self.notes, "a string")
        if self.version != CARD_VERSION:
            raise _bad("version", self.version, f"{CARD_VERSION} (this embedstore's card format)")

    # -- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists, the modality as its string)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Modality):
                v = v.value
            elif isinstance(v, tuple):
                v = [list(x) if isinstance(x, tuple) else x for x in v]
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderCard:
        """Inverse of :meth:`to_dict`; unknown or missing fields raise :class:`EncoderError`."""
        if not isinstance(data, Mapping):
            raise EncoderError(f"An encoder card must be a JSON object, got {type(data).__name__}.",
                               reason="bad_card")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        required = ("modality", "input_size", "embed_dim", "resize", "licence", "source")
        missing = [k for k in required if k not in data]
        if unknown or missing:
            raise EncoderError(
                f"Encoder card fields: unknown {unknown}, missing {missing}. Valid fields: "
                f"{', '.join(names)}.", reason="bad_card")
        kw = dict(data)
        for k in ("input_size", "spacing_mm", "hu_clip", "mean", "std"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        if kw.get("hu_windows") is not None:
            kw["hu_windows"] = tuple(tuple(w) if isinstance(w, list) else w
                                     for w in kw["hu_windows"])
        return cls(**kw)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): equal cards give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> EncoderCard:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise EncoderError(f"Encoder card is not valid JSON: {e}.", reason="bad_card") from e
        return cls.from_dict(data)

    def with_overrides(self, overrides: Mapping[str, Any]) -> EncoderCard:
        """This card with some fields replaced (validated again), e.g. from a user's card file."""
        return EncoderCard.from_dict({**self.to_dict(), **dict(overrides)})


def check_card(card: EncoderCard, facts: Mapping[str, Any], name: str) -> None:
    """Raise :class:`EncoderError` where ``card`` disagrees with what encoder ``name`` reports.

    ``facts`` come from ``FrozenEncoder.card_facts()``: always input_kind, input_size and
    embed_dim; mean/std and hu_windows only where the encoder applies them itself.
    """
    want = {
        "input_kind": card.modality.input_kind,
        "input_size": tuple(card.input_size),
        "embed_dim": card.embed_dim,
        "mean": card.mean,
        "std": card.std,
        "hu_windows": card.hu_windows,
    }
    for key, have in facts.items():
        if key not in want:
            continue
        mine = want[key]
        if have is not None and key in ("mean", "std"):
            have = tuple(float(v) for v in have)
        elif key == "input_size":
            have = tuple(int(v) for v in have)
        elif key == "hu_windows":
            have = tuple((float(w), float(lv)) for w, lv in have)
        same = mine == have or (
            key in ("mean", "std") and mine is not None and have is not None
            and len(mine) == len(have)
            and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(mine, have, strict=True)))
        if not same:
            raise EncoderError(
                f"Encoder {name!r}: its card says {key}={mine!r} but the encoder has "
                f"{key}={have!r}. Fix the card (or the encoder params) so they agree.",
                reason="card_mismatch")
