"""The lifecycle of a claimed run, one for the local worker and the Ray dispatcher alike.

claim (queue.claim_next, up to the executor's capacity) → heartbeat (renew each lease every second,
store the latest progress, learn of cancellations and lost leases) → execute (an :class:`Executor`: a
thread of this process for the worker, a Ray task for the dispatcher) → settle (record how the run
ended: complete / fail / cancel / release, each fenced by the claim and retried while the database is
unavailable). Expired leases of dead processes are reaped on the way, and a stopping process claims
nothing more, lets its runs finish within a grace period, then stops them and hands them back to the
queue. The executor is the only difference between the two: it trains, and knows nothing of the
database.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Final, Literal, Protocol

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from graddiag.service.engine.probe import ProbeTimeout
from graddiag.service.engine.report import Report
from graddiag.service.settings import Settings
from graddiag.service.store.db import is_transient
from graddiag.service.store.runs import remove_events
from graddiag.service.worker.queue import (
    Backoff,
    Claim,
    claim_next,
    complete,
    fail,
    heartbeat,
    mark_cancelled,
    reap_expired,
    release,
    retry_transient,
    run_exists,
)

log = logging.getLogger(__name__)

# Leases are renewed (and cancellations noticed) this often, or thrice per lease if that is shorter: a
# cancelled run stops within ~2 s.
HEARTBEAT_MAX_INTERVAL_S: Final = 1.0
# Expired leases are looked for at most this often (and at most once per lease).
REAP_MAX_INTERVAL_S: Final = 5.0
# How long a stopping process lets its runs go on before handing them back to the queue.
DEFAULT_GRACE_SECONDS: Final = 10.0

StopReason = Literal["cancelled", "lost", "shutdown"]


@dataclass(frozen=True)
class Ending:
    """How an execution ended: with a report, with an error, or (neither) stopped before the end.

    An execution stops when it was asked to, or by itself when it can no longer be heard (a Ray task
    that lost its dispatcher's RunControl); a run stopped without being asked goes back to the queue.
    """

    report: Report | None = None
    error: str | None = None


class Executor(Protocol):
    """Where claimed runs train: the one part of the lifecycle that differs between worker and dispatcher."""

    #: "worker" or "dispatcher", for the log.
    role: str

    def capacity(self) -> int:
        """How many runs it executes at once."""

    def start(self, claim: Claim) -> Ending | None:
        """Begin executing the run; an Ending when it cannot even start (nothing to stop then)."""

    def progress(self) -> dict[str, dict[str, Any]]:
        """The progress JSON (queue.progress_record) of the runs that reported since the last call, by run id."""

    def stop(self, claims: list[Claim]) -> None:
        """Ask these runs to stop (repeated every heartbeat while they have not ended)."""

    def wait(self, timeout: float) -> list[tuple[Claim, Ending]]:
        """The runs that ended, waiting up to `timeout` seconds for the first of them."""


def error_text(exc: Exception, run_timeout_seconds: float) -> str:
    """The `error` a failed run is recorded with: the exception's type and message, no traceback."""
    if isinstance(exc, ProbeTimeout):
        return f"ProbeTimeout: {exc} (run_timeout_seconds={run_timeout_seconds:g})"
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def process_id(prefix: str = "") -> str:
    """A lease owner unique to this process: host, pid and a random suffix (pids are reused)."""
    return f"{prefix}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def stop_on_signals(stop: threading.Event, what_goes_on: str) -> None:
    """SIGTERM and SIGINT set `stop` (logged: "SIGTERM: stopping after `what_goes_on`")."""

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping after %s", signal.Signals(signum).name, what_goes_on)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def configure_logging() -> None:
    """The log format of the worker and dispatcher processes (one line per event, on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@dataclass
class _Flight:
    """A claimed run in the executor's hands."""

    claim: Claim
    started: float = field(default_factory=time.monotonic)
    stop_reason: StopReason | None = None


class _Lifecycle:
    """The loop's state: the runs in flight by run id, the timers, the stop."""

    def __init__(
        self, engine: Engine, executor: Executor, settings: Settings, owner: str, stop: threading.Event
    ) -> None:
        self.engine = engine
        self.executor = executor
        self.settings = settings
        self.owner = owner
        self.stop = stop
        self.flights: dict[str, _Flight] = {}
        self.claimed = 0
        self.heartbeat_interval = min(HEARTBEAT_MAX_INTERVAL_S, settings.lease_seconds / 3)
        self.next_heartbeat = 0.0
        self.next_reap = 0.0

    # -- claim ---------------------------------------------------------------------------------------

    def reap_if_due(self) -> None:
        """Requeue the runs of dead workers and dispatchers (expired leases), at most every few seconds."""
        if time.monotonic() >= self.next_reap:
            reap_expired(self.engine, self.settings.max_attempts)
            self.next_reap = time.monotonic() + min(REAP_MAX_INTERVAL_S, self.settings.lease_seconds)

    def fill(self, max_runs: int | None) -> None:
        """Claim and start runs until the executor is full, the queue empty or `max_runs` claimed."""
        while len(self.flights) < self.executor.capacity() and (max_runs is None or self.claimed < max_runs):
            claim = claim_next(self.engine, self.owner, self.settings.lease_seconds)
            if claim is None:
                return
            self.claimed += 1
            log.info("run %s: attempt %d started", claim.run_id, claim.attempt)
            self.flights[claim.run_id] = _Flight(claim)
            refused = self.executor.start(claim)
            if refused is not None:
                self.settle(claim, refused)

    # -- heartbeat -----------------------------------------------------------------------------------

    def request_stop(self, flight: _Flight, reason: StopReason) -> None:
        """Stop the run; the first reason given is the one acted on when it ends."""
        if flight.stop_reason is None:
            flight.stop_reason = reason
            log.info("run %s: stopping (%s)", flight.claim.run_id, reason)

    def heartbeat_if_due(self) -> None:
        """Renew every lease with the latest progress; stop the runs cancelled or no longer ours."""
        now = time.monotonic()
        if now < self.next_heartbeat or not self.flights:
            return
        self.next_heartbeat = now + self.heartbeat_interval
        progress = self.executor.progress()
        for run_id, flight in self.flights.items():
            try:
                result = heartbeat(self.engine, flight.claim, self.settings.lease_seconds, progress.get(run_id))
            except Exception:
                # Usually a busy database: the lease outlasts a few missed beats, and the loop must go on
                # to record the runs that end meanwhile.
                log.exception("run %s: heartbeat failed", run_id)
                continue
            if not result.owned:
                self.request_stop(flight, "lost")
            elif result.cancel_requested:
                self.request_stop(flight, "cancelled")
        stopping = [flight.claim for flight in self.flights.values() if flight.stop_reason is not None]
        if stopping:
            self.executor.stop(stopping)

    # -- settle --------------------------------------------------------------------------------------

    def settle(self, claim: Claim, ending: Ending) -> None:
        """Record how the run ended, if it is still ours; each write is retried while the database is
        unavailable, until the process stops (the lease then expires and the run is attempted again)."""
        flight = self.flights.pop(claim.run_id)
        run_id, reason = claim.run_id, flight.stop_reason

        def write(action: Callable[[], bool], what: str) -> bool | None:
            return retry_transient(action, what=f"run {run_id}: {what}", stop=self.stop)

        try:
            if ending.report is not None:
                # It may have finished before it saw a stop request: the result stands if the run is still ours.
                report = ending.report
                stored = write(lambda: complete(self.engine, claim, report), "complete")
                if stored:
                    log.info("run %s: %s in %.1f s", run_id, report.verdict.label, time.monotonic() - flight.started)
                elif stored is None:
                    log.warning("run %s: results not stored before stopping; the run will be retried", run_id)
                else:
                    log.warning("run %s: lease lost before the results were stored; discarded", run_id)
                    if not run_exists(self.engine, run_id):
                        # Deleted while it trained: the events written for it would outlive it (the API
                        # removes the folder of a run it deletes, but this one was written after that).
                        remove_events(self.settings.tensorboard_run_dir(run_id))
            elif reason == "cancelled":
                write(lambda: mark_cancelled(self.engine, claim), "cancel")
                log.info("run %s: cancelled", run_id)
            elif reason == "lost":
                log.warning("run %s: lease lost (reaped or deleted); stopped without writing", run_id)
            elif ending.error is not None:
                error = ending.error
                write(lambda: fail(self.engine, claim, error), "fail")
                log.warning("run %s: attempt %d failed: %s", run_id, claim.attempt, (error.splitlines() or [""])[0])
            else:
                # Shutting down, or the execution stopped by itself: requeued, the attempt stays counted.
                write(lambda: release(self.engine, claim), "release")
                log.info("run %s: handed back to the queue (%s stopping)", run_id, self.executor.role)
        except SQLAlchemyError:
            log.exception("run %s: its end could not be recorded; the lease will expire", run_id)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, grace_seconds: float, max_runs: int | None) -> None:
        """Claim, heartbeat and settle until stopped (or `max_runs` claimed) and no run is in flight."""
        stopping_since: float | None = None
        backoff = Backoff(first=max(self.settings.poll_seconds, 0.5))
        while True:
            if self.stop.is_set():
                stopping_since = stopping_since or time.monotonic()
                if time.monotonic() - stopping_since >= grace_seconds:
                    for flight in self.flights.values():
                        self.request_stop(flight, "shutdown")
            if not self.flights and (self.stop.is_set() or self.claimed == max_runs):
                return
            try:
                if not self.stop.is_set():
                    self.reap_if_due()
                    self.fill(max_runs)
                self.heartbeat_if_due()
                backoff.reset()
                timeout = min(self.settings.poll_seconds, self.heartbeat_interval)
            except SQLAlchemyError as exc:
                # The database is unreachable, locked beyond the busy timeout or full: wait it out, backing
                # off. Leases outlast a few missed beats, and a run whose lease expires is attempted again.
                timeout = backoff.next()
                if is_transient(exc):
                    reason = getattr(exc, "orig", exc)
                    log.warning("%s %s: database unavailable (%s); retrying in %.1f s", *self._who, reason, timeout)
                else:
                    log.exception("%s %s: database error; retrying in %.1f s", *self._who, timeout)
            if self.flights:
                for claim, ending in self.executor.wait(timeout):
                    self.settle(claim, ending)
            else:
                self.stop.wait(timeout)

    @property
    def _who(self) -> tuple[str, str]:
        return self.executor.role, self.owner


def process_queue(
    engine: Engine,
    executor: Executor,
    settings: Settings,
    *,
    owner: str,
    stop: threading.Event,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    max_runs: int | None = None,
) -> int:
    """Execute queued runs with `executor` under leases held by `owner` until `stop` is set (or
    `max_runs` runs were claimed and settled); returns how many runs were claimed.

    On `stop`, no more runs are claimed; those in flight may finish within `grace_seconds`, then the rest
    are stopped and handed back to the queue.
    """
    lifecycle = _Lifecycle(engine, executor, settings, owner, stop)
    log.info("%s %s: polling %s", executor.role, owner, engine.url.render_as_string(hide_password=True))
    try:
        lifecycle.run(grace_seconds, max_runs)
    finally:
        log.info("%s %s: stopped after %d runs", executor.role, owner, lifecycle.claimed)
    return lifecycle.claimed
