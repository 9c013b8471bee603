"""Mean-field theory: closed forms, quadrature accuracy, the variance map, and a real deep MLP."""

from __future__ import annotations

import itertools
import json
import math
from typing import get_args

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from torch import nn

from graddiag.models.init import LEAKY_RELU_SLOPE
from graddiag.models.networks import make_activation
from graddiag.models.spec import Activation, Spec
from graddiag.service.engine.theory import (
    activation_function,
    gaussian_expectations,
    gaussian_moments,
    kaiming_sigma_w2,
    mean_field,
    measured_variances,
    predicted_decades_per_layer,
    remedy_span,
    span_noise_decades,
    theory_for,
)

# torch.nn.SELU's constants (Klambauer et al. 2017).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

# PyTorch's default nn.Linear init draws W and b from U(±1/√fan_in): E[W²] = 1/(3·fan_in).
DEFAULT_SIGMA_W2 = 1 / 3
DEFAULT_SIGMA_B2_256 = 1 / (3 * 256)


def _derivative(activation: str, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(activation_function(activation)(x).sum(), x)
    return grad


@pytest.mark.parametrize("activation", sorted(get_args(Activation)))
def test_theory_integrates_the_networks_own_activation(activation: str):
    # One definition of each activation: the theory evaluates the very module the network builder makes.
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    module = make_activation(activation)
    assert torch.equal(activation_function(activation)(x), module(x))
    assert activation_function("leaky_relu")(torch.tensor([-1.0])).item() == pytest.approx(-LEAKY_RELU_SLOPE)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown activation"):
        activation_function("swish")


# --- closed forms ----------------------------------------------------------------------------


def test_relu_he_init_is_critical():
    q_star, chi1 = mean_field("relu", 2.0, 0.0)
    # E[relu(√q z)²] = q/2, so σ_w² = 2 maps q to itself and χ₁ = σ_w²/2 = 1.
    assert q_star == pytest.approx(1.0, rel=1e-12)
    assert chi1 == pytest.approx(1.0, rel=1e-12)
    assert predicted_decades_per_layer(chi1) == pytest.approx(0.0, abs=1e-12)


def test_relu_fixed_point_with_bias_is_analytic():
    # q = σ_w² q/2 + σ_b²  ⇒  q* = σ_b² / (1 − σ_w²/2) = 0.5 / 0.5.
    q_star, chi1 = mean_field("relu", 1.0, 0.5)
    assert q_star == pytest.approx(1.0, rel=1e-9)
    assert chi1 == pytest.approx(0.5, rel=1e-12)


def test_relu_without_fixed_point_dies_out_or_blows_up():
    q_star, chi1 = mean_field("relu", 1.0, 0.0)
    assert q_star == 0.0
    assert chi1 == pytest.approx(0.5, rel=1e-12)  # χ₁ of relu is σ_w²/2 whatever q is

    q_star, chi1 = mean_field("relu", 4.0, 0.0)
    assert math.isinf(q_star)
    assert chi1 == pytest.approx(2.0, rel=1e-12)

    # Bounded by depth: ten doublings from q0 = 1, not a divergence.
    q_star, _ = mean_field("relu", 4.0, 0.0, max_iter=10)
    assert q_star == pytest.approx(2.0**10, rel=1e-12)


def test_identity():
    q_star, chi1 = mean_field("identity", 1.0, 0.0, q0=3.0)
    assert q_star == pytest.approx(3.0, rel=1e-12)
    assert chi1 == pytest.approx(1.0, rel=1e-12)
    # q = σ_w² q + σ_b²  ⇒  q* = 0.5 / (1 − 0.5) = 1, χ₁ = σ_w².
    q_star, chi1 = mean_field("identity", 0.5, 0.5)
    assert q_star == pytest.approx(1.0, rel=1e-9)
    assert chi1 == pytest.approx(0.5, rel=1e-12)


def test_tanh_at_the_edge_of_chaos_approaches_zero_and_chi_one():
    # tanh²(x) ≈ x² − 2x⁴/3 ⇒ q_{l+1} ≈ q_l − 2q_l², so q_l ≈ 1/(2l): algebraic, not geometric.
    q_star, chi1 = mean_field("tanh", 1.0, 0.0)
    assert 0 < q_star < 1e-3
    assert chi1 == pytest.approx(1.0, abs=2e-3)
    assert chi1 < 1.0


def test_small_q_limits_are_sigma_w2_times_slope_at_zero_squared():
    tiny = 1e-12
    assert gaussian_moments("tanh", tiny)[1] == pytest.approx(1.0, rel=1e-9)
    assert gaussian_moments("sigmoid", tiny)[1] == pytest.approx(1 / 16, rel=1e-9)
    assert gaussian_moments("gelu", tiny)[1] == pytest.approx(1 / 4, rel=1e-5)
    assert gaussian_moments("silu", tiny)[1] == pytest.approx(1 / 4, rel=1e-5)
    # selu's slope jumps at 0 (λα on the left, λ on the right): each side holds half the mass.
    assert gaussian_moments("selu", tiny)[1] == pytest.approx(SELU_SCALE**2 * (1 + SELU_ALPHA**2) / 2, rel=1e-5)


def test_piecewise_linear_moments_are_exact_despite_the_kink():
    for q in (1e-6, 0.3, 1.0, 40.0, 1e12):
        second, slope2 = gaussian_moments("relu", q)
        assert second == pytest.approx(q / 2, rel=1e-13)
        assert slope2 == pytest.approx(0.5, rel=1e-13)
        second, slope2 = gaussian_moments("leaky_relu", q)
        assert second == pytest.approx(q * (1 + 0.01**2) / 2, rel=1e-13)
        assert slope2 == pytest.approx((1 + 0.01**2) / 2, rel=1e-13)


def test_selu_is_self_normalising():
    # SELU's constants are chosen so that E[selu(z)²] = 1 for z ~ N(0, 1): q* = 1 at σ_w² = 1.
    second, _ = gaussian_moments("selu", 1.0)
    assert second == pytest.approx(1.0, abs=1e-9)
    q_star, _ = mean_field("selu", 1.0, 0.0, q0=0.2)
    assert q_star == pytest.approx(1.0, abs=1e-8)


def test_sigmoid_with_pytorch_default_init():
    q_star, chi1 = mean_field("sigmoid", DEFAULT_SIGMA_W2, DEFAULT_SIGMA_B2_256)
    predicted = predicted_decades_per_layer(chi1)
    # Pinned figures: q* = 0.086361, χ₁ = 0.019996, ½·log10 χ₁ = −0.84953 decades per layer.
    assert q_star == pytest.approx(0.0863613, rel=1e-5)
    assert chi1 == pytest.approx(0.0199958, rel=1e-5)
    assert predicted == pytest.approx(-0.84953, abs=1e-4)
    # Sanity bound: sigmoid′ ≤ 1/4 everywhere, so χ₁ ≤ σ_w²/16.
    assert chi1 <= DEFAULT_SIGMA_W2 / 16


# --- quadrature ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def normal_samples() -> torch.Tensor:
    return torch.randn(1_000_000, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)


@pytest.mark.parametrize("activation", sorted(get_args(Activation)))
@pytest.mark.parametrize("q", [0.25, 30.0])
def test_quadrature_matches_monte_carlo(activation: str, q: float, normal_samples: torch.Tensor):
    x = math.sqrt(q) * normal_samples
    with torch.no_grad():
        values = activation_function(activation)(x) ** 2
    slopes = _derivative(activation, x) ** 2
    second, slope2 = gaussian_moments(activation, q)
    n = normal_samples.numel()
    for quad, samples in ((second, values), (slope2, slopes)):
        standard_error = float(samples.std()) / math.sqrt(n)
        assert abs(quad - float(samples.mean())) <= 5 * standard_error + 1e-12


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "gelu", "silu"])
@pytest.mark.parametrize("q", [0.3, 1.0, 3.0])
def test_quadrature_matches_gauss_hermite_where_that_is_accurate(activation: str, q: float):
    # 200-node probabilists' Gauss–Hermite suits smooth φ at moderate q (tanh′² at q = 3 is already
    # off by 7e-8 there, as its bump narrows); the composite rule must reproduce it.
    nodes, weights = hermegauss(200)
    z = torch.from_numpy(nodes)
    w = torch.from_numpy(weights / math.sqrt(2 * math.pi))
    x = math.sqrt(q) * z
    with torch.no_grad():
        second_gh = float(torch.dot(w, activation_function(activation)(x) ** 2))
    slope2_gh = float(torch.dot(w, _derivative(activation, x) ** 2))
    second, slope2 = gaussian_moments(activation, q)
    assert second == pytest.approx(second_gh, rel=1e-6)
    assert slope2 == pytest.approx(slope2_gh, rel=1e-6)


