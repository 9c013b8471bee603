"""The report: the one shape that flows from the engine to the CLI, the database and the API.

`graddiag probe --json` prints it, the store keeps it in tidy tables, `GET /v1/runs/{id}` serves it.
Non-finite floats serialise as JSON null (pydantic's default), so a report of an exploded run is
still valid JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    "layer_norm_position",
    "gradient_through_time",
    "gate_saturation",
    "recurrent_spectrum",
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


class TimeRecord(_Row):
    """One recurrent layer at one time step of one recorded step: the gradient through time.

    `layer` is the LayerInfo index of the layer's recurrent matrix (kind "recurrent"), `t` the time step
    (0 = the first row of the image). Norms are Frobenius norms over the batch and the hidden units of the
    total derivative, every path included (the layer above at t, the recurrence to t + 1).
    """

    step: int
    layer: int
    t: int
    grad_norm: float | None = Field(description="‖∂L/∂h_t‖: the loss's gradient at the hidden state h_t.")
    cell_grad_norm: float | None = Field(None, description="‖∂L/∂c_t‖ at the LSTM's cell state; null for rnn, gru.")
    state_rms: float | None = Field(None, description="RMS of h_t in the forward pass.")
    gate_mean: float | None = Field(
        None,
        description="Mean of the gate that keeps the past: LSTM forget gate f_t, GRU update gate z_t; null for rnn.",
    )
    saturation_frac: float | None = Field(
        None,
        description="Fraction of saturated units (local derivative under 5 % of its maximum): the sigmoid gates "
        "(lstm, gru), tanh's h_t (rnn tanh); null for rnn relu.",
    )


class RecurrentSpectrum(_Row):
    """One gate block of a recurrent layer's W_hh at init (rnn: the whole matrix, gate "h")."""

    layer: int = Field(description="LayerInfo index of the recurrent matrix.")
    gate: str = Field(description="h (rnn); i, f, g, o (lstm); r, z, n (gru): PyTorch's gate order.")
    spectral_radius: float = Field(description="ρ, the largest eigenvalue modulus.")
    largest_singular_value: float


class TimeTheory(_Row):
    """Mean-field prediction of the gradient through time of a recurrent net's top layer at initialisation.

    rnn: ‖∂L/∂h_t‖ from the q-map through time (`chi` = geometric mean of σ_hh²·E[φ′²](q_t)); lstm: the cell
    path's ‖∂L/∂c_t‖ from the forget gates (`chi` = mean E[f²], `gate_mean` = E[f]); gru: the update-gate
    path's ‖∂L/∂h_t‖ (E[z²], E[z]). Rates in decades per time step toward t = 0 (docs/verdict.md).
    """

    applicable: bool
    reason: str
    model: str | None = Field(None, description="rnn, lstm_cell or gru_update.")
    layer: int | None = Field(None, description="LayerInfo index of the judged recurrent matrix (the top layer's).")
    q_input: float | None = None
    q_star: float | None = Field(None, description="rnn: the top layer's pre-activation variance at the last step.")
    chi: float | None = Field(None, description="The per-step factor on the squared norm along the judged path.")
    gate_mean: float | None = Field(None, description="Predicted mean of the gate that keeps the past (lstm f, gru z).")
    predicted_decades_per_step: float | None = None
    measured_decades_per_step: float | None = None
    tolerance: float | None = Field(None, description="Agreement tolerance, decades per step.")
    agrees: bool | None = None
    spectral_radius: float | None = Field(None, description="rnn: ρ(W_hh) of the top layer.")
    spectral_decades_per_step: float | None = Field(None, description="rnn: log10 ρ, the linearised rate.")
    bound_decades_per_step: float | None = Field(
        None, description="rnn: log10 of W_hh's largest singular value, an upper bound on the rate (|φ′| ≤ 1)."
    )
    spectra: list[RecurrentSpectrum] = Field(default_factory=list, description="Every layer's W_hh gate blocks.")


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
    time: TimeTheory | None = Field(None, description="Recurrent nets: the prediction through time.")


class Evidence(_Row):
    """The numbers behind a verdict. Slopes are in decades per layer toward the input; a span is the
    fitted change across the interior layers (slope × (interior − 1)), in decades. For a transformer the
    profiles run across its blocks, one value per block (docs/verdict.md), and `interior_layers` counts
    blocks."""

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
    near_output_ratio: float | None = Field(
        None,
        description="transformer: the last block's ‖∂L/∂W‖ of mlp.fc2 at init over the geometric mean of every "
        "block's; above 1 the gradient is largest near the output (Xiong et al. 2020's post-LN).",
    )
    # Recurrent nets: the gradient through time of the top recurrent layer (docs/verdict.md), per time step
    # toward t = 0; a span is the fitted change across the sequence, slope × (steps − 1).
    time_layer: int | None = Field(None, description="LayerInfo index of the recurrent matrix judged through time.")
    time_decades_per_step: float | None = Field(None, description="‖∂L/∂h_t‖ at init, decades per step toward t = 0.")
    time_span_decades: float | None = None
    time_decades_per_step_trained: float | None = Field(None, description="The same at the last recorded step.")
    time_span_decades_trained: float | None = None
    cell_decades_per_step: float | None = Field(None, description="lstm: ‖∂L/∂c_t‖ at init, decades per step.")


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


