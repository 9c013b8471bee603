"""The dashboard in-process: its pages and assets (all local), and the server-sent event streams."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections.abc import MutableMapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest

from graddiag.models.spec import RECURRENT_ARCHS, Arch, Spec
from graddiag.service.api import create_app, events
from graddiag.service.api.dashboard import PLOTLY_JS
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.report import FindingKind
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine
from graddiag.service.worker.queue import claim_next, complete, heartbeat, progress_record
from tests.support.api import TINY, serve_app

pytestmark = pytest.mark.anyio

SWEEP = {"base": TINY, "grid": {"activation": ["sigmoid", "relu"], "depth": [2, 3]}}


@pytest.fixture
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams re-read the database every 20 ms instead of every second."""
    monkeypatch.setattr(events, "POLL_SECONDS", 0.02)


class Assets(HTMLParser):
    """Every script src and stylesheet/icon href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script" and named.get("src"):
            self.urls.append(str(named["src"]))
        if tag == "link" and named.get("href"):
            self.urls.append(str(named["href"]))


def page_assets(html: str) -> list[str]:
    parser = Assets()
    parser.feed(html)
    return parser.urls


def parse_sse(body: str) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(event name, decoded data) per event, and the comment lines (keep-alives)."""
    found: list[tuple[str, dict[str, Any]]] = []
    comments: list[str] = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").strip())
        if data:
            found.append((name, json.loads("\n".join(data))))
    return found, comments


async def submit(api: httpx.AsyncClient, spec: dict[str, Any]) -> str:
    response = await api.post("/v1/runs", json=spec)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


# --- pages --------------------------------------------------------------------------------------------


async def test_every_page_is_html_with_local_assets_only(api: httpx.AsyncClient) -> None:
    first, second = await submit(api, TINY), await submit(api, {**TINY, "activation": "sigmoid"})
    sweep = (await api.post("/v1/sweeps", json=SWEEP)).json()["id"]
    pages = ["/", f"/runs/{first}", f"/sweeps/{sweep}", f"/compare?run_id={first}&run_id={second}", "/compare"]
    checked: set[str] = set()
    for path in pages:
        response = await api.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["content-type"].startswith("text/html")
        assets = page_assets(response.text)
        assert any(url.endswith(".js") for url in assets), path
        for url in assets:
            # Offline: nothing from another host, no protocol-relative URL either.
            assert url.startswith("/") and not url.startswith("//") and "://" not in url, (path, url)
            if url not in checked:
                asset = await api.get(url)
                assert asset.status_code == 200, url
                checked.add(url)
    # Every page's scripts and the stylesheet come from the installed package.
    assert {"/static/dashboard.css", "/static/js/runs.js", "/static/js/run.js", "/static/js/sweep.js"} <= {
        url.split("?")[0] for url in checked
    }


async def test_pages_name_what_their_scripts_read(api: httpx.AsyncClient) -> None:
    run_id = await submit(api, TINY)
    sweep = (await api.post("/v1/sweeps", json=SWEEP)).json()["id"]
    run_page = (await api.get(f"/runs/{run_id}")).text
    assert f'data-run-id="{run_id}"' in run_page and 'id="status"' in run_page and ">queued<" in run_page
    # The scripts learn which archs are recurrent from the page (models.spec's list, not one of their own).
    assert f'data-recurrent-archs="{" ".join(RECURRENT_ARCHS)}"' in run_page
    sweep_page = (await api.get(f"/sweeps/{sweep}")).text
    assert f'data-sweep-id="{sweep}"' in sweep_page
    # Places for recurrent sweeps' sequence lengths and slopes through time, hidden until a summary has them.
    assert '<div id="sequence-lengths" class="sequence-lengths" hidden>' in sweep_page
    assert '<figure id="figure-time-slope" class="wide" hidden>' in sweep_page
    compare = (await api.get("/compare", params=[("run_id", run_id), ("run_id", run_id)])).text
    assert f'data-run-ids="{run_id},{run_id}"' in compare
    # ... and for recurrent runs' profiles through time and transformers' per-block profiles.
    for figure in ("figure-time", "figure-blocks", "figure-block-out"):
        assert f'<figure id="{figure}"' in compare
    runs_page = (await api.get("/")).text
    # The filters offer exactly the values the API accepts, and the sortable headers are buttons.
    for value in ("sigmoid", "relu", "kaiming_normal", "batch", "vanishing", "running"):
        assert f'<option value="{value}">' in runs_page
    assert '<select name="arch">' in runs_page and '<select name="norm_position">' in runs_page
    for arch in get_args(Arch):
        assert f'<option value="{arch}">' in runs_page
    # Spec columns and the result metrics (decades per layer, held-out accuracy, time) sort.
    assert runs_page.count('aria-sort="') == 12 and runs_page.count('<button type="button">') >= 12
    for column in ("arch", "steps", "lr", "decades_per_layer", "eval_accuracy", "total_s"):
        assert f'data-sort="{column}"' in runs_page
    assert '<input name="name"' in runs_page and '<input name="tag"' in runs_page
    sweeps_page = (await api.get("/sweeps")).text
    assert 'id="sweeps"' in sweeps_page and "/static/js/sweeps.js" in sweeps_page