@pytest.mark.parametrize(
    ("activation", "sigma_w2", "sigma_b2"),
    [
        ("tanh", 1.5, 0.05),
        ("tanh", 0.8, 0.01),
        ("sigmoid", DEFAULT_SIGMA_W2, DEFAULT_SIGMA_B2_256),
        ("elu", 1.5, 0.1),
        ("gelu", 1.8, 0.1),
        ("softsign", 2.0, 0.01),
        ("silu", 1.8, 0.2),
    ],
)
def test_fixed_point_satisfies_the_variance_map(activation: str, sigma_w2: float, sigma_b2: float):
    q_star, chi1 = mean_field(activation, sigma_w2, sigma_b2)
    second, slope2 = gaussian_moments(activation, q_star)
    assert q_star == pytest.approx(sigma_w2 * second + sigma_b2, rel=1e-9)
    assert chi1 == pytest.approx(sigma_w2 * slope2, rel=1e-12)


def test_works_under_no_grad_and_inference_mode():
    expected = mean_field("tanh", 1.5, 0.05)
    with torch.no_grad():
        assert mean_field("tanh", 1.5, 0.05) == expected
    with torch.inference_mode():
        assert mean_field("tanh", 1.5, 0.05) == expected


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation"):
        mean_field("swish", 1.0, 0.0)
    with pytest.raises(ValueError, match="sigma_w2"):
        mean_field("tanh", -1.0, 0.0)
    with pytest.raises(ValueError, match="sigma_b2"):
        mean_field("tanh", 1.0, math.nan)
    with pytest.raises(ValueError, match="max_iter"):
        mean_field("tanh", 1.0, 0.0, max_iter=-1)
    with pytest.raises(ValueError):
        predicted_decades_per_layer(-0.5)
    assert predicted_decades_per_layer(0.0) == -math.inf
    assert predicted_decades_per_layer(100.0) == pytest.approx(1.0)


