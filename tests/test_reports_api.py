"""POST /v1/reports: external reports stored as runs, listed, compared, exported; and every refusal a 422
that names what is wrong."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from typing import Any

import httpx
import pytest

from graddiag.service.client import AsyncClient, Client, GraddiagError
from graddiag.service.engine.report import Report
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine
from tests.support.api import serve_app
from tests.support.reports import external_report, plain_report, store_report
from tests.support.specs import TINY

pytestmark = pytest.mark.anyio


def _body(report: Report | None = None, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((report or external_report()).model_dump_json())
    data.update(changes)
    return {"report": data, "name": "tiny", "tags": ["cnn", "test"]}


async def test_upload_stores_an_external_run_listed_beside_probes(api: httpx.AsyncClient, settings: Settings) -> None:
    engine = make_engine(settings.db_url)
    try:
        probe_id = store_report(engine, plain_report(TINY))
    finally:
        engine.dispose()
    report = external_report()
    answer = await api.post("/v1/reports", json=_body(report))
    assert answer.status_code == 201, answer.text
    run = answer.json()
    assert answer.headers["location"] == f"/v1/runs/{run['id']}"
    assert (run["source"], run["status"], run["spec"], run["name"], run["tags"]) == (
        "external",
        "succeeded",
        None,
        "tiny",
        ["cnn", "test"],
    )
    assert run["model"]["class_name"] == "TinyNet"
    assert Report.model_validate(run["report"]) == report

    listing = (await api.get("/v1/runs")).json()
    assert {item["id"]: item["source"] for item in listing["items"]} == {run["id"]: "external", probe_id: "probe"}
    only = (await api.get("/v1/runs", params={"source": "external"})).json()
    assert [item["id"] for item in only["items"]] == [run["id"]]
    # A spec filter matches probe runs only: an external run has no spec.
    assert [i["id"] for i in (await api.get("/v1/runs", params={"depth": TINY.depth})).json()["items"]] == [probe_id]

    compared = (await api.get("/v1/compare", params=[("run_id", run["id"]), ("run_id", probe_id)])).json()
    external, probe = compared["runs"]
    assert (external["source"], external["spec"], external["model"]["class_name"]) == ("external", None, "TinyNet")
    assert [layer["name"] for layer in external["layers"]] == [layer.name for layer in report.layers]
    assert probe["source"] == "probe" and probe["spec"]["depth"] == TINY.depth

    rows = list(csv.DictReader(io.StringIO((await api.get(f"/v1/runs/{run['id']}/gradients?format=csv")).text)))
    assert len(rows) == len(report.records) and rows[0]["layer_name"] == "conv1"
    archive = await api.get(f"/v1/runs/{run['id']}/tensorboard")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        assert any(member.name.endswith("events.out.tfevents.graddiag") for member in tar.getmembers())


@pytest.mark.parametrize(
    ("mutate", "where", "says"),
    [
        (lambda r: r["records"][3].update(layer=57), ["body", "report", "records", 3, "layer"], "report's 5 layers"),
        (lambda r: r["records"][0].update(step=6), ["body", "report", "records", 0, "step"], "outside 0 … 5"),
        (lambda r: r["steps"][2].update(step=-1), ["body", "report", "steps", 2, "step"], "outside 0 … 5"),
        (lambda r: r["layers"][1].update(index=7), ["body", "report", "layers", 1, "index"], "0, 1, 2"),
        (lambda r: r["layers"][1].update(name="conv1"), ["body", "report", "layers", 1, "name"], "appears twice"),
        (lambda r: r["records"].append(dict(r["records"][0])), ["body", "report", "records", 20], "second record"),
        (lambda r: r["model"].update(branches=[9]), ["body", "report", "model", "branches", 0], "not one of"),
        (lambda r: r.update(spec=TINY.model_dump(mode="json")), ["body", "report"], "not both"),
        (
            lambda r: r.update(spec=TINY.model_dump(mode="json"), model=None),
            ["body", "report", "spec"],
            "spec must be null",
        ),
    ],
)
async def test_reports_that_do_not_add_up_are_422_naming_the_place(
    api: httpx.AsyncClient, mutate: Any, where: list[Any], says: str
) -> None:
    body = _body()
    mutate(body["report"])
    answer = await api.post("/v1/reports", json=body)
    assert answer.status_code == 422, answer.text
    errors = answer.json()["errors"]
    assert any(e["loc"] == where and says in e["msg"] for e in errors), errors
    assert (await api.get("/v1/runs")).json()["total"] == 0  # nothing was stored


async def test_non_finite_numbers_are_refused(api: httpx.AsyncClient) -> None:
    # JSON has no NaN, but Python's parser takes the NaN/Infinity extensions: they must not slip through.
    text = json.dumps(_body()).replace('"grad_norm": 1.0', '"grad_norm": NaN', 1)
    text = text.replace('"weight_norm": 2.0', '"weight_norm": Infinity', 1)
    answer = await api.post("/v1/reports", content=text, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    kinds = {(tuple(e["loc"][-1:]), e["type"]) for e in answer.json()["errors"]}
    assert {(("grad_norm",), "finite_number"), (("weight_norm",), "finite_number")} <= kinds


async def test_many_problems_make_a_short_answer(api: httpx.AsyncClient) -> None:
    body = _body()
    for record in body["report"]["records"]:
        record["layer"] = 99
    answer = await api.post("/v1/reports", json=body)
    assert answer.status_code == 422 and len(answer.json()["errors"]) == 20


async def test_a_body_over_the_cap_is_413(settings: Settings) -> None:
    async with serve_app(settings.model_copy(update={"max_body_bytes": 4096})) as api:
        answer = await api.post("/v1/reports", json=_body())
    assert answer.status_code == 413


async def test_schema_errors_are_422_too(api: httpx.AsyncClient) -> None:
    for body in (
        {"report": {"layers": []}},
        {**_body(), "tags": ["x" * 51]},
        {**_body(), "unknown": 1},
        _body(model=None),
        _body(model={"class_name": "X", "params": 1, "optimizer": "sgd", "lr": -1}),
    ):
        answer = await api.post("/v1/reports", json=body)
        assert answer.status_code == 422, (body, answer.text)


async def test_async_client_uploads(settings: Settings) -> None:
    async with serve_app(settings) as http:
        gd = AsyncClient(transport=http._transport, base_url="http://test")
        async with gd:
            run = await gd.upload(external_report(), name="async", tags=["a"])
            assert run["source"] == "external" and run["name"] == "async"
            assert (await gd.get(run["id"]))["model"]["class_name"] == "TinyNet"


def test_client_uploads_and_reads_back(client: Client) -> None:
    report = external_report()
    run = client.upload(report, name="sync", tags=["b"])
    assert Report.model_validate(client.get(run["id"])["report"]) == report
    assert client.runs(source="external")["total"] == 1
    broken = json.loads(report.model_dump_json())
    broken["records"][0]["layer"] = 12
    with pytest.raises(GraddiagError) as error:
        client.upload(broken)
    assert error.value.status == 422 and error.value.errors[0]["loc"][-1] == "layer"


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda b: b["report"]["layers"][0].update(name="conv\x001"), ["body", "report", "layers", 0, "name"]),
        (lambda b: b["report"]["verdict"].update(reasons=["\ud800"]), ["body", "report", "verdict", "reasons", 0]),
        (lambda b: b["report"]["model"].update(tied={"\ud800": "fc"}), ["body", "report", "model", "tied"]),
        (lambda b: b.update(tags=["ok", "\ud800"]), ["body", "tags", 1]),
        (lambda b: b["report"]["layers"][0].update(params=2**40), ["body", "report", "layers", 0, "params"]),
    ],
)
async def test_text_and_numbers_no_column_can_hold_are_422_not_500(
    api: httpx.AsyncClient, mutate: Any, where: list[Any]
) -> None:
    # Lone surrogates come in through JSON's \\ud800 escapes; PostgreSQL's text refuses NUL.
    body = _body()
    mutate(body)
    answer = await api.post("/v1/reports", content=json.dumps(body), headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert any(e["loc"] == where for e in answer.json()["errors"]), answer.json()["errors"]
