"""The app in-process (httpx over ASGITransport, its lifespan running), request bodies, problem checks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from graddiag.service.api import create_app
from graddiag.service.api.health import WorkerProbe
from graddiag.service.engine.report import LayerRecord
from graddiag.service.settings import Settings
from tests.support import specs

# The tiny spec as a request body (its non-default fields).
TINY: dict[str, Any] = specs.TINY.model_dump(mode="json", exclude_defaults=True)
# Long enough (thousands of tiny steps) to still be running when the test cancels it.
LONG: dict[str, Any] = {**TINY, "depth": 2, "width": 4, "batch_size": 2, "steps": 5000}
# The columns of the gradient records, in the order the API serves them.
RECORD_FIELDS = list(LayerRecord.model_fields)
# The CSV export's columns: the records' with each layer's name beside its index.
CSV_FIELDS = ["step", "layer", "layer_name", *RECORD_FIELDS[2:]]


@asynccontextmanager
async def serve_app(
    settings: Settings, probe: WorkerProbe | None = None, **transport: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running (ASGITransport does not run it), and a client bound to it."""
    app = create_app(settings, worker_probe=probe)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app, **transport), base_url="http://graddiag.test") as client,
    ):
        yield client


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Check an RFC 9457 problem answer of `status` with graddiag's `code`; its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "about:blank"
    assert body["status"] == status
    assert body["code"] == code
    assert body["title"] and body["detail"]
    return body
