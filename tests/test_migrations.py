"""Migrations: empty → head, head → base → head, and the ORM metadata matches the migrated schema, on SQLite
and on PostgreSQL (`db_url`, tests/pg.py); SQLite's connection settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from graddiag.service.store import db
from graddiag.service.store.runs import create_run
from graddiag.service.store.tables import Base
from tests.test_store import TINY

REPO = Path(__file__).resolve().parents[1]


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
    assert _tables(db_url) == {"alembic_version", "sweeps", "runs", "run_layers", "run_steps", "run_records"}
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
