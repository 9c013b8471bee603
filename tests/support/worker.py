"""Runs submitted straight to the store, polling for a condition, and worker loops in threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from graddiag.models.spec import Spec
from graddiag.service.settings import Settings
from graddiag.service.store import db
from graddiag.service.store.runs import create_run, get_run
from graddiag.service.store.tables import Run
from graddiag.service.worker.worker import run_worker


def settings_for(url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Worker settings for the store at `url`: no CIFAR-10, short leases and polls, then `overrides`."""
    values: dict[str, Any] = {
        "db_url": url,
        "data_dir": tmp_path / "no-cifar-here",
        "cache_dir": tmp_path / "cache",
        "lease_seconds": 3.0,
        "poll_seconds": 0.05,
        "eval_samples": 50,
        **overrides,
    }
    return Settings(**values)


def submit(engine: Engine, spec: Spec) -> str:
    """Queue a run of `spec` straight in the store; its id."""
    with db.make_sessionmaker(engine)() as session:
        return create_run(session, spec)[0].id


def row(engine: Engine, run_id: str) -> Run:
    """The run's row as it is now."""
    with db.make_sessionmaker(engine)() as session:
        return get_run(session, run_id)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def status_is(engine: Engine, run_id: str, *statuses: str) -> Callable[[], bool]:
    """A condition for wait_for: the run has one of `statuses`."""
    return lambda: row(engine, run_id).status in statuses


@contextmanager
def loop_thread(
    loop: Callable[..., object], settings: Settings, join_seconds: float, **kwargs: Any
) -> Iterator[threading.Thread]:
    """`loop(settings, stop=..., grace_seconds=0.5, **kwargs)` in a thread, stopped (and checked to have
    stopped within `join_seconds`) on exit."""
    stop = threading.Event()
    kwargs = {"stop": stop, "grace_seconds": 0.5, **kwargs}
    thread = threading.Thread(target=loop, args=(settings,), kwargs=kwargs, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=join_seconds)
        assert not thread.is_alive(), f"{getattr(loop, '__name__', loop)} did not stop"


def background_worker(settings: Settings, **kwargs: Any) -> AbstractContextManager[threading.Thread]:
    """run_worker in a thread, stopped (and checked to have stopped) on exit."""
    return loop_thread(run_worker, settings, 30, **kwargs)
