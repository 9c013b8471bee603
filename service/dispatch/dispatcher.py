"""The dispatcher: claims queued runs from the database and executes each as a Ray task.

It is a Ray driver and the only process of the cluster that touches the database. It claims runs with
queue.claim_next (at most `dispatch_max_in_flight` at a time) and submits one task per run, asking for
one GPU when the run needs CUDA and CPUs otherwise, so Ray places it. For every run in flight it renews
the lease each second (queue.heartbeat, which also stores the task's progress and reports cancellation)
and, when the task ends, records the result itself (queue.complete / fail / mark_cancelled). Those
writes are fenced by the claim: a dispatcher that stalled past its leases writes nothing, and the leases
of a dispatcher that died expire, so that another dispatcher or a plain worker reaps and claims its runs
again. A run therefore ends with exactly one set of records however often it is attempted.
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
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final, Literal

import ray
from ray.exceptions import RayError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from graddiag.models.spec import Spec
from graddiag.service.dispatch.control import ProgressFields, RunControlActor
from graddiag.service.dispatch.tasks import NAMESPACE, Outcome, TaskOptions, probe_on_cpu, probe_on_gpu
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

log = logging.getLogger(__name__)

# Leases are renewed (and cancellations noticed) this often, or thrice per lease if that is shorter.
HEARTBEAT_MAX_INTERVAL_S: Final = 1.0
# Expired leases are looked for at most this often (and at most once per lease).
REAP_MAX_INTERVAL_S: Final = 5.0
# The cluster's GPU count is read again after this long: nodes join and leave.
GPU_REFRESH_S: Final = 10.0
# A task asked to stop that has not ended after this long is killed (its worker process with it): it
# may be waiting for resources, loading data, or stuck in one very long step.
STOP_GRACE_S: Final = 5.0
# How long a stopping dispatcher lets its runs go on before handing them back to the queue.
DEFAULT_GRACE_SECONDS: Final = 10.0

StopReason = Literal["cancelled", "lost", "shutdown"]


def needs_gpu(spec: Spec, cluster_gpus: float) -> bool:
    """Whether a run asks Ray for a GPU: it must use CUDA, or may ("auto") and the cluster has GPUs."""
    return spec.device == "cuda" or (spec.device == "auto" and cluster_gpus > 0)


def flight_key(claim: Claim) -> str:
    """A task's name for its attempt of a run, in the RunControl."""
    return f"{claim.run_id}:{claim.attempt}"


@dataclass
class _Flight:
    """A claimed run and its Ray task."""

    claim: Claim
    ref: ray.ObjectRef
    stop_reason: StopReason | None = None
    stop_since: float | None = None  # time.monotonic() of the first stop request
    killed: bool = False

    @property
    def key(self) -> str:
        return flight_key(self.claim)


