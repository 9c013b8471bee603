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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Generic, Literal, Self, TypedDict, TypeVar, Unpack, overload

import httpx
from pydantic import BaseModel

from graddiag.models.spec import Spec

DEFAULT_URL: Final = "http://127.0.0.1:8000"
FINISHED: Final = frozenset({"succeeded", "failed", "cancelled"})
# The server caps one `?wait=` at 600 s; longer waits continue by polling.
MAX_SERVER_WAIT: Final = 600.0

Json = dict[str, Any]
SpecLike = Spec | Mapping[str, Any]
# A graddiag.Report (any pydantic model of that shape: the client does not import the engine) or its JSON.
ReportLike = BaseModel | Mapping[str, Any]
Format = Literal["json", "csv"]


class RecordFilters(TypedDict, total=False):
    """Which per-step, per-layer records `gradients()` asks for (all when none is given)."""

    layer: int | None
    step_from: int | None
    step_to: int | None


class TimeFilters(TypedDict, total=False):
    """Which time records `time()` asks for (all when none is given)."""

    layer: int | None
    step: int | None


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


Expect = Literal["json", "text", "bytes", "none"]


@dataclass(frozen=True)
class _Call:
    """One HTTP request and how to read its answer, described once and sent by either client."""

    method: str
    path: str
    params: Mapping[str, Any] | list[tuple[str, Any]] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    expect: Expect = "json"
    # Extra seconds on top of the client's timeout (for server-side waits).
    extra_timeout: float = 0.0

    def build(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        """The request, built by the client that will send it (its base URL, headers and timeout)."""
        return http.build_request(
            self.method,
            self.path,
            params=self.params,
            json=self.json,
            headers=self.headers,
            timeout=_timeout(http.timeout, self.extra_timeout),
        )

    def decode(self, response: httpx.Response) -> Any:
        """The answer's body as `expect` says; GraddiagError with the problem for an error status."""
        if response.is_error:
            raise GraddiagError(response.status_code, _problem(response))
        if self.expect == "json":
            return response.json()
        if self.expect == "text":
            return response.text
        return response.content if self.expect == "bytes" else None


def _problem(response: httpx.Response) -> Json:
    """The error response's problem+json, or one made up from its status when it has none."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        return problem
    return {"title": response.reason_phrase, "status": response.status_code, "detail": response.text[:500]}


def _timeout(base: httpx.Timeout, extra: float) -> httpx.Timeout:
    if not extra or base.read is None:
        return base
    return httpx.Timeout(base.connect, read=base.read + extra, write=base.write, pool=base.pool)


def _spec_body(spec: SpecLike) -> Json:
    return spec.model_dump(mode="json") if isinstance(spec, Spec) else dict(spec)


def _drop_none(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


# A finding kind, or several for runs that have all of them (see GET /v1/runs).
FindingFilter = str | Sequence[str] | None


class _Requests:
    """Every request of the API, built once for both clients (httpx's BaseClient idea): the clients only
    send them and sleep their own way."""

    @staticmethod
    def submit(
        spec: SpecLike, idempotency_key: str | None, wait: float, name: str | None = None, tags: Sequence[str] = ()
    ) -> _Call:
        # The body is the spec itself: the name and tags travel as query parameters (`tag` repeated).
        params = [
            *((("wait", wait),) if wait else ()),
            *((("name", name),) if name else ()),
            *(("tag", t) for t in tags),
        ]
        return _Call(
            "POST",
            "/v1/runs",
            params=params or None,
            json=_spec_body(spec),
            headers={"Idempotency-Key": idempotency_key} if idempotency_key else {},
            extra_timeout=wait,
        )

    @staticmethod
    def get(run_id: str) -> _Call:
        return _Call("GET", f"/v1/runs/{run_id}")

    @staticmethod
    def runs(filters: Mapping[str, Any], finding: FindingFilter) -> _Call:
        # httpx sends a list as the parameter repeated: `finding=a&finding=b`, runs with both kinds.
        return _Call("GET", "/v1/runs", params=_drop_none({**filters, "finding": finding}))

    @staticmethod
    def layers(run_id: str) -> _Call:
        return _Call("GET", f"/v1/runs/{run_id}/layers")

    @staticmethod
    def gradients(
        run_id: str, fmt: Format, *, layer: int | None = None, step_from: int | None = None, step_to: int | None = None
    ) -> _Call:
        params = _drop_none({"layer": layer, "step_from": step_from, "step_to": step_to, "format": fmt})
        return _Call("GET", f"/v1/runs/{run_id}/gradients", params=params, expect="text" if fmt == "csv" else "json")

    @staticmethod
    def time(run_id: str, fmt: Format, *, layer: int | None = None, step: int | None = None) -> _Call:
        params = _drop_none({"layer": layer, "step": step, "format": fmt})
        return _Call("GET", f"/v1/runs/{run_id}/time", params=params, expect="text" if fmt == "csv" else "json")

    @staticmethod
    def tensorboard(run_id: str) -> _Call:
        return _Call("GET", f"/v1/runs/{run_id}/tensorboard", expect="bytes")

    @staticmethod
    def compare(run_ids: tuple[str, ...]) -> _Call:
        return _Call("GET", "/v1/compare", params=[("run_id", r) for r in run_ids])

    @staticmethod
    def cancel(run_id: str) -> _Call:
        return _Call("POST", f"/v1/runs/{run_id}/cancel")

    @staticmethod
    def delete(run_id: str) -> _Call:
        return _Call("DELETE", f"/v1/runs/{run_id}", expect="none")

    @staticmethod
    def upload(report: ReportLike, name: str | None, tags: Sequence[str]) -> _Call:
        # JSON mode writes non-finite floats as null, as the server requires.
        body = report.model_dump(mode="json") if isinstance(report, BaseModel) else dict(report)
        return _Call("POST", "/v1/reports", json={"report": body, "name": name, "tags": list(tags)})

    @staticmethod
    def sweep(
        base: SpecLike, grid: Mapping[str, list[Any]], name: str | None = None, tags: Sequence[str] = ()
    ) -> _Call:
        body = {"base": _spec_body(base), "grid": dict(grid), **({"name": name} if name else {}), "tags": list(tags)}
        return _Call("POST", "/v1/sweeps", json=body)

    @staticmethod
    def label(kind: Literal["runs", "sweeps"], ident: str, labels: Mapping[str, Any]) -> _Call:
        return _Call("PATCH", f"/v1/{kind}/{ident}", json=dict(labels))

    @staticmethod
    def sweeps(filters: Mapping[str, Any]) -> _Call:
        return _Call("GET", "/v1/sweeps", params=_drop_none(dict(filters)))

    @staticmethod
    def sweep_status(sweep_id: str, finding: str | None = None) -> _Call:
        return _Call("GET", f"/v1/sweeps/{sweep_id}", params=_drop_none({"finding": finding}))

    @staticmethod
    def sweep_summary(sweep_id: str, finding: str | None = None) -> _Call:
        return _Call("GET", f"/v1/sweeps/{sweep_id}/summary", params=_drop_none({"finding": finding}))

    @staticmethod
    def ready() -> _Call:
        return _Call("GET", "/readyz")


class _Deadline:
    """The time budget of a wait, for either client: what is left, and how long to sleep before polling again."""

    def __init__(self, timeout: float, poll: float = 0.0) -> None:
        self._timeout = timeout
        self._poll = poll
        self._end = time.monotonic() + timeout

    def left(self) -> float:
        """Seconds left (0 once past)."""
        return max(0.0, self._end - time.monotonic())

    def server_wait(self) -> float:
        """How long to ask the server to hold a submit's answer (it caps one wait at MAX_SERVER_WAIT)."""
        return min(self._timeout, MAX_SERVER_WAIT)

    def pause(self, still: str) -> float:
        """The sleep before the next poll; TimeoutError ("<still> after <timeout> s") once time is up."""
        remaining = self._end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{still} after {self._timeout} s")
        return min(self._poll, remaining)


_Http = TypeVar("_Http", httpx.Client, httpx.AsyncClient)
_Transport = TypeVar("_Transport", httpx.BaseTransport, httpx.AsyncBaseTransport)


class _BaseClient(Generic[_Http, _Transport]):
    """What both clients are made of: an httpx client for `base_url`, with `token` as a bearer token."""

    _make_http: Callable[..., _Http]

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        transport: _Transport | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        merged = dict(headers or {})
        if token is not None:
            merged["Authorization"] = f"Bearer {token}"
        self._http: _Http = self._make_http(base_url=base_url, transport=transport, timeout=timeout, headers=merged)


def _finished_or_raise(run: Json) -> Json:
    if run["status"] != "succeeded":
        raise RunFailed(run)
    return run


class Client(_BaseClient[httpx.Client, httpx.BaseTransport]):
    """Synchronous client. `transport` replaces the network (e.g. a mock or WSGI transport); `token` is
    sent as a bearer token (a server with GRADDIAG_API_TOKEN / GRADDIAG_READ_TOKEN needs it)."""

    _make_http = httpx.Client

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
        return call.decode(self._http.send(call.build(self._http)))

    def submit(
        self,
        spec: SpecLike,
        *,
        idempotency_key: str | None = None,
        wait: float = 0.0,
        name: str | None = None,
        tags: Sequence[str] = (),
    ) -> Json:
        """Queue a run (named and tagged if given); with `wait`, the server holds the answer up to that many
        seconds for the verdict."""
        result: Json = self._send(_Requests.submit(spec, idempotency_key, wait, name, tags))
        return result

    def get(self, run_id: str) -> Json:
        """The run now (status, progress, and the report once succeeded)."""
        result: Json = self._send(_Requests.get(run_id))
        return result

    def wait(self, run_id: str, *, timeout: float = 600.0, poll: float = 0.5) -> Json:
        """Poll until the run finishes (whatever the outcome); TimeoutError after `timeout` seconds."""
        deadline = _Deadline(timeout, poll)
        while (run := self.get(run_id))["status"] not in FINISHED:
            time.sleep(deadline.pause(f"run {run_id} still {run['status']}"))
        return run

    def run(
        self,
        spec: SpecLike,
        *,
        timeout: float = 600.0,
        idempotency_key: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
    ) -> Json:
        """Submit and wait; the succeeded run with its report, else RunFailed (or TimeoutError)."""
        deadline = _Deadline(timeout)
        run = self.submit(spec, idempotency_key=idempotency_key, wait=deadline.server_wait(), name=name, tags=tags)
        if run["status"] not in FINISHED:
            run = self.wait(run["id"], timeout=deadline.left())
        return _finished_or_raise(run)

    def runs(self, *, finding: FindingFilter = None, **filters: Any) -> Json:
        """`{items, total, limit, offset}`; filters are the `GET /v1/runs` query parameters.

        `finding` keeps the runs whose verdict has a finding of that kind (a list: all of those kinds).
        """
        result: Json = self._send(_Requests.runs(filters, finding))
        return result

    def layers(self, run_id: str) -> list[Json]:
        """The run's layers (index, name, kind, params)."""
        result: list[Json] = self._send(_Requests.layers(run_id))
        return result

    @overload
    def gradients(self, run_id: str, *, fmt: Literal["json"] = ..., **filters: Unpack[RecordFilters]) -> list[Json]: ...
    @overload
    def gradients(self, run_id: str, *, fmt: Literal["csv"], **filters: Unpack[RecordFilters]) -> str: ...
    def gradients(self, run_id: str, *, fmt: Format = "json", **filters: Unpack[RecordFilters]) -> list[Json] | str:
        """Per-step, per-layer records: a list of dicts, or the CSV text with `fmt="csv"`."""
        result: list[Json] | str = self._send(_Requests.gradients(run_id, fmt, **filters))
        return result

    @overload
    def time(self, run_id: str, *, fmt: Literal["json"] = ..., **filters: Unpack[TimeFilters]) -> list[Json]: ...
    @overload
    def time(self, run_id: str, *, fmt: Literal["csv"], **filters: Unpack[TimeFilters]) -> str: ...
    def time(self, run_id: str, *, fmt: Format = "json", **filters: Unpack[TimeFilters]) -> list[Json] | str:
        """The gradient through time of a recurrent run: its rows (step, layer, t, grad_norm, cell_grad_norm,
        state_rms, gate_mean, saturation_frac) ordered by step, layer, t, or the CSV text with `fmt="csv"`;
        `layer` and `step` keep one recurrent layer and/or one recorded step. Empty for a run without
        recurrent layers; `layers()` names the layers (kind "recurrent")."""
        result: Json | str = self._send(_Requests.time(run_id, fmt, **filters))
        return result if isinstance(result, str) else list(result["rows"])

    def tensorboard(self, run_id: str) -> bytes:
        """The succeeded run's TensorBoard events as a tar.gz (one `<run id>/` folder)."""
        result: bytes = self._send(_Requests.tensorboard(run_id))
        return result

    def compare(self, *run_ids: str) -> Json:
        """Per-layer profiles (init and last step) of finished runs, side by side."""
        result: Json = self._send(_Requests.compare(run_ids))
        return result

    def cancel(self, run_id: str) -> Json:
        """Cancel a queued or running run; GraddiagError (409) if it already finished."""
        result: Json = self._send(_Requests.cancel(run_id))
        return result

    def delete(self, run_id: str) -> None:
        """Delete the run and its records."""
        self._send(_Requests.delete(run_id))

    def upload(self, report: ReportLike, *, name: str | None = None, tags: Sequence[str] = ()) -> Json:
        """Store a report of your own model (graddiag.diagnose / watch) as a run with `source: external`;
        returns the run (its `id` included). A report that does not add up raises GraddiagError (422)."""
        result: Json = self._send(_Requests.upload(report, name, tags))
        return result

    def sweep(
        self, base: SpecLike, grid: Mapping[str, list[Any]], *, name: str | None = None, tags: Sequence[str] = ()
    ) -> Json:
        """Queue one run per grid point (the sweep named and tagged if given); returns the sweep's status."""
        result: Json = self._send(_Requests.sweep(base, grid, name, tags))
        return result

    def label(self, run_id: str, **labels: Any) -> Json:
        """Set a run's `name` and/or `tags` (`name=""` clears it); the run."""
        result: Json = self._send(_Requests.label("runs", run_id, labels))
        return result

    def label_sweep(self, sweep_id: str, **labels: Any) -> Json:
        """Set a sweep's `name` and/or `tags`; the sweep's status."""
        result: Json = self._send(_Requests.label("sweeps", sweep_id, labels))
        return result

    def sweeps(self, **filters: Any) -> Json:
        """`{items, total, limit, offset}` of sweeps, newest first; filters: `name`, `tag`, `limit`, `offset`."""
        result: Json = self._send(_Requests.sweeps(filters))
        return result

    def sweep_status(self, sweep_id: str, *, finding: str | None = None) -> Json:
        """Counts by status and every run's grid values, status, verdict and findings (`finding`: only the
        runs with a finding of that kind; the counts stay the whole sweep's)."""
        result: Json = self._send(_Requests.sweep_status(sweep_id, finding))
        return result

    def wait_sweep(self, sweep_id: str, *, timeout: float = 3600.0, poll: float = 1.0) -> Json:
        """Poll until every run of the sweep has finished; TimeoutError after `timeout` seconds."""
        deadline = _Deadline(timeout, poll)
        while not (status := self.sweep_status(sweep_id))["done"]:
            time.sleep(deadline.pause(f"sweep {sweep_id} not done"))
        return status

    def sweep_summary(self, sweep_id: str, *, finding: str | None = None) -> Json:
        """Per non-depth configuration: the verdict and findings along depth, the critical depth and each
        finding's first depth (`finding`: only the configurations with a finding of that kind)."""
        result: Json = self._send(_Requests.sweep_summary(sweep_id, finding))
        return result

    def ready(self) -> Json:
        """The `/readyz` body; GraddiagError (503) when not ready."""
        result: Json = self._send(_Requests.ready())
        return result


class AsyncClient(_BaseClient[httpx.AsyncClient, httpx.AsyncBaseTransport]):
    """The asyncio twin of :class:`Client`; pass `httpx.ASGITransport(app)` to call an app in-process."""

    _make_http = httpx.AsyncClient

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
        return call.decode(await self._http.send(call.build(self._http)))

    async def submit(
        self,
        spec: SpecLike,
        *,
        idempotency_key: str | None = None,
        wait: float = 0.0,
        name: str | None = None,
        tags: Sequence[str] = (),
    ) -> Json:
        """See :meth:`Client.submit`."""
        result: Json = await self._send(_Requests.submit(spec, idempotency_key, wait, name, tags))
        return result

    async def get(self, run_id: str) -> Json:
        """See :meth:`Client.get`."""
        result: Json = await self._send(_Requests.get(run_id))
        return result

    async def wait(self, run_id: str, *, timeout: float = 600.0, poll: float = 0.5) -> Json:
        """See :meth:`Client.wait`."""
        deadline = _Deadline(timeout, poll)
        while (run := await self.get(run_id))["status"] not in FINISHED:
            await asyncio.sleep(deadline.pause(f"run {run_id} still {run['status']}"))
        return run

    async def run(
        self,
        spec: SpecLike,
        *,
        timeout: float = 600.0,
        idempotency_key: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
    ) -> Json:
        """See :meth:`Client.run`."""
        deadline = _Deadline(timeout)
        run = await self.submit(
            spec, idempotency_key=idempotency_key, wait=deadline.server_wait(), name=name, tags=tags
        )
        if run["status"] not in FINISHED:
            run = await self.wait(run["id"], timeout=deadline.left())
        return _finished_or_raise(run)

    async def runs(self, *, finding: FindingFilter = None, **filters: Any) -> Json:
        """See :meth:`Client.runs`."""
        result: Json = await self._send(_Requests.runs(filters, finding))
        return result

    async def layers(self, run_id: str) -> list[Json]:
        """See :meth:`Client.layers`."""
        result: list[Json] = await self._send(_Requests.layers(run_id))
        return result

    @overload
    async def gradients(
        self, run_id: str, *, fmt: Literal["json"] = ..., **filters: Unpack[RecordFilters]
    ) -> list[Json]: ...
    @overload
    async def gradients(self, run_id: str, *, fmt: Literal["csv"], **filters: Unpack[RecordFilters]) -> str: ...
    async def gradients(
        self, run_id: str, *, fmt: Format = "json", **filters: Unpack[RecordFilters]
    ) -> list[Json] | str:
        """See :meth:`Client.gradients`."""
        result: list[Json] | str = await self._send(_Requests.gradients(run_id, fmt, **filters))
        return result

    @overload
    async def time(self, run_id: str, *, fmt: Literal["json"] = ..., **filters: Unpack[TimeFilters]) -> list[Json]: ...
    @overload
    async def time(self, run_id: str, *, fmt: Literal["csv"], **filters: Unpack[TimeFilters]) -> str: ...
    async def time(self, run_id: str, *, fmt: Format = "json", **filters: Unpack[TimeFilters]) -> list[Json] | str:
        """See :meth:`Client.time`."""
        result: Json | str = await self._send(_Requests.time(run_id, fmt, **filters))
        return result if isinstance(result, str) else list(result["rows"])

    async def tensorboard(self, run_id: str) -> bytes:
        """See :meth:`Client.tensorboard`."""
        result: bytes = await self._send(_Requests.tensorboard(run_id))
        return result

    async def compare(self, *run_ids: str) -> Json:
        """See :meth:`Client.compare`."""
        result: Json = await self._send(_Requests.compare(run_ids))
        return result

    async def cancel(self, run_id: str) -> Json:
        """See :meth:`Client.cancel`."""
        result: Json = await self._send(_Requests.cancel(run_id))
        return result

    async def delete(self, run_id: str) -> None:
        """See :meth:`Client.delete`."""
        await self._send(_Requests.delete(run_id))

    async def upload(self, report: ReportLike, *, name: str | None = None, tags: Sequence[str] = ()) -> Json:
        """See :meth:`Client.upload`."""
        result: Json = await self._send(_Requests.upload(report, name, tags))
        return result

    async def sweep(
        self, base: SpecLike, grid: Mapping[str, list[Any]], *, name: str | None = None, tags: Sequence[str] = ()
    ) -> Json:
        """See :meth:`Client.sweep`."""
        result: Json = await self._send(_Requests.sweep(base, grid, name, tags))
        return result

    async def label(self, run_id: str, **labels: Any) -> Json:
        """See :meth:`Client.label`."""
        result: Json = await self._send(_Requests.label("runs", run_id, labels))
        return result

    async def label_sweep(self, sweep_id: str, **labels: Any) -> Json:
        """See :meth:`Client.label_sweep`."""
        result: Json = await self._send(_Requests.label("sweeps", sweep_id, labels))
        return result

    async def sweeps(self, **filters: Any) -> Json:
        """See :meth:`Client.sweeps`."""
        result: Json = await self._send(_Requests.sweeps(filters))
        return result

    async def sweep_status(self, sweep_id: str, *, finding: str | None = None) -> Json:
        """See :meth:`Client.sweep_status`."""
        result: Json = await self._send(_Requests.sweep_status(sweep_id, finding))
        return result

    async def wait_sweep(self, sweep_id: str, *, timeout: float = 3600.0, poll: float = 1.0) -> Json:
        """See :meth:`Client.wait_sweep`."""
        deadline = _Deadline(timeout, poll)
        while not (status := await self.sweep_status(sweep_id))["done"]:
            await asyncio.sleep(deadline.pause(f"sweep {sweep_id} not done"))
        return status

    async def sweep_summary(self, sweep_id: str, *, finding: str | None = None) -> Json:
        """See :meth:`Client.sweep_summary`."""
        result: Json = await self._send(_Requests.sweep_summary(sweep_id, finding))
        return result

    async def ready(self) -> Json:
        """See :meth:`Client.ready`."""
        result: Json = await self._send(_Requests.ready())
        return result
