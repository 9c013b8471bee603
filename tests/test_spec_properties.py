"""Property tests of the spec model, with strategies derived from the model's own fields and bounds.

Whatever Spec accepts must build and train without raising; whatever lies past one of its bounds must
be refused naming that field. The strategies are read from `Spec.model_fields` (Literal choices, bools,
numeric bounds, optional fields), so a new field or a changed bound is covered without editing this file.
Sizes are shrunk to keep each run tiny (depth ≤ 4, width ≤ 8, steps ≤ 2, batch ≤ 8); the data set is the
synthetic one and the device one this machine has — environment choices, not spec restrictions.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Literal

import annotated_types as at
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from graddiag.models.networks import build_network
from graddiag.models.spec import Spec, SpecCaps
from graddiag.service.engine.probe import run_probe

# Upper bounds of the sizes that set a probe's cost, for the runs these tests train.
TINY_CAPS: dict[str, int] = {
    "depth": 4,
    "width": 8,
    "steps": 2,
    "batch_size": 8,
    "record_every": 2,
    "heads": 4,
    "mlp_ratio": 2,
}
ENVIRONMENT: dict[str, Any] = {"dataset": "synthetic", "device": "cuda" if torch.cuda.is_available() else "cpu"}
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _bounds(field: FieldInfo) -> tuple[float | None, float | None, bool, bool]:
    """(low, high, low exclusive, high exclusive) from a field's annotated-types metadata."""
    low = high = None
    low_open = high_open = False
    for item in field.metadata:
        if isinstance(item, at.Ge):
            low = item.ge
        elif isinstance(item, at.Gt):
            low, low_open = item.gt, True
        elif isinstance(item, at.Le):
            high = item.le
        elif isinstance(item, at.Lt):
            high, high_open = item.lt, True
    return low, high, low_open, high_open  # type: ignore[return-value]


def _base_types(annotation: Any) -> tuple[list[Any], bool]:
    """(the annotation's types without None, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, type(int | None)):
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the annotation's first type other than None, whether None is allowed)."""
    kinds, optional = _base_types(annotation)
    return kinds[0], optional


def valid_values(name: str, field: FieldInfo) -> st.SearchStrategy[Any]:
    """Values the field accepts (sizes capped by TINY_CAPS); a union draws from each of its types."""
    if name in ENVIRONMENT:
        return st.just(ENVIRONMENT[name])
    kinds, optional = _base_types(field.annotation)
    strategy = st.one_of([_values_of(name, field, kind) for kind in kinds])
    return st.none() | strategy if optional else strategy


def _values_of(name: str, field: FieldInfo, kind: Any) -> st.SearchStrategy[Any]:
    low, high, low_open, high_open = _bounds(field)
    strategy: st.SearchStrategy[Any]
    if typing.get_origin(kind) is Literal:
        strategy = st.sampled_from(typing.get_args(kind))
    elif kind is bool:
        strategy = st.booleans()
    elif kind is int:
        high = min(high, TINY_CAPS[name]) if name in TINY_CAPS and high is not None else high
        strategy = st.integers(
            min_value=None if low is None else int(low) + low_open, max_value=None if high is None else int(high)
        )
    elif kind is float:
        strategy = st.floats(
            min_value=low, max_value=high, exclude_min=low_open, exclude_max=high_open, allow_nan=False
        )
    else:
        raise AssertionError(f"no strategy for Spec.{name}: {field.annotation!r}; teach this test the new type")
    return strategy


def out_of_bounds(field: FieldInfo) -> st.SearchStrategy[Any]:
    """Numbers just past (or far past) either of the field's bounds."""
    kind, _ = _base_type(field.annotation)
    low, high, low_open, high_open = _bounds(field)
    choices: list[st.SearchStrategy[Any]] = []
    if kind is int:
        if low is not None:
            choices.append(st.integers(max_value=int(low) - 1 + low_open))
        if high is not None:
            choices.append(st.integers(min_value=int(high) + 1 - high_open))
    else:
        if low is not None:
            choices.append(st.floats(max_value=low, exclude_max=not low_open, allow_nan=False))
        if high is not None:
            choices.append(st.floats(min_value=high, exclude_min=not high_open, allow_nan=False))
    return st.one_of(choices)


BOUNDED = sorted(
    name
    for name, field in Spec.model_fields.items()
    if _base_type(field.annotation)[0] in (int, float) and any(b is not None for b in _bounds(field)[:2])
)
FIELDS = {name: valid_values(name, field) for name, field in Spec.model_fields.items()}


