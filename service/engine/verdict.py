"""Decides vanishing / exploding / healthy from the recorded profiles, and lists the findings behind it.

Two steps: `measure` turns records into `Evidence` (numbers only), `decide` turns evidence into a
`Verdict`: a label, the findings (each with its evidence, one sentence and the advice it triggers),
the reasons and the theory. docs/verdict.md states every rule and derives every constant below.

The label answers one question — do the gradients vanish or explode? Everything else the evidence
shows (the forward signal, the step size, Adam's behaviour, dead or saturated units, penalties,
normalisation layers) is a finding of its own and never changes the label.

Profiles use the weight layers (linear/conv) without the first and the last: the input layer sees
raw pixels and the output layer the loss, so both sit off the trend. A slope is fitted by least
squares to log10 of the interior values, in decades per layer *toward the input* (negative: the
gradient shrinks on its way back); the span is the fitted change across the interior,
slope × (interior − 1), i.e. how many decades the first interior layer's value sits from the last's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Protocol

from graddiag.models.shapes import SEQUENCE_FEATURES
from graddiag.models.spec import RECURRENT_ARCHS, Spec
from graddiag.service.engine.profile import LOG_FLOOR, SPAN_DECADES, fit_slope
from graddiag.service.engine.report import (
    Evidence,
    Finding,
    Label,
    LayerInfo,
    LayerRecord,
    StepMetrics,
    Theory,
    TimeRecord,
    Verdict,
    transformer_blocks,
)
from graddiag.service.engine.theory import kaiming_sigma_w2, remedy_span, span_noise_decades
from graddiag.service.engine.theory_time import time_remedy_span


class Setup(Protocol):
    """What the verdict reads of a run besides its records: a probe's Spec, or the `ModelDescription`
    (report.py) of a model graddiag did not build, which answers the spec-only settings as unknown."""

    @property
    def arch(self) -> str: ...
    @property
    def width(self) -> int | None: ...
    @property
    def activation(self) -> str: ...
    @property
    def init(self) -> str: ...
    @property
    def init_gain(self) -> float: ...
    @property
    def bias_init(self) -> str: ...
    @property
    def norm(self) -> str: ...
    @property
    def residual(self) -> bool: ...
    @property
    def optimizer(self) -> str: ...
    @property
    def lr(self) -> float: ...
    @property
    def clip_value(self) -> float | None: ...
    @property
    def l1(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...


# Advice for a profile of a model graddiag did not build: theory.remedy_span predicts a remedy's span for
# graddiag's own MLPs and CNNs only, so these remedies come without a predicted number.
UNPREDICTED_REMEDIES: dict[str, str] = {
    "vanishing": "Normalise each block (batch or layer norm), add residual connections, or re-initialise with "
    "Kaiming init and zero biases; graddiag predicts a remedy's effect only for its own MLPs and CNNs, so "
    "diagnose the model again after the change.",
    "exploding": "Normalise each block, shrink the initial weights or clip the gradient norm; graddiag predicts a "
    "remedy's effect only for its own MLPs and CNNs, so diagnose the model again after the change.",
}

# A fit needs at least this many interior layers: with two, a "trend" is the ratio of two noisy norms.
MIN_INTERIOR_LAYERS = 3
# The span must also exceed this many standard deviations of the chance change of a finite-width
# network's log-norms (theory.span_noise_decades): 2σ leaves about 2 % of healthy nets over the line.
NOISE_Z = 2.0
# Absolute scale, ‖∂L/∂W‖/‖W‖: a median below the floor means no layer really learns even when the
# profile is flat; any interior layer above the ceiling means one SGD step at lr 0.1 (the top of the
# usual range) would move that layer by its own norm — a gradient explosion in scale, not in shape.
REL_GRAD_FLOOR = 1e-5
REL_GRAD_CEILING = 10.0
# During training, a total gradient norm a thousandfold above its value at init is an explosion.
GRAD_GROWTH_CEILING = 1e3
# Step size: an update larger than the weight it changes replaces the layer (critical); above a tenth
# it is far beyond the ~1e-3 of a well-tuned run (warning).
UPDATE_RATIO_CEILING = 1.0
UPDATE_RATIO_WARNING = 0.1
# Adam's ε (PyTorch's default): once a layer's RMS gradient entry is within 10× of it, the step
# lr·g/(√v + ε) is cut by ε, and below it the layer stops learning.
ADAM_EPS = 1e-8
ADAM_EPS_MARGIN = 10.0
# Adam "equalises" the per-layer steps when its update ratios span less than this across the interior.
ADAM_EQUAL_SPAN = 1.0
# Zero gradient entries are a finding, never a label: deep ReLU nets switch whole units off for a
# batch (75 % zeros is normal at depth 20), which is not death.
DEAD_FRACTION = 0.9
# Saturated units (local derivative < 5 % of its maximum): a warning above half, information above 5 %.
SATURATION_WARNING = 0.5
SATURATION_INFO = 0.05
# Forward signal: the loss at init of a 10-class net with small logits is ln 10; ten times that means
# the logits are large enough to saturate the softmax.
LN_CLASSES = math.log(10)
LOSS_INIT_CEILING = 10.0
# The penalty drives a layer when its gradient exceeds the data loss's.
PENALTY_DOMINANCE = 1.0
# A transformer's updates concentrate near the output when the last block's step-0 update ratio is at
# least this many times the blocks' geometric mean: a global lr that suits the last block then costs
# the typical block over a factor 2 of its step, more than one notch of the usual lr grid (1, 2-3, 5).
NEAR_OUTPUT_FACTOR = 2.0
# Through time (recurrent nets, docs/verdict.md "Through time"): the same SPAN_DECADES rule on the top
# recurrent layer's ‖∂L/∂h_t‖ across the sequence, without a finite-width allowance (none is derived for a
# recurrent matrix that is the same at every step). A sigmoid gate counts as saturated where σ′ is under
# 5 % of its maximum 1/4, i.e. outside [GATE_SATURATED_LOW, 1 − GATE_SATURATED_LOW]; the fractions use the
# saturation finding's SATURATION_INFO and SATURATION_WARNING.
GATE_SATURATED_LOW = (1 - math.sqrt(1 - 4 * 0.05 * 0.25)) / 2

_SEVERITY: dict[Label, int] = {"healthy": 0, "vanishing": 1, "exploding": 2}


def _span(slope: float | None, interior: int) -> float | None:
    return None if slope is None else slope * (interior - 1)


def _ratio(values: Sequence[float | None]) -> float | None:
    if len(values) < 2 or values[0] is None or not values[-1]:
        return None
    return values[0] / values[-1]


def _median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _max_or_none(values: Sequence[float | None]) -> float | None:
    return max((v for v in values if v is not None), default=None)


def _log_median(values: Sequence[float | None]) -> float | None:
    """Median in log space, so one outlier step does not dominate a layer's trained profile."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return 10 ** statistics.median(math.log10(max(v, LOG_FLOOR)) for v in present)


def _grad_rms(record: LayerRecord, layer: LayerInfo) -> float | None:
    # params counts the bias too: a relative error of 1/fan_in on the RMS, immaterial next to ε's 10×.
    return None if record.grad_norm is None else record.grad_norm / math.sqrt(max(layer.params, 1))