# --- measured variances --------------------------------------------------------------------


def test_measured_variances_exact_on_constant_tensors():
    weights = [torch.full((4, 16), 0.5), torch.full((4, 4), 2.0)]
    biases = [torch.full((4,), 0.3), None]
    sigma_w2, sigma_b2 = measured_variances(weights, biases)
    assert sigma_w2 == pytest.approx((16 * 0.25 + 4 * 4.0) / 2)
    assert sigma_b2 == pytest.approx((0.09 + 0.0) / 2)
    assert measured_variances([torch.ones(3, 3)], [None]) == (3.0, 0.0)


def test_measured_variances_recover_known_draws():
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(256, 512, generator=gen) * math.sqrt(2.0 / 512) for _ in range(3)]
    biases: list[torch.Tensor | None] = [torch.randn(4096, generator=gen) * math.sqrt(0.05) for _ in range(3)]
    sigma_w2, sigma_b2 = measured_variances(weights, biases)
    assert sigma_w2 == pytest.approx(2.0, rel=0.02)
    assert sigma_b2 == pytest.approx(0.05, rel=0.05)


def test_measured_variances_of_pytorch_default_linear_and_conv():
    torch.manual_seed(0)
    layers = [nn.Linear(256, 256) for _ in range(4)]
    sigma_w2, sigma_b2 = measured_variances([m.weight for m in layers], [m.bias for m in layers])
    assert sigma_w2 == pytest.approx(DEFAULT_SIGMA_W2, rel=0.02)
    assert sigma_b2 == pytest.approx(DEFAULT_SIGMA_B2_256, rel=0.1)
    # A convolution's fan-in is in_channels × kernel area.
    conv = torch.full((8, 4, 3, 3), 0.1)
    assert measured_variances([conv], [None])[0] == pytest.approx(36 * 0.01)


