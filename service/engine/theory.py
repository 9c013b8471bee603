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

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from graddiag.models.spec import Spec
from graddiag.service.engine.report import Theory

__all__ = [
    "ACTIVATIONS",
    "gaussian_moments",
    "mean_field",
    "measured_variances",
    "predicted_decades_per_layer",
    "theory_for",
]

ActivationFn = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


# Must match the network builder's choices exactly (leaky slope, elu alpha, gelu's erf form); the
# names are the `Activation` literal of models.spec.
ACTIVATIONS: dict[str, ActivationFn] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, negative_slope=0.01),
    "elu": lambda x: F.elu(x, alpha=1.0),
    "selu": F.selu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "silu": F.silu,
    "softsign": F.softsign,
    "identity": _identity,
}

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


def _activation(name: str) -> ActivationFn:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; known: {known}") from None


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


def _format_q(q: float) -> str:
    return "q* → ∞" if math.isinf(q) else f"q* = {q:#.3g}"


def _format_decades(value: float) -> str:
    # Avoid printing "-0.00" for a slope that rounds to zero.
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def _not_applicable(spec: Spec, has_interior: bool) -> str | None:
    """Why the plain-MLP theory does not describe this network, or None when it does."""
    if spec.arch != "mlp":
        return (
            f"Mean-field theory here covers plain MLPs only; arch={spec.arch!r} shares weights across "
            "positions, so its variance map differs."
        )
    if spec.norm != "none":
        return (
            f"Normalisation (norm={spec.norm!r}) rescales every pre-activation, so the plain-MLP "
            "variance map and χ₁ do not apply."
        )
    if spec.residual:
        return (
            "Residual connections add an identity path around every block, so the gradient does not "
            "shrink or grow by the plain-MLP factor χ₁ per layer."
        )
    if not has_interior:
        return "The network has no interior hidden layer, so there is no per-layer decay to predict."
    return None


def theory_for(
    spec: Spec,
    weights: list[Tensor],
    biases: list[Tensor | None],
    measured_decades_per_layer: float | None,
    *,
    tolerance: float = 0.15,
) -> Theory:
    """The mean-field verdict for a probed network, from the variances of its actual initialisation.

    ``weights``/``biases`` are the interior hidden Linear layers as initialised, so the prediction
    follows whatever init the spec chose. The prediction agrees with the measured slope when they
    differ by at most ``max(tolerance, 0.25·|predicted|)`` decades per layer: an absolute floor for
    slopes near zero, relative slack for steep ones where finite width and depth blur the rate.
    ``agrees`` is None when there is no finite measured slope (or the prediction is −∞).
    """
    why_not = _not_applicable(spec, bool(weights))
    if why_not is not None:
        return Theory(applicable=False, reason=why_not)

    sigma_w2, sigma_b2 = measured_variances(weights, biases)
    if not (math.isfinite(sigma_w2) and math.isfinite(sigma_b2)):
        return Theory(
            applicable=False,
            reason="The initial weights or biases are not finite, so their variances are undefined.",
        )
    # One application of the map per hidden layer from a unit-variance start: for a shallow or
    # critical network χ₁ is then taken where the signal actually is, not at an unreached limit.
    q_star, chi1 = mean_field(spec.activation, sigma_w2, sigma_b2, q0=1.0, max_iter=spec.depth)
    predicted = predicted_decades_per_layer(chi1)

    sentence = (
        f"Mean-field theory predicts {_format_decades(predicted)} decades per layer "
        f"(χ₁ = {chi1:#.3g} at {_format_q(q_star)})"
    )
    agrees: bool | None = None
    if measured_decades_per_layer is None:
        sentence += "; no measured slope to compare."
    elif not math.isfinite(measured_decades_per_layer):
        sentence += "; the measured slope is not finite, so there is nothing to compare."
    elif not math.isfinite(predicted):
        sentence += f"; measured {_format_decades(measured_decades_per_layer)}."
    else:
        allowed = max(tolerance, 0.25 * abs(predicted))
        agrees = abs(measured_decades_per_layer - predicted) <= allowed
        verdict = "within" if agrees else "outside"
        sentence += f"; measured {_format_decades(measured_decades_per_layer)}, {verdict} the ±{allowed:.2f} tolerance."

    return Theory(
        applicable=True,
        reason=sentence,
        sigma_w2=sigma_w2,
        sigma_b2=sigma_b2,
        q_star=q_star,
        chi1=chi1,
        predicted_decades_per_layer=predicted,
        measured_decades_per_layer=measured_decades_per_layer,
        agrees=agrees,
    )
