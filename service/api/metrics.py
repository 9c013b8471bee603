"""`GET /metrics`: Prometheus exposition of the queue, the runs and the API's own request latency.

Every app gets its own CollectorRegistry (made by :func:`install_metrics`), never the process-wide
default one: several apps in one process (tests, embedding) keep separate counts and never collide.

The store figures are computed from the database at scrape time by :class:`StoreCollector`, a few
GROUP BY queries over `runs` (store/stats.py): the API process does not see runs start or finish (workers are other
processes), so the database is the one honest source. Request latency is measured by
:class:`LatencyMiddleware` in this process.
"""

from __future__ import annotations

import itertools
import logging
import time
import typing
from collections.abc import Callable, Iterable
from typing import Final

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from graddiag.models.spec import Arch
from graddiag.service.api.health import WorkerProbe
from graddiag.service.engine.report import Label
from graddiag.service.store.stats import (
    Durations,
    counts_by_status_verdict_and_arch,
    durations_by_status,
    lease_stats,
)
from graddiag.service.store.tables import FINISHED, STATUSES

log = logging.getLogger(__name__)

# Probes last from seconds (tiny synthetic specs) to the run timeout (an hour by default).
RUN_DURATION_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# Ordinary reads take milliseconds; `?wait=` requests may be held up to 600 s.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
# The route label of requests no route matched: their raw paths would make the label unbounded.
UNMATCHED: Final = "<unmatched>"
LABELS: Final[tuple[str, ...]] = typing.get_args(Label)
# The `arch` label's values: the spec's architectures and `external` (an uploaded report's run). Every one
# is exposed, zero included, so a dashboard's per-architecture panel has its series before the first run.
ARCHS: Final[tuple[str, ...]] = (*typing.get_args(Arch), "external")

router = APIRouter(tags=["metrics"])


class StoreCollector(Collector):
    """Runs by status and verdict, queue depth, run durations and lease health, read at each scrape.

    `sessions` returns the app's sessionmaker (it exists only once the lifespan has started).
    `lease_seconds` turns a lease's expiry back into the time of the heartbeat that set it.
    If the database cannot be read, only ``graddiag_store_up 0`` is exposed and the error is logged.
    """

    def __init__(
        self,
        sessions: Callable[[], sessionmaker[Session]],
        lease_seconds: float,
        worker_probe: WorkerProbe | None = None,
    ) -> None:
        self._sessions = sessions
        self._lease_seconds = lease_seconds
        self._worker_probe = worker_probe

    def describe(self) -> Iterable[Metric]:
        """The families this collector exposes (lets the registry detect name clashes)."""
        return _families(self._worker_probe is not None)

    def collect(self) -> Iterable[Metric]:
        """Query the store and yield every family."""
        up = _store_up()
        try:
            with self._sessions()() as session:
                families = _store_families(session, time.time(), self._lease_seconds)
        except SQLAlchemyError:
            log.exception("metrics: the database could not be read")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families
        if self._worker_probe is not None:
            alive, configured = self._worker_probe()
            processes = _worker_processes()
            processes.add_metric(["alive"], alive)
            processes.add_metric(["configured"], configured)
            yield processes


# One constructor per family, shared by describe() and collect() so names and help never drift apart.
def _store_up() -> GaugeMetricFamily:
    return GaugeMetricFamily("graddiag_store_up", "1 when the last scrape could read the database, else 0.")


def _runs() -> GaugeMetricFamily:
    return GaugeMetricFamily("graddiag_runs", "Runs in the store by status.", labels=["status"])


def _verdicts() -> GaugeMetricFamily:
    return GaugeMetricFamily("graddiag_run_verdicts", "Succeeded runs by verdict.", labels=["verdict"])


def _runs_by_arch() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "graddiag_runs_by_arch",
        "Runs in the store by architecture (the spec's arch; external: an uploaded report) and status.",
        labels=["arch", "status"],
    )


def _verdicts_by_arch() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "graddiag_run_verdicts_by_arch",
        "Succeeded runs by architecture (the spec's arch; external: an uploaded report) and verdict.",
        labels=["arch", "verdict"],
    )


def _queue_depth() -> GaugeMetricFamily:
    return GaugeMetricFamily("graddiag_queue_depth", "Queued runs waiting for a worker.")


def _durations() -> HistogramMetricFamily:
    return HistogramMetricFamily(
        "graddiag_run_duration_seconds",
        "Wall time from claim to finish of finished runs that started, by final status.",
        labels=["status"],
    )


def _leases() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "graddiag_leases",
        "Running runs by lease state (expired: its worker stopped heartbeating; the reaper requeues it).",
        labels=["state"],
    )


def _busy_workers() -> GaugeMetricFamily:
    return GaugeMetricFamily("graddiag_busy_workers", "Distinct workers holding a live lease.")


def _heartbeat_age() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "graddiag_heartbeat_age_seconds",
        "Seconds since the freshest heartbeat of any running run (absent when none runs).",
    )


def _worker_processes() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "graddiag_worker_processes", "Local worker processes supervised by this server.", labels=["state"]
    )


