"""Decides vanishing / exploding / healthy from the recorded per-layer profile.

Two steps: `measure` turns records into `Evidence` (numbers only), `decide` turns evidence into a
labelled `Verdict` with reasons and advice. The rules and their thresholds are the constants
below; the README documents them.

Profiles use the weight layers (linear/conv) without the first and the last: the input layer sees
raw pixels and the output layer the loss, so both sit off the trend. A slope is fitted by least
squares to log10 of the interior values and given in decades per layer *toward the input*:
negative means the gradient shrinks on its way back to the input.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from graddiag.models.spec import Spec
from graddiag.service.engine.report import Evidence, Label, LayerInfo, LayerRecord, StepMetrics, Theory, Verdict

# A profile is vanishing (exploding) when its fitted slope is at most -SLOPE (at least +SLOPE)
# decades per layer AND the fitted change across the interior layers is at least SPAN decades:
# the first interior layer then learns 100x slower (faster) than the last.
SLOPE_DECADES_PER_LAYER = 0.1
SPAN_DECADES = 2.0
# Absolute scale: the median interior ||dL/dW|| / ||W|| below this means no layer really learns,
# even when the profile is flat (ReLU nets with a small init decay forward and backward alike).
REL_GRAD_FLOOR = 1e-5
# During training: an update larger than the weight it changes, or a total gradient norm that
# grows a thousandfold over its value at initialisation, is an exploding run.
UPDATE_RATIO_CEILING = 1.0
GRAD_GROWTH_CEILING = 1e3
# Zero gradient entries are only advice, never a label: deep ReLU nets correlate their inputs so
# that whole units switch off for a batch (75% zeros is normal at depth 20), which is not death.
DEAD_FRACTION = 0.9
# Values that are exactly zero enter log10 at this floor.
_LOG_FLOOR = 1e-30

_SEVERITY: dict[Label, int] = {"healthy": 0, "vanishing": 1, "exploding": 2}


def fit_slope(values: Sequence[float | None]) -> float | None:
    """Least-squares slope of log10(values) in decades per layer toward the input (index 0)."""
    points = [(i, math.log10(max(v, _LOG_FLOOR))) for i, v in enumerate(values) if v is not None]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return -sxy / sxx


def _ratio(values: Sequence[float | None]) -> float | None:
    if len(values) < 2 or values[0] is None or not values[-1]:
        return None
    return values[0] / values[-1]


def _median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _log_median(values: Sequence[float | None]) -> float | None:
    """Median in log space, so one outlier step does not dominate a layer's trained profile."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return 10 ** statistics.median(math.log10(max(v, _LOG_FLOOR)) for v in present)


def measure(
    layers: Sequence[LayerInfo],
    records: Sequence[LayerRecord],
    steps: Sequence[StepMetrics],
    *,
    nonfinite_step: int | None = None,
    nonfinite_layer: int | None = None,
) -> Evidence:
    """The numbers behind a verdict: profiles at initialisation (step 0) and over training."""
    weight_layers = [layer.index for layer in layers if layer.kind in ("linear", "conv")]
    interior = weight_layers[1:-1] if len(weight_layers) > 2 else []
    by_step: dict[int, dict[int, LayerRecord]] = {}
    for record in records:
        by_step.setdefault(record.step, {})[record.layer] = record
    recorded = sorted(by_step)
    evidence = Evidence(
        interior_layers=len(interior),
        nonfinite_step=nonfinite_step,
        nonfinite_layer=nonfinite_layer,
        loss_first=steps[0].loss if steps else None,
        loss_last=steps[-1].loss if steps else None,
        grad_norm_total_init=steps[0].grad_norm_total_pre if steps else None,
        grad_norm_total_max=max(
            (s.grad_norm_total_pre for s in steps if s.grad_norm_total_pre is not None), default=None
        ),
    )
    if not recorded:
        return evidence

    init = by_step[recorded[0]]
    evidence.decades_per_layer = fit_slope([init[i].grad_norm for i in interior])
    evidence.act_decades_per_layer = fit_slope([init[i].act_grad_norm for i in interior])
    evidence.interior_ratio = _ratio([init[i].grad_norm for i in interior])
    evidence.act_interior_ratio = _ratio([init[i].act_grad_norm for i in interior])
    evidence.rel_grad_median = _median_or_none([init[i].rel_grad for i in interior or weight_layers])

    trained_steps = [by_step[s] for s in recorded[1:]]
    if trained_steps:

        def trained_profile(field: str) -> list[float | None]:
            return [_log_median([getattr(rows[i], field) for rows in trained_steps]) for i in interior]

        grad_profile = trained_profile("grad_norm")
        evidence.decades_per_layer_trained = fit_slope(grad_profile)
        evidence.act_decades_per_layer_trained = fit_slope(trained_profile("act_grad_norm"))
        evidence.interior_ratio_trained = _ratio(grad_profile)
        evidence.rel_grad_median_trained = _median_or_none(trained_profile("rel_grad"))
    evidence.max_update_ratio = max(
        (r.update_ratio for r in records if r.update_ratio is not None and r.layer in weight_layers),
        default=None,
    )
    last = by_step[recorded[-1]]
    zero_fracs = [last[i].zero_grad_frac for i in interior]
    evidence.zero_grad_frac_max = max((z for z in zero_fracs if z is not None), default=None)
    saturation = [r.saturation_frac for r in records if r.saturation_frac is not None]
    evidence.saturation_frac_mean = statistics.fmean(saturation) if saturation else None
    return evidence


