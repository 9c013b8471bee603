"""The profile arithmetic the verdict and the places that show its numbers share, without torch: the fitted
slope of a log10 profile and the span at which a profile vanishes or explodes.

The verdict (engine/verdict.py) judges with them; the sweep summary (store/sweeps.py, read by the API,
which never imports torch) and the text report (render.py, used by the client commands) show them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

# The product's definition: a profile vanishes (explodes) when the first interior layer's value is at
# least 100× smaller (larger) than the last's, however gentle the per-layer rate.
SPAN_DECADES: Final = 2.0
# Values that are exactly zero enter log10 at this floor.
LOG_FLOOR: Final = 1e-30


def fit_slope(values: Sequence[float | None]) -> float | None:
    """Least-squares slope of log10(values) in decades per layer toward the input (index 0); through time,
    in decades per step toward t = 0. None with fewer than two values."""
    return fit_log_slope([math.log10(max(v, LOG_FLOOR)) if v is not None else math.nan for v in values])


def fit_log_slope(logs: Sequence[float]) -> float | None:
    """`fit_slope` of a profile already in log10 (a theory's predicted profile); non-finite points are skipped."""
    points = [(i, y) for i, y in enumerate(logs) if math.isfinite(y)]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return -sxy / sxx
