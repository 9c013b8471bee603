"""The report: the one shape that flows from the engine to the CLI, the database and the API.

`graddiag probe --json` prints it, the store keeps it in tidy tables, `GET /v1/runs/{id}` serves it.
Non-finite floats serialise as JSON null (pydantic's default), so a report of an exploded run is
still valid JSON.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from graddiag.models.shapes import LayerKind
from graddiag.models.spec import Spec

Label = Literal["vanishing", "exploding", "healthy"]
FindingKind = Literal[
    "gradient_profile",
    "gradient_scale",
    "forward_signal",
    "step_size",
    "adam_equalised",
    "adam_epsilon",
    "nonfinite",
    "dead_units",
    "saturation",
    "init_scale",
    "structural_zero_bias",
    "norm_layers",
    "penalty_dominates",
]
Severity = Literal["info", "warning", "critical"]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerInfo(_Row):
    """A parameterised layer, indexed in forward order."""

    index: int
    name: str
    kind: LayerKind
    params: int
    structural_zero_bias: bool = Field(
        False,
        description="The bias gradient is zero by construction (a bias followed by batch norm, which "
        "subtracts the batch mean): recorded, never judged.",
    )


class StepMetrics(_Row):
    """Whole-model figures of one optimizer step (measured after backward)."""

    step: int
    loss: float | None
    accuracy: float | None
    grad_norm_total_pre: float | None = Field(description="Total L2 gradient norm before clipping.")
    grad_norm_total_post: float | None = Field(description="Total L2 gradient norm after clipping.")


class LayerRecord(_Row):
    """Per-layer statistics at one recorded step; `layer` is the LayerInfo index."""

    step: int
    layer: int
    grad_norm: float | None
    bias_grad_norm: float | None
    weight_norm: float | None
    rel_grad: float | None
    update_ratio: float | None
    act_grad_norm: float | None
    zero_grad_frac: float | None
    saturation_frac: float | None
    act_norm: float | None = Field(None, description="RMS of the layer's output in the forward pass.")
    penalty_grad_norm: float | None = Field(
        None,
        description="Norm of the penalty's gradient (L1, and weight decay where the optimizer adds it to the "
        "gradient) for the weight; grad_norm is of the data loss alone.",
    )


class Theory(_Row):
    """Mean-field prediction of the back-propagated signal's profile at initialisation.

    Covers plain, batch-normalised, layer-normalised and residual MLPs and plain CNNs (the diagonal
    q-map with fan-in = k²·C); docs/verdict.md derives each case. `chi1` is the geometric mean of the
    per-layer factors χ₁(q_l) along the real q_l trajectory, `q_star` the last interior layer's q.
    """

    applicable: bool
    reason: str
    model: str | None = Field(None, description="Which derivation applies: plain, batch_norm, layer_norm, residual.")
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_input: float | None = Field(None, description="Measured second moment of the network's input.")
    q_star: float | None = None
    chi1: float | None = None
    chi1_per_layer: list[float | None] | None = Field(
        None, description="The factor on ‖∂L/∂h‖² between consecutive interior layers, input side first."
    )
    q_per_layer: list[float | None] | None = Field(
        None, description="The pre-activation variance q_l of each interior layer (1 where a norm standardises)."
    )
    predicted_decades_per_layer: float | None = None
    measured_decades_per_layer: float | None = None
    tolerance: float | None = Field(None, description="Agreement tolerance, decades per layer.")
    agrees: bool | None = None


class Evidence(_Row):
    """The numbers behind a verdict. Slopes are in decades per layer toward the input; a span is the
    fitted change across the interior layers (slope × (interior − 1)), in decades."""

    decades_per_layer: float | None = None
    act_decades_per_layer: float | None = None
    interior_ratio: float | None = None
    act_interior_ratio: float | None = None
    rel_grad_median: float | None = None
    decades_per_layer_trained: float | None = None
    act_decades_per_layer_trained: float | None = None
    interior_ratio_trained: float | None = None
    rel_grad_median_trained: float | None = None
    max_update_ratio: float | None = None
    grad_norm_total_init: float | None = None
    grad_norm_total_max: float | None = None
    zero_grad_frac_max: float | None = None
    saturation_frac_mean: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    nonfinite_step: int | None = None
    nonfinite_layer: int | None = None
    interior_layers: int = 0
    span_decades: float | None = None
    act_span_decades: float | None = None
    span_decades_trained: float | None = None
    act_span_decades_trained: float | None = None
    noise_decades: float | None = Field(
        None, description="Finite-width allowance on a span (2σ of the log-norm random walk, Hanin 2018)."
    )
    rel_grad_max: float | None = None
    rel_grad_max_trained: float | None = None
    forward_decades_per_layer: float | None = None
    forward_span_decades: float | None = None
    output_rms_init: float | None = None
    update_ratio_init_decades_per_layer: float | None = None
    update_ratio_init_span_decades: float | None = None
    update_ratio_init_max: float | None = None
    grad_rms_min: float | None = Field(None, description="Smallest interior RMS gradient entry at init.")
    norm_decades_per_layer: float | None = None
    norm_span_decades: float | None = None
    saturation_frac_max: float | None = None
    penalty_grad_ratio_max: float | None = None


class Finding(_Row):
    """One observation the verdict rests on: what was seen, how bad, the numbers, and what to change."""

    kind: FindingKind
    severity: Severity
    phase: Literal["init", "training"] | None = None
    message: str
    evidence: dict[str, float | int | str | None] = Field(default_factory=dict)
    layers: list[int] = Field(default_factory=list, description="Layer indices the finding is about.")
    advice: list[str] = Field(default_factory=list)


class Verdict(_Row):
    """The label with the evidence, readable reasons, findings, remedies and theory behind it.

    `label` answers one question, do the gradients vanish or explode; everything else (the forward
    signal, the step size, dead units, …) is a finding of its own. Each advice item ends by naming the
    finding that triggered it.
    """

    label: Label
    at_init: Label
    trained: Label | None = None
    evidence: Evidence
    reasons: list[str]
    advice: list[str]
    theory: Theory
    findings: list[Finding] = Field(default_factory=list)


class EvalResult(_Row):
    """Held-out figures on a fixed sample of the test split, beside the training figures."""

    loss: float | None
    accuracy: float | None
    samples: int
    train_loss: float | None
    train_accuracy: float | None
    generalization_gap: float | None = Field(description="Held-out loss minus training loss.")


class Timing(_Row):
    """Where the wall-clock time went, in seconds."""

    device: str
    data_s: float
    train_s: float
    eval_s: float
    total_s: float
    step_ms: float
    steps_run: int


class Report(_Row):
    """Everything one probe measured and concluded."""

    spec: Spec
    layers: list[LayerInfo]
    steps: list[StepMetrics]
    records: list[LayerRecord]
    verdict: Verdict
    eval: EvalResult
    timing: Timing
