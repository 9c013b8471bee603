"""The app factory: settings in, a FastAPI app out; the database engine lives for the app's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import compare, health, runs, sweeps
from service.api.errors import document_problems, install_error_handlers
from service.api.health import WorkerProbe
from service.settings import Settings
from service.store.db import make_engine, make_sessionmaker

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
        engine = make_engine(settings.db_url)
        app.state.sessionmaker = make_sessionmaker(engine)
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
    for module in (runs, sweeps, compare, health):
        app.include_router(module.router)
    return app
