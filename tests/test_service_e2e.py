"""The whole service as users run it: `serve` in a subprocess with real worker processes, over HTTP.

Covers migrations at start, verdicts, a depth sweep, cancellation, a worker killed mid-run, a restart
with queued runs, concurrent clients and clean shutdown. Leases are 2 s so a dead worker's run is
requeued within seconds.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory

from graddiag.service import serve as serve_module
from graddiag.service.client import Client, GraddiagError
from graddiag.service.serve import default_worker_split, plan_workers
from graddiag.service.settings import Settings
from graddiag.service.store.db import MIGRATIONS_DIR, current
from tests.support.server import WORKER_HOST, Server

BASE: dict[str, Any] = {"dataset": "synthetic", "width": 32, "batch_size": 32, "steps": 5, "record_every": 1}
KAIMING: dict[str, Any] = {"init": "kaiming_normal", "bias_init": "zeros"}
# A few seconds of training on one thread: long enough to act on while it runs.
MEDIUM: dict[str, Any] = {**BASE, "depth": 6, "width": 64, "batch_size": 64, "steps": 1000, "record_every": 100}
LONG: dict[str, Any] = {**MEDIUM, "steps": 5000}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("e2e")
    url = f"sqlite:///{tmp / 'fresh' / 'graddiag.db'}"  # neither the file nor its directory exists yet
    srv = Server(url, tmp / "server.log", workers=2, cache=tmp / "cache")
    try:
        srv.wait_ready()
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, timeout=30) as gd:
        yield gd


def _wait_status(client: Client, run_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (run := client.get(run_id))["status"] != status:
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']}, wanted {status}"
        time.sleep(0.05)
    return run


@pytest.mark.slow
def test_migrated_at_start_and_ready(server: Server) -> None:
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert current(server.db_url) == head
    ready = server.wait_ready()
    assert ready["database"]["ok"] and ready["workers"]["detail"] == "2/2 local worker processes alive"
    assert len(server.worker_pids()) == 2


@pytest.mark.slow
def test_verdicts(client: Client) -> None:
    specs = {
        "vanishing": {**BASE, "activation": "sigmoid", "depth": 20},
        "healthy": {**BASE, **KAIMING, "activation": "relu", "depth": 20},
        "exploding": {**BASE, **KAIMING, "activation": "relu", "depth": 5, "lr": 100.0},
    }
    with ThreadPoolExecutor(3) as pool:
        runs = dict(zip(specs, pool.map(lambda s: client.run(s, timeout=90), specs.values()), strict=True))
    for expected, run in runs.items():
        assert run["verdict"] == expected, run["report"]["verdict"]["reasons"]
        assert run["report"]["verdict"]["label"] == expected and run["report"]["verdict"]["reasons"]


@pytest.mark.slow
def test_sweep_finds_sigmoid_critical_depth_below_relu(client: Client) -> None:
    sweep = client.sweep({**BASE, **KAIMING}, {"activation": ["sigmoid", "relu"], "depth": [2, 5, 10, 20]})
    assert sweep["total"] == 8
    assert client.wait_sweep(sweep["id"], timeout=90, poll=0.2)["counts"]["succeeded"] == 8
    summary = {c["config"]["activation"]: c for c in client.sweep_summary(sweep["id"])["configs"]}
    sigmoid, relu = summary["sigmoid"], summary["relu"]
    assert sigmoid["depths"] == relu["depths"] == [2, 5, 10, 20]
    assert sigmoid["critical_depth"] is not None
    assert relu["critical_depth"] is None or relu["critical_depth"] > sigmoid["critical_depth"]
    assert sigmoid["verdicts"][-1] == "vanishing"


@pytest.mark.slow
def test_cancel_queued_and_running(client: Client, server: Server) -> None:
    first, second, third = (client.submit({**LONG, "seed": seed}) for seed in (1, 2, 3))
    # Two workers: the first two run, the third waits in the queue.
    running = [_wait_status(client, r["id"], "running") for r in (first, second)]
    assert client.get(third["id"])["status"] == "queued"
    assert client.cancel(third["id"])["status"] == "cancelled"
    for run in running:
        requested = client.cancel(run["id"])
        assert requested["status"] == "running" and requested["cancel_requested"]
    for run in running:
        _wait_status(client, run["id"], "cancelled", timeout=10)
    with pytest.raises(GraddiagError) as finished:
        client.cancel(first["id"])
    assert finished.value.status == 409


@pytest.mark.slow
def test_killed_worker_run_succeeds_on_attempt_two(client: Client, server: Server) -> None:
    run_id = client.submit(MEDIUM)["id"]
    deadline = time.monotonic() + 30
    while not ((run := client.get(run_id))["progress"] or {}).get("step"):
        assert time.monotonic() < deadline and run["status"] in ("queued", "running"), run
        time.sleep(0.05)
    pid = int(run["worker"].rsplit("-", 2)[1])
    assert pid in server.worker_pids(), (pid, server.worker_pids())
    os.kill(pid, signal.SIGKILL)

    final = client.wait(run_id, timeout=60, poll=0.2)
    assert final["status"] == "succeeded" and final["attempt"] == 2, final
    rows = client.gradients(run_id)
    keys = [(r["step"], r["layer"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert rows == final["report"]["records"]
    steps = sorted({step for step, _ in keys})
    assert steps == [*range(0, 1000, 100), 999]
    assert len(rows) == len(steps) * len(final["report"]["layers"])
    # The supervisor replaced the killed worker.
    deadline = time.monotonic() + 20
    while len(server.worker_pids()) < 2 or pid in server.worker_pids():
        assert time.monotonic() < deadline, server.tail()
        time.sleep(0.2)


@pytest.mark.slow
def test_concurrent_clients(server: Server) -> None:
    def one(seed: int) -> dict[str, Any]:
        with Client(server.url, timeout=30) as gd:
            return gd.run({**BASE, "depth": 3, "seed": seed}, timeout=90)

    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(one, range(100, 108)))
    assert len({r["id"] for r in runs}) == 8 and all(r["status"] == "succeeded" for r in runs)

    barrier = threading.Barrier(8)

    def same_key(_: int) -> str:
        with Client(server.url, timeout=30) as gd:
            barrier.wait()
            return str(gd.submit({**BASE, "depth": 3, "seed": 999}, idempotency_key="one-run")["id"])

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(same_key, range(8)))
    assert len(ids) == 1
    with Client(server.url) as gd:
        assert gd.runs(seed=999)["total"] == 1


@pytest.mark.slow
def test_restart_keeps_queued_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'graddiag.db'}"
    api_only = Server(url, tmp_path / "a.log", workers=0, cache=tmp_path / "cache")
    try:
        api_only.wait_ready()
        with Client(api_only.url) as gd:
            ids = [gd.submit({**BASE, "depth": 3, "seed": seed})["id"] for seed in range(5)]
            assert gd.runs(status="queued")["total"] == 5
    finally:
        api_only.stop()

    restarted = Server(url, tmp_path / "b.log", workers=2, cache=tmp_path / "cache")
    try:
        restarted.wait_ready()
        with Client(restarted.url) as gd:
            for run_id in ids:
                assert gd.wait(run_id, timeout=60, poll=0.1)["status"] == "succeeded"
            assert gd.runs()["total"] == 5
    finally:
        restarted.stop()


@pytest.mark.slow
def test_api_only_server_with_a_separate_worker_host(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'graddiag.db'}"
    api = Server(url, tmp_path / "api.log", workers=0, cache=tmp_path / "cache")
    host = None
    try:
        ready = api.wait_ready()
        assert ready["workers"]["detail"].startswith("no local workers")
        with Client(api.url) as gd:
            run_id = gd.submit({**BASE, "depth": 3})["id"]
            host = Server(url, tmp_path / "host.log", workers=2, cache=tmp_path / "cache", code=WORKER_HOST)
            run = gd.wait(run_id, timeout=60, poll=0.1)
            assert run["status"] == "succeeded", host.tail()
        assert len(host.worker_pids()) == 2
    finally:
        if host is not None:
            host.stop()
        api.stop()


# --- how serve() sizes its worker pool (no server needed) -------------------------------------------


@pytest.mark.parametrize(
    ("cores", "gpus", "split"),
    [
        (1, 0, (1, 1)),
        (2, 0, (2, 1)),
        (3, 0, (3, 1)),
        (16, 0, (16, 1)),
        (16, 1, (1, 16)),
        (16, 4, (4, 4)),
        (2, 8, (8, 1)),  # one worker per GPU even when cores are scarce: the GPU does the work
    ],
)
def test_default_worker_split(cores: int, gpus: int, split: tuple[int, int]) -> None:
    assert default_worker_split(cores, gpus) == split


def test_cpu_split_never_oversubscribes() -> None:
    for cores in range(1, 129):
        workers, threads = default_worker_split(cores, 0)
        assert workers >= 1 and threads >= 1 and workers * threads <= cores


@pytest.mark.parametrize(
    ("workers", "threads", "gpus", "planned"),
    [
        (None, None, [], (8, 1)),  # automatic: one single-threaded worker per core
        (3, None, [], (3, 2)),  # given workers share the cores
        (2, 1, [], (2, 1)),  # both given
        (None, None, ["0", "1"], (2, 4)),  # one per GPU
        (0, None, [], (0, 8)),  # API only
    ],
)
def test_plan_workers(
    monkeypatch: pytest.MonkeyPatch,
    workers: int | None,
    threads: int | None,
    gpus: list[str],
    planned: tuple[int, int],
) -> None:
    monkeypatch.setattr(serve_module, "available_cores", lambda: 8)
    monkeypatch.setattr(serve_module, "cuda_devices", lambda: gpus)
    count, settings, devices = plan_workers(Settings(workers=workers, torch_threads=threads))
    assert (count, settings.torch_threads) == planned
    assert devices == (gpus if workers != 0 else [])