def test_measured_variances_rejects_bad_input():
    with pytest.raises(ValueError):
        measured_variances([], [])
    with pytest.raises(ValueError):
        measured_variances([torch.ones(2, 2)], [])
    with pytest.raises(ValueError):
        measured_variances([torch.ones(4)], [None])


# --- theory_for ----------------------------------------------------------------------------


def _uniform_layers(n: int, width: int, sigma_w2: float, sigma_b2: float):
    # Constant tensors give exactly the requested second moments.
    weights = [torch.full((width, width), math.sqrt(sigma_w2 / width)) for _ in range(n)]
    biases: list[torch.Tensor | None] = [torch.full((width,), math.sqrt(sigma_b2)) for _ in range(n)]
    return weights, biases


@pytest.mark.parametrize(
    ("spec", "cause"),
    [
        (Spec(arch="cnn", width=16, residual=True), "Residual CNNs"),
        (Spec(residual=True, norm="layer"), "norm='layer'"),
        (Spec(residual=True, activation="relu"), "non-zero mean"),
    ],
)
def test_not_applicable_where_no_derivation_holds(spec: Spec, cause: str):
    weights, biases = _uniform_layers(6, 8, 1.0, 0.0)
    theory = theory_for(spec, weights, biases, q_input=1.0, measured_decades_per_layer=-0.3)
    assert theory.applicable is False
    assert cause in theory.reason
    assert theory.reason.endswith(".")
    assert theory.chi1 is None
    assert theory.agrees is None


def test_not_applicable_without_interior_layers_or_input():
    theory = theory_for(Spec(depth=1), [], [], q_input=1.0, measured_decades_per_layer=None)
    assert theory.applicable is False
    assert "interior" in theory.reason
    weights, biases = _uniform_layers(6, 8, 1.0, 0.0)
    assert theory_for(Spec(), weights, biases, q_input=None, measured_decades_per_layer=None).applicable is False


def test_theory_for_sigmoid_default_init_at_the_fixed_point():
    # Starting at the fixed point, every layer has the same χ₁ = 0.0200 (Poole et al. 2016).
    spec = Spec(depth=10, width=256, activation="sigmoid")
    weights, biases = _uniform_layers(10, 256, DEFAULT_SIGMA_W2, DEFAULT_SIGMA_B2_256)
    q_star, chi1 = mean_field("sigmoid", DEFAULT_SIGMA_W2, DEFAULT_SIGMA_B2_256)
    q_input = (q_star - DEFAULT_SIGMA_B2_256) / DEFAULT_SIGMA_W2  # so the input layer lands on q*
    theory = theory_for(spec, weights, biases, q_input=q_input, measured_decades_per_layer=-0.83)
    assert theory.applicable is True
    assert theory.model == "plain"
    # float32 weights carry the second moments to ~1e-7.
    assert theory.q_star == pytest.approx(q_star, rel=1e-6)
    assert theory.chi1 == pytest.approx(chi1, rel=1e-6)
    assert theory.predicted_decades_per_layer == pytest.approx(0.5 * math.log10(chi1), abs=1e-6)
    assert theory.predicted_decades_per_layer == pytest.approx(-0.84953, abs=1e-4)
    assert theory.agrees is True  # |−0.83 − (−0.85)| ≤ max(0.05, 0.085)
    assert "within the ±0.085 tolerance" in theory.reason


