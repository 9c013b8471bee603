"""The worker: the local executor of the run lifecycle (lifecycle.py), training one run at a time here.

torch is imported once per process and the decoded CIFAR-10 is kept in a DatasetCache across runs, so a
warm worker starts a queued run within one poll interval. A run trains in a thread of its own while the
lifecycle's loop renews its lease, stores its progress and watches for cancellation; the probe polls
the stop flag every step. No database transaction is held open while training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Final, Protocol

import torch

from graddiag.models.spec import Spec
from graddiag.service.engine.data import DatasetCache
from graddiag.service.engine.probe import ProbeCancelled, Progress, run_probe
from graddiag.service.engine.report import Report
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine
from graddiag.service.worker.lifecycle import (
    DEFAULT_GRACE_SECONDS,
    HEARTBEAT_MAX_INTERVAL_S,
    Ending,
    configure_logging,
    error_text,
    process_id,
    process_queue,
    stop_on_signals,
)
from graddiag.service.worker.memory_guard import guard_for
from graddiag.service.worker.queue import Claim, progress_record

if TYPE_CHECKING:
    from graddiag.service.export.tensorboard import HistogramCollector

log = logging.getLogger(__name__)

# Gradient histograms stay in memory until the run ends: this many float32 values in all (64 MiB), spread
# over every recorded step and layer, bounds them however deep, wide and long the run is.
HISTOGRAM_BUDGET_VALUES: Final = 16 * 2**20
# The worker checks that its parent is alive at least this often (it also wakes the moment the parent
# exits); an orphaned worker whose run has not stopped this long after exits anyway.
PARENT_CHECK_SECONDS: Final = 0.5
ORPHAN_EXIT_SECONDS: Final = 5.0


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


class _LocalExecutor:
    """Trains one claimed run at a time in a thread of this process, with the warm DatasetCache."""

    role = "worker"

    def __init__(self, settings: Settings, cache: DatasetCache) -> None:
        self._settings = settings
        self._cache = cache
        self._lock = threading.Lock()
        self._progress: dict[str, dict[str, Any]] = {}
        self._stops: dict[str, threading.Event] = {}
        self._ended: queue.Queue[tuple[Claim, Ending]] = queue.Queue()

    def capacity(self) -> int:
        """One run at a time: a second one would only share the same cores (see the service bench)."""
        return 1

    def start(self, claim: Claim) -> Ending | None:
        """Start training the run in a new thread."""
        stop = self._stops[claim.run_id] = threading.Event()
        name = f"run-{claim.run_id[:8]}"
        threading.Thread(target=self._execute, args=(claim, stop), name=name, daemon=True).start()
        return None

    def progress(self) -> dict[str, dict[str, Any]]:
        """The latest progress record of the run, if it reported since the last call."""
        with self._lock:
            progress, self._progress = self._progress, {}
        return progress

    def stop(self, claims: list[Claim]) -> None:
        """Set the runs' stop flags; the probe polls them every step."""
        for claim in claims:
            self._stops[claim.run_id].set()

    def abandon(self) -> None:
        """Stop every run now (the worker's parent died): each ends unfinished and goes back to the queue."""
        for stop in list(self._stops.values()):
            stop.set()

    def wait(self, timeout: float) -> list[tuple[Claim, Ending]]:
        """The runs whose thread ended, waiting up to `timeout` for the first."""
        try:
            ended = [self._ended.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self._ended.empty():
            ended.append(self._ended.get_nowait())
        for claim, _ in ended:
            del self._stops[claim.run_id]
        return ended

    def _execute(self, claim: Claim, stop: threading.Event) -> None:
        self._ended.put((claim, self._train(claim, stop)))

    def _on_progress(self, run_id: str, progress: Progress) -> None:
        record = progress_record(progress.step, progress.steps, progress.loss, progress.label_so_far)
        with self._lock:
            self._progress[run_id] = record

    def _train(self, claim: Claim, stop: threading.Event) -> Ending:
        """Train the run; raises nothing (a failure is an Ending with its error)."""
        settings, run_id = self._settings, claim.run_id
        started = time.monotonic()
        collector = _histogram_collector(claim, settings)
        try:
            data = self._cache.get() if claim.spec.dataset == "cifar10" else None
            # The data set is loaded once per worker, outside the run's memory limit.
            with guard_for(claim.spec, settings.max_run_memory_mb, settings.eval_samples) as guard:
                report = run_probe(
                    claim.spec,
                    data=data,
                    eval_samples=settings.eval_samples,
                    on_progress=lambda progress: self._on_progress(run_id, progress),
                    progress_interval=HEARTBEAT_MAX_INTERVAL_S,
                    should_stop=guard.should_stop(stop.is_set),
                    deadline=started + settings.run_timeout_seconds,
                    on_record=collector,
                )
        except ProbeCancelled:
            return Ending()
        except Exception as exc:
            # The traceback goes to the log; the run's error is the readable one line.
            log.exception("run %s: attempt %d raised", run_id, claim.attempt)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an out-of-memory error, the next run starts from a clean pool
            return Ending(error=error_text(exc, settings.run_timeout_seconds))
        if collector is not None:
            # Before the run is marked succeeded, so the API finds the events as soon as it sees the verdict.
            _write_tensorboard(settings, run_id, report, collector)
        return Ending(report=report)


class ParentProcess(Protocol):
    """What the worker needs of the process that started it (multiprocessing.parent_process() is one)."""

    @property
    def pid(self) -> int | None: ...

    def join(self, timeout: float | None = None) -> None:
        """Wait up to `timeout` seconds for the process to end."""

    def is_alive(self) -> bool:
        """Whether the process is still running."""


class _ParentWatch:
    """Stops the worker when the process that started it (`serve`, the pool) dies.

    The portable half of dying with the parent (on Linux the kernel also sends SIGTERM: serve's
    die_with_parent): a thread waits on the parent's sentinel, which becomes ready the moment the parent
    exits, and checks it at least every PARENT_CHECK_SECONDS. An orphaned worker claims nothing more, hands
    its run back to the queue at once (no grace: nobody waits for it) and exits; if the run does not stop
    within ORPHAN_EXIT_SECONDS (one very long step), the process exits anyway and the lease takes over.
    """

    def __init__(self, parent: ParentProcess, stop: threading.Event, executor: _LocalExecutor) -> None:
        self._parent = parent
        self._stop = stop
        self._executor = executor
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="parent-watch", daemon=True)

    def __enter__(self) -> _ParentWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.is_set():
            self._parent.join(PARENT_CHECK_SECONDS)  # returns early when the parent exits
            if not self._parent.is_alive():
                self._orphaned()
                return

    def _orphaned(self) -> None:
        log.warning("worker: parent process %s died; handing the run back and exiting", self._parent.pid)
        self._stop.set()
        deadline = time.monotonic() + ORPHAN_EXIT_SECONDS
        # Repeated: a run claimed by a loop that had not yet seen `stop` is stopped too.
        while not self._done.wait(0.2):
            self._executor.abandon()
            if time.monotonic() >= deadline:
                log.error("worker: run still going %.0f s after the parent died; exiting now", ORPHAN_EXIT_SECONDS)
                os._exit(70)  # EX_SOFTWARE; the run's lease expires and it is attempted again


