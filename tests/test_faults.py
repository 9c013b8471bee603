"""Faults: workers killed at random moments, the service crashed or stopped mid-work, the database locked
by another process or its disk full, and runs that would blow up memory or time.

What must hold after each: every run ends once (succeeded, or back in the queue when the service stops),
with exactly one set of records; nothing is half-written (PRAGMA integrity_check); the API answers a
database fault with 503 + Retry-After instead of hanging or failing with a 500; workers wait the fault
out instead of dying or losing a trained result.
"""

from __future__ import annotations

import functools
import os
import queue
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import anyio
import httpx
import pytest
from sqlalchemy import Engine, func, select

from graddiag.models.spec import Spec
from graddiag.service.client import Client
from graddiag.service.settings import Settings
from graddiag.service.store import db
from graddiag.service.store.tables import Run, RunLayer, RunRecord, RunStep
from tests.support import REPO
from tests.support.api import assert_problem, serve_app
from tests.support.server import Server
from tests.support.worker import background_worker, row, submit, wait_for

pytestmark = pytest.mark.anyio

SMALL: dict[str, Any] = {"dataset": "synthetic", "depth": 3, "width": 16, "batch_size": 16, "record_every": 100}
# ~0.5 s of training on one thread: long enough to be killed in the middle of.
KILLABLE = Spec(**SMALL, steps=400)


def integrity(path: Path) -> str:
    """PRAGMA integrity_check of a SQLite file ("ok" when every page and index is consistent)."""
    with sqlite3.connect(path) as connection:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])


def result_sets(engine: Engine, run_ids: list[str]) -> dict[str, tuple[int, int, int]]:
    """Per run: (layers, steps, records) stored, checked to form exactly one complete set."""
    found = {}
    with db.make_sessionmaker(engine)() as session:
        for run_id in run_ids:
            run = session.get(Run, run_id)
            assert run is not None
            spec = Spec.model_validate(run.spec)
            layers = session.scalar(select(func.count()).where(RunLayer.run_id == run_id)) or 0
            steps = session.scalar(select(func.count()).where(RunStep.run_id == run_id)) or 0
            recorded = session.execute(
                select(func.count(), func.count(func.distinct(RunRecord.step))).where(RunRecord.run_id == run_id)
            ).one()
            records, recorded_steps = int(recorded[0]), int(recorded[1])
            assert steps == spec.steps, (run_id, steps)
            assert recorded_steps == len({*range(0, spec.steps, spec.record_every), spec.steps - 1}), run_id
            assert records == layers * recorded_steps, (run_id, layers, records)
            found[run_id] = (layers, steps, records)
    return found


# --- workers killed with SIGKILL at random moments ---------------------------------------------------

# A real worker process whose commit of a run's results pauses inside its transaction (rows inserted,
# not yet committed) and says so, so the test can kill it mid-commit as well as at any other moment.
PAUSING_WORKER: Final = """
import sys, time
from graddiag.service.settings import Settings
from graddiag.service.worker import queue
from graddiag.service.worker.worker import worker_main

insert_rows = queue.insert_report_rows

def insert_then_pause(connection, rows):
    insert_rows(connection, rows)
    print("COMMITTING", flush=True)
    time.sleep(float(sys.argv[1]))

queue.insert_report_rows = insert_then_pause
worker_main(Settings())
"""
COMMIT_PAUSE_S = 0.3
STARTED = re.compile(r"run (\w+): attempt \d+ started")
SUCCEEDED = re.compile(r"run (\w+): (healthy|vanishing|exploding) in")
KILL_SEED = 20240607


class WorkerProcess:
    """The pausing worker in a subprocess; its output is followed line by line to know where it is."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PAUSING_WORKER, str(COMMIT_PAUSE_S)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.phase = "before_claim"
        self.succeeded: list[str] = []
        self._log = log
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        with self._log.open("a") as log:
            for line in self.proc.stdout:
                log.write(line)
                self.lines.put(line)

    def _read(self, timeout: float | None) -> str | None:
        try:
            line = self.lines.get(timeout=timeout) if timeout else self.lines.get_nowait()
        except queue.Empty:
            return None
        if STARTED.search(line):
            self.phase = "mid_training"
        elif "COMMITTING" in line:
            self.phase = "mid_commit"
        elif match := SUCCEEDED.search(line):
            self.phase = "between_runs"
            self.succeeded.append(match.group(1))
        return line

    def wait_for(self, phase: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.phase != phase:
            assert time.monotonic() < deadline and self.proc.poll() is None, f"worker never reached {phase}"
            self._read(0.05)

    def kill(self) -> str:
        """SIGKILL; returns the phase the worker was in (from every line it printed before dying)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        while self._read(None if self.lines.empty() else 0.01) is not None:
            pass
        return self.phase

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0
        while self._read(None) is not None:
            pass


