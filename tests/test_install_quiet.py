"""`make install` on a fresh clone is quiet: building graddiag prints no setuptools deprecation warnings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.timeout(120)

# What the build reads (as tests/test_wheel.py copies it).
BUILD_INPUTS = ("pyproject.toml", "README.md", "graddiag", "models", "service", "migrations")


def test_the_build_prints_no_deprecation_warnings(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Deprecat" not in output and "SetuptoolsWarning" not in output, output
    assert list(tmp_path.glob("graddiag-*.whl"))
