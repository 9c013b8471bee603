"""`GET /metrics`: store figures computed at scrape time match the runs in the database; request latency."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import text, update

from graddiag.models.spec import Spec
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine, make_sessionmaker
from graddiag.service.store.runs import create_external_run, create_run
from graddiag.service.store.tables import Run

# Shared fixtures (imported so pytest finds them here too).
from tests.support.api import TINY, serve_app
from tests.support.reports import external_report

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(exposition: str) -> Samples:
    """Every sample of the exposition, keyed by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def scrape(api: httpx.AsyncClient) -> Samples:
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


def seed(db_url: str, rows: list[dict[str, Any]]) -> list[str]:
    """One run per row, then the row's columns written over it (status, verdict, epochs, lease)."""
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            ids = [create_run(session, Spec.model_validate(TINY))[0].id for _ in rows]
            for run_id, values in zip(ids, rows, strict=True):
                if values:
                    session.execute(update(Run).where(Run.id == run_id).values(**values))
            session.commit()
        return ids
    finally:
        engine.dispose()


def finished(status: str, seconds: float, verdict: str | None = None) -> dict[str, Any]:
    start = time.time() - 100
    return {"status": status, "verdict": verdict, "started_epoch": start, "finished_epoch": start + seconds}


async def test_store_figures_match_the_runs(settings: Settings) -> None:
    now = time.time()
    seed(
        settings.db_url,
        [
            {},  # queued
            {},  # queued
            {"status": "running", "lease_owner": "w1", "lease_expires_epoch": now + 1.5, "started_epoch": now},
            {"status": "running", "lease_owner": "w2", "lease_expires_epoch": now + 0.5, "started_epoch": now},
            # Its worker stopped heartbeating 10 s ago; the reaper has not requeued it yet.
            {"status": "running", "lease_owner": "w3", "lease_expires_epoch": now - 10, "started_epoch": now - 60},
            finished("succeeded", 0.5, "vanishing"),
            finished("succeeded", 3.0, "healthy"),
            finished("succeeded", 40.0, "healthy"),
            finished("failed", 7.0),
            {"status": "cancelled", "finished_epoch": now},  # cancelled while queued: it never started
        ],
    )
    async with serve_app(settings) as api:
        samples = await scrape(api)
    assert value(samples, "graddiag_store_up") == 1
    runs = {status: value(samples, "graddiag_runs", status=status) for status in ("queued", "running", "succeeded")}
    assert runs == {"queued": 2, "running": 3, "succeeded": 3}
    assert value(samples, "graddiag_runs", status="failed") == value(samples, "graddiag_runs", status="cancelled") == 1
    assert value(samples, "graddiag_queue_depth") == 2
    verdicts = {v: value(samples, "graddiag_run_verdicts", verdict=v) for v in ("vanishing", "exploding", "healthy")}
    assert verdicts == {"vanishing": 1, "exploding": 0, "healthy": 2}

    def bucket(status: str, le: str) -> float:
        return value(samples, "graddiag_run_duration_seconds_bucket", status=status, le=le)

    # Succeeded durations 0.5, 3 and 40 s; cumulative buckets.
    assert [bucket("succeeded", le) for le in ("1.0", "2.0", "5.0", "30.0", "60.0", "+Inf")] == [1, 1, 2, 2, 3, 3]
    assert value(samples, "graddiag_run_duration_seconds_count", status="succeeded") == 3
    assert value(samples, "graddiag_run_duration_seconds_sum", status="succeeded") == pytest.approx(43.5)
    assert [bucket("failed", le) for le in ("5.0", "10.0", "+Inf")] == [0, 1, 1]
    assert value(samples, "graddiag_run_duration_seconds_count", status="cancelled") == 0

    assert value(samples, "graddiag_leases", state="live") == 2
    assert value(samples, "graddiag_leases", state="expired") == 1
    assert value(samples, "graddiag_busy_workers") == 2
    # Freshest beat: expiry now + 1.5 with lease_seconds=2, i.e. 0.5 s before `now`.
    assert 0.5 <= value(samples, "graddiag_heartbeat_age_seconds") < 0.5 + (time.time() - now)
    assert not any(name == "graddiag_worker_processes" for name, _ in samples)  # no supervised workers


