"""Service benchmarks: warm-worker pickup latency, sweep throughput per worker split, run listing over
10,000 stored runs, and the CSV export of a 50-layer x 500-step run.

Everything runs against real processes on 127.0.0.1: `graddiag worker` subprocesses claiming from a
temporary SQLite file, and `graddiag serve --workers 0` answering HTTP. Targets (from the product
issue): pickup <= 0.5 s; the default split >= 90 % of the best split's throughput; GET /v1/runs with
filters p95 <= 50 ms; CSV export <= 0.3 s.

    python -m bench.service [--sweep-runs 20] [--list-requests 200] [--only pickup,split,list,csv,memory,readme-sweep]

`memory`: `graddiag serve` with 1..`--memory-workers` workers on CIFAR-10, at rest after every worker
ran a probe: the API process's RSS (target <= 150 MiB, and whether it mapped torch), each worker's PSS
and the PSS each extra worker adds (the data set is one memory-mapped file, shared). `readme-sweep`:
the README's 15-run CIFAR-10 sweep through `graddiag serve` with its default workers, timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, insert, select

from bench.samples import store_random_run
from graddiag.models.spec import Spec
from graddiag.service.serve import available_cores, default_worker_split
from graddiag.service.store import db
from graddiag.service.store.runs import build_run, create_run
from graddiag.service.store.tables import Run

RESULTS = Path(__file__).parent / "results"
TINY = Spec(dataset="synthetic", depth=3, width=16, steps=5, batch_size=16, record_every=1)
# The sweep point whose throughput the worker split is judged on: a real-sized brief probe.
SWEEP_SPEC = Spec(dataset="synthetic", depth=10, width=256, steps=60, batch_size=128, record_every=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def _process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "graddiag.service.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _statuses(engine: Engine, ids: list[str]) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(select(Run.id, Run.status).where(Run.id.in_(ids))).all()
    return {row.id: row.status for row in rows}


def _submit(engine: Engine, spec: Spec) -> str:
    with db.make_sessionmaker(engine)() as session:
        return create_run(session, spec)[0].id


def bench_pickup(tmp: Path, samples: int) -> dict[str, Any]:
    """Seconds from submit (created) to training start (started) on an idle, warm worker."""
    url = f"sqlite:///{tmp / 'pickup.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    latencies = []
    with _process(["worker", "--workers", "1", "--db", url], {}):
        warm = _submit(engine, TINY)
        _wait(lambda: _statuses(engine, [warm])[warm] == "succeeded", 120, "the warm-up run")
        rng = random.Random(0)
        for i in range(samples):
            time.sleep(rng.uniform(0.3, 0.8))  # the worker is idle and polling when the run arrives
            run_id = _submit(engine, TINY.model_copy(update={"seed": i + 1}))
            _wait(lambda rid=run_id: _statuses(engine, [rid])[rid] == "succeeded", 60, "a run")
            with engine.connect() as conn:
                row = conn.execute(select(Run.created_epoch, Run.started_epoch).where(Run.id == run_id)).one()
            latencies.append(row.started_epoch - row.created_epoch)
    engine.dispose()
    return {
        "samples": samples,
        "median_s": round(statistics.median(latencies), 4),
        "max_s": round(max(latencies), 4),
        "target_s": 0.5,
    }


def bench_split(tmp: Path, runs: int) -> dict[str, Any]:
    """Throughput of a `runs`-point sweep for every way of splitting the cores into workers x threads."""
    cores = available_cores()
    splits = sorted({(w, max(1, cores // w)) for w in range(1, cores + 1)})
    default = default_worker_split(cores, 0)
    results = []
    for workers, threads in splits:
        url = f"sqlite:///{tmp / f'split-{workers}x{threads}.db'}"
        db.upgrade(url)
        engine = db.make_engine(url)
        with _process(["worker", "--workers", str(workers), "--torch-threads", str(threads), "--db", url], {}):
            # Warm every worker first, so the sweep measures training, not process start-up.
            warm = [_submit(engine, TINY.model_copy(update={"seed": 1000 + i})) for i in range(workers)]
            _wait(lambda ids=warm, e=engine: set(_statuses(e, ids).values()) == {"succeeded"}, 180, "warm-up")
            ids = [_submit(engine, SWEEP_SPEC.model_copy(update={"seed": i})) for i in range(runs)]
            started = time.perf_counter()
            _wait(lambda ids=ids, e=engine: set(_statuses(e, ids).values()) == {"succeeded"}, 1800, "the sweep")
            elapsed = time.perf_counter() - started
        engine.dispose()
        results.append(
            {
                "workers": workers,
                "threads": threads,
                "seconds": round(elapsed, 2),
                "runs_per_minute": round(60 * runs / elapsed, 2),
                "default": (workers, threads) == default,
            }
        )
    best = max(r["runs_per_minute"] for r in results)
    default_rate = next(r["runs_per_minute"] for r in results if r["default"])
    return {
        "cores": cores,
        "runs": runs,
        "spec": SWEEP_SPEC.model_dump(mode="json"),
        "splits": results,
        "default_split": list(default),
        "default_vs_best": round(default_rate / best, 3),
        "target": 0.9,
    }


def _stored_runs(engine: Engine, count: int) -> None:
    """`count` finished runs with varied specs and verdicts, inserted in one batch."""
    rng = random.Random(1)
    rows = []
    for i in range(count):
        spec = Spec(
            activation=rng.choice(["sigmoid", "tanh", "relu", "gelu"]),
            init=rng.choice(["default", "xavier_normal", "kaiming_normal"]),
            norm=rng.choice(["none", "batch", "layer"]),
            depth=rng.choice([2, 5, 10, 20, 30, 50]),
            width=rng.choice([64, 128, 256]),
            seed=i,
        )
        run = build_run(spec)
        values = {c.key: getattr(run, c.key) for c in Run.__table__.columns if getattr(run, c.key) is not None}
        values.update(status="succeeded", verdict=rng.choice(["healthy", "vanishing", "exploding"]))
        rows.append(values)
    with engine.begin() as conn:
        conn.execute(insert(Run), rows)


@contextmanager
def _api(url: str) -> Iterator[str]:
    port = _free_port()
    with _process(["serve", "--workers", "0", "--port", str(port), "--db", url], {}):
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(up, 60, "the API")
        yield base


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_list_and_csv(tmp: Path, requests: int) -> dict[str, Any]:
    """GET /v1/runs with filters over 10,000 runs, and the CSV export of a 50 x 500 run, over HTTP."""
    url = f"sqlite:///{tmp / 'api.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    _stored_runs(engine, 10_000)
    big = store_random_run(engine, layers=50, steps=500)
    engine.dispose()
    queries = [
        {"activation": "sigmoid"},
        {"activation": "relu", "depth_min": 10, "depth_max": 30},
        {"verdict": "vanishing", "sort": "-depth"},
        {"norm": "none", "init": "default", "limit": 100},
        {"status": "succeeded", "offset": 5000, "limit": 50},
        {"width": 256, "verdict": "healthy", "sort": "lr"},
    ]
    with _api(url) as base, httpx.Client(base_url=base, timeout=30) as client:
        for query in queries:  # warm-up: one of each
            client.get("/v1/runs", params=query).raise_for_status()
        latencies = []
        for i in range(requests):
            started = time.perf_counter()
            response = client.get("/v1/runs", params=queries[i % len(queries)])
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
        total = response.json()["total"]
        csv_times = []
        for _ in range(5):
            started = time.perf_counter()
            response = client.get(f"/v1/runs/{big}/gradients", params={"format": "csv"})
            csv_times.append(time.perf_counter() - started)
            response.raise_for_status()
        csv_lines = response.text.count("\n")
    return {
        "list": {
            "stored_runs": 10_000,
            "requests": requests,
            "p50_ms": round(1000 * _percentile(latencies, 0.5), 2),
            "p95_ms": round(1000 * _percentile(latencies, 0.95), 2),
            "p99_ms": round(1000 * _percentile(latencies, 0.99), 2),
            "last_total": total,
            "target_p95_ms": 50,
        },
        "csv": {
            "layers": 50,
            "steps": 500,
            "lines": csv_lines,
            "bytes": len(response.content),
            "median_s": round(statistics.median(csv_times), 4),
            "max_s": round(max(csv_times), 4),
            "target_s": 0.3,
        },
    }


# --------------------------------------------------------------------------------------------
# Memory of `graddiag serve` at rest, and the README's sweep, on CIFAR-10

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10"
# A small CIFAR-10 probe: enough to make a worker load the data set, little else.
CIFAR_TINY = {"dataset": "cifar10", "depth": 2, "width": 16, "steps": 2, "batch_size": 16, "record_every": 1}
# A cheap probe that draws 51,200 training images (with replacement): it touches most pages of the data
# set, as a worker that has run a few real probes has, so the data's share of a worker's memory shows.
CIFAR_TOUCH = {"dataset": "cifar10", "depth": 1, "width": 8, "steps": 400, "batch_size": 128, "record_every": 100}
# The README's sweep (section "The service").
README_SWEEP_BASE = {"init": "kaiming_normal", "bias_init": "zeros", "width": 256, "steps": 30, "record_every": 5}
README_SWEEP_GRID = {"activation": ["sigmoid", "tanh", "relu"], "depth": [2, 5, 10, 20, 30]}
MIB = 1024.0


def _kib_fields(path: Path, names: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in names:
            out[key] = round(int(value.split()[0]) / MIB, 1)
    return out


def _process_memory(pid: int, mapped: str) -> dict[str, Any]:
    """RSS, PSS (whole process, its anonymous and file-backed parts) and the Rss/Pss of the mappings of `mapped`.

    PSS divides every shared page among the processes that map it: summed over processes it counts each page
    once, so the PSS a worker adds is what it really costs the machine.
    """
    proc = Path(f"/proc/{pid}")
    memory: dict[str, Any] = {
        **_kib_fields(proc / "status", ("VmRSS",)),
        **_kib_fields(proc / "smaps_rollup", ("Pss", "Pss_Anon", "Pss_File")),
    }
    rss = pss = 0
    current = ""
    for line in (proc / "smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            current = fields[5] if len(fields) > 5 else ""
        elif current == mapped and fields[0] in ("Rss:", "Pss:"):
            if fields[0] == "Rss:":
                rss += int(fields[1])
            else:
                pss += int(fields[1])
    memory["data_mapping"] = {"Rss": round(rss / MIB, 1), "Pss": round(pss / MIB, 1)}
    memory["torch_imported"] = any("/torch/" in line for line in (proc / "maps").read_text().splitlines())
    return memory


def _workers_of(pid: int) -> list[int]:
    """The worker processes `graddiag serve` spawned (multiprocessing's resource tracker left out)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


@contextmanager
def _serve(tmp: Path, name: str, workers: int, data_dir: Path, cache_dir: Path) -> Iterator[tuple[str, int]]:
    url = f"sqlite:///{tmp / f'{name}.db'}"
    port = _free_port()
    args = ["serve", "--workers", str(workers), "--port", str(port), "--db", url]
    args += ["--data-dir", str(data_dir), "--cache-dir", str(cache_dir)]
    with _process(args, {}) as proc:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, 120, "serve")
        yield base, proc.pid


