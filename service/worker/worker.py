"""The worker: a long-lived loop that claims queued runs, trains them and stores the results.

torch is imported once per process and the decoded CIFAR-10 is kept in a DatasetCache across runs, so a
warm worker starts a queued run within one poll interval. While a run trains, a heartbeat thread renews
its lease, writes progress and watches for cancellation; the probe polls `should_stop` every step. No
database transaction is held open while training.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal

import torch
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from graddiag.models.spec import Spec
from graddiag.service.engine.data import DatasetCache
from graddiag.service.engine.probe import ProbeCancelled, ProbeTimeout, Progress, run_probe
from graddiag.service.engine.report import Report
from graddiag.service.settings import Settings
from graddiag.service.store.db import is_transient, make_engine
from graddiag.service.worker.queue import (
    Backoff,
    Claim,
    claim_next,
    complete,
    fail,
    heartbeat,
    mark_cancelled,
    progress_record,
    reap_expired,
    release,
    retry_transient,
)

if TYPE_CHECKING:
    from graddiag.service.export.tensorboard import HistogramCollector

log = logging.getLogger(__name__)

# The heartbeat thread's period: it also polls cancel_requested, so a cancelled run stops within ~2 s.
HEARTBEAT_MAX_INTERVAL_S: Final = 1.0
# How long a stopping worker lets its current run go on before handing it back to the queue.
DEFAULT_GRACE_SECONDS: Final = 10.0
# Expired leases are looked for at most this often (and at most once per lease).
REAP_MAX_INTERVAL_S: Final = 5.0

# Gradient histograms stay in memory until the run ends: this many float32 values in all (64 MiB), spread
# over every recorded step and layer, bounds them however deep, wide and long the run is.
HISTOGRAM_BUDGET_VALUES: Final = 16 * 2**20

StopReason = Literal["cancelled", "lost", "shutdown"]


class _RunMonitor:
    """The heartbeat thread of one claimed run, and the probe's progress and stop callbacks."""

    def __init__(
        self,
        engine: Engine,
        claim: Claim,
        lease_seconds: float,
        shutdown: threading.Event,
        grace_seconds: float,
    ) -> None:
        self._engine = engine
        self._claim = claim
        self._lease_seconds = lease_seconds
        self._shutdown = shutdown
        self._grace_seconds = grace_seconds
        self._lock = threading.Lock()
        self._pending_progress: dict[str, Any] | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{claim.run_id[:8]}", daemon=True)
        self.stop_reason: StopReason | None = None

    def on_progress(self, progress: Progress) -> None:
        """Probe callback (training thread): keep the latest progress for the next heartbeat."""
        record = progress_record(progress.step, progress.steps, progress.loss, progress.label_so_far)
        with self._lock:
            self._pending_progress = record

    def should_stop(self) -> bool:
        """Probe callback, polled every step: cancelled, lease lost, or shutdown grace used up."""
        return self.stop_reason is not None

    def _beat(self) -> None:
        interval = min(HEARTBEAT_MAX_INTERVAL_S, self._lease_seconds / 3)
        shutdown_since: float | None = None
        while not self._finished.wait(interval):
            with self._lock:
                progress, self._pending_progress = self._pending_progress, None
            try:
                result = heartbeat(self._engine, self._claim, self._lease_seconds, progress)
            except Exception:
                # Whatever went wrong (usually a busy database), the thread must live on to keep the lease;
                # the lease outlasts a few missed beats.
                log.exception("run %s: heartbeat failed", self._claim.run_id)
                continue
            if not result.owned:
                self.stop_reason = "lost"
            elif result.cancel_requested:
                self.stop_reason = "cancelled"
            elif self._shutdown.is_set():
                shutdown_since = shutdown_since or time.monotonic()
                if time.monotonic() - shutdown_since >= self._grace_seconds:
                    self.stop_reason = "shutdown"

    def __enter__(self) -> _RunMonitor:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._finished.set()
        self._thread.join()


def error_text(exc: Exception, run_timeout_seconds: float) -> str:
    """The `error` a failed run is recorded with (also by the Ray dispatcher's tasks)."""
    if isinstance(exc, ProbeTimeout):
        return f"ProbeTimeout: {exc} (run_timeout_seconds={run_timeout_seconds:g})"
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _histogram_collector(claim: Claim, settings: Settings) -> HistogramCollector | None:
    """A gradient-histogram collector when this run writes TensorBoard events (spec or settings), else None."""
    if not (claim.spec.tensorboard or settings.tensorboard_all):
        return None
    try:
        from graddiag.service.export.tensorboard import HistogramCollector
    except ImportError as exc:
        log.warning("run %s: no TensorBoard events: %s", claim.run_id, exc)
        return None
    return HistogramCollector(max_values=_histogram_values(claim.spec))


