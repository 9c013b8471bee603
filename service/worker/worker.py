"""The worker: a long-lived loop that claims queued runs, trains them and stores the results.

torch is imported once per process and the decoded CIFAR-10 is kept in a DatasetCache across runs, so a
warm worker starts a queued run within one poll interval. While a run trains, a heartbeat thread renews
its lease, writes progress and watches for cancellation; the probe polls `should_stop` every step. No
database transaction is held open while training.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from types import FrameType, TracebackType
from typing import Any, Final, Literal

import torch
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from service.engine.data import DatasetCache
from service.engine.probe import ProbeCancelled, ProbeTimeout, Progress, run_probe
from service.settings import Settings
from service.store.db import make_engine
from service.worker.queue import (
    Claim,
    claim_next,
    complete,
    fail,
    heartbeat,
    mark_cancelled,
    progress_record,
    reap_expired,
    release,
)

log = logging.getLogger(__name__)

# The heartbeat thread's period: it also polls cancel_requested, so a cancelled run stops within ~2 s.
HEARTBEAT_MAX_INTERVAL_S: Final = 1.0
# How long a stopping worker lets its current run go on before handing it back to the queue.
DEFAULT_GRACE_SECONDS: Final = 10.0
# Expired leases are looked for at most this often (and at most once per lease).
REAP_MAX_INTERVAL_S: Final = 5.0

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


def _error_text(exc: Exception, settings: Settings) -> str:
    if isinstance(exc, ProbeTimeout):
        return f"ProbeTimeout: {exc} (run_timeout_seconds={settings.run_timeout_seconds:g})"
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _execute(
    engine: Engine,
    claim: Claim,
    settings: Settings,
    cache: DatasetCache,
    shutdown: threading.Event,
    grace_seconds: float,
) -> None:
    """Train one claimed run and record how it ended; raises nothing but database errors."""
    run_id = claim.run_id
    log.info("run %s: attempt %d started", run_id, claim.attempt)
    started = time.monotonic()
    monitor = _RunMonitor(engine, claim, settings.lease_seconds, shutdown, grace_seconds)
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
            )
    except ProbeCancelled:
        if monitor.stop_reason == "cancelled":
            mark_cancelled(engine, claim)
            log.info("run %s: cancelled", run_id)
        elif monitor.stop_reason == "shutdown":
            release(engine, claim)
            log.info("run %s: handed back to the queue (worker stopping)", run_id)
        else:
            log.warning("run %s: lease lost (reaped or deleted); stopped without writing", run_id)
        return
    except Exception as exc:
        log.exception("run %s: attempt %d failed", run_id, claim.attempt)
        fail(engine, claim, _error_text(exc, settings))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an out-of-memory error, the next run starts from a clean pool
        return
    if complete(engine, claim, report):
        log.info("run %s: %s in %.1f s", run_id, report.verdict.label, time.monotonic() - started)
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
    log.info("worker %s: polling %s", worker_id, engine.url.render_as_string(hide_password=True))
    try:
        while not stop.is_set() and (max_runs is None or executed < max_runs):
            try:
                if time.monotonic() >= next_reap:
                    reap_expired(engine, settings.max_attempts)
                    next_reap = time.monotonic() + reap_interval
                claim = claim_next(engine, worker_id, settings.lease_seconds)
                if claim is None:
                    stop.wait(settings.poll_seconds)
                    continue
                executed += 1
                _execute(engine, claim, settings, cache, stop, grace_seconds)
            except SQLAlchemyError:
                # The database is unreachable or locked beyond the busy timeout: the worker waits it out;
                # a run it could not settle is reaped once its lease expires.
                log.exception("worker %s: database error; retrying", worker_id)
                stop.wait(max(settings.poll_seconds, 1.0))
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