def test_theory_follows_the_q_trajectory_layer_by_layer():
    # tanh at σ_w² = 1: q decays toward 0 and χ₁(q_l) = E[φ′²](q_l) rises toward 1 along the way, so the
    # per-layer factors differ and the mean differs from the χ₁ at the depth-iterated q.
    spec = Spec(depth=12, width=64, activation="tanh")
    weights, biases = _uniform_layers(12, 64, 1.0, 0.0)
    theory = theory_for(spec, weights, biases, q_input=3.0, measured_decades_per_layer=None)
    chis = theory.chi1_per_layer
    assert chis is not None and len(chis) == 9  # 10 interior layers, 9 links between them
    assert all(a is not None and b is not None and a < b < 1 for a, b in itertools.pairwise(chis))
    q_input_layer = 1.0 * 3.0  # σ_w²·q_input + σ_b²
    q_first_interior = 1.0 * gaussian_expectations("tanh", q_input_layer).second
    q = q_first_interior
    assert chis[0] == pytest.approx(gaussian_expectations("tanh", q).slope2, rel=1e-6)
    assert theory.agrees is None
    assert theory.reason.endswith("no finite measured slope to compare.")


def test_theory_for_tolerance_rule():
    spec = Spec(depth=10, width=256, activation="sigmoid")
    weights, biases = _uniform_layers(10, 256, DEFAULT_SIGMA_W2, DEFAULT_SIGMA_B2_256)
    q_star, _ = mean_field("sigmoid", DEFAULT_SIGMA_W2, DEFAULT_SIGMA_B2_256)
    q_input = (q_star - DEFAULT_SIGMA_B2_256) / DEFAULT_SIGMA_W2

    def agrees(measured: float, **kwargs: float) -> bool | None:
        return theory_for(spec, weights, biases, q_input=q_input, measured_decades_per_layer=measured, **kwargs).agrees

    # |predicted| = 0.8495 ⇒ allowed = 10 % of it = 0.085 (above the 0.05 floor).
    assert agrees(-0.85 + 0.08) is True
    assert agrees(-0.85 + 0.09) is False
    # At criticality the absolute floor of 0.05 decades per layer governs.
    relu = Spec(depth=10, width=64, activation="relu")
    weights, biases = _uniform_layers(10, 64, 2.0, 0.0)
    theory = theory_for(relu, weights, biases, q_input=1.0, measured_decades_per_layer=0.049)
    assert theory.agrees is True and theory.tolerance == pytest.approx(0.05)
    assert theory_for(relu, weights, biases, q_input=1.0, measured_decades_per_layer=-0.051).agrees is False
    loose = theory_for(relu, weights, biases, q_input=1.0, measured_decades_per_layer=-0.16, tolerance=0.2)
    assert loose.agrees is True


def test_theory_for_diverging_forward_signal_serialises():
    spec = Spec(depth=100, width=64, activation="relu")
    weights, biases = _uniform_layers(100, 64, 25_600.0, 0.0)
    theory = theory_for(spec, weights, biases, q_input=1.0, measured_decades_per_layer=4.0)
    assert theory.q_star == math.inf
    # relu is homogeneous: χ₁ = σ_w²/2 whatever q, until q overflows and the rate is undefined.
    assert theory.chi1 == pytest.approx(12_800.0)
    assert json.loads(theory.model_dump_json())["q_star"] is None