def _accepted(values: dict[str, Any]) -> Spec | None:
    try:
        return Spec.model_validate(values)
    except ValidationError:
        return None  # a combination rule (e.g. init='normal' needs init_std) refused it


ACTIVATIONS = typing.get_args(Spec.model_fields["activation"].annotation)
TRANSFORMER_ONLY = ("heads", "norm_position", "mlp_ratio", "pooling")


def _fit_to_arch(draw: st.DrawFn, values: dict[str, Any]) -> dict[str, Any]:
    """Values drawn for every field, made to fit the drawn architecture's combination rules.

    Without this nearly every draw would combine an architecture with another's fields (heads for an MLP,
    batch norm for an LSTM) and be refused; the refusals themselves are tested in tests/test_spec_rules.py.
    """
    arch = values["arch"]
    implied = Spec(arch=arch)
    if arch == "transformer":
        values["norm"], values["residual"] = implied.norm, implied.residual
        values["width"] = values["heads"] * draw(st.integers(1, TINY_CAPS["width"] // values["heads"]))
    else:
        values.update({name: Spec.model_fields[name].default for name in TRANSFORMER_ONLY})
    if arch != "lstm":
        values["forget_bias"] = None
    if arch in ("rnn", "gru", "lstm"):
        values["norm"], values["residual"] = "none", False
    elif values["init"] == "identity":
        values["init"] = draw(st.sampled_from([i for i in INITS if i != "identity"]))
    allowed = [a for a in ACTIVATIONS if _accepted({"arch": arch, "activation": a}) is not None]
    if values["activation"] not in allowed:
        values["activation"] = draw(st.sampled_from(allowed))
    return values


INITS = typing.get_args(Spec.model_fields["init"].annotation)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    """Specs Spec accepts, every field drawn (combinations it still refuses are redrawn)."""
    spec = _accepted(_fit_to_arch(draw, draw(st.fixed_dictionaries(FIELDS))))
    assume(spec is not None)
    assert spec is not None
    return spec


def test_strategies_cover_every_field() -> None:
    assert set(FIELDS) == set(Spec.model_fields)
    assert {"depth", "width", "steps", "batch_size", "lr", "init_gain", "seed"} <= set(BOUNDED)


@PROPERTY_SETTINGS
@given(spec=specs())
def test_every_accepted_spec_builds_and_trains(spec: Spec) -> None:
    network = build_network(spec)
    assert len(network.layers) >= spec.depth
    report = run_probe(spec, eval_samples=10)
    assert report.timing.steps_run >= 1 and report.verdict.label in ("healthy", "vanishing", "exploding")
    assert report.layers and {r.layer for r in report.records} <= {layer.index for layer in report.layers}


@PROPERTY_SETTINGS
@given(data=st.data(), base=specs(), name=st.sampled_from(BOUNDED))
def test_a_value_past_a_bound_is_refused_naming_its_field(data: st.DataObject, base: Spec, name: str) -> None:
    value = data.draw(out_of_bounds(Spec.model_fields[name]), label=name)
    with pytest.raises(ValidationError) as refused:
        Spec.model_validate({**base.model_dump(), name: value})
    assert [error["loc"] for error in refused.value.errors()] == [(name,)]


@PROPERTY_SETTINGS
@given(base=specs(), name=st.text(min_size=1, max_size=20).filter(lambda n: n not in Spec.model_fields))
def test_an_unknown_field_is_refused_naming_it(base: Spec, name: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Spec.model_validate({**base.model_dump(), name: 1})
    assert [(error["loc"], error["type"]) for error in refused.value.errors()] == [((name,), "extra_forbidden")]


@PROPERTY_SETTINGS
@given(spec=specs(), depth=st.integers(1, 4), width=st.integers(2, 8), steps=st.integers(1, 2), batch=st.integers(2, 8))
def test_operator_caps_name_exactly_the_fields_above_them(
    spec: Spec, depth: int, width: int, steps: int, batch: int
) -> None:
    caps = SpecCaps(max_depth=depth, max_width=width, max_steps=steps, max_batch_size=batch)
    over = {"depth": spec.depth > depth, "width": spec.width > width, "steps": spec.steps > steps}
    over["batch_size"] = spec.batch_size > batch
    assert {field for field, _ in caps.violations(spec)} == {field for field, is_over in over.items() if is_over}


def test_non_finite_numbers_are_refused() -> None:
    for name in ("lr", "init_gain", "weight_decay"):
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValidationError) as refused:
                Spec.model_validate({name: value})
            assert refused.value.errors()[0]["loc"] == (name,)