def _run_all(base: str, specs: list[dict[str, Any]], timeout: float) -> None:
    ids = [httpx.post(f"{base}/v1/runs", json=spec, timeout=30).json()["id"] for spec in specs]

    def finished() -> bool:
        return all(httpx.get(f"{base}/v1/runs/{i}", timeout=30).json()["status"] == "succeeded" for i in ids)

    _wait(finished, timeout, "the runs")


_LOAD_CHILD = """
import sys, time
import torch
from graddiag.service.engine.data import load_cifar10
started = time.perf_counter()
load_cifar10(sys.argv[1], sys.argv[2])
print("LOAD_S:%.4f" % (time.perf_counter() - started))
"""


def _cache_load_seconds(data_dir: Path, cache_dir: Path, samples: int = 5) -> list[float]:
    """`load_cifar10` from an existing cache in a fresh process (torch already imported): the file is mapped."""
    times = []
    for _ in range(samples):
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_CHILD, str(data_dir), str(cache_dir)],
            capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        times += [float(line.split(":")[1]) for line in done.stdout.splitlines() if line.startswith("LOAD_S:")]
    return times


def _decode_seconds(data_dir: Path, tmp: Path) -> float:
    """`load_cifar10` into an empty cache directory in a fresh process: decoding the images and writing the cache."""
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_CHILD, str(data_dir), str(tmp / "fresh-cache")],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return next(float(line.split(":")[1]) for line in done.stdout.splitlines() if line.startswith("LOAD_S:"))