@pytest.mark.slow
def test_worker_killed_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "graddiag.db"
    url = f"sqlite:///{path}"
    db.upgrade(url)
    engine = db.make_engine(url)
    ids = [submit(engine, KILLABLE.model_copy(update={"seed": seed})) for seed in range(20)]
    env = {
        **os.environ,
        "GRADDIAG_DB_URL": url,
        "GRADDIAG_LEASE_SECONDS": "1",
        "GRADDIAG_POLL_SECONDS": "0.05",
        "GRADDIAG_MAX_ATTEMPTS": "20",
        "GRADDIAG_EVAL_SAMPLES": "10",
        "GRADDIAG_TORCH_THREADS": "1",
        "GRADDIAG_CACHE_DIR": str(tmp_path / "cache"),
    }
    rng = random.Random(KILL_SEED)
    plan = ["before_claim", "mid_training", "mid_commit"] * 2
    rng.shuffle(plan)
    killed_in: list[str] = []
    succeeded: list[str] = []
    for target in plan:
        worker = WorkerProcess(env, tmp_path / "workers.log")
        if target == "before_claim":
            time.sleep(rng.uniform(0.05, 0.5))  # the interpreter is still importing torch
        elif target == "mid_training":
            worker.wait_for("mid_training")
            time.sleep(rng.uniform(0.0, 0.25))
        else:
            worker.wait_for("mid_commit")
        killed_in.append(worker.kill())
        succeeded += worker.succeeded

    last = WorkerProcess(env, tmp_path / "workers.log")
    wait_for(lambda: all(row(engine, run_id).status == "succeeded" for run_id in ids), 90, "every run to succeed")
    last.stop()
    succeeded += last.succeeded

    log = (tmp_path / "workers.log").read_text()
    assert set(killed_in) >= {"before_claim", "mid_training", "mid_commit"}, killed_in
    runs = [row(engine, run_id) for run_id in ids]
    assert all(run.status == "succeeded" and run.error is None for run in runs)
    # Killed attempts were retried: more attempts than runs, none of them counted as a success twice.
    assert sum(run.attempt for run in runs) > len(runs)
    assert max(Counter(succeeded).values()) == 1 and set(succeeded) <= set(ids), log[-3000:]
    assert len(result_sets(engine, ids)) == 20
    engine.dispose()
    assert integrity(path) == "ok"


# --- the service crashed or stopped in the middle of work --------------------------------------------

SWEEP_BASE: dict[str, Any] = {**SMALL, "steps": 800}


@pytest.mark.slow
def test_service_crash_mid_sweep_then_restart_completes_it(tmp_path: Path) -> None:
    path = tmp_path / "graddiag.db"
    url = f"sqlite:///{path}"
    first = Server(url, tmp_path / "first.log", workers=2, cache=tmp_path / "cache")
    first.wait_ready()
    with Client(first.url) as gd:
        sweep = gd.sweep(SWEEP_BASE, {"depth": [2, 3, 4], "activation": ["relu", "tanh"]})
        deadline = time.monotonic() + 60
        while (counts := gd.sweep_status(sweep["id"])["counts"])["succeeded"] < 1 or counts["running"] < 1:
            assert time.monotonic() < deadline, counts
            time.sleep(0.05)
    # A crash of the whole service: the API process and its workers die at once, mid-run.
    victims = [first.proc.pid, *first.worker_pids()]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    first.proc.wait(10)

    second = Server(url, tmp_path / "second.log", workers=2, cache=tmp_path / "cache")
    try:
        second.wait_ready()
        with Client(second.url) as gd:
            done = gd.wait_sweep(sweep["id"], timeout=90, poll=0.2)
    finally:
        second.stop()
    assert done["total"] == 6 and done["counts"]["succeeded"] == 6, done
    engine = db.make_engine(url)
    ids = [point["run_id"] for point in done["runs"]]
    assert len(result_sets(engine, ids)) == 6
    # The runs the crash interrupted were requeued when their lease ran out and ran again.
    assert max(row(engine, run_id).attempt for run_id in ids) >= 2
    engine.dispose()
    assert integrity(path) == "ok"


