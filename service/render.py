"""The human-readable text of a report, printed by `graddiag probe`, `graddiag watch` and `graddiag diagnose`."""

from __future__ import annotations

import math
import textwrap
from typing import Final

from graddiag.service.engine.profile import fit_slope
from graddiag.service.engine.report import (
    Finding,
    LayerRecord,
    Report,
    TimeRecord,
    TimeTheory,
    transformer_blocks,
)

# The report fits a 120-column terminal: the layer table is 102 columns, prose wraps at this width.
WIDTH: Final = 120
_SEVERITY_ORDER: Final = {"critical": 0, "warning": 1, "info": 2}
_PHASE: Final = {"init": "at init", "training": "during training"}
# Marks a layer whose bias gradient is zero by construction (a bias followed by batch norm).
ZERO_BIAS_MARK: Final = "†"
# Marks a layer of a user's model that sits beside the main path (a branch such as ResNet's downsample).
BRANCH_MARK: Final = "‡"
# The gate whose mean the through-time table shows, by cell (an rnn has none).
_KEEP_GATE: Final = {
    "lstm": "the forget gate f_t",
    "gru": "the update gate z_t",
    "rnn": None,
    None: "the gate that keeps the past (LSTM forget gate, GRU update gate)",  # a model graddiag did not build
}


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


