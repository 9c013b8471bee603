"""Recurrent nets and transformers in a real browser (tests/support/browser.py): the run page's gradient
through time and its per-block charts, the runs table's arch filter and column, and /compare's profiles
through time, drawn from reports stored as a worker stores them (tests/support/reports.py) so every value
the charts hold is known.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from graddiag.models.spec import Spec
from graddiag.service.client import Client
from graddiag.service.engine.report import TimeTheory
from graddiag.service.store.db import make_engine
from tests.support.browser import Tab, browser, chart, client, same, server  # noqa: F401 - fixtures
from tests.support.reports import plain_report, recurrent_report, store_report, transformer_report
from tests.support.server import Server

pytestmark = pytest.mark.slow

SMALL: dict[str, Any] = {"dataset": "synthetic", "width": 16, "steps": 5, "record_every": 2}
# The tiny LSTM the service trains for real (a few seconds on one thread).
# The stored LSTM's mean-field prediction through time (decades per step toward t = 0).
PREDICTED = -0.05
LSTM: dict[str, Any] = {"arch": "lstm", "dataset": "synthetic", "width": 16, "depth": 2, "steps": 3, "batch_size": 8}


@pytest.fixture(scope="module")
def stored(server: Server, client: Client) -> dict[str, Any]:  # noqa: F811 - the imported fixtures
    """Succeeded runs holding known reports: an lstm (with a mean-field prediction through time) and a relu rnn
    of depth 2, a post-LN transformer of depth 3, a pre-LN one of depth 2 and an mlp, each as the API serves it,
    by arch (the pre-LN transformer as "pre-ln")."""
    specs = {
        "lstm": Spec(**SMALL, arch="lstm", depth=2, forget_bias=1.0),
        "rnn": Spec(**SMALL, arch="rnn", depth=2, activation="relu"),
        "transformer": Spec(**SMALL, arch="transformer", depth=3, heads=2, norm_position="post"),
        "pre-ln": Spec(**SMALL, arch="transformer", depth=2, heads=2, pooling="mean"),
        "mlp": Spec(**SMALL, depth=3),
    }
    lstm = recurrent_report(specs["lstm"])
    top = max(layer.index for layer in lstm.layers if layer.kind == "recurrent")
    time_theory = TimeTheory(
        applicable=True,
        reason="The cell path's forget gates.",
        model="lstm_cell",
        layer=top,
        predicted_decades_per_step=PREDICTED,
    )
    theory = lstm.verdict.theory.model_copy(update={"time": time_theory})
    lstm = lstm.model_copy(update={"verdict": lstm.verdict.model_copy(update={"theory": theory})})
    engine = make_engine(server.db_url)
    try:
        ids = {
            "lstm": store_report(engine, lstm),
            "rnn": store_report(engine, recurrent_report(specs["rnn"])),
            "transformer": store_report(engine, transformer_report(specs["transformer"])),
            "pre-ln": store_report(engine, transformer_report(specs["pre-ln"])),
            "mlp": store_report(engine, plain_report(specs["mlp"])),
        }
    finally:
        engine.dispose()
    return {arch: client.get(run_id) for arch, run_id in ids.items()}


@pytest.fixture
def tab(browser: Any, stored: dict[str, Any]) -> Iterator[Tab]:  # noqa: F811 - the imported fixture
    opened = Tab(browser)
    yield opened
    opened.page.close()


def through_time(report: dict[str, Any], step: int, layer: int, field: str) -> list[float | None]:
    """One layer's values at one recorded step, in t order, as the API serves them."""
    rows = sorted(
        (r for r in report["time_records"] if r["step"] == step and r["layer"] == layer), key=lambda r: r["t"]
    )
    return [r[field] for r in rows]


