"""The queue: atomic claims (threads and processes), heartbeats, leases, the reaper, fenced results; each
test on SQLite and on PostgreSQL (`db_url`, tests/pg.py)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from graddiag.service.store import db
from graddiag.service.store.runs import cancel_run, create_run, get_run, load_report
from graddiag.service.store.tables import Run, RunRecord
from graddiag.service.worker.queue import (
    Claim,
    _claim_statement,
    claim_next,
    complete,
    fail,
    heartbeat,
    mark_cancelled,
    progress_record,
    reap_expired,
    release,
)
from tests.support.specs import TINY
from tests.support.store import sample_report


@pytest.fixture
def url(db_url: str) -> str:
    db.upgrade(db_url)
    return db_url


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


def queue_runs(engine: Engine, count: int) -> list[str]:
    with db.make_sessionmaker(engine)() as session:
        return [create_run(session, TINY.model_copy(update={"seed": i}))[0].id for i in range(count)]


def run_row(engine: Engine, run_id: str) -> Run:
    with db.make_sessionmaker(engine)() as session:
        return get_run(session, run_id)


def expire_lease(engine: Engine, run_id: str) -> None:
    with engine.begin() as connection:
        connection.execute(update(Run).where(Run.id == run_id).values(lease_expires_epoch=time.time() - 1))


def records_of(engine: Engine, run_id: str) -> int:
    with engine.connect() as connection:
        query = select(func.count()).select_from(RunRecord).where(RunRecord.run_id == run_id)
        return connection.execute(query).scalar_one()


def test_claims_oldest_first_and_sets_the_lease(engine: Engine) -> None:
    first, second = queue_runs(engine, 2)
    before = time.time()
    claim = claim_next(engine, "w1", lease_seconds=30)
    assert claim is not None
    assert (claim.run_id, claim.attempt, claim.worker_id, claim.spec) == (first, 1, "w1", TINY)
    row = run_row(engine, first)
    assert row.status == "running" and row.lease_owner == "w1" and row.attempt == 1
    assert row.lease_expires_epoch == pytest.approx(before + 30, abs=2)
    assert row.started_at is not None and row.started_epoch is not None
    assert claim_next(engine, "w2", 30).run_id == second  # type: ignore[union-attr]
    assert claim_next(engine, "w3", 30) is None


def test_claim_uses_skip_locked_on_postgresql_only() -> None:
    statement = _claim_statement("w", 30)
    assert "FOR UPDATE SKIP LOCKED" in str(statement.compile(dialect=postgresql.dialect()))
    compiled = str(statement.compile(dialect=sqlite.dialect()))
    assert "FOR UPDATE" not in compiled and "RETURNING" in compiled


def test_postgresql_claim_skips_a_run_another_transaction_holds(pg_url: str) -> None:
    db.upgrade(pg_url)
    engine = db.make_engine(pg_url)
    try:
        first, second = queue_runs(engine, 2)
        claims: list[Claim | None] = []
        with engine.connect() as holder:
            # Another claimer's transaction, between its SELECT … FOR UPDATE and its commit.
            holder.execute(select(Run.id).where(Run.id == first).with_for_update())
            claimer = threading.Thread(target=lambda: claims.append(claim_next(engine, "w2", 30)))
            claimer.start()
            claimer.join(timeout=5)
            blocked = claimer.is_alive()
            holder.rollback()  # releases the row lock: a blocked claimer goes on, and the thread ends
        claimer.join(timeout=5)
        assert not blocked, "the claim waited for the row lock instead of skipping the locked run"
        assert [c.run_id if c else None for c in claims] == [second]
        again = claim_next(engine, "w3", 30)
        assert again is not None and again.run_id == first  # the lock is gone: the older run is claimable
    finally:
        engine.dispose()


def test_concurrent_threads_claim_each_run_once(engine: Engine) -> None:
    queued = set(queue_runs(engine, 60))
    claimed: list[str] = []
    barrier = threading.Barrier(6)

    def drain(worker_id: str) -> None:
        barrier.wait()
        while (claim := claim_next(engine, worker_id, 30)) is not None:
            claimed.append(claim.run_id)

    threads = [threading.Thread(target=drain, args=(f"t{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(queued)  # every run once, none twice


def _drain_in_process(url: str, worker_id: str, barrier: Any, results: Any) -> None:
    engine = db.make_engine(url)
    with engine.connect():
        pass  # connected (WAL set up) before the race starts
    claimed = []
    barrier.wait()
    while (claim := claim_next(engine, worker_id, 30)) is not None:
        claimed.append(claim.run_id)
        # A real worker trains between claims; without a pause SQLite's busy handler, which sleeps
        # between retries, lets one process take every run (correct, but then nothing competes).
        time.sleep(0.005)
    results.put(claimed)
    engine.dispose()


@pytest.mark.slow
def test_concurrent_processes_claim_each_run_once(url: str, engine: Engine) -> None:
    queued = set(queue_runs(engine, 80))
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_drain_in_process, args=(url, f"p{i}", barrier, results)) for i in range(4)]
    for process in processes:
        process.start()
    per_process = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    claimed = [run_id for ids in per_process for run_id in ids]
    assert sorted(claimed) == sorted(queued)
    assert sum(1 for ids in per_process if ids) >= 2  # they really competed


def test_heartbeat_extends_the_lease_stores_progress_and_reports_cancellation(engine: Engine) -> None:
    (run_id,) = queue_runs(engine, 1)
    claim = claim_next(engine, "w1", lease_seconds=5)
    assert claim is not None
    first_expiry = run_row(engine, run_id).lease_expires_epoch
    assert first_expiry is not None

    beat = heartbeat(engine, claim, 60, progress_record(3, 5, float("nan"), "healthy"))
    assert beat.owned and not beat.cancel_requested
    row = run_row(engine, run_id)
    assert row.lease_expires_epoch is not None and row.lease_expires_epoch > first_expiry + 50
    assert row.progress is not None
    assert {k: row.progress[k] for k in ("step", "steps", "loss", "label_so_far")} == {
        "step": 3,
        "steps": 5,
        "loss": None,  # NaN has no JSON form
        "label_so_far": "healthy",
    }
    assert heartbeat(engine, claim, 60).owned  # no progress: the stored one stays
    assert run_row(engine, run_id).progress == row.progress

    with db.make_sessionmaker(engine)() as session:
        cancel_run(session, run_id)
    assert heartbeat(engine, claim, 60).cancel_requested
    assert mark_cancelled(engine, claim)
    row = run_row(engine, run_id)
    assert row.status == "cancelled" and row.lease_owner is None and row.finished_at is not None
    assert not heartbeat(engine, claim, 60).owned


def test_expired_lease_is_requeued_and_the_stale_owner_writes_nothing(engine: Engine) -> None:
    (run_id,) = queue_runs(engine, 1)
    stale = claim_next(engine, "dead-worker", 30)
    assert stale is not None
    assert reap_expired(engine, max_attempts=3) == 0  # lease still valid

    expire_lease(engine, run_id)
    assert reap_expired(engine, max_attempts=3) == 1
    row = run_row(engine, run_id)
    assert row.status == "queued" and row.lease_owner is None and row.lease_expires_epoch is None

    fresh = claim_next(engine, "live-worker", 30)
    assert fresh is not None and fresh.run_id == run_id and fresh.attempt == 2

    # The first worker comes back to life: every write of its stale attempt is refused.
    assert not heartbeat(engine, stale, 30).owned
    assert not complete(engine, stale, sample_report(TINY, label="exploding"))
    assert not fail(engine, stale, "RuntimeError: late")
    assert not mark_cancelled(engine, stale)
    assert not release(engine, stale)
    assert records_of(engine, run_id) == 0
    assert run_row(engine, run_id).status == "running"

    report = sample_report(TINY, label="vanishing")
    assert complete(engine, fresh, report)
    assert not complete(engine, fresh, report)  # finished: a second complete writes nothing
    assert records_of(engine, run_id) == len(report.records)
    row = run_row(engine, run_id)
    assert row.status == "succeeded" and row.verdict == "vanishing" and row.lease_owner is None
    with db.make_sessionmaker(engine)() as session:
        loaded = load_report(session, run_id)
    assert loaded is not None and loaded.model_dump() == report.model_dump()


def test_same_worker_id_with_an_old_attempt_is_refused(engine: Engine) -> None:
    (run_id,) = queue_runs(engine, 1)
    old = claim_next(engine, "w", 30)
    assert old is not None
    expire_lease(engine, run_id)
    reap_expired(engine, 3)
    new = claim_next(engine, "w", 30)
    assert new is not None and new.attempt == 2
    assert not complete(engine, Claim(run_id, 1, TINY, "w"), sample_report(TINY))
    assert complete(engine, new, sample_report(TINY))


def test_max_attempts_fails_the_run_with_the_reason(engine: Engine) -> None:
    (run_id,) = queue_runs(engine, 1)
    for attempt in (1, 2):
        claim = claim_next(engine, f"w{attempt}", 30)
        assert claim is not None and claim.attempt == attempt
        expire_lease(engine, run_id)
        assert reap_expired(engine, max_attempts=2) == 1
    row = run_row(engine, run_id)
    assert row.status == "failed" and row.finished_at is not None and row.lease_owner is None
    assert row.error is not None and row.error.startswith("WorkerLost:")
    assert "attempt 2 of 2" in row.error and "w2" in row.error
    assert claim_next(engine, "w3", 30) is None


def test_expired_lease_of_a_cancel_requested_run_is_cancelled(engine: Engine) -> None:
    (run_id,) = queue_runs(engine, 1)
    assert claim_next(engine, "w", 30) is not None
    with db.make_sessionmaker(engine)() as session:
        cancel_run(session, run_id)
    expire_lease(engine, run_id)
    assert reap_expired(engine, max_attempts=3) == 1
    assert run_row(engine, run_id).status == "cancelled"


def test_fail_stores_the_error_and_release_requeues(engine: Engine) -> None:
    failed_id, released_id = queue_runs(engine, 2)
    failing = claim_next(engine, "w", 30)
    assert failing is not None and failing.run_id == failed_id
    assert fail(engine, failing, "DataUnavailableError: " + "x" * 5000)
    row = run_row(engine, failed_id)
    assert row.status == "failed" and row.error is not None and len(row.error) == 2000
    assert row.error.startswith("DataUnavailableError: xxx") and row.verdict is None

    releasing = claim_next(engine, "w", 30)
    assert releasing is not None and releasing.run_id == released_id
    assert release(engine, releasing)
    row = run_row(engine, released_id)
    assert row.status == "queued" and row.lease_owner is None and row.lease_expires_epoch is None
    again = claim_next(engine, "other", 30)
    assert again is not None and again.run_id == released_id and again.attempt == 2
