"""`make install` on a fresh clone is quiet: building graddiag prints no setuptools deprecation warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import copy_build_inputs

pytestmark = pytest.mark.timeout(120)


def test_the_build_prints_no_deprecation_warnings(tmp_path: Path) -> None:
    source = copy_build_inputs(tmp_path / "src")
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