class _Profiles:
    """The records indexed by step and layer, with the interior weight layers picked out.

    `grad_layers` and `act_layers` are the layers whose ‖∂L/∂W‖ and ‖∂L/∂h‖ form the depth profiles: the
    interior weight layers, or for a transformer one layer per block (its mlp.fc2, and the layer that
    outputs the block). `interior` are the layers whose scale, zeros and ε the rules judge.
    """

    def __init__(self, layers: Sequence[LayerInfo], records: Sequence[LayerRecord]) -> None:
        self.layers = {layer.index: layer for layer in layers}
        self.blocks = transformer_blocks(layers)
        if self.blocks:
            # The embeddings (position table, class token) start at N(0, 0.02²): their relative update is
            # large by construction and they sit beside the blocks, not in them.
            self.weight_layers = [layer.index for layer in layers if layer.kind in ("linear", "attention")]
            self.norm_layers = [b.norm for b in self.blocks if b.norm is not None]
            self.interior = [i for b in self.blocks for i in b.weights]
            self.grad_layers = [b.fc2 for b in self.blocks]
            self.act_layers = [b.output for b in self.blocks]
        else:
            self.weight_layers = [layer.index for layer in layers if layer.kind in ("linear", "conv")]
            self.norm_layers = [layer.index for layer in layers if layer.kind == "norm"]
            self.interior = self.weight_layers[1:-1] if len(self.weight_layers) > 2 else []
            self.grad_layers = self.act_layers = self.interior
        self.by_step: dict[int, dict[int, LayerRecord]] = {}
        for record in records:
            self.by_step.setdefault(record.step, {})[record.layer] = record
        self.steps = sorted(self.by_step)

    def at(self, step: int, field: str, layers: Sequence[int]) -> list[float | None]:
        rows = self.by_step[step]
        return [getattr(rows[i], field) if i in rows else None for i in layers]

    def trained(self, field: str, layers: Sequence[int]) -> list[float | None]:
        """Per layer, the log-median of `field` over the recorded steps after the first."""
        later = [self.by_step[s] for s in self.steps[1:]]
        return [_log_median([getattr(rows[i], field) for rows in later if i in rows]) for i in layers]


def measure(
    layers: Sequence[LayerInfo],
    records: Sequence[LayerRecord],
    steps: Sequence[StepMetrics],
    *,
    nonfinite_step: int | None = None,
    nonfinite_layer: int | None = None,
    time_records: Sequence[TimeRecord] = (),
) -> Evidence:
    """The numbers behind a verdict: profiles at initialisation (step 0) and over training, and for a
    recurrent net its top layer's gradient through time (`time_records`)."""
    profiles = _Profiles(layers, records)
    interior = profiles.interior
    grad_layers, act_layers = profiles.grad_layers, profiles.act_layers
    n = len(grad_layers)
    evidence = Evidence(
        interior_layers=n,
        nonfinite_step=nonfinite_step,
        nonfinite_layer=nonfinite_layer,
        loss_first=steps[0].loss if steps else None,
        loss_last=steps[-1].loss if steps else None,
        grad_norm_total_init=steps[0].grad_norm_total_pre if steps else None,
        grad_norm_total_max=_max_or_none([s.grad_norm_total_pre for s in steps]),
    )
    if not profiles.steps:
        _measure_time(evidence, layers, time_records)
        return evidence

    first = profiles.steps[0]
    grad = profiles.at(first, "grad_norm", grad_layers)
    act_grad = profiles.at(first, "act_grad_norm", act_layers)
    evidence.decades_per_layer = fit_slope(grad)
    evidence.act_decades_per_layer = fit_slope(act_grad)
    evidence.span_decades = _span(evidence.decades_per_layer, n)
    evidence.act_span_decades = _span(evidence.act_decades_per_layer, n)
    evidence.interior_ratio = _ratio(grad)
    evidence.act_interior_ratio = _ratio(act_grad)
    evidence.rel_grad_median = _median_or_none(profiles.at(first, "rel_grad", interior or profiles.weight_layers))
    evidence.rel_grad_max = _max_or_none(profiles.at(first, "rel_grad", interior))

    # The forward signal grows toward the output, so its slope is given in the forward direction.
    forward = fit_slope(profiles.at(first, "act_norm", grad_layers))
    evidence.forward_decades_per_layer = None if forward is None else -forward
    evidence.forward_span_decades = _span(evidence.forward_decades_per_layer, n)
    if profiles.weight_layers:
        evidence.output_rms_init = profiles.at(first, "act_norm", profiles.weight_layers[-1:])[0]

    ratios = profiles.at(first, "update_ratio", grad_layers)
    evidence.update_ratio_init_decades_per_layer = fit_slope(ratios)
    evidence.update_ratio_init_span_decades = _span(evidence.update_ratio_init_decades_per_layer, n)
    evidence.update_ratio_init_max = _max_or_none(profiles.at(first, "update_ratio", profiles.weight_layers))
    first_rows = profiles.by_step[first]
    rms = [_grad_rms(first_rows[i], profiles.layers[i]) for i in interior if i in first_rows]
    evidence.grad_rms_min = min((r for r in rms if r is not None), default=None)
    if len(profiles.norm_layers) >= MIN_INTERIOR_LAYERS:
        evidence.norm_decades_per_layer = fit_slope(profiles.at(first, "grad_norm", profiles.norm_layers))
        evidence.norm_span_decades = _span(evidence.norm_decades_per_layer, len(profiles.norm_layers))

    if len(profiles.steps) > 1:
        grad_trained = profiles.trained("grad_norm", grad_layers)
        evidence.decades_per_layer_trained = fit_slope(grad_trained)
        evidence.act_decades_per_layer_trained = fit_slope(profiles.trained("act_grad_norm", act_layers))
        evidence.span_decades_trained = _span(evidence.decades_per_layer_trained, n)
        evidence.act_span_decades_trained = _span(evidence.act_decades_per_layer_trained, n)
        evidence.interior_ratio_trained = _ratio(grad_trained)
        rel_trained = profiles.trained("rel_grad", interior)
        evidence.rel_grad_median_trained = _median_or_none(rel_trained)
        evidence.rel_grad_max_trained = _max_or_none(rel_trained)
    evidence.max_update_ratio = _max_or_none([r.update_ratio for r in records if r.layer in profiles.weight_layers])
    last = profiles.steps[-1]
    evidence.zero_grad_frac_max = _max_or_none(profiles.at(last, "zero_grad_frac", interior))
    saturation = [r.saturation_frac for r in records if r.saturation_frac is not None]
    evidence.saturation_frac_mean = statistics.fmean(saturation) if saturation else None
    evidence.saturation_frac_max = max(saturation) if saturation else None
    penalty_ratios = [
        r.penalty_grad_norm / r.grad_norm
        for r in records
        if r.layer in profiles.weight_layers and r.penalty_grad_norm is not None and r.grad_norm
    ]
    evidence.penalty_grad_ratio_max = max(penalty_ratios) if penalty_ratios else None
    if profiles.blocks:
        evidence.near_output_ratio = _near_output(grad)
    _measure_time(evidence, layers, time_records)
    return evidence


class _Times:
    """Time records indexed by step and layer, t in order; `top` is the judged (top) recurrent layer."""

    def __init__(self, layers: Sequence[LayerInfo], records: Sequence[TimeRecord]) -> None:
        recurrent = [layer.index for layer in layers if layer.kind == "recurrent"]
        self.top = max(recurrent) if recurrent else None
        self.by_step: dict[int, dict[int, list[TimeRecord]]] = {}
        for record in sorted(records, key=lambda r: (r.step, r.layer, r.t)):
            self.by_step.setdefault(record.step, {}).setdefault(record.layer, []).append(record)
        self.steps = sorted(self.by_step)

    def series(self, step: int, field: str, layer: int | None = None) -> list[float | None]:
        """`field` over t at `step` for `layer` (the top layer by default)."""
        which = self.top if layer is None else layer
        rows = self.by_step.get(step, {}).get(which, []) if which is not None else []
        return [getattr(r, field) for r in rows]