def _judge_profile(
    phase: str, grad_slope: float | None, act_slope: float | None, rel_grad: float | None, interior: int
) -> tuple[Label, list[str]]:
    """Label one phase's profile and say why in sentences."""
    reasons: list[str] = []
    label: Label = "healthy"
    for what, slope in (("weight-gradient norm", grad_slope), ("back-propagated signal ‖∂L/∂h‖", act_slope)):
        if slope is None:
            continue
        span = slope * (interior - 1)
        direction = "falls" if slope < 0 else "grows"
        sentence = (
            f"{phase}, the {what} {direction} by {abs(slope):.2f} decades per layer toward the input "
            f"({abs(span):.1f} decades across {interior} interior layers)"
        )
        if slope <= -SLOPE_DECADES_PER_LAYER and span <= -SPAN_DECADES:
            reasons.append(sentence + ".")
            if label != "exploding":
                label = "vanishing"
        elif slope >= SLOPE_DECADES_PER_LAYER and span >= SPAN_DECADES:
            reasons.append(sentence + ".")
            label = "exploding"
    if rel_grad is not None and rel_grad < REL_GRAD_FLOOR and label == "healthy":
        reasons.append(
            f"{phase}, the median relative gradient ‖∂L/∂W‖/‖W‖ is {rel_grad:.1e}, below the "
            f"{REL_GRAD_FLOOR:.0e} floor: the weights barely move whatever the profile's shape."
        )
        label = "vanishing"
    return label, reasons


def _advice(spec: Spec, label: Label, evidence: Evidence) -> list[str]:
    advice: list[str] = []
    if label == "vanishing":
        if spec.activation in ("sigmoid", "tanh", "softsign"):
            advice.append(
                f"Switch {spec.activation} to a ReLU-family activation (relu, leaky_relu, gelu, silu): "
                "their derivative does not shrink the signal in saturation."
            )
        if spec.activation in ("relu", "leaky_relu", "elu", "gelu", "silu") and not spec.init.startswith("kaiming"):
            advice.append("Use Kaiming (He) initialisation (init=kaiming_normal): σ_w² = 2 keeps χ₁ = 1 for ReLU.")
        elif spec.activation in ("tanh", "softsign", "identity") and not spec.init.startswith(("xavier", "orthogonal")):
            advice.append("Use Xavier/Glorot or orthogonal initialisation: σ_w² = 1 puts tanh at the edge of chaos.")
        if (evidence.zero_grad_frac_max or 0) > DEAD_FRACTION:
            advice.append(
                f"{evidence.zero_grad_frac_max:.0%} of an interior layer's weight gradient is exactly zero "
                "(dead units): use leaky_relu or a lower learning rate."
            )
    if label == "exploding":
        if spec.clip_value is None:
            advice.append("Clip the gradient norm (clip_value=1.0, clip_mode=norm).")
        if spec.optimizer in ("sgd", "momentum"):
            advice.append("Lower the learning rate about tenfold, or use Adam, whose step size is bounded by lr.")
        else:
            advice.append("Lower the learning rate about tenfold.")
        if spec.init_gain > 1 or spec.init == "normal":
            advice.append("Shrink the initial weights (init_gain or init_std) toward the Kaiming/Xavier scale.")
    if label != "healthy":
        if spec.norm == "none":
            advice.append("Add batch or layer normalisation (norm=batch or norm=layer) to rescale every layer.")
        if not spec.residual:
            advice.append(
                "Add residual connections (residual=true): the identity path carries the gradient past each block."
            )
    return advice


def decide(spec: Spec, evidence: Evidence, theory: Theory | None) -> Verdict:
    """Label the evidence. Final label: exploding on any non-finite value; otherwise the more severe
    of the label at initialisation and the label over training (exploding > vanishing > healthy)."""
    n = evidence.interior_layers
    at_init, reasons = _judge_profile(
        "At initialisation",
        evidence.decades_per_layer,
        evidence.act_decades_per_layer,
        evidence.rel_grad_median,
        n,
    )
    trained: Label | None = None
    if evidence.decades_per_layer_trained is not None or evidence.max_update_ratio is not None:
        trained, trained_reasons = _judge_profile(
            "During training",
            evidence.decades_per_layer_trained,
            evidence.act_decades_per_layer_trained,
            evidence.rel_grad_median_trained,
            n,
        )
        reasons += trained_reasons
        if evidence.max_update_ratio is not None and evidence.max_update_ratio > UPDATE_RATIO_CEILING:
            trained = "exploding"
            reasons.append(
                f"An update changed a layer's weights by {evidence.max_update_ratio:.2g}× their norm "
                f"(ceiling {UPDATE_RATIO_CEILING:g})."
            )
        growth = _ratio([evidence.grad_norm_total_max, evidence.grad_norm_total_init])
        if growth is not None and growth > GRAD_GROWTH_CEILING:
            trained = "exploding"
            reasons.append(
                f"The total gradient norm grew {growth:.2g}-fold over its value at initialisation "
                f"(ceiling {GRAD_GROWTH_CEILING:g})."
            )
    label: Label = max((at_init, trained or "healthy"), key=_SEVERITY.__getitem__)
    if evidence.nonfinite_step is not None:
        label = "exploding"
        where = f", first in layer {evidence.nonfinite_layer}" if evidence.nonfinite_layer is not None else ""
        reasons.insert(0, f"The loss or gradient became non-finite at step {evidence.nonfinite_step}{where}.")
    if label == "healthy":
        slope = evidence.decades_per_layer
        reasons.append(
            "Gradient norms stay within the thresholds across the interior layers"
            + (f" (slope {slope:+.2f} decades per layer at initialisation)." if slope is not None else ".")
        )
    if theory is not None and theory.applicable:
        reasons.append(theory.reason)
    return Verdict(
        label=label,
        at_init=at_init,
        trained=trained,
        evidence=evidence,
        reasons=reasons,
        advice=_advice(spec, label, evidence),
        theory=theory or Theory(applicable=False, reason="Theory is computed when the probe finishes."),
    )
