"""The docs' examples work: Grafana's SQL and the pandas script run against a store filled by real runs,
and the API guide names exactly the routes and metrics the server has."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from graddiag.service.api import create_app
from graddiag.service.api.runs import records_csv
from graddiag.service.engine.report import FindingKind
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine, make_sessionmaker, upgrade
from graddiag.service.store.runs import gradient_table, layer_rows, load_report
from graddiag.service.store.sweeps import create_sweep
from graddiag.service.worker.worker import run_worker

# Shared fixtures (imported so pytest finds them here too).
from tests.support.api import TINY, serve_app

DOCS = Path(__file__).resolve().parents[1] / "docs"
ACTIVATIONS = ["sigmoid", "relu"]
DEPTHS = [3, 5]
# The run id the docs use as an example; the tests put a real one in its place.
EXAMPLE_RUN_ID = "0f197c4548084671b4d1621521759497"


@dataclass(frozen=True)
class Store:
    path: Path
    run_id: str  # relu, depth 5: the run the examples look at


def code_blocks(doc: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / doc).read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A migrated store with a succeeded 2 × 2 sweep (activation × depth), trained by a real worker."""
    root = tmp_path_factory.mktemp("docs-store")
    config = Settings(db_url=f"sqlite:///{root / 'graddiag.db'}", cache_dir=root / "cache", eval_samples=10)
    upgrade(config.db_url)
    engine = make_engine(config.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            sweep = create_sweep(
                session, TINY, {"activation": ACTIVATIONS, "depth": DEPTHS}, caps=config.caps(), max_size=10
            )
            sweep_id = sweep.id
        run_worker(config, stop=threading.Event(), max_runs=len(ACTIVATIONS) * len(DEPTHS))
        with make_sessionmaker(engine)() as session:
            (run_id,) = session.execute(
                text("SELECT id FROM runs WHERE sweep_id = :s AND activation = 'relu' AND depth = 5"),
                {"s": sweep_id},
            ).scalars()
    finally:
        engine.dispose()
    return Store(root / "graddiag.db", run_id)


def query(store: Store, sql: str) -> pd.DataFrame:
    """Run SQL the way Grafana's plugin does: a plain SQLite connection on the file, read-only."""
    with closing(sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)) as db:
        return pd.read_sql_query(sql, db)


# --- docs/grafana.md ---------------------------------------------------------------------------------


def grafana_sql(sql: str, run_id: str, time_from: float, time_to: float) -> str:
    """Substitute what Grafana interpolates ($run_id, $__from/$__to in ms) and the plugin's one macro."""
    sql = re.sub(r"\$__unixEpochGroupSeconds\(\s*([^,]+?)\s*,\s*(\d+)\s*\)", r"cast((\1 / \2) as int) * \2", sql)
    sql = sql.replace("$__from", str(int(time_from * 1000))).replace("$__to", str(int(time_to * 1000)))
    return sql.replace("$run_id", run_id)


@pytest.fixture(scope="module")
def grafana(store: Store) -> dict[str, pd.DataFrame]:
    """Every SQL block of docs/grafana.md, by the name in its first line, run against the store."""
    now = time.time()
    results = {}
    for block in code_blocks("grafana.md", "sql"):
        match = re.match(r"-- (?:panel|variable): (.+)\n", block)
        assert match, f"every SQL block starts with '-- panel: NAME' or '-- variable: NAME':\n{block}"
        results[match.group(1)] = query(store, grafana_sql(block, store.run_id, now - 86400, now + 3600))
    return results


def test_every_grafana_query_runs_and_returns_rows(grafana: dict[str, pd.DataFrame]) -> None:
    assert len(grafana) == 9
    assert all(len(frame) for frame in grafana.values()), [name for name, frame in grafana.items() if frame.empty]


def test_grafana_run_picker_and_per_run_panels(store: Store, grafana: dict[str, pd.DataFrame]) -> None:
    runs = query(store, "SELECT id, started_epoch, timing FROM runs ORDER BY finished_epoch DESC")
    assert list(grafana["run_id"]["id"]) == list(runs["id"])
    engine = make_engine(f"sqlite:///{store.path}")
    try:
        with make_sessionmaker(engine)() as session:
            report = load_report(session, store.run_id)
            layers = layer_rows(session, store.run_id)
    finally:
        engine.dispose()
    assert report is not None
    names = {layer.index: layer.name for layer in layers}

    series = grafana["grad_norm by layer"]
    assert list(series.columns) == ["time", "layer", "grad_norm"]
    assert list(zip(series["layer"], series["grad_norm"], strict=True)) == [
        (names[r.layer], r.grad_norm) for r in report.records
    ]
    assert series["time"].is_monotonic_increasing  # the plugin's long-to-wide conversion needs time order
    started = runs.set_index("id").loc[store.run_id, "started_epoch"]
    last_step = max(r.step for r in report.records)
    assert series["time"].iloc[0] == pytest.approx(started)
    assert series["time"].iloc[-1] == pytest.approx(started + last_step * report.timing.step_ms / 1000)

    profile = grafana["profile at init and at the end"]
    assert list(profile["layer"]) == [layer.name for layer in layers]
    assert list(profile["grad_norm_init"]) == [r.grad_norm for r in report.records if r.step == 0]
    assert list(profile["grad_norm_end"]) == [r.grad_norm for r in report.records if r.step == last_step]
    assert list(grafana["loss"]["loss"]) == [s.loss for s in report.steps]


