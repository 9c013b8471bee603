"""Helpers the test modules share (test modules import from here, never from one another).

- :mod:`tests.support.specs`: the tiny and long specs most tests train;
- :mod:`tests.support.store`: a migrated SQLite store and a report shaped like the engine's;
- :mod:`tests.support.worker`: runs submitted straight to the store, polling, worker loops in threads;
- :mod:`tests.support.api`: the app in-process with its lifespan, problem+json assertions;
- :mod:`tests.support.server`: `graddiag serve` in a subprocess;
- :mod:`tests.support.reports`: reports with known findings, forward-signal records and flagged layers;
- :mod:`tests.support.verdict_cases`: the labelled case table of the verdict (also run by bench/theory.py).

The fixtures built on them (`settings`, `worker`, `base_url`, `client`) are in tests/conftest.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Final

# The repository root: the working directory of the subprocesses the tests start.
REPO: Final = Path(__file__).resolve().parents[2]

# What building graddiag reads: the tests that build it copy these, not the whole checkout.
BUILD_INPUTS: Final = ("pyproject.toml", "README.md", "graddiag", "models", "service", "migrations")


def copy_build_inputs(dest: Path) -> Path:
    """Copy the build's inputs into `dest` (created); graddiag/'s links stay links for the build to follow."""
    dest.mkdir(parents=True)
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, dest / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, dest / name)
    return dest
