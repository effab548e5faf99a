"""flowbp.names reads the registries' names from their source; they must equal the live registries."""

from __future__ import annotations

import pytest

from flowbp import names


def test_method_names_equal_the_registry() -> None:
    from flowbp.methods import available_methods

    assert names.method_names() == frozenset(available_methods())
    assert len(names.method_names()) >= 10


def test_reward_names_equal_the_registry() -> None:
    from flowbp.rewards import REWARDS

    assert names.reward_names() == frozenset(REWARDS)
    assert {"digit-alignment", "hpsv2"} <= names.reward_names()  # **DIGIT_REWARDS expanded from digits.py


def test_backbone_names_equal_the_registry() -> None:
    from flowbp.backbones import available_backbones

    assert names.backbone_names() == frozenset(available_backbones())


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("digit-alignment+5*digit-contrast", ["digit-alignment", "digit-contrast"]),
        ("hpsv2-1e-3*aesthetic", ["hpsv2", "aesthetic"]),  # the exponent's e is not a name
        (" pickscore - 0.5 * clipscore ", ["pickscore", "clipscore"]),
        ({"hpsv2": 1, "pickscore": 0.5}, ["hpsv2", "pickscore"]),
    ],
)
def test_reward_spec_names(spec, expected) -> None:
    assert names.reward_spec_names(spec) == expected


def test_check_names_messages_match_the_registries() -> None:
    """The fast check raises the registries' own message; so does the full validation on the same config."""
    import re

    from flowbp.config import TrainConfig, validate_against_components

    for field, value, message in [
        ("method", "sparse", "method: unknown method 'sparse'"),
        ("reward", "digit-beauty", "reward: unknown reward(s) ['digit-beauty']"),
        ("backbone", "sd35", "backbone: unknown backbone 'sd35'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            names.check_names(**{"method": "refl", "reward": "hpsv2", "backbone": "sd3", field: value})
        config = TrainConfig()  # the defaults, then the typo set past the config's own check
        object.__setattr__(config, field, value)
        with pytest.raises(ValueError, match=re.escape(message)):
            validate_against_components(config)
