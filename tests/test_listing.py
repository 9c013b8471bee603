"""The run listing filters on every spec field, sorts and filters on result metrics, and takes an
MLflow-style `filter` expression; every mistake is a 422 naming what is allowed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from graddiag.models.spec import Spec
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine
from graddiag.service.store.query import KEY_METRICS
from tests.support.api import TINY, assert_problem
from tests.support.reports import plain_report, store_report

pytestmark = pytest.mark.anyio


def _report(spec: dict[str, Any], label: str, decades: float | None, accuracy: float) -> Any:
    report = plain_report(Spec.model_validate({**TINY, **spec}), label)  # type: ignore[arg-type]
    evidence = report.verdict.evidence.model_copy(update={"decades_per_layer": decades})
    verdict = report.verdict.model_copy(update={"evidence": evidence})
    return report.model_copy(update={"verdict": verdict, "eval": report.eval.model_copy(update={"accuracy": accuracy})})


@pytest.fixture
def runs(settings: Settings) -> Iterator[dict[str, str]]:
    """Four succeeded runs with known steps, weight decay, verdicts, slopes and accuracies."""
    engine = make_engine(settings.db_url)
    ids = {
        "steep": store_report(engine, _report({"steps": 30}, "vanishing", -0.8, 0.1)),
        "mild": store_report(engine, _report({"steps": 30, "weight_decay": 0.01}, "vanishing", -0.2, 0.3)),
        "flat": store_report(engine, _report({"steps": 20}, "healthy", 0.05, 0.5)),
        "none": store_report(engine, _report({"steps": 20, "clip_mode": "value"}, "healthy", None, 0.2)),
    }
    yield ids
    engine.dispose()


async def _ids(api: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await api.get("/v1/runs", params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


async def test_every_spec_field_is_a_filter(api: httpx.AsyncClient, runs: dict[str, str]) -> None:
    assert sorted(await _ids(api, steps=30)) == sorted([runs["steep"], runs["mild"]])
    assert await _ids(api, weight_decay=0.01) == [runs["mild"]]
    assert await _ids(api, clip_mode="value") == [runs["none"]]
    # Every field of the spec is accepted, and the "flat" run's values find it.
    flat = Spec.model_validate({**TINY, "steps": 20}).model_dump(mode="json")
    for field, value in flat.items():
        if value is None:
            continue
        response = await api.get("/v1/runs", params={field: str(value).lower() if isinstance(value, bool) else value})
        assert response.status_code == 200, (field, response.text)
        assert response.json()["total"] >= 1, field
    # A value outside a field's choices is a 422 naming the allowed ones.
    body = assert_problem(await api.get("/v1/runs", params={"clip_mode": "sideways"}), 422, "validation_error")
    assert "'norm'" in body["detail"] and "'value'" in body["detail"]


async def test_sort_by_result_metrics(api: httpx.AsyncClient, runs: dict[str, str]) -> None:
    # Runs without the metric sort last either way.
    assert await _ids(api, sort="decades_per_layer") == [runs["steep"], runs["mild"], runs["flat"], runs["none"]]
    assert await _ids(api, sort="-decades_per_layer") == [runs["flat"], runs["mild"], runs["steep"], runs["none"]]
    assert await _ids(api, sort="-eval_accuracy") == [runs["flat"], runs["mild"], runs["none"], runs["steep"]]
    assert (await _ids(api, sort="steps"))[2:] == sorted([runs["steep"], runs["mild"]])
    body = assert_problem(await api.get("/v1/runs", params={"sort": "-happiness"}), 422, "validation_error")
    assert "decades_per_layer" in body["detail"] and "eval_accuracy" in body["detail"]


async def test_listed_runs_carry_their_key_numbers(api: httpx.AsyncClient, runs: dict[str, str]) -> None:
    items = {item["id"]: item for item in (await api.get("/v1/runs")).json()["items"]}
    steep = items[runs["steep"]]["metrics"]
    assert set(steep) == set(KEY_METRICS)
    assert steep["decades_per_layer"] == -0.8 and steep["eval_accuracy"] == 0.1 and steep["total_s"] == 0.1
    assert items[runs["none"]]["metrics"]["decades_per_layer"] is None
    queued = (await api.post("/v1/runs", json=TINY)).json()
    assert queued["metrics"] == dict.fromkeys(KEY_METRICS)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("verdict = 'vanishing' and decades_per_layer < -0.3", ["steep"]),
        ('verdict == "vanishing" AND steps >= 30', ["steep", "mild"]),
        ("decades_per_layer = null", ["none"]),
        ("decades_per_layer != null and eval_accuracy > 0.2", ["mild", "flat"]),
        ("weight_decay != 0", ["mild"]),
        ("clip_mode != 'norm'", ["none"]),
        ("residual = false and steps < 25 and decades_per_layer >= -1e1", ["flat"]),
        ("name = null", ["steep", "mild", "flat", "none"]),
    ],
)
async def test_filter_expressions(
    api: httpx.AsyncClient, runs: dict[str, str], expression: str, expected: list[str]
) -> None:
    assert sorted(await _ids(api, filter=expression)) == sorted(runs[name] for name in expected)


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("happiness > 1", "unknown name 'happiness'"),
        ("verdict = 'sad'", "verdict is one of vanishing, exploding, healthy; got 'sad'"),
        ("verdict < 'vanishing'", "verdict compares with = or != only"),
        ("steps > 'many'", "steps is a number"),
        ("steps >", "incomplete"),
        ("steps > 3 or depth < 2", "expected 'and' between clauses"),
        ("steps > 3; drop table runs", "unexpected character ';'"),
        ("steps > nan", "is not a value"),
        ("decades_per_layer < null", "null compares with = or != only"),
        ("", "the filter is empty"),
        (" and ".join(["steps > 1"] * 51), "at most 50 clauses"),
        ("x" * 2001, "at most 2000"),
    ],
)
async def test_bad_filters_are_422s_that_say_why(
    api: httpx.AsyncClient, runs: dict[str, str], expression: str, says: str
) -> None:
    body = assert_problem(await api.get("/v1/runs", params={"filter": expression}), 422, "validation_error")
    assert says in body["detail"], body["detail"]
    assert body["errors"][0]["loc"] == ["query", "filter"]


async def test_recurrent_and_transformer_fields_filter(api: httpx.AsyncClient, settings: Settings) -> None:
    lstm = {"arch": "lstm", "depth": 2, "width": 16, "dataset": "synthetic"}
    specs = {
        "chrono": {**lstm, "forget_bias": "chrono"},
        "one": {**lstm, "forget_bias": 1.0},
        "vit": {"arch": "transformer", "depth": 2, "width": 16, "heads": 2, "norm_position": "post"},
    }
    ids = {name: (await api.post("/v1/runs", json=spec)).json()["id"] for name, spec in specs.items()}
    assert await _ids(api, forget_bias="chrono") == [ids["chrono"]]
    assert await _ids(api, forget_bias=1) == [ids["one"]]
    assert await _ids(api, heads=2, norm_position="post") == [ids["vit"]]
    assert sorted(await _ids(api, arch="lstm")) == sorted([ids["chrono"], ids["one"]])
    assert await _ids(api, filter="forget_bias >= 0.5") == [ids["one"]]  # 'chrono' is no number
    assert await _ids(api, filter="forget_bias = 'chrono'") == [ids["chrono"]]
    assert (await _ids(api, sort="-forget_bias"))[0] == ids["one"]
    body = assert_problem(await api.get("/v1/runs", params={"forget_bias": "big"}), 422, "validation_error")
    assert {tuple(e["loc"][:2]) for e in body["errors"]} == {("query", "forget_bias")}
    body = assert_problem(await api.get("/v1/runs", params={"filter": "forget_bias = 'big'"}), 422, "validation_error")
    assert "forget_bias is a number or one of 'chrono'" in body["detail"]
