"""The labelled case table (tests/test_verdict_cases.py on synthetic data, bench/theory.py on CIFAR-10).

Every activation, init, norm, residual, optimizer, clipping and L1, MLP and CNN.

Each case carries its expected label and, beside it, where that label comes from:

- ``formula``: a closed form from the literature, written out here (not graddiag's theory code):
  ½·log10 χ₁ decades per layer, with χ₁ = σ_w²·E[φ′²] for homogeneous φ (Poole et al. 2016;
  He et al. 2015), σ_w²·φ′(0)² in the small-q limit (sigmoid, orthogonal tanh), π/(π − 1) and 1 for
  batch norm with relu and identity (Yang et al. 2019), 1 for layer norm with relu, 1 + σ_w²·E[φ′²] per
  residual block of an odd φ (Yang & Schoenholz 2017). The expected span is the rate times the
  interior layers − 1.
- ``independent``: the profile measured here with plain PyTorch on the same network and batch —
  ``torch.autograd.grad`` of the loss with respect to every weight layer's output — and a numpy fit,
  sharing nothing with graddiag's recorder or verdict.

The expected label follows the product's definition on that span (≥ 2 decades: vanishing/exploding),
and every case sits clear of the line (|span| ≤ 1.5 or ≥ 2.5, or is named as a borderline case in the
issue), so finite-width noise cannot flip it. graddiag's label must equal it, and graddiag's measured
span must match the source's (formula: within 0.05 decades per layer; independent: to 1e-3).
Synthetic data, width 64 (16 channels), two steps: the whole table runs in well under a minute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from graddiag.models.networks import build_network
from graddiag.models.spec import Spec
from graddiag.service.engine.data import ImageSet, make_source
from graddiag.service.engine.verdict import REL_GRAD_CEILING, REL_GRAD_FLOOR

WIDTH = 64
# E[φ′(z)²] for z ~ N(0, q) of the homogeneous activations (independent of q).
LEAKY = 0.01


def _sigma_w2(spec: Spec) -> float:
    """σ_w² = fan_in·E[W²] of the spec's init, from the init's own definition (zero biases assumed)."""
    slope2 = {"relu": 2 / (1 + 0), "leaky_relu": 2 / (1 + LEAKY**2), "identity": 1.0}
    match spec.init:
        case "kaiming_normal" | "kaiming_uniform":
            return slope2[spec.activation] * spec.init_gain**2
        case "orthogonal":
            return spec.init_gain**2
        case "normal":
            assert spec.init_std is not None
            return spec.width * (spec.init_std * spec.init_gain) ** 2
        case "default":
            return spec.init_gain**2 / 3  # U(±1/√fan_in)
    raise AssertionError(spec.init)


def _homogeneous_rate(spec: Spec) -> float:
    """½·log10(σ_w²·E[φ′²]) for relu, leaky relu and identity: exact at any q (He et al. 2015)."""
    mean_slope2 = {"relu": 0.5, "leaky_relu": (1 + LEAKY**2) / 2, "identity": 1.0}[spec.activation]
    return 0.5 * math.log10(_sigma_w2(spec) * mean_slope2)


def _small_q_rate(spec: Spec) -> float:
    """½·log10(σ_w²·φ′(0)²): the ordered phase, where q_l → 0 (sigmoid: φ′(0) = 1/4; tanh: 1)."""
    slope0 = {"sigmoid": 0.25, "tanh": 1.0}[spec.activation]
    return 0.5 * math.log10(_sigma_w2(spec) * slope0**2)


def _batch_norm_rate(spec: Spec) -> float:
    """Yang et al. 2019: E[φ′(z)²]/Var[φ(z)] per layer — π/(π − 1) for relu, 1 for identity."""
    return 0.5 * math.log10({"relu": math.pi / (math.pi - 1), "identity": 1.0}[spec.activation])


def _layer_norm_relu_rate(_spec: Spec) -> float:
    """Layer norm with relu: E[φ′²]/E[φ²] = (1/2)/(1/2) = 1."""
    return 0.0


def _residual_identity_rate(spec: Spec) -> float:
    """A residual linear block multiplies ‖∂L/∂x‖² by 1 + σ_w² (Yang & Schoenholz 2017)."""
    return 0.5 * math.log10(1 + _sigma_w2(spec))


@dataclass(frozen=True)
class Case:
    """One row of the table: the spec, its expected label and where that label comes from."""

    name: str
    fields: dict[str, Any]
    expected: str
    source: str  # "formula" or "independent"
    rate: Any = None  # the formula, for formula rows
    finding: str | None = None  # a finding kind the verdict must also list
    borderline: bool = field(default=False)  # named in the issue; may sit nearer the 2-decade line

    def spec(self, dataset: str = "synthetic") -> Spec:
        base: dict[str, Any] = dict(
            dataset=dataset, width=WIDTH, batch_size=64, steps=2, record_every=1, lr=1e-4, bias_init="zeros"
        )
        base.update(self.fields)
        if base.get("arch") == "cnn":
            base.setdefault("width", 16)
            base["width"] = min(base["width"], 16)
        return Spec.model_validate(base)


CASES = [
    # --- MLP, every activation and init ---------------------------------------------------------
    Case(
        "sigmoid default",
        dict(activation="sigmoid", depth=10, bias_init="default"),
        "vanishing",
        "formula",
        _small_q_rate,
    ),
    Case("sigmoid xavier", dict(activation="sigmoid", depth=10, init="xavier_normal"), "vanishing", "independent"),
    Case("sigmoid kaiming", dict(activation="sigmoid", depth=10, init="kaiming_normal"), "vanishing", "independent"),
    Case("tanh default", dict(activation="tanh", depth=20, bias_init="default"), "vanishing", "independent"),
    Case("tanh xavier", dict(activation="tanh", depth=20, init="xavier_normal"), "healthy", "independent"),
    Case("tanh kaiming", dict(activation="tanh", depth=20, init="kaiming_normal"), "healthy", "independent"),
    Case(
        "tanh orthogonal 0.9 (ordered phase)",
        dict(activation="tanh", depth=60, init="orthogonal", init_gain=0.9),
        "vanishing",
        "formula",
        _small_q_rate,
        borderline=True,
    ),
    Case(
        "tanh orthogonal 1.0", dict(activation="tanh", depth=60, init="orthogonal"), "healthy", "formula", _small_q_rate
    ),
    Case("softsign default", dict(activation="softsign", depth=20, bias_init="default"), "vanishing", "independent"),
    Case("softsign xavier", dict(activation="softsign", depth=20, init="xavier_uniform"), "healthy", "independent"),
    Case(
        "relu default",
        dict(activation="relu", depth=12, bias_init="default"),
        "vanishing",
        "formula",
        _homogeneous_rate,
    ),
    Case(
        "relu kaiming normal",
        dict(activation="relu", depth=20, init="kaiming_normal"),
        "healthy",
        "formula",
        _homogeneous_rate,
    ),
    Case(
        "relu kaiming uniform",
        dict(activation="relu", depth=20, init="kaiming_uniform"),
        "healthy",
        "formula",
        _homogeneous_rate,
    ),
    Case("relu xavier", dict(activation="relu", depth=30, init="xavier_normal"), "vanishing", "independent"),
    Case(
        "relu normal 1e-3 under adam",
        dict(activation="relu", depth=10, init="normal", init_std=1e-3, optimizer="adam", lr=3e-3, bias_init="default"),
        "vanishing",
        "independent",
        finding="step_size",
    ),
    Case(
        "relu normal 0.5",
        dict(activation="relu", depth=10, init="normal", init_std=0.5),
        "exploding",
        "formula",
        _homogeneous_rate,
    ),
    Case("leaky_relu default", dict(activation="leaky_relu", depth=12), "vanishing", "formula", _homogeneous_rate),
    Case(
        "leaky_relu kaiming",
        dict(activation="leaky_relu", depth=20, init="kaiming_normal"),
        "healthy",
        "formula",
        _homogeneous_rate,
    ),
    Case("elu default", dict(activation="elu", depth=20, bias_init="default"), "vanishing", "independent"),
    Case("elu kaiming", dict(activation="elu", depth=20, init="kaiming_normal"), "healthy", "independent"),
    Case("selu xavier", dict(activation="selu", depth=20, init="xavier_normal"), "healthy", "independent"),
    Case("selu orthogonal", dict(activation="selu", depth=20, init="orthogonal"), "healthy", "independent"),
    Case("gelu default", dict(activation="gelu", depth=12, bias_init="default"), "vanishing", "independent"),
    Case("gelu kaiming", dict(activation="gelu", depth=20, init="kaiming_normal"), "healthy", "independent"),
    Case("silu default", dict(activation="silu", depth=12, bias_init="default"), "vanishing", "independent"),
    Case("silu xavier", dict(activation="silu", depth=16, init="xavier_normal"), "vanishing", "independent"),
    Case("identity default", dict(activation="identity", depth=20), "vanishing", "formula", _homogeneous_rate),
    Case(
        "identity orthogonal",
        dict(activation="identity", depth=30, init="orthogonal"),
        "healthy",
        "formula",
        _homogeneous_rate,
    ),
    # --- normalisation ----------------------------------------------------------------------------
    Case(
        "batch norm relu depth 50",
        dict(activation="relu", depth=50, norm="batch", init="kaiming_normal"),
        "exploding",
        "formula",
        _batch_norm_rate,
        finding="structural_zero_bias",
    ),
    Case(
        "batch norm relu depth 10",
        dict(activation="relu", depth=10, norm="batch"),
        "healthy",
        "formula",
        _batch_norm_rate,
    ),
    Case(
        "batch norm identity",
        dict(activation="identity", depth=30, norm="batch"),
        "healthy",
        "formula",
        _batch_norm_rate,
    ),
    Case("batch norm sigmoid", dict(activation="sigmoid", depth=20, norm="batch"), "healthy", "independent"),
    Case(
        "layer norm relu", dict(activation="relu", depth=30, norm="layer"), "healthy", "formula", _layer_norm_relu_rate
    ),
    Case("layer norm sigmoid", dict(activation="sigmoid", depth=12, norm="layer"), "vanishing", "independent"),
    Case("layer norm tanh", dict(activation="tanh", depth=20, norm="layer"), "healthy", "independent"),
    # --- residual ---------------------------------------------------------------------------------
    Case(
        "residual relu default",
        dict(activation="relu", depth=50, residual=True, optimizer="adam", bias_init="default"),
        "exploding",
        "independent",
        finding="forward_signal",
    ),
    Case("residual tanh", dict(activation="tanh", depth=20, residual=True), "healthy", "independent"),
    Case(
        "residual identity default",
        dict(activation="identity", depth=20, residual=True),
        "healthy",
        "formula",
        _residual_identity_rate,
    ),
    Case(
        "residual identity orthogonal",
        dict(activation="identity", depth=30, residual=True, init="orthogonal"),
        "exploding",
        "formula",
        _residual_identity_rate,
    ),
    # --- CNN --------------------------------------------------------------------------------------
    Case(
        "cnn sigmoid",
        dict(arch="cnn", activation="sigmoid", depth=9, bias_init="default"),
        "vanishing",
        "formula",
        _small_q_rate,
    ),
    Case("cnn tanh", dict(arch="cnn", activation="tanh", depth=12, bias_init="default"), "vanishing", "independent"),
    Case("cnn relu default", dict(arch="cnn", activation="relu", depth=12), "vanishing", "formula", _homogeneous_rate),
    Case(
        "cnn relu kaiming",
        dict(arch="cnn", activation="relu", depth=9, init="kaiming_normal"),
        "healthy",
        "formula",
        _homogeneous_rate,
    ),
    Case(
        "cnn batch norm relu",
        dict(arch="cnn", activation="relu", depth=9, norm="batch"),
        "healthy",
        "formula",
        _batch_norm_rate,
    ),
    Case("cnn layer norm tanh", dict(arch="cnn", activation="tanh", depth=9, norm="layer"), "healthy", "independent"),
    # The profile is flat (+0.7 decades), but the gradient is ~20x the weights in scale: the ceiling.
    Case(
        "cnn residual relu kaiming",
        dict(arch="cnn", activation="relu", depth=9, residual=True, init="kaiming_normal"),
        "exploding",
        "independent",
        finding="forward_signal",
    ),
    Case(
        "cnn residual tanh xavier",
        dict(arch="cnn", activation="tanh", depth=9, residual=True, init="xavier_normal"),
        "healthy",
        "independent",
    ),
    # --- optimizers, clipping, penalties ----------------------------------------------------------
    Case(
        "sigmoid clipped by norm",
        dict(activation="sigmoid", depth=10, clip_value=1.0),
        "vanishing",
        "formula",
        _small_q_rate,
    ),
    Case(
        "relu kaiming clipped by value",
        dict(activation="relu", depth=20, init="kaiming_normal", clip_value=0.01, clip_mode="value"),
        "healthy",
        "formula",
        _homogeneous_rate,
    ),
    Case(
        "relu kaiming momentum",
        dict(activation="relu", depth=20, init="kaiming_normal", optimizer="momentum", lr=1e-3),
        "healthy",
        "formula",
        _homogeneous_rate,
    ),
    Case(
        "tanh default adamw",
        dict(activation="tanh", depth=20, optimizer="adamw", lr=1e-3, bias_init="default"),
        "vanishing",
        "independent",
        finding="adam_equalised",
    ),
    Case(
        "relu default with L1",
        dict(activation="relu", depth=12, l1=1e-3, lr=0.01),
        "vanishing",
        "formula",
        _homogeneous_rate,
    ),
    Case(
        "relu kaiming with weight decay",
        dict(activation="relu", depth=20, init="kaiming_normal", weight_decay=0.1, lr=0.01),
        "healthy",
        "formula",
        _homogeneous_rate,
    ),
]


@dataclass(frozen=True)
class Independent:
    """Step 0 measured with plain autograd: the ‖∂L/∂h‖ span and the interior ‖∂L/∂W‖/‖W‖ scale."""

    span: float
    points: int
    rel_max: float
    rel_median: float


def independent(spec: Spec, data: tuple[ImageSet, ImageSet] | None = None) -> Independent:
    """The fitted span of log10 ‖∂L/∂h‖ over the interior weight layers, by plain autograd, at step 0."""
    model = build_network(spec)
    model.train()
    inputs, labels = make_source(spec, data=data, device=torch.device("cpu"), eval_samples=8).batch(0)
    outputs: list[torch.Tensor] = []
    weight_layers = [layer for layer in model.layers if layer.kind != "norm"]
    handles = [layer.module.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for layer in weight_layers]
    loss = F.cross_entropy(model(inputs), labels)
    for handle in handles:
        handle.remove()
    weights = [layer.weight for layer in weight_layers]
    grads = torch.autograd.grad(loss, [*outputs, *weights])
    act_grads, weight_grads = grads[: len(outputs)], grads[len(outputs) :]
    logs = np.log10([max(float(g.double().norm()), 1e-300) for g in act_grads])[1:-1]
    x = np.arange(len(logs))
    slope_toward_output = np.polyfit(x, logs, 1)[0]
    rel = [float(g.double().norm() / w.detach().double().norm()) for g, w in zip(weight_grads, weights, strict=True)]
    rel = rel[1:-1]
    return Independent(-float(slope_toward_output) * (len(logs) - 1), len(logs), max(rel), float(np.median(rel)))


def expected_label(span: float, measured: Independent) -> str:
    """The product's definition on the span, then the scale rules (ceiling over all, floor when flat)."""
    label = "healthy" if abs(span) < 2 else ("vanishing" if span < 0 else "exploding")
    if measured.rel_max > REL_GRAD_CEILING:
        return "exploding"
    if label == "healthy" and measured.rel_median < REL_GRAD_FLOOR:
        return "vanishing"
    return label


def source_span(case: Case, spec: Spec, interior: int, measured: Independent) -> float:
    """The span the case's source gives: its formula's rate × (interior − 1), or the independent measurement."""
    return case.rate(spec) * (interior - 1) if case.source == "formula" else measured.span