class ModelDescription(_Row):
    """A model graddiag did not build (``graddiag.diagnose`` / ``graddiag.watch``), in place of a spec.

    It also answers what the verdict reads of a run besides its records (``verdict.Setup``): the
    optimizer, its learning rate and weight decay, the activation, the normalisation and the width that
    sizes the finite-width allowance; the spec-only choices (init, clipping, L1) read as unknown/none.
    """

    class_name: str = Field(max_length=200, description="The model's class, e.g. torchvision's ResNet.")
    params: int = Field(ge=0, description="Every parameter of the model, recorded or not.")
    optimizer: str = Field(
        max_length=100,
        description="sgd, momentum, adam or adamw where the optimizer is one of those, else its class name.",
    )
    lr: float = Field(ge=0, allow_inf_nan=False, description="The first parameter group's learning rate.")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    loss: str | None = Field(None, max_length=200, description="The loss function's name; None under watch.")
    activations: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="The activation modules' kinds called in the forward pass (relu, tanh, …), sorted.",
    )
    width: int | None = Field(
        None, ge=1, description="The interior weight layers' median fan-in: the n of the finite-width allowance."
    )
    norm: str = Field("none", max_length=16, description="batch, layer, group or none: the norm layers found.")
    branches: list[int] = Field(
        default_factory=list,
        max_length=100_000,
        description="Layers beside the main path (e.g. ResNet's downsample): recorded, out of the depth profile.",
    )
    unrecorded: list[str] = Field(
        default_factory=list,
        max_length=100_000,
        description="Parameters of no recorded layer (e.g. a class token); their gradients count in the totals.",
    )
    tied: dict[str, str] = Field(
        default_factory=dict, description="A module sharing a recorded layer's weight → that layer's name."
    )
    eager_statistics: bool = Field(
        True,
        description="False when module hooks could not run (a torch.compile'd model under watch): act_norm, "
        "act_grad_norm and saturation_frac are null, the parameter-gradient statistics are recorded.",
    )

    # The spec-only settings the verdict may read, as they stand for a model it did not build.
    @property
    def arch(self) -> str:
        """Not one of graddiag's own architectures: `width` is then the fan-in itself."""
        return "external"

    @property
    def activation(self) -> str:
        """The one activation kind found, else relu (the finite-width allowance then uses relu's moments)."""
        return self.activations[0] if len(self.activations) == 1 else "relu"

    @property
    def residual(self) -> bool:
        """Whether layers were found beside the main path (identity skips leave no trace in hooks)."""
        return bool(self.branches)

    @property
    def init(self) -> str:
        """Unknown: graddiag did not initialise this model."""
        return "unknown"

    @property
    def init_gain(self) -> float:
        """Unknown, read as 1."""
        return 1.0

    @property
    def bias_init(self) -> str:
        """Unknown: graddiag did not initialise this model."""
        return "unknown"

    @property
    def clip_value(self) -> float | None:
        """None: graddiag does not clip a user's gradients (watch measures after the user's own clipping)."""
        return None

    @property
    def l1(self) -> float:
        """0: an L1 penalty in the user's loss is part of the data loss graddiag sees."""
        return 0.0


class Report(_Row):
    """Everything one probe (or one diagnosis of a user's model) measured and concluded.

    A probe's report has its `spec` and no `model` key; a report of a model graddiag did not build has
    `spec` null and its `model` description.
    """

    spec: Spec | None = None
    model: ModelDescription | None = Field(None, exclude_if=lambda value: value is None)
    layers: list[LayerInfo]
    steps: list[StepMetrics]
    records: list[LayerRecord]
    time_records: list[TimeRecord] = Field(
        default_factory=list,
        description="The gradient through time of a recurrent net's layers at each recorded step; empty otherwise.",
    )
    verdict: Verdict
    eval: EvalResult
    timing: Timing

    @model_validator(mode="after")
    def _one_origin(self) -> Self:
        if (self.spec is None) == (self.model is None):
            raise ValueError("a report has either a spec (a probe) or a model description (diagnose/watch), not both")
        return self


@dataclass(frozen=True)
class TransformerBlock:
    """One transformer block's layers (LayerInfo indices), found by structure in the layer list."""

    name: str
    output: int
    fc2: int
    attention: tuple[int, ...]
    mlp: tuple[int, ...]
    norm: int | None

    @property
    def weights(self) -> tuple[int, ...]:
        """The block's weight layers: attention projections, then the MLP's."""
        return self.attention + self.mlp


def transformer_blocks(layers: Sequence[LayerInfo]) -> list[TransformerBlock]:
    """The blocks of graddiag's transformer in forward order; empty for every other network (the verdict's
    across-block profile and the text report's block table read them).

    A block is a top-level module of the network that holds attention layers (kind "attention", which
    only graddiag's transformer has: a user's nn.MultiheadAttention is discovered as linear layers).
    `models.networks.Block` registers its children in the order they run, so its last layer in forward
    order produces the block's output: mlp.fc2 for pre-LN (x + fc2(·): the sum passes ∂L/∂h unchanged to
    fc2's output) and norm2 for post-LN. `fc2` is its last linear layer, `norm` its last norm layer.
    """
    groups: dict[str, list[LayerInfo]] = {}
    for layer in layers:
        groups.setdefault(layer.name.split(".", 1)[0], []).append(layer)
    blocks = []
    for name, members in groups.items():
        attention = tuple(m.index for m in members if m.kind == "attention")
        mlp = tuple(m.index for m in members if m.kind == "linear")
        if not attention or not mlp:
            continue
        norms = [m.index for m in members if m.kind == "norm"]
        blocks.append(TransformerBlock(name, members[-1].index, mlp[-1], attention, mlp, norms[-1] if norms else None))
    return blocks
