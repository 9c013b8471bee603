"""The dispatcher: the Ray executor of the run lifecycle (worker/lifecycle.py), each claimed run a Ray task.

It is a Ray driver and the only process of the cluster that touches the database. The lifecycle claims
runs (at most `dispatch_max_in_flight` at a time), renews their leases each second with the tasks'
progress, and records each result itself when the task ends, fenced by the claim: a dispatcher that
stalled past its leases writes nothing, and the leases of a dispatcher that died expire, so that
another dispatcher or a plain worker reaps and claims its runs again. This module submits one task per
run, asking for one GPU when the run needs CUDA and CPUs otherwise, so Ray places it; it passes
progress and stop requests through the RunControl actor, and kills a task that ignores a stop request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Final

import ray
from ray.exceptions import RayError

from graddiag.models.spec import Spec
from graddiag.service.dispatch.control import ProgressFields, RunControlActor
from graddiag.service.dispatch.tasks import NAMESPACE, Outcome, TaskOptions, probe_on_cpu, probe_on_gpu
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine
from graddiag.service.worker import lifecycle
from graddiag.service.worker.lifecycle import Ending
from graddiag.service.worker.queue import Claim, progress_record

log = logging.getLogger(__name__)

# The cluster's GPU count is read again after this long: nodes join and leave.
GPU_REFRESH_S: Final = 10.0
# A task asked to stop that has not ended after this long is killed (its worker process with it): it
# may be waiting for resources, loading data, or stuck in one very long step.
STOP_GRACE_S: Final = 5.0


def needs_gpu(spec: Spec, cluster_gpus: float) -> bool:
    """Whether a run asks Ray for a GPU: it must use CUDA, or may ("auto") and the cluster has GPUs."""
    return spec.device == "cuda" or (spec.device == "auto" and cluster_gpus > 0)


def flight_key(claim: Claim) -> str:
    """A task's name for its attempt of a run, in the RunControl."""
    return f"{claim.run_id}:{claim.attempt}"


class _RayExecutor:
    """Executes each claimed run as a Ray task; talks to the tasks through one RunControl actor."""

    role = "dispatcher"

    def __init__(self, settings: Settings) -> None:
        self._max_in_flight = settings.dispatch_max_in_flight
        self.control: Any = RunControlActor.remote()
        self._options = TaskOptions(
            data_dir=None if settings.data_dir is None else str(settings.data_dir),
            cache_dir=str(settings.cache_dir),
            eval_samples=settings.eval_samples,
            run_timeout_seconds=settings.run_timeout_seconds,
            torch_threads=settings.torch_threads or 1,
            max_run_memory_mb=settings.max_run_memory_mb,
        )
        self._tasks: dict[ray.ObjectRef, Claim] = {}
        self._refs: dict[str, ray.ObjectRef] = {}  # by run id
        self._stop_since: dict[str, float] = {}  # by run id: time.monotonic() of the first stop request
        self._killed: set[str] = set()
        self._progress_request: ray.ObjectRef | None = None
        self._cluster_gpus = 0.0
        self._gpus_read_at = -GPU_REFRESH_S

    def capacity(self) -> int:
        """`dispatch_max_in_flight` runs at once; Ray places them on the cluster."""
        return self._max_in_flight

    def _gpus(self) -> float:
        if time.monotonic() - self._gpus_read_at >= GPU_REFRESH_S:
            self._cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
            self._gpus_read_at = time.monotonic()
        return self._cluster_gpus

    def start(self, claim: Claim) -> Ending | None:
        """Submit the run's task, asking for a GPU when it needs one and CPUs otherwise."""
        gpus = self._gpus()
        if claim.spec.device == "cuda" and gpus == 0:
            # Ray would keep the task pending until a GPU node joins; say so now instead.
            return Ending(error="device='cuda' was requested but the Ray cluster has no GPUs")
        key = flight_key(claim)
        if needs_gpu(claim.spec, gpus):
            ref = probe_on_gpu.remote(claim.spec, key, self.control, self._options)
        else:
            # As many CPUs as the run's torch threads: Ray then packs CPU runs without oversubscribing.
            ref = probe_on_cpu.options(num_cpus=self._options.torch_threads).remote(
                claim.spec, key, self.control, self._options
            )
        self._tasks[ref] = claim
        self._refs[claim.run_id] = ref
        return None

    def progress(self) -> dict[str, dict[str, Any]]:
        """The progress the RunControl gathered until the previous beat: a heartbeat never waits for it."""
        progress: dict[str, ProgressFields] = {}
        if self._progress_request is not None:
            ready, _ = ray.wait([self._progress_request], timeout=0)
            if not ready:
                return {}  # the actor is starting, or slow: leases are renewed all the same
            try:
                progress = ray.get(self._progress_request)
            except RayError:
                log.warning("RunControl failed; renewing leases without progress", exc_info=True)
        self._progress_request = self.control.take_progress.remote()
        # The keys are "<run id>:<attempt>"; this dispatcher holds one attempt of each run.
        return {key.rpartition(":")[0]: progress_record(**fields) for key, fields in progress.items()}

    def stop(self, claims: list[Claim]) -> None:
        """Ask the tasks to stop through the RunControl; kill those that ignore it for STOP_GRACE_S."""
        # Repeated every beat: a RunControl restarted by Ray has forgotten earlier requests.
        self.control.stop.remote([flight_key(claim) for claim in claims])
        now = time.monotonic()
        for claim in claims:
            since = self._stop_since.setdefault(claim.run_id, now)
            if claim.run_id not in self._killed and now - since >= STOP_GRACE_S:
                log.warning("run %s: its task ignored the stop request; killing it", claim.run_id)
                ray.cancel(self._refs[claim.run_id], force=True)
                self._killed.add(claim.run_id)

    def wait(self, timeout: float) -> list[tuple[Claim, Ending]]:
        """The runs whose task ended, waiting up to `timeout` for the first."""
        refs = list(self._tasks)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ended = []
        for ref in ready:
            claim = self._tasks.pop(ref)
            del self._refs[claim.run_id]
            asked_to_stop = self._stop_since.pop(claim.run_id, None) is not None
            self._killed.discard(claim.run_id)
            self.control.forget.remote(flight_key(claim))
            ended.append((claim, _ending(ref, asked_to_stop)))
        return ended


