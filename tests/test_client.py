"""The Python clients: Client over real HTTP (uvicorn in a thread), AsyncClient in-process (ASGI)."""

from __future__ import annotations

import csv
import io
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from graddiag.models.spec import Spec
from graddiag.service.api import create_app
from graddiag.service.client import AsyncClient, Client, GraddiagError, RunFailed
from graddiag.service.engine.report import Report
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine
from tests.support.api import CSV_FIELDS, LONG, TINY
from tests.support.reports import plain_report, store_report, succeed, with_findings


@pytest.fixture
async def aclient(settings: Settings) -> AsyncIterator[AsyncClient]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        AsyncClient("http://graddiag.test", transport=httpx.ASGITransport(app)) as gd,
    ):
        yield gd


# --- sync client over HTTP --------------------------------------------------------------------------


def test_run_returns_the_succeeded_run_with_its_report(client: Client, worker: None) -> None:
    run = client.run(Spec.model_validate(TINY), timeout=60)
    assert run["status"] == "succeeded"
    report = Report.model_validate(run["report"])
    assert report.verdict.label == run["verdict"] and report.spec == Spec.model_validate(TINY)
    assert client.get(run["id"])["report"] == run["report"]

    assert client.layers(run["id"]) == run["report"]["layers"]
    rows = client.gradients(run["id"])
    assert rows == run["report"]["records"]
    assert client.gradients(run["id"], layer=2, step_from=1, step_to=2) == [
        r for r in rows if r["layer"] == 2 and 1 <= r["step"] <= 2
    ]
    table = list(csv.DictReader(io.StringIO(client.gradients(run["id"], fmt="csv"))))
    assert len(table) == len(rows) and list(table[0]) == CSV_FIELDS
    assert float(table[-1]["grad_norm"]) == rows[-1]["grad_norm"]


def test_submit_wait_and_filters(client: Client, worker: None) -> None:
    queued = client.submit({**TINY, "activation": "tanh"})
    assert queued["status"] in ("queued", "running")
    finished = client.wait(queued["id"], timeout=60, poll=0.05)
    assert finished["status"] == "succeeded" and finished["id"] == queued["id"]
    client.run({**TINY, "activation": "relu", "depth": 2}, timeout=60)

    tanh = client.runs(activation="tanh")
    assert tanh["total"] == 1 and tanh["items"][0]["id"] == queued["id"]
    shallow = client.runs(depth_max=2, status="succeeded", sort="depth", limit=1, offset=0)
    assert shallow["total"] == 1 and shallow["items"][0]["spec"]["depth"] == 2
    assert client.runs(residual=True)["total"] == 0
    assert client.runs(verdict=finished["verdict"], activation="tanh")["total"] == 1


def _store_findings(settings: Settings, sweep_runs: list[str]) -> dict[str, str]:
    """Runs with known findings: step_size; forward_signal and step_size; none; and the sweep's first run
    with forward_signal. Ids by name."""
    spec = Spec.model_validate(TINY)
    engine = make_engine(settings.db_url)
    try:
        ids = {
            "step": store_report(engine, with_findings(plain_report(spec), "step_size")),
            "both": store_report(engine, with_findings(plain_report(spec), "forward_signal", "step_size")),
            "none": store_report(engine, plain_report(spec)),
            "swept": sweep_runs[0],
        }
        succeed(engine, ids["swept"], with_findings(plain_report(spec), "forward_signal"))
    finally:
        engine.dispose()
    return ids


def test_finding_filters(client: Client, settings: Settings) -> None:
    sweep = client.sweep(TINY, {"depth": [2, 3]})
    ids = _store_findings(settings, [run["run_id"] for run in sweep["runs"]])
    assert {r["id"] for r in client.runs(finding="step_size")["items"]} == {ids["step"], ids["both"]}
    assert [r["id"] for r in client.runs(finding=["step_size", "forward_signal"])["items"]] == [ids["both"]]
    assert client.runs(finding="forward_signal", sweep_id=sweep["id"])["items"][0]["finding_kinds"] == [
        "forward_signal"
    ]
    assert [r["run_id"] for r in client.sweep_status(sweep["id"], finding="forward_signal")["runs"]] == [ids["swept"]]
    assert len(client.sweep_status(sweep["id"])["runs"]) == 2
    only = client.sweep_summary(sweep["id"], finding="forward_signal")
    assert only["finding"] == "forward_signal" and len(only["configs"]) == 1
    assert client.sweep_summary(sweep["id"], finding="nonfinite")["configs"] == []
    with pytest.raises(GraddiagError) as bad:
        client.runs(finding="forward-signal")
    assert bad.value.status == 422 and bad.value.errors[0]["loc"] == ["query", "finding", 0]


def test_errors_carry_the_problem(client: Client) -> None:
    with pytest.raises(GraddiagError) as missing:
        client.get("0123abcd")
    assert missing.value.status == 404 and missing.value.code == "run_not_found"
    assert missing.value.problem["instance"] == "/v1/runs/0123abcd"

    with pytest.raises(GraddiagError) as invalid:
        client.submit({**TINY, "depth": 1000, "activation": "swish"})
    assert invalid.value.status == 422
    assert sorted(e["loc"][-1] for e in invalid.value.errors) == ["activation", "depth"]
    assert "depth" in str(invalid.value)

    with pytest.raises(GraddiagError) as bad_filter:
        client.runs(sort="colour")
    assert bad_filter.value.errors[0]["loc"] == ["query", "sort"]


