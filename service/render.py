"""The human-readable text of a report, printed by `graddiag probe`, `graddiag watch` and `graddiag diagnose`."""

from __future__ import annotations

import math
import textwrap
from typing import Final

from graddiag.service.engine.report import Finding, LayerRecord, Report

# The report fits a 120-column terminal: the layer table is 99 columns, prose wraps at this width.
WIDTH: Final = 120
_SEVERITY_ORDER: Final = {"critical": 0, "warning": 1, "info": 2}
_PHASE: Final = {"init": "at init", "training": "during training"}
# Marks a layer whose bias gradient is zero by construction (a bias followed by batch norm).
ZERO_BIAS_MARK: Final = "†"
# Marks a layer of a user's model that sits beside the main path (a branch such as ResNet's downsample).
BRANCH_MARK: Final = "‡"


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.3g}"


def _wrap(text: str, indent: str, first: str | None = None) -> list[str]:
    return textwrap.wrap(
        text, WIDTH, initial_indent=indent if first is None else first, subsequent_indent=indent, break_on_hyphens=False
    )


def _evidence(finding: Finding) -> str:
    return ", ".join(
        f"{key}={_fmt(value) if isinstance(value, float) else value}"
        for key, value in finding.evidence.items()
        if value is not None
    )


def _bullets(items: list[str]) -> list[str]:
    return [line for item in items for line in _wrap(item, "    ", "  - ")]


def render_findings(findings: list[Finding]) -> list[str]:
    """The findings section, most severe first: severity, phase, kind and sentence, evidence, advice.

    An advice item already printed for an earlier finding (several findings of one kind share theirs) is
    not repeated.
    """
    out = ["findings:"] if findings else []
    advised: set[str] = set()
    for finding in sorted(findings, key=lambda item: _SEVERITY_ORDER[item.severity]):
        phase = f" ({_PHASE[finding.phase]})" if finding.phase else ""
        out += _wrap(f"{finding.severity.upper()} {finding.kind}{phase}: {finding.message}", "    ", "  - ")
        evidence = _evidence(finding)
        if evidence:
            out += _wrap(f"evidence: {evidence}", "      ", "    ")
        for item in finding.advice:
            if item not in advised:
                advised.add(item)
                out += _wrap(f"advice: {item}", "      ", "    ")
    return out


def render_report(report: Report) -> str:
    """The human-readable report: per-layer table at init and at the end, verdict, findings, theory, advice."""
    by_step: dict[int, dict[int, LayerRecord]] = {}
    for record in report.records:
        by_step.setdefault(record.step, {})[record.layer] = record
    first, last = min(by_step), max(by_step)
    model = report.model
    branches = set(model.branches) if model is not None else set()
    out = []
    if model is not None:  # a model graddiag did not build (diagnose / watch): what it is, in place of a spec
        out += _wrap(
            f"model: {model.class_name}, {model.params:,} parameters, {len(report.layers)} recorded layers; "
            f"{model.optimizer} lr {model.lr:g}" + (f", loss {model.loss}" if model.loss else ""),
            "  ",
            "",
        )
    out += [
        f"{'#':>3} {'layer':<22} {'kind':<6} {'grad@init':>10} {'grad@end':>10} {'act∂@init':>10} "
        f"{'rel@init':>10} {'update':>10} {'rms@init':>10}"
    ]
    for layer in report.layers:
        a, b = by_step[first].get(layer.index), by_step[last].get(layer.index)
        name = f"{layer.name}{ZERO_BIAS_MARK}" if layer.structural_zero_bias else layer.name
        name += BRANCH_MARK if layer.index in branches else ""
        out.append(
            f"{layer.index:>3} {name:<22} {layer.kind:<6} "
            f"{_fmt(a.grad_norm if a else None):>10} {_fmt(b.grad_norm if b else None):>10} "
            f"{_fmt(a.act_grad_norm if a else None):>10} {_fmt(a.rel_grad if a else None):>10} "
            f"{_fmt(b.update_ratio if b else None):>10} {_fmt(a.act_norm if a else None):>10}"
        )
    out.append("rms@init: RMS of the layer's output at init (the forward signal)")
    if any(layer.structural_zero_bias for layer in report.layers):
        out.append(
            f"{ZERO_BIAS_MARK} bias gradient zero by construction (the bias feeds batch norm): recorded, not judged"
        )
    if branches:
        out.append(f"{BRANCH_MARK} beside the main path (a branch): recorded, not part of the depth profile")
    verdict = report.verdict
    out += [
        "",
        f"verdict: {verdict.label.upper()}  (at init: {verdict.at_init}, during training: {verdict.trained or '—'})",
    ]
    out += _bullets(verdict.reasons)
    out += render_findings(verdict.findings)
    if verdict.theory.applicable:
        theory = verdict.theory
        out.append(
            f"theory: χ₁ = {_fmt(theory.chi1)}, q* = {_fmt(theory.q_star)}, "
            f"predicted {_fmt(theory.predicted_decades_per_layer)} decades/layer, "
            f"measured {_fmt(theory.measured_decades_per_layer)}"
        )
    else:
        out += _wrap(f"theory: {verdict.theory.reason}", "  ", "")
    if verdict.advice:
        out.append("advice:")
        out += _bullets(verdict.advice)
    e, t = report.eval, report.timing
    if e.samples:
        out.append(
            f"train loss {_fmt(e.train_loss)} acc {_fmt(e.train_accuracy)} | held-out loss {_fmt(e.loss)} "
            f"acc {_fmt(e.accuracy)} on {e.samples} | gap {_fmt(e.generalization_gap)}"
        )
    else:  # diagnose and watch have no held-out set of the user's data
        out.append(
            f"train loss {_fmt(e.train_loss)} acc {_fmt(e.train_accuracy)} (mean of the last 10 steps in the report; "
            "no held-out set)"
        )
    out.append(f"{t.steps_run} steps on {t.device}: {t.step_ms:.2f} ms/step, {t.total_s:.2f} s total")
    return "\n".join(out)
