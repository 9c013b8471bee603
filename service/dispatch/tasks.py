"""What runs on the Ray nodes: one probe per task, the node's CIFAR-10 from a holder actor, no database.

A task gets the spec, its run's key and the dispatcher's RunControl actor (control.py), trains with
run_probe and returns an Outcome; the dispatcher writes everything to the database, so Ray nodes hold no
database credentials. While the probe trains, a thread of the task hands its latest progress to the
RunControl and learns from the answer whether to stop (cancelled, lease lost, dispatcher stopping);
run_probe polls that flag every step. CIFAR-10 is decoded once per node by a DatasetHolder actor, which
keeps it in the node's shared object store: every task on the node maps the same arrays instead of
loading its own copy.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from graddiag.models.spec import Spec
from graddiag.service.dispatch.control import ProgressFields
from graddiag.service.engine.data import ImageSet, load_cifar10
from graddiag.service.engine.probe import ProbeCancelled, Progress, run_probe
from graddiag.service.engine.report import Report
from graddiag.service.settings import Settings
from graddiag.service.worker.lifecycle import error_text
from graddiag.service.worker.memory_guard import guard_for

log = logging.getLogger(__name__)

# The Ray namespace of graddiag's named actors (the per-node data holders).
NAMESPACE: Final = "graddiag"
# How often a task reports progress and asks whether to stop: the delay of a cancellation.
CONTROL_POLL_S: Final = 0.5
# A RunControl call slower than this is skipped; the task asks again at the next poll.
CONTROL_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True)
class TaskOptions:
    """The deployment settings a task needs; the rest of Settings (the database URL) stays home."""

    data_dir: str | None
    cache_dir: str
    eval_samples: int
    run_timeout_seconds: float
    torch_threads: int
    # The run's hard memory limit (memory_guard.guard_for); the dispatcher passes its settings' value.
    max_run_memory_mb: float = Settings.model_fields["max_run_memory_mb"].default


@dataclass(frozen=True)
class Outcome:
    """How a task ended: a report, or why not. `stopped`: the dispatcher asked it to stop."""

    status: Literal["succeeded", "failed", "stopped"]
    report: Report | None = None
    error: str = ""


class DatasetHolder:
    """One node's CIFAR-10, decoded once and kept in the node's object store for every task there.

    Not a DatasetCache: that would keep a second copy on this actor's heap. A failed load is not
    remembered, so the node recovers once its data directory is fixed.
    """

    def __init__(self, data_dir: str | None, cache_dir: str) -> None:
        self._data_dir = data_dir
        self._cache_dir = cache_dir
        self._arrays: ray.ObjectRef | None = None

    def sets(self) -> list[ray.ObjectRef]:
        """[reference to (train images, train labels, test images, test labels)], loading them on the first call.

        Wrapped in a list: Ray would resolve a bare reference and copy the arrays into every reply.
        """
        if self._arrays is None:
            train, test = load_cifar10(self._data_dir, self._cache_dir)
            # numpy arrays: tasks on this node map them from shared memory without a copy.
            self._arrays = ray.put(tuple(t.numpy() for t in (train.images, train.labels, test.images, test.labels)))
        return [self._arrays]


# No CPU of its own: it only answers short calls.
DatasetHolderActor = ray.remote(num_cpus=0)(DatasetHolder)


def holder_name(node_id: str, options: TaskOptions) -> str:
    """The node's holder of the data set `options` names (another data directory gets its own)."""
    digest = hashlib.sha256(f"{options.data_dir}\0{options.cache_dir}".encode()).hexdigest()[:12]
    return f"graddiag-data-{node_id}-{digest}"


