"""The report: the one shape that flows from the engine to the CLI, the database and the API.

`graddiag probe --json` prints it, the store keeps it in tidy tables, `GET /v1/runs/{id}` serves it.
Non-finite floats serialise as JSON null (pydantic's default), so a report of an exploded run is
still valid JSON.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from graddiag.models.spec import Spec

Label = Literal["vanishing", "exploding", "healthy"]
LayerKind = Literal["linear", "conv", "norm"]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerInfo(_Row):
    """A parameterised layer, indexed in forward order."""

    index: int
    name: str
    kind: LayerKind
    params: int


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


class Theory(_Row):
    """Mean-field prediction for a plain MLP (Poole et al. 2016; Schoenholz et al. 2017)."""

    applicable: bool
    reason: str
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    q_star: float | None = None
    chi1: float | None = None
    predicted_decades_per_layer: float | None = None
    measured_decades_per_layer: float | None = None
    agrees: bool | None = None


class Evidence(_Row):
    """The numbers behind a verdict. Slopes are in decades per layer toward the input."""

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


class Verdict(_Row):
    """The label with the evidence, readable reasons, remedies and theory behind it."""

    label: Label
    at_init: Label
    trained: Label | None = None
    evidence: Evidence
    reasons: list[str]
    advice: list[str]
    theory: Theory


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
