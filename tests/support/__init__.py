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

from pathlib import Path
from typing import Final

# The repository root: the working directory of the subprocesses the tests start.
REPO: Final = Path(__file__).resolve().parents[2]