def _histogram_values(spec: Spec) -> int:
    """Values kept per layer and recorded step, so all of them fit HISTOGRAM_BUDGET_VALUES."""
    recorded_steps = math.ceil(spec.steps / spec.record_every) + 1
    layers = 2 * spec.depth + 2  # a linear or conv layer per block, a norm layer each, input and output
    return max(1, HISTOGRAM_BUDGET_VALUES // (recorded_steps * layers))


def _write_tensorboard(settings: Settings, run_id: str, report: Report, collector: HistogramCollector) -> None:
    """Write the run's events with histograms; a failure is logged, never fails the run."""
    from graddiag.service.export.tensorboard import write_events

    try:
        write_events(report, settings.tensorboard_run_dir(run_id), histograms=collector.histograms)
    except Exception:
        log.warning("run %s: could not write TensorBoard events", run_id, exc_info=True)


def _execute(
    engine: Engine,
    claim: Claim,
    settings: Settings,
    cache: DatasetCache,
    shutdown: threading.Event,
    grace_seconds: float,
) -> None:
    """Train one claimed run and record how it ended; raises nothing but database errors.

    The run's ending is written with retries while the database is locked or full (each write is one
    all-or-nothing transaction), so a passing fault costs a wait, not the trained result.
    """
    run_id = claim.run_id
    log.info("run %s: attempt %d started", run_id, claim.attempt)
    started = time.monotonic()
    monitor = _RunMonitor(engine, claim, settings.lease_seconds, shutdown, grace_seconds)
    collector = _histogram_collector(claim, settings)
    try:
        with monitor:
            data = cache.get() if claim.spec.dataset == "cifar10" else None
            report = run_probe(
                claim.spec,
                data=data,
                eval_samples=settings.eval_samples,
                on_progress=monitor.on_progress,
                progress_interval=HEARTBEAT_MAX_INTERVAL_S,
                should_stop=monitor.should_stop,
                deadline=started + settings.run_timeout_seconds,
                on_record=collector,
            )
    except ProbeCancelled:
        if monitor.stop_reason == "cancelled":
            retry_transient(lambda: mark_cancelled(engine, claim), what=f"run {run_id}: cancel", stop=shutdown)
            log.info("run %s: cancelled", run_id)
        elif monitor.stop_reason == "shutdown":
            retry_transient(lambda: release(engine, claim), what=f"run {run_id}: release", stop=shutdown)
            log.info("run %s: handed back to the queue (worker stopping)", run_id)
        else:
            log.warning("run %s: lease lost (reaped or deleted); stopped without writing", run_id)
        return
    except Exception as exc:
        log.exception("run %s: attempt %d failed", run_id, claim.attempt)
        error = error_text(exc, settings.run_timeout_seconds)
        retry_transient(lambda: fail(engine, claim, error), what=f"run {run_id}: fail", stop=shutdown)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an out-of-memory error, the next run starts from a clean pool
        return
    if collector is not None:
        # Before the run is marked succeeded, so the API finds the events as soon as it sees the verdict.
        _write_tensorboard(settings, run_id, report, collector)
    stored = retry_transient(lambda: complete(engine, claim, report), what=f"run {run_id}: complete", stop=shutdown)
    if stored:
        log.info("run %s: %s in %.1f s", run_id, report.verdict.label, time.monotonic() - started)
    elif stored is None:
        log.warning("run %s: results not stored before the worker stopped; the run will be retried", run_id)
    else:
        log.warning("run %s: lease lost before the results were stored; discarded", run_id)


def run_worker(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    worker_id: str | None = None,
    max_runs: int | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
) -> None:
    """Claim and execute runs until `stop` is set (or `max_runs` runs were executed).

    A run that fails is recorded as failed and the loop goes on. When `stop` is set during a run, the
    run may finish within `grace_seconds`; otherwise it is handed back to the queue.
    """
    stop = stop or threading.Event()
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    engine = make_engine(settings.db_url)
    cache = DatasetCache(settings.data_dir, settings.cache_dir)
    reap_interval = min(REAP_MAX_INTERVAL_S, settings.lease_seconds)
    next_reap = 0.0
    executed = 0
    backoff = Backoff(first=max(settings.poll_seconds, 0.5))
    log.info("worker %s: polling %s", worker_id, engine.url.render_as_string(hide_password=True))
    try:
        while not stop.is_set() and (max_runs is None or executed < max_runs):
            try:
                if time.monotonic() >= next_reap:
                    reap_expired(engine, settings.max_attempts)
                    next_reap = time.monotonic() + reap_interval
                claim = claim_next(engine, worker_id, settings.lease_seconds)
                backoff.reset()
                if claim is None:
                    stop.wait(settings.poll_seconds)
                    continue
                executed += 1
                _execute(engine, claim, settings, cache, stop, grace_seconds)
            except SQLAlchemyError as exc:
                # The database is unreachable, locked beyond the busy timeout or full: the worker waits it
                # out, backing off; a run it could not settle is reaped once its lease expires.
                delay = backoff.next()
                if is_transient(exc):
                    reason = getattr(exc, "orig", exc)
                    log.warning("worker %s: database unavailable (%s); retrying in %.1f s", worker_id, reason, delay)
                else:
                    log.exception("worker %s: database error; retrying in %.1f s", worker_id, delay)
                stop.wait(delay)
    finally:
        engine.dispose()
        log.info("worker %s: stopped after %d runs", worker_id, executed)


def worker_main(settings: Settings) -> None:
    """Process entry point: torch threads from settings, SIGTERM/SIGINT stop the worker gracefully."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping after the current run", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    run_worker(settings, stop=stop)