class _Dispatcher:
    """The loop's state: the runs in flight by task reference, the RunControl actor, the timers."""

    def __init__(self, settings: Settings, engine: Engine, dispatcher_id: str, stopping: threading.Event) -> None:
        self.settings = settings
        self.engine = engine
        self.dispatcher_id = dispatcher_id
        self.stopping = stopping
        self.control: Any = RunControlActor.remote()
        self.options = TaskOptions(
            data_dir=None if settings.data_dir is None else str(settings.data_dir),
            cache_dir=str(settings.cache_dir),
            eval_samples=settings.eval_samples,
            run_timeout_seconds=settings.run_timeout_seconds,
            torch_threads=settings.torch_threads or 1,
        )
        self.flights: dict[ray.ObjectRef, _Flight] = {}
        self.progress_request: ray.ObjectRef | None = None
        self.heartbeat_interval = min(HEARTBEAT_MAX_INTERVAL_S, settings.lease_seconds / 3)
        self.next_heartbeat = 0.0
        self.next_reap = 0.0
        self.cluster_gpus = 0.0
        self.gpus_read_at = -GPU_REFRESH_S

    # -- claiming and submitting -------------------------------------------------------------------

    def _gpus(self) -> float:
        if time.monotonic() - self.gpus_read_at >= GPU_REFRESH_S:
            self.cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
            self.gpus_read_at = time.monotonic()
        return self.cluster_gpus

    def fill(self) -> None:
        """Claim runs until `dispatch_max_in_flight` are in flight or the queue is empty."""
        while len(self.flights) < self.settings.dispatch_max_in_flight:
            claim = claim_next(self.engine, self.dispatcher_id, self.settings.lease_seconds)
            if claim is None:
                return
            self._submit(claim)

    def _submit(self, claim: Claim) -> None:
        gpus = self._gpus()
        if claim.spec.device == "cuda" and gpus == 0:
            # Ray would keep the task pending until a GPU node joins; say so now instead.
            fail(self.engine, claim, "device='cuda' was requested but the Ray cluster has no GPUs")
            return
        key = flight_key(claim)
        if needs_gpu(claim.spec, gpus):
            ref = probe_on_gpu.remote(claim.spec, key, self.control, self.options)
        else:
            # As many CPUs as the run's torch threads: Ray then packs CPU runs without oversubscribing.
            ref = probe_on_cpu.options(num_cpus=self.options.torch_threads).remote(
                claim.spec, key, self.control, self.options
            )
        self.flights[ref] = _Flight(claim, ref)
        log.info("run %s: attempt %d submitted", claim.run_id, claim.attempt)

    # -- leases, progress, stop requests -----------------------------------------------------------

    def reap_if_due(self) -> None:
        """Requeue the runs of dead dispatchers and workers (expired leases), at most every few seconds."""
        if time.monotonic() >= self.next_reap:
            reap_expired(self.engine, self.settings.max_attempts)
            self.next_reap = time.monotonic() + min(REAP_MAX_INTERVAL_S, self.settings.lease_seconds)

    def request_stop(self, flight: _Flight, reason: StopReason) -> None:
        """Ask the run's task to stop; the first reason given is the one acted on when it ends."""
        if flight.stop_reason is None:
            flight.stop_reason, flight.stop_since = reason, time.monotonic()
            log.info("run %s: stopping its task (%s)", flight.claim.run_id, reason)

    def _collect_progress(self) -> dict[str, ProgressFields]:
        """The progress the RunControl gathered until the previous beat: a heartbeat never waits for it."""
        progress: dict[str, ProgressFields] = {}
        if self.progress_request is not None:
            ready, _ = ray.wait([self.progress_request], timeout=0)
            if not ready:
                return progress  # the actor is starting, or slow: leases are renewed all the same
            try:
                progress = ray.get(self.progress_request)
            except RayError:
                log.warning("RunControl failed; renewing leases without progress", exc_info=True)
        self.progress_request = self.control.take_progress.remote()
        return progress

    def heartbeat_if_due(self) -> None:
        """Renew every lease with the latest progress; act on cancellations, lost leases, stuck tasks."""
        now = time.monotonic()
        if now < self.next_heartbeat or not self.flights:
            return
        self.next_heartbeat = now + self.heartbeat_interval
        progress = self._collect_progress()
        for flight in self.flights.values():
            latest = progress.get(flight.key)
            record = None if latest is None else progress_record(**latest)
            result = heartbeat(self.engine, flight.claim, self.settings.lease_seconds, record)
            if not result.owned:
                self.request_stop(flight, "lost")
            elif result.cancel_requested:
                self.request_stop(flight, "cancelled")
        stopping = [f for f in self.flights.values() if f.stop_reason is not None]
        if stopping:
            # Repeated every beat: a RunControl restarted by Ray has forgotten earlier requests.
            self.control.stop.remote([f.key for f in stopping])
        for flight in stopping:
            if not flight.killed and flight.stop_since is not None and now - flight.stop_since >= STOP_GRACE_S:
                log.warning("run %s: its task ignored the stop request; killing it", flight.claim.run_id)
                ray.cancel(flight.ref, force=True)
                flight.killed = True

    # -- results -----------------------------------------------------------------------------------

    def settle_ready(self, timeout: float) -> None:
        """Record the results of the tasks that have ended, waiting up to `timeout` for the first."""
        refs = list(self.flights)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            flight = self.flights.pop(ref)
            self.control.forget.remote(flight.key)
            self._settle(flight)

    def _settle(self, flight: _Flight) -> None:
        """Record how the run's task ended; each write is retried while the database is unavailable."""
        claim, reason = flight.claim, flight.stop_reason
        crash: RayError | None = None
        try:
            outcome: Outcome | None = ray.get(flight.ref)
        except RayError as exc:
            # Killed after a stop request, or its worker process or node died (after Ray's retries).
            outcome, crash = None, exc
        if outcome is not None and outcome.report is not None:
            # It may have finished before it saw a stop request: the result stands if the run is still ours.
            report = outcome.report
            stored = self._write(lambda: complete(self.engine, claim, report), claim, "complete")
            if stored:
                log.info("run %s: %s", claim.run_id, report.verdict.label)
            elif stored is not None:
                log.warning("run %s: lease lost before the results were stored; discarded", claim.run_id)
        elif reason == "cancelled":
            self._write(lambda: mark_cancelled(self.engine, claim), claim, "cancel")
            log.info("run %s: cancelled", claim.run_id)
        elif reason == "lost":
            log.warning("run %s: lease lost (reaped or deleted); stopped without writing", claim.run_id)
        elif (error := _failure(outcome, crash, reason)) is not None:
            self._write(lambda: fail(self.engine, claim, error), claim, "fail")
            log.warning("run %s: failed: %s", claim.run_id, error.splitlines()[0] if error else "")
        else:
            # Shutting down, or the task stopped by itself because it lost its RunControl: requeued.
            self._write(lambda: release(self.engine, claim), claim, "release")
            log.info("run %s: handed back to the queue", claim.run_id)

    def _write(self, action: Callable[[], bool], claim: Claim, what: str) -> bool | None:
        """queue.retry_transient: None when the dispatcher stopped before the write went through (the
        lease then expires and the run is attempted again)."""
        return retry_transient(action, what=f"run {claim.run_id}: {what}", stop=self.stopping)

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, grace_seconds: float) -> None:
        """Claim, submit, heartbeat and settle until stopped and every run in flight is settled."""
        stopping_since: float | None = None
        backoff = Backoff(first=max(self.settings.poll_seconds, 0.5))
        while True:
            if self.stopping.is_set():
                stopping_since = stopping_since or time.monotonic()
                if not self.flights:
                    return
                if time.monotonic() - stopping_since >= grace_seconds:
                    for flight in self.flights.values():
                        self.request_stop(flight, "shutdown")
            try:
                if not self.stopping.is_set():
                    self.reap_if_due()
                    self.fill()
                self.heartbeat_if_due()
                if self.flights:
                    self.settle_ready(timeout=min(self.settings.poll_seconds, self.heartbeat_interval))
                else:
                    self.stopping.wait(self.settings.poll_seconds)
                backoff.reset()
            except SQLAlchemyError as exc:
                # The database is unreachable, locked or full: leases outlast a few missed beats, and a run
                # whose lease expires meanwhile is attempted again.
                delay = backoff.next()
                if is_transient(exc):
                    reason = getattr(exc, "orig", exc)
                    log.warning("dispatcher: database unavailable (%s); retrying in %.1f s", reason, delay)
                else:
                    log.exception("dispatcher: database error; retrying in %.1f s", delay)
                self.stopping.wait(delay)