@pytest.mark.slow
def test_sigterm_finishes_or_requeues_running_runs(tmp_path: Path) -> None:
    path = tmp_path / "graddiag.db"
    url = f"sqlite:///{path}"
    server = Server(url, tmp_path / "serve.log", workers=2, cache=tmp_path / "cache")
    server.wait_ready()
    # Two workers, two runs: one ends within the workers' 10 s grace, the other would take far longer.
    short = Spec(**{**SMALL, "steps": 2500})
    long = Spec(**{**SMALL, "depth": 6, "width": 128, "batch_size": 128, "steps": 5000})
    with Client(server.url) as gd:
        ids = [gd.submit(spec)["id"] for spec in (short, long)]
        deadline = time.monotonic() + 30

        def started(run: dict[str, Any]) -> bool:
            # The short run can finish (about 1 s of training) before its first progress report.
            return bool((run["progress"] or {}).get("step")) or run["status"] == "succeeded"

        while not all(started(gd.get(run_id)) for run_id in ids):
            assert time.monotonic() < deadline, server.tail()
            time.sleep(0.05)
    server.stop(timeout=40)  # SIGTERM; asserts exit status 0 and no worker left behind

    engine = db.make_engine(url)
    finished, released = (row(engine, run_id) for run_id in ids)
    assert finished.status == "succeeded" and finished.attempt == 1
    assert released.status == "queued" and released.lease_owner is None and released.attempt == 1
    with db.make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).where(Run.status == "running")) == 0
    assert len(result_sets(engine, [finished.id])) == 1
    engine.dispose()
    assert integrity(path) == "ok"


@pytest.mark.slow
def test_a_worker_stopped_past_its_lease_writes_nothing_when_it_resumes(tmp_path: Path) -> None:
    path = tmp_path / "graddiag.db"
    url = f"sqlite:///{path}"
    server = Server(url, tmp_path / "serve.log", workers=2, cache=tmp_path / "cache")  # 2 s leases
    engine = db.make_engine(url)
    stopped: int | None = None
    try:
        server.wait_ready()
        # ~8 s of training: still running when it is stopped, well after its first progress report.
        spec = {**SMALL, "depth": 4, "width": 64, "batch_size": 64, "steps": 5000}
        run_id = httpx.post(f"{server.url}/v1/runs", json=spec).json()["id"]
        wait_for(lambda: (row(engine, run_id).progress or {}).get("step", 0) > 0, 60, "the run to train")
        owner = row(engine, run_id).lease_owner
        assert owner is not None
        stopped = int(owner.rsplit("-", 2)[1])  # lease owners are host-pid-suffix
        os.kill(stopped, signal.SIGSTOP)
        # Frozen past its lease: the other worker's reaper requeues the run and that worker runs it again.
        wait_for(lambda: row(engine, run_id).status == "succeeded", 90, "the other worker to finish the run")
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        # Resumed, the first worker learns the run is no longer its own and writes nothing.
        wait_for(lambda: f"run {run_id}: lease lost" in server.log.read_text(), 30, "the resumed worker to give up")
        time.sleep(1.0)  # time for a late write, were it possible
        run = row(engine, run_id)
        assert run.status == "succeeded" and run.attempt == 2 and run.lease_owner is None
        assert len(result_sets(engine, [run_id])) == 1
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        server.stop()
        engine.dispose()
    assert integrity(path) == "ok"


# --- the database locked by another process, or its disk full ----------------------------------------

LOCK_HOLDER: Final = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
"""
LOCK_SECONDS = 3.0


@pytest.fixture
def fault_settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'graddiag.db'}"
    db.upgrade(url)
    # A long lease: a result saved by retrying is saved by the same attempt, not by a re-run.
    return Settings(
        db_url=url,
        cache_dir=tmp_path / "cache",
        lease_seconds=60,
        poll_seconds=0.05,
        eval_samples=10,
        api_busy_timeout_seconds=0.5,
    )


@pytest.fixture
def impatient_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers whose SQLite connections give up on a lock after 0.2 s (not 30), to exercise their retries."""
    from graddiag.service.worker import worker

    monkeypatch.setattr(worker, "make_engine", functools.partial(db.make_engine, busy_timeout=0.2))