def _measure_time(evidence: Evidence, layers: Sequence[LayerInfo], records: Sequence[TimeRecord]) -> None:
    """The top recurrent layer's ‖∂L/∂h_t‖ (and the LSTM's ‖∂L/∂c_t‖) over t at step 0 and the last record.

    The slope is fitted to log10 of the values in t order, in decades per step toward t = 0 (negative:
    the gradient shrinks on its way back through time), like a depth profile toward the input; the span
    is slope × (steps − 1), the fitted change from the last time step to the first.
    """
    times = _Times(layers, records)
    if times.top is None or not times.steps:
        return
    evidence.time_layer = times.top
    first, last = times.steps[0], times.steps[-1]
    grad = times.series(first, "grad_norm")
    evidence.time_decades_per_step = fit_slope(grad)
    evidence.time_span_decades = _span(evidence.time_decades_per_step, len(grad))
    evidence.cell_decades_per_step = fit_slope(times.series(first, "cell_grad_norm"))
    if last != first:
        trained = times.series(last, "grad_norm")
        evidence.time_decades_per_step_trained = fit_slope(trained)
        evidence.time_span_decades_trained = _span(evidence.time_decades_per_step_trained, len(trained))
    # A vanilla tanh RNN's own units (no gates): its h_t saturation is the saturation finding's, as an
    # MLP layer's activation would be.
    if all(r.gate_mean is None for r in records) and evidence.saturation_frac_max is None:
        saturation = [r.saturation_frac for r in records if r.saturation_frac is not None]
        if saturation:
            evidence.saturation_frac_mean = statistics.fmean(saturation)
            evidence.saturation_frac_max = max(saturation)


def _near_output(values: Sequence[float | None]) -> float | None:
    """The last value over the geometric mean of all (None unless there are two, all positive)."""
    present = [v for v in values if v is not None and v > 0]
    if len(values) < 2 or len(present) < len(values) or values[-1] is None:
        return None
    return values[-1] / math.exp(statistics.fmean(math.log(v) for v in present))


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