async def test_pages_offer_finding_filters_and_places_for_findings(api: httpx.AsyncClient) -> None:
    run_id = await submit(api, TINY)
    sweep = (await api.post("/v1/sweeps", json=SWEEP)).json()["id"]
    runs_page = (await api.get("/")).text
    sweep_page = (await api.get(f"/sweeps/{sweep}")).text
    # Both filters offer exactly the kinds the API accepts for `?finding=`.
    assert '<select name="finding">' in runs_page and 'id="finding-filter"' in sweep_page
    for kind in get_args(FindingKind):
        assert f'<option value="{kind}">' in runs_page and f'<option value="{kind}">' in sweep_page
    assert ">Findings</th>" in runs_page
    run_page = (await api.get(f"/runs/{run_id}")).text
    assert 'id="findings"' in run_page and 'id="chart-forward"' in run_page
    script = (await api.get("/static/js/run.js")).text
    assert "act_norm" in script and "renderFindings" in script


async def test_run_pages_state_what_each_architecture_adds(api: httpx.AsyncClient) -> None:
    """A run page lists the spec fields of its architecture (an LSTM's forget bias, a transformer's heads, norm
    position, MLP ratio and pooling) and no others, and has the places its script draws the gradient through
    time and the per-block charts in (hidden until a report has them)."""
    lstm = await submit(api, {**TINY, "arch": "lstm", "forget_bias": "chrono"})
    transformer = await submit(api, {**TINY, "arch": "transformer", "heads": 2, "norm_position": "post"})
    mlp = await submit(api, TINY)
    field = re.compile(r'<div data-key="(\w+)"><dt>[^<]*</dt><dd>([^<]*)</dd>')
    keys = {run_id: field.findall((await api.get(f"/runs/{run_id}")).text) for run_id in (lstm, transformer, mlp)}
    assert ("forget_bias", "chrono") in keys[lstm] and ("arch", "lstm") in keys[lstm]
    assert {("heads", "2"), ("norm_position", "post"), ("mlp_ratio", "4"), ("pooling", "cls")} <= set(keys[transformer])
    extra = {"forget_bias", "heads", "norm_position", "mlp_ratio", "pooling"}
    assert not extra & {key for key, _ in keys[mlp]} and not {"heads", "pooling"} & {key for key, _ in keys[lstm]}
    page = (await api.get(f"/runs/{lstm}")).text
    for element in ("through-time", "chart-time", "chart-time-heatmap", "chart-gates", "blocks", "chart-blocks"):
        assert f'id="{element}"' in page
    assert '<section id="through-time" class="through-time" aria-labelledby="through-time-title" hidden>' in page


