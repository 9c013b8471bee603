"""Hostile input and access control: body and page caps, bounded parameters, path traversal, bearer tokens,
the dashboard's login cookie, secrets kept out of responses and logs, CORS, and the public-bind guard."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from graddiag.service.api import create_app
from graddiag.service.api import security as security_module
from graddiag.service.api.security import InsecureBind, Tokens, check_bind, cookie_value
from graddiag.service.client import AsyncClient, GraddiagError
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine, upgrade
from tests.support import REPO
from tests.support.api import TINY, assert_problem, serve_app
from tests.support.server import Server

pytestmark = pytest.mark.anyio

WRITE = "w-7c1d9e0b-write-token"
READ = "r-3f5a2c88-read-token"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'graddiag.db'}"
    upgrade(url)
    return Settings(db_url=url, cache_dir=tmp_path / "cache", eval_samples=10)


def configure(settings: Settings, **changes: Any) -> Settings:
    """`settings` with `changes`, validated (tokens become SecretStr, as from the environment)."""
    return Settings(**{**settings.model_dump(), **changes})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def guarded(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Both tokens set: writes need WRITE, reads need READ or WRITE."""
    async with serve_app(configure(settings, api_token=WRITE, read_token=READ)) as api:
        yield api


def assert_unauthorized(response: httpx.Response, *, invalid: bool) -> None:
    body = assert_problem(response, 401, "unauthorized")
    assert set(body) == {"type", "title", "status", "detail", "instance", "code"}  # no data, only the problem
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="graddiag"') and ('error="invalid_token"' in challenge) == invalid


# --- hostile input ---------------------------------------------------------------------------------


async def test_body_over_the_cap_is_413_whether_declared_or_streamed(settings: Settings) -> None:
    big = {**TINY, "padding": "x" * 2000}  # refused for its size before anyone reads the unknown field
    async with serve_app(configure(settings, max_body_bytes=1024)) as api:
        declared = await api.post("/v1/runs", json=big)
        body = assert_problem(declared, 413, "body_too_large")
        assert body["errors"] == [{"loc": ["body"], "msg": body["errors"][0]["msg"], "type": "too_large"}]
        assert "max_body_bytes=1024" in body["detail"]

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b" " * 256  # JSON whitespace: only the size is wrong

        streamed = await api.post("/v1/runs", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in streamed.request.headers
        assert_problem(streamed, 413, "body_too_large")
        # A body within the cap goes through as before.
        assert (await api.post("/v1/runs", json=TINY)).status_code == 202
        assert (await api.get("/v1/runs")).json()["total"] == 1


async def test_page_size_is_capped_by_the_operator(settings: Settings) -> None:
    async with serve_app(configure(settings, max_page_size=10)) as api:
        body = assert_problem(await api.get("/v1/runs", params={"limit": 11}), 422, "validation_error")
        assert body["errors"][0]["loc"] == ["query", "limit"] and "max_page_size" in body["errors"][0]["msg"]
        assert (await api.get("/v1/runs", params={"limit": 10})).status_code == 200


@pytest.mark.parametrize(
    ("path", "params", "loc"),
    [
        # Filters compare with 64-bit SQL integers: larger values were a 500 (OverflowError) found by fuzzing.
        ("/v1/runs", {"depth": 2**63}, ["query", "depth"]),
        ("/v1/runs", {"offset": 2**63}, ["query", "offset"]),
        ("/v1/runs", {"seed": -(2**63) - 1}, ["query", "seed"]),
        ("/v1/runs/{run_id}/gradients", {"layer": 10**30}, ["query", "layer"]),
        ("/v1/runs/{run_id}/gradients", {"step_to": 10**30}, ["query", "step_to"]),
    ],
)
async def test_out_of_range_parameters_are_422_naming_them(
    api: httpx.AsyncClient, path: str, params: dict[str, Any], loc: list[str]
) -> None:
    run_id = (await api.post("/v1/runs", json=TINY)).json()["id"]
    body = assert_problem(await api.get(path.format(run_id=run_id), params=params), 422, "validation_error")
    assert [e["loc"] for e in body["errors"]] == [loc]


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_app(settings) as client:
        yield client


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"base": {}, "grid": {"depth": [1]}, "colour": "red"}, ["body", "colour"]),
        ({"base": {"colour": "red"}, "grid": {"depth": [1]}}, ["base", "colour"]),
        ({"base": {}, "grid": {"colour": ["red"]}}, ["grid", "colour"]),
        ({"base": {}, "grid": {"depth": list(range(1, 101)), "width": [8, 16, 32]}}, ["grid"]),
    ],
)
async def test_sweep_bodies_refuse_unknown_fields_and_oversized_grids(
    api: httpx.AsyncClient, body: dict[str, Any], loc: list[str]
) -> None:
    response = await api.post("/v1/sweeps", json=body)
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
    assert [e["loc"] for e in response.json()["errors"]] == [loc]
    assert (await api.get("/v1/runs")).json()["total"] == 0


