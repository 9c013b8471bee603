"""A migrated SQLite store, and a report shaped like the engine's without training one."""

from __future__ import annotations

import random
from pathlib import Path

from graddiag.models.spec import Spec
from graddiag.service.engine.report import (
    Evidence,
    Label,
    LayerInfo,
    LayerRecord,
    Report,
    StepMetrics,
    Theory,
    Verdict,
)
from graddiag.service.store import db
from tests.support.reports import plain_report


def migrated_url(tmp_path: Path) -> str:
    """A fresh SQLite file migrated to head (shared by the queue and worker tests)."""
    url = f"sqlite:///{tmp_path / 'store' / 'graddiag.db'}"
    db.upgrade(url)
    return url


def sample_report(spec: Spec, *, label: Label = "healthy", interior_ratio: float | None = 0.5, seed: int = 0) -> Report:
    """A report shaped like the engine's (layers, every step, records at recorded steps, some nulls) with
    random figures drawn from `seed`; tests/support/reports.py's plain_report has known ones."""
    rng = random.Random(seed)
    layers = [
        LayerInfo(index=i, name=name, kind="linear", params=rng.randint(10, 10_000))
        for i, name in enumerate(["input", *(f"hidden{j}" for j in range(1, spec.depth)), "output"])
    ]
    steps = [
        StepMetrics(
            step=s,
            loss=2.3 - 0.01 * s,
            accuracy=rng.random(),
            grad_norm_total_pre=rng.random() * 10,
            grad_norm_total_post=None if s % 3 else rng.random(),
        )
        for s in range(spec.steps)
    ]
    recorded = [s for s in range(spec.steps) if s % spec.record_every == 0 or s == spec.steps - 1]
    records = [
        LayerRecord(
            step=s,
            layer=layer.index,
            grad_norm=rng.random() * 10 ** rng.randint(-8, 2),
            bias_grad_norm=rng.random(),
            weight_norm=rng.random() * 5,
            rel_grad=rng.random() * 1e-3,
            update_ratio=None if s == 0 else rng.random() * 1e-2,
            act_grad_norm=rng.random(),
            zero_grad_frac=rng.random(),
            saturation_frac=None,
        )
        for s in recorded
        for layer in layers
    ]
    verdict = Verdict(
        label=label,
        at_init=label,
        trained=None,
        evidence=Evidence(decades_per_layer=-0.3, interior_ratio=interior_ratio, interior_layers=spec.depth - 1),
        reasons=["because"],
        advice=["do this"],
        theory=Theory(applicable=False, reason="not a plain MLP"),
    )
    # The evaluation and timing of the plain report: only the per-layer figures are randomised here.
    update = {"layers": layers, "steps": steps, "records": records, "verdict": verdict}
    return plain_report(spec, label).model_copy(update=update)
