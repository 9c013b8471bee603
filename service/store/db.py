"""Engines, sessions and schema migrations.

SQLite is shared by the API process and several worker processes, so every connection runs in WAL mode
(readers never block the writer), waits up to 30 s for a lock instead of failing at once, enforces foreign
keys (child rows cascade on delete) and opens every writing transaction with BEGIN IMMEDIATE: the write
lock is taken up front, so two transactions never deadlock upgrading a read lock to a write lock (SQLite
would report that as "database is locked" without waiting). Read-only sessions (`make_sessionmaker(...,
read_only=True)`, which the API gives GET requests) begin DEFERRED with `query_only` on: they read a WAL
snapshot, never wait behind a writer, and fail loudly if anything tries to write through them. Other
databases get a plain pooled engine.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_S: Final = 30.0

# Execution option that marks an engine's transactions as read-only (see make_sessionmaker).
READ_ONLY_OPTION: Final = "graddiag_read_only"

# graddiag/service/store/db.py → graddiag/migrations: inside the installed package (a wheel ships them),
# and in a checkout the link graddiag/migrations → migrations/ (the path is deliberately not resolved).
MIGRATIONS_DIR: Final = Path(__file__).parents[2] / "migrations"


# SQLite errors that pass with time (another process holds the lock; the disk is full or failing), as
# opposed to bugs such as "no such table". Every PostgreSQL OperationalError is of that kind (connection
# lost, disk full, lock timeout): its bugs are ProgrammingErrors.
_TRANSIENT_SQLITE_ERRORS: Final = (
    "database is locked",
    "database table is locked",
    "database or disk is full",
    "disk i/o error",
    "unable to open database file",
)


def is_transient(error: BaseException) -> bool:
    """Whether a database error may go away if retried later (locked, disk full, connection lost)."""
    if isinstance(error, sa_exc.TimeoutError):  # the connection pool stayed exhausted
        return True
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    if not isinstance(error, sa_exc.OperationalError):
        return False
    if not type(error.orig).__module__.startswith("sqlite3"):
        return True
    message = str(error.orig).lower()
    return any(text in message for text in _TRANSIENT_SQLITE_ERRORS)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any, busy_timeout: float = SQLITE_BUSY_TIMEOUT_S) -> None:
    # Autocommit at the driver level: pysqlite's own implicit BEGIN would defeat BEGIN IMMEDIATE below.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode, much faster commits
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    read_only = bool(connection.get_execution_options().get(READ_ONLY_OPTION, False))
    # query_only is per connection and pooled connections are shared, so every transaction sets it.
    connection.exec_driver_sql(f"PRAGMA query_only = {'ON' if read_only else 'OFF'}")
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def make_engine(url: str, *, busy_timeout: float = SQLITE_BUSY_TIMEOUT_S) -> Engine:
    """An engine for `url`; for SQLite files, creates the parent directory and sets up WAL and locking.

    `busy_timeout`: seconds a SQLite statement waits for another connection's lock before "database is
    locked" (the API uses a shorter one than workers, so a request answers 503 rather than hanging).
    """
    sa_url = make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    database = sa_url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": busy_timeout})
    event.listen(engine, "connect", functools.partial(_sqlite_on_connect, busy_timeout=busy_timeout))
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def make_sessionmaker(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions on `engine`; objects stay readable after commit (routes serialise them afterwards).

    `read_only`: on SQLite, transactions read a snapshot without waiting for a writer's lock, and a
    write through them raises "attempt to write a readonly database".
    """
    bind = engine.execution_options(**{READ_ONLY_OPTION: True}) if read_only else engine
    return sessionmaker(bind, expire_on_commit=False)


def _alembic_config(connection: Connection) -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(f"graddiag's migrations are missing: expected them in {MIGRATIONS_DIR}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    # env.py runs on this connection rather than opening its own engine.
    config.attributes["connection"] = connection
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (creating it when empty)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            command.upgrade(_alembic_config(connection), revision)
    finally:
        engine.dispose()


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` ("base" empties it)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            command.downgrade(_alembic_config(connection), revision)
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    """The database's migration revision; None when it has never been migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
