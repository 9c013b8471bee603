"""Ray dispatcher benchmark: sweep throughput with 1 and 2 Ray workers on this machine.

For each worker count N: a local Ray head with num_cpus=N on 127.0.0.1 (one CPU per run, so N runs train
at once), a fresh SQLite store, and `run_dispatcher` in this process (the Ray driver). N tiny runs warm
every Ray worker process first (torch import, first-run initialisation: timed as `warm_up_s`); then a
sweep of `--runs` points of bench.service's SWEEP_SPEC (seeds 0..runs-1) is created in one transaction
and timed from its creation until every run has succeeded: runs/minute = 60 * runs / seconds. The same
spec as bench.service's worker-split sweep, so the figures compare with plain `graddiag worker`s.
`median_run_s` is one run's own training time (its report's timing): when it grows with N, the runs in
flight are competing for cores (other load on the machine, or fewer free cores than N);
`bare_processes_run_s` is the same figure for N plain processes training at once without Ray or a
database, i.e. what the machine itself allows. Each count is measured `--repeats` times, interleaved
with the others; the medians are the figures.

    python -m bench.dispatch [--runs 20] [--workers 1,2] [--repeats 3] [--out-dir bench/results]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from sqlalchemy import Engine, select

from bench.service import SWEEP_SPEC, TINY
from graddiag.models.spec import SpecCaps
from graddiag.service.dispatch.dispatcher import run_dispatcher
from graddiag.service.dispatch.tasks import NAMESPACE
from graddiag.service.engine.probe import run_probe
from graddiag.service.settings import Settings
from graddiag.service.store import db
from graddiag.service.store.runs import create_run
from graddiag.service.store.sweeps import create_sweep, sweep_status
from graddiag.service.store.tables import Run

RESULTS = Path(__file__).parent / "results"


def _wait_succeeded(engine: Engine, ids: list[str], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as connection:
            statuses = set(connection.execute(select(Run.status).where(Run.id.in_(ids))).scalars())
        if statuses == {"succeeded"}:
            return
        if statuses & {"failed", "cancelled"}:
            raise RuntimeError(f"{what}: a run did not succeed ({statuses})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _bare_run_seconds(_: int) -> float:
    """Median training time of SWEEP_SPEC runs in a plain process (no Ray), after one warm-up run."""
    torch.set_num_threads(1)
    run_probe(SWEEP_SPEC)
    return statistics.median(run_probe(SWEEP_SPEC.model_copy(update={"seed": s})).timing.total_s for s in range(5))


def bare_processes(workers: int) -> float:
    """One run's training time when `workers` plain processes train at once: what the machine allows."""
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return round(statistics.median(pool.map(_bare_run_seconds, range(workers))), 3)


def bench_workers(tmp: Path, workers: int, runs: int) -> dict[str, Any]:
    """Warm-up and sweep times of a local Ray head with `workers` CPUs."""
    tmp.mkdir(parents=True)
    url = f"sqlite:///{tmp / f'dispatch-{workers}.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    factory = db.make_sessionmaker(engine)
    settings = Settings(db_url=url, cache_dir=tmp / "cache", torch_threads=1)
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    stop = threading.Event()
    dispatcher = threading.Thread(target=run_dispatcher, args=(settings,), kwargs={"stop": stop}, daemon=True)
    try:
        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=ray_dir,
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
        )
        dispatcher.start()
        started = time.perf_counter()
        with factory() as session:
            warm = [create_run(session, TINY.model_copy(update={"seed": 1000 + i}))[0].id for i in range(workers)]
        _wait_succeeded(engine, warm, 300, "the warm-up runs")
        warm_up_s = time.perf_counter() - started

        started = time.perf_counter()
        with factory() as session:
            base = SWEEP_SPEC.model_dump(exclude={"seed"})
            sweep = create_sweep(session, base, {"seed": list(range(runs))}, caps=SpecCaps(), max_size=runs)
            ids = [r.run_id for r in sweep_status(session, sweep.id).runs]
        _wait_succeeded(engine, ids, 1800, "the sweep")
        seconds = time.perf_counter() - started
        with engine.connect() as connection:
            timings = connection.execute(select(Run.timing).where(Run.id.in_(ids))).scalars().all()
    finally:
        stop.set()
        if dispatcher.is_alive():
            dispatcher.join(timeout=60)
        ray.shutdown()
        engine.dispose()
        shutil.rmtree(ray_dir, ignore_errors=True)
    return {
        "warm_up_s": round(warm_up_s, 2),
        "seconds": round(seconds, 2),
        "runs_per_minute": round(60 * runs / seconds, 2),
        # Training time of one run inside its task: it grows when the runs in flight compete for cores.
        "median_run_s": round(statistics.median(t["total_s"] for t in timings if t), 3),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dispatch", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="sweep points per worker count")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts (the head's num_cpus), comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per worker count, interleaved")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where dispatch.json goes")
    return parser.parse_args(list(argv) if argv is not None else None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(n) for n in args.workers.split(",") if n]
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_at_start": list(os.getloadavg()),
        "ray": ray.__version__,
        "store": "SQLite (one file per worker count)",
        "runs": args.runs,
        "spec": SWEEP_SPEC.model_dump(mode="json", exclude={"seed"}),
        "method": "local Ray head (num_cpus = workers, 1 CPU and 1 torch thread per run), run_dispatcher in the "
        "bench process; warm-up: one tiny run per worker; sweep timed from creation to the last success",
        "results": [],
    }
    measured: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        # Interleaved (1, 2, 1, 2, ...): a change in the machine's other load hits every count alike.
        for repeat in range(args.repeats):
            for workers in counts:
                row = bench_workers(Path(tmp) / f"{workers}-{repeat}", workers, args.runs)
                print(
                    f"{workers} Ray worker(s): {row['runs_per_minute']} runs/min "
                    f"({args.runs} runs in {row['seconds']} s; warm-up {row['warm_up_s']} s; "
                    f"one run {row['median_run_s']} s)",
                    flush=True,
                )
                measured[workers].append(row)
    for workers, rows in measured.items():
        result["results"].append(
            {
                "ray_workers": workers,
                "runs_per_minute": statistics.median(r["runs_per_minute"] for r in rows),
                "median_run_s": statistics.median(r["median_run_s"] for r in rows),
                # The same runs in as many plain processes at once, without Ray or a database.
                "bare_processes_run_s": bare_processes(workers),
                "measurements": rows,
            }
        )
    if len(counts) >= 2:
        rates = [r["runs_per_minute"] for r in result["results"]]
        result["speedup_last_vs_first"] = round(rates[-1] / rates[0], 2)
    result["load_average_at_end"] = list(os.getloadavg())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "dispatch.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
