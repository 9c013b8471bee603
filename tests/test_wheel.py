"""graddiag as a user installs it: a built wheel in a fresh venv, used from a project with its own
`models/` and `service/` packages (which a second top-level `models` or `service` would collide with).

The venv reuses this one's dependencies (torch and the rest) through a `.pth` line instead of
installing them again: the test stays offline and takes seconds. Only the wheel's own files are
graddiag there; the repository is not on its path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import pytest
from alembic.script import ScriptDirectory

from graddiag.service.client import Client
from graddiag.service.store.db import MIGRATIONS_DIR
from tests.support import copy_build_inputs
from tests.support.server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# What the build reads: the project file, its readme, and the folders the graddiag/ links point into.
SPEC_FLAGS: Final = ("--dataset", "synthetic", "--depth", "2", "--width", "8", "--batch-size", "8", "--steps", "3")
# The user's own packages, named like graddiag's folders in the repository.
USER_MODULES: Final = {
    "models/__init__.py": "",
    "models/networks.py": "OWNER = 'user'\n",
    "service/__init__.py": "",
    "service/engine/__init__.py": "",
    "service/engine/probe.py": "OWNER = 'user'\n",
}


@dataclass(frozen=True)
class Installed:
    """The venv with the wheel installed, and the user's project directory to run it from."""

    venv: Path
    project: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A command of the venv (`python`, `graddiag`, ...) run in the user's project."""
        command = [str(self.venv / "bin" / args[0]), *args[1:]]
        return subprocess.run(command, cwd=self.project, env=self.env, capture_output=True, text=True, timeout=timeout)


def _build_wheel(tmp: Path) -> Path:
    source = copy_build_inputs(tmp / "source")
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("graddiag-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # After the venv's own site-packages on sys.path: a plain path line, so this environment's editable
    # graddiag (a .pth hook there) is not loaded; the wheel's graddiag is the only one.
    (purelib / "reused-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    project = tmp / "project"
    for name, text in USER_MODULES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "GRADDIAG_"))}
    env |= {"GRADDIAG_CACHE_DIR": str(tmp / "cache"), "GRADDIAG_EVAL_SAMPLES": "10", "GRADDIAG_TORCH_THREADS": "1"}
    yield Installed(venv, project, env)


def test_import_graddiag_beside_the_users_own_models_and_service(installed: Installed) -> None:
    code = (
        "import graddiag, models.networks, service.engine.probe\n"
        "from graddiag.service.engine.probe import run_probe\n"
        "import graddiag.models.networks as networks\n"
        "print(graddiag.__file__); print(networks.__file__)\n"
        "print(models.networks.OWNER, service.engine.probe.OWNER, run_probe.__name__, graddiag.Spec.__name__)\n"
    )
    result = installed.run("python", "-c", code)
    assert result.returncode == 0, result.stderr
    package, networks, owners = result.stdout.splitlines()
    # graddiag is the wheel's copy in the venv, not the repository; the user's packages are still theirs.
    assert Path(package).is_relative_to(installed.venv) and Path(networks).is_relative_to(installed.venv)
    assert owners == "user user run_probe Spec"


def test_probe_from_the_command_line(installed: Installed) -> None:
    result = installed.run("graddiag", "probe", *SPEC_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "verdict: " in result.stdout and "3 steps on cpu" in result.stdout


def test_db_upgrade_serve_and_one_run(installed: Installed, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'graddiag.db'}"
    upgraded = installed.run("graddiag", "db", "upgrade", "--db", url)
    assert upgraded.returncode == 0, upgraded.stderr
    current = installed.run("graddiag", "db", "current", "--db", url)
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert current.returncode == 0 and current.stdout.split() == [head], current

    port = free_port()
    env = installed.env | {"GRADDIAG_DB_URL": url, "GRADDIAG_PORT": str(port), "GRADDIAG_WORKERS": "1"}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [installed.venv / "bin" / "graddiag", "serve"],
            cwd=installed.project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        spec = {"dataset": "synthetic", "depth": 2, "width": 8, "batch_size": 8, "steps": 3, "record_every": 1}
        with Client(base_url) as client:
            run = client.run(spec, timeout=60)
        assert run["status"] == "succeeded" and run["report"]["verdict"]["label"] in (
            "healthy",
            "vanishing",
            "exploding",
        )
        assert len(run["report"]["steps"]) == 3
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(40)
        finally:
            server.kill()
    assert code == 0, log.read_text()