def _failure(outcome: Outcome | None, crash: RayError | None, reason: StopReason | None) -> str | None:
    """The error of a run that failed by itself: the task's, or Ray's when its worker or node died unasked."""
    if outcome is not None and outcome.status == "failed":
        return outcome.error
    if crash is not None and reason is None:
        first_line = next((line for line in str(crash).splitlines() if line.strip()), "")
        return f"{type(crash).__name__}: {first_line}" if first_line else type(crash).__name__
    return None


def run_dispatcher(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    dispatcher_id: str | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
) -> None:
    """Dispatch queued runs to the Ray cluster this process is connected to, until `stop` is set.

    On `stop`, no more runs are claimed; those in flight may finish within `grace_seconds`, then the
    rest are stopped and handed back to the queue.
    """
    stop = stop or threading.Event()
    dispatcher_id = dispatcher_id or f"dispatch-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    engine = make_engine(settings.db_url)
    dispatcher = _Dispatcher(settings, engine, dispatcher_id, stop)
    log.info("dispatcher %s: dispatching from %s", dispatcher_id, engine.url.render_as_string(hide_password=True))
    try:
        dispatcher.run(grace_seconds)
    finally:
        ray.kill(dispatcher.control)
        engine.dispose()
        log.info("dispatcher %s: stopped", dispatcher_id)


def dispatch_main(settings: Settings, ray_address: str | None = None) -> None:
    """Process entry point: connect to Ray at `ray_address` (else settings.ray_address, $RAY_ADDRESS, the
    Ray cluster started on this machine, or a new local Ray instance) and dispatch until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping after the runs in flight", signal.Signals(signum).name)
        stop.set()

    address = ray_address or settings.ray_address
    ray.init(address=address, namespace=NAMESPACE)
    # After ray.init, which installs handlers of its own that would end the process at once.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("connected to Ray at %s: %s", address or "(default)", ray.cluster_resources())
    try:
        run_dispatcher(settings, stop=stop)
    finally:
        ray.shutdown()
