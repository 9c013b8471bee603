"""Migrations: empty → head, head → base → head, and the ORM metadata matches the migrated schema, on SQLite
and on PostgreSQL (`db_url`, tests/pg.py); SQLite's connection settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

from graddiag.service.store import db
from graddiag.service.store.runs import build_run, create_run
from graddiag.service.store.tables import Base, Run
from tests.support import REPO
from tests.support.specs import TINY


def _head() -> str:
    script = ScriptDirectory.from_config(Config(str(REPO / "alembic.ini")))
    head = script.get_current_head()
    assert head is not None
    return head


def _tables(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_from_empty_to_head(db_url: str) -> None:
    assert db.current(db_url) is None
    db.upgrade(db_url)
    assert db.current(db_url) == _head()
    assert _tables(db_url) == {
        "alembic_version",
        "sweeps",
        "runs",
        "run_layers",
        "run_steps",
        "run_records",
        "run_time_records",
    }
    db.upgrade(db_url)  # idempotent
    assert db.current(db_url) == _head()


def test_sqlite_parent_directories_are_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'dir' / 'g.db'}"
    db.upgrade(url)
    assert (tmp_path / "nested" / "dir" / "g.db").is_file()
    assert db.current(url) == _head()


def test_downgrade_to_base_and_upgrade_again(db_url: str) -> None:
    url = db_url
    db.upgrade(url)
    db.downgrade(url, "base")
    assert db.current(url) is None
    assert _tables(url) == {"alembic_version"}
    db.upgrade(url)
    assert db.current(url) == _head()
    engine = db.make_engine(url)
    try:
        with db.make_sessionmaker(engine)() as session:
            run, _ = create_run(session, TINY)
            assert run.status == "queued"
    finally:
        engine.dispose()


def test_orm_metadata_matches_the_migrated_schema(db_url: str) -> None:
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        engine.dispose()


def test_alembic_command_line_uses_the_service_database_setting(db_url: str) -> None:
    url = db_url
    env = {**os.environ, "GRADDIAG_DB_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert db.current(url) == _head()


def test_programmatic_upgrade_works_from_another_directory(db_url: str, tmp_path: Path) -> None:
    url = db_url
    code = f"from graddiag.service.store import db; db.upgrade({url!r}); print(db.current({url!r}))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _head()


def _columns(url: str, table: str) -> dict[str, dict[str, object]]:
    engine = db.make_engine(url)
    try:
        return {column["name"]: dict(column) for column in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_0002_adds_the_record_layer_and_finding_columns_and_fills_finding_kinds(db_url: str) -> None:
    url = db_url
    db.upgrade(url, "0001")
    detail = {
        "at_init": "healthy",
        "reasons": [],
        "advice": [],
        "theory": {"applicable": False, "reason": "—"},
        "findings": [
            {"kind": "step_size", "severity": "warning", "message": "big steps"},
            {"kind": "forward_signal", "severity": "critical", "message": "grows"},
            {"kind": "step_size", "severity": "info", "message": "again"},
        ],
    }
    rows = {
        "with_findings": ("succeeded", detail),
        "old_report": ("succeeded", {k: v for k, v in detail.items() if k != "findings"}),
        "queued": ("queued", None),
    }
    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            for run_id, (status, verdict_detail) in rows.items():
                run = build_run(TINY, idempotency_key=run_id)
                # Only the columns revision 0001 has: later revisions' columns do not exist yet.
                later = {"finding_kinds", "source", "model", "name", "tags"}  # 0002, 0003
                values = {c.name: getattr(run, c.name) for c in Run.__table__.c if c.name not in later}
                values.update(id=run_id, status=status, verdict_detail=verdict_detail)
                connection.execute(insert(Run.__table__).values(values))
            connection.execute(
                text(
                    'INSERT INTO run_layers (run_id, "index", name, kind, params) '
                    "VALUES ('queued', 0, 'l', 'linear', 1)"
                )
            )
    finally:
        engine.dispose()
    assert "finding_kinds" not in _columns(url, "runs")

    db.upgrade(url)
    assert db.current(url) == _head()
    assert {"act_norm", "penalty_grad_norm"} <= set(_columns(url, "run_records"))
    assert _columns(url, "run_layers")["structural_zero_bias"]["nullable"] is False
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            kinds = {row.id: row.finding_kinds for row in connection.execute(select(Run.id, Run.finding_kinds))}
            flag = connection.execute(text("SELECT structural_zero_bias FROM run_layers")).scalar_one()
    finally:
        engine.dispose()
    # Distinct and sorted; an old report has none (','); a run without a report has NULL.
    assert kinds == {"with_findings": ",forward_signal,step_size,", "old_report": ",", "queued": None}
    assert flag in (False, 0)

    db.downgrade(url, "0001")
    assert db.current(url) == "0001"
    assert "finding_kinds" not in _columns(url, "runs")
    assert "structural_zero_bias" not in _columns(url, "run_layers")
    assert not {"act_norm", "penalty_grad_norm"} & set(_columns(url, "run_records"))
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            # The downgrade rebuilt the tables (SQLite batch mode) without losing a row.
            assert connection.execute(select(func.count()).select_from(Run)).scalar_one() == 3
            assert connection.execute(text("SELECT count(*) FROM run_layers")).scalar_one() == 1
    finally:
        engine.dispose()


def test_0003_external_runs_round_trip(db_url: str) -> None:
    """Probe runs keep their spec through 0003; external runs need 0003, and its downgrade removes them."""
    from graddiag.service.store.runs import create_external_run, load_report
    from tests.support.reports import external_report

    url = db_url
    db.upgrade(url, "0002")
    probe = build_run(TINY)
    probe_id = probe.id
    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            new = {"source", "model", "name", "tags"}  # 0003's columns
            values = {c.name: getattr(probe, c.name) for c in Run.__table__.c if c.name not in new}
            connection.execute(insert(Run.__table__).values(values))
    finally:
        engine.dispose()
    db.upgrade(url)
    assert db.current(url) == _head()
    columns = _columns(url, "runs")
    assert columns["spec"]["nullable"] is True and columns["depth"]["nullable"] is True
    engine = db.make_engine(url)
    try:
        with db.make_sessionmaker(engine)() as session:
            assert session.get(Run, probe_id).source == "probe"  # the server default filled the old run
            report = external_report()
            run = create_external_run(session, report, name="resnet", tags=["a"])
            external_id = run.id
            assert load_report(session, external_id) == report
        # The origin constraint: an external run without a model description cannot be written.
        with engine.begin() as connection, pytest.raises(IntegrityError):
            connection.execute(text("UPDATE runs SET model = NULL WHERE id = :id"), {"id": external_id})
    finally:
        engine.dispose()
    db.downgrade(url, "0002")
    assert "source" not in _columns(url, "runs") and _columns(url, "runs")["spec"]["nullable"] is False
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            assert set(connection.execute(select(text("id")).select_from(text("runs"))).scalars()) == {probe_id}
            assert connection.execute(text("SELECT count(*) FROM run_records")).scalar_one() == 0
    finally:
        engine.dispose()
    db.upgrade(url)
    assert db.current(url) == _head()


def test_0005_time_records_table_keys_cascade_and_downgrade(db_url: str) -> None:
    """0005 adds run_time_records keyed (run_id, step, layer, t) with a per-layer index; rows go with their
    run; the downgrade drops the table and keeps the runs."""
    from graddiag.service.store.runs import delete_run, load_report
    from tests.support.reports import recurrent_report, succeed

    url = db_url
    db.upgrade(url, "0004")
    assert "run_time_records" not in _tables(url)
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        inspector = inspect(engine)
        assert inspector.get_pk_constraint("run_time_records")["constrained_columns"] == [
            "run_id",
            "step",
            "layer",
            "t",
        ]
        indexes = {index["name"]: index["column_names"] for index in inspector.get_indexes("run_time_records")}
        assert indexes == {"ix_run_time_records_layer": ["run_id", "layer", "step", "t"]}
        spec = TINY.model_copy(update={"arch": "gru", "activation": "tanh", "depth": 2})
        report = recurrent_report(spec, time_steps=4)
        with db.make_sessionmaker(engine)() as session:
            kept, gone = (create_run(session, spec)[0].id for _ in range(2))
        for run_id in (kept, gone):
            succeed(engine, run_id, report)
        with db.make_sessionmaker(engine)() as session:
            loaded = load_report(session, kept)
            assert loaded is not None and loaded.time_records == report.time_records
            delete_run(session, gone)
        with engine.connect() as connection:
            owners = connection.execute(text("SELECT DISTINCT run_id FROM run_time_records")).scalars().all()
            assert owners == [kept]
        # One row per (run, step, layer, t).
        first = report.time_records[0]
        with engine.begin() as connection, pytest.raises(IntegrityError):
            connection.execute(
                text("INSERT INTO run_time_records (run_id, step, layer, t) VALUES (:r, :s, :l, :t)"),
                {"r": kept, "s": first.step, "l": first.layer, "t": first.t},
            )
    finally:
        engine.dispose()
    db.downgrade(url, "0004")
    assert "run_time_records" not in _tables(url)
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id FROM runs")).scalars().all() == [kept]
    finally:
        engine.dispose()
    db.upgrade(url)
    assert db.current(url) == _head()
