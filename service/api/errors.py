"""Every error the API returns is ``application/problem+json`` (RFC 9457).

Members: ``type`` (always ``about:blank``, so ``title`` is the HTTP status phrase), ``title``,
``status``, ``detail`` (a readable sentence), ``instance`` (the request path), ``code`` (a stable
machine-readable slug, an RFC 9457 extension member) and, for validation problems, ``errors``:
one ``{loc, msg, type}`` per offending field so scripts can point at the exact input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from graddiag.models.spec import combination_field
from graddiag.service.api.schemas import FieldError, Problem
from graddiag.service.store.db import is_transient
from graddiag.service.store.ids import AmbiguousId
from graddiag.service.store.runs import RunFinished, RunNotFound
from graddiag.service.store.sweeps import SweepInvalid, SweepNotFound

PROBLEM_JSON = "application/problem+json"
# What a 503 asks the client to wait: a lock held by another process or a full disk rarely clears sooner.
RETRY_AFTER_SECONDS = 5

logger = logging.getLogger(__name__)


class ApiProblem(Exception):
    """A problem a route raises on purpose (e.g. comparing runs that have not finished)."""

    def __init__(self, status: int, code: str, detail: str, errors: Sequence[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = list(errors) if errors is not None else None


# An error body names at most this many fields, each location part and message cut to these lengths:
# the body stays a few KB whatever the input (95,000 unknown keys, a megabyte-long key or value).
MAX_FIELD_ERRORS = 20
MAX_LOC_CHARS = 64
MAX_MSG_CHARS = 400
# The detail sentence too: it may quote a path parameter (a 60 KB run id would come back whole).
MAX_DETAIL_CHARS = 1000


def printable(text: str, limit: int | None = None) -> str:
    """`text` cut to `limit` characters, with lone surrogates escaped (``\\ud800``) so it encodes as UTF-8.

    JSON input may carry a lone surrogate (``"\\ud800"``) that Python decodes but cannot encode back:
    echoed in a key or message, it would make the response fail to render (a 500).
    """
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}… ({len(text)} characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def field_errors(raw: Sequence[Any], limit: int = MAX_FIELD_ERRORS) -> list[FieldError]:
    """Normalise pydantic/FastAPI error dicts to ``{loc, msg, type}``, the first `limit` of them.

    Drops ``input``/``ctx`` (they may echo large bodies or hold unserialisable exception objects), cuts
    long location parts and messages and escapes lone surrogates, so the body is bounded and encodable.
    A spec's refused combination (pydantic locates it at the spec itself) gets the field its message
    names appended to its location, e.g. ``["body", "heads"]``.
    """
    return [
        FieldError(
            loc=[p if isinstance(p, int) else printable(str(p), MAX_LOC_CHARS) for p in _located(e)],
            msg=printable(str(e.get("msg", "")), MAX_MSG_CHARS),
            type=printable(str(e.get("type", "value_error")), MAX_LOC_CHARS),
        )
        for e in raw[:limit]
    ]


def _located(error: Mapping[str, Any]) -> list[Any]:
    loc = list(error.get("loc", ()))
    if error.get("type") == "value_error" and loc in (["body"], ["body", "spec"]):
        field = combination_field(str(error.get("msg", "")))
        if field is not None:
            loc.append(field)
    return loc


def _describe(errors: Sequence[FieldError], total: int | None = None) -> str:
    """'depth: Input should be …; activation: …' — where the location prefix (body/query/path)
    is dropped because the field name alone is what a user recognises. `total`: how many errors there
    were before `errors` was cut."""
    parts = []
    for err in errors[:5]:
        loc = [str(p) for p in err.loc]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        parts.append(f"{'.'.join(loc) or 'request'}: {err.msg}")
    total = max(len(errors), total or 0)
    more = f" (and {total - 5} more)" if total > 5 else ""
    return "; ".join(parts) + more


def problem_response(
    request: Request,
    status: int,
    code: str,
    detail: str,
    *,
    errors: Sequence[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Build the problem+json response; the single place the error body is shaped."""
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=printable(detail, MAX_DETAIL_CHARS),
        instance=printable(request.url.path, MAX_MSG_CHARS),
        code=code,
        errors=list(errors) if errors is not None else None,
    )
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = exc.errors()
    errors = field_errors(raw)
    return problem_response(request, 422, "validation_error", _describe(errors, len(raw)), errors=errors)


async def _sweep_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SweepInvalid)
    errors = field_errors(exc.errors)
    return problem_response(request, 422, "sweep_invalid", _describe(errors), errors=errors)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    code = "sweep_not_found" if isinstance(exc, SweepNotFound) else "run_not_found"
    return problem_response(request, 404, code, str(exc))


async def _ambiguous(request: Request, exc: Exception) -> JSONResponse:
    # The detail names the candidate ids, so the caller can pick one.
    return problem_response(request, 409, "ambiguous_id", str(exc))


async def _run_finished(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(request, 409, "run_finished", str(exc))


async def _api_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiProblem)
    return problem_response(request, exc.status, exc.code, exc.detail, errors=exc.errors)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if isinstance(exc.detail, str) else phrase
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    return problem_response(request, exc.status_code, code, detail, headers=exc.headers)


async def _database(request: Request, exc: Exception) -> JSONResponse:
    if not is_transient(exc):
        raise exc  # a bug, not a condition: the 500 handler logs it
    # The message may name tables or paths: the log gets it, the client only the kind of condition.
    logger.warning("database unavailable on %s %s: %s", request.method, request.url.path, getattr(exc, "orig", exc))
    return problem_response(
        request,
        503,
        "database_unavailable",
        "The database is busy or out of space; retry after Retry-After seconds (a submit with the same "
        "Idempotency-Key never creates a second run).",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the server log only: the body must not leak paths, SQL or values.
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, 500, "internal_error", "The server hit an unexpected error; it has been logged.")


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route may return (their body: see document_problems)."""
    return {status: {"description": HTTPStatus(status).phrase} for status in statuses}


def document_problems(app: FastAPI) -> None:
    """Make the OpenAPI schema say what the handlers guarantee: every 4xx/5xx body is a Problem,
    served as application/problem+json (unless a route documents its own, like /readyz's 503), and
    any operation may answer 500."""
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    fastapi_422 = {"$ref": "#/components/schemas/HTTPValidationError"}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(problem.pop("$defs", {}))
            components["Problem"] = problem
            for path in schema["paths"].values():
                for operation in path.values():
                    responses = operation.setdefault("responses", {})
                    responses.setdefault("500", {"description": HTTPStatus(500).phrase})
                    for status, response in responses.items():
                        own = response.get("content", {}).get("application/json", {}).get("schema")
                        if status[0] in "45" and own in (None, fastapi_422):
                            response["content"] = {PROBLEM_JSON: {"schema": problem_ref}}
            # FastAPI's own 422 body, replaced above by Problem everywhere.
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    """Route every error class to its problem+json handler."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(SweepInvalid, _sweep_invalid)
    app.add_exception_handler(RunNotFound, _not_found)
    app.add_exception_handler(SweepNotFound, _not_found)
    app.add_exception_handler(RunFinished, _run_finished)
    app.add_exception_handler(AmbiguousId, _ambiguous)
    app.add_exception_handler(ApiProblem, _api_problem)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(SQLAlchemyError, _database)
    app.add_exception_handler(Exception, _internal)
