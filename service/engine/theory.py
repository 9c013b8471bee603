"""Mean-field theory of signal propagation in a plain MLP (Poole et al. 2016; Schoenholz et al. 2017).

A fully connected network with weights ``W_ij ~ (0, σ_w²/fan_in)`` and biases ``b_i ~ (0, σ_b²)``
carries a pre-activation variance that, in the wide limit, follows the variance map

    q_{l+1} = σ_w² · E_z[φ(√q_l · z)²] + σ_b²,      z ~ N(0, 1),

towards a fixed point q*. Near it the squared norm of the backward signal ∂L/∂h_l changes by

    χ₁ = σ_w² · E_z[φ′(√q* · z)²]

per layer, so ``‖∂L/∂h_l‖ ∝ χ₁^((L−l)/2)``: the gradient norm moves by ½·log10 χ₁ decades per layer
toward the input (negative: vanishing, positive: exploding, zero: the edge of chaos).

The Gaussian expectations are computed by quadrature on the real torch activation functions in
float64, with φ′ taken by autograd, so what the theory sees is exactly what the network computes
(gelu's erf form, selu's constants, torch's relu′(0) = 0 and so on).

Why not plain Gauss–Hermite: its nodes straddle z = 0 without a node there, so it cannot resolve the
kink that relu, leaky_relu, elu, selu and softsign have at 0 (measured: up to 4 % error in E[φ′²]
for selu at q = 10 and 30 % for softsign, with 100-200 nodes), and for large q the interesting part
of φ(√q·z) shrinks to a width of 1/√q in z, which slips between the nodes (tanh at q = 10: 2 %).
Instead we use composite Gauss–Legendre on panels that break at z = 0, at fixed z (where the
Gaussian weight changes) and at fixed x = √q·z (where the activation bends). Every panel then holds
an analytic integrand, and E[φ²], E[φ′²] agree with a 40-node-per-panel rule to ~1e-15 for every
activation from q = 1e-6 to q = 1e40 (and with 200-node Gauss–Hermite to ~1e-6 where that rule
is itself accurate: smooth φ at moderate q).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from graddiag.models.init import kaiming_nonlinearity
from graddiag.models.networks import make_activation
from graddiag.models.spec import RECURRENT_ARCHS, Spec
from graddiag.service.engine.profile import fit_log_slope
from graddiag.service.engine.report import Theory

__all__ = [
    "Moments",
    "activation_function",
    "gaussian_expectations",
    "gaussian_moments",
    "kaiming_sigma_w2",
    "mean_field",
    "measured_variances",
    "predicted_decades_per_layer",
    "remedy_span",
    "span_noise_decades",
    "theory_for",
]

ActivationFn = Callable[[Tensor], Tensor]

# Beyond |z| = 12 the Gaussian holds < 4e-33 of its mass; even relu² (∝ z²) loses nothing visible.
_Z_MAX = 12.0
# Breakpoints in z: the Gaussian weight is analytic but varies on an O(1) scale, so panels of
# about unit width keep 20 Legendre nodes at machine precision.
_Z_BREAKS = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, _Z_MAX])
# Breakpoints in x = √q·z: every supported activation bends within |x| ≲ 10 (poles of tanh/sigmoid
# sit at Im x = ±π/2, softsign decays algebraically), so geometric panels there resolve it at any q.
_X_BREAKS = np.array([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
_LEGENDRE_NODES, _LEGENDRE_WEIGHTS = np.polynomial.legendre.leggauss(20)

# q outside [_Q_TINY, _Q_HUGE] is reported as 0 or ∞: the forward signal has died out or blown up.
# 1e-100 .. 1e100 keeps φ(√q·z)² far from float64 underflow/overflow while evaluating there.
_Q_TINY = 1e-100
_Q_HUGE = 1e100
# Quantile groups of the per-example input second moments that the per-example q-map follows.
_Q_GROUPS = 8
# Relative step below which the variance map counts as converged; geometric convergence reaches it
# in tens of iterations, critical (algebraic) cases run to max_iter.
_Q_RTOL = 1e-12


def _nodes(q: float) -> tuple[Tensor, Tensor]:
    """Quadrature nodes z and weights w (Gaussian density folded in) for E_z[f(√q·z)]."""
    scale = math.sqrt(q)
    breaks = np.unique(np.concatenate(([0.0], _Z_BREAKS, _X_BREAKS / scale)))
    breaks = breaks[breaks <= _Z_MAX]
    left, right = breaks[:-1], breaks[1:]
    half = (right - left) / 2
    mid = (right + left) / 2
    z = (mid[:, None] + half[:, None] * _LEGENDRE_NODES).ravel()
    w = (half[:, None] * _LEGENDRE_WEIGHTS).ravel() * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    # Mirror the positive half: the breakpoint set is symmetric, and a panel edge at z = 0 is what
    # lets kinked activations integrate exactly.
    nodes = np.concatenate((-z[::-1], z))
    weights = np.concatenate((w[::-1], w))
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def activation_function(name: str) -> ActivationFn:
    """The network's own activation (the module `models.networks` builds), as a function of a tensor.

    One definition of each activation: the theory integrates exactly what the network computes
    (leaky_relu's slope, elu's alpha, gelu's erf form, selu's constants).
    """
    module = make_activation(name)
    return module.__call__


_activation = activation_function


def _second_moment(phi: ActivationFn, q: float) -> float:
    """E_z[φ(√q·z)²], the forward half of the variance map."""
    q = min(max(q, _Q_TINY), _Q_HUGE)
    z, w = _nodes(q)
    with torch.no_grad():
        values = phi(math.sqrt(q) * z)
    return float(torch.dot(w, values * values))


def _derivative_moment(phi: ActivationFn, q: float) -> float:
    """E_z[φ′(√q·z)²], with φ′ from autograd so it is torch's own derivative."""
    q = min(max(q, _Q_TINY), _Q_HUGE)
    # Autograd must work even when the caller is inside torch.no_grad() or torch.inference_mode(),
    # and the nodes must be created outside inference mode to take part in autograd.
    with torch.inference_mode(False), torch.enable_grad():
        z, w = _nodes(q)
        x = (math.sqrt(q) * z).requires_grad_(True)
        # φ is elementwise, so the gradient of the sum is φ′ at every node.
        (slope,) = torch.autograd.grad(phi(x).sum(), x)
    return float(torch.dot(w, slope * slope))


