"""The API process of `graddiag serve` never imports torch, workers included (they import it in their own).

The API only queues and serves; torch (about 700 MiB resident) belongs in the workers. `serve` counts
CUDA devices to plan its workers; that count must come from somewhere other than this process's torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graddiag.service import serve as serve_module

# Runs `serve` with one real worker; once /healthz answers, reports what the API process imported.
CHILD = """
import json, os, signal, sys, threading, time, urllib.request
from graddiag.service.serve import serve
from graddiag.service.settings import Settings

settings = Settings(db_url=sys.argv[1], port=int(sys.argv[2]), workers=1, torch_threads=1)
result = {}

def check():
    url = f"http://127.0.0.1:{settings.port}/healthz"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                result["healthz"] = response.status
                break
        except OSError:
            time.sleep(0.1)
    result["torch_imported"] = "torch" in sys.modules
    result["torch_modules"] = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))[:5]
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=check, daemon=True).start()
serve(settings)
print("RESULT:" + json.dumps(result), flush=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_api_process_of_serve_never_imports_torch(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'serve.db'}"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, db_url, str(_free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT:")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT:"))
    assert result["healthz"] == 200
    assert result["torch_imported"] is False, result["torch_modules"]


def test_without_a_gpu_driver_no_device_is_counted_and_no_child_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_module, "_GPU_DRIVER_PATHS", ("/nonexistent/driver",))
    started: list[object] = []
    monkeypatch.setattr(serve_module.subprocess, "run", lambda *a, **k: started.append(a))
    assert serve_module.cuda_devices() == []
    assert started == []


def test_with_a_driver_the_count_comes_from_a_child_and_respects_visible_devices(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(serve_module, "_GPU_DRIVER_PATHS", (str(tmp_path),))
    monkeypatch.setattr(serve_module, "_torch_device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    assert serve_module.cuda_devices() == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert serve_module.cuda_devices() == ["0", "1"]


def test_the_child_counts_what_torch_counts() -> None:
    torch = pytest.importorskip("torch")
    assert serve_module._torch_device_count() == torch.cuda.device_count()
