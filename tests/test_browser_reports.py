"""An uploaded report of the user's own model in a real browser: the runs table, its run page and /compare
beside a probe run (tests/support/browser.py: headless Chromium through Playwright).

Screenshots are written only with GRADDIAG_SCREENSHOTS=1, into docs/screenshots/ (external-run.png,
compare-external.png); otherwise none is taken.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import graddiag
from graddiag.service.client import Client
from tests.support.browser import Tab, browser, chart, client, same, server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
ZOO: dict[str, Any] = {"dataset": "synthetic", "depth": 4, "width": 16, "batch_size": 16, "steps": 6, "record_every": 2}


def _screenshot(tab: Tab, name: str) -> None:
    if os.environ.get("GRADDIAG_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        tab.page.wait_for_timeout(300)  # let plotly finish its transitions
        tab.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


class SmallCNN(nn.Module):
    """A model graddiag did not build: two convs with a shortcut conv beside them, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.shortcut = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.block(h) + self.shortcut(h))
        return self.head(h.mean((2, 3)))


@pytest.fixture(scope="module")
def runs(client: Client) -> dict[str, Any]:  # noqa: F811 - the imported fixture
    """A finished probe run and an uploaded diagnosis of SmallCNN, both as the API serves them."""
    zoo = client.run(ZOO, timeout=120)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(2)]
    report = graddiag.diagnose(SmallCNN(), batches, steps=6, record_every=2)
    uploaded = client.upload(report, name="my-cnn", tags=["browser"])
    return {"zoo": zoo, "external": client.get(uploaded["id"])}


@pytest.fixture
def tab(browser: Any, runs: dict[str, Any]) -> Iterator[Tab]:  # noqa: F811 - the imported fixture
    opened = Tab(browser)
    yield opened
    opened.page.close()


def test_uploaded_report_in_the_runs_table_and_its_page(tab: Tab, runs: dict[str, Any]) -> None:
    external = runs["external"]
    page = tab.open("/")
    page.wait_for_selector(f"#runs tbody tr[data-id='{external['id']}']")
    row = page.locator(f"#runs tbody tr[data-id='{external['id']}']")
    assert row.get_attribute("data-source") == "external"
    assert "external" in row.inner_text() and "my-cnn" in row.inner_text() and "SmallCNN" in row.inner_text()
    assert page.locator(f"#runs tbody tr[data-id='{runs['zoo']['id']}']").get_attribute("data-source") == "probe"

    page = tab.open(f"/runs/{external['id']}")
    assert page.inner_text("#run-name") == "my-cnn"
    assert "SmallCNN" in page.inner_text("dl.spec")
    traces = chart(page, "chart-profile")
    report = external["report"]
    init = [r["grad_norm"] for r in report["records"] if r["step"] == 0]
    assert any(same(trace["y"], init) for trace in traces), traces
    page.wait_for_selector("#verdict :text-matches('healthy|vanishing|exploding', 'i')")
    _screenshot(tab, "external-run")
    assert not tab.errors


def test_compare_shows_the_uploaded_report_beside_a_probe_run(tab: Tab, runs: dict[str, Any], client: Client) -> None:  # noqa: F811
    ids = [runs["zoo"]["id"], runs["external"]["id"]]
    page = tab.open(f"/compare?run_id={ids[0]}&run_id={ids[1]}")
    page.wait_for_selector("#compared tbody tr")
    assert [row.get_attribute("data-id") for row in page.locator("#compared tbody tr").all()] == ids
    assert "SmallCNN" in page.locator("#compared tbody tr").nth(1).inner_text()
    expected = client.compare(*ids)["runs"]
    traces = chart(page, "chart-profile")
    assert len(traces) == 4
    for i, run in enumerate(expected):
        assert same(traces[2 * i]["y"], [(layer["init"] or {}).get("grad_norm") for layer in run["layers"]])
    assert "my-cnn" in traces[2]["name"]
    # The spec-differences table (every field "—" for the external run) is long: show the profiles.
    page.locator("#chart-profile").scroll_into_view_if_needed()
    _screenshot(tab, "compare-external")
    assert not tab.errors