async def test_plotly_js_is_served_from_the_installed_package(api: httpx.AsyncClient) -> None:
    response = await api.get("/static/vendor/plotly.min.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.content == PLOTLY_JS.read_bytes() and b"plotly.js" in response.content[:200]
    run_id = await submit(api, TINY)
    assert "/static/vendor/plotly.min.js" in (await api.get(f"/runs/{run_id}")).text


async def test_unknown_ids_get_html_404_pages(api: httpx.AsyncClient) -> None:
    run_id = await submit(api, TINY)
    for path in ("/runs/nope", "/sweeps/nope", f"/compare?run_id={run_id}&run_id=nope"):
        response = await api.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("text/html")
        assert "Not found" in response.text and "nope" in response.text
    for path, code in (("/v1/runs/nope/events", "run_not_found"), ("/v1/sweeps/nope/events", "sweep_not_found")):
        response = await api.get(path)
        assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == code


async def test_pages_honour_the_proxy_prefix(settings: Settings) -> None:
    async with serve_app(settings, root_path="/graddiag") as client:
        html = (await client.get("/")).text
    assert 'data-base="/graddiag"' in html
    assert all(url.startswith("/graddiag/static/") for url in page_assets(html))


# --- server-sent events -------------------------------------------------------------------------------


async def test_run_events_follow_a_real_run_to_its_verdict(
    api: httpx.AsyncClient,
    worker: None,
    fast_polling: None,
) -> None:
    run_id = await submit(api, TINY)
    response = await asyncio.wait_for(api.get(f"/v1/runs/{run_id}/events"), 60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    found, _ = parse_sse(response.text)
    names = [name for name, _ in found]
    assert names[0] == "progress" and names[-1] == "verdict" and names.count("verdict") == 1
    statuses = [data["status"] for name, data in found if name == "progress"]
    order = ["queued", "running", "succeeded"]
    assert statuses == sorted(statuses, key=order.index) and statuses[-1] == "succeeded"
    run = (await api.get(f"/v1/runs/{run_id}")).json()
    verdict = found[-1][1]
    assert verdict == {
        "id": run_id,
        "status": "succeeded",
        "verdict": run["verdict"],
        "error": None,
        "finished_at": verdict["finished_at"],
    }
    assert run["verdict"] in ("vanishing", "exploding", "healthy")


def _drive_run(settings: Settings, started: threading.Event) -> None:
    """Play a worker: claim the run, report two steps (with a lease renewal between that changes
    nothing a client sees), then store a real report."""
    report = run_probe(Spec.model_validate(TINY), eval_samples=10)
    engine = make_engine(settings.db_url)
    try:
        started.wait(10)
        time.sleep(0.1)
        claim = claim_next(engine, "test-worker", lease_seconds=60)
        assert claim is not None
        for beat in (progress_record(1, 5, 2.5, "healthy"), None, progress_record(2, 5, 2.25, "vanishing")):
            time.sleep(0.15)
            assert heartbeat(engine, claim, 60, beat)
        time.sleep(0.15)
        assert complete(engine, claim, report)
    finally:
        engine.dispose()


async def test_run_events_emit_each_progress_once_with_keep_alives(
    api: httpx.AsyncClient,
    settings: Settings,
    fast_polling: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "PING_SECONDS", 0.05)
    run_id = await submit(api, TINY)
    started = threading.Event()
    driver = threading.Thread(target=_drive_run, args=(settings, started), daemon=True)
    driver.start()
    stream = asyncio.create_task(api.get(f"/v1/runs/{run_id}/events"))
    started.set()
    response = await asyncio.wait_for(stream, 60)
    driver.join(30)
    found, comments = parse_sse(response.text)
    progress = [data for name, data in found if name == "progress"]
    assert progress[0]["status"] == "queued" and progress[0]["progress"] is None
    running = [p["progress"] for p in progress if p["status"] == "running" and p["progress"]]
    # One event per change: the lease renewal in between sent nothing.
    assert [(p["step"], p["steps"], p["loss"], p["label_so_far"]) for p in running] == [
        (1, 5, 2.5, "healthy"),
        (2, 5, 2.25, "vanishing"),
    ]
    assert all(p["attempt"] == 1 for p in progress[1:])
    assert found[-1][0] == "verdict" and found[-1][1]["status"] == "succeeded"
    assert comments and all(c.startswith(": ping") for c in comments)


async def test_run_events_stop_when_the_client_disconnects(
    settings: Settings,
    fast_polling: None,
) -> None:
    """Call the ASGI app directly: receive() reports a disconnect once the first event was sent,
    while the run stays queued (no worker), so only the disconnect can end the stream."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with serve_app(settings) as client:
            run_id = await submit(client, TINY)
        gone = asyncio.Event()
        sent: list[MutableMapping[str, Any]] = []
        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)
            if b"event: progress" in message.get("body", b""):
                gone.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"/v1/runs/{run_id}/events",
            "raw_path": f"/v1/runs/{run_id}/events".encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"graddiag.test")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        await asyncio.wait_for(app(scope, receive, send), 10)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = b"".join(m.get("body", b"") for m in sent)
    assert bodies.count(b"event: progress") == 1 and b"event: verdict" not in bodies


async def test_sweep_events_report_each_finished_run_then_done(
    api: httpx.AsyncClient,
    worker: None,
    fast_polling: None,
) -> None:
    response = await api.post("/v1/sweeps", json=SWEEP)
    sweep_id = response.json()["id"]
    stream = await asyncio.wait_for(api.get(f"/v1/sweeps/{sweep_id}/events"), 120)
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    found, _ = parse_sse(stream.text)
    names = [name for name, _ in found]
    assert names[0] == "progress" and names[-1] == "done" and names.count("done") == 1
    finished = [data for name, data in found if name == "run"]
    status = (await api.get(f"/v1/sweeps/{sweep_id}")).json()
    assert sorted((r["run_id"], r["verdict"]) for r in finished) == sorted(
        (r["run_id"], r["verdict"]) for r in status["runs"]
    )
    assert all(r["status"] == "succeeded" and r["verdict"] for r in finished)
    done = found[-1][1]
    assert done["done"] and done["total"] == 4 and done["counts"]["succeeded"] == 4
    # Counts only move forward, and each change was sent once.
    progress = [data for name, data in found if name == "progress"]
    succeeded = [data["counts"]["succeeded"] for data in progress]
    assert succeeded == sorted(succeeded) and all(a != b for a, b in itertools.pairwise(progress))


def test_dashboard_files_are_package_data() -> None:
    """pyproject ships every template and static file the pages use (a wheel without them serves 500s)."""
    import tomllib

    web = Path(__file__).resolve().parents[1] / "service" / "web"
    patterns = tomllib.loads((web.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "graddiag.service"
    ]
    shipped = {path for pattern in patterns for path in (web.parent).glob(pattern)}
    assert {path for path in web.rglob("*") if path.is_file()} <= shipped
