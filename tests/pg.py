"""pytest plugin: the storage tests' databases, SQLite and PostgreSQL.

`db_url` is parametrised over both backends and yields the URL of a fresh, empty database (migrate it with
`service.store.db.upgrade`): a SQLite file in the test's tmp_path, or a new database on the session's
PostgreSQL server, dropped after the test. `pg_url` is the PostgreSQL one alone.

The server is the one GRADDIAG_TEST_PG_URL names (a SQLAlchemy URL of a maintenance database such as
`postgresql+psycopg://user@host:5432/postgres`; the user needs CREATEDB), else a throw-away cluster this
plugin creates with the Debian server binaries (/usr/lib/postgresql/*/bin, `.ci/postgres.sh` installs
them): initdb in a temporary directory, trust authentication, listening on 127.0.0.1 only, on a free
port, stopped and deleted at the end of the session. PostgreSQL refuses to run as root, so under root
(as CI runs) the cluster belongs to the system user `postgres`. Without a server the PostgreSQL cases are
skipped, except under CI, where they fail.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

PG_URL_ENV: Final = "GRADDIAG_TEST_PG_URL"
BACKENDS: Final = ("sqlite", "postgresql")
PG_BINARIES: Final = "/usr/lib/postgresql/*/bin"
# The OS user that owns the throw-away cluster when the tests run as root.
CLUSTER_OWNER: Final = "postgres"
START_TIMEOUT_S: Final = 60
START_TRIES: Final = 3  # a free port can be taken by someone else between probing and binding it
# Durability is worthless for a cluster deleted after the session; without it every commit is faster.
SERVER_OPTIONS: Final = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=200",
)


@dataclass(frozen=True)
class PgServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    url: URL  # a maintenance database (postgres): the per-test databases are created from here

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new empty database for one test; dropped afterwards, whoever is still connected."""
        name = f"graddiag_test_{uuid.uuid4().hex[:12]}"
        admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                yield self.url.set(database=name).render_as_string(hide_password=False)
            finally:
                with admin.connect() as connection:
                    # WITH (FORCE): a test that leaked a connection (or a killed worker's) must not keep it.
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()


def _unavailable(reason: str) -> None:
    """Skip the PostgreSQL cases, or fail them under CI, where the server is part of the test setup."""
    message = f"PostgreSQL is not available: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _server_binaries() -> Path | None:
    """The newest installed server's bin directory."""
    found = [Path(p) for p in glob.glob(PG_BINARIES) if (Path(p) / "initdb").is_file()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Cluster:
    """A throw-away cluster: initdb, pg_ctl start and stop, run as the cluster's owner."""

    def __init__(self, bindir: Path, owner: pwd.struct_passwd | None) -> None:
        self.bindir = bindir
        self.owner = owner
        self.root = Path(tempfile.mkdtemp(prefix="graddiag-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 30,
            check=False,
            cwd=self.root,  # the owner may not be allowed into the caller's working directory
            user=None if self.owner is None else self.owner.pw_uid,
            group=None if self.owner is None else self.owner.pw_gid,
        )

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no server log)"

    def start(self) -> int:
        """initdb, then start on a free port; returns the port."""
        init = self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        for _ in range(START_TRIES):
            port = _free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-c port={port}",
                    f"-c unix_socket_directories={self.root}",  # never the system's /var/run/postgresql
                    *(f"-c {option}" for option in SERVER_OPTIONS),
                ]
            )
            started = self._run(
                "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S),
                "-o", options,
            )  # fmt: skip
            if started.returncode == 0:
                return port
        raise RuntimeError(f"pg_ctl start failed:\n{started.stdout}\n{started.stderr}\n{self._log_tail()}")

    def stop(self) -> None:
        """Stop the server (no checkpoint: the files are deleted next) and delete the cluster."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server: GRADDIAG_TEST_PG_URL's, else a throw-away local cluster."""
    given = os.environ.get(PG_URL_ENV)
    if given:
        yield PgServer(make_url(given))
        return
    bindir = _server_binaries()
    if bindir is None:
        _unavailable(f"{PG_URL_ENV} is unset and no server binaries are in {PG_BINARIES} (run .ci/postgres.sh)")
    assert bindir is not None
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(CLUSTER_OWNER)
        except KeyError:
            _unavailable(f"running as root and there is no {CLUSTER_OWNER!r} user to own the cluster")
    cluster = _Cluster(bindir, owner)
    try:
        try:
            port = cluster.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            _unavailable(str(exc))
        yield PgServer(URL.create("postgresql+psycopg", username="postgres", host="127.0.0.1", port=port))
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test."""
    with pg_server.database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend in turn: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'graddiag.db'}"
        return
    yield request.getfixturevalue("pg_url")