def test_recurrent_run_page_draws_the_gradient_through_time(tab: Tab, stored: dict[str, Any]) -> None:
    run = stored["lstm"]
    report = run["report"]
    recurrent = [layer["index"] for layer in report["layers"] if layer["kind"] == "recurrent"]
    steps = sorted({r["step"] for r in report["time_records"]})
    assert len(recurrent) == 2 and len(steps) >= 2
    page = tab.open(f"/runs/{run['id']}")
    page.wait_for_selector("#verdict h2")
    assert page.is_visible("#through-time") and not page.is_visible("#blocks")
    assert page.inner_text("dl.spec [data-key=forget_bias] dd") == "1.0"

    # By default the first and the last recorded step of every recurrent layer: solid, then dashed.
    traces = chart(page, "chart-time")
    assert len(traces) == 2 * len(recurrent)
    for k, layer in enumerate(recurrent):
        first, last = traces[2 * k], traces[2 * k + 1]
        assert first["x"] == list(range(32))
        assert same(first["y"], through_time(report, steps[0], layer, "grad_norm"))
        assert same(last["y"], through_time(report, steps[-1], layer, "grad_norm"))
    assert page.evaluate("document.getElementById('chart-time').layout.yaxis.type") == "log"
    # The LSTM's cell-state gradient instead of the hidden state's, with the mean-field line of the cell path
    # (the verdict's theory predicts ‖∂L/∂c_t‖, so it is drawn only beside that): through the top layer's value at
    # the last t at initialisation, falling the predicted decades per step toward t = 0.
    page.select_option("#time-quantity", "cell_grad_norm")
    page.wait_for_function(f"document.getElementById('chart-time').data.length === {2 * len(recurrent) + 1}")
    theory = chart(page, "chart-time")[-1]
    assert theory["name"] == "mean-field prediction (-0.05 decades/step)"
    assert theory["y"][-1] == pytest.approx(through_time(report, steps[0], recurrent[-1], "cell_grad_norm")[-1])
    assert math.log10(theory["y"][0] / theory["y"][-1]) / 31 == pytest.approx(PREDICTED)
    # One chosen step after the first: one line per layer, no prediction (it is of the initialisation).
    page.select_option("#time-step", str(steps[1]))
    page.wait_for_function("document.getElementById('chart-time').data.length === 2")
    traces = chart(page, "chart-time")
    for trace, layer in zip(traces, recurrent, strict=True):
        assert same(trace["y"], through_time(report, steps[1], layer, "cell_grad_norm"))
    assert "c_t" in page.evaluate("document.getElementById('chart-time').layout.yaxis.title.text")

    # The heatmap: t × recorded step for the chosen layer (the top one first), log10 of the chosen quantity.
    heatmap = chart(page, "chart-time-heatmap")[0]
    assert heatmap["x"] == list(range(32)) and heatmap["y"] == steps
    top = through_time(report, steps[-1], recurrent[-1], "cell_grad_norm")
    assert heatmap["z"][-1] == pytest.approx([math.log10(v) for v in top if v is not None])
    # Gates and saturation over t: one line each per layer at the chosen step.
    gates = chart(page, "chart-gates")
    assert len(gates) == 2 * len(recurrent)
    assert gates[0]["y"] == pytest.approx(through_time(report, steps[1], recurrent[0], "gate_mean"))
    assert gates[1]["y"] == pytest.approx(through_time(report, steps[1], recurrent[0], "saturation_frac"))
    # The per-layer charts group each stacked layer's input projection with its recurrent matrix.
    assert page.evaluate("document.getElementById('chart-profile').layout.xaxis.ticktext").count("lstm1") == 1
    assert not tab.errors


def test_relu_rnn_and_mlp_pages_show_what_they_have(tab: Tab, stored: dict[str, Any]) -> None:
    # A relu rnn: no cell state, no gates, no saturation (relu does not saturate): no gates chart, no choice.
    page = tab.open(f"/runs/{stored['rnn']['id']}")
    page.wait_for_selector("#verdict h2")
    assert len(chart(page, "chart-time")) == 4
    assert not page.is_visible("#time-quantity-control") and not page.is_visible("#figure-gates")
    # An mlp has neither charts through time nor blocks, and its page draws as before.
    page = tab.open(f"/runs/{stored['mlp']['id']}")
    page.wait_for_selector("#verdict h2")
    assert len(chart(page, "chart-profile")) == 2
    assert not page.is_visible("#through-time") and not page.is_visible("#blocks")
    assert not tab.errors


