"""A hard memory limit for one run, enforced inside the process that trains it.

The API refuses specs whose estimate (models/memory.py) is over the cap, but an estimate can be wrong,
and a run far over it would take the whole box down (workers, API and database share it). The guard
turns that into one failed run: a watchdog thread reads the process's private resident memory every
`POLL_INTERVAL_S`, and once the growth since the run started passes the limit, the run's own thread
raises `MemoryLimitExceeded` at its next module call (a global forward pre-hook, so within one layer of
the forward or the held-out evaluation) or at its next `should_stop` poll (once per step). The worker
records the run as failed with that error and goes on to its next run.

Why a watchdog and not `resource.setrlimit(RLIMIT_AS)`: the worker process trains every run itself,
so an address-space limit would apply to the worker, not to the run: it would fail allocations anywhere
in the worker (its database writes, its next run) and counts reserved address space (torch maps far
more than it touches), so it would refuse healthy runs and could leave the worker unable to recover.
Running each run in a child with its own rlimit would cost torch's import (seconds) per run. The guard
only raises from inside the guarded run's own thread, where the worker already handles a failed probe.

Between two polls one operation can still allocate more (a single layer's output); the limit leaves
room for that, and the estimate is what keeps runs that far from the limit in the first place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

from graddiag.models.memory import estimate_run_memory_mb
from graddiag.models.spec import Spec

log = logging.getLogger(__name__)

MIB: Final = 2**20
POLL_INTERVAL_S: Final = 0.02
# A run may grow to this multiple of its estimate (or to the operator's max_run_memory_mb, if larger)
# before it is failed: bench/memory.py measures every run it tries at most 1.25x its estimate.
LIMIT_OVER_ESTIMATE: Final = 1.5
# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD: Final = -3
# Allocations at least this large are mapped and unmapped on their own (tensors of 64k floats or more).
MMAP_THRESHOLD_BYTES: Final = 256 * 1024
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_pinned = False


class MemoryLimitExceeded(Exception):
    """A run's memory grew past its limit; the run is failed with this message."""


def _statm() -> list[int] | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return [int(field) * _PAGE_SIZE for field in statm.read().split()]
    except (OSError, ValueError):
        return None


def resident_bytes() -> int | None:
    """The process's resident set size now (Linux `/proc/self/statm`), or None where it cannot be read."""
    fields = _statm()
    return fields[1] if fields is not None and len(fields) > 2 else None


def private_resident_bytes() -> int | None:
    """Resident memory that is not a file's pages (statm: resident - shared), or None where unreadable.

    What the guard watches: a run's tensors are anonymous memory. The pages of the memory-mapped CIFAR-10
    cache are page cache, shared by every worker and reclaimable; a run touching images maps more of
    them into this process (up to the whole data set, once per worker), which is not the run's memory.
    """
    fields = _statm()
    return fields[1] - fields[2] if fields is not None and len(fields) > 2 else None


def pin_malloc_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold so freed tensors go back to the system; False where that is not glibc.

    By default glibc raises the threshold to the size of each mapped block freed (up to 32 MiB), after
    which tensors of that size come from the heap and stay resident once freed: a worker's RSS then
    creeps up run after run, step after step, far past what is alive (an MLP depth 10, width 1024,
    batch 1024, softsign: 564 MiB peak growth after 20 steps against 346 MiB with the threshold fixed),
    and neither the estimate nor the guard can tell live tensors from that. Setting the threshold
    explicitly turns the adjustment off. 256 KiB: at 1 MiB, half-MiB activations still fragment the
    heap (one MLP peaked at 279-350 MiB from one try to the next; 271-277 MiB at 256 KiB), and at
    64 KiB every small tensor costs page faults (27 against 21 ms of CPU per step of an MLP depth 20,
    width 256, batch 128; 20.8 at 256 KiB, 19.3 with glibc's default, one try each on a loaded box).
    Idempotent; called by every guard.
    """
    global _pinned
    if _pinned:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is None or os.uname().sysname != "Linux":
            return False
        _pinned = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    except OSError:
        return False
    return _pinned


def guard_for(spec: Spec, max_run_memory_mb: float, eval_samples: int) -> MemoryGuard:
    """The guard of one run: its limit is the operator's per-run cap or 1.5x its estimate, the larger.

    The cap is what the operator allows one run; a spec accepted under a different cap, or whose
    estimate is close to it, still gets room above its estimate.
    """
    estimate = estimate_run_memory_mb(spec, eval_samples)
    return MemoryGuard(max(max_run_memory_mb, LIMIT_OVER_ESTIMATE * estimate), estimate)


class MemoryGuard:
    """Context manager that fails the run in its block once the process grows past `limit_mib`.

    Use around the probe, with `should_stop` wrapped: ::

        with MemoryGuard(limit_mib, estimate_mib) as guard:
            run_probe(spec, should_stop=guard.should_stop(monitor.should_stop), ...)

    Growth is measured from the resident memory when the block starts. Only the thread that entered
    the block is ever interrupted: a guard never raises into the worker's other threads (heartbeat).
    """

    def __init__(self, limit_mib: float, estimate_mib: float, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self.limit_mib = limit_mib
        self.estimate_mib = estimate_mib
        self.poll_interval_s = poll_interval_s
        self.peak_growth_mib = 0.0
        self.exceeded = False
        self._start = 0
        self._owner = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._hook: Any = None

    @property
    def message(self) -> str:
        """The error a run over its limit is failed with."""
        return (
            f"run exceeded its memory limit of {self.limit_mib:,.0f} MiB (estimate {self.estimate_mib:,.0f} MiB): "
            f"it grew the worker's memory by {self.peak_growth_mib:,.0f} MiB; lower depth, width or batch_size"
        )

    def check(self) -> None:
        """Raise MemoryLimitExceeded in the guarded thread once the limit was passed (cheap otherwise)."""
        if self.exceeded and threading.get_ident() == self._owner:
            raise MemoryLimitExceeded(self.message)

    def should_stop(self, inner: Callable[[], bool] | None = None) -> Callable[[], bool]:
        """A `should_stop` for run_probe: raises once over the limit, else asks `inner` (if any)."""

        def poll() -> bool:
            self.check()
            return inner() if inner is not None else False

        return poll

    def _watch(self) -> None:
        limit = self.limit_mib * MIB
        while not self._done.wait(self.poll_interval_s):
            now = private_resident_bytes()
            if now is None:
                return
            growth = now - self._start
            self.peak_growth_mib = max(self.peak_growth_mib, growth / MIB)
            if growth > limit:
                self.exceeded = True
                log.warning("memory guard: %s", self.message)
                return

    def __enter__(self) -> MemoryGuard:
        pin_malloc_mmap_threshold()
        start = private_resident_bytes()
        self._owner = threading.get_ident()
        if start is None:
            log.warning("memory guard: cannot read this process's resident memory; the run is not guarded")
            return self
        self._start = start
        # Imported here: the guard module itself stays importable without torch.
        from torch.nn.modules.module import register_module_forward_pre_hook

        self._hook = register_module_forward_pre_hook(lambda _module, _args: self.check())
        self._thread = threading.Thread(target=self._watch, name="memory-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._hook is not None:
            self._hook.remove()
        # A run that passed its limit fails even if it got to the end (or failed of the memory otherwise),
        # so the error names the limit; an interrupt or exit passes through.
        if self.exceeded and (exc is None or isinstance(exc, Exception)) and not isinstance(exc, MemoryLimitExceeded):
            raise MemoryLimitExceeded(self.message) from exc