def _sample_times(length: int) -> list[int]:
    """The time steps the through-time table shows: the last, three quarters, half, a quarter, the first
    (31, 24, 16, 8, 0 for the 32 rows of an image)."""
    return list(dict.fromkeys([length - 1, *(length * k // 4 for k in (3, 2, 1)), 0]))


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def render_time(report: Report) -> list[str]:
    """A recurrent net's gradient through time: per recurrent layer, at the first and last recorded step,
    ‖∂L/∂h_t‖ at five time steps, its fitted slope over every t, the gate mean and saturation averaged over t;
    then the slope and span the verdict judged. Empty for a network without time records."""
    if not report.time_records:
        return []
    rows: dict[tuple[int, int], dict[int, TimeRecord]] = {}
    for record in report.time_records:
        rows.setdefault((record.layer, record.step), {})[record.t] = record
    steps = sorted({step for _, step in rows})
    shown = sorted({steps[0], steps[-1]})
    times = _sample_times(max(record.t for record in report.time_records) + 1)
    names = {layer.index: layer.name for layer in report.layers}
    cell = report.spec.arch if report.spec is not None else None
    out = [
        "",
        "through time: ‖∂L/∂h_t‖ per recurrent layer (t = 0 is the first row read, the classifier reads the last)",
        f"{'#':>3} {'layer':<22} {'step':>5} "
        + " ".join(f"{f't={t}':>9}" for t in times)
        + f" {'dec/step':>9} {'gate mean':>10} {'saturated':>10}",
    ]
    for layer in sorted({layer for layer, _ in rows}):
        for step in shown:
            at = rows.get((layer, step), {})
            head = f"{layer:>3} {names.get(layer, '?'):<22}" if step == shown[0] else " " * 26
            norms = " ".join(f"{_fmt(at[t].grad_norm if t in at else None):>9}" for t in times)
            slope = fit_slope([at[t].grad_norm if t in at else None for t in range(max(at, default=-1) + 1)])
            gate_mean = _mean([record.gate_mean for record in at.values()])
            saturated = _mean([record.saturation_frac for record in at.values()])
            out.append(f"{head} {step:>5} {norms} {_fmt(slope):>9} {_fmt(gate_mean):>10} {_fmt(saturated):>10}")
    gate = _KEEP_GATE.get(cell, _KEEP_GATE[None])
    out += _wrap(
        "dec/step: the least-squares slope of log10 ‖∂L/∂h_t‖ over every t, in decades per step toward t = 0 "
        "(negative: the gradient shrinks into the past); "
        + (f"gate mean: {gate}, averaged over t" if gate else "gate mean: none (an rnn has no gates)")
        + "; saturated: the fraction of units whose local derivative is under 5 % of its maximum (the gates; tanh's "
        "h_t for an rnn), averaged over t",
        "",
    )
    e = report.verdict.evidence
    if e.time_decades_per_step is not None:
        judged = names.get(e.time_layer, "?") if e.time_layer is not None else "the top layer"
        out += _wrap(
            f"fitted through time ({judged}): {_fmt(e.time_decades_per_step)} decades per step toward t = 0 at init, "
            f"{_fmt(e.time_span_decades)} across the sequence; at the end {_fmt(e.time_decades_per_step_trained)} "
            f"per step, {_fmt(e.time_span_decades_trained)} across",
            "",
        )
    return out


# Which norm the prediction through time is about: the LSTM's is its cell path's.
_TIME_THEORY_NORM: Final = {"lstm_cell": "‖∂L/∂c_t‖"}


def _time_theory(theory: TimeTheory | None) -> list[str]:
    """The prediction through time beside the measurement (recurrent nets only)."""
    if theory is None:
        return []
    if not theory.applicable:
        return _wrap(f"theory through time: {theory.reason}", "  ", "")
    radius = f", ρ(W_hh) = {_fmt(theory.spectral_radius)}" if theory.spectral_radius is not None else ""
    verdict = {True: "agrees within", False: "off by more than", None: None}[theory.agrees]
    agrees = f" ({verdict} ±{_fmt(theory.tolerance)})" if verdict else ""
    norm = _TIME_THEORY_NORM.get(theory.model or "", "‖∂L/∂h_t‖")
    return _wrap(
        f"theory through time ({theory.model}, {norm}): predicted {_fmt(theory.predicted_decades_per_step)} "
        f"decades/step, measured {_fmt(theory.measured_decades_per_step)}{agrees}{radius}",
        "  ",
        "",
    )


def render_blocks(report: Report) -> list[str]:
    """A transformer's blocks in forward order: the attention output projection's and mlp.fc2's weight
    gradients and ‖∂L/∂h‖ at the block's output (mlp.fc2's for pre-LN, norm2's for post-LN), at init and at
    the end. Empty for other networks."""
    blocks = transformer_blocks(report.layers)
    if report.spec is None or not blocks:
        return []
    index = {layer.name: layer.index for layer in report.layers}
    by_step: dict[int, dict[int, LayerRecord]] = {}
    for record in report.records:
        by_step.setdefault(record.step, {})[record.layer] = record
    first, last = by_step[min(by_step)], by_step[max(by_step)]

    def cell(records: dict[int, LayerRecord], layer: int | None, field: str) -> str:
        record = records.get(layer) if layer is not None else None
        return f"{_fmt(getattr(record, field) if record else None):>10}"

    out = [
        "",
        f"blocks ({report.spec.norm_position}-LN): ‖∂L/∂W‖ of attn.out and mlp.fc2, ‖∂L/∂h‖ at the block output",
        f"{'block':<10} {'attn@init':>10} {'fc2@init':>10} {'∂h@init':>10} {'attn@end':>10} {'fc2@end':>10} "
        f"{'∂h@end':>10}",
    ]
    for block in blocks:
        attention_out = index.get(f"{block.name}.attn.out")
        cells = [
            cell(records, layer, field)
            for records in (first, last)
            for layer, field in (
                (attention_out, "grad_norm"),
                (block.fc2, "grad_norm"),
                (block.output, "act_grad_norm"),
            )
        ]
        out.append(f"{block.name:<10} {' '.join(cells)}")
    return out


def render_report(report: Report) -> str:
    """The human-readable report: per-layer table at init and at the end (a recurrent net's gradient through
    time, a transformer's blocks), verdict, findings, theory, advice."""
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
        f"{'#':>3} {'layer':<22} {'kind':<9} {'grad@init':>10} {'grad@end':>10} {'act∂@init':>10} "
        f"{'rel@init':>10} {'update':>10} {'rms@init':>10}"
    ]
    for layer in report.layers:
        a, b = by_step[first].get(layer.index), by_step[last].get(layer.index)
        name = f"{layer.name}{ZERO_BIAS_MARK}" if layer.structural_zero_bias else layer.name
        name += BRANCH_MARK if layer.index in branches else ""
        out.append(
            f"{layer.index:>3} {name:<22} {layer.kind:<9} "
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
    out += render_time(report) + render_blocks(report)
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
    out += _time_theory(verdict.theory.time)
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
