"""`GET /v1/runs/{id}/time` (the gradient through time, JSON and CSV, filters and their 422s), time records in
the run's report and in uploaded reports (POST /v1/reports), and the clients' `time()`."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from graddiag.models.shapes import time_record_count
from graddiag.models.spec import Spec
from graddiag.service.api import reports as reports_api
from graddiag.service.api import runs as runs_api
from graddiag.service.api.schemas import TimeProfile
from graddiag.service.client import AsyncClient, Client, GraddiagError
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.report import Report
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine, make_sessionmaker
from graddiag.service.store.runs import create_run
from tests.support.api import assert_problem, serve_app
from tests.support.reports import external_report, plain_report, recurrent_report, store_report
from tests.support.specs import TINY

pytestmark = pytest.mark.anyio

LSTM = Spec(arch="lstm", depth=2, width=16, steps=3, batch_size=8, dataset="synthetic")
TIME_CSV = [
    "step",
    "layer",
    "layer_name",
    "t",
    "grad_norm",
    "cell_grad_norm",
    "state_rms",
    "gate_mean",
    "saturation_frac",
]


def _stored(settings: Settings, report: Report) -> str:
    engine = make_engine(settings.db_url)
    try:
        return store_report(engine, report)
    finally:
        engine.dispose()


def _rows(report: Report) -> list[dict[str, Any]]:
    return [row.model_dump(mode="json") for row in report.time_records]


async def test_time_json_has_the_recurrent_layers_and_every_row_in_order(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    report = recurrent_report(LSTM, time_steps=4)
    run_id = _stored(settings, report)
    answer = await api.get(f"/v1/runs/{run_id}/time")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json" and answer.headers["vary"] == "Accept"
    body = answer.json()
    assert set(body) == {"run_id", "layers", "rows"}
    assert body["run_id"] == run_id
    assert body["layers"] == [{"index": 1, "name": "lstm1.hh"}, {"index": 3, "name": "lstm2.hh"}]
    assert body["rows"] == _rows(report)
    assert [(r["step"], r["layer"], r["t"]) for r in body["rows"]][:5] == [
        (0, 1, 0),
        (0, 1, 1),
        (0, 1, 2),
        (0, 1, 3),
        (0, 3, 0),
    ]
    TimeProfile.model_validate(body)  # the documented shape

    one_layer = (await api.get(f"/v1/runs/{run_id}/time", params={"layer": 3})).json()
    assert one_layer["rows"] == [r for r in _rows(report) if r["layer"] == 3]
    assert one_layer["layers"] == body["layers"]  # the filter keeps the layer list whole
    both = (await api.get(f"/v1/runs/{run_id}/time", params={"layer": 1, "step": 2})).json()
    assert [(r["step"], r["layer"], r["t"]) for r in both["rows"]] == [(2, 1, t) for t in range(4)]

    # The run's report carries the same rows, and the other per-run endpoints still answer for it.
    detail = (await api.get(f"/v1/runs/{run_id}")).json()
    assert Report.model_validate(detail["report"]) == report
    assert detail["report"]["time_records"] == body["rows"]
    gradients = list(csv.DictReader(io.StringIO((await api.get(f"/v1/runs/{run_id}/gradients?format=csv")).text)))
    assert [row["layer_name"] for row in gradients[:5]] == [
        "lstm1.ih",
        "lstm1.hh",
        "lstm2.ih",
        "lstm2.hh",
        "output.linear",
    ]
    layers = (await api.get(f"/v1/runs/{run_id}/layers")).json()
    assert [layer["kind"] for layer in layers] == ["linear", "recurrent", "linear", "recurrent", "linear"]


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"format": "csv"}, {}),
        ({}, {"Accept": "text/csv"}),
        ({}, {"Accept": "application/json;q=0.5, text/csv"}),
        ({"format": "csv"}, {"Accept": "application/json"}),  # the query parameter wins
    ],
)
async def test_time_csv_by_format_or_accept(
    api: httpx.AsyncClient, settings: Settings, params: dict[str, str], headers: dict[str, str]
) -> None:
    # rnn relu: no cell gradient, no gate, no saturation (empty cells).
    spec = LSTM.model_copy(update={"arch": "rnn", "activation": "relu"})
    report = recurrent_report(spec, time_steps=3)
    run_id = _stored(settings, report)
    answer = await api.get(f"/v1/runs/{run_id}/time", params=params, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert answer.headers["content-disposition"] == f'attachment; filename="{run_id}-time.csv"'
    reader = csv.DictReader(io.StringIO(answer.text))
    assert reader.fieldnames == TIME_CSV
    rows = list(reader)
    assert len(rows) == len(report.time_records) == 2 * 2 * 3
    first = report.time_records[0]
    assert rows[0] == {
        "step": "0",
        "layer": "1",
        "layer_name": "rnn1.hh",
        "t": "0",
        "grad_norm": repr(first.grad_norm),
        "cell_grad_norm": "",
        "state_rms": repr(first.state_rms),
        "gate_mean": "",
        "saturation_frac": "",
    }
    assert {row["layer_name"] for row in rows} == {"rnn1.hh", "rnn2.hh"}


@pytest.mark.parametrize(
    "headers", [{}, {"Accept": "application/json"}, {"Accept": "text/csv;q=0.2, */*"}, {"Accept": "text/html"}]
)
async def test_json_unless_csv_is_preferred(
    api: httpx.AsyncClient, settings: Settings, headers: dict[str, str]
) -> None:
    run_id = _stored(settings, recurrent_report(LSTM, time_steps=2))
    answer = await api.get(f"/v1/runs/{run_id}/time", headers=headers)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"


async def test_runs_without_recurrent_layers_or_report_have_no_rows(api: httpx.AsyncClient, settings: Settings) -> None:
    mlp_id = _stored(settings, plain_report(TINY))
    assert (await api.get(f"/v1/runs/{mlp_id}/time")).json() == {"run_id": mlp_id, "layers": [], "rows": []}
    csv_text = (await api.get(f"/v1/runs/{mlp_id}/time", params={"format": "csv"})).text
    assert csv_text.strip() == ",".join(TIME_CSV)
    engine = make_engine(settings.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            queued_id = create_run(session, LSTM)[0].id
    finally:
        engine.dispose()
    # Nothing recorded yet: no rows, and filters cannot be checked against layers the run does not have yet.
    queued = await api.get(f"/v1/runs/{queued_id}/time", params={"layer": 1, "step": 0})
    assert queued.json() == {"run_id": queued_id, "layers": [], "rows": []}
    # An mlp run has layers, none recurrent: a layer filter is a 422 saying so.
    answer = await api.get(f"/v1/runs/{mlp_id}/time", params={"layer": 0})
    problem = assert_problem(answer, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["query", "layer"]
    assert "it has no recurrent layers" in problem["errors"][0]["msg"]


@pytest.mark.parametrize(
    ("params", "where", "says"),
    [
        (
            {"layer": 0},
            "layer",
            "layer 0 is not a recurrent layer of this run: its recurrent layers are 1 (lstm1.hh), 3",
        ),
        ({"layer": 4}, "layer", "layer 4 is not a recurrent layer"),
        ({"step": 1}, "step", "step 1 has no time records; recorded steps: 0, 2"),
        ({"layer": -1}, "layer", "greater than or equal to 0"),
        ({"layer": "x"}, "layer", "integer"),
        ({"step": 2**40}, "step", "less than or equal to"),
        ({"format": "xml"}, "format", "'json' or 'csv'"),
    ],
)
async def test_bad_filters_are_422_naming_them(
    api: httpx.AsyncClient, settings: Settings, params: dict[str, Any], where: str, says: str
) -> None:
    run_id = _stored(settings, recurrent_report(LSTM, time_steps=2))
    answer = await api.get(f"/v1/runs/{run_id}/time", params=params)
    problem = assert_problem(answer, 422, "validation_error")
    assert any(e["loc"] == ["query", where] and says in e["msg"] for e in problem["errors"]), problem


async def test_an_answer_too_large_asks_for_a_layer(
    api: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = _stored(settings, recurrent_report(LSTM, time_steps=4))  # 2 steps x 2 layers x 4 t = 16 rows
    monkeypatch.setattr(runs_api, "MAX_TIME_RECORDS", 10)
    problem = assert_problem(await api.get(f"/v1/runs/{run_id}/time"), 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["query", "layer"]
    assert problem["errors"][0]["msg"] == "16 time records match, over the 10 one answer holds: ask for one layer"
    assert len((await api.get(f"/v1/runs/{run_id}/time", params={"layer": 3})).json()["rows"]) == 8


async def test_a_spec_over_the_time_records_cap_is_refused_naming_what_sizes_them(api: httpx.AsyncClient) -> None:
    # 5000 recorded steps x 4 layers x 32 time steps = 640 000 rows: under the memory cap, over the rows'.
    fields = {
        **TINY.model_dump(mode="json", exclude_defaults=True),
        "arch": "lstm",
        "depth": 4,
        "width": 8,
        "batch_size": 2,
        "steps": 5000,
        "record_every": 1,
    }
    problem = assert_problem(await api.post("/v1/runs", json=fields), 422, "validation_error")
    assert [e["loc"] for e in problem["errors"]] == [["body", "steps"], ["body", "record_every"], ["body", "depth"]]
    assert "would record 640,000 time records" in problem["errors"][0]["msg"]
    assert "500,000" in problem["errors"][0]["msg"]
    # Recorded every other step: 2500 x 4 x 32 = 320 000 rows, accepted.
    assert (await api.post("/v1/runs", json={**fields, "record_every": 2})).status_code == 202


def test_time_record_count_is_the_probes() -> None:
    spec = TINY.model_copy(update={"arch": "rnn", "activation": "tanh", "depth": 2, "steps": 7, "record_every": 3})
    report = run_probe(spec)
    assert len(report.time_records) == time_record_count(spec) == 3 * 2 * 32  # steps 0, 3, 6


async def test_unknown_run_is_404(api: httpx.AsyncClient) -> None:
    assert_problem(await api.get("/v1/runs/0123456789abcdef0123456789abcdef/time"), 404, "run_not_found")


# --- uploads ----------------------------------------------------------------------------------------------


def _recurrent_upload(**changes: Any) -> dict[str, Any]:
    """An external report with the layers and time records of a 2-layer LSTM (steps 0 and 2 of 6)."""
    base = recurrent_report(LSTM, time_steps=3)
    report = external_report().model_copy(
        update={"layers": base.layers, "records": base.records, "time_records": base.time_records}
    )
    data: dict[str, Any] = json.loads(report.model_dump_json())
    data.update(changes)
    return {"report": data, "name": "my-lstm", "tags": []}


async def test_uploaded_time_records_are_stored_and_served(api: httpx.AsyncClient) -> None:
    body = _recurrent_upload()
    answer = await api.post("/v1/reports", json=body)
    assert answer.status_code == 201, answer.text
    run = answer.json()
    assert run["report"]["time_records"] == body["report"]["time_records"]
    served = (await api.get(f"/v1/runs/{run['id']}/time")).json()
    assert served["layers"] == [{"index": 1, "name": "lstm1.hh"}, {"index": 3, "name": "lstm2.hh"}]
    assert served["rows"] == body["report"]["time_records"]


@pytest.mark.parametrize(
    ("mutate", "where", "says"),
    [
        (lambda rows: rows[0].update(layer=0), [0, "layer"], "layer 0 is not a recurrent layer of the report"),
        (lambda rows: rows[1].update(layer=77), [1, "layer"], "the report's: 1, 3"),
        (lambda rows: rows[2].update(step=6), [2, "step"], "step 6 is outside 0 … 5"),
        (lambda rows: rows[2].update(step=-3), [2, "step"], "step -3 is outside"),
        (lambda rows: rows[3].update(t=-1), [3, "t"], "t=-1; a time step is 0 …"),
        (lambda rows: rows[4].update(t=2**31), [4, "t"], "a time step is 0 … 2147483647"),
        (
            lambda rows: rows.append(dict(rows[5])),
            [len(_recurrent_upload()["report"]["time_records"])],
            "second time record",
        ),
        (lambda rows: rows[0].pop("grad_norm"), [0, "grad_norm"], "Field required"),
        (lambda rows: rows[0].update(extra=1), [0, "extra"], "Extra inputs are not permitted"),
        (lambda rows: rows[0].update(gate_mean="high"), [0, "gate_mean"], "valid number"),
    ],
)
async def test_uploaded_time_records_that_do_not_add_up_are_422(
    api: httpx.AsyncClient, mutate: Any, where: list[Any], says: str
) -> None:
    body = _recurrent_upload()
    mutate(body["report"]["time_records"])
    answer = await api.post("/v1/reports", json=body)
    problem = assert_problem(answer, 422, "validation_error")
    place = ["body", "report", "time_records", *where]
    assert any(e["loc"] == place and says in e["msg"] for e in problem["errors"]), problem["errors"]
    assert (await api.get("/v1/runs")).json()["total"] == 0  # nothing was stored


async def test_uploaded_time_records_must_be_finite_and_within_the_cap(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = json.dumps(_recurrent_upload())
    at = text.index('"time_records"')
    text = text[:at] + text[at:].replace('"state_rms": 0.5', '"state_rms": NaN', 1)
    answer = await api.post("/v1/reports", content=text, headers={"content-type": "application/json"})
    problem = assert_problem(answer, 422, "validation_error")
    assert next(e for e in problem["errors"] if e["type"] == "finite_number")["loc"] == [
        "body",
        "report",
        "time_records",
        0,
        "state_rms",
    ]
    monkeypatch.setattr(reports_api, "MAX_TIME_RECORDS", 5)
    problem = assert_problem(await api.post("/v1/reports", json=_recurrent_upload()), 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["body", "report", "time_records"]
    assert problem["errors"][0]["msg"] == "12 time_records; at most 5 are accepted"


# --- clients ----------------------------------------------------------------------------------------------


async def test_async_client_reads_the_rows(settings: Settings) -> None:
    report = recurrent_report(LSTM.model_copy(update={"arch": "gru"}), time_steps=3)
    run_id = _stored(settings, report)
    async with serve_app(settings) as http, AsyncClient(transport=http._transport, base_url="http://test") as gd:
        assert await gd.time(run_id) == _rows(report)
        only = await gd.time(run_id, layer=3, step=2)
        assert only == [r for r in _rows(report) if (r["layer"], r["step"]) == (3, 2)] and len(only) == 3
        text = await gd.time(run_id, fmt="csv")
        assert text.splitlines()[0] == ",".join(TIME_CSV) and len(text.splitlines()) == 1 + len(report.time_records)
        with pytest.raises(GraddiagError) as refused:
            await gd.time(run_id, layer=0)
        assert refused.value.status == 422 and refused.value.errors[0]["loc"] == ["query", "layer"]


def test_client_reads_the_rows(client: Client, settings: Settings) -> None:
    report = recurrent_report(LSTM, time_steps=2)
    run_id = _stored(settings, report)
    assert client.time(run_id) == _rows(report)
    assert client.time(run_id, step=0) == [r for r in _rows(report) if r["step"] == 0]
    table = list(csv.DictReader(io.StringIO(client.time(run_id, layer=1, fmt="csv"))))
    assert [(row["layer_name"], row["t"]) for row in table] == [("lstm1.hh", "0"), ("lstm1.hh", "1")] * 2
    with pytest.raises(GraddiagError) as missing:
        client.time("0123456789abcdef0123456789abcdef")
    assert missing.value.status == 404


async def test_tensorboard_download_built_from_the_report_has_the_time_records(
    api: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing import event_accumulator

    report = recurrent_report(LSTM, time_steps=4)
    run_id = _stored(settings, report)
    answer = await api.get(f"/v1/runs/{run_id}/tensorboard")
    assert answer.status_code == 200 and answer.headers["graddiag-events-source"] == "report"
    with tarfile.open(fileobj=io.BytesIO(answer.content), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    (events,) = tmp_path.rglob("events.out.tfevents.graddiag")
    accumulator = event_accumulator.EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    last = {event.step: event.value for event in accumulator.Scalars("time/lstm2.hh/grad_norm/last")}
    expected = {r.t: r.grad_norm for r in report.time_records if (r.layer, r.step) == (3, 2)}
    assert last == pytest.approx(expected, rel=1e-6)
    assert set(accumulator.Tags()["images"]) == {"time/lstm1.hh/heatmap", "time/lstm2.hh/heatmap"}


# --- end to end -------------------------------------------------------------------------------------------


async def test_an_lstm_run_through_the_worker_serves_its_time_records(settings: Settings, worker: None) -> None:
    spec = {"arch": "lstm", "depth": 2, "width": 16, "steps": 3, "dataset": "synthetic", "batch_size": 8}
    async with serve_app(settings) as api:
        run = (await api.post("/v1/runs", params={"wait": 120}, json=spec)).json()
        assert run["status"] == "succeeded", run
        served = (await api.get(f"/v1/runs/{run['id']}/time")).json()
        table = list(csv.DictReader(io.StringIO((await api.get(f"/v1/runs/{run['id']}/time?format=csv")).text)))
    report = Report.model_validate(run["report"])
    assert served["layers"] == [{"index": 1, "name": "lstm1.hh"}, {"index": 3, "name": "lstm2.hh"}]
    assert served["rows"] == _rows(report)
    recorded = sorted({record.step for record in report.records})
    assert [(r["step"], r["layer"], r["t"]) for r in served["rows"]] == [
        (step, layer, t) for step in recorded for layer in (1, 3) for t in range(32)
    ]
    assert all(r["grad_norm"] > 0 and r["cell_grad_norm"] > 0 for r in served["rows"])
    assert len(table) == len(served["rows"]) and {row["layer_name"] for row in table} == {"lstm1.hh", "lstm2.hh"}
    assert [float(row["grad_norm"]) for row in table] == [r["grad_norm"] for r in served["rows"]]


async def test_a_transformer_run_through_the_worker_has_no_time_records(settings: Settings, worker: None) -> None:
    spec = {"arch": "transformer", "depth": 2, "width": 16, "heads": 2, "steps": 2, "dataset": "synthetic"}
    async with serve_app(settings) as api:
        run = (await api.post("/v1/runs", params={"wait": 120}, json={**spec, "batch_size": 8})).json()
        assert run["status"] == "succeeded", run
        served = (await api.get(f"/v1/runs/{run['id']}/time")).json()
        table = list(csv.DictReader(io.StringIO((await api.get(f"/v1/runs/{run['id']}/gradients?format=csv")).text)))
        layers = (await api.get(f"/v1/runs/{run['id']}/layers")).json()
    assert served == {"run_id": run["id"], "layers": [], "rows": []}
    report = Report.model_validate(run["report"])
    assert report.time_records == [] and {"attention", "embedding", "norm"} <= {layer.kind for layer in report.layers}
    assert layers == run["report"]["layers"]
    assert len(table) == len(report.records) and "block1.attn.q" in {row["layer_name"] for row in table}
