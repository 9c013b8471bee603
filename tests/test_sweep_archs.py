"""Sweeps over the recurrent and transformer fields: an arch grid, pre- vs post-LN along depth, forget_bias's
mixed values (a number, "chrono", null) deduplicated as specs, and refused combinations named by field."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from graddiag.models.spec import Spec
from tests.support.api import TINY, assert_problem

pytestmark = pytest.mark.anyio


async def _points(api: httpx.AsyncClient, base: dict[str, Any], grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    response = await api.post("/v1/sweeps", json={"base": base, "grid": grid})
    assert response.status_code == 202, response.text
    sweep = response.json()
    assert sweep["total"] == len(sweep["runs"])
    return [
        {**run["grid"], "spec": (await api.get(f"/v1/runs/{run['run_id']}")).json()["spec"]} for run in sweep["runs"]
    ]


async def test_arch_grid_gives_each_recurrent_cell_its_own_activation(api: httpx.AsyncClient) -> None:
    points = await _points(api, TINY, {"arch": ["rnn", "gru", "lstm"]})
    assert sorted(point["arch"] for point in points) == ["gru", "lstm", "rnn"]
    # The base leaves activation out: each point takes its cell's (tanh), none inherits the mlp's relu.
    assert {(point["spec"]["arch"], point["spec"]["activation"], point["spec"]["norm"]) for point in points} == {
        ("rnn", "tanh", "none"),
        ("gru", "tanh", "none"),
        ("lstm", "tanh", "none"),
    }


async def test_transformer_depth_grid_over_norm_position(api: httpx.AsyncClient) -> None:
    base = {**TINY, "arch": "transformer", "width": 16, "heads": 2, "mlp_ratio": 2, "pooling": "mean"}
    points = await _points(api, base, {"norm_position": ["pre", "post"], "depth": [1, 2]})
    assert sorted((p["norm_position"], p["depth"]) for p in points) == [
        ("post", 1),
        ("post", 2),
        ("pre", 1),
        ("pre", 2),
    ]
    for point in points:
        spec = Spec.model_validate(point["spec"])
        assert (spec.norm, spec.residual, spec.activation, spec.heads, spec.pooling) == (
            "layer",
            True,
            "gelu",
            2,
            "mean",
        )


async def test_forget_bias_values_are_deduplicated_once_validated(api: httpx.AsyncClient) -> None:
    # 1, 1.0 and "1" are one bias; 0 is not null (null keeps PyTorch's random bias); "chrono" is a value of its own.
    grid = {"forget_bias": [None, "chrono", 1, 1.0, "1", 0]}
    response = await api.post("/v1/sweeps", json={"base": {**TINY, "arch": "lstm"}, "grid": grid})
    assert response.status_code == 202, response.text
    sweep = response.json()
    assert sweep["grid"] == {"forget_bias": [None, "chrono", 1.0, 0.0]}
    assert sorted(map(repr, (run["grid"]["forget_bias"] for run in sweep["runs"]))) == [
        "'chrono'",
        "0.0",
        "1.0",
        "None",
    ]


@pytest.mark.parametrize(
    ("base", "grid", "errors"),
    [
        # A forget gate only the lstm has: the rnn's and gru's points are refused, each by its index.
        (
            {**TINY, "forget_bias": 1.0},
            {"arch": ["rnn", "gru", "lstm"]},
            [(0, "forget_bias", "forget_bias applies to arch='lstm' only"), (1, "forget_bias", "")],
        ),
        # Heads must divide the width: the point is refused under width, saying why.
        (
            {**TINY, "arch": "transformer"},
            {"width": [16, 18], "heads": [4]},
            [(1, "width", "width=18 must be a multiple of heads=4")],
        ),
        # The base's relu suits the rnn, not the gated cells.
        (
            {**TINY, "activation": "relu"},
            {"arch": ["rnn", "gru", "lstm"]},
            [(1, "activation", "allowed: tanh"), (2, "activation", "")],
        ),
        # A value no member of forget_bias's union takes: one error, the members' messages joined.
        (
            {**TINY, "arch": "lstm"},
            {"forget_bias": ["chrono", "Chrono"]},
            [
                (
                    1,
                    "forget_bias",
                    "Input should be a valid number, unable to parse string as a number or Input should be 'chrono'",
                )
            ],
        ),
        # Transformer-only fields on a recurrent point.
        (
            {**TINY, "norm_position": "post"},
            {"arch": ["lstm"]},
            [(0, "norm_position", "applies to arch='transformer'")],
        ),
    ],
)
async def test_refused_combinations_name_the_point_and_field(
    api: httpx.AsyncClient, base: dict[str, Any], grid: dict[str, list[Any]], errors: list[tuple[int, str, str]]
) -> None:
    problem = assert_problem(await api.post("/v1/sweeps", json={"base": base, "grid": grid}), 422, "sweep_invalid")
    assert [error["loc"] for error in problem["errors"]] == [["grid", index, field] for index, field, _ in errors]
    for error, (index, _, text) in zip(problem["errors"], errors, strict=True):
        assert error["msg"].startswith(f"grid point {index} (") and text in error["msg"]
        assert "Value error" not in error["msg"]
    assert (await api.get("/v1/runs")).json()["total"] == 0


async def test_forget_bias_must_be_finite_and_bounded(api: httpx.AsyncClient) -> None:
    # JSON's NaN and Infinity (Python's json reads them) and magnitudes past 10 would otherwise queue runs.
    def post(path: str, body: dict[str, Any]) -> Any:
        return api.post(path, content=json.dumps(body), headers={"content-type": "application/json"})

    grid = {"forget_bias": ["chrono", float("nan"), float("inf"), 10.5, -10]}
    problem = assert_problem(
        await post("/v1/sweeps", {"base": {**TINY, "arch": "lstm"}, "grid": grid}), 422, "sweep_invalid"
    )
    assert [error["loc"] for error in problem["errors"]] == [["grid", i, "forget_bias"] for i in (1, 2, 3)]
    assert "forget_bias must be a finite number in [-10, 10], 'chrono' or null" in problem["errors"][0]["msg"]
    problem = assert_problem(
        await post("/v1/runs", {**TINY, "arch": "lstm", "forget_bias": float("nan")}), 422, "validation_error"
    )
    assert problem["errors"][0]["loc"] == ["body", "forget_bias"]
    assert (await api.get("/v1/runs")).json()["total"] == 0