def test_transformer_run_page_reads_per_block(tab: Tab, stored: dict[str, Any]) -> None:
    run = stored["transformer"]
    report = run["report"]
    page = tab.open(f"/runs/{run['id']}")
    page.wait_for_selector("#verdict h2")
    assert page.is_visible("#blocks") and not page.is_visible("#through-time")
    assert page.inner_text("dl.spec [data-key=norm_position] dd") == "post"
    names = {layer["name"]: layer["index"] for layer in report["layers"]}
    steps = sorted({r["step"] for r in report["records"]})
    value = {(r["step"], r["layer"]): r for r in report["records"]}

    def per_block(suffix: str, step: int, field: str) -> list[float | None]:
        return [value[(step, names[f"block{i}.{suffix}"])][field] for i in (1, 2, 3)]

    weights = chart(page, "chart-blocks")
    assert [t["x"] for t in weights] == [[1, 2, 3]] * 4
    assert same(weights[0]["y"], per_block("attn.out", steps[0], "grad_norm"))
    assert same(weights[1]["y"], per_block("attn.out", steps[-1], "grad_norm"))
    assert same(weights[2]["y"], per_block("mlp.fc2", steps[0], "grad_norm"))
    assert same(weights[3]["y"], per_block("mlp.fc2", steps[-1], "grad_norm"))
    # Post-LN: a block's output is its second norm's output.
    out = chart(page, "chart-block-out")
    assert same(out[0]["y"], per_block("norm2", steps[0], "act_grad_norm"))
    assert same(out[1]["y"], per_block("norm2", steps[-1], "act_grad_norm"))
    assert "norm2" in page.inner_text("#caption-block-out")
    # The per-layer charts are labelled by block and shade every other block.
    ticks = page.evaluate("document.getElementById('chart-profile').layout.xaxis.ticktext")
    assert [t for t in ticks if t.startswith("block")] == ["block1", "block2", "block3"]
    assert len(page.evaluate("document.getElementById('chart-profile').layout.shapes")) == 2
    assert not tab.errors


def test_runs_table_filters_by_arch(tab: Tab, stored: dict[str, Any]) -> None:
    page = tab.open("/")
    page.wait_for_function("document.querySelectorAll('#runs tbody tr').length >= 4")
    cell = lambda arch, column: page.inner_text(f"#runs tr[data-id='{stored[arch]['id']}'] td.{column}")  # noqa: E731
    assert cell("lstm", "col-arch") == "lstm" and "forget bias 1" in cell("lstm", "col-setup")
    assert cell("transformer", "col-setup") == "default · 2 heads · post-LN · cls pooling"
    assert cell("mlp", "col-arch") == "mlp"
    assert cell("pre-ln", "col-setup") == "default · 2 heads · pre-LN · mean pooling"
    page.select_option("select[name=arch]", "transformer")
    page.wait_for_function("document.querySelectorAll('#runs tbody tr').length === 2")
    shown = sorted(row.get_attribute("data-id") for row in page.locator("#runs tbody tr").all())
    assert shown == sorted([stored["transformer"]["id"], stored["pre-ln"]["id"]])
    assert "arch=transformer" in page.url
    page.click("button[type=reset]")
    page.wait_for_function("document.querySelectorAll('#runs tbody tr').length >= 4")
    page.select_option("select[name=norm_position]", "post")
    page.wait_for_function("document.querySelectorAll('#runs tbody tr').length === 1")
    assert page.locator("#runs tbody tr").get_attribute("data-id") == stored["transformer"]["id"]
    assert not tab.errors


def test_compare_shows_two_recurrent_runs_through_time(tab: Tab, stored: dict[str, Any]) -> None:
    ids = [stored["lstm"]["id"], stored["rnn"]["id"], stored["mlp"]["id"]]
    page = tab.open(f"/compare?{'&'.join(f'run_id={i}' for i in ids)}")
    page.wait_for_selector("#compared tbody tr")
    assert page.is_visible("#figure-time")
    traces = chart(page, "chart-time")
    # Each recurrent run's top layer at its first and last recorded step; the mlp has none.
    assert len(traces) == 4
    for k, arch in enumerate(("lstm", "rnn")):
        report = stored[arch]["report"]
        top = max(layer["index"] for layer in report["layers"] if layer["kind"] == "recurrent")
        steps = sorted({r["step"] for r in report["time_records"]})
        assert same(traces[2 * k]["y"], through_time(report, steps[0], top, "grad_norm"))
        assert same(traces[2 * k + 1]["y"], through_time(report, steps[-1], top, "grad_norm"))
        assert traces[2 * k]["name"].startswith(stored[arch]["id"][:8])
    assert not tab.errors


@pytest.fixture(scope="module")
def real_sweep(client: Client) -> dict[str, Any]:  # noqa: F811 - the imported fixture
    """A real sweep of rnn and lstm at depths 1 and 2 (each the tiny LSTM spec but for arch and depth), finished:
    its id, its summary and the lstm run of depth 2 in full."""
    created = client.sweep({**LSTM, "arch": "rnn"}, {"arch": ["rnn", "lstm"], "depth": [1, 2]})
    status = client.wait_sweep(created["id"], timeout=180, poll=0.2)
    assert status["counts"]["succeeded"] == 4, status
    (lstm,) = [r["run_id"] for r in status["runs"] if r["grid"] == {"arch": "lstm", "depth": 2}]
    return {"id": created["id"], "summary": client.sweep_summary(created["id"]), "lstm": client.get(lstm)}


