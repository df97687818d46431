from __future__ import annotations

import json

import pytest

from embedstore.domain import Modality, Split
from embedstore.errors import ConfigError


def test_modality_parses_any_case_and_serialises_as_its_value() -> None:
    assert Modality.parse("cxr") is Modality.CXR
    assert Modality.parse(" CTPA ") is Modality.CTPA
    assert Modality.CXR == "CXR" and json.dumps([Modality.CTPA]) == '["CTPA"]'
    assert f"{Modality.CXR}" == "CXR"
    assert Modality.CTPA.input_kind == "volume" and Modality.CXR.input_kind == "image"


def test_unknown_values_name_the_choices() -> None:
    with pytest.raises(ConfigError, match="Unknown modality 'mri'. Valid: CXR, CTPA"):
        Modality.parse("mri")
    with pytest.raises(ConfigError, match="Unknown split 'dev'. Valid: train, val, test"):
        Split.parse("dev")
    assert Split.parse("VAL") is Split.VAL
