"""`graddiag serve` in a subprocess on a free port, as users run it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import httpx

from tests.support import REPO

SERVE: Final = (
    "from graddiag.service.serve import serve; from graddiag.service.settings import Settings; serve(Settings())"
)
WORKER_HOST: Final = (
    "from graddiag.service.serve import worker_process; from graddiag.service.settings import Settings; "
    "worker_process(Settings())"
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (from /proc; the command field may hold spaces, so split after ')')."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Server:
    """One `serve` process on a free port; its log goes to a file shown when an assertion fails.

    With `code=WORKER_HOST` it is a worker host without the API (no port is served).
    """

    def __init__(self, db_url: str, log: Path, workers: int, cache: Path, code: str = SERVE) -> None:
        self.db_url = db_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {
            **os.environ,
            "GRADDIAG_DB_URL": db_url,
            "GRADDIAG_PORT": str(self.port),
            "GRADDIAG_WORKERS": str(workers),
            "GRADDIAG_LEASE_SECONDS": "2",
            "GRADDIAG_POLL_SECONDS": "0.1",
            "GRADDIAG_EVAL_SAMPLES": "50",
            "GRADDIAG_CACHE_DIR": str(cache),
            # Tests never reach the internet: without a CIFAR-10 copy, serve reports it instead of downloading.
            "GRADDIAG_DOWNLOAD_DATA": os.environ.get("GRADDIAG_DOWNLOAD_DATA", "false"),
        }
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.tail()}"
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    body: dict[str, Any] = response.json()
                    return body
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout} s:\n{self.tail()}")

    def worker_pids(self) -> list[int]:
        return [p for p in _children(self.proc.pid) if "spawn_main" in _cmdline(p)]

    def stop(self, timeout: float = 40) -> None:
        workers = self.worker_pids()
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout) == 0, self.tail()
        assert not [p for p in workers if Path(f"/proc/{p}").exists() and _cmdline(p)], "workers left"
