"""The run queue: atomic claims, leases kept alive by heartbeats, fenced results, and the reaper.

A claim sets status running, bumps `attempt` and writes a lease (owner, expiry). Every later write of
the worker is conditional on (lease_owner, attempt, status running) still matching: a worker that lost
its lease (it stalled, the reaper requeued the run and another worker claimed it) writes nothing, so a
run retried elsewhere ends with exactly one set of records. Each function is one short transaction;
none is held open while training. A transaction that fails (database locked, disk full) writes nothing,
so :func:`retry_transient` may simply run the function again.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from sqlalchemy import ColumnElement, Connection, Engine, Update, and_, select, update
from sqlalchemy.exc import SQLAlchemyError

from graddiag.models.spec import Spec
from graddiag.service.engine.report import Report
from graddiag.service.store.db import is_transient
from graddiag.service.store.runs import insert_report_rows, report_columns, report_rows
from graddiag.service.store.tables import Run, stamp

log = logging.getLogger(__name__)

# Error text is for people (the API shows it); the traceback goes to the worker's log.
MAX_ERROR_CHARS = 2000
# Back-off after a failed database call: doubling from the first delay up to the cap, with jitter so
# workers that failed together do not retry together.
RETRY_FIRST_DELAY_S: Final = 0.2
RETRY_MAX_DELAY_S: Final = 10.0

T = TypeVar("T")


class Backoff:
    """Exponential back-off delays with jitter (each in [d/2, d] for d = first x 2^failures, capped)."""

    def __init__(self, first: float = RETRY_FIRST_DELAY_S, cap: float = RETRY_MAX_DELAY_S) -> None:
        self._first = first
        self._cap = cap
        self._failures = 0

    def next(self) -> float:
        """The delay before the next try; each call doubles the one after."""
        delay = min(self._cap, self._first * 2.0 ** min(self._failures, 30))
        self._failures += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        """A call succeeded: the next failure starts again from the first delay."""
        self._failures = 0


def retry_transient(action: Callable[[], T], *, what: str, stop: threading.Event) -> T | None:
    """`action()`, retried with back-off while it fails with a transient database error.

    Transient: locked past the busy timeout, disk full or failing, connection lost (store.db.is_transient);
    any other error is raised at once. Returns None without having succeeded once `stop` is set (a
    stopping worker leaves its run to the lease: it expires and the run is retried).
    """
    backoff = Backoff()
    while True:
        try:
            return action()
        except SQLAlchemyError as exc:
            if not is_transient(exc):
                raise
            delay = backoff.next()
            log.warning("%s: database unavailable (%s); retrying in %.1f s", what, getattr(exc, "orig", exc), delay)
        if stop.wait(delay):
            return None


@dataclass(frozen=True)
class Claim:
    """A run this worker holds: the attempt number fences every write it makes."""

    run_id: str
    attempt: int
    spec: Spec
    worker_id: str


@dataclass(frozen=True)
class HeartbeatResult:
    """owned: the lease was renewed (False: the run was reaped, deleted or finished elsewhere)."""

    owned: bool
    cancel_requested: bool


def _owned(claim: Claim) -> ColumnElement[bool]:
    return and_(
        Run.id == claim.run_id,
        Run.lease_owner == claim.worker_id,
        Run.attempt == claim.attempt,
        Run.status == "running",
    )


def _released() -> dict[str, Any]:
    return {"lease_owner": None, "lease_expires_epoch": None}


def _claim_statement(worker_id: str, lease_seconds: float) -> Update:
    oldest = (
        select(Run.id)
        .where(Run.status == "queued")
        .order_by(Run.created_epoch, Run.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(Run)
        .where(Run.id == oldest, Run.status == "queued")
        .values(
            status="running",
            attempt=Run.attempt + 1,
            lease_owner=worker_id,
            lease_expires_epoch=time.time() + lease_seconds,
            progress=None,
            **stamp("started"),
        )
        .returning(Run.id, Run.attempt, Run.spec)
    )


def claim_next(engine: Engine, worker_id: str, lease_seconds: float) -> Claim | None:
    """Claim the oldest queued run for `worker_id`, or None when the queue is empty.

    One UPDATE … WHERE id = (oldest queued) … RETURNING. On SQLite the transaction's BEGIN IMMEDIATE
    makes it atomic across processes; on PostgreSQL the subquery's FOR UPDATE SKIP LOCKED lets
    concurrent workers claim different runs without waiting (SQLite compiles it away).
    """
    with engine.begin() as connection:
        row = connection.execute(_claim_statement(worker_id, lease_seconds)).first()
    if row is None:
        return None
    return Claim(run_id=row.id, attempt=row.attempt, spec=Spec.model_validate(row.spec), worker_id=worker_id)


def progress_record(step: int, steps: int, loss: float | None, label_so_far: str | None) -> dict[str, Any]:
    """The `progress` JSON of a running run (a non-finite loss becomes null: JSON has no NaN)."""
    return {
        "step": step,
        "steps": steps,
        "loss": loss if loss is not None and math.isfinite(loss) else None,
        "label_so_far": label_so_far,
        "updated_at": datetime.now(UTC).isoformat(),
    }


def heartbeat(
    engine: Engine, claim: Claim, lease_seconds: float, progress: dict[str, Any] | None = None
) -> HeartbeatResult:
    """Extend the lease (and store `progress` when given) if this worker still owns this attempt."""
    values: dict[str, Any] = {"lease_expires_epoch": time.time() + lease_seconds}
    if progress is not None:
        values["progress"] = progress
    with engine.begin() as connection:
        row = connection.execute(
            update(Run).where(_owned(claim)).values(**values).returning(Run.cancel_requested)
        ).first()
    if row is None:
        return HeartbeatResult(owned=False, cancel_requested=False)
    return HeartbeatResult(owned=True, cancel_requested=bool(row.cancel_requested))


def _finish(connection: Connection, claim: Claim, values: dict[str, Any]) -> bool:
    row = connection.execute(
        update(Run).where(_owned(claim)).values(**values, **_released(), **stamp("finished")).returning(Run.id)
    ).first()
    return row is not None


def complete(engine: Engine, claim: Claim, report: Report) -> bool:
    """Store the report and mark the run succeeded in one transaction, only if still owned.

    Returns False, having written nothing, when the worker lost the run.
    """
    columns, rows = report_columns(report), report_rows(claim.run_id, report)
    with engine.begin() as connection:
        if not _finish(connection, claim, {"status": "succeeded", "error": None, **columns}):
            return False
        insert_report_rows(connection, rows)
    return True


def fail(engine: Engine, claim: Claim, error: str) -> bool:
    """Mark the run failed with a readable `error`, if still owned."""
    if len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 1] + "…"
    with engine.begin() as connection:
        return _finish(connection, claim, {"status": "failed", "error": error})


def mark_cancelled(engine: Engine, claim: Claim) -> bool:
    """Mark the run cancelled (its cancellation was requested), if still owned."""
    with engine.begin() as connection:
        return _finish(connection, claim, {"status": "cancelled"})


def run_exists(engine: Engine, run_id: str) -> bool:
    """Whether the run is still in the store (a run deleted while it trained is not)."""
    with engine.connect() as connection:
        return connection.scalar(select(Run.id).where(Run.id == run_id)) is not None


def release(engine: Engine, claim: Claim) -> bool:
    """Put the run back in the queue (the worker is shutting down), if still owned.

    The attempt stays counted: `attempt` only ever grows, as it fences results.
    """
    with engine.begin() as connection:
        row = connection.execute(
            update(Run).where(_owned(claim)).values(status="queued", progress=None, **_released()).returning(Run.id)
        ).first()
    return row is not None


def reap_expired(engine: Engine, max_attempts: int) -> int:
    """Deal with running runs whose lease expired (their worker died or stalled); returns how many.

    Cancellation requested → cancelled; attempts left → back in the queue (the next claim is the next
    attempt); otherwise → failed with the reason.
    """
    now = time.time()
    expired = (
        select(Run.id, Run.attempt, Run.lease_owner, Run.cancel_requested)
        .where(Run.status == "running", Run.lease_expires_epoch < now)
        .with_for_update(skip_locked=True)
    )
    with engine.begin() as connection:
        rows = connection.execute(expired).all()
        # The rows stay as selected until commit: SQLite's write lock is held since BEGIN IMMEDIATE, and
        # PostgreSQL's FOR UPDATE locks them (SKIP LOCKED leaves rows another reaper holds to it).
        for row in rows:
            if row.cancel_requested:
                values: dict[str, Any] = {"status": "cancelled", **stamp("finished")}
            elif row.attempt >= max_attempts:
                reason = (
                    f"WorkerLost: the lease of attempt {row.attempt} of {max_attempts} expired "
                    f"(worker {row.lease_owner} stopped heartbeating); giving up"
                )
                values = {"status": "failed", "error": reason, **stamp("finished")}
            else:
                values = {"status": "queued", "progress": None}
            connection.execute(update(Run).where(Run.id == row.id).values(**values, **_released()))
            log.warning(
                "run %s: lease of attempt %d (worker %s) expired → %s",
                row.id,
                row.attempt,
                row.lease_owner,
                values["status"],
            )
    return len(rows)
