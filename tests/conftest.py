"""Shared fixtures: the real CIFAR-10 copy (from GRADDIAG_DATA_DIR), the async backend, a migrated
store's `settings`, the app in-process on it (`api`), a `worker` thread, and the app served over real
HTTP (`base_url`, `client`).

The helpers they are built on live in tests/support/.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from graddiag.service.api import create_app
from graddiag.service.client import Client
from graddiag.service.engine.data import ImageSet, load_cifar10
from graddiag.service.settings import Settings
from graddiag.service.store.db import upgrade
from graddiag.service.worker.worker import run_worker
from tests.support.api import serve_app

pytest_plugins = ["tests.pg"]

# Test tensors are tiny: a second intra-op thread only adds contention with the server and worker
# processes the end-to-end tests start beside this one.
torch.set_num_threads(1)


@pytest.fixture
def anyio_backend() -> str:
    """The async tests (pytest's anyio plugin) run on asyncio, as uvicorn serves the API."""
    return "asyncio"


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The real CIFAR-10 copy; under CI a missing copy fails instead of skipping."""
    value = os.environ.get("GRADDIAG_DATA_DIR")
    if not value or not Path(value).is_dir():
        message = f"GRADDIAG_DATA_DIR={value!r} does not point at the CIFAR-10 copy"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(value)


@pytest.fixture(scope="session")
def cifar10_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-data cache for the whole session, so the JPEGs are decoded once."""
    return tmp_path_factory.mktemp("graddiag-cache")


@pytest.fixture(scope="session")
def cifar10_data(cifar10_dir: Path, cifar10_cache: Path) -> tuple[ImageSet, ImageSet]:
    """The decoded (train, test) CIFAR-10 sets."""
    return load_cifar10(cifar10_dir, cifar10_cache)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings of a fresh, migrated SQLite store with short leases and polls."""
    url = f"sqlite:///{tmp_path / 'graddiag.db'}"
    upgrade(url)
    return Settings(
        db_url=url,
        cache_dir=tmp_path / "cache",
        lease_seconds=2,
        poll_seconds=0.02,
        eval_samples=10,
        max_depth=50,
        max_sweep_size=8,
    )


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process with its lifespan running, and an httpx client bound to it."""
    async with serve_app(settings) as client:
        yield client


@pytest.fixture
def worker(settings: Settings) -> Iterator[None]:
    """A real worker loop in a thread of this process; stopped (and its run released) at teardown."""
    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker, args=(settings,), kwargs={"stop": stop, "grace_seconds": 0}, daemon=True
    )
    thread.start()
    yield
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


@pytest.fixture
def base_url(settings: Settings) -> Iterator[str]:
    """The app served by a real uvicorn on a free port of this host, in a background thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def client(base_url: str) -> Iterator[Client]:
    """A Client of the `base_url` server."""
    with Client(base_url, timeout=10) as gd:
        yield gd
