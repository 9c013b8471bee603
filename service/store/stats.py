"""Figures over the whole store for the API's health checks and metrics: plain query functions.

The API process does not see runs start or finish (workers are other processes), so these read them
from the database each time they are asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from graddiag.service.store.tables import FINISHED, Run


@dataclass(frozen=True)
class Durations:
    """Wall times (claim to finish) of the finished runs of one status."""

    count: int
    total_seconds: float
    cumulative: list[int]  # runs that took at most each bound, in the order of the bounds asked for


@dataclass(frozen=True)
class Leases:
    """The leases of the running runs."""

    live: int
    expired: int  # past expiry (or none): the worker stopped heartbeating; the reaper requeues the run
    busy_workers: int  # distinct owners of a live lease
    latest_expiry: float | None  # epoch seconds; None when nothing runs


def check_schema(session: Session) -> None:
    """Read one row of `runs`: raises SQLAlchemyError unless the database answers and is migrated."""
    session.execute(select(Run.id).limit(1)).all()


def counts_by_status_verdict_and_arch(session: Session) -> list[tuple[str, str | None, str, int]]:
    """(status, verdict, arch, number of runs) for every combination present in the store; an uploaded
    report's run, which has no spec and so no arch, counts under its source, `external`."""
    arch = func.coalesce(Run.arch, Run.source)
    query = select(Run.status, Run.verdict, arch, func.count()).group_by(Run.status, Run.verdict, arch)
    return [(status, verdict, arch_, count) for status, verdict, arch_, count in session.execute(query)]


def durations_by_status(session: Session, bounds: Sequence[float]) -> dict[str, Durations]:
    """The finished runs' durations per status, counted against each bound, in one pass."""
    duration = Run.finished_epoch - Run.started_epoch
    bucket_counts = [func.sum(case((duration <= bound, 1), else_=0)) for bound in bounds]
    query = (
        select(Run.status, func.count(), func.sum(duration), *bucket_counts)
        .where(Run.status.in_(FINISHED), Run.started_epoch.is_not(None), Run.finished_epoch.is_not(None))
        .group_by(Run.status)
    )
    return {
        status: Durations(int(count), float(total or 0.0), [int(n or 0) for n in cumulative])
        for status, count, total, *cumulative in session.execute(query)
    }


def lease_stats(session: Session, now: float) -> Leases:
    """Live and expired leases of the running runs at epoch `now`, their owners and the latest expiry."""
    live = Run.lease_expires_epoch > now
    live_count, expired_count, busy, latest_expiry = session.execute(
        select(
            func.sum(case((live, 1), else_=0)),
            func.sum(case((live, 0), else_=1)),  # NULL or past expiry
            func.count(func.distinct(case((live, Run.lease_owner)))),
            func.max(Run.lease_expires_epoch),
        ).where(Run.status == "running")
    ).one()
    return Leases(
        live=int(live_count or 0),
        expired=int(expired_count or 0),
        busy_workers=int(busy or 0),
        latest_expiry=None if latest_expiry is None else float(latest_expiry),
    )