@pytest.mark.parametrize(
    "path",
    [
        "/v1/runs/..",
        "/v1/runs/..%2F..%2Fpyproject.toml",
        "/v1/runs/..%2F..%2Fpyproject.toml/gradients?format=csv",
        "/v1/runs/..%2F..%2Fpyproject.toml/tensorboard",
        "/v1/runs/..%2F..%2Fpyproject.toml/layers",
        "/v1/runs/%22%0d%0aSet-Cookie:x=1/gradients?format=csv",
        "/v1/sweeps/..%2F..%2Fpyproject.toml",
        "/runs/..%2F..%2Fpyproject.toml",
        "/static/..%2F..%2F..%2Fpyproject.toml",
        "/static/../../../pyproject.toml",
        "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml",
    ],
)
async def test_ids_and_file_names_cannot_reach_outside_the_store(api: httpx.AsyncClient, path: str) -> None:
    response = await api.get(path)
    assert response.status_code in (404, 422), (response.status_code, response.text[:200])
    assert "[build-system]" not in response.text and "set-cookie" not in response.headers


# --- tokens -----------------------------------------------------------------------------------------


async def test_without_tokens_everything_is_open(api: httpx.AsyncClient) -> None:
    assert (await api.post("/v1/runs", json=TINY)).status_code == 202
    assert (await api.get("/v1/runs")).status_code == 200
    assert (await api.get("/metrics")).status_code == 200


async def test_api_token_guards_every_write(settings: Settings) -> None:
    async with serve_app(configure(settings, api_token=WRITE)) as api:
        assert_unauthorized(await api.post("/v1/runs", json=TINY), invalid=False)
        assert_unauthorized(await api.post("/v1/runs", json=TINY, headers=bearer("nope")), invalid=True)
        assert_unauthorized(
            await api.post("/v1/runs", json=TINY, headers={"Authorization": f"Basic {WRITE}"}), invalid=False
        )
        # Browser credentials never authorise a write (no cross-site request forgery).
        assert_unauthorized(await api.post("/v1/runs", json=TINY, params={"token": WRITE}), invalid=False)
        api.cookies.set("graddiag_token", cookie_value(WRITE.encode()))
        assert_unauthorized(await api.post("/v1/runs", json=TINY), invalid=False)
        api.cookies.clear()
        assert_unauthorized(await api.post("/v1/sweeps", json={"grid": {"depth": [1]}}), invalid=False)
        # Reads stay open without a read token; nothing was created by the refused writes.
        assert (await api.get("/v1/runs")).json()["total"] == 0

        run_id = (await api.post("/v1/runs", json=TINY, headers=bearer(WRITE))).json()["id"]
        assert_unauthorized(await api.post(f"/v1/runs/{run_id}/cancel"), invalid=False)
        assert_unauthorized(await api.delete(f"/v1/runs/{run_id}"), invalid=False)
        assert (await api.get(f"/v1/runs/{run_id}")).json()["status"] == "queued"
        assert (await api.delete(f"/v1/runs/{run_id}", headers=bearer(WRITE))).status_code == 204


@pytest.mark.parametrize(
    "path",
    ["/v1/runs", "/v1/runs/0123abcd", "/v1/sweeps/0123abcd", "/readyz", "/metrics", "/", "/openapi.json", "/docs"],
)
async def test_read_token_guards_every_read(guarded: httpx.AsyncClient, path: str) -> None:
    assert_unauthorized(await guarded.get(path), invalid=False)
    assert_unauthorized(await guarded.get(path, headers=bearer("nope")), invalid=True)
    for token in (READ, WRITE):  # the API token grants reads too
        assert (await guarded.get(path, headers=bearer(token))).status_code in (200, 404)


async def test_static_files_follow_the_read_token(guarded: httpx.AsyncClient) -> None:
    css = "/static/dashboard.css"
    assert_unauthorized(await guarded.get(css), invalid=False)
    assert (await guarded.get(css, headers=bearer(READ))).status_code == 200