def test_grafana_panels_across_runs(store: Store, grafana: dict[str, pd.DataFrame]) -> None:
    runs = query(store, "SELECT activation, depth, verdict, evidence FROM runs WHERE status = 'succeeded'")
    counts = grafana["verdicts by activation and depth"].set_index(["activation", "depth"])
    assert sorted(counts.index) == sorted((a, d) for a in ACTIVATIONS for d in DEPTHS)
    for row in runs.itertuples():
        assert counts.loc[(row.activation, row.depth), row.verdict] == 1
        assert counts.loc[(row.activation, row.depth), "runs"] == 1

    critical = grafana["critical depth by activation"].set_index("activation")
    for activation, group in runs.groupby("activation"):
        unhealthy = group[group.verdict != "healthy"].depth
        expected = unhealthy.min() if len(unhealthy) else None
        got = critical.loc[activation, "critical_depth"]
        assert (pd.isna(got) and expected is None) or got == expected
        assert critical.loc[activation, "deepest_run"] == max(DEPTHS)

    assert len(grafana["slope by depth"]) == len(ACTIVATIONS) * len(DEPTHS)
    per_hour = grafana["runs per hour"]
    assert per_hour["runs"].sum() == len(runs) and (per_hour["time"] % 3600 == 0).all()
    durations = grafana["run durations"]
    assert len(durations) == len(runs) and (durations["seconds"] > 0).all()
    assert set(durations["spec"]) == {f"{a} d{d}" for a in ACTIVATIONS for d in DEPTHS}


# --- docs/pandas.md ----------------------------------------------------------------------------------


def test_the_pandas_script_runs_against_a_real_export(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = make_engine(f"sqlite:///{store.path}")
    try:
        with make_sessionmaker(engine)() as session:
            rows = gradient_table(session, store.run_id)
            report = load_report(session, store.run_id)
    finally:
        engine.dispose()
    assert report is not None
    # The bytes `GET /v1/runs/{id}/gradients?format=csv` (and `graddiag export`) serve.
    (store.path.parent / "gradients.csv").write_text(records_csv(rows), newline="")
    monkeypatch.chdir(store.path.parent)

    script = "\n".join(code_blocks("pandas.md", "python"))
    assert EXAMPLE_RUN_ID in script
    namespace: dict[str, Any] = {}
    exec(compile(script.replace(EXAMPLE_RUN_ID, store.run_id), "docs/pandas.md", "exec"), namespace)

    assert len(namespace["records"]) == len(rows)
    steps = sorted({r.step for r in report.records})
    assert namespace["grad_norm"].shape == (len(steps), len(report.layers))
    assert namespace["decades_per_layer"] == pytest.approx(report.verdict.evidence.decades_per_layer)
    verdicts = namespace["verdicts"]
    assert sorted(verdicts.index) == sorted(ACTIVATIONS) and list(verdicts.columns) == DEPTHS
    assert verdicts.loc["relu", 5] == report.verdict.label
    assert len(namespace["ends"]) == len(ACTIVATIONS) * len(DEPTHS)
    assert "decades per layer" in capsys.readouterr().out


# --- docs/api.md -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_api_guide_names_every_route_and_metric(settings: Settings) -> None:
    guide = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^\|[^|]*\| `(GET|POST|PATCH|DELETE) (/[^`]*)`", guide, flags=re.MULTILINE))
    schema = create_app(settings).openapi()
    served = {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
        if path.startswith("/v1/") or path in ("/healthz", "/readyz", "/metrics")
    }
    assert documented == served

    metrics = set(re.findall(r"^\| `(graddiag_\w+)`", guide, flags=re.MULTILINE))
    async with serve_app(settings, probe=lambda: (1, 1)) as api:
        await api.get("/healthz")
        exposition = (await api.get("/metrics")).text
    # prometheus_client adds a `<histogram>_created` timestamp beside each client-side histogram.
    exposed = {family.name for family in text_string_to_metric_families(exposition)}
    assert metrics == {name for name in exposed if not name.endswith("_created")}


def test_the_api_guide_lists_every_finding_kind() -> None:
    guide = (DOCS / "api.md").read_text()
    (row,) = re.findall(r"^\| `kind` \|(.*)\|$", guide, flags=re.MULTILINE)
    assert re.findall(r"`(\w+)`", row) == list(get_args(FindingKind))
