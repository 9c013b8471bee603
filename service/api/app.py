"""The app factory: settings in, a FastAPI app out; the database engine lives for the app's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from graddiag.service.api import compare, dashboard, events, health, reports, runs, security, sweeps, tensorboard
from graddiag.service.api.errors import document_problems, install_error_handlers
from graddiag.service.api.health import WorkerProbe
from graddiag.service.api.limits import BodyLimit
from graddiag.service.api.metrics import install_metrics
from graddiag.service.api.security import install_access_control
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine, make_sessionmaker

DESCRIPTION = """\
Submit a network spec; a worker trains it briefly, records every layer's gradients and returns a
vanishing / exploding / healthy verdict with its evidence. Errors are `application/problem+json`.
"""


def create_app(settings: Settings, *, worker_probe: WorkerProbe | None = None) -> FastAPI:
    """Build the API for `settings`. The database must already be migrated (`serve` does it).

    `worker_probe` reports the worker processes this API supervises, for `/readyz`.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A short busy timeout: a request answers 503 while another process holds the lock, not hang 30 s.
        engine = make_engine(settings.db_url, busy_timeout=settings.api_busy_timeout_seconds)
        app.state.sessionmaker = make_sessionmaker(engine)
        # GET and HEAD requests read through this one (see deps.get_session_factory): no waiting behind a writer.
        app.state.read_sessionmaker = make_sessionmaker(engine, read_only=True)
        try:
            yield
        finally:
            engine.dispose()

    app = FastAPI(
        title="graddiag",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.worker_probe = worker_probe
    install_error_handlers(app)
    document_problems(app)
    for module in (runs, reports, sweeps, compare, health, tensorboard, events, dashboard, security):
        app.include_router(module.router)
    app.mount("/static", dashboard.static_files(), name="static")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_access_control(app, settings)  # before any route, mount or body read
    # Outermost, so request latency counts the 401s and 413s the layers inside it answer.
    install_metrics(app, lease_seconds=settings.lease_seconds, worker_probe=worker_probe)
    return app