def test_a_real_lstm_run_page_draws_its_time_profile(tab: Tab, real_sweep: dict[str, Any]) -> None:
    """A tiny LSTM trained by the service's worker: its page draws one line through time per recurrent layer
    at its first and its last recorded step, with the values the API serves."""
    run = real_sweep["lstm"]
    assert {key: run["spec"][key] for key in LSTM} == LSTM
    report = run["report"]
    layers = [layer["index"] for layer in report["layers"] if layer["kind"] == "recurrent"]
    steps = sorted({r["step"] for r in report["time_records"]})
    assert len(layers) == 2 and len(steps) == 2
    page = tab.open(f"/runs/{run['id']}")
    page.wait_for_selector("#verdict h2")
    traces = chart(page, "chart-time")
    assert len(traces) == len(layers) * len(steps)
    for k, layer in enumerate(layers):
        assert traces[2 * k]["x"] == list(range(32))
        assert same(traces[2 * k]["y"], through_time(report, steps[0], layer, "grad_norm"))
        assert same(traces[2 * k + 1]["y"], through_time(report, steps[-1], layer, "grad_norm"))
    page.locator("#through-time").scroll_into_view_if_needed()
    tab.screenshot("lstm-run")
    assert not tab.errors


def test_a_sweep_of_recurrent_nets_reads_through_time(tab: Tab, real_sweep: dict[str, Any]) -> None:
    """The real sweep's page: each matrix cell carries its run's slope through time and critical sequence length,
    the page lists each architecture's shortest one and draws the slopes by depth."""
    summary = real_sweep["summary"]
    page = tab.open(f"/sweeps/{real_sweep['id']}")
    page.wait_for_selector("#matrix tbody tr")
    for config in summary["configs"]:
        cells = page.locator(f"#matrix tbody tr[data-config='arch={config['config']['arch']}'] td.cell")
        slopes = [cells.nth(i).locator(".seq").get_attribute("data-slope") for i in range(cells.count())]
        assert [float(v) for v in slopes] == config["time_decades_per_step"]
    listed = {item.get_attribute("data-arch"): item.inner_text() for item in page.locator("#sequence-lengths li").all()}
    assert sorted(listed) == ["lstm", "rnn"]
    for item in summary["sequence_lengths"]:
        assert (item["critical_sequence_length"] is None) == ("none" in listed[item["arch"]])
    traces = {t["name"]: t for t in chart(page, "chart-time-slope")}
    for config in summary["configs"]:
        trace = traces[f"arch={config['config']['arch']}"]
        assert trace["x"] == [1, 2] and trace["y"] == pytest.approx(config["time_decades_per_step"])
    assert not tab.errors


def test_compare_shows_pre_and_post_ln_transformers_per_block(tab: Tab, stored: dict[str, Any]) -> None:
    post, pre = stored["transformer"], stored["pre-ln"]
    page = tab.open(f"/compare?run_id={post['id']}&run_id={pre['id']}")
    page.wait_for_selector("#compared tbody tr")
    assert page.is_visible("#figure-blocks") and not page.is_visible("#figure-time")

    def per_block(run: dict[str, Any], part: str, field: str, step: int) -> list[float | None]:
        names = {layer["name"]: layer["index"] for layer in run["report"]["layers"]}
        value = {r["layer"]: r[field] for r in run["report"]["records"] if r["step"] == step}
        blocks = run["spec"]["depth"]
        return [value[names[f"block{i}.{part}"]] for i in range(1, blocks + 1)]

    weights, outputs = chart(page, "chart-blocks"), chart(page, "chart-block-out")
    assert len(weights) == len(outputs) == 4  # init and end of each run
    # Post-LN blocks end at norm2, pre-LN blocks at mlp.fc2.
    for k, (run, output) in enumerate(((post, "norm2"), (pre, "mlp.fc2"))):
        last = max(r["step"] for r in run["report"]["records"])
        assert weights[2 * k]["x"] == list(range(1, run["spec"]["depth"] + 1))
        assert same(weights[2 * k]["y"], per_block(run, "mlp.fc2", "grad_norm", 0))
        assert same(weights[2 * k + 1]["y"], per_block(run, "mlp.fc2", "grad_norm", last))
        assert same(outputs[2 * k]["y"], per_block(run, output, "act_grad_norm", 0))
    # Aligned at the output: each run's last block is 0.
    page.select_option("#align", "output")
    page.wait_for_function("location.search.includes('align=output')")
    page.wait_for_selector("#compared tbody tr")
    assert [t["x"][-1] for t in chart(page, "chart-blocks")] == [0, 0, 0, 0]
    assert not tab.errors
