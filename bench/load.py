"""Load benchmark: concurrent scripted clients against a real `graddiag serve`, then an audit of the store.

A `graddiag serve` subprocess on 127.0.0.1 (a temp SQLite file, local workers training tiny synthetic
runs, both access tokens set, as on a shared box) takes a fixed load: `--clients` concurrent clients,
each sending `--requests` requests drawn (seeded) from a mix of submits (``POST /v1/runs`` with an
Idempotency-Key), status polls (``GET /v1/runs/{id}`` of one of its runs) and gradient queries
(``GET /v1/runs/{id}/gradients`` of a run some client has seen succeed). Before the load, one warm-up run
per worker is submitted and awaited, so the workers have imported torch and the gradient queries have
a run to read from the start. The load stops by itself: once every client is done, it waits for the
workers to finish every submitted run, stops the server with SIGTERM and audits the database: every
submitted id exists once, ended succeeded, with exactly one set of records (layers x recorded steps),
nothing else was created, integrity_check is ok.

Reported per request type: count, errors (non-2xx answers or transport failures), throughput over the
load window and latency p50/p95/p99/max. Exit status 1 on any error, lost, duplicated or failed run.

    python -m bench.load [--clients 8] [--requests 60] [--workers 2] [--seed 0] [--out-dir bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from bench.service import _free_port, _percentile, _wait
from graddiag.models.spec import Spec
from graddiag.service.store import db
from graddiag.service.store.tables import Run, RunLayer, RunRecord, RunStep

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
# A tiny run: ~0.1 s of training, 4 layers x 20 recorded steps = 80 gradient rows to query.
RUN_SPEC = Spec(dataset="synthetic", depth=3, width=16, batch_size=16, steps=20, record_every=1)
MIX = {"submit": 0.15, "status": 0.5, "gradients": 0.35}
WRITE_TOKEN = "bench-write-" + uuid.uuid4().hex
READ_TOKEN = "bench-read-" + uuid.uuid4().hex


@dataclass
class Tally:
    """Latencies (seconds) and errors of one request type."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Load:
    """What the clients did: per-type tallies and every run id they submitted."""

    tallies: dict[str, Tally] = field(default_factory=lambda: {kind: Tally() for kind in MIX})
    submitted: list[str] = field(default_factory=list)
    succeeded: set[str] = field(default_factory=set)
    replayed: int = 0


async def _client(base: str, index: int, requests: int, seed: int, load: Load) -> None:
    rng = random.Random(seed * 1000 + index)
    mine: list[str] = []
    auth = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    async with httpx.AsyncClient(base_url=base, headers=auth, timeout=60) as http:
        for number in range(requests):
            kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
            if kind == "status" and not mine:
                kind = "submit"
            run_id = rng.choice(sorted(load.succeeded) if kind == "gradients" else mine) if kind != "submit" else ""
            started = time.perf_counter()
            try:
                if kind == "submit":
                    key = f"load-{seed}-{index}-{number}"
                    body = RUN_SPEC.model_copy(update={"seed": rng.randrange(2**31)}).model_dump(mode="json")
                    response = await http.post("/v1/runs", json=body, headers={"Idempotency-Key": key})
                elif kind == "status":
                    response = await http.get(f"/v1/runs/{run_id}")
                else:
                    response = await http.get(f"/v1/runs/{run_id}/gradients")
            except httpx.HTTPError as exc:
                load.tallies[kind].errors.append(f"{type(exc).__name__}: {exc}")
                continue
            load.tallies[kind].latencies.append(time.perf_counter() - started)
            if response.is_error:
                load.tallies[kind].errors.append(f"{response.status_code}: {response.text[:200]}")
                continue
            if kind == "submit":
                mine.append(response.json()["id"])
                load.submitted.append(mine[-1])
                load.replayed += response.headers.get("idempotent-replayed") == "true"
            elif kind == "status" and response.json()["status"] == "succeeded":
                load.succeeded.add(run_id)


async def _warm_up(base: str, workers: int, load: Load) -> None:
    auth = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    async with httpx.AsyncClient(base_url=base, headers=auth, timeout=120) as http:
        bodies = [RUN_SPEC.model_copy(update={"seed": -1 - i + 2**31}).model_dump(mode="json") for i in range(workers)]
        runs = await asyncio.gather(*(http.post("/v1/runs", json=b, params={"wait": 90}) for b in bodies))
    for response in runs:
        response.raise_for_status()
        if response.json()["status"] != "succeeded":
            raise RuntimeError(f"warm-up run did not succeed: {response.text[:500]}")
        load.succeeded.add(response.json()["id"])


async def _drive(base: str, clients: int, requests: int, seed: int, workers: int) -> tuple[Load, float]:
    load = Load()
    await _warm_up(base, workers, load)
    started = time.perf_counter()
    await asyncio.gather(*(_client(base, i, requests, seed, load) for i in range(clients)))
    return load, time.perf_counter() - started


def _summary(tally: Tally, window: float) -> dict[str, Any]:
    ms = [1000 * t for t in tally.latencies]
    figures: dict[str, Any] = {"count": len(ms), "errors": len(tally.errors), "per_second": len(ms) / window}
    if ms:
        for name, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
            figures[name] = round(_percentile(ms, q), 2)
        figures["max_ms"] = round(max(ms), 2)
    figures["first_errors"] = tally.errors[:5]
    return figures