@pytest.mark.parametrize(("activation", "expected"), [("relu", math.pi / (math.pi - 1)), ("identity", 1.0)])
def test_batch_norm_rate_is_yang_et_al(activation: str, expected: float):
    # Yang et al. 2019: with batch norm the gradient grows by E[φ′(z)²]/Var[φ(z)] per layer, z ~ N(0, 1),
    # whatever σ_w: π/(π − 1) for relu (+0.083 decades per layer), 1 for a linear network.
    spec = Spec(depth=10, width=64, activation=activation, norm="batch")
    weights, biases = _uniform_layers(10, 64, 0.7, 0.0)
    theory = theory_for(spec, weights, biases, q_input=1.0, measured_decades_per_layer=None)
    assert theory.model == "batch_norm"
    assert theory.chi1 == pytest.approx(expected, rel=1e-6)
    assert theory.predicted_decades_per_layer == pytest.approx(0.5 * math.log10(expected), abs=1e-6)


def test_layer_norm_and_residual_rates():
    m = gaussian_expectations("tanh", 1.0)
    weights, biases = _uniform_layers(10, 64, 1.0, 0.0)
    layer = theory_for(
        Spec(depth=10, activation="tanh", norm="layer"), weights, biases, q_input=1.0, measured_decades_per_layer=None
    )
    assert layer.chi1 == pytest.approx(m.slope2 / m.second, rel=1e-6)
    # Residual identity network: ‖∂L/∂x‖² grows by 1 + σ_w² per block (Yang & Schoenholz 2017).
    residual = theory_for(
        Spec(depth=10, activation="identity", residual=True),
        weights,
        biases,
        q_input=1.0,
        measured_decades_per_layer=None,
    )
    assert residual.model == "residual"
    assert residual.predicted_decades_per_layer == pytest.approx(0.5 * math.log10(2.0), abs=1e-6)


def test_remedy_spans_follow_the_same_maps():
    assert remedy_span("relu", "kaiming", 20, sigma_w2=1 / 3, q_input=1.0) == pytest.approx(0.0, abs=1e-9)
    assert remedy_span("relu", "batch_norm", 20, sigma_w2=1 / 3, q_input=1.0) == pytest.approx(
        19 * 0.5 * math.log10(math.pi / (math.pi - 1)), rel=1e-9
    )
    assert remedy_span("relu", "residual", 20, sigma_w2=1 / 3, q_input=1.0) is None  # not derived
    assert remedy_span("relu", "kaiming", 1, sigma_w2=1.0, q_input=1.0) is None
    assert kaiming_sigma_w2("relu") == pytest.approx(2.0)
    assert kaiming_sigma_w2("tanh") == pytest.approx((5 / 3) ** 2)


def test_finite_width_noise_is_hanin_nica_for_relu():
    # Var of ln‖∂L/∂h‖² per layer is 5/n for relu with Gaussian weights: 3·E[φ′⁴]/E[φ′²]² − 1 = 3·2 − 1.
    sigma = span_noise_decades("relu", [1.0] * 20, 128)
    assert sigma == pytest.approx(math.sqrt(20 * 5 / 128) / (2 * math.log(10)), rel=1e-9)
    # Orthogonal weights keep norms: only φ′'s spread is left (2/n less), and none for a linear network.
    assert span_noise_decades("identity", [1.0] * 20, 128, orthogonal=True) == pytest.approx(0.0, abs=1e-6)
    assert span_noise_decades("relu", [1.0] * 20, 128, orthogonal=True) < sigma


def test_finite_width_noise_matches_independent_draws():
    # The spread of the measured span over seeds, for a width-32 relu He net of 20 interior layers, is the
    # random walk the allowance models (to within the spread of 40 samples).
    spans = []
    for seed in range(40):
        torch.manual_seed(seed)
        layers = [nn.Linear(32, 32, bias=False) for _ in range(22)]
        for layer in layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        h = torch.randn(64, 32)
        outs = []
        for layer in layers[:-1]:
            z = layer(h)
            z.retain_grad()
            outs.append(z)
            h = torch.relu(z)
        layers[-1](h).square().sum().backward()
        log_norms = [math.log10(float(z.grad.norm())) for z in outs[1:-1]]
        x = np.arange(len(log_norms))
        spans.append(-np.polyfit(x, log_norms, 1)[0] * (len(log_norms) - 1))
    predicted = span_noise_decades("relu", [1.0] * 19, 32)
    assert 0.4 * predicted < float(np.std(spans)) < 1.5 * predicted