def test_cancel_delete_and_run_failed(client: Client) -> None:
    spec = Spec.model_validate(LONG)
    queued = client.submit(spec, idempotency_key="nightly-1")
    assert client.cancel(queued["id"])["status"] == "cancelled"
    with pytest.raises(GraddiagError) as finished:
        client.cancel(queued["id"])
    assert finished.value.status == 409 and finished.value.code == "run_finished"

    # The same key replays the cancelled run, which run() reports as a failure to get a verdict.
    with pytest.raises(RunFailed) as failed:
        client.run(spec, timeout=5, idempotency_key="nightly-1")
    assert failed.value.run["id"] == queued["id"] and failed.value.run["status"] == "cancelled"

    assert client.delete(queued["id"]) is None
    with pytest.raises(GraddiagError) as gone:
        client.get(queued["id"])
    assert gone.value.status == 404


def test_wait_times_out(client: Client) -> None:
    run_id = client.submit(TINY)["id"]
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=run_id):
        client.wait(run_id, timeout=0.3, poll=0.05)
    assert 0.3 <= time.monotonic() - start < 2
    with pytest.raises(TimeoutError):
        client.run(TINY, timeout=0.3)


def test_sweep_compare_and_ready(client: Client, worker: None) -> None:
    sweep = client.sweep({**TINY, "steps": 3}, {"activation": ["sigmoid", "relu"], "depth": [2, 3]})
    assert sweep["total"] == 4
    done = client.wait_sweep(sweep["id"], timeout=60, poll=0.1)
    assert done["done"] and done["counts"]["succeeded"] == 4
    assert client.sweep_status(sweep["id"])["runs"] == done["runs"]
    summary = client.sweep_summary(sweep["id"])
    assert sorted(c["config"]["activation"] for c in summary["configs"]) == ["relu", "sigmoid"]

    ids = [r["run_id"] for r in done["runs"][:2]]
    profiles = client.compare(*ids)["runs"]
    assert [p["run_id"] for p in profiles] == ids and all(p["layers"] for p in profiles)
    assert client.ready()["status"] == "ready"


# --- async client in-process ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_client_end_to_end(aclient: AsyncClient, worker: None) -> None:
    run = await aclient.run(TINY, timeout=60, idempotency_key="k1")
    assert run["status"] == "succeeded"
    assert (await aclient.submit(TINY, idempotency_key="k1"))["id"] == run["id"]
    assert (await aclient.runs(status="succeeded"))["total"] == 1
    assert await aclient.layers(run["id"]) == run["report"]["layers"]
    assert await aclient.gradients(run["id"]) == run["report"]["records"]
    text = await aclient.gradients(run["id"], fmt="csv")
    assert text.splitlines()[0] == ",".join(CSV_FIELDS)
    assert len((await aclient.compare(run["id"]))["runs"][0]["layers"]) == 4
    # The events archive is bytes: one folder named after the run (its spec's shape and short id, unnamed).
    with tarfile.open(fileobj=io.BytesIO(await aclient.tensorboard(run["id"])), mode="r:gz") as archive:
        assert {Path(name).parts[0] for name in archive.getnames()} == {f"mlp-d3-w16-relu-{run['id'][:8]}"}

    sweep = await aclient.sweep({**TINY, "steps": 2}, {"depth": [2, 3]})
    assert (await aclient.wait_sweep(sweep["id"], timeout=60, poll=0.05))["done"]
    summary = await aclient.sweep_summary(sweep["id"])
    assert summary["configs"][0]["depths"] == [2, 3]
    assert (await aclient.ready())["status"] == "ready"

    with pytest.raises(GraddiagError) as finished:
        await aclient.cancel(run["id"])
    assert finished.value.status == 409
    await aclient.delete(run["id"])
    with pytest.raises(GraddiagError) as gone:
        await aclient.get(run["id"])
    assert gone.value.code == "run_not_found"


@pytest.mark.anyio
async def test_async_client_finding_filters(aclient: AsyncClient, settings: Settings) -> None:
    sweep = await aclient.sweep(TINY, {"depth": [2, 3]})
    ids = _store_findings(settings, [run["run_id"] for run in sweep["runs"]])
    assert {r["id"] for r in (await aclient.runs(finding="step_size"))["items"]} == {ids["step"], ids["both"]}
    assert [r["id"] for r in (await aclient.runs(finding=("forward_signal", "step_size")))["items"]] == [ids["both"]]
    status = await aclient.sweep_status(sweep["id"], finding="forward_signal")
    assert [r["run_id"] for r in status["runs"]] == [ids["swept"]] and status["total"] == 2
    summary = await aclient.sweep_summary(sweep["id"], finding="forward_signal")
    assert summary["configs"][0]["finding_depths"] == {"forward_signal": 2}
    with pytest.raises(GraddiagError) as bad:
        await aclient.sweep_summary(sweep["id"], finding="bogus")
    assert bad.value.status == 422 and bad.value.errors[0]["loc"] == ["query", "finding"]


@pytest.mark.anyio
async def test_async_client_failures(aclient: AsyncClient) -> None:
    queued = await aclient.submit(LONG, idempotency_key="k2")
    with pytest.raises(TimeoutError):
        await aclient.wait(queued["id"], timeout=0.2, poll=0.05)
    assert (await aclient.cancel(queued["id"]))["status"] == "cancelled"
    with pytest.raises(RunFailed):
        await aclient.run(LONG, idempotency_key="k2", timeout=5)
    with pytest.raises(GraddiagError) as invalid:
        await aclient.submit({"depth": 1000})
    assert invalid.value.errors[0]["loc"] == ["body", "depth"]


def test_non_json_error_bodies_still_raise() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    with (
        Client("http://proxy.test", transport=httpx.MockTransport(handler)) as gd,
        pytest.raises(GraddiagError) as error,
    ):
        gd.get("x")
    assert error.value.status == 502 and "bad gateway" in error.value.detail