class _Judge:
    """Builds the findings of one verdict; each rule is a method, in the order docs/verdict.md lists them."""

    def __init__(
        self,
        spec: Setup,
        evidence: Evidence,
        theory: Theory | None,
        layers: Sequence[LayerInfo],
        records: Sequence[LayerRecord],
        time_records: Sequence[TimeRecord] = (),
    ) -> None:
        self.spec = spec
        self.evidence = evidence
        self.theory = theory
        self.profiles = _Profiles(layers, records)
        self.times = _Times(layers, time_records)
        self._time_advice_made: dict[Label, list[str]] = {}
        self.recurrent = spec.arch in RECURRENT_ARCHS
        self.findings: list[Finding] = []
        self.uses_adam = spec.optimizer in ("adam", "adamw")
        # A transformer's profiles run across its blocks (docs/verdict.md, "Transformers").
        self.transformer = spec.arch == "transformer"
        self.unit, self.per = ("blocks", "block") if self.transformer else ("interior layers", "layer")
        self.post_ln = isinstance(spec, Spec) and spec.arch == "transformer" and spec.norm_position == "post"

    # --- the label ---------------------------------------------------------------------------

    def noise(self) -> float:
        """NOISE_Z standard deviations of the chance span at this width and depth (0 without a fit)."""
        n = self.evidence.interior_layers
        # The random walk of Hanin 2018 multiplies the signal by a random factor per layer; a transformer's
        # residual stream adds each block's contribution instead, and no allowance is derived for it.
        if n < MIN_INTERIOR_LAYERS or self.transformer:
            return 0.0
        qs = self.theory.q_per_layer if self.theory is not None and self.theory.q_per_layer else None
        q_values = [q if q is not None else 1.0 for q in qs] if qs else [1.0] * n
        fan_in = (self.spec.width or 0) * (9 if self.spec.arch == "cnn" else 1)
        sigma = span_noise_decades(
            self.spec.activation, q_values[: n - 1], fan_in, orthogonal=self.spec.init == "orthogonal"
        )
        return NOISE_Z * sigma

    def profile(
        self, phase: str, spans: dict[str, float | None], rel_median: float | None, rel_max: float | None
    ) -> Label:
        """Label one phase from its spans and its relative-gradient scale; add the findings."""
        e = self.evidence
        n = e.interior_layers
        threshold = SPAN_DECADES + (e.noise_decades or 0.0)
        label: Label = "healthy"
        key = "init" if phase == "At initialisation" else "training"
        if n >= MIN_INTERIOR_LAYERS:
            for what, span in spans.items():
                if span is None or abs(span) < threshold:
                    continue
                kind: Label = "vanishing" if span < 0 else "exploding"
                direction = "falls" if span < 0 else "grows"
                message = (
                    f"{phase}, the {what} {direction} by {abs(span):.1f} decades across {n} {self.unit} "
                    f"toward the input ({span / (n - 1):+.3f} per {self.per}; threshold {threshold:.1f} decades = "
                    f"{SPAN_DECADES:g} + {e.noise_decades or 0.0:.2f} finite-width allowance)."
                )
                if kind == "vanishing" and self.uses_adam:
                    message += self._adam_clause()
                elif kind == "vanishing":
                    message += (
                        f" The first {self.per if self.transformer else 'interior layer'}'s gradient is "
                        f"{10 ** abs(span):.2g}× smaller than the last's."
                    )
                self.add(
                    "gradient_profile",
                    "critical",
                    key,
                    message,
                    {
                        "statistic": what,
                        "span_decades": span,
                        "decades_per_layer": span / (n - 1),
                        "threshold": threshold,
                    },
                    sorted({*self.profiles.grad_layers, *self.profiles.act_layers}),
                    self._profile_advice(kind),
                )
                label = "exploding" if kind == "exploding" or label == "exploding" else kind
        if rel_max is not None and rel_max > REL_GRAD_CEILING:
            self.add(
                "gradient_scale",
                "critical",
                key,
                f"{phase}, an interior layer's ‖∂L/∂W‖/‖W‖ reaches {rel_max:.3g}, above the {REL_GRAD_CEILING:g} "
                "ceiling: one SGD step at lr 0.1 would move it by its own norm.",
                {"rel_grad_max": rel_max, "ceiling": REL_GRAD_CEILING},
                advice=self._scale_advice("exploding"),
            )
            label = "exploding"
        elif label == "healthy" and rel_median is not None and rel_median < REL_GRAD_FLOOR:
            self.add(
                "gradient_scale",
                "critical",
                key,
                f"{phase}, the median relative gradient ‖∂L/∂W‖/‖W‖ is {rel_median:.1e}, below the "
                f"{REL_GRAD_FLOOR:.0e} floor: the weights barely move whatever the profile's shape.",
                {"rel_grad_median": rel_median, "floor": REL_GRAD_FLOOR},
                advice=self._scale_advice("vanishing"),
            )
            label = "vanishing"
        return label

    def _adam_clause(self) -> str:
        span = self.evidence.update_ratio_init_span_decades
        if span is None:
            return ""
        if abs(span) < ADAM_EQUAL_SPAN:
            return (
                f" Under {self.spec.optimizer} the per-layer update ratios span only {abs(span):.2f} decades at "
                "step 0, so the early layers still take steps of the same relative size."
            )
        return f" Under {self.spec.optimizer} the per-layer update ratios still span {abs(span):.1f} decades."

    def _statistics(self) -> tuple[str, str]:
        """How the two profiles are named in messages: per interior layer, or per transformer block."""
        if self.transformer:
            return "mlp.fc2 weight-gradient norm ‖∂L/∂W‖", "block-output signal ‖∂L/∂h‖"
        return "weight-gradient norm ‖∂L/∂W‖", "back-propagated signal ‖∂L/∂h‖"

    def label_at_init(self) -> Label:
        e = self.evidence
        weight, signal = self._statistics()
        spans = {weight: e.span_decades, signal: e.act_span_decades}
        return self.profile("At initialisation", spans, e.rel_grad_median, e.rel_grad_max)

    def label_trained(self) -> Label | None:
        e = self.evidence
        if len(self.profiles.steps) < 2:
            return None
        weight, signal = self._statistics()
        spans = {weight: e.span_decades_trained, signal: e.act_span_decades_trained}
        label = self.profile("During training", spans, e.rel_grad_median_trained, e.rel_grad_max_trained)
        growth = _ratio([e.grad_norm_total_max, e.grad_norm_total_init])
        if growth is not None and growth > GRAD_GROWTH_CEILING:
            self.add(
                "gradient_profile",
                "critical",
                "training",
                f"The total gradient norm grew {growth:.3g}-fold over its value at initialisation "
                f"(ceiling {GRAD_GROWTH_CEILING:g}).",
                {"growth": growth, "ceiling": GRAD_GROWTH_CEILING},
                advice=self._instability_advice(),
            )
            label = "exploding"
        return label

    def nonfinite(self) -> bool:
        e = self.evidence
        if e.nonfinite_step is None:
            return False
        where = f", first in layer {e.nonfinite_layer}" if e.nonfinite_layer is not None else ""
        self.add(
            "nonfinite",
            "critical",
            "training" if e.nonfinite_step > 0 else "init",
            f"The loss or gradient became non-finite at step {e.nonfinite_step}{where}; training stopped there.",
            {"step": e.nonfinite_step, "layer": e.nonfinite_layer},
            [e.nonfinite_layer] if e.nonfinite_layer is not None else [],
            self._instability_advice(),
        )
        return True

    # --- findings that never change the label --------------------------------------------------

    def forward_signal(self) -> None:
        e = self.evidence
        span = e.forward_span_decades
        threshold = SPAN_DECADES + (e.noise_decades or 0.0)
        loss_ratio = None if e.loss_first is None else e.loss_first / LN_CLASSES
        numbers = {
            "forward_span_decades": span,
            "forward_decades_per_layer": e.forward_decades_per_layer,
            "output_rms": e.output_rms_init,
            "loss_init": e.loss_first,
            "loss_init_over_ln10": loss_ratio,
        }
        big_loss = loss_ratio is not None and loss_ratio > LOSS_INIT_CEILING
        if e.interior_layers >= MIN_INTERIOR_LAYERS and span is not None and abs(span) >= threshold:
            grows = span > 0
            what = "RMS of each block's MLP output" if self.transformer else "RMS of each layer's output"
            message = (
                f"At initialisation the forward signal ({what}) "
                f"{'grows' if grows else 'shrinks'} by {abs(span):.1f} decades across the {self.unit} "
                f"({span / (e.interior_layers - 1):+.3f} per {self.per} toward the output)"
            )
            message += f"; the loss at init is {e.loss_first:.3g}, {loss_ratio:.2g}× ln 10." if loss_ratio else "."
            if self.transformer:
                # Layer norm and residual connections are already in every block; the init scale is what is left.
                advice = [f"{'Shrink' if grows else 'Raise'} the initial weights (init_gain)."]
            elif grows:
                advice = [
                    "Shrink the initial weights (init_gain) or normalise each block (norm=layer): the residual stream "
                    "or the weights amplify the signal at every layer."
                ]
            else:
                advice = [
                    "Raise the initial weights to the Kaiming scale (init=kaiming_normal): the signal dies out "
                    "before it reaches the output, so the output layer learns from noise."
                ]
            self.add(
                "forward_signal",
                "critical" if grows or big_loss else "warning",
                "init",
                message,
                numbers,
                advice=advice,
            )
        elif big_loss:
            self.add(
                "forward_signal",
                "warning",
                "init",
                f"The loss at init is {e.loss_first:.3g}, {loss_ratio:.2g}× ln 10: the logits are large enough "
                "to saturate the softmax from the first step.",
                numbers,
                advice=["Shrink the output layer's initial weights (init_gain) so the first loss is near ln 10."],
            )

    def step_size(self) -> None:
        e = self.evidence
        worst = e.max_update_ratio
        if worst is None or worst <= UPDATE_RATIO_WARNING:
            return
        layers = sorted(
            {
                r.layer
                for rows in self.profiles.by_step.values()
                for r in rows.values()
                if r.update_ratio is not None
                and r.update_ratio > UPDATE_RATIO_WARNING
                and r.layer in self.profiles.weight_layers
            }
        )
        factor = worst / 1e-2
        message = (
            f"An update changed a layer's weights by {worst:.3g}× their norm "
            f"({'above' if worst > UPDATE_RATIO_CEILING else 'near'} the {UPDATE_RATIO_CEILING:g} ceiling; a "
            "well-tuned run takes about 1e-3). This is the step size at lr "
            f"{self.spec.lr:g}, not the gradient's flow through depth."
        )
        numbers: dict[str, float | int | str | None] = {
            "max_update_ratio": worst,
            "update_ratio_init_max": e.update_ratio_init_max,
            "lr": self.spec.lr,
        }
        lower = (
            f"Lower the learning rate about {factor:.2g}-fold (lr={self.spec.lr / factor:.2g}) to bring the "
            "largest update near 1 % of the weight."
        )
        if self.transformer:
            clause, extra, advice = self._transformer_step()
            message += clause
            numbers |= extra
        else:
            advice = ["Or warm the learning rate up over the first steps, which is where the largest updates are."]
        self.add(
            "step_size",
            "critical" if worst > UPDATE_RATIO_CEILING else "warning",
            "training",
            message,
            numbers,
            layers,
            [lower, *advice],
        )

    def adam(self) -> None:
        if not self.uses_adam:
            return
        e = self.evidence
        span = e.update_ratio_init_span_decades
        grad_span = e.act_span_decades if e.act_span_decades is not None else e.span_decades
        if (
            span is not None
            and grad_span is not None
            and abs(grad_span) >= SPAN_DECADES
            and abs(span) < ADAM_EQUAL_SPAN
        ):
            self.add(
                "adam_equalised",
                "info",
                "init",
                f"{self.spec.optimizer} equalises the per-layer step sizes: the raw gradients change by "
                f"{abs(grad_span):.1f} decades across the interior, but the update ratios ‖ΔW‖/‖W‖ at step 0 "
                f"span only {abs(span):.2f} decades, so the early layers still learn.",
                {"gradient_span_decades": grad_span, "update_ratio_span_decades": span},
            )
        first = self.profiles.steps[0] if self.profiles.steps else None
        if first is None:
            return
        rows = self.profiles.by_step[first]
        starved = [
            i
            for i in self.profiles.interior
            if i in rows
            and (rms := _grad_rms(rows[i], self.profiles.layers[i])) is not None
            and rms < ADAM_EPS * ADAM_EPS_MARGIN
        ]
        if starved:
            self.add(
                "adam_epsilon",
                "critical" if (e.grad_rms_min or 0) < ADAM_EPS else "warning",
                "init",
                f"In {len(starved)} interior layer(s) the RMS gradient entry at init is {e.grad_rms_min:.2g}, within "
                f"10× of Adam's ε = {ADAM_EPS:g}: the step lr·g/(√v + ε) is cut by ε there, and below ε those "
                "layers effectively stop learning.",
                {"grad_rms_min": e.grad_rms_min, "eps": ADAM_EPS},
                starved,
                [
                    "Raise the gradients above ε by fixing the vanishing profile (see gradient_profile), or give "
                    "Adam a smaller eps in your own training code."
                ],
            )

    def units(self) -> None:
        e = self.evidence
        if e.zero_grad_frac_max is not None and e.zero_grad_frac_max > DEAD_FRACTION:
            self.add(
                "dead_units",
                "warning",
                "training",
                f"{e.zero_grad_frac_max:.0%} of an interior layer's weight gradient (of the data loss) is exactly "
                "zero at the last recorded step: those units are dead for every example of the batch.",
                {"zero_grad_frac_max": e.zero_grad_frac_max, "threshold": DEAD_FRACTION},
                advice=[
                    "Use gelu (its negative side keeps a gradient) or a lower learning rate."
                    if self.transformer
                    else "Use leaky_relu (its negative side keeps a gradient) or a lower learning rate."
                ],
            )
        worst = e.saturation_frac_max
        if worst is not None and worst >= SATURATION_INFO:
            self.add(
                "saturation",
                "warning" if worst >= SATURATION_WARNING else "info",
                None,
                f"Up to {worst:.0%} of a layer's {self.spec.activation} units are saturated (local derivative below "
                f"5 % of its maximum; mean {e.saturation_frac_mean or 0:.0%} over records).",
                {"saturation_frac_max": worst, "saturation_frac_mean": e.saturation_frac_mean},
                advice=["Shrink the initial weights (init_gain) so pre-activations stay in the active range."]
                if worst >= SATURATION_WARNING
                else [],
            )

    def penalties(self) -> None:
        ratio = self.evidence.penalty_grad_ratio_max
        if ratio is not None and ratio > PENALTY_DOMINANCE:
            self.add(
                "penalty_dominates",
                "warning",
                "training",
                f"The penalty's gradient (L1 {self.spec.l1:g}, weight decay {self.spec.weight_decay:g}) reaches "
                f"{ratio:.3g}× the data loss's in a layer: the penalty, not the data, drives that layer.",
                {"penalty_grad_ratio_max": ratio, "l1": self.spec.l1, "weight_decay": self.spec.weight_decay},
                advice=["Lower l1 / weight_decay, or expect those weights to shrink toward zero."],
            )

    def structure(self) -> None:
        zero_bias = [layer.index for layer in self.profiles.layers.values() if layer.structural_zero_bias]
        if zero_bias:
            self.add(
                "structural_zero_bias",
                "info",
                None,
                f"{len(zero_bias)} layer(s) have a bias right before batch norm, which subtracts the batch mean: "
                "their bias gradient is zero by construction, recorded but not judged.",
                {"layers": len(zero_bias)},
                zero_bias,
                ["Drop those biases (bias=False before batch norm); they only cost memory."],
            )
        e = self.evidence
        if e.norm_span_decades is not None:
            norms = self.profiles.norm_layers
            threshold = SPAN_DECADES + (e.noise_decades or 0.0)
            steep = abs(e.norm_span_decades) >= threshold
            self.add(
                "norm_layers",
                "warning" if steep else "info",
                "init",
                (
                    f"The gain gradients of the {len(norms)} blocks' norm2 layers"
                    if self.transformer
                    else f"The {len(norms)} normalisation layers' gain gradients"
                )
                + f" change by {e.norm_span_decades:+.2f} decades toward the input "
                f"({e.norm_decades_per_layer or 0:+.3f} per {self.per})"
                + (": they follow the exploding back-propagated signal." if steep and e.norm_span_decades > 0 else ".")
                + ("" if steep else " Within the thresholds."),
                {"norm_span_decades": e.norm_span_decades, "norm_decades_per_layer": e.norm_decades_per_layer},
                norms,
            )

    # --- transformers: the profile across blocks (docs/verdict.md, "Transformers") ---------------

    def _block_update_ratios(self) -> list[float | None]:
        """Per block, the largest update ratio of its attention and MLP weights at the first recorded step."""
        if not self.profiles.steps:
            return []
        first = self.profiles.steps[0]
        return [_max_or_none(self.profiles.at(first, "update_ratio", b.weights)) for b in self.profiles.blocks]

    def _transformer_step(self) -> tuple[str, dict[str, float | int | str | None], list[str]]:
        """Where a transformer's large updates are, and the advice they support: warm-up only when the updates
        are already large at step 0; pre-LN only for post-LN when the last block's step-0 update is at least
        NEAR_OUTPUT_FACTOR× the blocks' geometric mean (the concentration Xiong et al. 2020 derive)."""
        e = self.evidence
        ratios = self._block_update_ratios()
        concentration = _near_output(ratios)
        present = [(r, i) for i, r in enumerate(ratios, start=1) if r is not None]
        largest, where = max(present) if present else (None, None)
        numbers: dict[str, float | int | str | None] = {
            "update_ratio_init_largest_block": where,
            "update_ratio_init_block_max": largest,
            "update_ratio_init_near_output": concentration,
        }
        early = e.update_ratio_init_max is not None and e.update_ratio_init_max > UPDATE_RATIO_WARNING
        if largest is None:
            clause = ""
        else:
            clause = (
                f" At step 0 the blocks' largest update is {largest:.3g}× the weight, in block {where} of "
                f"{len(ratios)}"
                + (
                    f"; the last block's is {concentration:.2g}× the blocks' geometric mean."
                    if concentration is not None
                    else "."
                )
            )
        advice: list[str] = []
        if early:
            advice.append(
                "Or warm the learning rate up over the first steps: the updates are already this large at step 0."
            )
        else:
            clause += " The updates were small at step 0, so a warm-up would not reach the large ones."
        near_output = concentration is not None and concentration >= NEAR_OUTPUT_FACTOR
        if early and near_output and self.post_ln:
            advice.append(
                f"Or use norm_position=pre: the last block's step-0 update is {concentration:.2g}× the blocks' "
                "geometric mean, the post-LN concentration near the output that Xiong et al. (2020) derive and "
                "pre-LN removes."
            )
        return clause, numbers, advice

    def _transformer_profile_advice(self, kind: Label) -> list[str]:
        """Advice for a transformer whose profile crosses the span rule: no remedy's span is predicted. Pre-LN
        only for a post-LN profile that falls toward the input (largest near the output, as Xiong et al. 2020
        derive for post-LN and not for pre-LN)."""
        advice = [
            "Use fewer blocks or smaller initial weights (init_gain); graddiag predicts no remedy's span for "
            "transformers, so probe again after the change."
        ]
        if self.post_ln and kind == "vanishing":
            advice.insert(
                0,
                "Use norm_position=pre: this post-LN stack's gradients are largest near the output, the pattern "
                "Xiong et al. (2020) derive for post-LN and not for pre-LN (graddiag predicts no span for it; "
                "probe again).",
            )
        return advice

    def layer_norm_position(self) -> None:
        """A transformer's across-block profile at init beside Xiong et al. (2020) for its norm position."""
        blocks = self.profiles.blocks
        if not self.transformer or len(blocks) < 2 or not self.profiles.steps:
            return
        e = self.evidence
        first = self.profiles.steps[0]
        act = self.profiles.at(first, "act_grad_norm", self.profiles.act_layers)
        act_near = _near_output(act)
        post = self.post_ln
        n = len(blocks)
        message = (
            f"{'Post' if post else 'Pre'}-LN, {n} blocks, at initialisation: toward the input the block-output "
            f"‖∂L/∂h‖ changes by {_fmt(e.act_span_decades, '+.2f')} decades and mlp.fc2's ‖∂L/∂W‖ by "
            f"{_fmt(e.span_decades, '+.2f')}; the last block's fc2 gradient is {_fmt(e.near_output_ratio, '.2f')}× "
            f"the blocks' geometric mean (its ‖∂L/∂h‖ {_fmt(act_near, '.2f')}×)."
        )
        tilts = [span < 0 for span in (e.act_span_decades, e.span_decades) if span is not None]
        if post:
            seen = "both profiles" if all(tilts) else "one profile" if any(tilts) else "neither profile"
            message += (
                " Xiong et al. (2020) derive that post-LN's gradients at init are largest near the output, at a "
                f"scale that does not shrink with depth: here {seen} falls toward the input."
            )
        else:
            message += (
                " Xiong et al. (2020) derive that pre-LN's gradients at init stay level across blocks, the last "
                "block's shrinking as 1/√L with depth (a depth sweep shows that; one run cannot)."
            )
        ratios = self._block_update_ratios()
        block_max = _max_or_none(ratios)
        if block_max is not None:
            message += (
                f" What decides whether warm-up matters is the step: at lr {self.spec.lr:g} the blocks' largest "
                f"update at step 0 is {block_max:.3g}× the weight, "
                + (
                    f"above the {UPDATE_RATIO_WARNING:g} warning (see step_size)."
                    if block_max > UPDATE_RATIO_WARNING
                    else f"below the {UPDATE_RATIO_WARNING:g} warning."
                )
            )
        rows = self.profiles.by_step[first]

        def combined(indices: Sequence[int]) -> float | None:
            norms = [rows[i].grad_norm for i in indices if i in rows]
            if not norms or any(v is None for v in norms):
                return None
            return math.sqrt(sum(v * v for v in norms if v is not None))

        numbers: dict[str, float | int | str | None] = {
            "norm_position": "post" if self.post_ln else "pre",
            "blocks": n,
            "act_span_decades": e.act_span_decades,
            "span_decades": e.span_decades,
            "near_output_ratio": e.near_output_ratio,
            "act_near_output_ratio": act_near,
            "update_ratio_init_block_max": block_max,
            "update_ratio_init_largest_block": None if block_max is None else ratios.index(block_max) + 1,
        }
        for block, h in zip(blocks, act, strict=True):
            numbers[f"{block.name}.attn"] = combined(block.attention)
            numbers[f"{block.name}.mlp"] = combined(block.mlp)
            numbers[f"{block.name}.h"] = h
        self.add(
            "layer_norm_position",
            "info",
            "init",
            message,
            numbers,
            sorted({*self.profiles.grad_layers, *self.profiles.act_layers}),
        )

    # --- through time (recurrent nets) ----------------------------------------------------------

    def through_time(self, phase: str) -> Label:
        """Label the top recurrent layer's ‖∂L/∂h_t‖ across the sequence by the SPAN_DECADES rule."""
        e = self.evidence
        at_init = phase == "At initialisation"
        span = e.time_span_decades if at_init else e.time_span_decades_trained
        slope = e.time_decades_per_step if at_init else e.time_decades_per_step_trained
        if span is None or slope is None or abs(span) < SPAN_DECADES:
            return "healthy"
        kind: Label = "vanishing" if span < 0 else "exploding"
        steps = round(span / slope) + 1 if slope else 0
        message = (
            f"{phase}, ‖∂L/∂h_t‖ of the top recurrent layer {'falls' if span < 0 else 'grows'} by {abs(span):.1f} "
            f"decades across the {steps} time steps toward t = 0 ({slope:+.3f} per step; threshold "
            f"{SPAN_DECADES:g} decades): the first row's gradient is {10 ** abs(span):.2g}× "
            f"{'smaller' if span < 0 else 'larger'} than the last's."
        )
        numbers: dict[str, float | int | str | None] = {
            "time_span_decades": span,
            "time_decades_per_step": slope,
            "threshold": SPAN_DECADES,
            "layer": e.time_layer,
        }
        if at_init and e.cell_decades_per_step is not None:
            numbers["cell_decades_per_step"] = e.cell_decades_per_step
            message += f" The cell state's ‖∂L/∂c_t‖ changes by {e.cell_decades_per_step:+.3f} per step."
        time = self.theory.time if self.theory is not None else None
        if at_init and time is not None and time.applicable and time.predicted_decades_per_step is not None:
            # The LSTM's theory predicts its cell path, ‖∂L/∂c_t‖ (theory_time).
            key = "predicted_cell_decades_per_step" if time.model == "lstm_cell" else "predicted_decades_per_step"
            numbers[key] = time.predicted_decades_per_step
        self.add(
            "gradient_through_time",
            "critical",
            "init" if at_init else "training",
            message,
            numbers,
            [e.time_layer] if e.time_layer is not None else [],
            self._time_advice(kind),
        )
        return kind

    def _time_advice(self, kind: Label) -> list[str]:
        """Remedies whose predicted span across the sequence (theory_time.time_remedy_span) is within ±2."""
        # Both phases may cross the line in the same direction: predict the remedies once.
        if kind not in self._time_advice_made:
            self._time_advice_made[kind] = self._predict_time_remedies(kind)
        return self._time_advice_made[kind]

    def _predict_time_remedies(self, kind: Label) -> list[str]:
        spec = self.spec
        advice: list[str] = []
        if kind == "exploding" and spec.clip_value is None:
            advice.append(
                "Clip the gradient norm (clip_value=1.0, clip_mode=norm): Pascanu et al. (2013)'s remedy for "
                "gradients that explode through time."
            )
        if not isinstance(spec, Spec):
            return advice
        time = self.theory.time if self.theory is not None else None
        q_input = time.q_input if time is not None and time.q_input else 1.0
        steps = len(self.times.series(self.times.steps[0], "grad_norm")) if self.times.steps else 0
        candidates: list[tuple[str, str]] = []
        if spec.arch == "rnn":
            if spec.init != "orthogonal" or spec.init_gain != 1.0 or spec.bias_init != "zeros":
                candidates.append(
                    (
                        "rnn_orthogonal",
                        "Use an orthogonal recurrent matrix, gain 1, zero biases (init=orthogonal, bias_init=zeros)",
                    )
                )
            candidates += [
                ("gru", "Use a GRU (arch=gru)"),
                ("lstm_forget1", "Use an LSTM with forget bias 1 (arch=lstm, forget_bias=1; Jozefowicz et al. 2015)"),
                ("lstm_chrono", "Use an LSTM with chrono init (arch=lstm, forget_bias=chrono; Tallec & Ollivier 2018)"),
            ]
        elif spec.arch == "gru":
            candidates.append(
                ("lstm_chrono", "Use an LSTM with chrono init (arch=lstm, forget_bias=chrono; Tallec & Ollivier 2018)")
            )
        elif spec.arch == "lstm":
            if spec.forget_bias is None or (spec.forget_bias != "chrono" and spec.forget_bias < 1):
                candidates.append(
                    ("lstm_forget1", "Set the forget gate's bias to 1 (forget_bias=1; Jozefowicz et al. 2015)")
                )
            if spec.forget_bias != "chrono":
                candidates.append(("lstm_chrono", "Use chrono init (forget_bias=chrono; Tallec & Ollivier 2018)"))
        for remedy, text in candidates:
            span = time_remedy_span(
                spec.arch,
                remedy,
                width=spec.width,
                depth=spec.depth,
                input_features=SEQUENCE_FEATURES,
                q_input=q_input,
                length=steps,
                activation=spec.activation,
                seed=spec.seed,
            )
            if span is not None and abs(span) < SPAN_DECADES:
                advice.append(f"{text}: predicted {span:+.2f} decades across the {steps} time steps.")
        return advice

    def gate_saturation(self) -> None:
        """The gates' saturation (σ′ under 5 % of its maximum) and the mean of the gate that keeps the past."""
        times = self.times
        rows = [r for per_layer in times.by_step.values() for rs in per_layer.values() for r in rs]
        gates = [r for r in rows if r.gate_mean is not None]
        if not gates:
            return
        saturated = [r.saturation_frac for r in gates if r.saturation_frac is not None]
        worst = max(saturated, default=0.0)
        first, last = times.steps[0], times.steps[-1]
        gate = "forget gate f" if self.spec.arch == "lstm" else "update gate z"

        def mean(step: int) -> float | None:
            values = [v for v in times.series(step, "gate_mean") if v is not None]
            return statistics.fmean(values) if values else None

        mean_init, mean_last = mean(first), mean(last)
        outside = [
            m for m in (mean_init, mean_last) if m is not None and not GATE_SATURATED_LOW <= m <= 1 - GATE_SATURATED_LOW
        ]
        if worst < SATURATION_INFO and not outside:
            return
        warning = worst >= SATURATION_WARNING or bool(outside)
        message = (
            f"Up to {worst:.0%} of a recurrent layer's sigmoid gates are saturated at a time step (σ′ below 5 % of "
            f"its maximum, a gate outside [{GATE_SATURATED_LOW:.3f}, {1 - GATE_SATURATED_LOW:.3f}]); the top layer's "
            f"mean {gate} is {_fmt(mean_init, '.3f')} at init and {_fmt(mean_last, '.3f')} at the last record."
        )
        if outside:
            message += (
                f" The mean {gate} itself is saturated: its weights get almost no gradient, and the path it gates is "
                + ("held open." if outside[0] > 0.5 else "cut.")
            )
        self.add(
            "gate_saturation",
            "warning" if warning else "info",
            None,
            message,
            {
                "gate_saturation_frac_max": worst,
                "gate_mean_init": mean_init,
                "gate_mean_last": mean_last,
                "saturated_below": GATE_SATURATED_LOW,
            },
            sorted({r.layer for r in gates if r.saturation_frac is not None and r.saturation_frac >= SATURATION_INFO}),
            ["Shrink the initial weights (init_gain) so the gates' pre-activations stay within about ±4.4."]
            if warning
            else [],
        )

    def recurrent_spectrum(self) -> None:
        """ρ(W_hh) and its largest singular value at init, and what they predict beside the measured rate."""
        time = self.theory.time if self.theory is not None else None
        if time is None or not time.spectra:
            return
        e = self.evidence
        numbers: dict[str, float | int | str | None] = {}
        for s in time.spectra:
            numbers[f"rho_{s.layer}_{s.gate}"] = s.spectral_radius
            numbers[f"smax_{s.layer}_{s.gate}"] = s.largest_singular_value
        layers = sorted({s.layer for s in time.spectra})
        measured = e.time_decades_per_step
        steps = len(self.times.series(self.times.steps[0], "grad_norm")) if self.times.steps else 0
        if self.spec.arch == "rnn" and time.spectral_radius is not None:
            rho, bound = time.spectral_radius, time.bound_decades_per_step
            rate = time.spectral_decades_per_step
            numbers |= {"spectral_decades_per_step": rate, "bound_decades_per_step": bound, "measured": measured}
            message = (
                f"At init the top layer's W_hh has spectral radius ρ = {rho:.3g} (largest singular value "
                f"{10 ** (bound or 0):.3g}): linearised at φ′ = 1 it predicts {_fmt(rate, '+.3f')} decades per step "
                f"({'growth' if rho > 1 else 'decay'} toward t = 0; Pascanu et al. 2013)"
            )
            message += f"; measured {_fmt(measured, '+.3f')}." if measured is not None else "."
            allowed = time.tolerance
            if measured is not None and rate is not None and allowed is not None and measured < rate - allowed:
                # |φ′| ≤ 1 for tanh and relu, so the activation can only take the rate below log10 ρ; "below" by
                # more than the theory's agreement tolerance.
                message += (
                    f" The {rate - measured:.3f} decades per step below it are the activation's: φ′ < 1 on average "
                    "(E[φ′²] in the q-map of theory.time)."
                )
            guaranteed = bound is not None and bound < 0 and bound * (steps - 1) <= -SPAN_DECADES
            if bound is not None and bound < 0:
                message += (
                    f" Since |φ′| ≤ 1, the largest singular value bounds the rate: at most {bound:+.3f} per step, "
                    f"{bound * max(steps - 1, 0):+.2f} decades across the {steps} steps"
                    + (", so the gradient vanishes through time whatever the data." if guaranteed else ".")
                )
            self.add("recurrent_spectrum", "warning" if guaranteed else "info", "init", message, numbers, layers)
            return
        blocks = ", ".join(f"{s.gate} {s.spectral_radius:.3g}" for s in time.spectra if s.layer == time.layer)
        self.add(
            "recurrent_spectrum",
            "info",
            "init",
            f"At init the top layer's recurrent blocks have spectral radii {blocks}. They feed sigmoid gates "
            "(derivative at most 1/4) and the candidate, so they do not set the rate alone: the "
            f"{'cell' if self.spec.arch == 'lstm' else 'state'} path is gated by the "
            f"{'forget gate' if self.spec.arch == 'lstm' else 'update gate'} (theory.time).",
            numbers,
            layers,
        )

    # --- advice that follows from the evidence -------------------------------------------------

    def _remedy(self, remedy: str) -> float | None:
        """Predicted span across this interior under a remedy (theory.remedy_span), None if not derived."""
        n = self.evidence.interior_layers
        sigma_w2 = self.theory.sigma_w2 if self.theory is not None and self.theory.sigma_w2 else 1.0
        q = self.theory.q_input if self.theory is not None and self.theory.q_input else 1.0
        return remedy_span(self.spec.activation, remedy, n, sigma_w2=sigma_w2, q_input=q)  # type: ignore[arg-type]

    def _profile_advice(self, kind: Label) -> list[str]:
        """Remedies whose predicted span across this network's interior is within ±SPAN_DECADES."""
        spec = self.spec
        advice: list[str] = []
        theory = self.theory
        if kind == "vanishing" and spec.activation in ("sigmoid", "tanh", "softsign"):
            saturated = (self.evidence.saturation_frac_max or 0) >= SATURATION_INFO
            bound = "at most 1/4" if spec.activation == "sigmoid" else "below 1 away from 0"
            advice.append(
                f"Switch {spec.activation} to a ReLU-family activation with Kaiming init: "
                + (
                    f"up to {self.evidence.saturation_frac_max:.0%} of the units are saturated, where the derivative "
                    "is near zero."
                    if saturated
                    else f"{spec.activation}'s derivative is {bound}, so each layer shrinks the gradient even though "
                    "few units are saturated."
                )
            )
        if self.transformer:
            return self._transformer_profile_advice(kind)
        if self.recurrent:
            return [
                "Stack fewer recurrent layers (depth): graddiag derives no remedy's effect across stacked recurrent "
                "layers, so probe again after the change."
            ]
        if not isinstance(spec, Spec):
            return [*advice, UNPREDICTED_REMEDIES[kind]]
        candidates: list[tuple[str, str]] = []
        if spec.norm == "none" and not spec.residual:
            if not spec.init.startswith("kaiming") or spec.init_gain != 1.0 or spec.bias_init != "zeros":
                candidates.append(
                    ("kaiming", "Use Kaiming init with zero biases (init=kaiming_normal, bias_init=zeros)")
                )
            if spec.init not in ("orthogonal", "xavier_normal", "xavier_uniform") or spec.init_gain != 1.0:
                text = "Use orthogonal init with zero biases, σ_w² = 1 (init=orthogonal, bias_init=zeros)"
                candidates.append(("unit_variance", text))
            candidates.append(("layer_norm", "Add layer normalisation (norm=layer)"))
        if spec.norm == "batch":
            candidates.append(("layer_norm", "Replace batch norm by layer norm (norm=layer)"))
        if spec.norm == "none" and not spec.residual:
            candidates.append(("batch_norm", "Add batch normalisation (norm=batch)"))
            candidates.append(("residual", "Add residual connections (residual=true)"))
        for remedy, text in candidates:
            span = self._remedy(remedy)
            if span is not None and abs(span) < SPAN_DECADES:
                advice.append(
                    f"{text}: predicted {span:+.2f} decades across these "
                    f"{self.evidence.interior_layers} interior layers."
                )
        if kind == "exploding" and spec.norm == "batch" and theory is not None and theory.model == "batch_norm":
            advice.append(
                "Batch norm itself makes the gradient grow with depth (Yang et al. 2019); fewer layers or residual "
                "connections keep it in range."
            )
        return advice

    def init_scale(self, label: Label) -> None:
        """How far the measured σ_w² sits from the Kaiming scale, when that explains the label (plain nets)."""
        theory = self.theory
        if theory is None or not theory.applicable or theory.model != "plain" or not theory.sigma_w2:
            return
        kaiming = kaiming_sigma_w2(self.spec.activation)
        factor = math.sqrt(theory.sigma_w2 / kaiming)
        if not ((label == "vanishing" and factor < 0.5) or (label == "exploding" and factor > 2.0)):
            return
        where = "below" if factor < 1 else "above"
        self.add(
            "init_scale",
            "warning",
            "init",
            f"The interior weights' scale σ_w = {math.sqrt(theory.sigma_w2):.3g} is {max(factor, 1 / factor):.3g}× "
            f"{where} the Kaiming scale {math.sqrt(kaiming):.3g} for {self.spec.activation}, in line with the "
            f"{label} profile (mean χ₁ = {theory.chi1 or 0:.3g}).",
            {"sigma_w2": theory.sigma_w2, "kaiming_sigma_w2": kaiming, "factor": factor, "chi1": theory.chi1},
            advice=[
                f"Scale the initial weights by about {1 / factor:.3g} (init=kaiming_normal, or init_gain/init_std)."
            ],
        )

    def _scale_advice(self, kind: Label) -> list[str]:
        if kind == "vanishing":
            if self.transformer:
                return ["Raise the learning rate or the initial weights (init_gain)."]
            return ["Raise the initial weights toward the Kaiming scale (init=kaiming_normal) or the learning rate."]
        advice = []
        if self.spec.norm == "batch":
            advice.append("Batch norm scales the gradient up layer by layer: fewer layers, or layer norm instead.")
        if self.spec.clip_value is None:
            advice.append("Clip the gradient norm (clip_value=1.0) so one step cannot move a layer by its own norm.")
        advice.append("Shrink the initial weights (init_gain) if the forward signal grows too.")
        return advice

    def _instability_advice(self) -> list[str]:
        advice = []
        if self.spec.clip_value is None:
            advice.append("Clip the gradient norm (clip_value=1.0, clip_mode=norm).")
        advice.append(f"Lower the learning rate about tenfold (lr={self.spec.lr / 10:g}).")
        return advice

    def add(
        self,
        kind: str,
        severity: str,
        phase: str | None,
        message: str,
        evidence: Mapping[str, float | int | str | None],
        layers: Sequence[int] = (),
        advice: Sequence[str] = (),
    ) -> None:
        """Record a finding (non-finite numbers in its evidence become None)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in evidence.items()}
        self.findings.append(
            Finding.model_validate(
                {
                    "kind": kind,
                    "severity": severity,
                    "phase": phase,
                    "message": message,
                    "evidence": clean,
                    "layers": list(layers),
                    "advice": list(advice),
                }
            )
        )


def decide(
    spec: Setup,
    evidence: Evidence,
    theory: Theory | None,
    *,
    layers: Sequence[LayerInfo] = (),
    records: Sequence[LayerRecord] = (),
    time_records: Sequence[TimeRecord] = (),
) -> Verdict:
    """Label the evidence and list the findings.

    Label: exploding on any non-finite value; otherwise the more severe of the label at initialisation
    and the label over training (exploding > vanishing > healthy). `layers` and `records` name the
    layers in per-layer findings; without them those findings are left out.
    """
    judge = _Judge(spec, evidence, theory, layers, records, time_records)
    evidence.noise_decades = judge.noise()
    nonfinite = judge.nonfinite()
    at_init = judge.label_at_init()
    trained = judge.label_trained()
    # A recurrent net's label answers the same question through time: each phase takes the more severe.
    at_init = max((at_init, judge.through_time("At initialisation")), key=_SEVERITY.__getitem__)
    if evidence.time_span_decades_trained is not None:
        combined: Label = max((trained or "healthy", judge.through_time("During training")), key=_SEVERITY.__getitem__)
        trained = combined
    label: Label = "exploding" if nonfinite else max((at_init, trained or "healthy"), key=_SEVERITY.__getitem__)
    judge.init_scale(label)
    judge.forward_signal()
    judge.step_size()
    judge.adam()
    judge.units()
    judge.penalties()
    judge.structure()
    judge.layer_norm_position()
    judge.gate_saturation()
    judge.recurrent_spectrum()

    reasons = [f.message for f in judge.findings if f.severity == "critical" and f.kind in _LABEL_KINDS]
    if label == "healthy":
        reasons.append(
            "The gradient profiles stay within the thresholds: at initialisation ‖∂L/∂W‖ changes by "
            f"{_fmt(evidence.span_decades, '+.2f')} and ‖∂L/∂h‖ by {_fmt(evidence.act_span_decades, '+.2f')} decades "
            f"across {evidence.interior_layers} {judge.unit} (threshold ±"
            f"{SPAN_DECADES + (evidence.noise_decades or 0.0):.1f})."
        )
    if label == "healthy" and evidence.time_span_decades is not None:
        reasons.append(
            f"Through time, the top recurrent layer's ‖∂L/∂h_t‖ changes by {evidence.time_span_decades:+.2f} decades "
            f"across the sequence at init ({_fmt(evidence.time_decades_per_step, '+.3f')} per step; threshold "
            f"±{SPAN_DECADES:g})."
        )
    if theory is not None and theory.applicable:
        reasons.append(theory.reason)
    if theory is not None and theory.time is not None:
        reasons.append(theory.time.reason)
    advice: list[str] = []
    for finding in judge.findings:
        for item in finding.advice:
            text = f"{item} [{finding.kind}]"
            if text not in advice:
                advice.append(text)
    return Verdict(
        label=label,
        at_init=at_init,
        trained=trained,
        evidence=evidence,
        reasons=reasons,
        advice=advice,
        theory=theory or Theory(applicable=False, reason="Theory is computed when the probe finishes."),
        findings=judge.findings,
    )


# The finding kinds that decide the label.
_LABEL_KINDS = frozenset({"gradient_profile", "gradient_scale", "nonfinite", "gradient_through_time"})
