"""FastAPI dependencies: the settings and database sessions the lifespan put on ``app.state``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session, sessionmaker

from graddiag.service.settings import Settings
from graddiag.service.store.ids import MIN_PREFIX, resolve_run_id, resolve_sweep_id


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


# Requests that must not change anything get read-only sessions: on SQLite they read a snapshot while
# another process holds the write lock, so the dashboard and GET calls keep answering during a long write.
_READ_METHODS = frozenset({"GET", "HEAD"})


def get_session_factory(request: Request) -> sessionmaker[Session]:
    """The sessionmaker for this request (read-only for GET and HEAD), for async routes that open short
    sessions in the thread pool."""
    name = "read_sessionmaker" if request.method in _READ_METHODS else "sessionmaker"
    factory: sessionmaker[Session] = getattr(request.app.state, name)
    return factory


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, closed when the request ends (sync routes run in the thread pool)."""
    with get_session_factory(request)() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]


_ID_HELP = f"The id, or any unique prefix of it of at least {MIN_PREFIX} characters."


def run_id_path(run_id: Annotated[str, Path(description=_ID_HELP)], factory: SessionFactoryDep) -> str:
    """The full id of the run the path names by id or unique prefix (404 for none, 409 when ambiguous).

    Its own short session rather than the request's: an event stream would otherwise hold one open for
    as long as it runs.
    """
    with factory() as session:
        return resolve_run_id(session, run_id)


def sweep_id_path(sweep_id: Annotated[str, Path(description=_ID_HELP)], factory: SessionFactoryDep) -> str:
    """The full id of the sweep the path names by id or unique prefix (404 for none, 409 when ambiguous)."""
    with factory() as session:
        return resolve_sweep_id(session, sweep_id)


RunIdDep = Annotated[str, Depends(run_id_path)]
SweepIdDep = Annotated[str, Depends(sweep_id_path)]