def bench_memory(tmp: Path, data_dir: Path, cache_dir: Path, max_workers: int) -> dict[str, Any]:
    """`graddiag serve` at rest after every worker ran a CIFAR-10 probe: the API's RSS, each worker's PSS."""
    from graddiag.service.engine.data import load_cifar10

    load_cifar10(data_dir, cache_dir)  # the cache exists before the workers start, as after `make serve` once
    (cache_file,) = sorted(cache_dir.glob("cifar10-*.pt"), key=lambda p: p.stat().st_mtime)[-1:]
    mapped = str(cache_file.resolve())
    rows = []
    for workers in range(1, max_workers + 1):
        with _serve(tmp, f"memory-{workers}", workers, data_dir, cache_dir) as (base, pid):
            pids = _workers_of(pid)
            # Every worker must have loaded the data: submit rounds of runs until each maps the file.
            for round_ in range(20):
                _run_all(base, [{**CIFAR_TOUCH, "seed": round_ * 10 + i} for i in range(workers)], 300)
                if all(_process_memory(w, mapped)["data_mapping"]["Rss"] > 0 for w in pids):
                    break
            time.sleep(3.0)  # at rest: no run in flight
            api = _process_memory(pid, mapped)
            per_worker = [_process_memory(w, mapped) for w in pids]
        rows.append(
            {
                "workers": workers,
                "api": api,
                "worker_memory": per_worker,
                "workers_pss_total_mib": round(sum(w["Pss"] for w in per_worker), 1),
            }
        )
        print(f"  memory with {workers} worker(s): API {api['VmRSS']} MiB RSS, workers PSS "
              f"{[w['Pss'] for w in per_worker]} MiB", flush=True)  # fmt: skip
    extra = [round(b["workers_pss_total_mib"] - a["workers_pss_total_mib"], 1) for a, b in itertools.pairwise(rows)]
    loads = _cache_load_seconds(data_dir, cache_dir)
    decode = _decode_seconds(data_dir, tmp)
    return {
        "decode_s": round(decode, 2),
        "cache_load_s": {"median": round(statistics.median(loads), 3), "max": round(max(loads), 3)},
        "cache_file_mib": round(cache_file.stat().st_size / MIB / MIB, 1),
        "configurations": rows,
        "pss_per_extra_worker_mib": extra,
        "api_rss_mib": max(row["api"]["VmRSS"] for row in rows),
        "api_target_mib": 150,
        "api_torch_imported": any(row["api"]["torch_imported"] for row in rows),
    }