class Gate:
    """Holds a worker between training and storing the results, so a fault can start exactly there."""

    def __init__(self) -> None:
        self.trained = threading.Event()
        self.resume = threading.Event()

    async def wait_trained(self) -> None:
        deadline = time.monotonic() + 60
        while not self.trained.is_set():
            assert time.monotonic() < deadline, "the run never finished training"
            await anyio.sleep(0.02)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """Workers' run_probe returns only once the test opens the gate (the heartbeat goes on meanwhile)."""
    from graddiag.service.worker import worker

    gate, probe = Gate(), worker.run_probe

    def run_then_wait(*args: Any, **kwargs: Any) -> Any:
        report = probe(*args, **kwargs)
        gate.trained.set()
        assert gate.resume.wait(60)
        return report

    monkeypatch.setattr(worker, "run_probe", run_then_wait)
    yield gate
    gate.resume.set()


async def _finished(api: httpx.AsyncClient, run_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (run := (await api.get(f"/v1/runs/{run_id}")).json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, run
        await anyio.sleep(0.05)
    return run


def _assert_unavailable(response: httpx.Response) -> None:
    body = assert_problem(response, 503, "database_unavailable")
    assert response.headers["retry-after"].isdigit() and int(response.headers["retry-after"]) > 0
    assert "sqlite" not in response.text.lower() and "runs" not in body["detail"]


async def test_locked_database_gives_503_and_workers_retry(
    fault_settings: Settings, impatient_workers: None, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    path = Path(fault_settings.db_url.removeprefix("sqlite:///"))
    async with serve_app(fault_settings) as api:
        with background_worker(fault_settings, grace_seconds=0):
            run_id = (await api.post("/v1/runs", json=KILLABLE.model_dump())).json()["id"]
            await gate.wait_trained()
            holder = subprocess.Popen(
                [sys.executable, "-c", LOCK_HOLDER, str(path), str(LOCK_SECONDS)], stdout=subprocess.PIPE, text=True
            )
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            started = time.monotonic()
            _assert_unavailable(await api.post("/v1/runs", json=KILLABLE.model_dump()))
            # The short API busy timeout answers within a second, not after SQLite's 30 s default.
            assert time.monotonic() - started < LOCK_SECONDS
            # Reads take no lock: the run, the listing and the dashboard still answer while writes cannot.
            assert (await api.get(f"/v1/runs/{run_id}")).json()["status"] == "running"
            assert (await api.get("/v1/runs")).json()["total"] == 1
            assert (await api.get(f"/runs/{run_id}")).status_code == 200
            assert time.monotonic() - started < LOCK_SECONDS
            assert (await api.get("/healthz")).status_code == 200
            gate.resume.set()  # the worker stores the results while the lock is still held
            assert holder.wait(30) == 0

            run = await _finished(api, run_id)
            after = await api.post("/v1/runs", json=KILLABLE.model_dump())
            assert after.status_code == 202
            assert (await _finished(api, after.json()["id"]))["status"] == "succeeded"
    # Storing the results failed while the lock was held, was retried and succeeded, in the same attempt.
    # Only the submit made during the lock was refused: two runs in all.
    assert run["status"] == "succeeded" and run["attempt"] == 1, run
    assert f"run {run_id}: complete: database unavailable (database is locked)" in caplog.text
    engine = db.make_engine(fault_settings.db_url)
    with db.make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 2
    assert len(result_sets(engine, [run_id])) == 1
    engine.dispose()
    assert integrity(path) == "ok"


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        message = f"a small tmpfs is how this test fills a disk; mount failed: {mounted.stderr.decode().strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root, as in CI), unmounted afterwards."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "4m")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)
    return filler


async def test_full_disk_gives_503_and_loses_nothing(
    small_disk: Path, tmp_path: Path, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    path = small_disk / "graddiag.db"
    url = f"sqlite:///{path}"
    db.upgrade(url)
    settings = Settings(db_url=url, cache_dir=tmp_path / "cache", lease_seconds=60, poll_seconds=0.05, eval_samples=10)
    async with serve_app(settings) as api:
        with background_worker(settings, grace_seconds=0):
            run_id = (await api.post("/v1/runs", json=KILLABLE.model_dump())).json()["id"]
            await gate.wait_trained()
            filler = _fill(small_disk)
            _assert_unavailable(await api.post("/v1/runs", json=KILLABLE.model_dump()))
            # Reads need no space: the service still answers them.
            assert (await api.get(f"/v1/runs/{run_id}")).status_code == 200
            # Storing the results fails while the disk is full and is retried until space is freed.
            gate.resume.set()
            failed = f"run {run_id}: complete: database unavailable (database or disk is full)"
            deadline = time.monotonic() + 30
            while failed not in caplog.text:
                assert time.monotonic() < deadline, "storing the results never failed"
                await anyio.sleep(0.05)
            filler.unlink()
            run = await _finished(api, run_id)
            after = await api.post("/v1/runs", json=KILLABLE.model_dump())
            assert after.status_code == 202
            assert (await _finished(api, after.json()["id"]))["status"] == "succeeded"
    assert run["status"] == "succeeded" and run["attempt"] == 1, run
    engine = db.make_engine(url)
    with db.make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 2
    assert len(result_sets(engine, [run_id])) == 1
    engine.dispose()
    assert integrity(path) == "ok"


# --- runs that would blow up memory or time ------------------------------------------------------------


async def test_spec_over_the_memory_cap_is_refused_naming_its_size_fields(fault_settings: Settings) -> None:
    settings = fault_settings.model_copy(update={"max_run_memory_mb": 128})
    big = {**SMALL, "depth": 4, "width": 1024, "batch_size": 1024}
    async with serve_app(settings) as api:
        body = assert_problem(await api.post("/v1/runs", json=big), 422, "validation_error")
        assert {tuple(e["loc"]) for e in body["errors"]} == {("body", f) for f in ("depth", "width", "batch_size")}
        assert all(e["type"] == "over_cap" and "max_run_memory_mb=128" in e["msg"] for e in body["errors"])
        assert (await api.post("/v1/runs", json={**big, "width": 64})).status_code == 202

        sweep = await api.post("/v1/sweeps", json={"base": big, "grid": {"width": [64, 1024]}})
        body = assert_problem(sweep, 422, "sweep_invalid")
        assert {tuple(e["loc"]) for e in body["errors"]} == {("grid", 1, f) for f in ("depth", "width", "batch_size")}
        assert (await api.get("/v1/runs")).json()["total"] == 1


async def test_run_over_its_time_limit_fails_with_the_reason(fault_settings: Settings) -> None:
    settings = fault_settings.model_copy(update={"run_timeout_seconds": 0.5})
    async with serve_app(settings) as api:
        with background_worker(settings):
            run_id = (await api.post("/v1/runs", json={**SMALL, "steps": 5000})).json()["id"]
            run = await _finished(api, run_id)
    assert run["status"] == "failed" and run["report"] is None
    assert run["error"].startswith("ProbeTimeout: wall-clock limit reached at step ")
    assert "run_timeout_seconds=0.5" in run["error"]


# --- chaos: all of it at once, on a seeded schedule -------------------------------------------------------

CHAOS_SEED: Final = 20261201
# 30 tiny runs of about a second each: the sweep is still going while every fault of the schedule lands.
CHAOS_BASE: Final[dict[str, Any]] = {**SMALL, "width": 16, "batch_size": 16, "steps": 400, "record_every": 100}
CHAOS_GRID: Final[dict[str, list[Any]]] = {"depth": [1, 2, 3], "seed": list(range(10))}
# Each fault at least once; the seed orders them and picks the victims and the pauses.
CHAOS_FAULTS: Final = ["kill_worker", "kill_worker", "kill_serve", "lock", "full_disk"]
DISK_FULL: Final = "database or disk is full"
# Every wait of the test comes out of this budget: it takes about a minute on two busy cores (most of it
# starting serve and its workers, three times), and fails rather than hang past this.
CHAOS_BUDGET_S: Final = 110.0


class Chaos:
    """`serve` on a database on a small disk, and the faults the schedule throws at it."""

    def __init__(self, tmp_path: Path, disk: Path, rng: random.Random) -> None:
        self.tmp_path = tmp_path
        self.disk = disk
        self.path = disk / "graddiag.db"
        self.url = f"sqlite:///{self.path}"
        self.rng = rng
        self.logs: list[Path] = []
        self.done: list[str] = []
        self.deadline = time.monotonic() + CHAOS_BUDGET_S
        self.server = self._start()

    def left(self, at_most: float) -> float:
        """A wait's timeout: `at_most`, cut to what is left of the test's budget."""
        return max(0.1, min(at_most, self.deadline - time.monotonic()))

    def _start(self) -> Server:
        log = self.tmp_path / f"serve-{len(self.logs)}.log"  # logs stay off the small disk
        self.logs.append(log)
        server = Server(self.url, log, workers=2, cache=self.tmp_path / "cache")
        server.wait_ready(self.left(90))
        return server

    def log_text(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)

    def statuses(self) -> Counter[str]:
        # Read-only and brief: WAL readers never wait for the lock holder or the writers.
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5) as connection:
            return Counter(status for (status,) in connection.execute("SELECT status FROM runs"))

    def training_workers(self) -> list[int]:
        """The pids of serve's workers that hold a running run (lease owners are host-pid-suffix)."""
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5) as connection:
            owners = [owner for (owner,) in connection.execute("SELECT lease_owner FROM runs WHERE status='running'")]
        holding = {int(owner.rsplit("-", 2)[1]) for owner in owners if owner}
        return sorted(holding & set(self.server.worker_pids()))

    def kill_worker(self) -> None:
        """SIGKILL one of serve's workers in the middle of a run; the pool starts another."""
        training: list[int] = []

        def found() -> bool:
            training[:] = self.training_workers()
            return bool(training)

        wait_for(found, self.left(30), "a worker training a run")
        os.kill(self.rng.choice(training), signal.SIGKILL)

    def kill_serve(self) -> None:
        """SIGKILL serve itself (its workers must follow it), then start a new one on the same database."""
        workers = self.server.worker_pids()
        os.kill(self.server.proc.pid, signal.SIGKILL)
        self.server.proc.wait(10)
        wait_for(lambda: not [pid for pid in workers if _running(pid)], self.left(10), "the orphaned workers to exit")
        self.server = self._start()

    def lock(self) -> None:
        """Another process holds the database's write lock for 1-3 s."""
        seconds = self.rng.uniform(1.0, 3.0)
        holder = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(self.path), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert holder.wait(self.left(30)) == 0

    def full_disk(self) -> None:
        """Fill the disk until a write of the service fails with 'database or disk is full', then free it."""
        before = self.log_text().count(DISK_FULL)
        filler = _fill(self.disk)
        try:
            wait_for(
                lambda: self.log_text().count(DISK_FULL) > before, self.left(30), "a write to fail on the full disk"
            )
        finally:
            filler.unlink()

    def run(self, fault: str) -> None:
        time.sleep(self.rng.uniform(0.2, 1.5))
        getattr(self, fault)()
        self.done.append(fault)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; PID 1 reaps it


