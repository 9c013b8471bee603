"""Server-sent events: a run's progress and verdict, a sweep's counts and finished runs, as they change.

Built on sse-starlette's EventSourceResponse: it formats events, sends a keep-alive comment
(``: ping``) every PING_SECONDS so proxies keep the connection open, stops the generator when the
client disconnects and ends open streams when uvicorn shuts down. The store has no notifications,
so each stream re-reads the database every POLL_SECONDS (in the thread pool, off the event loop)
and sends an event only when what it read differs from what it sent last.

A run's stream: ``progress`` events (status, attempt, progress) and, once the run finished, one
``verdict`` event (status, verdict label, error); then it ends. A sweep's stream: ``progress``
events (counts by status), one ``run`` event per finished run (its grid point, status and verdict)
and a closing ``done`` event. A browser's EventSource reconnects when a stream ends, so clients
close it on the closing event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Final

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from graddiag.service.api.deps import RunIdDep, SessionFactoryDep, SweepIdDep
from graddiag.service.api.errors import documented
from graddiag.service.api.schemas import RunProgress
from graddiag.service.engine.report import Label
from graddiag.service.store import runs as run_store
from graddiag.service.store import sweeps as sweep_store
from graddiag.service.store.runs import RunNotFound
from graddiag.service.store.sweeps import SweepRun
from graddiag.service.store.tables import FINISHED, RunStatus

# Read at each use, so tests can poll faster.
POLL_SECONDS = 1.0
PING_SECONDS = 15.0
# Tells EventSource how long to wait before reconnecting after a dropped (not ended) stream.
RETRY_MS: Final = 3000

router = APIRouter(tags=["events"], responses=documented(404, 409))

_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "A stream of server-sent events."}
}


class RunState(BaseModel):
    """Data of a run's ``progress`` event."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    status: RunStatus
    attempt: int
    cancel_requested: bool
    progress: RunProgress | None = None


class RunOutcome(BaseModel):
    """Data of a run's closing ``verdict`` event; `verdict` is None unless the run succeeded."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    status: RunStatus
    verdict: Label | None = None
    error: str | None = None
    finished_at: datetime | None = None


class SweepCounts(BaseModel):
    """Data of a sweep's ``progress`` and closing ``done`` events."""

    id: str
    total: int
    counts: dict[str, int]
    done: bool


def _event(name: str, model: BaseModel) -> ServerSentEvent:
    return ServerSentEvent(event=name, data=model.model_dump_json(), retry=RETRY_MS)


def _read_run(factory: sessionmaker[Session], run_id: str) -> tuple[RunState, RunOutcome]:
    with factory() as session:
        run = run_store.get_run(session, run_id)
        return RunState.model_validate(run), RunOutcome.model_validate(run)


def _read_sweep(factory: sessionmaker[Session], sweep_id: str) -> tuple[SweepCounts, list[SweepRun]]:
    with factory() as session:
        status = sweep_store.sweep_status(session, sweep_id)
    counts = SweepCounts(id=status.id, total=status.total, counts=status.counts, done=status.done)
    return counts, status.runs


def _gone(kind: str, ident: str) -> ServerSentEvent:
    # Deleted while watched: say so, so the client does not reconnect to a 404 forever.
    return ServerSentEvent(event="gone", data=json.dumps({"id": ident, "detail": f"{kind} {ident} was deleted"}))


async def run_stream(
    factory: sessionmaker[Session], first: tuple[RunState, RunOutcome]
) -> AsyncIterator[ServerSentEvent]:
    """`progress` on every change of the run's state, then its `verdict` once it finished."""
    state, outcome = first
    sent: RunState | None = None
    while True:
        if state != sent:
            yield _event("progress", state)
            sent = state
        if state.status in FINISHED:
            yield _event("verdict", outcome)
            return
        await asyncio.sleep(POLL_SECONDS)
        try:
            state, outcome = await run_in_threadpool(_read_run, factory, state.id)
        except RunNotFound:
            yield _gone("run", state.id)
            return


async def sweep_stream(
    factory: sessionmaker[Session], first: tuple[SweepCounts, list[SweepRun]]
) -> AsyncIterator[ServerSentEvent]:
    """`progress` on every change of the counts, a `run` per newly finished run, `done` at the end."""
    counts, runs = first
    sent: SweepCounts | None = None
    reported: set[str] = set()
    while True:
        if counts != sent:
            yield _event("progress", counts)
            sent = counts
        for run in runs:
            if run.status in FINISHED and run.run_id not in reported:
                reported.add(run.run_id)
                yield _event("run", run)
        if counts.done:
            yield _event("done", counts)
            return
        await asyncio.sleep(POLL_SECONDS)
        counts, runs = await run_in_threadpool(_read_sweep, factory, counts.id)


def _response(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    return EventSourceResponse(events, ping=PING_SECONDS)


@router.get(
    "/v1/runs/{run_id}/events",
    response_class=EventSourceResponse,
    responses=_STREAM,
    summary="Follow a run (server-sent events)",
)
async def run_events(run_id: RunIdDep, factory: SessionFactoryDep) -> EventSourceResponse:
    """`progress` events (status, attempt, progress) on every change and a closing `verdict` event."""
    return _response(run_stream(factory, await run_in_threadpool(_read_run, factory, run_id)))


@router.get(
    "/v1/sweeps/{sweep_id}/events",
    response_class=EventSourceResponse,
    responses=_STREAM,
    summary="Follow a sweep (server-sent events)",
)
async def sweep_events(sweep_id: SweepIdDep, factory: SessionFactoryDep) -> EventSourceResponse:
    """`progress` events (counts by status), a `run` event per finished run and a closing `done` event."""
    return _response(sweep_stream(factory, await run_in_threadpool(_read_sweep, factory, sweep_id)))
