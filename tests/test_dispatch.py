"""The Ray dispatcher against PostgreSQL and a local Ray head started here on 127.0.0.1 (2 CPUs and one
logical GPU: Ray places by declared resources, so "GPU" runs land on it without a real device).

A sweep through a dispatcher process that is SIGKILLed mid-sweep and restarted (every run succeeds once,
with one set of records), cancellation, GPU placement, lost leases, shutdown, failures, and CIFAR-10
loaded once per node. Tiny synthetic specs; every wait is bounded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update

if importlib.util.find_spec("ray") is None:
    message = "ray is not installed (pip install 'graddiag[dist]')"
    if os.environ.get("CI"):
        raise ImportError(message)  # under CI a missing extra is a broken setup, not a skip
    pytest.skip(message, allow_module_level=True)

import ray

from graddiag.models.spec import Spec, SpecCaps
from graddiag.service.dispatch.control import RunControlActor
from graddiag.service.dispatch.dispatcher import needs_gpu, run_dispatcher
from graddiag.service.dispatch.tasks import NAMESPACE, TaskOptions, execute, holder_name
from graddiag.service.settings import Settings
from graddiag.service.store import db
from graddiag.service.store.runs import cancel_run, load_report
from graddiag.service.store.sweeps import create_sweep, sweep_status
from graddiag.service.store.tables import Run, RunRecord, RunStep
from graddiag.service.worker.queue import Claim, complete
from tests.support import REPO
from tests.support.specs import LONG, TINY
from tests.support.store import sample_report
from tests.support.worker import loop_thread, row, settings_for, status_is, submit, wait_for

CPU_TINY = TINY.model_copy(update={"device": "cpu"})
# About half a second of training: a dispatcher killed a few runs into a sweep of these has runs in flight.
SWEEP_BASE = {"dataset": "synthetic", "device": "cpu", "depth": 3, "width": 32, "steps": 150, "batch_size": 32}
SWEEP_SEEDS = list(range(10))
LONG_CPU = LONG.model_copy(update={"device": "cpu"})

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head on 127.0.0.1, this test process its first driver; yields its address for other drivers."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        # Ray's default token authentication: the token in ~/.ray/auth_token (generated if missing), which
        # the dispatcher processes started here read too.
        ray.init(
            num_cpus=2,
            num_gpus=1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            namespace=NAMESPACE,
        )
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def url(pg_url: str) -> str:
    db.upgrade(pg_url)
    return pg_url


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


def dispatcher_thread(settings: Settings, **kwargs: Any) -> AbstractContextManager[threading.Thread]:
    """run_dispatcher in a thread of this driver, stopped (and checked to have stopped) on exit."""
    return loop_thread(run_dispatcher, settings, 60, **kwargs)


def wait_for_free_resources(timeout: float) -> None:
    """Until every CPU and the GPU of the head are free again: the tasks really ended."""
    wait_for(
        lambda: ray.available_resources().get("CPU", 0) == 2 and ray.available_resources().get("GPU", 0) == 1,
        timeout,
        "the cluster's resources to be free",
    )


def count(engine: Engine, table: Any, run_id: str) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table).where(table.run_id == run_id)).scalar_one()


def start_dispatcher_process(url: str, address: str, tmp_path: Path, log_name: str) -> subprocess.Popen[bytes]:
    log = (tmp_path / log_name).open("wb")
    command = [
        sys.executable, "-m", "graddiag.service.cli", "dispatch", "--db", url, "--ray", address,
        "--lease-seconds", "3", "--poll-seconds", "0.05", "--eval-samples", "50", "--dispatch-max-in-flight", "3",
        "--cache-dir", str(tmp_path / "cache"), "--data-dir", str(tmp_path / "no-cifar-here"),
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


# -- placement ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "cluster_gpus", "expected"),
    [("cuda", 4, True), ("auto", 1, True), ("auto", 0, False), ("cpu", 4, False), ("cuda", 0, True)],
)
def test_a_run_asks_for_a_gpu_when_it_needs_or_may_use_one(device: str, cluster_gpus: float, expected: bool) -> None:
    assert needs_gpu(TINY.model_copy(update={"device": device}), cluster_gpus) is expected


def test_an_auto_run_without_a_gpu_of_its_own_trains_on_the_cpu_and_keeps_its_spec(
    ray_head: str, tmp_path: Path
) -> None:
    # The task body, called in this driver, which Ray gave no GPU: the node's GPUs belong to GPU tasks.
    control: Any = RunControlActor.remote()
    try:
        options = TaskOptions(None, str(tmp_path / "cache"), 50, 60.0, 1)
        outcome = execute(TINY, "run:1", control, options)
    finally:
        ray.kill(control)
    assert TINY.device == "auto" and outcome.status == "succeeded" and outcome.report is not None
    assert outcome.report.spec == TINY and outcome.report.timing.device == "cpu"


# -- against the cluster ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_survives_a_killed_dispatcher_and_each_run_is_recorded_once(
    ray_head: str, url: str, engine: Engine, tmp_path: Path
) -> None:
    with db.make_sessionmaker(engine)() as session:
        sweep = create_sweep(session, SWEEP_BASE, {"seed": SWEEP_SEEDS}, caps=SpecCaps(), max_size=100)
        run_ids = [r.run_id for r in sweep_status(session, sweep.id).runs]

    def counts() -> dict[str, int]:
        with db.make_sessionmaker(engine)() as session:
            return sweep_status(session, sweep.id).counts

    first = start_dispatcher_process(url, ray_head, tmp_path, "first.log")
    try:
        wait_for(lambda: counts()["succeeded"] >= 2 and counts()["running"] >= 1, 90, "a sweep in full swing")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.kill()
    in_flight = {run_id for run_id in run_ids if row(engine, run_id).status == "running"}
    assert in_flight, "the dispatcher was killed with no run in flight"

    second = start_dispatcher_process(url, ray_head, tmp_path, "second.log")
    try:
        wait_for(lambda: counts()["succeeded"] == len(run_ids), 120, "the sweep to finish")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0, (tmp_path / "second.log").read_text()
    finally:
        second.kill()

    with db.make_sessionmaker(engine)() as session:
        assert sweep_status(session, sweep.id).done
    spec = Spec.model_validate({**SWEEP_BASE, "seed": 0})
    layers = spec.depth + 1
    recorded_steps = len([s for s in range(spec.steps) if s % spec.record_every == 0 or s == spec.steps - 1])
    for run_id in run_ids:
        run = row(engine, run_id)
        assert run.status == "succeeded" and run.lease_owner is None and run.error is None
        # One set of records, whichever attempt stored it.
        assert count(engine, RunStep, run_id) == spec.steps
        assert count(engine, RunRecord, run_id) == layers * recorded_steps
        assert run.attempt == (2 if run_id in in_flight else 1), run_id
    assert "SIGTERM: stopping after the runs in flight" in (tmp_path / "second.log").read_text()


def test_cancelling_a_gpu_run_stops_its_task_and_frees_the_gpu(
    ray_head: str, url: str, engine: Engine, tmp_path: Path
) -> None:
    with dispatcher_thread(settings_for(url, tmp_path)):
        run_id = submit(engine, LONG)  # device "auto" on a cluster with a GPU: placed on the GPU
        wait_for(lambda: row(engine, run_id).progress is not None, 60, "progress from the task")
        assert ray.available_resources().get("GPU", 0) == 0  # the task holds the cluster's GPU
        progress = row(engine, run_id).progress
        assert progress is not None and progress["steps"] == LONG.steps and 0 < progress["step"] < LONG.steps

        with db.make_sessionmaker(engine)() as session:
            cancel_run(session, run_id)
        latency = wait_for(status_is(engine, run_id, "cancelled"), 15, "the cancellation")
        assert latency < 4.0  # a heartbeat (1 s) to notice it, a poll (0.5 s) for the task to see it
        wait_for_free_resources(15)
        cancelled = row(engine, run_id)
        assert cancelled.lease_owner is None and cancelled.verdict is None
        assert count(engine, RunRecord, run_id) == 0

        next_run = submit(engine, CPU_TINY)  # the dispatcher goes on
        wait_for(status_is(engine, next_run, "succeeded"), 60, "the next run")


def test_a_dispatcher_that_lost_its_lease_stops_the_task_and_writes_nothing(
    ray_head: str, url: str, engine: Engine, tmp_path: Path
) -> None:
    with dispatcher_thread(settings_for(url, tmp_path)):
        run_id = submit(engine, LONG_CPU)
        wait_for(lambda: row(engine, run_id).progress is not None, 60, "the task to train")
        stalled = row(engine, run_id)
        # What a reaper and another worker do to a dispatcher that stopped heartbeating: a new attempt.
        with engine.begin() as connection:
            connection.execute(update(Run).where(Run.id == run_id).values(lease_owner="other", attempt=Run.attempt + 1))
        wait_for_free_resources(15)  # the dispatcher noticed at its next heartbeat and stopped its task

    other = Claim(run_id=run_id, attempt=stalled.attempt + 1, spec=LONG_CPU, worker_id="other")
    assert row(engine, run_id).status == "running" and count(engine, RunRecord, run_id) == 0
    report = sample_report(LONG_CPU.model_copy(update={"steps": 5, "record_every": 1}))
    assert complete(engine, other, report)
    assert count(engine, RunRecord, run_id) == len(report.records)  # only the new owner's records


def test_stopping_dispatcher_hands_a_long_run_back_to_the_queue(
    ray_head: str, url: str, engine: Engine, tmp_path: Path
) -> None:
    with dispatcher_thread(settings_for(url, tmp_path), grace_seconds=0.5):
        run_id = submit(engine, LONG_CPU)
        wait_for(lambda: row(engine, run_id).progress is not None, 60, "the task to train")
    released = row(engine, run_id)
    assert released.status == "queued" and released.lease_owner is None and released.attempt == 1
    wait_for_free_resources(15)


def test_failures_are_recorded_readably(ray_head: str, url: str, engine: Engine, tmp_path: Path) -> None:
    no_data = submit(engine, CPU_TINY.model_copy(update={"dataset": "cifar10"}))
    timed_out = submit(engine, LONG_CPU)
    with dispatcher_thread(settings_for(url, tmp_path, run_timeout_seconds=1.0)):
        wait_for(status_is(engine, no_data, "failed"), 60, "the run without data")
        wait_for(status_is(engine, timed_out, "failed"), 60, "the run past its limit")
    error = row(engine, no_data).error
    # The data holder's own error, not Ray's wrapper around it.
    assert error is not None and error.startswith("DataUnavailableError: ") and "Traceback" not in error
    assert str(tmp_path / "no-cifar-here") in error
    error = row(engine, timed_out).error
    assert error is not None and error.startswith("ProbeTimeout: ") and "run_timeout_seconds=1" in error


@pytest.mark.slow
def test_cifar10_is_loaded_once_per_node(
    ray_head: str, url: str, engine: Engine, tmp_path: Path, cifar10_dir: Path, cifar10_cache: Path
) -> None:
    settings = settings_for(url, tmp_path, data_dir=cifar10_dir, cache_dir=cifar10_cache)
    spec = CPU_TINY.model_copy(update={"dataset": "cifar10"})
    run_ids = [submit(engine, spec.model_copy(update={"seed": seed})) for seed in range(3)]
    with dispatcher_thread(settings):
        for run_id in run_ids:
            wait_for(status_is(engine, run_id, "succeeded", "failed"), 180, "the CIFAR-10 runs")
    for run_id in run_ids:
        assert row(engine, run_id).status == "succeeded", row(engine, run_id).error
    with db.make_sessionmaker(engine)() as session:
        report = load_report(session, run_ids[0])
    assert report is not None and report.spec == spec.model_copy(update={"seed": 0})

    # One holder on the node, holding one copy that every later task maps.
    options = TaskOptions(str(cifar10_dir), str(cifar10_cache), 50, 3600.0, 1)
    holder = ray.get_actor(holder_name(ray.get_runtime_context().get_node_id(), options), namespace=NAMESPACE)
    first: list[ray.ObjectRef] = ray.get(holder.sets.remote())
    again: list[ray.ObjectRef] = ray.get(holder.sets.remote())
    assert len(first) == 1
    assert first == again
    ray.kill(holder)
