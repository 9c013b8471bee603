"""The store: report round trip, listing filters/sort/pages, gradient rows, cancel, delete, idempotency,
sweeps. Every test migrates a fresh database, once on SQLite and once on PostgreSQL (`db_url`, tests/pg.py)."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from graddiag.models.spec import Spec, SpecCaps
from graddiag.service.engine.report import (
    FindingKind,
    Label,
    Report,
)
from graddiag.service.store import db
from graddiag.service.store.runs import (
    RunFilters,
    RunFinished,
    RunNotFound,
    cancel_run,
    create_external_run,
    create_run,
    decode_finding_kinds,
    delete_run,
    encode_finding_kinds,
    get_run,
    gradient_rows,
    insert_report_rows,
    layer_rows,
    list_runs,
    load_report,
    recurrent_layers,
    report_columns,
    report_rows,
    time_steps,
    time_table,
)
from graddiag.service.store.sweeps import SweepInvalid, SweepNotFound, create_sweep, sweep_status, sweep_summary
from graddiag.service.store.tables import (
    FINDING_KINDS_LENGTH,
    Run,
    RunLayer,
    RunRecord,
    RunStep,
    RunTimeRecord,
    stamp,
)
from tests.support.reports import external_report, recurrent_report, with_findings
from tests.support.specs import TINY
from tests.support.store import sample_report


def succeed(session: Session, run_id: str, report: Report) -> None:
    """Store `report` as the run's result, as the worker's complete() does (minus the lease checks)."""
    session.execute(
        update(Run).where(Run.id == run_id).values(status="succeeded", **report_columns(report), **stamp("finished"))
    )
    insert_report_rows(session, report_rows(run_id, report))
    session.commit()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with db.make_sessionmaker(engine)() as session:
        yield session


def _count(session: Session, table: Any, run_id: str) -> int:
    return session.scalar(select(func.count()).select_from(table).where(table.run_id == run_id)) or 0


# --- runs and reports ---------------------------------------------------------------------------------


def test_create_run_queues_with_indexed_columns_and_timestamps(session: Session) -> None:
    spec = TINY.model_copy(update={"lr": 0.05, "clip_value": 2.0, "seed": 7})
    run, created = create_run(session, spec)
    assert created
    stored = get_run(session, run.id)
    assert stored.status == "queued" and stored.attempt == 0 and not stored.cancel_requested
    assert Spec.model_validate(stored.spec) == spec
    assert stored.spec_hash == spec.fingerprint()
    assert (stored.depth, stored.width, stored.lr, stored.clip_value, stored.seed) == (3, 16, 0.05, 2.0, 7)
    assert stored.created_at.tzinfo == UTC
    assert stored.created_at.timestamp() == pytest.approx(stored.created_epoch, abs=1e-3)
    assert stored.started_at is None and stored.finished_at is None


def test_report_round_trip_is_exact(session: Session) -> None:
    spec = TINY.model_copy(update={"depth": 6, "steps": 23, "record_every": 4})
    report = sample_report(spec, label="vanishing")
    run, _ = create_run(session, spec)
    assert load_report(session, run.id) is None  # queued: no report yet
    succeed(session, run.id, report)

    loaded = load_report(session, run.id)
    assert loaded is not None
    assert loaded.model_dump() == report.model_dump()
    assert get_run(session, run.id).verdict == "vanishing"
    assert get_run(session, run.id).evidence == report.verdict.evidence.model_dump(mode="json")


LSTM = Spec(arch="lstm", depth=2, width=16, steps=3, batch_size=8, dataset="synthetic")


@pytest.mark.parametrize("arch", ["rnn", "gru", "lstm"])
def test_time_records_round_trip_in_order(session: Session, arch: str) -> None:
    spec = LSTM.model_copy(update={"arch": arch, "steps": 7, "record_every": 3})
    report = recurrent_report(spec, time_steps=5)
    # Stored in any order, read back by (step, layer, t).
    shuffled = report.model_copy(update={"time_records": report.time_records[::-1]})
    run, _ = create_run(session, spec)
    succeed(session, run.id, shuffled)

    loaded = load_report(session, run.id)
    assert loaded is not None
    assert loaded.model_dump() == report.model_dump()
    keys = [(r.step, r.layer, r.t) for r in loaded.time_records]
    assert keys == sorted(keys) and len(keys) == 3 * 2 * 5  # steps 0, 3, 6 x layers 1, 3 x t 0..4
    assert recurrent_layers(session, run.id) == [(1, f"{arch}1.hh"), (3, f"{arch}2.hh")]
    assert time_steps(session, run.id) == [0, 3, 6]
    if arch == "lstm":
        assert {r.cell_grad_norm is not None for r in loaded.time_records} == {True}
    else:
        assert {r.cell_grad_norm for r in loaded.time_records} == {None}


def test_time_table_filters_by_layer_and_step(session: Session) -> None:
    run, _ = create_run(session, LSTM)
    succeed(session, run.id, recurrent_report(LSTM, time_steps=4))
    every = time_table(session, run.id)
    assert [row[:3] for row in every] == [(s, layer, t) for s in (0, 2) for layer in (1, 3) for t in range(4)]
    one_layer = time_table(session, run.id, layer=3)
    assert [row[:3] for row in one_layer] == [(s, 3, t) for s in (0, 2) for t in range(4)]
    one_step = time_table(session, run.id, layer=1, step=2)
    # grad_norm = 10^(-0.1 (T-1-t)) (1 + step) / (layer + 1): t = 3 is the last time step.
    assert [row[3] for row in one_step] == pytest.approx([10 ** (-0.1 * (3 - t)) * 3 / 2 for t in range(4)])
    assert time_table(session, run.id, step=1) == []  # not a recorded step
    with pytest.raises(RunNotFound):
        time_table(session, "nope")


def test_runs_without_time_records_have_none(session: Session) -> None:
    run, _ = create_run(session, TINY)
    assert time_table(session, run.id) == [] and recurrent_layers(session, run.id) == []  # queued
    succeed(session, run.id, sample_report(TINY))
    loaded = load_report(session, run.id)
    assert loaded is not None and loaded.time_records == []
    assert (
        time_table(session, run.id) == []
        and recurrent_layers(session, run.id) == []
        and not time_steps(session, run.id)
    )


def test_external_run_keeps_its_time_records(session: Session) -> None:
    base = recurrent_report(LSTM, time_steps=3)
    report = external_report().model_copy(
        update={"layers": base.layers, "records": base.records, "time_records": base.time_records}
    )
    run = create_external_run(session, report, name="my-lstm", tags=[])
    assert load_report(session, run.id) == report
    assert _count(session, RunTimeRecord, run.id) == 2 * 2 * 3


def test_findings_forward_signal_and_flags_round_trip(session: Session) -> None:
    spec = TINY.model_copy(update={"depth": 4, "steps": 7, "record_every": 3})
    report = with_findings(sample_report(spec, label="vanishing"), "step_size", "forward_signal", "step_size")
    run, _ = create_run(session, spec)
    assert get_run(session, run.id).finding_kinds is None  # no report yet
    succeed(session, run.id, report)

    loaded = load_report(session, run.id)
    assert loaded is not None
    assert loaded.model_dump() == report.model_dump()
    assert [f.kind for f in loaded.verdict.findings] == ["step_size", "forward_signal", "step_size"]
    assert loaded.verdict.findings[0].evidence == {
        "span_decades": 2.5,
        "interior_layers": 7,
        "note": "x",
        "missing": None,
    }
    assert isinstance(loaded.verdict.findings[0].evidence["interior_layers"], int)
    assert [layer.structural_zero_bias for layer in layer_rows(session, run.id)] == [True, False, False, False, False]
    assert {(r.step, r.layer): r.act_norm for r in gradient_rows(session, run.id)}[(3, 2)] == 2.5
    stored = get_run(session, run.id)
    assert stored.finding_kinds == ",forward_signal,step_size,"
    assert decode_finding_kinds(stored.finding_kinds) == ["forward_signal", "step_size"]


def test_finding_kinds_encoding() -> None:
    assert encode_finding_kinds([]) == "," and decode_finding_kinds(",") == []
    assert encode_finding_kinds(["b", "a", "b"]) == ",a,b,"
    assert decode_finding_kinds(None) is None
    # Every kind at once fits the column.
    assert len(encode_finding_kinds(get_args(FindingKind))) <= FINDING_KINDS_LENGTH


def test_non_finite_values_are_stored_as_null(session: Session) -> None:
    report = sample_report(TINY)
    broken = report.model_copy(
        update={
            "records": [
                report.records[0].model_copy(update={"grad_norm": math.inf, "rel_grad": math.nan}),
                *report.records[1:],
            ],
            "steps": [report.steps[0].model_copy(update={"loss": math.nan}), *report.steps[1:]],
        }
    )
    run, _ = create_run(session, TINY)
    succeed(session, run.id, broken)

    loaded = load_report(session, run.id)
    assert loaded is not None
    assert loaded.records[0].grad_norm is None and loaded.records[0].rel_grad is None
    assert loaded.steps[0].loss is None
    # The report's JSON (what the API serves) writes non-finite floats as null too.
    assert json.loads(loaded.model_dump_json()) == json.loads(broken.model_dump_json())


def test_get_run_and_report_functions_raise_for_unknown_runs(session: Session) -> None:
    for call in (get_run, load_report, layer_rows, gradient_rows, cancel_run, delete_run):
        with pytest.raises(RunNotFound, match="nope"):
            call(session, "nope")


def test_layer_rows_and_gradient_row_filters(session: Session) -> None:
    spec = TINY.model_copy(update={"depth": 4, "steps": 10, "record_every": 3})
    report = sample_report(spec)
    run, _ = create_run(session, spec)
    succeed(session, run.id, report)

    assert layer_rows(session, run.id) == report.layers
    assert gradient_rows(session, run.id) == report.records
    assert {r.step for r in report.records} == {0, 3, 6, 9}

    one_layer = gradient_rows(session, run.id, layer=2)
    assert one_layer == [r for r in report.records if r.layer == 2] and len(one_layer) == 4
    window = gradient_rows(session, run.id, step_from=3, step_to=6)
    assert window == [r for r in report.records if 3 <= r.step <= 6] and {r.step for r in window} == {3, 6}
    assert gradient_rows(session, run.id, layer=1, step_from=7) == [
        r for r in report.records if r.layer == 1 and r.step >= 7
    ]
    assert gradient_rows(session, run.id, layer=99) == []


# --- listing ------------------------------------------------------------------------------------------

VARIANTS: dict[str, Any] = {
    "arch": "cnn",
    "activation": "tanh",
    "init": "orthogonal",
    "norm": "batch",
    "residual": True,
    "depth": 7,
    "width": 32,
    "optimizer": "adam",
    "lr": 0.1,
    "clip_value": 1.0,
    "dataset": "cifar10",
    "seed": 5,
}


@pytest.fixture
def variant_runs(session: Session) -> dict[str, str]:
    """One run of TINY plus one run per indexed column that differs from TINY in that column only."""
    ids = {"base": create_run(session, TINY)[0].id}
    for field, value in VARIANTS.items():
        ids[field] = create_run(session, TINY.model_copy(update={field: value}))[0].id
    return ids


@pytest.mark.parametrize("field", list(VARIANTS))
def test_each_indexed_column_filters(session: Session, variant_runs: dict[str, str], field: str) -> None:
    rows, total = list_runs(session, RunFilters(**{field: VARIANTS[field]}))
    assert [r.id for r in rows] == [variant_runs[field]] and total == 1
    base_value = getattr(TINY, field)
    if base_value is not None:  # clip_value=None means "any clip value", not "no clipping"
        rows, total = list_runs(session, RunFilters(**{field: base_value}))
        assert variant_runs[field] not in {r.id for r in rows}
        assert total == len(VARIANTS)  # every other run keeps the base value


def test_depth_range_status_verdict_and_sweep_filters(session: Session) -> None:
    runs = {d: create_run(session, TINY.model_copy(update={"depth": d}))[0] for d in (2, 4, 6, 8)}
    succeed(session, runs[4].id, sample_report(TINY, label="vanishing"))
    succeed(session, runs[6].id, sample_report(TINY, label="healthy"))
    sweep = create_sweep(session, {"dataset": "synthetic", "depth": 3}, {"seed": [1, 2]}, caps=SpecCaps(), max_size=10)

    def ids(**filters: Any) -> set[str]:
        rows, total = list_runs(session, RunFilters(**filters))
        assert total == len(rows)
        return {r.id for r in rows}

    assert ids(depth_min=4, depth_max=6) == {runs[4].id, runs[6].id}
    assert ids(depth_min=7) == {runs[8].id}
    assert ids(status="succeeded") == {runs[4].id, runs[6].id}
    assert ids(verdict="vanishing") == {runs[4].id}
    assert ids(verdict="healthy", depth_max=5) == set()
    assert len(ids(status="queued")) == 4  # depth 2 and 8, and the sweep's two runs
    swept = ids(sweep_id=sweep.id)
    assert len(swept) == 2 and swept.isdisjoint({r.id for r in runs.values()})
    assert ids(sweep_id="none-such") == set()


def test_finding_filter_matches_whole_kinds(session: Session) -> None:
    runs = {
        name: create_run(session, TINY.model_copy(update={"seed": seed}))[0].id
        for seed, name in enumerate(("step", "both", "none", "queued", "lookalike"))
    }
    succeed(session, runs["step"], with_findings(sample_report(TINY), "step_size"))
    succeed(session, runs["both"], with_findings(sample_report(TINY), "forward_signal", "step_size"))
    succeed(session, runs["none"], sample_report(TINY))
    # '_' is a LIKE wildcard: a stored kind that differs in that character only must not match.
    succeed(session, runs["lookalike"], sample_report(TINY))
    session.execute(update(Run).where(Run.id == runs["lookalike"]).values(finding_kinds=",stepXsize,"))
    session.commit()

    def ids(**filters: Any) -> set[str]:
        rows, total = list_runs(session, RunFilters(**filters))
        assert total == len(rows)
        return {r.id for r in rows}

    assert ids(finding="step_size") == {runs["step"], runs["both"]}
    assert ids(finding=["step_size", "forward_signal"]) == {runs["both"]}  # repeated: all of them
    assert ids(finding="forward_signal", verdict="healthy") == {runs["both"]}
    assert ids(finding="nonfinite") == set()
    assert len(ids()) == 5
    with pytest.raises(ValidationError, match="gradient_profile"):
        RunFilters(finding="bogus")  # type: ignore[arg-type]


def test_sorting(session: Session) -> None:
    runs = [
        create_run(session, TINY.model_copy(update={"depth": d, "lr": lr}))[0]
        for d, lr in ((5, 0.1), (2, 0.3), (9, 0.2))
    ]
    succeed(session, runs[1].id, sample_report(TINY))

    def order(sort: str) -> list[str]:
        return [r.id for r in list_runs(session, RunFilters(sort=sort))[0]]

    assert order("depth") == [runs[1].id, runs[0].id, runs[2].id]
    assert order("-depth") == [runs[2].id, runs[0].id, runs[1].id]
    assert order("lr") == [runs[0].id, runs[2].id, runs[1].id]
    assert order("-created_at") == [r.id for r in reversed(runs)]  # the default
    assert order("created_at") == [r.id for r in runs]
    # Unfinished runs (no finished_at) come last either way.
    assert order("finished_at")[0] == runs[1].id and order("-finished_at")[0] == runs[1].id
    with pytest.raises(ValidationError, match="sort by one of"):
        RunFilters(sort="spec_hash")
    with pytest.raises(ValidationError):
        RunFilters(limit=1001)


def test_pagination_reports_the_total(session: Session) -> None:
    created = [create_run(session, TINY.model_copy(update={"seed": s}))[0].id for s in range(7)]
    pages = []
    for offset in range(0, 9, 3):
        rows, total = list_runs(session, RunFilters(sort="created_at", limit=3, offset=offset))
        assert total == 7
        pages.append([r.id for r in rows])
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [run_id for page in pages for run_id in page] == created
    assert list_runs(session, RunFilters(offset=50)) == ([], 7)


# --- cancel, delete, idempotency ------------------------------------------------------------------------


def test_cancel_semantics(session: Session) -> None:
    queued, _ = create_run(session, TINY)
    cancelled = cancel_run(session, queued.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None

    running, _ = create_run(session, TINY)
    session.execute(update(Run).where(Run.id == running.id).values(status="running", attempt=1))
    session.commit()
    flagged = cancel_run(session, running.id)
    assert flagged.status == "running" and flagged.cancel_requested  # the worker finishes the job

    done, _ = create_run(session, TINY)
    succeed(session, done.id, sample_report(TINY))
    for finished_id in (done.id, queued.id):
        with pytest.raises(RunFinished, match="already"):
            cancel_run(session, finished_id)
    assert get_run(session, done.id).status == "succeeded"


def test_delete_cascades_to_report_rows(session: Session) -> None:
    keep, _ = create_run(session, LSTM)
    gone, _ = create_run(session, LSTM)
    for run in (keep, gone):
        succeed(session, run.id, recurrent_report(LSTM))
    assert _count(session, RunRecord, gone.id) == 5 * 2  # 5 layers x 2 recorded steps
    assert _count(session, RunTimeRecord, gone.id) == 2 * 2 * 32  # 2 recorded steps x 2 recurrent layers x 32 t

    delete_run(session, gone.id)
    with pytest.raises(RunNotFound):
        get_run(session, gone.id)
    for table in (RunLayer, RunStep, RunRecord, RunTimeRecord):
        assert _count(session, table, gone.id) == 0
        assert _count(session, table, keep.id) > 0
    with pytest.raises(RunNotFound):
        delete_run(session, gone.id)


def test_idempotency_key_returns_the_earlier_run(session: Session) -> None:
    first, created = create_run(session, TINY, idempotency_key="key-1")
    again, created_again = create_run(session, TINY, idempotency_key="key-1")
    other, created_other = create_run(session, TINY, idempotency_key="key-2")
    create_run(session, TINY)
    assert created and not created_again and created_other
    assert again.id == first.id and other.id != first.id
    assert list_runs(session, RunFilters())[1] == 3  # first, other and plain


def test_idempotency_key_under_concurrent_requests(engine: Engine) -> None:
    factory = db.make_sessionmaker(engine)
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(6)

    def submit() -> None:
        with factory() as session:
            barrier.wait()
            run, created = create_run(session, TINY, idempotency_key="same")
            results.append((run.id, created))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({run_id for run_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with factory() as session:
        assert list_runs(session, RunFilters())[1] == 1


def test_sqlite_read_only_sessions_read_during_a_write_lock_and_refuse_writes(tmp_path: Path) -> None:
    # SQLite only: PostgreSQL readers never wait for writers in the first place.
    db_url = f"sqlite:///{tmp_path / 'locks.db'}"
    db.upgrade(db_url)
    writer = db.make_sessionmaker(db.make_engine(db_url))
    reader = db.make_sessionmaker(db.make_engine(db_url, busy_timeout=0.2), read_only=True)
    with writer() as session:
        run, _ = create_run(session, TINY)
    with writer() as holder:
        holder.execute(update(Run).where(Run.id == run.id).values(status="running"))  # holds the write lock
        with reader() as session:
            # The snapshot predates the uncommitted write, and reading it does not wait for the lock.
            assert get_run(session, run.id).status == "queued"
        holder.commit()
    with reader() as session, pytest.raises(OperationalError, match="readonly"):
        session.execute(update(Run).where(Run.id == run.id).values(status="failed"))
    with writer() as session:  # the pooled connection went back writable
        assert get_run(session, run.id).status == "running"
        session.execute(update(Run).where(Run.id == run.id).values(status="failed"))
        session.commit()


# --- sweeps -----------------------------------------------------------------------------------------------


def test_sweep_creates_one_run_per_grid_point(session: Session) -> None:
    base = {"dataset": "synthetic", "width": 16, "steps": 5}
    sweep = create_sweep(
        session, base, {"activation": ["relu", "tanh"], "depth": [2, 4, 8]}, caps=SpecCaps(), max_size=6
    )
    status = sweep_status(session, sweep.id)
    assert status.total == 6 and sweep.size == 6
    assert status.counts == {"queued": 6, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert not status.done
    points = sorted((r.grid["activation"], r.grid["depth"]) for r in status.runs)
    assert points == [("relu", 2), ("relu", 4), ("relu", 8), ("tanh", 2), ("tanh", 4), ("tanh", 8)]
    for item in status.runs:
        spec = Spec.model_validate(get_run(session, item.run_id).spec)
        assert (spec.activation, spec.depth, spec.width, spec.dataset) == (
            item.grid["activation"],
            item.grid["depth"],
            16,
            "synthetic",
        )


def test_sweep_summary_finds_the_critical_depth(session: Session) -> None:
    sweep = create_sweep(
        session,
        {"dataset": "synthetic"},
        {"activation": ["sigmoid", "relu"], "depth": [10, 2, 5]},
        caps=SpecCaps(),
        max_size=6,
    )
    by_point = {(r.grid["activation"], r.grid["depth"]): r.run_id for r in sweep_status(session, sweep.id).runs}
    outcomes: dict[tuple[str, int], tuple[Label, float]] = {
        ("sigmoid", 2): ("healthy", 2.0),
        ("sigmoid", 5): ("vanishing", 1000.0),
        ("sigmoid", 10): ("vanishing", 1e7),
    }
    for point, (label, ratio) in outcomes.items():
        succeed(session, by_point[point], sample_report(TINY, label=label, interior_ratio=ratio))
    succeed(session, by_point[("relu", 5)], sample_report(TINY, label="healthy", interior_ratio=None))
    cancel_run(session, by_point[("relu", 10)])

    summary = sweep_summary(session, sweep.id)
    assert not summary.done  # relu at depth 2 is still queued
    configs = {c.config["activation"]: c for c in summary.configs}
    assert set(configs) == {"sigmoid", "relu"} and all(set(c.config) == {"activation"} for c in summary.configs)
    sigmoid, relu = configs["sigmoid"], configs["relu"]
    assert sigmoid.depths == [2, 5, 10] and sigmoid.verdicts == ["healthy", "vanishing", "vanishing"]
    assert sigmoid.critical_depth == 5
    assert sigmoid.first_last_ratio == pytest.approx([math.log10(2.0), 3.0, 7.0])
    assert relu.depths == [2, 5, 10] and relu.verdicts == [None, "healthy", None]
    assert relu.critical_depth is None and relu.first_last_ratio == [None, None, None]


def test_sweep_status_and_summary_show_and_filter_findings(session: Session) -> None:
    sweep = create_sweep(
        session, {"dataset": "synthetic"}, {"norm": ["none", "batch"], "depth": [2, 5, 10]}, caps=SpecCaps(), max_size=6
    )
    by_point = {(r.grid["norm"], r.grid["depth"]): r.run_id for r in sweep_status(session, sweep.id).runs}
    succeed(session, by_point[("batch", 2)], with_findings(sample_report(TINY), "structural_zero_bias"))
    succeed(
        session,
        by_point[("batch", 5)],
        with_findings(sample_report(TINY, label="exploding"), "gradient_profile", "structural_zero_bias"),
    )
    succeed(session, by_point[("batch", 10)], with_findings(sample_report(TINY, label="exploding"), "gradient_profile"))
    succeed(session, by_point[("none", 2)], sample_report(TINY))

    status = sweep_status(session, sweep.id)
    listed = {r.run_id: r for r in status.runs}
    assert listed[by_point[("none", 2)]].findings == []
    assert listed[by_point[("none", 5)]].findings is None  # still queued
    brief = listed[by_point[("batch", 5)]].findings
    assert brief is not None
    assert [(f.kind, f.severity, f.phase) for f in brief] == [
        ("gradient_profile", "critical", "init"),
        ("structural_zero_bias", "warning", "training"),
    ]
    filtered = sweep_status(session, sweep.id, finding="gradient_profile")
    assert {r.run_id for r in filtered.runs} == {by_point[("batch", 5)], by_point[("batch", 10)]}
    assert filtered.total == 6 and filtered.counts == status.counts  # the whole sweep's figures

    configs = {c.config["norm"]: c for c in sweep_summary(session, sweep.id).configs}
    batch, plain = configs["batch"], configs["none"]
    assert [[f.kind for f in cell or []] for cell in batch.findings] == [
        ["structural_zero_bias"],
        ["gradient_profile", "structural_zero_bias"],
        ["gradient_profile"],
    ]
    assert batch.finding_depths == {"structural_zero_bias": 2, "gradient_profile": 5}
    assert plain.findings == [[], None, None] and plain.finding_depths == {}
    only = sweep_summary(session, sweep.id, finding="gradient_profile")
    assert only.finding == "gradient_profile" and [c.config for c in only.configs] == [{"norm": "batch"}]
    assert sweep_summary(session, sweep.id, finding="nonfinite").configs == []


def test_sweep_validation_names_the_point_and_field(session: Session) -> None:
    def errors(base: dict[str, Any], grid: dict[str, list[Any]], **kw: Any) -> list[dict[str, Any]]:
        with pytest.raises(SweepInvalid) as caught:
            create_sweep(session, base, grid, caps=kw.get("caps", SpecCaps()), max_size=kw.get("max_size", 100))
        return caught.value.errors

    assert errors({"colour": "red"}, {"depth": [2]}) == [{"loc": ["base", "colour"], "msg": "not a spec field"}]
    assert errors({}, {"depthh": [2]})[0]["loc"] == ["grid", "depthh"]
    assert errors({}, {"depth": []})[0]["loc"] == ["grid", "depth"]
    assert errors({}, {})[0]["loc"] == ["grid"]
    too_big = errors({}, {"depth": list(range(1, 11)), "seed": list(range(11))}, max_size=100)
    assert too_big == [{"loc": ["grid"], "msg": "110 grid points exceed this server's sweep cap of 100"}]

    bad_point = errors({"dataset": "synthetic"}, {"activation": ["relu", "swish"], "depth": [2, 3]})
    assert [e["loc"] for e in bad_point] == [["grid", 2, "activation"], ["grid", 3, "activation"]]
    assert "activation='swish', depth=2" in bad_point[0]["msg"]

    capped = errors({}, {"width": [16, 64]}, caps=SpecCaps(max_width=32))
    assert [e["loc"] for e in capped] == [["grid", 1, "width"]] and "at most 32" in capped[0]["msg"]

    combination = errors({"init": "normal"}, {"init_std": [0.1, None]})
    assert combination[0]["loc"][:2] == ["grid", 1] and "init_std is required" in combination[0]["msg"]
    assert list_runs(session, RunFilters())[1] == 0  # nothing was created by refused sweeps


def test_unknown_sweep(session: Session) -> None:
    for call in (sweep_status, sweep_summary):
        with pytest.raises(SweepNotFound):
            call(session, "nope")


def test_every_spec_field_filters_a_listing() -> None:
    # The listing's conditions read one RunFilters field per spec field: a new spec field needs its filter.
    assert set(Spec.model_fields) <= set(RunFilters.model_fields)


def test_recurrent_and_transformer_fields_filter_and_sort(session: Session) -> None:
    lstm = Spec(arch="lstm", depth=2, width=16, steps=3, dataset="synthetic")
    runs = {
        "default": lstm,
        "one": lstm.model_copy(update={"forget_bias": 1.0}),
        "two": lstm.model_copy(update={"forget_bias": 2.0}),
        "chrono": lstm.model_copy(update={"forget_bias": "chrono"}),
        "vit": Spec(arch="transformer", depth=2, width=16, heads=2, norm_position="post", pooling="mean"),
    }
    ids = {name: create_run(session, spec)[0].id for name, spec in runs.items()}

    def listed(**filters: Any) -> list[str]:
        rows, total = list_runs(session, RunFilters(**filters))
        assert total == len(rows)
        names = {run_id: name for name, run_id in ids.items()}
        return [names[row.id] for row in rows]

    assert listed(forget_bias="chrono") == ["chrono"]
    assert listed(forget_bias=1.0) == ["one"]
    assert sorted(listed(arch="lstm")) == ["chrono", "default", "one", "two"]
    assert listed(heads=2) == ["vit"] and listed(norm_position="post") == ["vit"] and listed(pooling="mean") == ["vit"]
    # A word where a number may stand is no number: numeric comparisons and sorting pass over it.
    assert sorted(listed(filter="forget_bias > 0.5")) == ["one", "two"]
    assert listed(filter="forget_bias = 'chrono'") == ["chrono"]
    assert sorted(listed(filter="forget_bias != 'chrono'")) == ["default", "one", "two", "vit"]
    assert listed(sort="-forget_bias")[:2] == ["two", "one"]
    with pytest.raises(ValueError, match="forget_bias is a number or one of 'chrono'"):
        RunFilters(filter="forget_bias = 'big'")
    with pytest.raises(ValueError, match="compares with = or != only"):
        RunFilters(filter="forget_bias < 'chrono'")
