"""Resource limits at the API's edge: request body size, page size and a spec's training memory.

Every refusal is a problem+json naming what to change: a 413 for the body, a 422 naming the query
parameter or the spec fields. The caps are settings, so an operator sets them per deployment.
"""

from __future__ import annotations

from typing import Final

from fastapi.exceptions import RequestValidationError
from pydantic import Field
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from graddiag.models.memory import estimate_run_memory, sizing_fields
from graddiag.models.shapes import time_record_count
from graddiag.models.spec import Spec, SpecCaps
from graddiag.service.api.errors import problem_response
from graddiag.service.api.schemas import FieldError
from graddiag.service.settings import Settings

# The most time records (a recurrent run's gradient through time) one run may hold, and one answer of
# GET /v1/runs/{id}/time serves (256,000 rows measured ~4 s and 42 MB as JSON; a spec at the caps would
# record 16 M). Past it a probe is refused at submit and an upload with a 422; a /time request over it
# (none, while runs keep to it) would be refused naming the filter that makes it fit.
MAX_TIME_RECORDS: Final = 500_000


class ServerCaps(SpecCaps):
    """SpecCaps plus the memory cap: a spec estimated above it is refused naming the fields that size it.

    The estimate (models/memory.py) includes the held-out evaluation, so it depends on `eval_samples`.
    Every architecture is estimated (a transformer's attention and MLP activations, a recurrent net's
    time steps); the message names the estimate, its largest part and the cap.
    """

    max_run_memory_mb: float = Field(gt=0)
    eval_samples: int = Field(gt=0)

    def violations(self, spec: Spec) -> list[tuple[str, str]]:
        """(field, message) for every cap `spec` exceeds."""
        found = super().violations(spec)
        estimate = estimate_run_memory(spec, self.eval_samples)
        if estimate.run_mib > self.max_run_memory_mb:
            part, part_mib = estimate.largest_part
            fields = sizing_fields(spec, estimate)
            message = (
                f"the run would need about {estimate.run_mib:,.0f} MiB to train and evaluate ({part}: "
                f"{part_mib:,.0f} MiB), over this server's max_run_memory_mb={self.max_run_memory_mb:g}; "
                f"lower {', '.join(fields[:-1])} or {fields[-1]}"
            )
            found += [(field, message) for field in fields]
        rows = time_record_count(spec)
        if rows > MAX_TIME_RECORDS:
            message = (
                f"the run would record {rows:,} time records (recorded steps x depth x 32 time steps), over the "
                f"{MAX_TIME_RECORDS:,} a run holds; lower steps or depth, or raise record_every"
            )
            found += [(field, message) for field in ("steps", "record_every", "depth")]
        return found


def server_caps(settings: Settings) -> ServerCaps:
    """Every cap a submitted spec must meet on this deployment."""
    return ServerCaps(
        **settings.caps().model_dump(),
        max_run_memory_mb=settings.max_run_memory_mb,
        eval_samples=settings.eval_samples,
    )


def check_spec(spec: Spec, settings: Settings) -> None:
    """Raise a 422 naming every field of `spec` over this deployment's caps."""
    violations = server_caps(settings).violations(spec)
    if violations:
        raise RequestValidationError(
            [{"loc": ("body", field), "msg": msg, "type": "over_cap"} for field, msg in violations]
        )


def check_page_size(limit: int, settings: Settings) -> None:
    """Raise a 422 naming `limit` when a page would exceed `settings.max_page_size`."""
    if limit > settings.max_page_size:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", "limit"),
                    "msg": f"limit={limit} exceeds this server's max_page_size; allowed: at most "
                    f"{settings.max_page_size}",
                    "type": "over_cap",
                }
            ]
        )


class BodyLimit:
    """ASGI middleware refusing request bodies over `max_bytes` with a 413 problem.

    A declared Content-Length over the cap is refused before anything is read; a body sent without one
    (chunked) is read up to the cap and refused as soon as it passes it. The app sees the body only
    once it is known to fit, so no route ever parses a partial or oversized body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away: the app sees the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        pending: list[Message] = [message]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        message = f"the request body exceeds this server's max_body_bytes={self.max_bytes}"
        response = problem_response(
            request,
            413,
            "body_too_large",
            f"body: {message}",
            errors=[FieldError(loc=["body"], msg=message, type="too_large")],
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