async def test_runs_and_verdicts_by_architecture(settings: Settings) -> None:
    seed(
        settings.db_url,
        [
            {"arch": "lstm"},  # queued
            {"arch": "lstm", **finished("succeeded", 2.0, "vanishing")},
            {"arch": "gru", **finished("succeeded", 2.0, "healthy")},
            {"arch": "rnn", **finished("failed", 1.0)},
            {"arch": "transformer", **finished("succeeded", 5.0, "exploding")},
            finished("succeeded", 1.0, "healthy"),  # TINY: an mlp
        ],
    )
    engine = make_engine(settings.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            create_external_run(session, external_report(), name="upload", tags=[])
    finally:
        engine.dispose()
    async with serve_app(settings) as api:
        samples = await scrape(api)

    def runs(arch: str, status: str) -> float:
        return value(samples, "graddiag_runs_by_arch", arch=arch, status=status)

    def verdicts(arch: str, verdict: str) -> float:
        return value(samples, "graddiag_run_verdicts_by_arch", arch=arch, verdict=verdict)

    assert (runs("lstm", "queued"), runs("lstm", "succeeded"), runs("rnn", "failed")) == (1, 1, 1)
    assert (runs("mlp", "succeeded"), runs("external", "succeeded"), runs("cnn", "succeeded")) == (1, 1, 0)
    assert (verdicts("lstm", "vanishing"), verdicts("gru", "healthy"), verdicts("transformer", "exploding")) == (
        1,
        1,
        1,
    )
    assert (verdicts("mlp", "healthy"), verdicts("external", "healthy"), verdicts("rnn", "healthy")) == (1, 1, 0)
    # Every (arch, status) and (arch, verdict) series exists, zeros included, and they add up to the totals.
    archs = ("mlp", "cnn", "rnn", "gru", "lstm", "transformer", "external")
    statuses = ("queued", "running", "succeeded", "failed", "cancelled")
    labels = ("vanishing", "exploding", "healthy")
    for status in statuses:
        assert sum(runs(arch, status) for arch in archs) == value(samples, "graddiag_runs", status=status)
    for verdict in labels:
        assert sum(verdicts(arch, verdict) for arch in archs) == value(
            samples, "graddiag_run_verdicts", verdict=verdict
        )
    assert sum(1 for name, _ in samples if name == "graddiag_runs_by_arch") == len(archs) * len(statuses)
    assert sum(1 for name, _ in samples if name == "graddiag_run_verdicts_by_arch") == len(archs) * len(labels)


async def test_a_real_run_is_counted_once_finished(settings: Settings, worker: None) -> None:
    async with serve_app(settings) as api:
        before = await scrape(api)
        assert ("graddiag_heartbeat_age_seconds", frozenset()) not in before  # nothing runs
        started = time.monotonic()
        run = (await api.post("/v1/runs", params={"wait": 60}, json=TINY)).json()
        elapsed = time.monotonic() - started
        assert run["status"] == "succeeded"
        samples = await scrape(api)
    assert value(samples, "graddiag_runs", status="succeeded") == 1
    assert value(samples, "graddiag_run_verdicts", verdict=run["verdict"]) == 1
    assert value(samples, "graddiag_run_duration_seconds_count", status="succeeded") == 1
    assert 0 < value(samples, "graddiag_run_duration_seconds_sum", status="succeeded") <= elapsed
    assert value(samples, "graddiag_queue_depth") == 0 and value(samples, "graddiag_leases", state="live") == 0


async def test_request_latency_by_route_template_method_and_status(settings: Settings) -> None:
    async with serve_app(settings) as api:
        for run_id in ("feed", "beef"):
            assert (await api.get(f"/v1/runs/{run_id}")).status_code == 404
        assert (await api.get("/v1/runs")).status_code == 200
        assert (await api.post("/v1/runs", json={"depth": 0})).status_code == 422
        assert (await api.get("/nowhere/at/all")).status_code == 404
        samples = await scrape(api)

    def count(route: str, method: str, status: str) -> float:
        return value(samples, "graddiag_http_request_duration_seconds_count", route=route, method=method, status=status)

    assert count("/v1/runs/{run_id}", "GET", "4xx") == 2  # one series for every id: the template
    assert count("/v1/runs", "GET", "2xx") == 1
    assert count("/v1/runs", "POST", "4xx") == 1
    assert count("<unmatched>", "GET", "4xx") == 1
    assert not any("/nowhere" in dict(labels).get("route", "") for _, labels in samples)
    latency = value(
        samples, "graddiag_http_request_duration_seconds_sum", route="/v1/runs/{run_id}", method="GET", status="4xx"
    )
    assert latency > 0
    bucket = value(
        samples,
        "graddiag_http_request_duration_seconds_bucket",
        route="/v1/runs",
        method="GET",
        status="2xx",
        le="+Inf",
    )
    assert bucket == 1


async def test_an_unhandled_error_counts_as_5xx(settings: Settings) -> None:
    engine = make_engine(settings.db_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE run_records"))
    engine.dispose()
    async with serve_app(settings, raise_app_exceptions=False) as api:
        run = (await api.post("/v1/runs", json=TINY)).json()
        assert (await api.get(f"/v1/runs/{run['id']}/gradients")).status_code == 500
        samples = await scrape(api)
    route = "/v1/runs/{run_id}/gradients"
    assert value(samples, "graddiag_http_request_duration_seconds_count", route=route, method="GET", status="5xx") == 1


async def test_apps_in_one_process_keep_their_own_registries(settings: Settings) -> None:
    async with serve_app(settings) as first, serve_app(settings) as second:
        for _ in range(3):
            await first.get("/healthz")
        await second.get("/healthz")
        one, two = await scrape(first), await scrape(second)
    key = (
        "graddiag_http_request_duration_seconds_count",
        frozenset({"route": "/healthz", "method": "GET", "status": "2xx"}.items()),
    )
    assert one[key] == 3 and two[key] == 1


async def test_supervised_worker_processes_are_exposed(settings: Settings) -> None:
    async with serve_app(settings, probe=lambda: (1, 2)) as api:
        samples = await scrape(api)
    assert value(samples, "graddiag_worker_processes", state="alive") == 1
    assert value(samples, "graddiag_worker_processes", state="configured") == 2


async def test_an_unreadable_store_is_reported_not_raised(tmp_path: Path) -> None:
    # Never migrated: every store query fails, the scrape still answers.
    unmigrated = Settings(db_url=f"sqlite:///{tmp_path / 'empty.db'}", cache_dir=tmp_path / "cache")
    async with serve_app(unmigrated) as api:
        await api.get("/healthz")
        samples = await scrape(api)
    assert value(samples, "graddiag_store_up") == 0
    assert not any(name == "graddiag_runs" for name, _ in samples)
    assert (
        value(samples, "graddiag_http_request_duration_seconds_count", route="/healthz", method="GET", status="2xx")
        == 1
    )


async def test_refused_requests_are_timed_too(settings: Settings) -> None:
    # The access-control layer answers before routing: its 401s still reach the latency histogram.
    guarded = settings.model_copy(update={"api_token": SecretStr("metrics-token")})
    async with serve_app(guarded) as api:
        assert (await api.post("/v1/runs", json=TINY)).status_code == 401
        assert (await api.post("/v1/runs", json=TINY)).status_code == 401
        samples = await scrape(api)
    count = "graddiag_http_request_duration_seconds_count"
    assert value(samples, count, route="<unmatched>", method="POST", status="4xx") == 2
