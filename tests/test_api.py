"""The REST API in-process: httpx over ASGITransport, a temp SQLite file and a real worker thread."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from bench.samples import store_random_run
from graddiag.models.spec import Spec
from graddiag.service.engine.report import Report
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine, make_sessionmaker
from graddiag.service.store.runs import create_run
from graddiag.service.store.tables import SPEC_COLUMNS, RunRecord
from tests.support.api import CSV_FIELDS, LONG, TINY, assert_problem, serve_app
from tests.support.reports import plain_report, store_report, succeed, with_findings

pytestmark = pytest.mark.anyio


async def wait_finished(api: httpx.AsyncClient, run_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = (await api.get(f"/v1/runs/{run_id}")).json()
        if run["status"] in ("succeeded", "failed", "cancelled"):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s")


# --- submitting and reading runs -------------------------------------------------------------------


async def test_submit_queues_run_with_location(api: httpx.AsyncClient) -> None:
    response = await api.post("/v1/runs", json=TINY)
    assert response.status_code == 202
    run = response.json()
    assert run["status"] == "queued" and run["attempt"] == 0 and run["report"] is None
    assert response.headers["location"] == f"/v1/runs/{run['id']}"
    assert Spec.model_validate(run["spec"]) == Spec.model_validate(TINY)

    fetched = await api.get(response.headers["location"])
    assert fetched.status_code == 200
    assert fetched.json()["id"] == run["id"] and fetched.json()["created_at"] == run["created_at"]


async def test_wait_returns_the_verdict_and_report(api: httpx.AsyncClient, worker: None) -> None:
    response = await api.post("/v1/runs", params={"wait": 60}, json=TINY)
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] == "succeeded" and run["attempt"] == 1 and run["error"] is None
    assert run["started_at"] <= run["finished_at"]
    report = run["report"]
    assert set(report) == {"spec", "layers", "steps", "records", "time_records", "verdict", "eval", "timing"}
    assert report["time_records"] == []  # an mlp has no gradient through time
    parsed = Report.model_validate(report)
    assert parsed.spec == Spec.model_validate(TINY)
    assert run["verdict"] == parsed.verdict.label
    # depth 3 hidden layers + the output layer, recorded at every one of the 5 steps (0 = init).
    assert len(parsed.layers) == 4
    assert {r.step for r in parsed.records} == set(range(5))


async def test_wait_gives_202_when_time_runs_out(api: httpx.AsyncClient) -> None:
    start = time.monotonic()
    response = await api.post("/v1/runs", params={"wait": 0.4}, json=TINY)
    assert time.monotonic() - start >= 0.4
    assert response.status_code == 202 and response.json()["status"] == "queued"


async def test_wait_does_not_block_the_event_loop(api: httpx.AsyncClient) -> None:
    waiting = asyncio.create_task(api.post("/v1/runs", params={"wait": 1.5}, json=TINY))
    await asyncio.sleep(0.2)
    start = time.monotonic()
    health = await api.get("/healthz")
    assert health.status_code == 200 and time.monotonic() - start < 0.5
    assert not waiting.done()
    assert (await waiting).status_code == 202


async def test_wait_is_capped(api: httpx.AsyncClient) -> None:
    body = assert_problem(await api.post("/v1/runs", params={"wait": 601}, json=TINY), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["query", "wait"]


async def test_idempotency_key_returns_the_same_run(api: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "sweep-42-point-7"}
    first = await api.post("/v1/runs", json=TINY, headers=headers)
    again = await api.post("/v1/runs", json=TINY, headers=headers)
    assert first.status_code == 202 and again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert (await api.get("/v1/runs")).json()["total"] == 1

    other = await api.post("/v1/runs", json={**TINY, "depth": 4}, headers=headers)
    body = assert_problem(other, 422, "validation_error")
    assert body["errors"][0]["loc"] == ["header", "idempotency-key"]
    assert first.json()["id"] in body["errors"][0]["msg"]


@pytest.mark.parametrize(
    ("change", "loc", "error_type"),
    [
        ({"depth": 1000}, ["body", "depth"], "less_than_equal"),
        ({"activation": "swish"}, ["body", "activation"], "literal_error"),
        ({"colour": "red"}, ["body", "colour"], "extra_forbidden"),
        ({"lr": "fast"}, ["body", "lr"], "float_parsing"),
        # Within the hard cap (100) but above this server's max_depth=50.
        ({"depth": 60}, ["body", "depth"], "over_cap"),
        # Combinations the spec refuses are located at the field their message names.
        ({"arch": "transformer", "width": 30, "heads": 4}, ["body", "width"], "value_error"),
        ({"arch": "lstm", "activation": "relu"}, ["body", "activation"], "value_error"),
        ({"heads": 8}, ["body", "heads"], "value_error"),
        ({"arch": "gru", "forget_bias": 1}, ["body", "forget_bias"], "value_error"),
    ],
)
async def test_invalid_spec_is_422_naming_the_field(
    api: httpx.AsyncClient, change: dict[str, Any], loc: list[str], error_type: str
) -> None:
    body = assert_problem(await api.post("/v1/runs", json={**TINY, **change}), 422, "validation_error")
    assert body["instance"] == "/v1/runs"
    assert [(e["loc"], e["type"]) for e in body["errors"]] == [(loc, error_type)]
    assert body["detail"].startswith(f"{loc[-1]}: ")
    assert (await api.get("/v1/runs")).json()["total"] == 0


async def test_every_invalid_field_is_named(api: httpx.AsyncClient) -> None:
    body = assert_problem(
        await api.post("/v1/runs", json={"depth": 0, "width": 1, "optimizer": "rmsprop"}),
        422,
        "validation_error",
    )
    assert sorted(e["loc"][1] for e in body["errors"]) == ["depth", "optimizer", "width"]


async def test_malformed_json_is_422(api: httpx.AsyncClient) -> None:
    response = await api.post("/v1/runs", content=b'{"depth": ', headers={"content-type": "application/json"})
    body = assert_problem(response, 422, "validation_error")
    assert body["errors"][0]["type"] == "json_invalid"


# --- not found, unknown routes, internal errors -----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/runs/0123abcd"),
        ("GET", "/v1/runs/0123abcd/layers"),
        ("GET", "/v1/runs/0123abcd/gradients"),
        ("POST", "/v1/runs/0123abcd/cancel"),
        ("DELETE", "/v1/runs/0123abcd"),
    ],
)
async def test_unknown_run_is_404(api: httpx.AsyncClient, method: str, path: str) -> None:
    body = assert_problem(await api.request(method, path), 404, "run_not_found")
    assert "0123abcd" in body["detail"] and body["instance"] == path


@pytest.mark.parametrize("path", ["/v1/sweeps/feed", "/v1/sweeps/feed/summary"])
async def test_unknown_sweep_is_404(api: httpx.AsyncClient, path: str) -> None:
    assert_problem(await api.get(path), 404, "sweep_not_found")


async def test_unknown_route_and_method_are_problems(api: httpx.AsyncClient) -> None:
    assert_problem(await api.get("/v1/nothing"), 404, "not_found")
    response = await api.put("/v1/runs")
    assert_problem(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]


async def test_internal_error_is_a_problem_that_leaks_nothing(settings: Settings) -> None:
    engine = make_engine(settings.db_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE run_records"))
    engine.dispose()
    async with serve_app(settings, raise_app_exceptions=False) as api:
        run = (await api.post("/v1/runs", json=TINY)).json()
        response = await api.get(f"/v1/runs/{run['id']}/gradients")
        assert_problem(response, 500, "internal_error")
        leaked = response.text.lower()
        assert "run_records" not in leaked and "sqlite" not in leaked and "traceback" not in leaked


# --- listing ----------------------------------------------------------------------------------------


def _seed_runs(settings: Settings, specs: list[dict[str, Any]]) -> list[str]:
    engine = make_engine(settings.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            return [create_run(session, Spec.model_validate(spec))[0].id for spec in specs]
    finally:
        engine.dispose()


# Two values per indexed spec column; the first run takes the first, the second run the second.
COLUMN_VALUES: dict[str, tuple[Any, Any]] = {
    "arch": ("mlp", "cnn"),
    "activation": ("relu", "tanh"),
    "init": ("default", "orthogonal"),
    "norm": ("none", "batch"),
    "residual": (False, True),
    "depth": (3, 7),
    "width": (16, 32),
    "optimizer": ("sgd", "adam"),
    "lr": (0.01, 0.5),
    "clip_value": (1.0, 5.0),
    "dataset": ("synthetic", "cifar10"),
    "seed": (0, 9),
}


def test_filters_cover_every_indexed_spec_column() -> None:
    assert set(COLUMN_VALUES) == set(SPEC_COLUMNS)


@pytest.mark.parametrize("column", sorted(COLUMN_VALUES))
async def test_filter_on_spec_column(api: httpx.AsyncClient, settings: Settings, column: str) -> None:
    first, second = COLUMN_VALUES[column]
    ids = _seed_runs(settings, [{**TINY, column: first}, {**TINY, column: second}])
    value = str(second).lower() if isinstance(second, bool) else second
    page = (await api.get("/v1/runs", params={column: value})).json()
    assert [r["id"] for r in page["items"]] == [ids[1]] and page["total"] == 1
    assert page["items"][0]["spec"][column] == second


async def test_list_filters_sorting_and_pages(api: httpx.AsyncClient, settings: Settings) -> None:
    specs = [{**TINY, "activation": a, "depth": d} for a in ("sigmoid", "relu") for d in (2, 4, 6, 8)]
    ids = _seed_runs(settings, specs)
    cancelled = ids[0]
    assert (await api.post(f"/v1/runs/{cancelled}/cancel")).status_code == 200

    everything = (await api.get("/v1/runs")).json()
    assert everything["total"] == 8 and everything["limit"] == 50 and everything["offset"] == 0
    assert [r["id"] for r in everything["items"]] == ids[::-1]  # newest first by default

    deep_sigmoid = (await api.get("/v1/runs", params={"activation": "sigmoid", "depth_min": 4, "depth_max": 6})).json()
    assert deep_sigmoid["total"] == 2
    assert sorted(r["spec"]["depth"] for r in deep_sigmoid["items"]) == [4, 6]

    queued = (await api.get("/v1/runs", params={"status": "queued"})).json()
    assert queued["total"] == 7 and cancelled not in {r["id"] for r in queued["items"]}

    by_depth = (await api.get("/v1/runs", params={"sort": "depth", "activation": "relu"})).json()
    assert [r["spec"]["depth"] for r in by_depth["items"]] == [2, 4, 6, 8]
    by_depth_desc = (await api.get("/v1/runs", params={"sort": "-depth", "activation": "relu"})).json()
    assert [r["spec"]["depth"] for r in by_depth_desc["items"]] == [8, 6, 4, 2]

    pages = [
        (await api.get("/v1/runs", params={"limit": 3, "offset": offset, "sort": "created_at"})).json()
        for offset in (0, 3, 6)
    ]
    assert [len(p["items"]) for p in pages] == [3, 3, 2]
    assert all(p["total"] == 8 and p["limit"] == 3 for p in pages)
    assert [r["id"] for p in pages for r in p["items"]] == ids


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"sort": "colour"}, ["query", "sort"]),
        ({"limit": 0}, ["query", "limit"]),
        ({"limit": 1001}, ["query", "limit"]),
        ({"status": "paused"}, ["query", "status"]),
        ({"depht": 3}, ["query", "depht"]),
    ],
)
async def test_bad_list_parameters_are_422(api: httpx.AsyncClient, params: dict[str, Any], loc: list[str]) -> None:
    body = assert_problem(await api.get("/v1/runs", params=params), 422, "validation_error")
    assert [e["loc"] for e in body["errors"]] == [loc]


# --- finished runs: layers, gradients, verdict filter, compare --------------------------------------


async def test_layers_gradients_and_csv_match_the_report(api: httpx.AsyncClient, worker: None) -> None:
    run = (await api.post("/v1/runs", params={"wait": 60}, json=TINY)).json()
    report = run["report"]
    run_id = run["id"]

    layers = (await api.get(f"/v1/runs/{run_id}/layers")).json()
    assert layers == report["layers"]

    rows = (await api.get(f"/v1/runs/{run_id}/gradients")).json()
    assert rows == report["records"] and len(rows) == 4 * 5

    response = await api.get(f"/v1/runs/{run_id}/gradients", params={"format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert run_id in response.headers["content-disposition"]
    reader = csv.DictReader(io.StringIO(response.text))
    assert reader.fieldnames == CSV_FIELDS
    table = list(reader)
    names = {layer["index"]: layer["name"] for layer in report["layers"]}
    assert [row.pop("layer_name") for row in table] == [names[r["layer"]] for r in rows]
    parsed = [
        {k: (None if v == "" else int(v) if k in ("step", "layer") else float(v)) for k, v in row.items()}
        for row in table
    ]
    assert parsed == rows

    layer_1 = (await api.get(f"/v1/runs/{run_id}/gradients", params={"layer": 1})).json()
    assert layer_1 == [r for r in rows if r["layer"] == 1]
    window = (await api.get(f"/v1/runs/{run_id}/gradients", params={"step_from": 2, "step_to": 3, "layer": 0})).json()
    assert [(r["step"], r["layer"]) for r in window] == [(2, 0), (3, 0)]

    by_verdict = (await api.get("/v1/runs", params={"verdict": run["verdict"]})).json()
    assert [r["id"] for r in by_verdict["items"]] == [run_id]
    others = [v for v in ("vanishing", "exploding", "healthy") if v != run["verdict"]]
    for verdict in others:
        assert (await api.get("/v1/runs", params={"verdict": verdict})).json()["total"] == 0


async def test_unfinished_run_has_no_records(api: httpx.AsyncClient) -> None:
    run_id = (await api.post("/v1/runs", json=TINY)).json()["id"]
    assert (await api.get(f"/v1/runs/{run_id}/layers")).json() == []
    assert (await api.get(f"/v1/runs/{run_id}/gradients")).json() == []
    csv_text = (await api.get(f"/v1/runs/{run_id}/gradients", params={"format": "csv"})).text
    assert csv_text.strip() == ",".join(CSV_FIELDS)


async def test_csv_of_50_layers_by_500_steps(api: httpx.AsyncClient, settings: Settings) -> None:
    # Its speed is measured by `make bench` (bench/service.py), not asserted here.
    engine = make_engine(settings.db_url)
    try:
        run_id = store_random_run(engine, layers=50, steps=500)
    finally:
        engine.dispose()
    response = await api.get(f"/v1/runs/{run_id}/gradients", params={"format": "csv"})
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert len(lines) == 1 + 50 * 500
    rows = (await api.get(f"/v1/runs/{run_id}/gradients", params={"layer": 49, "step_from": 499})).json()
    last = dict(zip(CSV_FIELDS, next(csv.reader([lines[-1]])), strict=True))
    assert last.pop("layer_name") == "hidden49.linear"
    assert {k: float(v) for k, v in last.items()} == {k: float(v) for k, v in rows[0].items()}


async def test_compare_profiles_side_by_side(api: httpx.AsyncClient, worker: None) -> None:
    sigmoid = (await api.post("/v1/runs", params={"wait": 60}, json={**TINY, "activation": "sigmoid"})).json()
    relu = (await api.post("/v1/runs", params={"wait": 60}, json=TINY)).json()
    response = await api.get("/v1/compare", params=[("run_id", sigmoid["id"]), ("run_id", relu["id"])])
    assert response.status_code == 200, response.text
    profiles = response.json()["runs"]
    assert [p["run_id"] for p in profiles] == [sigmoid["id"], relu["id"]]
    for profile, run in zip(profiles, (sigmoid, relu), strict=True):
        report = run["report"]
        assert profile["verdict"] == run["verdict"]
        assert (profile["init_step"], profile["last_step"]) == (0, 4)
        assert [(layer["name"], layer["kind"]) for layer in profile["layers"]] == [
            (layer["name"], layer["kind"]) for layer in report["layers"]
        ]
        for layer in profile["layers"]:
            for key, step in (("init", 0), ("last", 4)):
                record = next(r for r in report["records"] if r["step"] == step and r["layer"] == layer["index"])
                assert layer[key] == {k: record[k] for k in ("grad_norm", "act_grad_norm", "rel_grad")}


async def test_compare_refuses_unfinished_and_unknown_runs(api: httpx.AsyncClient) -> None:
    queued = (await api.post("/v1/runs", json=TINY)).json()["id"]
    body = assert_problem(await api.get("/v1/compare", params={"run_id": queued}), 409, "run_not_succeeded")
    assert body["errors"][0]["loc"] == ["query", "run_id", 0] and queued in body["detail"]
    assert_problem(await api.get("/v1/compare", params={"run_id": "missing"}), 404, "run_not_found")
    assert_problem(await api.get("/v1/compare"), 422, "validation_error")


# --- cancel and delete ------------------------------------------------------------------------------


async def test_cancel_queued_then_409(api: httpx.AsyncClient) -> None:
    run_id = (await api.post("/v1/runs", json=TINY)).json()["id"]
    response = await api.post(f"/v1/runs/{run_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]
    again = assert_problem(await api.post(f"/v1/runs/{run_id}/cancel"), 409, "run_finished")
    assert "cancelled" in again["detail"]


async def test_cancel_running_run(api: httpx.AsyncClient, worker: None) -> None:
    run_id = (await api.post("/v1/runs", json=LONG)).json()["id"]
    deadline = time.monotonic() + 30
    while (run := (await api.get(f"/v1/runs/{run_id}")).json())["status"] != "running":
        assert time.monotonic() < deadline and run["status"] == "queued", run
        await asyncio.sleep(0.02)
    response = await api.post(f"/v1/runs/{run_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    requested = time.monotonic()
    final = await wait_finished(api, run_id, timeout=10)
    assert final["status"] == "cancelled" and time.monotonic() - requested < 5
    assert (await api.get(f"/v1/runs/{run_id}/gradients")).json() == []
    assert_problem(await api.post(f"/v1/runs/{run_id}/cancel"), 409, "run_finished")


async def test_finished_run_cannot_be_cancelled(api: httpx.AsyncClient, worker: None) -> None:
    run = (await api.post("/v1/runs", params={"wait": 60}, json=TINY)).json()
    assert run["status"] == "succeeded"
    assert_problem(await api.post(f"/v1/runs/{run['id']}/cancel"), 409, "run_finished")


async def test_delete_removes_run_and_records(api: httpx.AsyncClient, settings: Settings, worker: None) -> None:
    run_id = (await api.post("/v1/runs", params={"wait": 60}, json=TINY)).json()["id"]
    engine = make_engine(settings.db_url)

    def records() -> int:
        with engine.connect() as connection:
            count = select(func.count()).select_from(RunRecord).where(RunRecord.run_id == run_id)
            return int(connection.scalar(count) or 0)

    try:
        assert records() == 20
        response = await api.delete(f"/v1/runs/{run_id}")
        assert response.status_code == 204 and response.content == b""
        assert records() == 0
    finally:
        engine.dispose()
    assert_problem(await api.get(f"/v1/runs/{run_id}"), 404, "run_not_found")
    assert_problem(await api.delete(f"/v1/runs/{run_id}"), 404, "run_not_found")


# --- sweeps -----------------------------------------------------------------------------------------


async def test_sweep_status_and_summary(api: httpx.AsyncClient, worker: None) -> None:
    body = {
        "base": {**TINY, "steps": 3},
        "grid": {"activation": ["sigmoid", "relu"], "depth": [2, 4]},
    }
    response = await api.post("/v1/sweeps", json=body)
    assert response.status_code == 202, response.text
    sweep = response.json()
    assert response.headers["location"] == f"/v1/sweeps/{sweep['id']}"
    assert sweep["total"] == 4 and not sweep["done"]
    assert sorted((r["grid"]["activation"], r["grid"]["depth"]) for r in sweep["runs"]) == [
        ("relu", 2),
        ("relu", 4),
        ("sigmoid", 2),
        ("sigmoid", 4),
    ]
    in_sweep = (await api.get("/v1/runs", params={"sweep_id": sweep["id"]})).json()
    assert in_sweep["total"] == 4

    deadline = time.monotonic() + 60
    while not (status := (await api.get(f"/v1/sweeps/{sweep['id']}")).json())["done"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert status["counts"]["succeeded"] == 4
    assert all(r["verdict"] in ("vanishing", "exploding", "healthy") for r in status["runs"])

    summary = (await api.get(f"/v1/sweeps/{sweep['id']}/summary")).json()
    assert summary["done"] and len(summary["configs"]) == 2
    verdicts = {(r["grid"]["activation"], r["grid"]["depth"]): r["verdict"] for r in status["runs"]}
    for config in summary["configs"]:
        activation = config["config"]["activation"]
        assert config["depths"] == [2, 4]
        assert config["verdicts"] == [verdicts[(activation, d)] for d in (2, 4)]
        unhealthy = [d for d, v in zip(config["depths"], config["verdicts"], strict=True) if v != "healthy"]
        assert config["critical_depth"] == (unhealthy[0] if unhealthy else None)


@pytest.mark.parametrize(
    ("body", "loc_prefix"),
    [
        ({"base": TINY, "grid": {"depth": [2, 60]}}, ["grid", 1, "depth"]),  # over this server's cap
        ({"base": TINY, "grid": {"activation": ["relu", "swish"]}}, ["grid", 1, "activation"]),
        ({"base": TINY, "grid": {"colour": ["red"]}}, ["grid", "colour"]),
        ({"base": TINY, "grid": {"depth": [2, 3, 4], "seed": [0, 1, 2]}}, ["grid"]),  # 9 > 8 points
    ],
)
async def test_invalid_sweep_is_422_naming_the_point(
    api: httpx.AsyncClient, body: dict[str, Any], loc_prefix: list[Any]
) -> None:
    problem = assert_problem(await api.post("/v1/sweeps", json=body), 422, "sweep_invalid")
    assert problem["errors"][0]["loc"] == loc_prefix
    assert (await api.get("/v1/runs")).json()["total"] == 0


async def test_sweep_body_is_validated(api: httpx.AsyncClient) -> None:
    body = assert_problem(await api.post("/v1/sweeps", json={"grid": {}}), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["body", "grid"]
    body = assert_problem(
        await api.post("/v1/sweeps", json={"grid": {"depth": [2]}, "extra": 1}), 422, "validation_error"
    )
    assert body["errors"][0]["loc"] == ["body", "extra"]


# --- findings -------------------------------------------------------------------------------------


async def test_runs_filter_by_finding_and_list_their_kinds(api: httpx.AsyncClient, settings: Settings) -> None:
    spec = Spec.model_validate(TINY)
    engine = make_engine(settings.db_url)
    try:
        step = store_report(engine, with_findings(plain_report(spec), "step_size"))
        both = store_report(engine, with_findings(plain_report(spec, "vanishing"), "forward_signal", "step_size"))
        clean = store_report(engine, plain_report(spec))
    finally:
        engine.dispose()
    (queued,) = _seed_runs(settings, [TINY])

    async def ids(*findings: str, **params: Any) -> list[str]:
        page = (await api.get("/v1/runs", params=[*(("finding", f) for f in findings), *params.items()])).json()
        assert page["total"] == len(page["items"])
        return sorted(r["id"] for r in page["items"])

    assert await ids("step_size") == sorted([step, both])
    assert await ids("step_size", "forward_signal") == [both]  # repeated: runs with all of them
    assert await ids("forward_signal", verdict="healthy") == []
    assert await ids("nonfinite") == []
    assert await ids(*["step_size"] * 3000) == sorted([step, both])  # one condition per distinct kind
    kinds = {r["id"]: r["finding_kinds"] for r in (await api.get("/v1/runs")).json()["items"]}
    assert kinds == {step: ["step_size"], both: ["forward_signal", "step_size"], clean: [], queued: None}

    problem = assert_problem(await api.get("/v1/runs", params={"finding": "step-size"}), 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["query", "finding", 0]
    assert "'step_size'" in problem["errors"][0]["msg"] and "'gradient_profile'" in problem["errors"][0]["msg"]


async def test_run_serves_findings_and_the_new_record_fields(api: httpx.AsyncClient, settings: Settings) -> None:
    report = with_findings(plain_report(Spec.model_validate(TINY)), "forward_signal", "structural_zero_bias")
    engine = make_engine(settings.db_url)
    try:
        run_id = store_report(engine, report)
    finally:
        engine.dispose()
    run = (await api.get(f"/v1/runs/{run_id}")).json()
    assert Report.model_validate(run["report"]) == report
    assert run["finding_kinds"] == ["forward_signal", "structural_zero_bias"]
    first = run["report"]["verdict"]["findings"][0]
    assert (first["kind"], first["severity"], first["phase"]) == ("forward_signal", "critical", "init")
    assert first["evidence"]["span_decades"] == 2.5 and first["advice"][0].endswith("(finding: forward_signal).")
    layers = (await api.get(f"/v1/runs/{run_id}/layers")).json()
    assert [layer["structural_zero_bias"] for layer in layers] == [True, False, False, False]

    rows = (await api.get(f"/v1/runs/{run_id}/gradients")).json()
    assert {"act_norm", "penalty_grad_norm"} <= set(rows[0])
    assert [r["act_norm"] for r in rows if r["step"] == 0] == [1.0, 2.0, 4.0, 8.0]
    reader = csv.DictReader(io.StringIO((await api.get(f"/v1/runs/{run_id}/gradients?format=csv")).text))
    assert reader.fieldnames == CSV_FIELDS and reader.fieldnames[-2:] == ["act_norm", "penalty_grad_norm"]
    csv_rows = list(reader)
    assert [float(r["act_norm"]) for r in csv_rows if r["step"] == "0"] == [1.0, 2.0, 4.0, 8.0]
    assert csv_rows[0]["penalty_grad_norm"] == "0.001" and csv_rows[-1]["penalty_grad_norm"] == ""


async def test_sweep_shows_findings_per_run_and_cell_and_filters(api: httpx.AsyncClient, settings: Settings) -> None:
    body = {"base": TINY, "grid": {"norm": ["none", "batch"], "depth": [2, 4]}}
    sweep = (await api.post("/v1/sweeps", json=body)).json()
    point = {(r["grid"]["norm"], r["grid"]["depth"]): r["run_id"] for r in sweep["runs"]}
    engine = make_engine(settings.db_url)
    try:
        for (norm, depth), kinds in {
            ("batch", 2): ("structural_zero_bias",),
            ("batch", 4): ("gradient_profile", "structural_zero_bias"),
            ("none", 2): (),
        }.items():
            spec = Spec.model_validate({**TINY, "norm": norm, "depth": depth})
            succeed(engine, point[(norm, depth)], with_findings(plain_report(spec, "exploding"), *kinds))
    finally:
        engine.dispose()
    sweep_url = f"/v1/sweeps/{sweep['id']}"

    status = (await api.get(sweep_url)).json()
    findings = {r["run_id"]: r["findings"] for r in status["runs"]}
    assert findings[point[("none", 4)]] is None and findings[point[("none", 2)]] == []
    assert [(f["kind"], f["severity"]) for f in findings[point[("batch", 4)]]] == [
        ("gradient_profile", "critical"),
        ("structural_zero_bias", "warning"),
    ]
    filtered = (await api.get(sweep_url, params={"finding": "gradient_profile"})).json()
    assert [r["run_id"] for r in filtered["runs"]] == [point[("batch", 4)]]
    assert filtered["total"] == 4 and filtered["counts"] == status["counts"]

    summary = (await api.get(f"{sweep_url}/summary")).json()
    configs = {c["config"]["norm"]: c for c in summary["configs"]}
    assert summary["finding"] is None
    assert [[f["kind"] for f in cell] for cell in configs["batch"]["findings"]] == [
        ["structural_zero_bias"],
        ["gradient_profile", "structural_zero_bias"],
    ]
    assert configs["batch"]["finding_depths"] == {"structural_zero_bias": 2, "gradient_profile": 4}
    assert configs["none"]["findings"] == [[], None] and configs["none"]["finding_depths"] == {}
    only = (await api.get(f"{sweep_url}/summary", params={"finding": "gradient_profile"})).json()
    assert only["finding"] == "gradient_profile" and [c["config"] for c in only["configs"]] == [{"norm": "batch"}]

    for path in (sweep_url, f"{sweep_url}/summary"):
        problem = assert_problem(await api.get(path, params={"finding": "bogus"}), 422, "validation_error")
        assert problem["errors"][0]["loc"] == ["query", "finding"] and "'dead_units'" in problem["errors"][0]["msg"]


# --- health, readiness, OpenAPI ---------------------------------------------------------------------


async def test_health_and_readiness(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    ready = await api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["database"]["ok"]
    assert "not monitored" in ready.json()["workers"]["detail"]


@pytest.mark.parametrize(("alive", "status"), [((2, 2), 200), ((1, 2), 200), ((0, 2), 503), ((0, 0), 200)])
async def test_readiness_follows_local_workers(settings: Settings, alive: tuple[int, int], status: int) -> None:
    async with serve_app(settings, probe=lambda: alive) as api:
        response = await api.get("/readyz")
        assert response.status_code == status
        assert response.json()["workers"]["ok"] is (status == 200)


async def test_not_ready_without_schema(tmp_path: Path) -> None:
    settings = Settings(db_url=f"sqlite:///{tmp_path / 'empty.db'}", cache_dir=tmp_path)
    async with serve_app(settings) as api:
        response = await api.get("/readyz")
        assert response.status_code == 503
        assert response.json()["status"] == "not_ready" and not response.json()["database"]["ok"]
        assert (await api.get("/healthz")).status_code == 200


async def test_openapi_documents_the_api(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in (
        "/v1/runs",
        "/v1/runs/{run_id}",
        "/v1/runs/{run_id}/layers",
        "/v1/runs/{run_id}/gradients",
        "/v1/runs/{run_id}/time",
        "/v1/runs/{run_id}/cancel",
        "/v1/sweeps",
        "/v1/sweeps/{sweep_id}",
        "/v1/sweeps/{sweep_id}/summary",
        "/v1/compare",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    assert "Report" in schema["components"]["schemas"]
    time_200 = paths["/v1/runs/{run_id}/time"]["get"]["responses"]["200"]["content"]
    assert (
        time_200["application/json"]["schema"] == {"$ref": "#/components/schemas/TimeProfile"}
        and "text/csv" in time_200
    )
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, method in (("/v1/runs", "post"), ("/v1/runs/{run_id}/cancel", "post"), ("/v1/compare", "get")):
        responses = paths[path][method]["responses"]
        assert all(responses[s]["content"] == problem for s in responses if s[0] in "45"), path
    assert paths["/v1/runs/{run_id}/cancel"]["post"]["responses"]["409"]["content"] == problem
    ready_503 = paths["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]
    assert ready_503 == {"$ref": "#/components/schemas/Readiness"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert (await api.get("/docs")).status_code == 200
