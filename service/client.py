"""Python clients for the graddiag REST API: :class:`Client` (sync) and :class:`AsyncClient`.

Both speak to a server by URL, or to an app in the same process through an httpx transport::

    from graddiag.service.client import Client
    with Client("http://127.0.0.1:8000") as gd:
        run = gd.run({"activation": "sigmoid", "depth": 20, "steps": 50}, timeout=300)
        print(run["verdict"], run["report"]["verdict"]["reasons"])

Results are the server's JSON as plain dicts (``Report.model_validate(run["report"])`` gives the
engine's typed report). Every error response raises :class:`GraddiagError` carrying the problem+json.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Self, overload

import httpx

from graddiag.models.spec import Spec

DEFAULT_URL: Final = "http://127.0.0.1:8000"
FINISHED: Final = frozenset({"succeeded", "failed", "cancelled"})
# The server caps one `?wait=` at 600 s; longer waits continue by polling.
MAX_SERVER_WAIT: Final = 600.0

Json = dict[str, Any]
SpecLike = Spec | Mapping[str, Any]
Format = Literal["json", "csv"]


class GraddiagError(Exception):
    """The server answered with an error; `problem` is its RFC 9457 body."""

    def __init__(self, status: int, problem: Json) -> None:
        self.status = status
        self.problem = problem
        self.title: str = str(problem.get("title", ""))
        self.detail: str = str(problem.get("detail", ""))
        self.code: str | None = problem.get("code")
        self.errors: list[Json] = list(problem.get("errors") or [])
        super().__init__(f"{status} {self.title}: {self.detail}")


class RunFailed(Exception):
    """`run()` waited for a run that ended failed or cancelled; `run` is its final state."""

    def __init__(self, run: Json) -> None:
        self.run = run
        super().__init__(f"run {run['id']} ended {run['status']}: {run.get('error') or 'no error message'}")


@dataclass(frozen=True)
class _Call:
    """One HTTP request, described once and sent by either client."""

    method: str
    path: str
    params: Mapping[str, Any] | list[tuple[str, Any]] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    expect: Literal["json", "text", "none"] = "json"
    # Extra seconds on top of the client's timeout (for server-side waits).
    extra_timeout: float = 0.0


def _spec_body(spec: SpecLike) -> Json:
    return spec.model_dump(mode="json") if isinstance(spec, Spec) else dict(spec)


def _drop_none(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _submit(spec: SpecLike, idempotency_key: str | None, wait: float) -> _Call:
    return _Call(
        "POST",
        "/v1/runs",
        params={"wait": wait} if wait else None,
        json=_spec_body(spec),
        headers={"Idempotency-Key": idempotency_key} if idempotency_key else {},
        extra_timeout=wait,
    )


def _gradients(run_id: str, layer: int | None, step_from: int | None, step_to: int | None, fmt: Format) -> _Call:
    params = _drop_none({"layer": layer, "step_from": step_from, "step_to": step_to, "format": fmt})
    return _Call("GET", f"/v1/runs/{run_id}/gradients", params=params, expect="text" if fmt == "csv" else "json")


def decode_response(response: httpx.Response, expect: Literal["json", "text", "none"]) -> Any:
    """The body of a successful response as `expect` says; GraddiagError with the problem for an error status."""
    if response.is_error:
        try:
            problem = response.json()
        except ValueError:
            problem = None
        if not isinstance(problem, dict):
            problem = {
                "title": response.reason_phrase,
                "status": response.status_code,
                "detail": response.text[:500],
            }
        raise GraddiagError(response.status_code, problem)
    if expect == "none":
        return None
    return response.text if expect == "text" else response.json()


def _timeout(base: httpx.Timeout, extra: float) -> httpx.Timeout:
    if not extra or base.read is None:
        return base
    return httpx.Timeout(base.connect, read=base.read + extra, write=base.write, pool=base.pool)


def auth_headers(headers: Mapping[str, str] | None, token: str | None) -> dict[str, str]:
    """`headers` plus `Authorization: Bearer <token>` (the server's api_token or read_token) when given."""
    merged = dict(headers or {})
    if token is not None:
        merged["Authorization"] = f"Bearer {token}"
    return merged


def _finished_or_raise(run: Json) -> Json:
    if run["status"] != "succeeded":
        raise RunFailed(run)
    return run


class Client:
    """Synchronous client. `transport` replaces the network (e.g. a mock or WSGI transport); `token` is
    sent as a bearer token (a server with GRADDIAG_API_TOKEN / GRADDIAG_READ_TOKEN needs it)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, transport=transport, timeout=timeout, headers=auth_headers(headers, token)
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _send(self, call: _Call) -> Any:
        response = self._http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            headers=call.headers,
            timeout=_timeout(self._http.timeout, call.extra_timeout),
        )
        return decode_response(response, call.expect)

    def submit(self, spec: SpecLike, *, idempotency_key: str | None = None, wait: float = 0.0) -> Json:
        """Queue a run; with `wait`, the server holds the answer up to that many seconds for the verdict."""
        result: Json = self._send(_submit(spec, idempotency_key, wait))
        return result

    def get(self, run_id: str) -> Json:
        """The run now (status, progress, and the report once succeeded)."""
        result: Json = self._send(_Call("GET", f"/v1/runs/{run_id}"))
        return result

    def wait(self, run_id: str, *, timeout: float = 600.0, poll: float = 0.5) -> Json:
        """Poll until the run finishes (whatever the outcome); TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(run_id)
            if run["status"] in FINISHED:
                return run
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"run {run_id} still {run['status']} after {timeout} s")
            time.sleep(min(poll, remaining))

    def run(self, spec: SpecLike, *, timeout: float = 600.0, idempotency_key: str | None = None) -> Json:
        """Submit and wait; the succeeded run with its report, else RunFailed (or TimeoutError)."""
        start = time.monotonic()
        run = self.submit(spec, idempotency_key=idempotency_key, wait=min(timeout, MAX_SERVER_WAIT))
        if run["status"] not in FINISHED:
            run = self.wait(run["id"], timeout=max(0.0, timeout - (time.monotonic() - start)))
        return _finished_or_raise(run)

    def runs(self, **filters: Any) -> Json:
        """`{items, total, limit, offset}`; filters are the `GET /v1/runs` query parameters."""
        result: Json = self._send(_Call("GET", "/v1/runs", params=_drop_none(filters)))
        return result

    def layers(self, run_id: str) -> list[Json]:
        """The run's layers (index, name, kind, params)."""
        result: list[Json] = self._send(_Call("GET", f"/v1/runs/{run_id}/layers"))
        return result

    @overload
    def gradients(
        self,
        run_id: str,
        *,
        layer: int | None = ...,
        step_from: int | None = ...,
        step_to: int | None = ...,
        fmt: Literal["json"] = ...,
    ) -> list[Json]: ...
    @overload
    def gradients(
        self,
        run_id: str,
        *,
        layer: int | None = ...,
        step_from: int | None = ...,
        step_to: int | None = ...,
        fmt: Literal["csv"],
    ) -> str: ...
    def gradients(
        self,
        run_id: str,
        *,
        layer: int | None = None,
        step_from: int | None = None,
        step_to: int | None = None,
        fmt: Format = "json",
    ) -> list[Json] | str:
        """Per-step, per-layer records: a list of dicts, or the CSV text with `fmt="csv"`."""
        result: list[Json] | str = self._send(_gradients(run_id, layer, step_from, step_to, fmt))
        return result

    def compare(self, *run_ids: str) -> Json:
        """Per-layer profiles (init and last step) of finished runs, side by side."""
        result: Json = self._send(_Call("GET", "/v1/compare", params=[("run_id", r) for r in run_ids]))
        return result

    def cancel(self, run_id: str) -> Json:
        """Cancel a queued or running run; GraddiagError (409) if it already finished."""
        result: Json = self._send(_Call("POST", f"/v1/runs/{run_id}/cancel"))
        return result

    def delete(self, run_id: str) -> None:
        """Delete the run and its records."""
        self._send(_Call("DELETE", f"/v1/runs/{run_id}", expect="none"))

    def sweep(self, base: SpecLike, grid: Mapping[str, list[Any]]) -> Json:
        """Queue one run per grid point; returns the sweep's status (its `id` included)."""
        result: Json = self._send(_Call("POST", "/v1/sweeps", json={"base": _spec_body(base), "grid": dict(grid)}))
        return result

    def sweep_status(self, sweep_id: str) -> Json:
        """Counts by status and every run's grid values, status and verdict."""
        result: Json = self._send(_Call("GET", f"/v1/sweeps/{sweep_id}"))
        return result

    def wait_sweep(self, sweep_id: str, *, timeout: float = 3600.0, poll: float = 1.0) -> Json:
        """Poll until every run of the sweep has finished; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not (status := self.sweep_status(sweep_id))["done"]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"sweep {sweep_id} not done after {timeout} s")
            time.sleep(min(poll, remaining))
        return status

    def sweep_summary(self, sweep_id: str) -> Json:
        """Per non-depth configuration: the verdict along depth and the critical depth."""
        result: Json = self._send(_Call("GET", f"/v1/sweeps/{sweep_id}/summary"))
        return result

    def ready(self) -> Json:
        """The `/readyz` body; GraddiagError (503) when not ready."""
        result: Json = self._send(_Call("GET", "/readyz"))
        return result


class AsyncClient:
    """The asyncio twin of :class:`Client`; pass `httpx.ASGITransport(app)` to call an app in-process."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, transport=transport, timeout=timeout, headers=auth_headers(headers, token)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        response = await self._http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            headers=call.headers,
            timeout=_timeout(self._http.timeout, call.extra_timeout),
        )
        return decode_response(response, call.expect)

    async def submit(self, spec: SpecLike, *, idempotency_key: str | None = None, wait: float = 0.0) -> Json:
        """See :meth:`Client.submit`."""
        result: Json = await self._send(_submit(spec, idempotency_key, wait))
        return result

    async def get(self, run_id: str) -> Json:
        """See :meth:`Client.get`."""
        result: Json = await self._send(_Call("GET", f"/v1/runs/{run_id}"))
        return result

    async def wait(self, run_id: str, *, timeout: float = 600.0, poll: float = 0.5) -> Json:
        """See :meth:`Client.wait`."""
        deadline = time.monotonic() + timeout
        while True:
            run = await self.get(run_id)
            if run["status"] in FINISHED:
                return run
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"run {run_id} still {run['status']} after {timeout} s")
            await asyncio.sleep(min(poll, remaining))

    async def run(self, spec: SpecLike, *, timeout: float = 600.0, idempotency_key: str | None = None) -> Json:
        """See :meth:`Client.run`."""
        start = time.monotonic()
        run = await self.submit(spec, idempotency_key=idempotency_key, wait=min(timeout, MAX_SERVER_WAIT))
        if run["status"] not in FINISHED:
            run = await self.wait(run["id"], timeout=max(0.0, timeout - (time.monotonic() - start)))
        return _finished_or_raise(run)

    async def runs(self, **filters: Any) -> Json:
        """See :meth:`Client.runs`."""
        result: Json = await self._send(_Call("GET", "/v1/runs", params=_drop_none(filters)))
        return result

    async def layers(self, run_id: str) -> list[Json]:
        """See :meth:`Client.layers`."""
        result: list[Json] = await self._send(_Call("GET", f"/v1/runs/{run_id}/layers"))
        return result

    @overload
    async def gradients(
        self,
        run_id: str,
        *,
        layer: int | None = ...,
        step_from: int | None = ...,
        step_to: int | None = ...,
        fmt: Literal["json"] = ...,
    ) -> list[Json]: ...
    @overload
    async def gradients(
        self,
        run_id: str,
        *,
        layer: int | None = ...,
        step_from: int | None = ...,
        step_to: int | None = ...,
        fmt: Literal["csv"],
    ) -> str: ...
    async def gradients(
        self,
        run_id: str,
        *,
        layer: int | None = None,
        step_from: int | None = None,
        step_to: int | None = None,
        fmt: Format = "json",
    ) -> list[Json] | str:
        """See :meth:`Client.gradients`."""
        result: list[Json] | str = await self._send(_gradients(run_id, layer, step_from, step_to, fmt))
        return result

    async def compare(self, *run_ids: str) -> Json:
        """See :meth:`Client.compare`."""
        params = [("run_id", r) for r in run_ids]
        result: Json = await self._send(_Call("GET", "/v1/compare", params=params))
        return result

    async def cancel(self, run_id: str) -> Json:
        """See :meth:`Client.cancel`."""
        result: Json = await self._send(_Call("POST", f"/v1/runs/{run_id}/cancel"))
        return result

    async def delete(self, run_id: str) -> None:
        """See :meth:`Client.delete`."""
        await self._send(_Call("DELETE", f"/v1/runs/{run_id}", expect="none"))

    async def sweep(self, base: SpecLike, grid: Mapping[str, list[Any]]) -> Json:
        """See :meth:`Client.sweep`."""
        body = {"base": _spec_body(base), "grid": dict(grid)}
        result: Json = await self._send(_Call("POST", "/v1/sweeps", json=body))
        return result

    async def sweep_status(self, sweep_id: str) -> Json:
        """See :meth:`Client.sweep_status`."""
        result: Json = await self._send(_Call("GET", f"/v1/sweeps/{sweep_id}"))
        return result

    async def wait_sweep(self, sweep_id: str, *, timeout: float = 3600.0, poll: float = 1.0) -> Json:
        """See :meth:`Client.wait_sweep`."""
        deadline = time.monotonic() + timeout
        while not (status := await self.sweep_status(sweep_id))["done"]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"sweep {sweep_id} not done after {timeout} s")
            await asyncio.sleep(min(poll, remaining))
        return status

    async def sweep_summary(self, sweep_id: str) -> Json:
        """See :meth:`Client.sweep_summary`."""
        result: Json = await self._send(_Call("GET", f"/v1/sweeps/{sweep_id}/summary"))
        return result

    async def ready(self) -> Json:
        """See :meth:`Client.ready`."""
        result: Json = await self._send(_Call("GET", "/readyz"))
        return result
