"""The run lifecycle on its own, with a scripted executor in place of the worker's threads or Ray's tasks.

Whatever executes a run, the lifecycle records how it ended the same way: a report → succeeded; an
error → failed with it; stopped after a cancellation → cancelled; stopped for a shutdown, or by itself →
back in the queue; a lost lease → nothing written. The worker and dispatcher tests run the same paths
with real executors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from graddiag.service.settings import Settings
from graddiag.service.store import db
from graddiag.service.store.runs import cancel_run
from graddiag.service.worker.lifecycle import Ending, process_queue
from graddiag.service.worker.queue import Claim
from tests.support.specs import TINY
from tests.support.store import migrated_url, sample_report
from tests.support.worker import row, settings_for, submit

# What the scripted executor does with the run of each seed.
SUCCEEDS, FAILS, STOPS_BY_ITSELF, REFUSED, CANCELLED_WHILE_RUNNING, LOSES_ITS_LEASE, RUNS_ON = range(7)


class ScriptedExecutor:
    """Ends each run as its seed says; the runs it keeps going end (stopped) once the lifecycle stops them."""

    role = "test executor"

    def __init__(self, engine: Engine, capacity: int) -> None:
        self._engine = engine
        self._capacity = capacity
        self.running: dict[str, Claim] = {}
        self.ended: list[tuple[Claim, Ending]] = []
        self.stopped: list[str] = []

    def capacity(self) -> int:
        return self._capacity

    def start(self, claim: Claim) -> Ending | None:
        seed = claim.spec.seed
        if seed == REFUSED:
            return Ending(error="Refused: no such device")
        if seed == CANCELLED_WHILE_RUNNING:
            with db.make_sessionmaker(self._engine)() as session:
                cancel_run(session, claim.run_id)  # a user cancels while it trains
        if seed == LOSES_ITS_LEASE:
            with self._engine.begin() as connection:  # what a reaper and another worker would do
                connection.exec_driver_sql("UPDATE runs SET lease_owner = 'other' WHERE id = ?", (claim.run_id,))
        if seed in (CANCELLED_WHILE_RUNNING, LOSES_ITS_LEASE, RUNS_ON):
            self.running[claim.run_id] = claim
        elif seed == SUCCEEDS:
            self.ended.append((claim, Ending(report=sample_report(claim.spec))))
        elif seed == FAILS:
            self.ended.append((claim, Ending(error="Boom: the probe raised\nmore lines")))
        else:
            self.ended.append((claim, Ending()))
        return None

    def progress(self) -> dict[str, dict[str, object]]:
        return {}

    def stop(self, claims: list[Claim]) -> None:
        for claim in claims:
            if self.running.pop(claim.run_id, None) is not None:
                self.stopped.append(claim.run_id)
                self.ended.append((claim, Ending()))

    def wait(self, timeout: float) -> list[tuple[Claim, Ending]]:
        ended, self.ended = self.ended, []
        return ended


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_for(migrated_url(tmp_path), tmp_path)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = db.make_engine(settings.db_url)
    yield engine
    engine.dispose()


def test_each_ending_is_recorded_once_whatever_the_executor(settings: Settings, engine: Engine) -> None:
    seeds = [SUCCEEDS, FAILS, STOPS_BY_ITSELF, REFUSED, CANCELLED_WHILE_RUNNING, LOSES_ITS_LEASE]
    ids = {seed: submit(engine, TINY.model_copy(update={"seed": seed})) for seed in seeds}
    executor = ScriptedExecutor(engine, capacity=len(seeds))

    claimed = process_queue(engine, executor, settings, owner="w1", stop=threading.Event(), max_runs=len(seeds))

    assert claimed == len(seeds) and not executor.running
    runs = {seed: row(engine, run_id) for seed, run_id in ids.items()}
    assert runs[SUCCEEDS].status == "succeeded" and runs[SUCCEEDS].verdict == "healthy"
    assert runs[FAILS].status == "failed" and runs[FAILS].error == "Boom: the probe raised\nmore lines"
    assert runs[REFUSED].status == "failed" and runs[REFUSED].error == "Refused: no such device"
    # Stopped unasked (a Ray task that lost its RunControl): requeued, the attempt stays counted.
    assert runs[STOPS_BY_ITSELF].status == "queued" and runs[STOPS_BY_ITSELF].attempt == 1
    # Stopped at the heartbeat that saw the cancellation, or the lost lease.
    assert executor.stopped == [ids[CANCELLED_WHILE_RUNNING], ids[LOSES_ITS_LEASE]]
    assert runs[CANCELLED_WHILE_RUNNING].status == "cancelled"
    lost = runs[LOSES_ITS_LEASE]
    assert lost.status == "running" and lost.lease_owner == "other"  # the new owner's run: untouched
    assert all(run.lease_owner is None for seed, run in runs.items() if seed != LOSES_ITS_LEASE)


def test_a_stopping_process_hands_its_runs_back_after_the_grace_period(settings: Settings, engine: Engine) -> None:
    run_id = submit(engine, TINY.model_copy(update={"seed": RUNS_ON}))
    executor = ScriptedExecutor(engine, capacity=1)
    stop = threading.Event()
    real_start = executor.start

    def start_then_stop(claim: Claim) -> Ending | None:
        stop.set()  # SIGTERM arrives while the run trains
        return real_start(claim)

    executor.start = start_then_stop  # type: ignore[method-assign]
    process_queue(engine, executor, settings, owner="w1", stop=stop, grace_seconds=0.2)

    assert executor.stopped == [run_id]
    released = row(engine, run_id)
    assert released.status == "queued" and released.lease_owner is None and released.attempt == 1
