"""The verdict and the theory through time of recurrent nets (rnn, gru, lstm).

The theory's per-step rates are checked against plain PyTorch cells (nn.RNNCell, nn.LSTMCell, nn.GRUCell
unrolled by hand, ‖∂L/∂h_t‖ by torch.autograd.grad), sharing nothing with graddiag's networks or
recorder; the verdict's rules on time records made by hand; the probe end to end on synthetic data.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from graddiag.models.spec import Spec
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.profile import fit_log_slope
from graddiag.service.engine.report import Evidence, LayerInfo, TimeRecord
from graddiag.service.engine.theory_time import (
    RecurrentWeights,
    gate_path_profile,
    rnn_profile,
    spectra,
    time_remedy_span,
)
from graddiag.service.engine.verdict import GATE_SATURATED_LOW, SPAN_DECADES, decide, measure

HIDDEN, STEPS, BATCH, FEATURES = 32, 32, 128, 96
# Mean field holds in the wide limit; at 32 units one draw's rate sits within a few hundredths of it.
WIDTH_32_TOLERANCE = 0.05


def _plain_profiles(cell: nn.Module, seed: int = 0) -> tuple[list[float], list[float], float]:
    """log10 ‖∂L/∂h_t‖ and (LSTM) ‖∂L/∂c_t‖ over t for unit-variance inputs, by autograd through the cell,
    and (LSTM) the forget gate's mean over the batch, units and steps."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, STEPS, FEATURES, dtype=torch.float64, generator=generator)
    hidden = cell.hidden_size
    h = torch.zeros(BATCH, hidden, dtype=torch.float64)
    c = torch.zeros_like(h)
    hs, cs, forget = [], [], []
    for t in range(STEPS):
        if isinstance(cell, nn.LSTMCell):
            with torch.no_grad():
                pre = x[:, t] @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
                forget.append(float(torch.sigmoid(pre[:, hidden : 2 * hidden]).mean()))
            h, c = cell(x[:, t], (h, c))
            cs.append(c)
        else:
            h = cell(x[:, t], h)
        hs.append(h)
    readout = torch.randn(hidden, 10, dtype=torch.float64, generator=generator) / hidden**0.5
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    loss = nn.functional.cross_entropy(hs[-1] @ readout, labels)
    grads = torch.autograd.grad(loss, hs + cs)
    logs = [math.log10(float(g.norm())) for g in grads]
    return logs[:STEPS], logs[STEPS:], float(np.mean(forget)) if forget else math.nan