def _ending(ref: ray.ObjectRef, asked_to_stop: bool) -> Ending:
    """How a task ended: its Outcome, or, when Ray raised, killed on request or crashed (an error)."""
    try:
        outcome: Outcome = ray.get(ref)
    except RayError as crash:
        # Killed after a stop request, or its worker process or node died (after Ray's retries).
        if asked_to_stop:
            return Ending()
        first_line = next((line for line in str(crash).splitlines() if line.strip()), "")
        return Ending(error=f"{type(crash).__name__}: {first_line}" if first_line else type(crash).__name__)
    if outcome.status == "failed":
        return Ending(error=outcome.error)
    return Ending(report=outcome.report)


def run_dispatcher(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    dispatcher_id: str | None = None,
    grace_seconds: float = lifecycle.DEFAULT_GRACE_SECONDS,
) -> None:
    """Dispatch queued runs to the Ray cluster this process is connected to, until `stop` is set.

    On `stop`, no more runs are claimed; those in flight may finish within `grace_seconds`, then the
    rest are stopped and handed back to the queue.
    """
    engine = make_engine(settings.db_url)
    executor = _RayExecutor(settings)
    try:
        lifecycle.process_queue(
            engine,
            executor,
            settings,
            owner=dispatcher_id or lifecycle.process_id("dispatch-"),
            stop=stop or threading.Event(),
            grace_seconds=grace_seconds,
        )
    finally:
        ray.kill(executor.control)
        engine.dispose()


def dispatch_main(settings: Settings, ray_address: str | None = None) -> None:
    """Process entry point: connect to Ray at `ray_address` (else settings.ray_address, $RAY_ADDRESS, the
    Ray cluster started on this machine, or a new local Ray instance) and dispatch until SIGTERM/SIGINT."""
    lifecycle.configure_logging()
    stop = threading.Event()
    address = ray_address or settings.ray_address
    ray.init(address=address, namespace=NAMESPACE)
    # After ray.init, which installs handlers of its own that would end the process at once.
    lifecycle.stop_on_signals(stop, "the runs in flight")
    log.info("connected to Ray at %s: %s", address or "(default)", ray.cluster_resources())
    try:
        run_dispatcher(settings, stop=stop)
    finally:
        ray.shutdown()