@pytest.mark.slow
def test_chaos_sweep_survives_kills_restarts_locks_and_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "16m")
    # A run may be interrupted by several faults: attempts must not run out before the faults do.
    monkeypatch.setenv("GRADDIAG_MAX_ATTEMPTS", "20")
    rng = random.Random(CHAOS_SEED)
    schedule = list(CHAOS_FAULTS)
    rng.shuffle(schedule)
    chaos: Chaos | None = None
    try:
        chaos = Chaos(tmp_path, disk, rng)
        sweep = httpx.post(f"{chaos.server.url}/v1/sweeps", json={"base": CHAOS_BASE, "grid": CHAOS_GRID}, timeout=30)
        assert sweep.status_code == 202, sweep.text
        ids = [point["run_id"] for point in sweep.json()["runs"]]
        assert len(ids) == 30
        wait_for(lambda: chaos is not None and chaos.statuses()["running"] > 0, chaos.left(60), "the sweep to start")
        for fault in schedule:
            chaos.run(fault)
        assert chaos.statuses()["succeeded"] < 30, "the sweep ended before the faults did: they tested nothing"
        wait_for(
            lambda: chaos is not None and chaos.statuses()["succeeded"] == 30, chaos.left(90), "every run to succeed"
        )
        chaos.server.stop()  # SIGTERM: exit status 0, no worker left behind

        assert chaos.done == schedule and set(schedule) == set(CHAOS_FAULTS)
        log = chaos.log_text()
        engine = db.make_engine(chaos.url)
        runs = [row(engine, run_id) for run_id in ids]
        assert all(run.status == "succeeded" and run.error is None for run in runs), Counter(r.status for r in runs)
        # Exactly once: one complete set of records each, and no run's success logged twice.
        assert len(result_sets(engine, ids)) == 30
        successes = Counter(match.group(1) for match in SUCCEEDED.finditer(log))
        assert set(successes) <= set(ids) and max(successes.values()) == 1, successes.most_common(3)
        # The faults bit: killed attempts were retried, and a write failed on the full disk.
        assert sum(run.attempt for run in runs) > 30
        assert DISK_FULL in log
        engine.dispose()
        assert integrity(chaos.path) == "ok"
    finally:
        if chaos is not None and chaos.server.proc.poll() is None:
            workers = chaos.server.worker_pids()
            chaos.server.proc.kill()
            chaos.server.proc.wait(10)
            for pid in workers:
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(disk)], check=False)