def _families(with_processes: bool) -> list[Metric]:
    families: list[Metric] = [
        _store_up(),
        _runs(),
        _verdicts(),
        _runs_by_arch(),
        _verdicts_by_arch(),
        _queue_depth(),
        _durations(),
        _leases(),
        _busy_workers(),
        _heartbeat_age(),
    ]
    return [*families, _worker_processes()] if with_processes else families


def _store_families(session: Session, now: float, lease_seconds: float) -> list[Metric]:
    """Three queries: counts by (status, verdict, arch), duration buckets by status, lease state."""
    by_status: dict[str, int] = dict.fromkeys(STATUSES, 0)
    by_verdict: dict[str, int] = dict.fromkeys(LABELS, 0)
    by_arch_status: dict[tuple[str, str], int] = dict.fromkeys(itertools.product(ARCHS, STATUSES), 0)
    by_arch_verdict: dict[tuple[str, str], int] = dict.fromkeys(itertools.product(ARCHS, LABELS), 0)
    for status, verdict, arch, count in counts_by_status_verdict_and_arch(session):
        by_status[status] = by_status.get(status, 0) + count
        by_arch_status[arch, status] = by_arch_status.get((arch, status), 0) + count
        if status == "succeeded" and verdict is not None:
            by_verdict[verdict] = by_verdict.get(verdict, 0) + count
            by_arch_verdict[arch, verdict] = by_arch_verdict.get((arch, verdict), 0) + count
    runs = _runs()
    for status, count in by_status.items():
        runs.add_metric([status], count)
    verdicts = _verdicts()
    for verdict, count in by_verdict.items():
        verdicts.add_metric([verdict], count)
    runs_by_arch = _runs_by_arch()
    for labels, count in by_arch_status.items():
        runs_by_arch.add_metric(list(labels), count)
    verdicts_by_arch = _verdicts_by_arch()
    for labels, count in by_arch_verdict.items():
        verdicts_by_arch.add_metric(list(labels), count)
    queue = _queue_depth()
    queue.add_metric([], by_status["queued"])
    return [
        runs,
        verdicts,
        runs_by_arch,
        verdicts_by_arch,
        queue,
        _duration_family(session),
        *_lease_families(session, now, lease_seconds),
    ]


def _duration_family(session: Session) -> HistogramMetricFamily:
    family = _durations()
    by_status = durations_by_status(session, RUN_DURATION_BUCKETS)
    none = Durations(0, 0.0, [0] * len(RUN_DURATION_BUCKETS))
    bounds = [floatToGoString(bound) for bound in RUN_DURATION_BUCKETS]
    for status in sorted(FINISHED):
        durations = by_status.get(status, none)
        buckets = list(zip(bounds, durations.cumulative, strict=True))
        family.add_metric([status], [*buckets, ("+Inf", durations.count)], sum_value=durations.total_seconds)
    return family


def _lease_families(session: Session, now: float, lease_seconds: float) -> list[Metric]:
    stats = lease_stats(session, now)
    leases = _leases()
    leases.add_metric(["live"], stats.live)
    leases.add_metric(["expired"], stats.expired)
    workers = _busy_workers()
    workers.add_metric([], stats.busy_workers)
    age = _heartbeat_age()
    if stats.latest_expiry is not None:
        # Each heartbeat sets expiry = beat time + lease_seconds: the freshest beat is the latest expiry less that.
        age.add_metric([], max(0.0, now - (stats.latest_expiry - lease_seconds)))
    return [leases, workers, age]


def _route_template(scope: Scope) -> str:
    # The router records the matched route in the scope; its path is the template, e.g. /v1/runs/{run_id}.
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED


class LatencyMiddleware:
    """Observes each HTTP request's latency into `histogram`, labelled by route template, method and status class.

    Latency runs until the response starts (status and headers sent): for ordinary responses that is
    the whole handling time, and a long-lived event stream counts the time it took to open, not its
    lifetime. A request that raises counts as 5xx.
    """

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            if not observed:
                observed = True
                self.histogram.labels(
                    route=_route_template(scope), method=scope["method"], status=f"{status // 100}xx"
                ).observe(time.perf_counter() - started)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            observe(500)
            raise


def install_metrics(app: FastAPI, *, lease_seconds: float, worker_probe: WorkerProbe | None) -> None:
    """Give `app` its own registry with the store collector and request latency, and the `/metrics` route."""
    registry = CollectorRegistry()

    def sessions() -> sessionmaker[Session]:
        factory: sessionmaker[Session] = app.state.read_sessionmaker
        return factory

    registry.register(StoreCollector(sessions, lease_seconds, worker_probe))
    latency = Histogram(
        "graddiag_http_request_duration_seconds",
        "API request latency until the response starts, by route template, method and status class.",
        labelnames=("route", "method", "status"),
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    app.state.metrics_registry = registry
    app.add_middleware(LatencyMiddleware, histogram=latency)
    app.include_router(router)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
)
def metrics(request: Request) -> Response:
    """Runs by status and verdict (also by architecture), queue depth, run durations, lease health and request
    latency."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
