"""Mean-field theory of the gradient through time of a recurrent net at initialisation.

The judged layer is the top recurrent layer: its ∂L/∂h_t for t < T − 1 comes only through its own
recurrence (the classifier reads h_{T−1} alone), so its profile over t is one chain of per-step factors,
as an MLP's over depth. A lower layer sums the paths through the layers above as well (docs/verdict.md).

**rnn** (Chen, Pennington & Schoenholz 2018; the MLP's map of Poole et al. 2016 with a second input):
a_t = W_ih x_t + b_ih + W_hh h_{t−1} + b_hh, h_t = φ(a_t), h_{−1} = 0. The pre-activation variance

    q_t = σ_hh²·E[φ(√q_{t−1} z)²] + σ_ih²·p_t + σ_b²,   q_0 = σ_ih²·p_0 + σ_b²

with σ² = fan_in·mean(W²) of each matrix's own initial weights, σ_b² = mean((b_ih + b_hh)²) and p_t the
second moment of the layer's input (the image's for the first layer, E[φ²](q_t) of the layer below for
the others), and back through one step ‖∂L/∂h_{t−1}‖² = χ_t·‖∂L/∂h_t‖² with

    χ_t = σ_hh²·E[φ′(√q_t z)²].

The predicted profile multiplies χ_t along that trajectory, per quantile group of the examples' input
second moments (the map is diagonal, as for the MLP), and is fitted like the measured one. The spectral
radius ρ(W_hh) gives the linearised rate log10 ρ (exact for a linear RNN, whose Jacobian is W_hhᵀ;
Pascanu et al. 2013), and the largest singular value s bounds the rate from above: |φ′| ≤ 1 for tanh
and relu, so ‖∂L/∂h_t‖ ≤ s^{T−1−t}·‖∂L/∂h_{T−1}‖ whatever the data.

**lstm**: c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t, h_t = o_t ⊙ tanh(c_t). The cell path multiplies ∂L/∂c by the
forget gate f at every step, unit by unit. Unit j's forget-gate pre-activation is Gaussian with mean
b_f,j = b_ih,f,j + b_hh,f,j and variance ‖W_f,j‖²·p + ‖U_f,j‖²·E[h²] (mean field, the forward moments
tracked per unit), so the cell path's ‖∂L/∂c_t‖² is Σ_j w_j·Π_s E[f_{j,s}²]: a mixture over units, not
one geometric rate, when the biases differ (chrono: b_f = log U(1, T − 1), Tallec & Ollivier 2018).
The paths through h_t and the gates add a non-negative term this prediction leaves out (small at the
usual inits: the gates' derivatives are at most 1/4).

**gru**: h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t−1}; the direct path multiplies ∂L/∂h by the update gate z,
unit by unit, in the same way (the paths through n, r and z add to it, as for the LSTM).

Gaussian expectations of gates with a per-unit mean are taken on a uniform grid in z (the trapezoid
rule on an analytic, Gaussian-weighted integrand converges geometrically); the RNN's zero-mean
expectations reuse theory.gaussian_expectations (the network's own activation, panel quadrature).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from graddiag.models.spec import Spec
from graddiag.service.engine.profile import fit_log_slope
from graddiag.service.engine.report import LayerInfo, RecurrentSpectrum, TimeTheory
from graddiag.service.engine.theory import compare_rates, format_decades, gaussian_expectations

__all__ = [
    "RecurrentWeights",
    "gate_path_profile",
    "recurrent_layers",
    "rnn_profile",
    "spectra",
    "time_remedy_span",
    "time_theory_for",
]

# Per-unit Gaussian expectations use the trapezoid rule on |z| ≤ 8 (all but 1e-15 of the mass). On an
# analytic Gaussian-weighted integrand its error is about exp(−2π·d/h) for poles at distance d from the
# real axis: tanh(μ + s·z) has them at d = π/(2s), so a step h ≤ 1/(2s) keeps the error near exp(−π²) of
# the integrand's scale at worst and far below at the usual spreads (h = 1/4 for s ≤ 2: exp(−2π²)).
_Z_MAX = 8.0
_H_MAX = 0.25
# Quantile groups of the per-example input second moments (as theory._Q_GROUPS).
_Q_GROUPS = 8
# Each architecture's gate blocks of W_hh, in PyTorch's order.
GATES: dict[str, tuple[str, ...]] = {"rnn": ("h",), "lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n")}


Matrix = Tensor | np.ndarray


@dataclass(frozen=True)
class RecurrentWeights:
    """One stacked recurrent layer as initialised: W_ih (gates·H × in), b_ih, W_hh (gates·H × H), b_hh.

    The matrices are kept as given (the probe's float32 copies of the initial weights) and read one gate
    block at a time in float64, so the theory never holds a whole layer, let alone a stack, in float64:
    it stays within the few float32 copies of the largest layer that models.memory budgets for it.
    """

    index: int  # LayerInfo index of the recurrent matrix (the `…hh` layer)
    w_ih: Matrix
    b_ih: Matrix | None
    w_hh: Matrix
    b_hh: Matrix | None

    @property
    def hidden(self) -> int:
        """H, the hidden size."""
        return int(self.w_hh.shape[1])

    @property
    def gates(self) -> int:
        """How many gate blocks W_hh stacks (1 for rnn)."""
        return int(self.w_hh.shape[0]) // self.hidden

    def block(self, name: str, k: int) -> np.ndarray:
        """Gate block k (PyTorch's order) of `w_ih`, `w_hh`, `b_ih` or `b_hh`, in float64 (a missing bias: 0)."""
        value = getattr(self, name)
        h = self.hidden
        if value is None:
            return np.zeros(h)
        part = value[k * h : (k + 1) * h]
        if isinstance(part, Tensor):
            return part.detach().to(device="cpu", dtype=torch.float64).numpy()
        return np.asarray(part, dtype=np.float64)

    def sigma2(self, name: str) -> float:
        """fan_in·mean(W²) of `w_ih` or `w_hh`: the mean-field σ² (a second moment, as theory.measured_variances)."""
        total = sum(float(np.square(self.block(name, k)).sum()) for k in range(self.gates))
        rows, fan_in = getattr(self, name).shape
        return fan_in * total / max(rows * fan_in, 1)

    def bias2(self) -> float:
        """mean((b_ih + b_hh)²): the pre-activation's σ_b² (the two biases add)."""
        total = sum(float(np.square(self.block("b_ih", k) + self.block("b_hh", k)).sum()) for k in range(self.gates))
        return total / (self.gates * self.hidden)

    def finite(self) -> bool:
        """Whether every weight and bias is finite."""
        values = (self.w_ih, self.b_ih, self.w_hh, self.b_hh)
        return all(v is None or bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)


def recurrent_layers(
    layers: Sequence[LayerInfo], weights: Sequence[Tensor], biases: Sequence[Tensor | None]
) -> list[RecurrentWeights]:
    """Pair each recurrent matrix `{name}.hh` with its input projection `{name}.ih`, bottom layer first.

    `weights`/`biases` are the probe's initial weights of every non-norm layer, in the order of `layers`
    without the norm layers (probe._set_up keeps them so); they are referenced, not copied.
    """
    weighted = [layer for layer in layers if layer.kind != "norm"]
    by_name = {layer.name: i for i, layer in enumerate(weighted)}
    out = []
    for i, layer in enumerate(weighted):
        j = by_name.get(f"{layer.name.rpartition('.')[0]}.ih")
        if layer.kind == "recurrent" and j is not None:
            out.append(RecurrentWeights(layer.index, weights[j], biases[j], weights[i], biases[i]))
    return out


def spectra(arch: str, layers: Iterable[RecurrentWeights]) -> list[RecurrentSpectrum]:
    """ρ(U_k) and the largest singular value of each gate block U_k of each layer's W_hh (float64)."""
    out = []
    for layer in layers:
        for k, gate in enumerate(GATES[arch]):
            block = torch.from_numpy(np.ascontiguousarray(layer.block("w_hh", k)))
            rho = float(torch.linalg.eigvals(block).abs().max())
            top = float(torch.linalg.matrix_norm(block, ord=2))
            out.append(RecurrentSpectrum(layer=layer.index, gate=gate, spectral_radius=rho, largest_singular_value=top))
    return out


def _groups(q_inputs: Sequence[float]) -> list[tuple[float, float]]:
    """(weight, mean q) of the quantile groups of the examples' input second moments."""
    ordered = sorted(float(q) for q in q_inputs)
    n = len(ordered)
    chunks = [ordered[i * n // _Q_GROUPS : (i + 1) * n // _Q_GROUPS] for i in range(_Q_GROUPS)]
    return [(len(c) / n, statistics.fmean(c)) for c in chunks if c]


def _mix(profiles: Sequence[tuple[float, list[float]]]) -> list[float]:
    """log10 of the weighted mean of 10^(2·profile): the groups' mean squared norm, as a norm."""
    length = len(profiles[0][1])
    out = []
    for t in range(length):
        total = sum(w * 10 ** (2 * p[t]) for w, p in profiles if math.isfinite(p[t]))
        out.append(0.5 * math.log10(total) if total > 0 else -math.inf)
    return out


def rnn_profile(
    activation: str, layers: Iterable[RecurrentWeights], q_input: float, length: int
) -> tuple[list[float], list[float], list[float]]:
    """(q_t, χ_t, predicted log10 ‖∂L/∂h_t‖ up to a constant) of the top layer, t = 0 … length − 1.

    χ_t is the factor on ‖∂L/∂h‖² from step t back to t − 1 (χ_0 is not used by the profile). `layers`
    is read once, bottom first.
    """
    p = [q_input] * length
    qs: list[float] = []
    sigma_hh2 = 0.0
    for layer in layers:
        sigma_ih2, sigma_hh2 = layer.sigma2("w_ih"), layer.sigma2("w_hh")
        sigma_b2 = layer.bias2()
        qs = []
        second = 0.0  # E[φ(a_{t−1})²], 0 for h_{−1} = 0
        for t in range(length):
            q = sigma_hh2 * second + sigma_ih2 * p[t] + sigma_b2
            q = q if math.isfinite(q) else math.inf
            qs.append(q)
            second = gaussian_expectations(activation, q).second
        p = [gaussian_expectations(activation, q).second for q in qs]
    chi = [sigma_hh2 * gaussian_expectations(activation, q).slope2 for q in qs]
    profile = [0.0] * length
    for t in range(length - 2, -1, -1):
        profile[t] = profile[t + 1] + (0.5 * math.log10(chi[t + 1]) if chi[t + 1] > 0 else -math.inf)
    return qs, chi, profile


def _expect(mean: np.ndarray, std: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, (E[fn(a)], E[fn(a)²]) for a ~ N(mean, std²); fn is a sigmoid- or tanh-like analytic function."""
    step = min(_H_MAX, 1 / (2 * max(float(std.max(initial=0.0)), 1e-12)))
    z, w = _grid(math.ceil(2 * _Z_MAX / step))
    y = fn(mean[:, None] + std[:, None] * z[None, :])
    return y @ w, (y * y) @ w


@functools.lru_cache(maxsize=64)
def _grid(intervals: int) -> tuple[np.ndarray, np.ndarray]:
    """Trapezoid nodes on [−8, 8] with the standard normal density folded into the weights."""
    z = np.linspace(-_Z_MAX, _Z_MAX, intervals + 1)
    w = np.exp(-0.5 * z * z) * (z[1] - z[0]) / math.sqrt(2 * math.pi)
    return z, w


def _sigmoid(a: np.ndarray) -> np.ndarray:
    # The tanh form is exact and never overflows (1 / (1 + exp(-a)) does, harmlessly, for a < -709).
    return 0.5 * (1 + np.tanh(0.5 * a))


def _sigmoid_slope(a: np.ndarray) -> np.ndarray:
    s = _sigmoid(a)
    return s * (1 - s)


def _tanh_slope(a: np.ndarray) -> np.ndarray:
    return 1 - np.tanh(a) ** 2


@dataclass
class _Step:
    """Per-unit forward moments of one time step of the top layer (E[·] over the Gaussian pre-activations).

    Each entry of `paths` is a diagonal factor of the step's backward map as (E[x], E[x²]) per unit: the
    gate that keeps the past (`keep`: lstm f, gru z), the gates' paths into h_{t−1} (docs/verdict.md) and,
    for the lstm, h_t's path into c_t (`h_to_c`).
    """

    paths: dict[str, tuple[np.ndarray, np.ndarray]]


def _product(*factors: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(E[Πx], E[Πx²]) of independent factors (different gates' pre-activations, in mean field)."""
    mean, second = factors[0]
    for m, s2 in factors[1:]:
        mean, second = mean * m, second * s2
    return mean, second


def _sum(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Add signals (coherent parts and fluctuations) arriving by several paths."""
    m, v = parts[0]
    for m_k, v_k in parts[1:]:
        m, v = m + m_k, v + v_k
    return m, v


def _forward_gated(
    arch: str, layers: Iterable[RecurrentWeights], q_input: float, length: int
) -> tuple[list[_Step], RecurrentWeights]:
    """The top layer's per-unit moments at every step, and the top layer; `layers` is read once, bottom first."""
    p = np.full(length, q_input)
    steps: list[_Step] = []
    top: RecurrentWeights | None = None
    for layer in layers:
        top = layer
        hidden = layer.hidden
        parts = []
        for k in range(len(GATES[arch])):
            # Row norms only: each block is read in float64 and dropped.
            w2 = np.square(layer.block("w_ih", k)).sum(1)
            u2 = np.square(layer.block("w_hh", k)).sum(1)
            parts.append((w2, u2, layer.block("b_ih", k), layer.block("b_hh", k)))
        h_mean, h_second = np.zeros(hidden), np.zeros(hidden)
        c_mean, c_second = np.zeros(hidden), np.zeros(hidden)
        steps = []
        out_second = np.zeros(length)
        for t in range(length):
            p_h = float(h_second.mean())

            def moments(
                k: int, fn: Callable[[np.ndarray], np.ndarray], p_x: float = float(p[t]), p_h: float = p_h
            ) -> tuple[np.ndarray, np.ndarray]:
                wx, uh, b_i, b_h = parts[k]  # noqa: B023 -- called within this step only
                return _expect(b_i + b_h, np.sqrt(wx * p_x + uh * p_h), fn)

            if arch == "lstm":
                i, f, g, o = moments(0, _sigmoid), moments(1, _sigmoid), moments(2, np.tanh), moments(3, _sigmoid)
                c_before = (c_mean, c_second)
                c_second = f[1] * c_second + i[1] * g[1] + 2 * f[0] * c_mean * i[0] * g[0]
                c_mean = f[0] * c_mean + i[0] * g[0]
                c_std = np.sqrt(np.maximum(c_second - c_mean * c_mean, 0.0))
                tanh_c = _expect(c_mean, c_std, np.tanh)
                h_second = o[1] * tanh_c[1]
                paths = {
                    "keep": f,
                    # ∂L/∂a_f = ∂L/∂c_t ⊙ c_{t−1} ⊙ σ′(a_f), ∂L/∂a_i = ∂L/∂c_t ⊙ g ⊙ σ′(a_i),
                    # ∂L/∂a_g = ∂L/∂c_t ⊙ i ⊙ tanh′(a_g), ∂L/∂a_o = ∂L/∂h_t ⊙ tanh(c_t) ⊙ σ′(a_o).
                    "f": _product(c_before, moments(1, _sigmoid_slope)),
                    "i": _product(g, moments(0, _sigmoid_slope)),
                    "g": _product(i, moments(2, _tanh_slope)),
                    "o": _product(tanh_c, moments(3, _sigmoid_slope)),
                    # ∂L/∂c_t gains ∂L/∂h_t ⊙ o_t ⊙ tanh′(c_t).
                    "h_to_c": _product(o, _expect(c_mean, c_std, _tanh_slope)),
                }
            else:
                r, z = moments(0, _sigmoid), moments(1, _sigmoid)
                wx, uh, b_in, b_hn = parts[2]
                # a_n = W_n x + b_in + r ⊙ (U_n h + b_hn): mean b_in + E[r]·b_hn, and the variance of each part.
                n_mean = b_in + r[0] * b_hn
                n_std = np.sqrt(np.maximum(wx * float(p[t]) + r[1] * uh * p_h + b_hn * b_hn * (r[1] - r[0] ** 2), 0.0))
                n = _expect(n_mean, n_std, np.tanh)
                n_slope = _expect(n_mean, n_std, _tanh_slope)
                one_minus_z = (1 - z[0], 1 - 2 * z[0] + z[1])
                gap = (h_mean - n[0], h_second - 2 * h_mean * n[0] + n[1])  # h_{t−1} − n_t
                paths = {
                    "keep": z,
                    # ∂L/∂a_z = ∂L/∂h_t ⊙ (h_{t−1} − n) ⊙ σ′(a_z); ∂L/∂(U_n h) = ∂L/∂h_t ⊙ (1 − z) ⊙ tanh′(a_n) ⊙ r;
                    # ∂L/∂a_r = ∂L/∂h_t ⊙ (1 − z) ⊙ tanh′(a_n) ⊙ (U_n h + b_hn) ⊙ σ′(a_r).
                    "z": _product(gap, moments(1, _sigmoid_slope)),
                    "n": _product(one_minus_z, n_slope, r),
                    "r": _product(one_minus_z, n_slope, (b_hn, uh * p_h + b_hn * b_hn), moments(0, _sigmoid_slope)),
                }
                h_second = one_minus_z[1] * n[1] + z[1] * h_second + 2 * (z[0] - z[1]) * n[0] * h_mean
                h_mean = one_minus_z[0] * n[0] + z[0] * h_mean
            steps.append(_Step(paths))
            out_second[t] = float(h_second.mean())
        p = out_second
    if top is None:
        raise ValueError("a recurrent stack needs at least one layer")
    return steps, top


# Directions the coherent part of the backward signal is followed along (fixed: the prediction is repeatable).
_PROBES = 16


def gate_path_profile(
    arch: str, layers: Iterable[RecurrentWeights], q_input: float, length: int
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(E[gate], E[gate²] per step, predicted log10 ‖∂L/∂h_t‖, predicted log10 ‖∂L/∂c_t‖) of the top layer.

    The gate is the one that keeps the past (lstm: forget gate f, gru: update gate z). Back through one
    step the signal is J_tᵀ δ: diagonal factors (the gate, the gates' paths) around the same recurrent
    blocks U_k at every step. Because U_k is the same matrix each time, the paths through it add
    coherently with the gate's own path, so the mean field's sum of squares (which treats each step's
    matrix as fresh) does not describe it. The signal is split into its coherent part, carried exactly
    by the mean Jacobian E[J_t]ᵀ (the diagonal factors at their means, the actual U_k) along fixed random
    directions, and the per-unit fluctuation the diagonal factors' variances inject, carried by the mean
    field (docs/verdict.md):

    lstm: δh_t = Σ_k U_kᵀ (p_k ⊙ δ_k,t+1) with δ = δc for the gates f, i, g and δh for o;
          δc_t = f_{t+1} ⊙ δc_{t+1} + (o_t ⊙ tanh′(c_t)) ⊙ δh_t;
    gru:  δh_t = z_{t+1} ⊙ δh_{t+1} + Σ_k U_kᵀ (p_k ⊙ δh_{t+1}) over k = z, n, r,

    from a random δh at the last step (the classifier's gradient). For the gru the cell profile is −∞.
    """
    steps, top = _forward_gated(arch, layers, q_input, length)
    # The top layer's W_hh in float64 (about two float32 copies of it) and U² in float32 (one more): the
    # fluctuation's weights, where float32's 1e-7 is far below the mean field's own error.
    # Both are stored transposed and contiguous (Uᵀ·x on a transposed view is ~3× slower), as torch tensors:
    # torch's matmul keeps to the caller's thread count (the probe's one thread), numpy's BLAS would not
    # (on 2 busy cores its threads made this 3× slower).
    blocks = {}
    for k, gate in enumerate(GATES[arch]):
        u_t = torch.from_numpy(np.ascontiguousarray(top.block("w_hh", k).T))
        blocks[gate] = (u_t, u_t.square().float())
    hidden = top.hidden
    rng = np.random.default_rng(0)
    m_h = rng.standard_normal((hidden, _PROBES)) / math.sqrt(_PROBES)
    v_h = np.zeros(hidden)  # per unit, the fluctuation's second moment (per probe direction)
    zero = np.zeros((hidden, _PROBES))
    m_c, v_c = zero, np.zeros(hidden)
    if arch == "lstm":
        m_c, v_c = _through(steps[-1].paths["h_to_c"], m_h, v_h)

    def log_norm(m: np.ndarray, v: np.ndarray) -> float:
        total = float((m * m).sum()) + float(v.sum())
        return 0.5 * math.log10(total) if total > 0 else -math.inf

    h_profile, c_profile = [0.0] * length, [0.0] * length
    h_profile[-1], c_profile[-1] = log_norm(m_h, v_h), log_norm(m_c, v_c)
    for t in range(length - 2, -1, -1):
        after = steps[t + 1].paths
        if arch == "lstm":
            gated = {k: (m_h, v_h) if k == "o" else (m_c, v_c) for k in ("i", "f", "g", "o")}
            m_h, v_h = _sum([_through_matrix(blocks[k], after[k], *gated[k]) for k in gated])
            m_c, v_c = _sum([_through(after["keep"], m_c, v_c), _through(steps[t].paths["h_to_c"], m_h, v_h)])
        else:
            paths = [_through(after["keep"], m_h, v_h)]
            paths += [_through_matrix(blocks[k], after[k], m_h, v_h) for k in ("z", "n", "r")]
            m_h, v_h = _sum(paths)
        h_profile[t], c_profile[t] = log_norm(m_h, v_h), log_norm(m_c, v_c)
    keep = [s.paths["keep"] for s in steps]
    return [float(k[0].mean()) for k in keep], [float(k[1].mean()) for k in keep], h_profile, c_profile


def _through(factor: tuple[np.ndarray, np.ndarray], m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A diagonal factor x applied to the signal: the coherent part by E[x], and the fluctuation
    E[x²]·v + Var[x]·E[m²] (the factor's own variance turns coherent signal into fluctuation)."""
    mean, second = factor
    variance = np.maximum(second - mean * mean, 0.0)
    return mean[:, None] * m, second * v + variance * (m * m).sum(1)


def _through_matrix(
    block: tuple[Tensor, Tensor], factor: tuple[np.ndarray, np.ndarray], m: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Uᵀ(x ⊙ δ): the coherent part exactly, the fluctuation by the mean field's (U²)ᵀ (`block` = (Uᵀ, (U²)ᵀ))."""
    m_x, v_x = _through(factor, m, v)
    coherent = block[0] @ torch.from_numpy(m_x)
    fluctuation = block[1] @ torch.from_numpy(v_x.astype(np.float32))
    return coherent.numpy(), fluctuation.double().numpy()


def _identity_like(layer: RecurrentWeights) -> bool:
    """W_hh is a multiple of the identity (init='identity'): the Gaussian mean field does not describe it."""
    w = layer.block("w_hh", 0)
    diagonal = np.diag(w)
    return bool(np.allclose(w, np.diag(diagonal)) and np.allclose(diagonal, diagonal[0]) and diagonal[0] != 0)


def time_theory_for(
    spec: Spec,
    layers: Sequence[LayerInfo],
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    *,
    q_input: float | Sequence[float] | None,
    length: int,
    measured_decades_per_step: float | None,
    measured_cell_decades_per_step: float | None = None,
    tolerance: float = 0.05,
    relative_tolerance: float = 0.10,
) -> TimeTheory | None:
    """The through-time prediction for a recurrent probe (None for other architectures).

    rnn: the mean-field rate of ‖∂L/∂h_t‖ and the spectral one; lstm: the cell path's rate of ‖∂L/∂c_t‖
    (compared with `measured_cell_decades_per_step`); gru: the update-gate path's rate of ‖∂L/∂h_t‖.
    They agree within max(tolerance, relative_tolerance·|predicted|) decades per step, the depth theory's
    standard. `length` is the sequence's number of time steps.
    """
    if spec.arch not in GATES:
        return None
    stack = recurrent_layers(layers, weights, biases)
    if not stack:
        return TimeTheory(applicable=False, reason="The network has no recurrent layer to predict.")
    top = stack[-1]
    spectrum = spectra(spec.arch, stack)
    top_spectrum = [s for s in spectrum if s.layer == top.index]
    finite = all(layer.finite() for layer in stack)
    common = {"layer": top.index, "spectra": spectrum}
    if spec.arch == "rnn":
        rho = top_spectrum[0].spectral_radius
        common |= {
            "spectral_radius": rho,
            "spectral_decades_per_step": math.log10(rho) if rho > 0 else None,
            "bound_decades_per_step": math.log10(top_spectrum[0].largest_singular_value)
            if top_spectrum[0].largest_singular_value > 0
            else None,
        }
    if q_input is None:
        return TimeTheory(
            applicable=False,
            reason="The input's second moment was not measured, so the forward signal cannot be started.",
            **common,
        )
    if not finite:
        return TimeTheory(
            applicable=False, reason="The initial weights are not finite, so their variances are undefined.", **common
        )
    q_values = [float(q_input)] if isinstance(q_input, float | int) else list(q_input)
    groups = _groups(q_values)
    q_mean = statistics.fmean(q_values)

    if any(_identity_like(layer) for layer in stack):
        if spec.arch == "rnn":
            why = (
                "The identity recurrent matrix (IRNN) is not covered by mean field: each unit feeds only itself, "
                "so its derivative φ′(a_t) is correlated across time instead of drawn afresh at every step. "
                f"Its spectral radius {rho:.3g} gives the linearised rate {format_decades(math.log10(rho))} decades "
                "per step (exact where φ′ = 1)."
            )
        else:
            why = (
                f"Identity recurrent blocks are not covered for the {spec.arch}: each unit's gates read only its own "
                "state, so a unit's gates, its state and its cell are correlated, where the theory here takes "
                "different gates' pre-activations as independent."
            )
        return TimeTheory(applicable=False, reason=why, **common)
    if spec.arch == "rnn":
        runs = [(w, rnn_profile(spec.activation, stack, q, length)) for w, q in groups]
        profile = _mix([(w, run[2]) for w, run in runs])
        middle = runs[len(runs) // 2][1]
        chi_values = [c for c in middle[1][1:] if c > 0 and math.isfinite(c)]
        chi = math.exp(statistics.fmean(math.log(c) for c in chi_values)) if chi_values else None
        model, measured, described = "rnn", measured_decades_per_step, "the q-map through time, χ = σ_hh²·E[φ′²]"
        extra = {"q_star": middle[0][-1] if math.isfinite(middle[0][-1]) else None, "chi": chi}
        statistic = "‖∂L/∂h_t‖"
    else:
        runs_gate = [(w, gate_path_profile(spec.arch, stack, q, length)) for w, q in groups]
        column = 3 if spec.arch == "lstm" else 2
        profile = _mix([(w, run[column]) for w, run in runs_gate])
        middle_gate = runs_gate[len(runs_gate) // 2][1]
        gate_name = "forget gate f" if spec.arch == "lstm" else "update gate z"
        model = "lstm_cell" if spec.arch == "lstm" else "gru_update"
        measured = measured_cell_decades_per_step if spec.arch == "lstm" else measured_decades_per_step
        described = f"the {gate_name} and the gates' paths, unit by unit"
        extra = {"gate_mean": statistics.fmean(middle_gate[0]), "chi": statistics.fmean(middle_gate[1])}
        statistic = "‖∂L/∂c_t‖" if spec.arch == "lstm" else "‖∂L/∂h_t‖"

    predicted = fit_log_slope(profile)
    agrees: bool | None = None
    allowed: float | None = None
    if predicted is None or not math.isfinite(predicted):
        sentence = f"Mean-field theory through time ({described}) predicts no finite rate."
    else:
        sentence = (
            f"Through time, mean-field theory ({described}, from the measured input q = {q_mean:#.3g}) predicts "
            f"{format_decades(predicted)} decades per step for {statistic} "
            f"({format_decades(predicted * (length - 1))} across the {length} steps)"
        )
        clause, allowed, agrees = compare_rates(predicted, measured, tolerance, relative_tolerance)
        sentence += clause
    return TimeTheory(
        applicable=True,
        reason=sentence,
        model=model,
        q_input=q_mean,
        predicted_decades_per_step=predicted,
        measured_decades_per_step=measured,
        tolerance=allowed,
        agrees=agrees,
        **extra,
        **common,
    )


def time_remedy_span(
    arch: str,
    remedy: str,
    *,
    width: int,
    depth: int,
    input_features: int,
    q_input: float,
    length: int,
    activation: str = "tanh",
    seed: int = 0,
) -> float | None:
    """Predicted change of the top layer's log10 ‖∂L/∂h_t‖ across the sequence under a remedy, or None.

    The remedy's network is drawn as graddiag initialises it (PyTorch's recurrent init U(±1/√H) for
    every weight and bias unless the remedy says otherwise) and predicted with the same theory:
    ``lstm`` / ``lstm_forget1`` / ``lstm_chrono`` (the cell path with PyTorch's forget bias, 1, or chrono),
    ``gru`` (the update-gate path), ``rnn_orthogonal`` (W_hh orthogonal, gain 1, zero biases: σ_hh² = 1).
    """
    target = {"lstm": "lstm", "lstm_forget1": "lstm", "lstm_chrono": "lstm", "gru": "gru", "rnn_orthogonal": "rnn"}
    cell = target.get(remedy)
    if cell is None:
        return None
    # Drawn a layer at a time as the theory reads them, so a deep, wide remedy never sits in memory whole.
    stack = _draw_stack(cell, remedy, width=width, depth=depth, input_features=input_features, length=length, seed=seed)
    if cell == "rnn":
        profile = rnn_profile(activation, stack, q_input, length)[2]
    else:
        # ‖∂L/∂h_t‖, the statistic the label judges (for the lstm too: its cell path is theory.time's).
        profile = gate_path_profile(cell, stack, q_input, length)[2]
    slope = fit_log_slope(profile)
    return None if slope is None or not math.isfinite(slope) else slope * (length - 1)


def _draw_stack(
    cell: str, remedy: str, *, width: int, depth: int, input_features: int, length: int, seed: int
) -> Iterator[RecurrentWeights]:
    """The remedy's layers, bottom first, as time_remedy_span describes them."""
    generator = torch.Generator().manual_seed(seed)
    gates = len(GATES[cell])
    bound = width**-0.5
    for layer in range(depth):
        fan_in = input_features if layer == 0 else width
        draws = [
            torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
            for shape in ((gates * width, fan_in), (gates * width,), (gates * width, width), (gates * width,))
        ]
        w_ih, b_ih, w_hh, b_hh = (d.numpy() for d in draws)
        if remedy == "rnn_orthogonal":
            square = torch.empty(width, width, dtype=torch.float64)
            w_hh = torch.nn.init.orthogonal_(square, generator=generator).numpy()
            b_ih, b_hh = np.zeros_like(b_ih), np.zeros_like(b_hh)
        elif remedy == "lstm_forget1":
            b_ih[width : 2 * width], b_hh[width : 2 * width] = 1.0, 0.0
        elif remedy == "lstm_chrono":
            uniform = torch.empty(width, dtype=torch.float64).uniform_(1.0, length - 1, generator=generator)
            drawn = np.log(uniform.numpy())
            b_ih[width : 2 * width], b_ih[:width] = drawn, -drawn
            b_hh[:width], b_hh[width : 2 * width] = 0.0, 0.0
        yield RecurrentWeights(index=layer, w_ih=w_ih, b_ih=b_ih, w_hh=w_hh, b_hh=b_hh)
