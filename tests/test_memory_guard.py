"""The worker's hard memory limit: a run over it fails alone with a clear error, the worker goes on."""

from __future__ import annotations

import mmap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from graddiag.models.spec import Spec
from graddiag.service.engine.probe import run_probe
from graddiag.service.settings import Settings
from graddiag.service.store import db
from graddiag.service.store.runs import create_run, get_run
from graddiag.service.worker import memory_guard
from graddiag.service.worker.memory_guard import (
    MemoryGuard,
    MemoryLimitExceeded,
    guard_for,
    pin_malloc_mmap_threshold,
    private_resident_bytes,
    resident_bytes,
)
from graddiag.service.worker.worker import run_worker

MIB = 2**20
CHUNK = 16 * MIB


def _grow_until_stopped(guard_limit_mib: float, chunks: int = 64) -> tuple[list[torch.Tensor], float]:
    """Allocate (and touch) 16 MiB per module call until the guard raises; the MiB held when it did."""
    layer = nn.Identity()
    held: list[torch.Tensor] = []
    with MemoryGuard(guard_limit_mib, 1.0, poll_interval_s=0.005):
        for _ in range(chunks):
            layer(torch.zeros(1))  # the guard's hook runs at every module call
            held.append(torch.ones(CHUNK // 4))
            time.sleep(0.01)  # one poll of the watchdog per chunk
    return held, len(held) * CHUNK / MIB


def test_resident_memory_is_read_and_the_threshold_pinned() -> None:
    before = resident_bytes()
    block = torch.ones(64 * MIB // 4)
    after = resident_bytes()
    assert before is not None and after is not None
    assert after - before >= 60 * MIB
    del block
    assert pin_malloc_mmap_threshold()  # glibc on Linux: the bench and the worker rely on it


def test_the_guard_counts_a_runs_tensors_not_a_mapped_files_pages(tmp_path: Path) -> None:
    # The CIFAR-10 cache is memory-mapped: reading it maps page cache into the process, not run memory.
    path = tmp_path / "data.bin"
    path.write_bytes(b"\1" * (64 * MIB))
    total, private = resident_bytes(), private_resident_bytes()
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == 64 * MIB // 4096
        total_after, private_after = resident_bytes(), private_resident_bytes()
    assert total is not None and private is not None and total_after is not None and private_after is not None
    assert total_after - total >= 60 * MIB
    assert private_after - private < 8 * MIB
    block = torch.ones(64 * MIB // 4)
    grown = private_resident_bytes()
    assert grown is not None and grown - private_after >= 60 * MIB
    del block


def test_a_block_over_its_limit_raises_at_the_next_module_call() -> None:
    with pytest.raises(MemoryLimitExceeded) as raised:
        _grow_until_stopped(64)
    message = str(raised.value)
    assert message.startswith("run exceeded its memory limit of 64 MiB (estimate 1 MiB)"), message
    assert "lower depth, width or batch_size" in message


def test_a_block_under_its_limit_runs_to_the_end() -> None:
    held, mib = _grow_until_stopped(4096, chunks=8)
    assert len(held) == 8 and mib == 128


def test_should_stop_raises_once_over_and_asks_the_caller_otherwise() -> None:
    guard = MemoryGuard(100, 10)
    asked: list[bool] = []

    def inner() -> bool:
        asked.append(True)
        return True

    poll = guard.should_stop(inner)
    with guard:
        assert poll() is True and asked == [True]
        guard.exceeded = True
        with pytest.raises(MemoryLimitExceeded):
            poll()
        guard.exceeded = False


def test_only_the_guarded_thread_is_interrupted_and_a_finished_block_still_fails() -> None:
    errors: list[BaseException] = []
    with pytest.raises(MemoryLimitExceeded), MemoryGuard(100, 10) as guard:
        guard.exceeded = True

        def elsewhere() -> None:
            try:
                nn.Identity()(torch.zeros(1))
                guard.check()
            except BaseException as exc:  # the test asserts there was none
                errors.append(exc)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
    assert errors == []


def test_the_limit_is_the_cap_or_one_and_a_half_estimates() -> None:
    spec = Spec(arch="cnn", depth=1, width=256, batch_size=1024, activation="softsign")
    big = guard_for(spec, 4096, 2000)
    assert big.estimate_mib > 4096 and big.limit_mib == pytest.approx(1.5 * big.estimate_mib)
    small = guard_for(Spec(depth=2, width=8, batch_size=4), 4096, 10)
    assert small.limit_mib == 4096


def test_worker_fails_the_run_over_its_limit_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An estimate that is wrong (1 MiB for a run that needs hundreds) under a 48 MiB cap: the guard, not
    # the estimate, must stop it, and the next run must train normally in the same worker.
    url = f"sqlite:///{tmp_path / 'graddiag.db'}"
    db.upgrade(url)
    settings = Settings(
        db_url=url,
        data_dir=tmp_path / "no-cifar-here",
        cache_dir=tmp_path / "cache",
        lease_seconds=30.0,
        poll_seconds=0.05,
        eval_samples=50,
        max_run_memory_mb=48,
    )
    big = Spec(dataset="synthetic", arch="cnn", depth=1, width=64, batch_size=512, activation="softsign", steps=3)
    small = Spec(dataset="synthetic", depth=2, width=8, batch_size=8, steps=3)
    run_probe(small, eval_samples=10)  # torch's first-use allocations belong to no run
    monkeypatch.setattr(memory_guard, "estimate_run_memory_mb", lambda spec, eval_samples: 1.0)
    engine = db.make_engine(url)
    try:
        with db.make_sessionmaker(engine)() as session:
            big_id = create_run(session, big)[0].id
            small_id = create_run(session, small)[0].id
        run_worker(settings, max_runs=2)
        with db.make_sessionmaker(engine)() as session:
            failed, succeeded = get_run(session, big_id), get_run(session, small_id)
    finally:
        engine.dispose()
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.startswith("MemoryLimitExceeded: run exceeded its memory limit of 48 MiB (estimate 1 MiB)")
    assert succeeded.status == "succeeded", succeeded.error
