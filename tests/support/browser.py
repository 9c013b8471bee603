"""The dashboard in a real browser, shared by the tests/test_browser*.py modules: Debian's headless Chromium
driven by Playwright against a live `graddiag serve` with one worker.

Playwright only drives the system browser (`executable_path`); it never downloads one. Under CI a missing
Chromium or Playwright fails these tests (`bash .ci/chromium.sh` installs both); elsewhere they are skipped.
Screenshots (`Tab.screenshot`) replace the README's images under docs/screenshots/ with GRADDIAG_SCREENSHOTS=1,
otherwise they go to a temporary directory so a test run leaves the work tree clean.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graddiag.service.client import Client
from tests.support import REPO
from tests.support.cifar import write_batches_py
from tests.support.server import Server

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOTS = (
    REPO / "docs" / "screenshots"
    if os.environ.get("GRADDIAG_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "graddiag-screenshots"
)
# `graddiag serve` as a user starts it; port, database and worker count come from the environment.
CLI_SERVE = "import sys; from graddiag.service.cli import main; sys.exit(main(['serve']))"

WAIT_MS = 30_000


def require_browser() -> None:
    problems = []
    if not CHROMIUM.exists():
        problems.append(f"{CHROMIUM} is missing (Debian packages chromium and chromium-driver)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the Python package playwright is missing")
    if problems:
        message = "; ".join(problems) + ": run `bash .ci/chromium.sh`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_browser()
    tmp = tmp_path_factory.mktemp("browser")
    # A (fake) CIFAR-10 copy where serve looks: the pages show no "data missing" notice (the runs here are
    # synthetic, and tests/test_download.py covers the notice).
    write_batches_py(tmp / "cache" / "datasets" / "cifar10", per_batch=2)
    srv = Server(f"sqlite:///{tmp / 'graddiag.db'}", tmp / "server.log", workers=1, cache=tmp / "cache", code=CLI_SERVE)
    try:
        srv.wait_ready()
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, timeout=30) as gd:
        yield gd


@pytest.fixture(scope="module")
def browser(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport=VIEWPORT,
            base_url=server.url,
        )
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            context.close()


class Tab:
    """A page that records console errors and uncaught exceptions."""

    def __init__(self, context: Any) -> None:
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def open(self, path: str, *, idle: bool = True) -> Any:
        """Load `path`; with `idle`, wait until the network is quiet (not for a page following a live run:
        its event stream stays open, so the network never is)."""
        response = self.page.goto(path)
        assert response is not None and response.status == 200, path
        self.page.wait_for_load_state("networkidle" if idle else "load")
        return self.page

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.wait_for_timeout(300)  # let plotly finish its transitions
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def chart(page: Any, element_id: str) -> list[dict[str, Any]]:
    """The traces plotly holds for a chart div (x, y, z, name of each)."""
    page.wait_for_function(f"document.getElementById('{element_id}').data !== undefined")
    traces: list[dict[str, Any]] = page.evaluate(
        f"document.getElementById('{element_id}').data.map(t => ({{name: t.name, x: t.x, y: t.y, z: t.z}}))"
    )
    return traces


def at_step(report: dict[str, Any], step: int, field: str) -> list[float | None]:
    by_layer = {r["layer"]: r[field] for r in report["records"] if r["step"] == step}
    return [by_layer.get(layer["index"]) for layer in report["layers"]]


def same(drawn: list[float | None], expected: list[float | None]) -> bool:
    """Chart values against the API's: equal where positive (log axes leave gaps elsewhere)."""
    if len(drawn) != len(expected):
        return False
    return all(
        (d is None) if (e is None or e <= 0) else (d is not None and math.isclose(d, e, rel_tol=1e-9))
        for d, e in zip(drawn, expected, strict=True)
    )