def audit(url: str, submitted: list[str]) -> dict[str, Any]:
    """Every submitted id once, succeeded, with one complete set of records; nothing else created."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(select(Run.id, Run.status, Run.spec))}

            def count(table: Any, run_id: str) -> int:
                return int(conn.scalar(select(func.count()).where(table.run_id == run_id)) or 0)

            incomplete = []
            for run_id in submitted:
                if run_id not in rows or rows[run_id].status != "succeeded":
                    continue
                spec = Spec.model_validate(rows[run_id].spec)
                recorded = len({*range(0, spec.steps, spec.record_every), spec.steps - 1})
                layers = count(RunLayer, run_id)
                if count(RunStep, run_id) != spec.steps or count(RunRecord, run_id) != layers * recorded:
                    incomplete.append(run_id)
    finally:
        engine.dispose()
    unique = set(submitted)
    with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
        integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
    return {
        "submitted": len(submitted),
        "submitted_twice": len(submitted) - len(unique),
        "lost": sorted(unique - set(rows)),
        "not_submitted_but_stored": sorted(set(rows) - unique),
        "succeeded": sum(1 for r in unique if r in rows and rows[r].status == "succeeded"),
        "not_succeeded": {r: rows[r].status for r in unique if r in rows and rows[r].status != "succeeded"},
        "incomplete_records": incomplete,
        "integrity_check": integrity,
    }


def _machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        # Other work on the machine inflates the latency tails: the 1-minute load average at the start.
        "loadavg_1min_at_start": os.getloadavg()[0],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, drive the load, wait for the runs, stop the server, audit the store."""
    with tempfile.TemporaryDirectory(prefix="graddiag-load-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'graddiag.db'}"
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "GRADDIAG_API_TOKEN": WRITE_TOKEN, "GRADDIAG_READ_TOKEN": READ_TOKEN}
        command = ["serve", "--port", str(port), "--db-url", url, "--workers", str(args.workers)]
        command += ["--torch-threads", "1", "--poll-seconds", "0.05", "--eval-samples", "10"]
        command += ["--cache-dir", str(Path(tmp) / "cache")]
        log = Path(tmp) / "serve.log"
        with log.open("wb") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "graddiag.service.cli", *command], cwd=ROOT, env=env, stdout=out, stderr=out
            )
        ready = {"Authorization": f"Bearer {READ_TOKEN}"}

        def up() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"serve exited:\n{log.read_text()[-3000:]}")
            try:
                return httpx.get(f"{base}/readyz", headers=ready, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            _wait(up, 90, "the server to be ready")
            load, window = asyncio.run(_drive(base, args.clients, args.requests, args.seed, args.workers))
            drain_started = time.perf_counter()

            def finished() -> bool:
                with httpx.Client(base_url=base, headers=ready, timeout=30) as http:
                    pending = [http.get("/v1/runs", params={"status": s, "limit": 1}) for s in ("queued", "running")]
                    return all(page.json()["total"] == 0 for page in pending)

            with contextlib.suppress(TimeoutError):  # the audit reports what did not finish
                _wait(finished, args.drain_timeout, "the workers to finish every run")
            drain = time.perf_counter() - drain_started
        finally:
            server.send_signal(signal.SIGTERM)
            exit_status = server.wait(60)
        result = {
            "benchmark": "load",
            "command": "python -m bench.load " + " ".join(args.argv),
            "machine": _machine(),
            "config": {
                "clients": args.clients,
                "requests_per_client": args.requests,
                "workers": args.workers,
                "seed": args.seed,
                "mix": MIX,
                "run_spec": RUN_SPEC.model_dump(mode="json", exclude_defaults=True),
                "auth": "api_token and read_token set; every request carries a bearer token",
            },
            "load_window_s": round(window, 2),
            "requests": sum(len(t.latencies) + len(t.errors) for t in load.tallies.values()),
            "requests_per_second": round(sum(len(t.latencies) for t in load.tallies.values()) / window, 1),
            "by_type": {kind: _summary(tally, window) for kind, tally in load.tallies.items()},
            "idempotent_replays": load.replayed,
            "drain_s": round(drain, 2),
            "server_exit_status": exit_status,
            "warm_up_runs": args.workers,
            "audit": audit(url, load.submitted + sorted(load.succeeded - set(load.submitted))),
        }
    return result


def ok(result: dict[str, Any]) -> bool:
    """Zero errors, zero lost, duplicated, failed or incomplete runs, a clean store and a clean stop."""
    audit_ = result["audit"]
    return (
        all(t["errors"] == 0 for t in result["by_type"].values())
        and audit_["submitted_twice"] == 0
        and not audit_["lost"]
        and not audit_["not_submitted_but_stored"]
        and not audit_["not_succeeded"]
        and not audit_["incomplete_records"]
        and audit_["succeeded"] == audit_["submitted"]
        and audit_["integrity_check"] == "ok"
        and result["server_exit_status"] == 0
        and result["idempotent_replays"] == 0
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test, print and save bench/results/load.json; 1 when anything was lost or failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=100, help="requests per client")
    parser.add_argument("--workers", type=int, default=2, help="local worker processes of the server")
    parser.add_argument("--seed", type=int, default=0, help="seeds each client's request mix")
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for the runs")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(list(argv) if argv is not None else None)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    result = run(args)
    result["ok"] = ok(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("requests_per_second", "by_type", "audit", "ok")}, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