async def test_read_token_does_not_grant_writes_and_healthz_stays_open(guarded: httpx.AsyncClient) -> None:
    assert_unauthorized(await guarded.post("/v1/runs", json=TINY, headers=bearer(READ)), invalid=True)
    assert (await guarded.post("/v1/runs", json=TINY, headers=bearer(WRITE))).status_code == 202
    assert (await guarded.get("/healthz")).status_code == 200


async def test_a_read_token_alone_also_guards_writes(settings: Settings) -> None:
    async with serve_app(configure(settings, read_token=READ)) as api:
        assert_unauthorized(await api.post("/v1/runs", json=TINY), invalid=False)
        assert (await api.post("/v1/runs", json=TINY, headers=bearer(READ))).status_code == 202
        assert_unauthorized(await api.get("/v1/runs"), invalid=False)


async def test_browser_login_sets_a_cookie_that_grants_reads_only(settings: Settings) -> None:
    app = create_app(configure(settings, api_token=WRITE, read_token=READ))
    transport = httpx.ASGITransport(app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://graddiag.test") as browser:
            assert_unauthorized(await browser.get("/login", params={"token": "nope"}), invalid=True)
            login = await browser.get("/login", params={"token": READ})
            assert login.status_code == 303 and login.headers["location"] == "/"
            cookie = login.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and READ not in cookie
            # The browser now sends the cookie: pages, API reads and event streams work, writes do not.
            assert (await browser.get("/")).status_code == 200
            assert (await browser.get("/v1/runs")).status_code == 200
            assert_unauthorized(await browser.post("/v1/runs", json=TINY), invalid=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://graddiag.test") as browser:
            page = await browser.get("/", params={"token": READ})
            assert page.status_code == 200 and "graddiag_token=" in page.headers["set-cookie"]
            assert (await browser.get("/v1/runs")).status_code == 200
        forged = {"graddiag_token": cookie_value(b"guess")}
        async with httpx.AsyncClient(transport=transport, base_url="http://graddiag.test", cookies=forged) as stranger:
            assert_unauthorized(await stranger.get("/v1/runs"), invalid=False)


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = security_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security_module.hmac, "compare_digest", spy)
    tokens = Tokens(api_token=Settings(api_token=WRITE).api_token, read_token=Settings(read_token=READ).read_token)
    # A match on the first token still compares with every other: no early exit to time.
    assert tokens.grants([READ], "read") and len(compared) == 2
    assert not tokens.grants([READ], "write")
    assert not tokens.grants(["x" * 5000], "read")


async def test_client_sends_its_token(settings: Settings) -> None:
    app = create_app(configure(settings, api_token=WRITE))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with AsyncClient("http://graddiag.test", transport=transport, token=WRITE) as gd:
            assert (await gd.submit(TINY))["status"] == "queued"
        async with AsyncClient("http://graddiag.test", transport=transport) as anonymous:
            with pytest.raises(GraddiagError) as refused:
                await anonymous.submit(TINY)
            assert refused.value.status == 401 and refused.value.code == "unauthorized"


async def test_tokens_never_appear_in_responses_logs_or_settings(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    configured = configure(settings, api_token=WRITE, read_token=READ)
    for shown in (repr(configured), str(configured), configured.model_dump_json(), repr(configured.model_dump())):
        assert WRITE not in shown and READ not in shown
    caplog.set_level(logging.DEBUG)
    seen: list[httpx.Response] = []
    async with serve_app(configured, raise_app_exceptions=False) as api:
        run_id = (await api.post("/v1/runs", json=TINY, headers=bearer(WRITE))).json()["id"]
        for token in (WRITE, READ, "wrong"):
            seen += [
                await api.get("/v1/runs", headers=bearer(token)),
                await api.get("/", params={"token": token}),
                await api.get("/login", params={"token": token}),
                await api.post("/v1/runs", json={**TINY, "depth": 0}, headers=bearer(token)),
                await api.post("/v1/runs", content=b"{", headers={**bearer(token), "content-type": "application/json"}),
                await api.get("/v1/runs/0123abcd", headers=bearer(token)),
            ]
        # An internal error is logged with its traceback: the request's credentials must not be in it.
        engine = make_engine(configured.db_url)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE run_records"))
        engine.dispose()
        failed = await api.get(f"/v1/runs/{run_id}/gradients", params={"token": READ}, headers=bearer(WRITE))
        assert failed.status_code == 500
        seen.append(failed)
    for response in seen:
        everything = response.text + str(response.headers)
        assert WRITE not in everything and READ not in everything, (response.request.url, everything[:300])
    # The server's records (httpx's own lines are this test's client logging the URLs it was given).
    server = [r for r in caplog.records if not r.name.startswith("httpx")]
    logged = "\n".join(
        r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "") for r in server
    )
    assert f"unhandled error on GET /v1/runs/{run_id}/gradients" in logged
    assert WRITE not in logged and READ not in logged


# --- CORS -------------------------------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


async def test_cors_is_off_unless_configured(api: httpx.AsyncClient) -> None:
    preflight = await api.options("/v1/runs", headers={"Origin": "http://dash.example", **PREFLIGHT})
    assert "access-control-allow-origin" not in preflight.headers
    response = await api.get("/v1/runs", headers={"Origin": "http://dash.example"})
    assert "access-control-allow-origin" not in response.headers


async def test_cors_allows_only_the_configured_origins(settings: Settings) -> None:
    configured = configure(settings, cors_origins=["http://dash.example"], api_token=WRITE)
    async with serve_app(configured) as api:
        allowed = await api.options("/v1/runs", headers={"Origin": "http://dash.example", **PREFLIGHT})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://dash.example"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        refused = await api.options("/v1/runs", headers={"Origin": "http://evil.example", **PREFLIGHT})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        # Actual requests: the allowed origin may read the answer (a 401 included), no other origin may.
        unauthorized = await api.post("/v1/runs", json=TINY, headers={"Origin": "http://dash.example"})
        assert unauthorized.status_code == 401
        assert unauthorized.headers["access-control-allow-origin"] == "http://dash.example"
        other = await api.get("/v1/runs", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# --- where serve may listen, and what its log may say ------------------------------------------------


@pytest.mark.parametrize(
    ("host", "token", "allow", "refused"),
    [
        ("127.0.0.1", None, False, False),
        ("127.0.0.2", None, False, False),
        ("::1", None, False, False),
        ("localhost", None, False, False),
        ("0.0.0.0", None, False, True),
        ("::", None, False, True),
        ("192.168.1.7", None, False, True),
        ("graddiag.example", None, False, True),
        ("0.0.0.0", WRITE, False, False),
        ("0.0.0.0", None, True, False),
    ],
)
def test_public_bind_needs_a_token_or_an_explicit_override(
    host: str, token: str | None, allow: bool, refused: bool
) -> None:
    settings = Settings(host=host, api_token=token, allow_public_without_token=allow)
    if refused:
        with pytest.raises(InsecureBind, match="--allow-public-without-token"):
            check_bind(settings)
    else:
        check_bind(settings)


def test_serve_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    database = tmp_path / "graddiag.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADDIAG_")}
    command = [sys.executable, "-m", "graddiag.service.cli", "serve", "--host", "0.0.0.0", "--workers", "0"]
    done = subprocess.run(
        [*command, "--db-url", f"sqlite:///{database}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "refusing to listen on '0.0.0.0' with no API token" in done.stderr
    assert not database.exists()  # it stopped before touching anything


@pytest.mark.slow
def test_serve_keeps_tokens_out_of_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADDIAG_API_TOKEN", WRITE)
    monkeypatch.setenv("GRADDIAG_READ_TOKEN", READ)
    server = Server(f"sqlite:///{tmp_path / 'graddiag.db'}", tmp_path / "serve.log", workers=0, cache=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.proc.poll() is None and time.monotonic() < deadline, server.tail()
            try:
                if httpx.get(f"{server.url}/readyz", headers=bearer(READ), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert httpx.get(f"{server.url}/readyz").status_code == 401
        assert httpx.get(f"{server.url}/v1/runs", params={"token": READ}).status_code == 200
        # The app decodes the key, so `to%6Ben` authenticates: the log must redact it all the same.
        assert httpx.get(f"{server.url}/v1/runs?to%6Ben={READ}").status_code == 200
        assert httpx.get(f"{server.url}/", params={"token": "wrong-guess"}).status_code == 401
        created = httpx.post(f"{server.url}/v1/runs", json=TINY, headers=bearer(WRITE))
        assert created.status_code == 202
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
    log = server.log.read_text()
    assert "GET /v1/runs?token=*** HTTP/1.1" in log and "POST /v1/runs HTTP/1.1" in log
    assert "GET /v1/runs?to%6Ben=*** HTTP/1.1" in log
    # Each line intact: redaction once broke uvicorn's formatter and left a traceback in its place.
    assert "Logging error" not in log and "Traceback" not in log
    assert WRITE not in log and READ not in log and "wrong-guess" not in log
