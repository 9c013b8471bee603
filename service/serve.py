"""`graddiag serve`: migrate the database, start local worker processes, run the API until a signal.

Workers are separate processes (multiprocessing "spawn": a clean interpreter, no inherited torch or
database state) supervised by :class:`WorkerPool`, which restarts one that dies. SIGINT/SIGTERM stop
uvicorn first (no new runs accepted), then the workers: SIGTERM, a grace period for each to finish or
release its run, then SIGKILL. A killed worker's run is not lost: its lease expires and the reaper
requeues it for the next attempt.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Final, TextIO

import uvicorn

from graddiag.service.api.app import create_app
from graddiag.service.api.security import InsecureBind, check_bind, redact_server_logs
from graddiag.service.settings import Settings
from graddiag.service.store.db import upgrade

log = logging.getLogger("graddiag.serve")

# Longer than the worker's own 10 s grace for finishing its run before it hands the run back.
STOP_GRACE_SECONDS = 20.0
# A worker that dies sooner than this after its start counts as crashing; restarts then back off.
CRASH_WINDOW_SECONDS = 30.0
MAX_RESTART_DELAY_SECONDS = 60.0
SUPERVISE_INTERVAL_SECONDS = 0.5
# In-flight requests (long `?wait=` polls included) get this long once shutdown starts.
HTTP_SHUTDOWN_GRACE_SECONDS = 5


def default_worker_split(cores: int, cuda_devices: int) -> tuple[int, int]:
    """(worker processes, torch threads per worker) for a machine.

    One worker per CUDA device (the GPU does the work; the cores are shared among them). On CPU, one
    single-threaded worker per core: probes are small networks whose matrix products scale poorly
    across threads, so separate runs in parallel beat one run on several threads (measured by
    `python -m bench.service`: on 2 cores, 2 x 1 ran a 20-run sweep 1.7x faster than 1 x 2).
    """
    cores = max(1, cores)
    if cuda_devices > 0:
        return cuda_devices, max(1, cores // cuda_devices)
    return cores, 1


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Where a GPU driver shows itself without loading anything: NVIDIA's proc entries and device node, and
# the ROCm kernel driver's node (torch.cuda counts ROCm devices too).
_GPU_DRIVER_PATHS = ("/proc/driver/nvidia/gpus", "/dev/nvidiactl", "/dev/kfd")
_COUNT_DEVICES = "import torch; print(torch.cuda.device_count())"


def _torch_device_count() -> int:
    """torch.cuda.device_count(), asked of a short-lived child so that this process never imports torch.

    The API process would otherwise carry torch (about 700 MiB) only to count devices once. The child
    sees the same environment (CUDA_VISIBLE_DEVICES, MIG), so its count is the one workers will see.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-c", _COUNT_DEVICES], capture_output=True, text=True, timeout=120, check=True
        )
        return int(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("could not count CUDA devices (%s); starting CPU workers", exc)
        return 0


def cuda_devices() -> list[str]:
    """The CUDA device ids workers may be pinned to, in CUDA_VISIBLE_DEVICES terms.

    Never imports torch here: on a machine without a GPU driver the answer is none at once, and
    otherwise a child process counts the devices (see _torch_device_count).
    """
    if not any(os.path.exists(path) for path in _GPU_DRIVER_PATHS):
        return []
    count = _torch_device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


# prctl(2) option: the signal the kernel sends this process when its parent dies.
PR_SET_PDEATHSIG: Final = 1


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies (Linux); False elsewhere.

    Without it a worker whose `serve` was SIGKILLed lives on under PID 1, claiming runs for a service
    that is gone (and, after a restart, beside the new one's workers). SIGTERM, not SIGKILL: the worker
    then hands its run back to the queue at once instead of leaving it to the lease. The kernel ties the
    signal to the thread that started the worker (the pool's supervisor may), so the worker also checks
    that its parent *process* is gone before treating a SIGTERM as orphaning (worker._ParentWatch).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError) as exc:
        log.warning("worker: no parent-death signal (%s); the parent liveness check still applies", exc)
        return False
    return True


def _worker_entry(settings: Settings, cuda_device: str | None) -> None:
    # Runs in the spawned child: pin the device before torch initialises CUDA.
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_device
    die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        return  # the parent died before the signal was armed: nothing would ever stop this worker
    from graddiag.service.worker.worker import worker_main

    worker_main(settings, parent=parent)


class WorkerPool:
    """N supervised worker processes; a dead one is restarted (with back-off if it keeps crashing)."""

    def __init__(self, settings: Settings, count: int, devices: list[str] | None = None) -> None:
        self._settings = settings
        self._devices = devices or []
        self._procs: list[BaseProcess | None] = [None] * count
        self._started: list[float] = [0.0] * count
        self._crashes: list[int] = [0] * count
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def _device(self, slot: int) -> str | None:
        return self._devices[slot % len(self._devices)] if self._devices else None

    def _spawn(self, slot: int) -> None:
        proc = self._context.Process(
            target=_worker_entry,
            args=(self._settings, self._device(slot)),
            name=f"graddiag-worker-{slot}",
        )
        proc.start()
        self._procs[slot] = proc
        self._started[slot] = time.monotonic()
        log.info("worker %d started (pid %s, device %s)", slot, proc.pid, self._device(slot) or "cpu")

    def start(self) -> None:
        """Start every worker and the supervisor."""
        with self._lock:
            for slot in range(len(self._procs)):
                self._spawn(slot)
        if self._procs:
            self._supervisor.start()

    def _restart_delay(self, slot: int) -> float:
        return min(MAX_RESTART_DELAY_SECONDS, 2.0 ** self._crashes[slot] - 1)

    def _supervise(self) -> None:
        died_at: dict[int, float] = {}
        while not self._stopping.wait(SUPERVISE_INTERVAL_SECONDS):
            with self._lock:
                if self._stopping.is_set():
                    return
                for slot, proc in enumerate(self._procs):
                    if proc is None or proc.is_alive():
                        continue
                    now = time.monotonic()
                    if slot not in died_at:
                        lived = now - self._started[slot]
                        self._crashes[slot] = self._crashes[slot] + 1 if lived < CRASH_WINDOW_SECONDS else 0
                        died_at[slot] = now
                        log.warning(
                            "worker %d (pid %s) exited with %s after %.1f s; restarting in %.0f s",
                            slot,
                            proc.pid,
                            proc.exitcode,
                            lived,
                            self._restart_delay(slot),
                        )
                    if now - died_at[slot] >= self._restart_delay(slot):
                        proc.close()
                        del died_at[slot]
                        self._spawn(slot)

    def alive(self) -> tuple[int, int]:
        """(live worker processes, configured workers), for readiness."""
        with self._lock:
            return sum(1 for p in self._procs if p is not None and p.is_alive()), len(self._procs)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM every worker, wait up to `grace` seconds in all, SIGKILL the rest."""
        started = time.monotonic()
        self._stopping.set()
        if self._supervisor.is_alive():
            self._supervisor.join()
        procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker pid %s ignored SIGTERM for %.0f s; killing it", proc.pid, grace)
                proc.kill()
                proc.join()
        self._procs = [None] * len(self._procs)
        log.info("%d worker(s) stopped in %.1f s", len(procs), time.monotonic() - started)


def plan_workers(settings: Settings) -> tuple[int, Settings, list[str]]:
    """How many workers to start, the settings they run with (torch threads filled in), their devices."""
    devices = cuda_devices() if settings.workers != 0 else []
    cores = available_cores()
    auto_workers, auto_threads = default_worker_split(cores, len(devices))
    workers = auto_workers if settings.workers is None else settings.workers
    threads = settings.torch_threads
    if threads is None:
        threads = auto_threads if settings.workers is None else max(1, cores // max(1, workers))
    return workers, settings.model_copy(update={"torch_threads": threads}), devices


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _worker_pool(settings: Settings) -> Iterator[WorkerPool]:
    count, worker_settings, devices = plan_workers(settings)
    log.info(
        "starting %d worker process(es), %s torch thread(s) each, devices: %s",
        count,
        worker_settings.torch_threads,
        ", ".join(devices) or "cpu",
    )
    pool = WorkerPool(worker_settings, count, devices)
    try:
        pool.start()
        yield pool
    finally:
        pool.stop()


def prepare_cifar10(settings: Settings, progress: TextIO | None = sys.stderr) -> bool:
    """Make sure the workers will find CIFAR-10, downloading it once here (progress on the terminal) before
    any worker starts, so they never race to fetch it; whether it is there.

    A failed or disallowed download is logged with what to do, and serving goes on: synthetic runs need no
    data, and the API refuses CIFAR-10 specs at submit time (503 data_unavailable) until a copy is there.
    """
    from graddiag.service.engine.dataset_files import DataDownloadError
    from graddiag.service.local import fetch_cifar10

    try:
        where = fetch_cifar10(settings, progress)
    except DataDownloadError as exc:
        log.warning("CIFAR-10 is not available, so runs with dataset='cifar10' are refused: %s", exc)
        return False
    log.info("CIFAR-10 found in %s", where)
    return True


def serve(settings: Settings) -> None:
    """Migrate the database to head, start the workers and serve the API until SIGINT/SIGTERM.

    Exits (SystemExit) before anything starts when asked to listen beyond loopback with no API token.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_bind(settings)
    except InsecureBind as exc:
        raise SystemExit(f"graddiag serve: {exc}") from exc
    redact_server_logs()
    upgrade(settings.db_url)
    prepare_cifar10(settings)
    stop = threading.Event()
    with _stop_on_signals(stop), _worker_pool(settings) as pool:
        config = uvicorn.Config(
            create_app(settings, worker_probe=pool.alive),
            host=settings.host,
            port=settings.port,
            timeout_graceful_shutdown=HTTP_SHUTDOWN_GRACE_SECONDS,
        )
        server = uvicorn.Server(config)

        # uvicorn installs its own signal handlers only once it runs; this covers a signal that
        # arrives before (ours set `stop`) as well as one it captures (it re-raises it to ours).
        def stop_server() -> None:
            stop.wait()
            server.should_exit = True

        threading.Thread(target=stop_server, name="stop-server", daemon=True).start()
        if not stop.is_set():
            server.run()
        stop.set()


def worker_process(settings: Settings) -> None:
    """A worker host without the API: migrate, run the supervised workers until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    upgrade(settings.db_url)
    prepare_cifar10(settings)
    stop = threading.Event()
    with _stop_on_signals(stop), _worker_pool(settings):
        # A timed wait keeps the main thread responsive to signals.
        while not stop.wait(1.0):
            pass