def gaussian_moments(activation: str, q: float) -> tuple[float, float]:
    """(E_z[φ(√q·z)²], E_z[φ′(√q·z)²]) for z ~ N(0, 1) and the named activation.

    ``q`` is clamped into [1e-100, 1e100], which is where the variance map stops anyway.
    """
    if not (q >= 0 and math.isfinite(q)):
        raise ValueError(f"q must be a finite non-negative variance, got {q!r}")
    phi = _activation(activation)
    return _second_moment(phi, q), _derivative_moment(phi, q)


def mean_field(
    activation: str, sigma_w2: float, sigma_b2: float, *, q0: float = 1.0, max_iter: int = 1000
) -> tuple[float, float]:
    """(q*, χ₁): iterate the variance map from ``q0`` and evaluate χ₁ at the q reached.

    The map runs at most ``max_iter`` times (one per layer), stopping early once the relative step
    drops below 1e-12. A q that falls under 1e-100 is reported as 0 and one that rises above 1e100
    (or overflows) as ∞: relu with σ_w² < 2 and no bias decays to 0 and with σ_w² > 2 grows without
    bound, and neither has a finite non-trivial fixed point. Critical maps (tanh with σ_w² = 1,
    σ_b² = 0) approach q* = 0 only algebraically, so the q after ``max_iter`` layers is what a
    network that deep actually sees. χ₁ is evaluated at the q reached, clamped to [1e-100, 1e100];
    for positively homogeneous φ (relu, leaky_relu, identity) it does not depend on q at all.
    """
    phi = _activation(activation)
    for name, value in (("sigma_w2", sigma_w2), ("sigma_b2", sigma_b2), ("q0", q0)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be finite and non-negative, got {value!r}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be non-negative, got {max_iter}")

    q = float(q0)
    for _ in range(max_iter):
        q_next = sigma_w2 * _second_moment(phi, q) + sigma_b2
        if not math.isfinite(q_next) or q_next > _Q_HUGE:
            q = math.inf
            break
        if q_next < _Q_TINY:
            q = 0.0
            break
        converged = abs(q_next - q) <= _Q_RTOL * q_next
        q = q_next
        if converged:
            break
    chi1 = sigma_w2 * _derivative_moment(phi, q)
    return q, chi1


def predicted_decades_per_layer(chi1: float) -> float:
    """½·log10 χ₁: decades the gradient norm changes per layer toward the input (−∞ if χ₁ = 0)."""
    if math.isnan(chi1):
        return math.nan
    if chi1 < 0:
        raise ValueError(f"chi1 is a ratio of squared norms and cannot be negative, got {chi1}")
    if chi1 == 0:
        return -math.inf
    return 0.5 * math.log10(chi1)


def measured_variances(weights: list[Tensor], biases: list[Tensor | None]) -> tuple[float, float]:
    """(σ_w², σ_b²) of the given layers: the mean over layers of fan_in·mean(W²) and of mean(b²).

    Second moments, not variances, because the theory needs E[W²] (the weights' mean enters the
    pre-activation variance too). fan_in is ``W[0].numel()``: ``W.shape[1]`` for a Linear weight,
    in_channels·kernel area for a convolution. A layer without a bias contributes σ_b² = 0.
    """
    if not weights:
        raise ValueError("measured_variances needs at least one weight tensor")
    if len(biases) != len(weights):
        raise ValueError(f"got {len(weights)} weight tensors but {len(biases)} biases")
    sigma_w2 = []
    sigma_b2 = []
    for weight, bias in zip(weights, biases, strict=True):
        if weight.dim() < 2:
            raise ValueError(f"a layer weight needs at least 2 dimensions, got shape {tuple(weight.shape)}")
        # float64 on the weight's own device: exact enough for the mean and no host copy of the matrix.
        w = weight.detach().to(torch.float64)
        sigma_w2.append(w[0].numel() * float(w.square().mean()))
        sigma_b2.append(0.0 if bias is None else float(bias.detach().to(torch.float64).square().mean()))
    return float(np.mean(sigma_w2)), float(np.mean(sigma_b2))


@dataclass(frozen=True)
class Moments:
    """Gaussian expectations of an activation at pre-activation variance q: z ~ N(0, 1), x = √q·z."""

    mean: float  # E[φ(x)]
    second: float  # E[φ(x)²]
    slope2: float  # E[φ′(x)²]
    slope4: float  # E[φ′(x)⁴]

    @property
    def variance(self) -> float:
        """Var[φ(x)]: what batch norm divides by."""
        return max(self.second - self.mean * self.mean, 0.0)


@functools.lru_cache(maxsize=4096)
def gaussian_expectations(activation: str, q: float) -> Moments:
    """E[φ], E[φ²], E[φ′²], E[φ′⁴] at variance q, by the panel quadrature above (q clamped as there, ∞ too)."""
    if not q >= 0:
        raise ValueError(f"q must be a non-negative variance, got {q!r}")
    phi = activation_function(activation)
    # An infinite q (a forward signal that overflowed) is evaluated at the clamp, like any q > 1e100.
    q = min(max(q, _Q_TINY), _Q_HUGE)
    with torch.inference_mode(False), torch.enable_grad():
        z, w = _nodes(q)
        x = (math.sqrt(q) * z).requires_grad_(True)
        y = phi(x)
        (slope,) = torch.autograd.grad(y.sum(), x)
    y = y.detach()
    s2 = slope * slope
    return Moments(
        mean=float(torch.dot(w, y)),
        second=float(torch.dot(w, y * y)),
        slope2=float(torch.dot(w, s2)),
        slope4=float(torch.dot(w, s2 * s2)),
    )


def measured_layer_variances(weights: list[Tensor], biases: list[Tensor | None]) -> list[tuple[float, float]]:
    """Per layer, (σ_w², σ_b²) = (fan_in·mean(W²), mean(b²)); fan_in is ``W[0].numel()``."""
    out = []
    for weight, bias in zip(weights, biases, strict=True):
        w = weight.detach().to(torch.float64)
        sigma_b2 = 0.0 if bias is None else float(bias.detach().to(torch.float64).square().mean())
        out.append((w[0].numel() * float(w.square().mean()), sigma_b2))
    return out


@dataclass(frozen=True)
class _Trajectory:
    """The forward variances and the predicted log10 ‖∂L/∂h_l‖ over the interior layers."""

    model: str
    qs: list[float]  # q_l of each interior layer's pre-activation (1 where a norm standardises it)
    chi: list[float]  # per-layer factor on ‖∂L/∂h‖² between consecutive interior layers, input side first
    profile: list[float]  # predicted log10 ‖∂L/∂h_l‖, up to a constant, input side first


def _plain(activation: str, layers: list[tuple[float, float]], q_input: float) -> _Trajectory:
    # q_0: the input layer's pre-activation from the measured input second moment; then the q-map
    # with each layer's own σ_w², σ_b² (Poole et al. 2016). For a convolution the diagonal of the
    # map is the same with fan_in = C·k² (Xiao et al. 2018); max pooling is taken to keep q and the
    # gradient norm (it routes each gradient to one input; neighbours are strongly correlated at init).
    sigma_w2, sigma_b2 = layers[0]
    q = sigma_w2 * q_input + sigma_b2
    qs: list[float] = []
    for sigma_w2, sigma_b2 in layers[1:-1]:
        q = _clamp_q(sigma_w2 * gaussian_expectations(activation, q).second + sigma_b2)
        qs.append(q)
    # ‖∂L/∂h_l‖² = E[φ′(h_l)²]·σ_{w,l+1}²·‖∂L/∂h_{l+1}‖² (Schoenholz et al. 2017), layer by layer.
    chi = [layers[i + 2][0] * gaussian_expectations(activation, q).slope2 for i, q in enumerate(qs[:-1])]
    return _Trajectory("plain", qs, chi, _profile_from_ratios(chi))


def _normalised(activation: str, layers: list[tuple[float, float]], norm: str) -> _Trajectory:
    # Normalisation standardises each pre-activation (γ = 1, β = 0 at init), so φ sees z ~ N(0, 1) at
    # every layer. Back through it ∂L/∂h = P(∂L/∂z)/σ, where σ² is what the norm divided by:
    # batch norm: the batch variance of h = σ_w²·Var[φ(z)] (Yang et al. 2019); layer norm: the
    # per-example second moment over features σ_w²·E[φ(z)²]. P removes two directions of many.
    moments = gaussian_expectations(activation, 1.0)
    divisor = moments.variance if norm == "batch" else moments.second
    interior = layers[1:-1]
    chi = [
        interior[i + 1][0] * moments.slope2 / (interior[i][0] * divisor) if divisor > 0 else math.inf
        for i in range(len(interior) - 1)
    ]
    model = "batch_norm" if norm == "batch" else "layer_norm"
    return _Trajectory(model, [1.0] * len(interior), chi, _profile_from_ratios(chi))


def _residual(activation: str, layers: list[tuple[float, float]], q_input: float) -> _Trajectory:
    # x_l = x_{l-1} + φ(W_l x_{l-1} + b_l) (Yang & Schoenholz 2017), tracking the stream's mean m and
    # second moment p: relu-like φ adds a positive mean every block, and the cross term 2·m·E[φ]
    # makes p grow faster than the zero-mean map says. Backward, ‖∂L/∂x_{l-1}‖² =
    # (1 + σ_w²·E[φ′²])·‖∂L/∂x_l‖², and the recorded ∂L/∂h_l = φ′(h_l)⊙∂L/∂x_l.
    sigma_w2, sigma_b2 = layers[0]
    first = gaussian_expectations(activation, _clamp_q(sigma_w2 * q_input + sigma_b2))
    mean, second = first.mean, first.second
    qs: list[float] = []
    moments: list[Moments] = []
    for sigma_w2, sigma_b2 in layers[1:-1]:
        q = _clamp_q(sigma_w2 * second + sigma_b2)
        m = gaussian_expectations(activation, q)
        second = second + 2 * mean * m.mean + m.second
        mean = mean + m.mean
        qs.append(q)
        moments.append(m)
    # log10 ‖∂L/∂x_l‖ from the output side, then add ½·log10 E[φ′²](q_l) for ∂L/∂h_l.
    interior = layers[1:-1]
    stream = [0.0] * len(interior)
    for i in range(len(interior) - 2, -1, -1):
        stream[i] = stream[i + 1] + 0.5 * math.log10(1 + interior[i + 1][0] * moments[i + 1].slope2)
    profile = [x + 0.5 * math.log10(max(m.slope2, 1e-300)) for x, m in zip(stream, moments, strict=True)]
    chi = [10 ** (2 * (profile[i] - profile[i + 1])) for i in range(len(profile) - 1)]
    return _Trajectory("residual", qs, chi, profile)


def _zero_mean(activation: str) -> bool:
    """Whether E[φ] = 0 at every q (odd φ: tanh, softsign, identity), checked across three decades of q."""
    for q in (0.1, 1.0, 10.0):
        moments = gaussian_expectations(activation, q)
        if abs(moments.mean) > 1e-9 * math.sqrt(max(moments.second, 1e-300)):
            return False
    return True


def _trajectory(
    activation: str, norm: str, residual: bool, layers: list[tuple[float, float]], q_input: float | Sequence[float]
) -> _Trajectory:
    if norm != "none":
        return _normalised(activation, layers, norm)
    if isinstance(q_input, float | int):
        return (_residual if residual else _plain)(activation, layers, float(q_input))
    return _per_example(activation, residual, layers, q_input)


def _per_example(
    activation: str, residual: bool, layers: list[tuple[float, float]], q_inputs: Sequence[float]
) -> _Trajectory:
    # The q-map is diagonal: each example carries its own q_l (Poole et al. 2016), and real images differ
    # in contrast (CIFAR-10's per-image second moments span 0.1 to 3). The map is nonlinear in q, so the
    # batch's mean q misplaces χ₁(q_l) for activations whose E[φ′²] depends on q (gelu, silu). Examples are
    # grouped by quantile of their input second moment; the predicted ‖∂L/∂h_l‖² is the groups' mean,
    # each group weighted by its size and starting from the same ‖∂L/∂h‖ at the last interior layer.
    ordered = sorted(float(q) for q in q_inputs)
    groups = [
        g
        for g in (
            ordered[i * len(ordered) // _Q_GROUPS : (i + 1) * len(ordered) // _Q_GROUPS] for i in range(_Q_GROUPS)
        )
        if g
    ]
    trajectories = [(_residual if residual else _plain)(activation, layers, statistics.fmean(g)) for g in groups]
    weights = [len(g) / len(ordered) for g in groups]
    profile = []
    for i in range(len(trajectories[0].profile)):
        total = sum(w * 10 ** (2 * t.profile[i]) for w, t in zip(weights, trajectories, strict=True))
        profile.append(0.5 * math.log10(total) if total > 0 else -math.inf)
    chi = [10 ** (2 * (profile[i] - profile[i + 1])) for i in range(len(profile) - 1)]
    middle = trajectories[len(trajectories) // 2]
    return _Trajectory(middle.model, middle.qs, chi, profile)


def kaiming_sigma_w2(activation: str) -> float:
    """σ_w² of Kaiming (He) init for the activation, as `models.init` draws it: the gain squared."""
    nonlinearity, param = kaiming_nonlinearity(activation)
    return nn.init.calculate_gain(nonlinearity, param) ** 2


Remedy = Literal["kaiming", "unit_variance", "layer_norm", "batch_norm", "residual"]


def remedy_span(activation: str, remedy: Remedy, interior: int, *, sigma_w2: float, q_input: float) -> float | None:
    """Predicted change of log10 ‖∂L/∂h‖ across `interior` layers if the network took `remedy`.

    kaiming: zero biases and σ_w² = the Kaiming gain² of :func:`models.init.kaiming_nonlinearity`
    (χ₁ = 1 for relu, about half of that for gelu and silu near q = 0); unit_variance: zero biases and
    σ_w² = 1 (orthogonal or Xavier on square layers; LeCun's scale for selu, the edge of chaos for
    tanh); layer_norm/batch_norm: the
    normalised map at the current σ_w²; residual: the residual map at the current σ_w², for odd φ
    only (None otherwise: not derived). The span is the fitted slope times (interior − 1), as measured.
    """
    if interior < 2:
        return None
    if remedy == "residual" and not _zero_mean(activation):
        return None
    if remedy in ("kaiming", "unit_variance"):
        sigma2 = kaiming_sigma_w2(activation) if remedy == "kaiming" else 1.0
        trajectory = _plain(activation, [(sigma2, 0.0)] * (interior + 2), q_input)
    else:
        layers = [(sigma_w2, 0.0)] * (interior + 2)
        norm = {"layer_norm": "layer", "batch_norm": "batch"}.get(remedy, "none")
        trajectory = _trajectory(activation, norm, remedy == "residual", layers, q_input)
    slope = fit_log_slope(trajectory.profile)
    return None if slope is None or not math.isfinite(slope) else slope * (interior - 1)


def _clamp_q(q: float) -> float:
    return math.inf if not math.isfinite(q) or q > _Q_HUGE else max(q, 0.0)


def _profile_from_ratios(chi: list[float]) -> list[float]:
    profile = [0.0] * (len(chi) + 1)
    for i in range(len(chi) - 1, -1, -1):
        profile[i] = profile[i + 1] + (0.5 * math.log10(chi[i]) if chi[i] > 0 else -math.inf)
    return profile


def span_noise_decades(activation: str, qs: list[float], fan_in: int, *, orthogonal: bool = False) -> float:
    """One standard deviation of the chance change of log10 ‖∂L/∂h‖ across the given layers.

    At finite width each layer multiplies ‖∂L/∂h‖² by its mean factor times (1 + ε) with
    Var ε = (3·E[φ′⁴]/E[φ′²]² − 1)/n for Gaussian weights (the χ² of W plus the spread of φ′²; 5/n for
    relu, as in Hanin & Nica 2018) and 2/n less for orthogonal weights, which keep norms exactly. The
    log-norm then walks randomly, its variance growing with depth/width (Hanin 2018): summed over the
    layers and converted from ln of a square to log10 of a norm.
    """
    if fan_in <= 0:
        return 0.0
    total = 0.0
    for q in qs:
        m = gaussian_expectations(activation, q)
        if m.slope2 <= 0:
            continue
        excess = 3 * m.slope4 / (m.slope2 * m.slope2) - 1 - (2 if orthogonal else 0)
        total += max(excess, 0.0) / fan_in
    return math.sqrt(total) / (2 * math.log(10))


def _format_q(q: float) -> str:
    return "q → ∞" if math.isinf(q) else f"q = {q:#.3g}"


def format_decades(value: float) -> str:
    """A rate in decades to three places, signed; never "-0.000" for a rate that rounds to zero."""
    text = f"{value:+.3f}"
    return "+0.000" if text == "-0.000" else text


def compare_rates(
    predicted: float, measured: float | None, tolerance: float, relative_tolerance: float
) -> tuple[str, float | None, bool | None]:
    """(the clause that sets `measured` beside a finite `predicted` rate, the tolerance allowed, whether they agree).

    They agree within max(tolerance, relative_tolerance·|predicted|); with no finite measurement the
    clause says so and the tolerance and agreement are None. Used by the depth and the time theories alike.
    """
    if measured is None or not math.isfinite(measured):
        return "; there is no finite measured slope to compare.", None, None
    allowed = max(tolerance, relative_tolerance * abs(predicted))
    agrees = abs(measured - predicted) <= allowed
    clause = f"; measured {format_decades(measured)}, {'within' if agrees else 'outside'} the ±{allowed:.3f} tolerance."
    return clause, allowed, agrees


def _not_applicable(spec: Spec, interior: int) -> str | None:
    """Why no derivation here describes this network, or None when one does."""
    if spec.arch == "transformer":
        return (
            "Transformers are not covered: the q-map is derived for chains of weight layers, and a block's "
            "attention (a softmax over tokens) and its layer norms on a growing residual stream have no variance "
            "map here. The across-block profile is set beside Xiong et al. (2020) in the layer_norm_position "
            "finding instead."
        )
    if spec.arch in RECURRENT_ARCHS:
        return (
            "Across its stacked layers a recurrent net is not covered: each layer's input projection sees the layer "
            "below at every time step, and the gradient at a layer sums the paths through the layers above and "
            "through time, for which no depth map is derived here. Through time, see theory.time."
        )
    if interior < 2:
        return "The network has fewer than two interior layers, so there is no per-layer rate to predict."
    if spec.arch == "cnn" and spec.residual:
        return (
            "Residual CNNs are not covered: their blocks hold two convolutions and a post-sum activation, "
            "for which no variance map is derived here."
        )
    if spec.residual and spec.norm != "none":
        return (
            f"Residual connections with norm={spec.norm!r} are not covered: the normalised branch and the "
            "growing identity stream would need a joint map that is not derived here."
        )
    return None


def theory_for(
    spec: Spec,
    weights: list[Tensor],
    biases: list[Tensor | None],
    *,
    q_input: float | Sequence[float] | None,
    measured_decades_per_layer: float | None,
    tolerance: float = 0.05,
    relative_tolerance: float = 0.10,
) -> Theory:
    """The mean-field prediction of ∂L/∂h's profile for a probed network, from its actual initial weights.

    ``weights``/``biases`` are every weight layer (linear, conv) in forward order as initialised, the
    input and output layers included; ``q_input`` is the measured second moment of the network's input,
    or one per example (then the diagonal map runs per quantile group of examples, see `_per_example`).
    The per-layer factors χ₁(q_l) follow the real q_l trajectory from there; the predicted profile is
    fitted like the measured one, and they agree when they differ by at most
    ``max(tolerance, relative_tolerance·|predicted|)`` decades per layer. ``agrees`` is None when there is
    no finite measured slope or prediction.
    """
    interior = max(len(weights) - 2, 0)
    why_not = _not_applicable(spec, interior)
    if why_not is None and q_input is None:
        why_not = "The input's second moment was not measured, so the forward signal cannot be started."
    if why_not is not None:
        return Theory(applicable=False, reason=why_not)
    assert q_input is not None
    q_mean = float(q_input) if isinstance(q_input, float | int) else statistics.fmean(q_input)
    layers = measured_layer_variances(weights, biases)
    if not all(math.isfinite(w) and math.isfinite(b) for w, b in layers) or not math.isfinite(q_mean):
        return Theory(
            applicable=False,
            reason="The initial weights, biases or inputs are not finite, so their variances are undefined.",
        )
    if spec.residual and spec.norm == "none" and not _zero_mean(spec.activation):
        return Theory(
            applicable=False,
            reason=(
                f"Residual {spec.activation} MLPs are not covered: the stream accumulates {spec.activation}'s "
                "non-zero mean, each unit's pre-activation sign then freezes, and the zero-mean backward map "
                "of Yang & Schoenholz (2017) no longer holds (it under-predicts the measured growth)."
            ),
        )
    trajectory = _trajectory(spec.activation, spec.norm, spec.residual, layers, q_input)
    predicted = fit_log_slope(trajectory.profile)
    finite_chi = [c for c in trajectory.chi if c > 0 and math.isfinite(c)]
    chi1 = math.exp(statistics.fmean(math.log(c) for c in finite_chi)) if finite_chi else None
    interior_layers = layers[1:-1]
    sigma_w2 = statistics.fmean(w for w, _ in interior_layers)
    sigma_b2 = statistics.fmean(b for _, b in interior_layers)

    described = {
        "plain": "the q-map layer by layer",
        "batch_norm": "batch norm's E[φ′²]/Var[φ] per layer",
        "layer_norm": "layer norm's E[φ′²]/E[φ²] per layer",
        "residual": "the residual stream's mean and second moment",
    }[trajectory.model]
    agrees: bool | None = None
    allowed: float | None = None
    if predicted is None or not math.isfinite(predicted):
        sentence = f"Mean-field theory ({described}) predicts no finite rate: the forward signal dies or overflows."
    else:
        sentence = (
            f"Mean-field theory ({described}, from the measured input {_format_q(q_mean)}) predicts "
            f"{format_decades(predicted)} decades per layer for ‖∂L/∂h‖"
        )
        if chi1 is not None:
            sentence += f" (mean χ₁ = {chi1:#.3g})"
        clause, allowed, agrees = compare_rates(predicted, measured_decades_per_layer, tolerance, relative_tolerance)
        sentence += clause
    last_q = trajectory.qs[-1] if trajectory.qs else None
    return Theory(
        applicable=True,
        reason=sentence,
        model=trajectory.model,
        sigma_w2=sigma_w2,
        sigma_b2=sigma_b2,
        q_input=q_mean,
        q_star=last_q,
        chi1=chi1,
        chi1_per_layer=[c if math.isfinite(c) else None for c in trajectory.chi],
        q_per_layer=[q if math.isfinite(q) else None for q in trajectory.qs],
        predicted_decades_per_layer=predicted,
        measured_decades_per_layer=measured_decades_per_layer,
        tolerance=allowed,
        agrees=agrees,
    )
