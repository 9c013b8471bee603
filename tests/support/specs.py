"""The specs most tests train: tiny (a fraction of a second) and long (always stopped before its end)."""

from __future__ import annotations

from graddiag.models.spec import Spec

TINY = Spec(dataset="synthetic", depth=3, width=16, steps=5, batch_size=16, record_every=1)
# Thousands of steps: far longer than any test waits, so it is always stopped (cancel, timeout, shutdown).
LONG = Spec(dataset="synthetic", depth=4, width=64, steps=5000, batch_size=32, record_every=100)
