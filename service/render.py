"""The human-readable text of a report, printed by `graddiag probe` and `graddiag watch`."""

from __future__ import annotations

import math

from graddiag.service.engine.report import LayerRecord, Report


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.3g}"


def render_report(report: Report) -> str:
    """The human-readable report: per-layer table at init and at the end, verdict, theory, advice."""
    by_step: dict[int, dict[int, LayerRecord]] = {}
    for record in report.records:
        by_step.setdefault(record.step, {})[record.layer] = record
    first, last = min(by_step), max(by_step)
    out = [
        f"{'#':>3} {'layer':<22} {'kind':<6} {'grad@init':>10} {'grad@end':>10} {'act∂@init':>10} "
        f"{'rel@init':>10} {'update':>10}"
    ]
    for layer in report.layers:
        a, b = by_step[first].get(layer.index), by_step[last].get(layer.index)
        out.append(
            f"{layer.index:>3} {layer.name:<22} {layer.kind:<6} "
            f"{_fmt(a.grad_norm if a else None):>10} {_fmt(b.grad_norm if b else None):>10} "
            f"{_fmt(a.act_grad_norm if a else None):>10} {_fmt(a.rel_grad if a else None):>10} "
            f"{_fmt(b.update_ratio if b else None):>10}"
        )
    verdict = report.verdict
    out += [
        "",
        f"verdict: {verdict.label.upper()}  (at init: {verdict.at_init}, during training: {verdict.trained or '—'})",
    ]
    out += [f"  - {reason}" for reason in verdict.reasons]
    if verdict.theory.applicable:
        theory = verdict.theory
        out.append(
            f"theory: χ₁ = {_fmt(theory.chi1)}, q* = {_fmt(theory.q_star)}, "
            f"predicted {_fmt(theory.predicted_decades_per_layer)} decades/layer, "
            f"measured {_fmt(theory.measured_decades_per_layer)}"
        )
    else:
        out.append(f"theory: {verdict.theory.reason}")
    if verdict.advice:
        out.append("advice:")
        out += [f"  - {item}" for item in verdict.advice]
    e, t = report.eval, report.timing
    out.append(
        f"train loss {_fmt(e.train_loss)} acc {_fmt(e.train_accuracy)} | held-out loss {_fmt(e.loss)} "
        f"acc {_fmt(e.accuracy)} on {e.samples} | gap {_fmt(e.generalization_gap)}"
    )
    out.append(f"{t.steps_run} steps on {t.device}: {t.step_ms:.2f} ms/step, {t.total_s:.2f} s total")
    return "\n".join(out)