def bench_readme_sweep(tmp: Path, data_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """The README's 15-run sweep on CIFAR-10 through `graddiag serve` with its default workers: wall time, summary."""
    from graddiag.service.serve import plan_workers
    from graddiag.service.settings import Settings

    workers, settings, _ = plan_workers(Settings(workers=None))
    with _serve(tmp, "readme-sweep", workers, data_dir, cache_dir) as (base, _pid):
        # Warm every worker (process start, imports, data set) so the figure is the sweep itself.
        _run_all(base, [{**CIFAR_TINY, "seed": 100 + i} for i in range(workers)], 300)
        started = time.perf_counter()
        sweep = httpx.post(f"{base}/v1/sweeps", json={"base": README_SWEEP_BASE, "grid": README_SWEEP_GRID}, timeout=30)
        sweep_id = sweep.json()["id"]

        def done() -> bool:
            return bool(httpx.get(f"{base}/v1/sweeps/{sweep_id}", timeout=30).json()["done"])

        _wait(done, 3600, "the sweep")
        seconds = time.perf_counter() - started
        summary = httpx.get(f"{base}/v1/sweeps/{sweep_id}/summary", timeout=30).json()
    return {
        "base": README_SWEEP_BASE,
        "grid": README_SWEEP_GRID,
        "runs": 15,
        "workers": workers,
        "torch_threads": settings.torch_threads,
        "seconds": round(seconds, 1),
        "summary": summary,
    }


def _sweep_table(summary: dict[str, Any]) -> list[str]:
    depths = sorted({d for config in summary["configs"] for d in config["depths"]})
    lines = [
        "| activation | "
        + " | ".join(f"depth {d}" if i == 0 else str(d) for i, d in enumerate(depths))
        + " | critical depth |",
        "|---|" + "---|" * len(depths) + "---|",
    ]
    for config in summary["configs"]:
        cells = {}
        for depth, verdict, ratio in zip(config["depths"], config["verdicts"], config["profile_span"], strict=True):
            cells[depth] = f"{verdict}" + (f" ({ratio:+.1f})".replace("-", "−") if ratio is not None else "")
        critical = config["critical_depth"]
        label = ", ".join(str(v) for v in config["config"].values())
        row = [cells.get(d, "—") for d in depths]
        lines.append(f"| {label} | " + " | ".join(row) + f" | {'—' if critical is None else f'**{critical}**'} |")
    return lines


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"Machine: {result['machine']}, {result['date']}", ""]
    if "pickup" in result:
        p = result["pickup"]
        lines.append(
            f"- Warm-worker pickup (submit → training started), {p['samples']} runs: "
            f"median {p['median_s']} s, max {p['max_s']} s (target ≤ {p['target_s']} s)"
        )
    if "list" in result:
        li = result["list"]
        lines.append(
            f"- `GET /v1/runs` with filters over {li['stored_runs']:,} runs, {li['requests']} requests: "
            f"p50 {li['p50_ms']} ms, p95 {li['p95_ms']} ms, p99 {li['p99_ms']} ms (target p95 ≤ 50 ms)"
        )
    if "csv" in result:
        c = result["csv"]
        lines.append(
            f"- CSV export of a {c['layers']}-layer × {c['steps']}-step run ({c['lines']:,} lines, "
            f"{c['bytes'] / 1e6:.1f} MB): median {c['median_s']} s, max {c['max_s']} s (target ≤ 0.3 s)"
        )
    if "split" in result:
        s = result["split"]
        lines += [
            "",
            f"Sweep throughput, {s['runs']} runs of a depth-10, width-256, 60-step probe, {s['cores']} cores:",
            "",
            "| workers × threads | seconds | runs/min | default |",
            "|---|---|---|---|",
        ]
        for r in s["splits"]:
            lines.append(
                f"| {r['workers']} × {r['threads']} | {r['seconds']} | {r['runs_per_minute']} | "
                f"{'yes' if r['default'] else ''} |"
            )
        lines.append(f"\nDefault split reaches {s['default_vs_best']:.0%} of the best (target ≥ 90 %).")
    if "memory" in result:
        m = result["memory"]
        lines += [
            "",
            "Memory of `graddiag serve` at rest, every worker having run a CIFAR-10 probe that drew 51,200 images "
            f"({m.get('date', result['date'])}; the "
            f"decoded CIFAR-10 cache file is {m['cache_file_mib']} MiB, memory-mapped by each worker):",
            "",
            "| workers | API process RSS | API imports torch | each worker: PSS (anon + file) | each worker: the "
            "data set's mapping, RSS / PSS | workers' PSS in all |",
            "|---:|---:|---|---|---|---:|",
        ]
        for row in m["configurations"]:
            api, workers = row["api"], row["worker_memory"]
            pss = ", ".join(f"{w['Pss']} ({w['Pss_Anon']} + {w['Pss_File']})" for w in workers)
            data = ", ".join(f"{w['data_mapping']['Rss']} / {w['data_mapping']['Pss']}" for w in workers)
            lines.append(
                f"| {row['workers']} | {api['VmRSS']} MiB | {'yes' if api['torch_imported'] else 'no'} | {pss} MiB "
                f"| {data} MiB | {row['workers_pss_total_mib']} MiB |"
            )
        lines.append(
            f"\nUnique memory (PSS) each extra worker adds: {', '.join(map(str, m['pss_per_extra_worker_mib']))} MiB; "
            f"API process at most {m['api_rss_mib']} MiB RSS (target ≤ {m['api_target_mib']} MiB). Loading "
            f"CIFAR-10 from the cache in a fresh process (torch imported): median {m['cache_load_s']['median']} s, "
            f"max {m['cache_load_s']['max']} s; decoding it into an empty cache (the first load): {m['decode_s']} s."
        )
    if "readme_sweep" in result:
        r = result["readme_sweep"]
        lines += [
            "",
            f"The README's sweep on CIFAR-10 ({r['runs']} runs, `graddiag serve` with its default {r['workers']} "
            f"worker(s) × {r['torch_threads']} torch thread(s), workers warm; {r.get('date', result['date'])}): "
            f"**{r['seconds']} s**. Verdicts along depth and the fitted span (decades) of the profile the verdict "
            "used:",
            "",
            *_sweep_table(r["summary"]),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the service benchmarks and write bench/results/service.{json,md}."""
    parser = argparse.ArgumentParser(prog="bench.service", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="pickup,list,csv,split,memory,readme-sweep", help="comma-separated subset")
    parser.add_argument("--sweep-runs", type=int, default=20)
    parser.add_argument("--pickup-samples", type=int, default=20)
    parser.add_argument("--list-requests", type=int, default=300)
    parser.add_argument("--memory-workers", type=int, default=2, help="memory: serve with 1..N workers")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("GRADDIAG_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "graddiag")
    args, _ = parser.parse_known_args(argv)
    wanted = set(args.only.split(","))
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {available_cores()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_at_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="graddiag-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if "pickup" in wanted:
            result["pickup"] = bench_pickup(tmp, args.pickup_samples)
        if wanted & {"list", "csv"}:
            result.update(bench_list_and_csv(tmp, args.list_requests))
        if "split" in wanted:
            result["split"] = bench_split(tmp, args.sweep_runs)
        if "memory" in wanted:
            result["memory"] = bench_memory(tmp, args.data_dir, args.cache_dir, args.memory_workers)
        if "readme-sweep" in wanted:
            result["readme_sweep"] = bench_readme_sweep(tmp, args.data_dir, args.cache_dir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # --only refreshes its sections and keeps the others from earlier runs (each section carries its date).
    path = RESULTS / "service.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    sections = {key: {**value, "date": result["date"]} for key, value in result.items() if isinstance(value, dict)}
    merged = {**kept, **result, **sections}
    path.write_text(json.dumps(merged, indent=1))
    (RESULTS / "service.md").write_text(_markdown(merged))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
