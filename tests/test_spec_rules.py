"""The spec's combination rules: what each architecture implies, and refusals that name the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from graddiag.models.spec import Spec


@pytest.mark.parametrize(
    ("arch", "activation", "norm", "residual"),
    [
        ("rnn", "tanh", "none", False),
        ("gru", "tanh", "none", False),
        ("lstm", "tanh", "none", False),
        ("transformer", "gelu", "layer", True),
        ("mlp", "relu", "none", False),
    ],
)
def test_an_architecture_fills_in_what_it_implies(arch: str, activation: str, norm: str, residual: bool) -> None:
    spec = Spec(arch=arch)
    assert (spec.activation, spec.norm, spec.residual) == (activation, norm, residual)


def test_explicit_values_are_kept_where_allowed() -> None:
    assert Spec(arch="rnn", activation="relu").activation == "relu"
    assert Spec(arch="transformer", activation="relu").activation == "relu"
    assert Spec(arch="lstm", forget_bias="chrono").forget_bias == "chrono"
    assert Spec(arch="lstm", forget_bias=2).forget_bias == 2.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"arch": "lstm", "activation": "relu"}, "activation='relu' is not available for arch='lstm'; allowed: tanh"),
        ({"arch": "rnn", "activation": "sigmoid"}, "allowed: tanh, relu"),
        ({"arch": "transformer", "activation": "tanh"}, "allowed: gelu, relu"),
        ({"arch": "mlp", "init": "identity"}, "init='identity' applies to a recurrent matrix"),
        ({"arch": "gru", "forget_bias": 1.0}, "forget_bias applies to arch='lstm' only"),
        ({"arch": "rnn", "norm": "batch"}, "norm='batch' is not available for arch='rnn'; allowed: none"),
        ({"arch": "gru", "residual": True}, "residual=true is not available for arch='gru'"),
        ({"arch": "transformer", "width": 30, "heads": 4}, "width=30 must be a multiple of heads=4"),
        ({"arch": "transformer", "width": 1024, "heads": 4}, "width must be at most 512 for arch='transformer'"),
        ({"arch": "transformer", "norm": "batch"}, "norm='batch' is not available for arch='transformer'"),
        ({"arch": "transformer", "residual": False}, "residual=false is not available for arch='transformer'"),
        ({"arch": "mlp", "heads": 8}, "heads applies to arch='transformer' only"),
        ({"arch": "cnn", "norm_position": "post"}, "norm_position applies to arch='transformer' only"),
    ],
)
def test_refusals_name_the_field_and_what_is_allowed(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Spec(**fields)
    assert message in str(refused.value)


@pytest.mark.parametrize("value", ["chrono", 1.5, None])
def test_forget_bias_round_trips_through_json(value: float | str | None) -> None:
    spec = Spec(arch="lstm", forget_bias=value)
    assert Spec.model_validate_json(spec.model_dump_json()) == spec


def test_forget_bias_refuses_other_words() -> None:
    with pytest.raises(ValidationError) as refused:
        Spec(arch="lstm", forget_bias="one")
    assert all(error["loc"][0] == "forget_bias" for error in refused.value.errors())


def test_later_fields_at_their_defaults_leave_the_fingerprint_as_it_was() -> None:
    """Specs that do not use the fields added with recurrent nets and transformers keep their fingerprints."""
    # Computed on main before those fields existed (commit afcbbb3): Spec().fingerprint().
    assert Spec().fingerprint() == "c60bb097e6aec597931cfa4ab62123894494d9313d35c7ed233488ee223af6ce"
    assert Spec(arch="transformer").fingerprint() != Spec(arch="transformer", heads=8).fingerprint()
    assert Spec(arch="lstm").fingerprint() != Spec(arch="lstm", forget_bias=1).fingerprint()
