"""Hostile-input benchmark: how large an error body gets, and how much memory `serve` spends answering it.

Two measurements (issue 12, item 3):

* every hostile sweep body below, POSTed once to the app in-process (httpx over ASGI): status, error
  body size in bytes, number of errors, seconds;
* a real `graddiag serve --workers 0` on 127.0.0.1 taking eight concurrent copies of the worst one
  (200 grid points x a 1 MB activation string): the server's peak resident memory (VmHWM, Linux)
  before and after, and the body sizes.

    python -m bench.hostile [--out-dir bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.service import _free_port, _wait
from graddiag.service.api import create_app
from graddiag.service.settings import Settings
from graddiag.service.store.db import upgrade

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"
HUGE = "x" * 1_040_000  # just under the default 1 MiB body cap, so the body reaches validation
KEYS = 95_000
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _key(i: int) -> str:
    """A distinct three-character key, so 95,000 of them fit under the body cap."""
    return "".join(_ALPHABET[i // 62**p % 62] for p in (2, 1, 0))


def hostile_bodies() -> dict[str, bytes]:
    """The sweep bodies of the issue, compact JSON (the lone surrogate as its JSON escape)."""
    bodies: dict[str, Any] = {
        "200 points x a 1 MB activation": {
            "base": {"dataset": "synthetic"},
            "grid": {"seed": list(range(200)), "activation": [HUGE]},
        },
        "95,000 unknown grid keys": {"grid": {_key(i): [1] for i in range(KEYS)}},
        "95,000 unknown base keys": {"base": {_key(i): 1 for i in range(KEYS)}, "grid": {"depth": [2]}},
        "95,000 grid values that are not lists": {"grid": {_key(i): 1 for i in range(KEYS)}},
        "a lone surrogate as a grid key": {"grid": {"\ud800": [1]}},
    }
    return {name: json.dumps(body, separators=(",", ":")).encode() for name, body in bodies.items()}


async def _in_process(tmp: Path) -> dict[str, dict[str, Any]]:
    url = f"sqlite:///{tmp / 'asgi.db'}"
    upgrade(url)
    app = create_app(Settings(db_url=url, cache_dir=tmp / "cache"))
    found: dict[str, dict[str, Any]] = {}
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)  # a 500 is a finding, not a crash
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://b") as client:
        for name, body in hostile_bodies().items():
            started = time.perf_counter()
            response = await client.post("/v1/sweeps", content=body, headers={"content-type": "application/json"})
            errors = response.json().get("errors") if response.status_code < 500 else None
            found[name] = {
                "status": response.status_code,
                "body_bytes": len(response.content),
                "errors": len(errors or []),
                "seconds": round(time.perf_counter() - started, 3),
            }
    return found


def _memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def _served(tmp: Path, concurrent: int) -> dict[str, Any]:
    port = _free_port()
    env = {
        **os.environ,
        "GRADDIAG_DB_URL": f"sqlite:///{tmp / 'serve.db'}",
        "GRADDIAG_PORT": str(port),
        "GRADDIAG_WORKERS": "0",
        "GRADDIAG_CACHE_DIR": str(tmp / "cache"),
    }
    code = "from graddiag.service.serve import serve; from graddiag.service.settings import Settings; serve(Settings())"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        _wait(up, 120, "serve to answer")
        # Warm: the first validation error and the first listing load what every later request uses.
        httpx.post(f"{base}/v1/sweeps", json={"grid": {"depth": ["x"]}}, timeout=30)
        httpx.get(f"{base}/v1/runs", timeout=30)
        before = _memory_mib(proc.pid)
        body = hostile_bodies()["200 points x a 1 MB activation"]

        def one(_: int) -> tuple[int, int]:
            response = httpx.post(
                f"{base}/v1/sweeps", content=body, headers={"content-type": "application/json"}, timeout=300
            )
            return response.status_code, len(response.content)

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrent) as pool:
            answers = list(pool.map(one, range(concurrent)))
        seconds = time.perf_counter() - started
        after = _memory_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    return {
        "concurrent": concurrent,
        "answers": [{"status": status, "body_bytes": size} for status, size in answers],
        "seconds": round(seconds, 2),
        "serve_memory_mib_before": before,
        "serve_memory_mib_after": after,
    }


def main(argv: list[str] | None = None) -> int:
    """Run both measurements, print and write bench/results/hostile.json; 1 if any answer was a 5xx."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=8, help="copies of the worst body sent at once")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="graddiag-hostile-") as scratch:
        tmp = Path(scratch)
        in_process = asyncio.run(_in_process(tmp))
        served = _served(tmp, args.concurrent)
    result = {
        "benchmark": "hostile",
        "command": "python -m bench.hostile" + (" " + " ".join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ""),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "loadavg_1min_at_end": os.getloadavg()[0],
        },
        "sweep_errors_in_process": in_process,
        "served": served,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "hostile.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    statuses = [entry["status"] for entry in in_process.values()] + [a["status"] for a in served["answers"]]
    return 1 if any(status >= 500 for status in statuses) else 0


if __name__ == "__main__":
    raise SystemExit(main())