def _weights(cell: nn.Module) -> RecurrentWeights:
    def array(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy()

    return RecurrentWeights(0, array(cell.weight_ih), array(cell.bias_ih), array(cell.weight_hh), array(cell.bias_hh))


def _cell(kind: str, seed: int, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    factory = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[kind]
    return factory(FEATURES, HIDDEN, **kwargs).double()


def test_a_linear_rnn_with_an_orthogonal_matrix_changes_by_log10_gain_per_step() -> None:
    # h_t = W_ih x_t + g·Q h_{t−1}: ∂L/∂h_{t−1} = g·Qᵀ ∂L/∂h_t exactly, log10 g decades per step.
    for gain in (0.8, 1.0, 1.25):
        q, _ = torch.linalg.qr(
            torch.randn(HIDDEN, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        )
        h = torch.zeros(4, HIDDEN, dtype=torch.float64)
        x = torch.randn(4, STEPS, HIDDEN, dtype=torch.float64, requires_grad=True)
        hs = []
        for t in range(STEPS):
            h = x[:, t] + gain * h @ q.T
            hs.append(h)
        grads = torch.autograd.grad(hs[-1].square().sum(), hs)
        measured = fit_log_slope([math.log10(float(g.norm())) for g in grads])
        # graddiag's spectral prediction log10 ρ(W_hh) is exact for a linear RNN.
        matrix = (gain * q).numpy()
        weights = RecurrentWeights(0, np.eye(HIDDEN), np.zeros(HIDDEN), matrix, np.zeros(HIDDEN))
        (spectrum,) = spectra("rnn", [weights])
        assert measured == pytest.approx(math.log10(spectrum.spectral_radius), abs=1e-9)
        assert spectrum.largest_singular_value == pytest.approx(gain)


@pytest.mark.parametrize("gain", [0.8, 1.0, 1.5, 3.0])
def test_the_tanh_rnn_rate_is_the_mean_field_chi_through_time(gain: float) -> None:
    cell = _cell("rnn", seed=2, nonlinearity="tanh")
    nn.init.orthogonal_(cell.weight_hh, gain=gain)
    nn.init.zeros_(cell.bias_hh)
    nn.init.zeros_(cell.bias_ih)
    h_profile, _, _ = _plain_profiles(cell)
    predicted = fit_log_slope(rnn_profile("tanh", [_weights(cell)], 1.0, STEPS)[2])
    assert predicted is not None
    assert fit_log_slope(h_profile) == pytest.approx(predicted, abs=WIDTH_32_TOLERANCE)
    # tanh′ ≤ 1 with E[φ′²] < 1 away from q = 0: always below the linear rate log10 g.
    assert predicted < math.log10(gain)


@pytest.mark.parametrize("forget_bias", [None, 1.0, "chrono"])
def test_the_lstm_cell_path_rate_matches_autograd(forget_bias: float | str | None) -> None:
    cell = _cell("lstm", seed=3)
    with torch.no_grad():
        gate_i, gate_f = slice(0, HIDDEN), slice(HIDDEN, 2 * HIDDEN)
        if forget_bias == "chrono":
            drawn = torch.empty(HIDDEN, dtype=torch.float64).uniform_(1.0, STEPS - 1).log()
            cell.bias_ih[gate_f], cell.bias_ih[gate_i] = drawn, -drawn
            cell.bias_hh[gate_f], cell.bias_hh[gate_i] = 0.0, 0.0
        elif forget_bias is not None:
            cell.bias_ih[gate_f], cell.bias_hh[gate_f] = forget_bias, 0.0
    h_profile, c_profile, forget_mean = _plain_profiles(cell)
    gate_mean, _, h_predicted, c_predicted = gate_path_profile("lstm", [_weights(cell)], 1.0, STEPS)
    assert fit_log_slope(c_profile) == pytest.approx(fit_log_slope(c_predicted), abs=WIDTH_32_TOLERANCE)
    assert fit_log_slope(h_profile) == pytest.approx(fit_log_slope(h_predicted), abs=WIDTH_32_TOLERANCE)
    # The forward half: E[f] over the Gaussian pre-activations against the forget gates the cell computed.
    assert np.mean(gate_mean) == pytest.approx(forget_mean, abs=0.01)


def test_the_gru_update_path_rate_matches_autograd() -> None:
    cell = _cell("gru", seed=4)
    h_profile, _, _ = _plain_profiles(cell)
    _, _, h_predicted, _ = gate_path_profile("gru", [_weights(cell)], 1.0, STEPS)
    assert fit_log_slope(h_profile) == pytest.approx(fit_log_slope(h_predicted), abs=WIDTH_32_TOLERANCE)


def test_chrono_keeps_more_of_the_gradient_than_forget_bias_one_than_pytorchs_default() -> None:
    spans = [
        time_remedy_span("lstm", remedy, width=64, depth=1, input_features=FEATURES, q_input=1.0, length=STEPS)
        for remedy in ("lstm", "lstm_forget1", "lstm_chrono")
    ]
    assert all(s is not None for s in spans)
    assert spans[0] < spans[1] < spans[2] < 0  # type: ignore[operator]


# --- the verdict's rules on hand-made time records -------------------------------------------


def _layers() -> list[LayerInfo]:
    names = [("rnn1.ih", "linear"), ("rnn1.hh", "recurrent"), ("output.linear", "linear")]
    return [LayerInfo(index=i, name=n, kind=k, params=10) for i, (n, k) in enumerate(names)]  # type: ignore[arg-type]


def _records(per_step: float, *, step: int = 0, gate: float | None = None, saturated: float | None = None):
    """The top layer's records at `step`, changing by `per_step` decades per step toward t = 0."""
    return [
        TimeRecord(
            step=step,
            layer=1,
            t=t,
            grad_norm=10 ** (per_step * (STEPS - 1 - t)),
            gate_mean=gate,
            saturation_frac=saturated,
        )
        for t in range(STEPS)
    ]


def _judge(spec: Spec, time_records: list[TimeRecord]):
    layers = _layers()
    evidence = measure(layers, [], [], time_records=time_records)
    return decide(spec, evidence, None, layers=layers, time_records=time_records)


@pytest.mark.parametrize(
    ("per_step", "expected"), [(-0.1, "vanishing"), (-0.05, "healthy"), (0.05, "healthy"), (0.1, "exploding")]
)
def test_the_two_decade_rule_decides_through_time(per_step: float, expected: str) -> None:
    # Records falling `per_step` decades per step toward t = 0: the span is per_step × 31 (±3.1 or ±1.55).
    verdict = _judge(Spec(arch="rnn", width=32, depth=1), _records(per_step))
    e = verdict.evidence
    assert e.time_layer == 1
    assert e.time_decades_per_step == pytest.approx(per_step)
    assert e.time_span_decades == pytest.approx(per_step * (STEPS - 1))
    assert verdict.label == expected
    through = [f for f in verdict.findings if f.kind == "gradient_through_time"]
    assert bool(through) == (abs(per_step * (STEPS - 1)) >= SPAN_DECADES)
    for finding in through:
        assert finding.layers == [1] and finding.severity == "critical"
        assert finding.evidence["time_span_decades"] == pytest.approx(per_step * (STEPS - 1))


def test_an_exploding_profile_through_time_advises_clipping_only_without_clipping() -> None:
    unclipped = _judge(Spec(arch="rnn", width=32, depth=1), _records(0.1))
    clipped = _judge(Spec(arch="rnn", width=32, depth=1, clip_value=1.0), _records(0.1))
    assert unclipped.label == clipped.label == "exploding"
    assert any("Clip the gradient norm" in a for a in unclipped.advice)
    assert not any("Clip the gradient norm" in a for a in clipped.advice)


def test_the_trained_profile_is_the_last_recorded_step() -> None:
    records = _records(0.0) + _records(-0.1, step=5)  # flat at init, vanishing 3.1 decades at step 5
    verdict = _judge(Spec(arch="rnn", width=32, depth=1), records)
    assert verdict.at_init == "healthy" and verdict.trained == "vanishing" and verdict.label == "vanishing"
    assert verdict.evidence.time_span_decades_trained == pytest.approx(-0.1 * (STEPS - 1))


def test_gate_saturation_needs_saturated_gates() -> None:
    spec = Spec(arch="lstm", width=32, depth=1)
    calm = _judge(spec, _records(0.0, gate=0.5, saturated=0.01))
    assert not any(f.kind == "gate_saturation" for f in calm.findings)
    some = _judge(spec, _records(0.0, gate=0.5, saturated=0.2))
    (finding,) = [f for f in some.findings if f.kind == "gate_saturation"]
    assert finding.severity == "info" and not finding.advice
    stuck = _judge(spec, _records(0.0, gate=0.995, saturated=0.9))
    (finding,) = [f for f in stuck.findings if f.kind == "gate_saturation"]
    assert finding.severity == "warning" and finding.advice
    # σ′ = σ(1 − σ) is 5 % of its maximum 1/4 at the threshold.
    assert pytest.approx(0.05 * 0.25) == GATE_SATURATED_LOW * (1 - GATE_SATURATED_LOW)


def test_no_time_evidence_without_time_records() -> None:
    layers = _layers()
    evidence = measure(layers, [], [])
    assert evidence == Evidence()
    verdict = decide(Spec(arch="rnn", width=32, depth=1), evidence, None, layers=layers)
    assert not {f.kind for f in verdict.findings} & {"gradient_through_time", "gate_saturation", "recurrent_spectrum"}


# --- the probe end to end --------------------------------------------------------------------


def _probe(**fields: object):
    base: dict[str, object] = dict(dataset="synthetic", depth=1, width=32, steps=1, batch_size=64, record_every=1)
    base.update(fields)
    return run_probe(Spec.model_validate(base), eval_samples=16)


@pytest.mark.parametrize(
    ("fields", "label"),
    [
        (dict(arch="rnn"), "vanishing"),  # PyTorch's U(±1/√H): σ_hh² = 1/3, about −0.29 decades per step
        (dict(arch="rnn", init="orthogonal", bias_init="zeros", init_gain=1.5), "healthy"),
        (dict(arch="lstm", forget_bias="chrono"), "healthy"),
        (dict(arch="gru"), "vanishing"),
    ],
)
def test_the_probe_judges_through_time_and_the_theory_agrees(fields: dict[str, object], label: str) -> None:
    report = _probe(**fields)
    verdict = report.verdict
    time = verdict.theory.time
    assert time is not None and time.applicable and time.agrees, time
    assert verdict.label == label
    e = verdict.evidence
    recurrent = [layer.index for layer in report.layers if layer.kind == "recurrent"]
    assert e.time_layer == recurrent[-1]
    assert (abs(e.time_span_decades or 0) >= SPAN_DECADES) == (label != "healthy")
    spectrum = [f for f in verdict.findings if f.kind == "recurrent_spectrum"]
    assert len(spectrum) == 1
    if fields["arch"] == "lstm":
        assert e.cell_decades_per_step is not None
        assert time.measured_decades_per_step == e.cell_decades_per_step
    for advice in verdict.advice:
        assert advice.endswith("]")


def test_a_contracting_recurrent_matrix_guarantees_vanishing_by_its_singular_values() -> None:
    # Orthogonal W_hh of gain 0.8: every singular value is 0.8, so |tanh′| ≤ 1 bounds the change across the
    # 32 steps by 31·log10 0.8 = −3.0 decades whatever the data (Pascanu et al. 2013).
    report = _probe(arch="rnn", init="orthogonal", init_gain=0.8, bias_init="zeros")
    (spectrum,) = [f for f in report.verdict.findings if f.kind == "recurrent_spectrum"]
    assert spectrum.severity == "warning"
    assert spectrum.evidence["bound_decades_per_step"] == pytest.approx(math.log10(0.8), abs=1e-6)
    assert report.verdict.label == "vanishing"
    assert (report.verdict.evidence.time_span_decades or 0) <= (STEPS - 1) * math.log10(0.8)


def test_the_singular_value_bound_holds_for_a_probed_rnn() -> None:
    report = _probe(arch="rnn", depth=2)
    time = report.verdict.theory.time
    assert time is not None and time.bound_decades_per_step is not None
    top = [r for r in report.time_records if r.step == 0 and r.layer == time.layer]
    first, last = top[0].grad_norm, top[-1].grad_norm
    assert first is not None and last is not None
    # |tanh′| ≤ 1, so ‖∂L/∂h_0‖ ≤ s^31·‖∂L/∂h_31‖ (Pascanu et al. 2013).
    assert math.log10(first / last) <= time.bound_decades_per_step * (STEPS - 1) + 1e-9


@pytest.mark.parametrize("arch", ["rnn", "lstm"])
def test_identity_init_is_not_covered_and_says_why(arch: str) -> None:
    activation = "relu" if arch == "rnn" else "tanh"
    report = _probe(arch=arch, activation=activation, init="identity", bias_init="zeros")
    time = report.verdict.theory.time
    assert time is not None and not time.applicable and time.agrees is None
    assert "dentity" in time.reason
    if arch == "rnn":
        assert time.spectral_radius == pytest.approx(1.0)
    else:
        assert [s.spectral_radius for s in time.spectra] == pytest.approx([1.0] * 4)


def test_remedies_through_time_are_advised_only_where_predicted_within_two_decades() -> None:
    report = _probe(arch="rnn")
    time = report.verdict.theory.time
    assert time is not None and time.q_input is not None
    texts = {
        "rnn_orthogonal": "init=orthogonal",
        "gru": "arch=gru",
        "lstm_forget1": "forget_bias=1",
        "lstm_chrono": "forget_bias=chrono",
    }
    advice = [a for a in report.verdict.advice if a.endswith("[gradient_through_time]")]
    for remedy, text in texts.items():
        span = time_remedy_span(
            "rnn", remedy, width=32, depth=1, input_features=FEATURES, q_input=time.q_input, length=STEPS, seed=0
        )
        assert span is not None
        advised = [a for a in advice if text in a]
        assert bool(advised) == (abs(span) < SPAN_DECADES), (remedy, span, advice)
        for item in advised:
            assert f"predicted {span:+.2f} decades" in item
    # At this width chrono is the one that keeps the gradient within 2 decades (Tallec & Ollivier 2018).
    assert any("forget_bias=chrono" in a for a in advice)
