"""Alembic environment: runs on the connection `service.store.db` passes in, else on Settings().db_url.

`graddiag db upgrade` (service.store.db.upgrade) hands over its own connection; the plain `alembic`
command line (alembic.ini at the repository root) connects to GRADDIAG_DB_URL like the service does.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine
from graddiag.service.store.tables import Base

config = context.config
if config.config_file_name is not None:  # the alembic command line: log as alembic.ini says
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def _set_sqlite_foreign_keys(connection: Connection, on: bool) -> None:
    # The pragma is ignored inside a transaction, and SQLAlchemy would autobegin one (BEGIN IMMEDIATE)
    # for any statement it runs, so it goes straight to the driver connection.
    driver_connection = connection.connection.driver_connection
    assert driver_connection is not None
    driver_connection.execute(f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}")


def _run_migrations(connection: Connection) -> None:
    # Batch mode rebuilds a SQLite table by copy, drop and rename; with foreign keys on, dropping a parent
    # table would cascade-delete every child row, so they are off while migrating.
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        _set_sqlite_foreign_keys(connection, on=False)
    try:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,
            # SQLite does roll back DDL once BEGIN is explicit (db.py emits it), so a failed migration
            # leaves the schema as it was on both backends.
            transactional_ddl=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if sqlite:
            _set_sqlite_foreign_keys(connection, on=True)


def _run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_migrations(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or Settings().db_url)
    try:
        with engine.connect() as own_connection:
            _run_migrations(own_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or Settings().db_url,
        target_metadata=target_metadata,
        render_as_batch=True,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    _run_online()