def run_worker(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    worker_id: str | None = None,
    max_runs: int | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    parent: ParentProcess | None = None,
) -> None:
    """Claim and execute runs until `stop` is set (or `max_runs` runs were executed).

    A run that fails is recorded as failed and the loop goes on. When `stop` is set during a run, the
    run may finish within `grace_seconds`; otherwise it is handed back to the queue. With `parent` (the
    process that started this worker), the worker stops at once, handing its run back, when it dies.
    """
    engine = make_engine(settings.db_url)
    # cifar10_dir: where `serve` downloaded the data set when no data_dir is configured.
    executor = _LocalExecutor(settings, DatasetCache(settings.cifar10_dir(), settings.cache_dir))
    stop = stop or threading.Event()
    try:
        with _ParentWatch(parent, stop, executor) if parent is not None else contextlib.nullcontext():
            process_queue(
                engine,
                executor,
                settings,
                owner=worker_id or process_id(),
                stop=stop,
                grace_seconds=grace_seconds,
                max_runs=max_runs,
            )
    finally:
        engine.dispose()


def worker_main(settings: Settings, parent: ParentProcess | None = None) -> None:
    """Process entry point: torch threads from settings, SIGTERM/SIGINT stop the worker gracefully, and
    the death of `parent` (the process that started it, when given) stops it at once."""
    configure_logging()
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    stop = threading.Event()
    stop_on_signals(stop, "the current run")
    run_worker(settings, stop=stop, parent=parent)
    if parent is not None and not parent.is_alive():
        # Orphaned, its run handed back: nothing is left to clean up, and the interpreter's teardown (torch's
        # above all) takes 1-3 s on a busy machine that the dead service's worker should not hold.
        logging.shutdown()
        os._exit(0)
