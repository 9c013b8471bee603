"""The worker end to end with the real probe on tiny synthetic specs: results, failures, cancellation,
timeouts, shutdown and lost leases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from graddiag.service.engine.probe import run_probe
from graddiag.service.settings import Settings
from graddiag.service.store import db
from graddiag.service.store.runs import cancel_run, delete_run, load_report
from graddiag.service.worker.queue import claim_next, complete
from graddiag.service.worker.worker import run_worker
from tests.support import REPO
from tests.support.specs import LONG, TINY
from tests.support.store import migrated_url
from tests.support.worker import background_worker, row, settings_for, status_is, submit, wait_for

EXPLODING = TINY.model_copy(
    update={"steps": 8, "activation": "identity", "init": "normal", "init_std": 10.0, "lr": 1000.0}
)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return migrated_url(tmp_path)


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


def test_real_report_round_trips_through_the_store(engine: Engine) -> None:
    for spec in (TINY, EXPLODING):
        report = run_probe(spec, eval_samples=50)
        run_id = submit(engine, spec)
        claim = claim_next(engine, "w", 30)
        assert claim is not None and claim.run_id == run_id
        assert complete(engine, claim, report)
        with db.make_sessionmaker(engine)() as session:
            loaded = load_report(session, run_id)
        assert loaded is not None
        assert loaded.model_dump() == report.model_dump()
    # The exploding run's non-finite figures are None in the report and came back as None.
    assert report.verdict.label == "exploding"
    assert any(value is None for record in report.records for value in record.model_dump().values())


def test_worker_succeeds_fails_readably_and_goes_on(url: str, engine: Engine, tmp_path: Path) -> None:
    first = submit(engine, TINY)
    no_data = submit(engine, TINY.model_copy(update={"dataset": "cifar10"}))
    last = submit(engine, TINY.model_copy(update={"seed": 1, "depth": 2}))

    run_worker(settings_for(url, tmp_path), max_runs=3)

    for run_id, depth in ((first, 3), (last, 2)):
        done = row(engine, run_id)
        assert done.status == "succeeded" and done.verdict in ("healthy", "vanishing", "exploding")
        assert done.lease_owner is None and done.finished_at is not None and done.error is None
        with db.make_sessionmaker(engine)() as session:
            report = load_report(session, run_id)
        assert report is not None
        assert [layer.kind for layer in report.layers] == ["linear"] * (depth + 1)
        assert [s.step for s in report.steps] == list(range(5))
        assert len(report.records) == 5 * (depth + 1)  # record_every=1
        assert report.verdict.label == done.verdict

    failed = row(engine, no_data)
    assert failed.status == "failed" and failed.verdict is None
    assert failed.error is not None and failed.error.startswith("DataUnavailableError: ")
    assert "Traceback" not in failed.error and str(tmp_path / "no-cifar-here") in failed.error


def test_warm_worker_picks_up_a_run_queued_while_idle(url: str, engine: Engine, tmp_path: Path) -> None:
    # The pickup latency itself (target 0.5 s) is measured by `make bench` (bench/service.py).
    settings = settings_for(url, tmp_path, poll_seconds=Settings().poll_seconds)
    with background_worker(settings):
        warm_up = submit(engine, TINY)
        wait_for(status_is(engine, warm_up, "succeeded"), 60, "the first run")
        time.sleep(0.5)  # idle, polling
        run_id = submit(engine, TINY.model_copy(update={"seed": 3}))
        wait_for(status_is(engine, run_id, "succeeded"), 30, "the second run")
    started = row(engine, run_id)
    assert started.started_epoch is not None and started.started_epoch >= started.created_epoch


def test_cancel_a_running_run_reports_progress_then_stops(url: str, engine: Engine, tmp_path: Path) -> None:
    with background_worker(settings_for(url, tmp_path)):
        run_id = submit(engine, LONG)
        wait_for(lambda: row(engine, run_id).progress is not None, 30, "progress")
        progress = row(engine, run_id).progress
        assert progress is not None and progress["steps"] == 5000 and 0 < progress["step"] < 5000
        assert isinstance(progress["loss"], float) and progress["updated_at"]

        with db.make_sessionmaker(engine)() as session:
            cancel_run(session, run_id)
        latency = wait_for(status_is(engine, run_id, "cancelled"), 10, "the cancellation")
        assert latency < 3.0
        cancelled = row(engine, run_id)
        assert cancelled.lease_owner is None and cancelled.finished_at is not None

        next_run = submit(engine, TINY)  # the worker goes on
        wait_for(status_is(engine, next_run, "succeeded"), 30, "the next run")


def test_run_past_its_time_limit_fails(url: str, engine: Engine, tmp_path: Path) -> None:
    run_id = submit(engine, LONG)
    run_worker(settings_for(url, tmp_path, run_timeout_seconds=1.0), max_runs=1)
    failed = row(engine, run_id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.startswith("ProbeTimeout: wall-clock limit reached at step ")
    assert "run_timeout_seconds=1" in failed.error


def test_stopping_worker_hands_a_long_run_back_to_the_queue(url: str, engine: Engine, tmp_path: Path) -> None:
    with background_worker(settings_for(url, tmp_path), grace_seconds=0.5) as thread:
        run_id = submit(engine, LONG)
        wait_for(status_is(engine, run_id, "running"), 30, "the claim")
    assert not thread.is_alive()
    released = row(engine, run_id)
    assert released.status == "queued" and released.lease_owner is None and released.attempt == 1


def test_stopping_worker_finishes_a_run_that_ends_within_the_grace_period(
    url: str, engine: Engine, tmp_path: Path
) -> None:
    run_id = submit(engine, LONG.model_copy(update={"steps": 600}))  # a second or more
    with background_worker(settings_for(url, tmp_path), grace_seconds=120):
        wait_for(status_is(engine, run_id, "running"), 30, "the claim")
    assert row(engine, run_id).status == "succeeded"


def test_deleted_run_stops_its_worker_which_goes_on(url: str, engine: Engine, tmp_path: Path) -> None:
    with background_worker(settings_for(url, tmp_path)):
        doomed = submit(engine, LONG)
        wait_for(status_is(engine, doomed, "running"), 30, "the claim")
        with db.make_sessionmaker(engine)() as session:
            delete_run(session, doomed)
        next_run = submit(engine, TINY)
        wait_for(status_is(engine, next_run, "succeeded"), 15, "the next run")


@pytest.mark.slow
def test_worker_process_stops_cleanly_on_sigterm(url: str, engine: Engine, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "GRADDIAG_DB_URL": url,
        "GRADDIAG_CACHE_DIR": str(tmp_path / "cache"),
        "GRADDIAG_POLL_SECONDS": "0.05",
        "GRADDIAG_TORCH_THREADS": "1",
    }
    code = (
        "from graddiag.service.settings import Settings; from graddiag.service.worker.worker import worker_main; "
        "worker_main(Settings())"
    )
    run_id = submit(engine, LONG.model_copy(update={"steps": 300}))
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(status_is(engine, run_id, "running"), 60, "the claim")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "SIGTERM: stopping after the current run" in stderr
    # Finished within the grace period, or handed back to the queue: never left running.
    stopped = row(engine, run_id)
    assert stopped.status in ("succeeded", "queued") and stopped.lease_owner is None