def _node_sets(options: TaskOptions) -> tuple[ImageSet, ImageSet]:
    node_id = ray.get_runtime_context().get_node_id()
    holder: Any = DatasetHolderActor.options(
        name=holder_name(node_id, options),
        namespace=NAMESPACE,
        get_if_exists=True,
        # Detached: the data stay loaded across dispatcher restarts; the holder lives on this node.
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(options.data_dir, options.cache_dir)
    try:
        (ref,) = ray.get(holder.sets.remote())
    except RayTaskError as exc:
        # The holder's own error (e.g. DataUnavailableError, naming the directory), not Ray's wrapper.
        cause = exc.cause
        raise cause if isinstance(cause, Exception) else exc from None
    arrays: tuple[np.ndarray[Any, Any], ...] = ray.get(ref)
    with warnings.catch_warnings():
        # The shared arrays are read-only; torch warns that it cannot mark tensors so. The probe only
        # indexes and copies the data sets, never writes to them.
        warnings.simplefilter("ignore", UserWarning)
        train_images, train_labels, test_images, test_labels = (torch.from_numpy(a) for a in arrays)
    return ImageSet(train_images, train_labels), ImageSet(test_images, test_labels)


class _ControlLink:
    """The task's side of RunControl: a thread exchanging progress for the stop flag every CONTROL_POLL_S."""

    def __init__(self, control: Any, key: str) -> None:
        self._control = control
        self._key = key
        self._latest: ProgressFields | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"control-{key[:8]}", daemon=True)

    def on_progress(self, progress: Progress) -> None:
        """Probe callback: keep the latest progress for the next exchange."""
        self._latest = ProgressFields(
            step=progress.step, steps=progress.steps, loss=progress.loss, label_so_far=progress.label_so_far
        )

    def should_stop(self) -> bool:
        """Probe callback, polled every step."""
        return self._stop.is_set()

    def _poll(self) -> None:
        while not self._done.wait(CONTROL_POLL_S):
            progress, self._latest = self._latest, None
            try:
                if ray.get(self._control.exchange.remote(self._key, progress), timeout=CONTROL_TIMEOUT_S):
                    self._stop.set()
            except ActorDiedError:
                # The dispatcher is gone, and with it whoever would record the result: its lease expires
                # and the run is claimed again.
                self._stop.set()
            except RayError:
                log.warning("run %s: RunControl unreachable; training on", self._key, exc_info=True)

    def __enter__(self) -> _ControlLink:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()


def execute(spec: Spec, key: str, control: Any, options: TaskOptions) -> Outcome:
    """Train one run on this Ray worker (the body of the probe tasks); never raises for a failed run."""
    started = time.monotonic()
    torch.set_num_threads(options.torch_threads)
    # Ray leaves CUDA_VISIBLE_DEVICES alone for a task without GPUs: "auto" would take one of the node's
    # GPUs that Ray gave to another task. Such a run trains on the CPU; its report keeps the spec as asked.
    cpu_only = spec.device == "auto" and not ray.get_gpu_ids()
    placed = spec.model_copy(update={"device": "cpu"}) if cpu_only else spec
    try:
        with _ControlLink(control, key) as link:
            data = _node_sets(options) if spec.dataset == "cifar10" else None
            # Ray reuses this process for the node's next runs: a run over its memory limit fails alone.
            with guard_for(spec, options.max_run_memory_mb, options.eval_samples) as guard:
                report = run_probe(
                    placed,
                    data=data,
                    eval_samples=options.eval_samples,
                    on_progress=link.on_progress,
                    progress_interval=CONTROL_POLL_S,
                    should_stop=guard.should_stop(link.should_stop),
                    deadline=started + options.run_timeout_seconds,
                )
    except ProbeCancelled:
        return Outcome("stopped")
    except Exception as exc:
        log.exception("run %s failed", key)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an out-of-memory error, the next run starts from a clean pool
        return Outcome("failed", error=error_text(exc, options.run_timeout_seconds))
    return Outcome("succeeded", report=report.model_copy(update={"spec": spec}))


# CPU runs reuse Ray's worker processes: torch is imported once per process, not once per run.
probe_on_cpu = ray.remote(execute)
# A GPU run gets a fresh worker process (max_calls=1, Ray's default for GPU tasks): CUDA reads
# CUDA_VISIBLE_DEVICES once per process, so a reused process would keep the GPU of its first run, and
# exiting frees the run's GPU memory for the next task. The data set still comes from the node's holder.
probe_on_gpu = ray.remote(num_gpus=1, max_calls=1)(execute)