# --- a real deep MLP -------------------------------------------------------------------------


def _measured_slope(activation: str, init: str, *, depth: int = 30, width: int = 256, seed: int = 0):
    """Build `depth` Linear(width, width) layers (the last one is the output), backprop a
    cross-entropy loss from an N(0, 1) batch, and fit log10 ‖∂L/∂h_l‖ over the interior layers."""
    torch.manual_seed(seed)
    layers = [nn.Linear(width, width) for _ in range(depth)]
    for parameter in (p for layer in layers for p in layer.parameters()):
        # Only ∂L/∂h is measured; skipping the weight gradients saves a third of the work.
        parameter.requires_grad_(False)
    if init == "kaiming_normal":
        for layer in layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    phi = activation_function(activation)
    h = h0 = torch.randn(256, width, requires_grad=True)
    pre_activations = []
    for layer in layers[:-1]:
        z = layer(h)
        z.retain_grad()
        pre_activations.append(z)
        h = phi(z)
    loss = nn.functional.cross_entropy(layers[-1](h), torch.randint(0, width, (256,)))
    loss.backward()
    # float64 norms: sigmoid's gradient falls ~24 decades over 30 layers and its square would
    # underflow float32.
    log_norms = np.log10([float(z.grad.double().norm()) for z in pre_activations])
    # graddiag's interior: every hidden layer after the first (layers[0] plays the input layer).
    interior = np.arange(1, len(log_norms))
    slope = np.polyfit(interior, log_norms[interior], 1)[0]
    # Positive slope toward the output is decay toward the input: report decades per layer toward
    # the input, negative meaning vanishing.
    q_input = float(h0.detach().double().square().mean())
    return -float(slope), [m.weight for m in layers], [m.bias for m in layers], q_input


@pytest.mark.parametrize(
    ("activation", "init"),
    [("sigmoid", "default"), ("tanh", "default"), ("relu", "kaiming_normal")],
)
def test_theory_matches_a_real_deep_mlp(activation: str, init: str):
    measured, weights, biases, q_input = _measured_slope(activation, init)
    spec = Spec(depth=29, width=256, activation=activation, init=init)
    theory = theory_for(spec, weights, biases, q_input=q_input, measured_decades_per_layer=measured)
    assert theory.applicable is True
    assert theory.agrees is True, theory.reason
    # Observed gaps are ≤ 0.01 decades per layer; 0.05 still catches a wrong χ₁ or σ_w².
    assert theory.predicted_decades_per_layer is not None
    assert abs(measured - theory.predicted_decades_per_layer) <= 0.05, theory.reason


def test_per_example_inputs_follow_the_diagonal_map_per_group():
    weights, biases = _uniform_layers(12, 64, 2.0, 0.0)

    def predicted(activation: str, q_input: float | list[float]) -> float | None:
        spec = Spec(depth=12, width=64, activation=activation)
        return theory_for(
            spec, weights, biases, q_input=q_input, measured_decades_per_layer=None
        ).predicted_decades_per_layer

    # One q for every example is the scalar case; relu is homogeneous, so the spread of q cannot matter.
    assert predicted("gelu", [0.8] * 64) == pytest.approx(predicted("gelu", 0.8), abs=1e-12)
    spread = [0.1] * 32 + [3.0] * 32
    assert predicted("relu", spread) == pytest.approx(predicted("relu", 1.55), abs=1e-9)
    # gelu's E[φ′²] depends on q: half the examples near q = 0.1 decay at a different rate than the mean q's.
    assert abs(predicted("gelu", spread) - predicted("gelu", 1.55)) > 0.005
