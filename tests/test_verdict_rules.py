"""The verdict's rules one by one, on evidence made by hand, and the honest-record guarantees of the probe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from graddiag.models.networks import build_network
from graddiag.models.spec import Spec
from graddiag.service.engine.data import make_source
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.report import Evidence, LayerInfo, LayerRecord
from graddiag.service.engine.theory import span_noise_decades
from graddiag.service.engine.verdict import MIN_INTERIOR_LAYERS, NOISE_Z, SPAN_DECADES, decide, fit_slope, measure


def tiny(**fields: object) -> Spec:
    base: dict[str, object] = dict(dataset="synthetic", depth=6, width=32, steps=3, batch_size=16, record_every=1)
    base.update(fields)
    return Spec.model_validate(base)


def _profile(values: list[float], *, kind: str = "linear") -> tuple[list[LayerInfo], list[LayerRecord]]:
    """Layers input, hidden…, output with the given ‖∂L/∂h‖ and ‖∂L/∂W‖ at step 0 (interior = values)."""
    full = [values[0], *values, values[-1]]
    layers = [LayerInfo(index=i, name=f"l{i}", kind=kind, params=100) for i in range(len(full))]  # type: ignore[arg-type]
    records = [
        LayerRecord(
            step=0,
            layer=i,
            grad_norm=v,
            bias_grad_norm=None,
            weight_norm=1.0,
            rel_grad=v,
            update_ratio=None,
            act_grad_norm=v,
            zero_grad_frac=0.0,
            saturation_frac=None,
        )
        for i, v in enumerate(full)
    ]
    return layers, records


def _verdict(spec: Spec, values: list[float]):
    layers, records = _profile(values)
    evidence = measure(layers, records, [])
    return decide(spec, evidence, None, layers=layers, records=records)


def test_a_gentle_slope_over_many_layers_is_judged_by_its_total_change() -> None:
    # 0.05 decades per layer is "gentle", but over 60 interior layers it is a 3-decade gap.
    values = [10 ** (-0.05 * (60 - i)) * 1e-2 for i in range(60)]
    verdict = _verdict(Spec(depth=61, width=1024, init="orthogonal", activation="identity"), values)
    assert verdict.evidence.act_span_decades == pytest.approx(-0.05 * 59)
    assert verdict.label == "vanishing"
    assert any(f.kind == "gradient_profile" for f in verdict.findings)


def test_the_threshold_is_two_decades_plus_the_finite_width_allowance() -> None:
    spec = Spec(depth=21, width=16, activation="relu")  # narrow: a large allowance
    allowance = NOISE_Z * span_noise_decades("relu", [1.0] * 19, 16)
    assert allowance > 0.5
    inside = SPAN_DECADES + allowance - 0.05
    outside = SPAN_DECADES + allowance + 0.05
    for span, expected in ((inside, "healthy"), (outside, "vanishing")):
        values = [10 ** (-span * (19 - i) / 19) * 1e-2 for i in range(20)]
        verdict = _verdict(spec, values)
        assert verdict.evidence.noise_decades == pytest.approx(allowance)
        assert verdict.label == expected, (span, verdict.reasons)


def test_two_interior_layers_are_too_few_for_a_trend() -> None:
    assert MIN_INTERIOR_LAYERS == 3
    verdict = _verdict(Spec(depth=3, width=1024), [1e-6, 1e-1])  # 5 decades between two layers
    assert verdict.label == "healthy"


def test_relative_gradient_ceiling_and_floor() -> None:
    flat_huge = _verdict(Spec(depth=6, width=1024), [50.0] * 5)
    assert flat_huge.label == "exploding"
    assert [f.kind for f in flat_huge.findings if f.severity == "critical"] == ["gradient_scale"]
    flat_tiny = _verdict(Spec(depth=6, width=1024), [1e-7] * 5)
    assert flat_tiny.label == "vanishing"


def test_fit_slope_is_least_squares_in_decades_toward_the_input() -> None:
    assert fit_slope([1e-3, 1e-2, 1e-1]) == pytest.approx(-1.0)
    assert fit_slope([1.0, None, 1e-2]) == pytest.approx(1.0)
    assert fit_slope([1.0]) is None


# --- the probe's records ----------------------------------------------------------------------


def test_a_nonfinite_step_between_records_carries_its_own_values_or_null() -> None:
    # A relu net at 3× the Kaiming scale and lr 1000 overflows at step 1, which is not a record step.
    spec = tiny(activation="relu", init="kaiming_normal", init_gain=3, lr=1000, steps=20, record_every=10)
    report = run_probe(spec, eval_samples=16)
    step = report.verdict.evidence.nonfinite_step
    assert step is not None and step % 10 != 0
    rows = [r for r in report.records if r.step == step]
    assert rows, "the non-finite step is recorded"
    # The forward and backward hooks were not armed at that step: no value of step 0 may appear.
    assert all(r.act_grad_norm is None and r.act_norm is None and r.saturation_frac is None for r in rows)
    assert report.verdict.label == "exploding"
    assert report.verdict.findings[0].kind == "nonfinite"


def test_gradient_statistics_are_of_the_data_loss_with_the_penalty_apart() -> None:
    plain = run_probe(tiny(activation="relu", depth=8, l1=0.0), eval_samples=16)
    l1 = run_probe(tiny(activation="relu", depth=8, l1=1e-3), eval_samples=16)
    step0 = {r.layer: r for r in plain.records if r.step == 0}
    step0_l1 = {r.layer: r for r in l1.records if r.step == 0}
    for index, record in step0_l1.items():
        # Same seed, same weights, same batch: the data loss's gradient is identical with or without L1.
        assert record.grad_norm == pytest.approx(step0[index].grad_norm, rel=1e-6)
        assert record.zero_grad_frac == pytest.approx(step0[index].zero_grad_frac)
    weight_layers = [layer.index for layer in l1.layers if layer.kind == "linear"]
    assert all(step0_l1[i].penalty_grad_norm and step0_l1[i].penalty_grad_norm > 0 for i in weight_layers)
    assert all(step0[i].penalty_grad_norm is None for i in weight_layers)


def test_weight_decay_is_in_the_penalty_only_where_the_optimizer_adds_it_to_the_gradient() -> None:
    sgd = run_probe(tiny(weight_decay=0.1, optimizer="sgd"), eval_samples=16)
    adamw = run_probe(tiny(weight_decay=0.1, optimizer="adamw"), eval_samples=16)
    record = next(r for r in sgd.records if r.step == 0 and r.layer == 0)
    assert record.penalty_grad_norm == pytest.approx(0.1 * record.weight_norm, rel=1e-5)
    assert all(r.penalty_grad_norm is None for r in adamw.records)


def test_biases_before_batch_norm_are_flagged_and_their_gradient_is_structurally_zero() -> None:
    report = run_probe(tiny(norm="batch", depth=5), eval_samples=16)
    flagged = [layer for layer in report.layers if layer.structural_zero_bias]
    hidden = [layer for layer in report.layers if layer.kind == "linear" and layer.name != "output.linear"]
    assert [layer.index for layer in flagged] == [layer.index for layer in hidden]
    for layer in flagged:
        record = next(r for r in report.records if r.step == 0 and r.layer == layer.index)
        assert record.bias_grad_norm is not None and record.bias_grad_norm < 1e-5 * (record.grad_norm or 1)
    assert any(f.kind == "structural_zero_bias" for f in report.verdict.findings)
    assert not any(layer.structural_zero_bias for layer in run_probe(tiny(norm="layer"), eval_samples=16).layers)


def test_tiny_gradients_are_recorded_without_float32_underflow() -> None:
    # std 1e-3 over 10 layers: the early layers' gradients are ~1e-20 per entry, whose squares underflow.
    spec = tiny(activation="relu", depth=10, init="normal", init_std=1e-3, steps=1)
    report = run_probe(spec, eval_samples=16)
    model = build_network(spec)
    inputs, labels = make_source(spec, data=None, device=torch.device("cpu"), eval_samples=8).batch(0)
    outputs: list[torch.Tensor] = []
    for layer in model.layers:
        layer.module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    loss = F.cross_entropy(model(inputs), labels)
    weights = [layer.module.weight for layer in model.layers]
    grads = torch.autograd.grad(loss, outputs + weights)
    n = len(model.layers)
    assert float(grads[1].abs().max()) < 1e-19  # the case this test is about
    for layer, act_grad, weight_grad in zip(model.layers, grads[:n], grads[n:], strict=True):
        record = next(r for r in report.records if r.layer == layer.index)
        assert record.act_grad_norm == pytest.approx(float(act_grad.double().norm()), rel=1e-4), layer.name
        assert record.grad_norm == pytest.approx(float(weight_grad.double().norm()), rel=1e-4), layer.name


# --- what the verdict says ----------------------------------------------------------------------


def test_under_adam_the_verdict_never_says_the_first_layer_learns_slower() -> None:
    report = run_probe(tiny(activation="tanh", depth=14, optimizer="adam", lr=1e-3, width=64), eval_samples=16)
    verdict = report.verdict
    assert verdict.label == "vanishing"  # the raw gradients do fall
    text = " ".join(verdict.reasons)
    assert "smaller than the last" not in text
    assert "update ratios" in text
    assert any(f.kind == "adam_equalised" for f in verdict.findings)
    sgd = run_probe(tiny(activation="tanh", depth=14, width=64), eval_samples=16)
    assert "smaller than the last" in " ".join(sgd.verdict.reasons)


def test_a_large_step_is_a_finding_of_its_own_and_never_the_label() -> None:
    spec = tiny(activation="relu", depth=10, init="normal", init_std=1e-3, optimizer="adam", lr=3e-3, width=64)
    verdict = run_probe(spec, eval_samples=16).verdict
    assert verdict.label == "vanishing"
    step = next(f for f in verdict.findings if f.kind == "step_size")
    assert step.evidence["max_update_ratio"] > 1
    assert any("learning rate" in a for a in step.advice)
    assert not any("Shrink the initial weights" in a for a in verdict.advice)
    assert any(f.kind == "init_scale" and f.evidence["factor"] < 0.01 for f in verdict.findings)
    assert any(f.kind == "adam_epsilon" for f in verdict.findings)


def test_advice_does_not_blame_saturation_that_was_not_measured() -> None:
    verdict = run_probe(tiny(activation="sigmoid", depth=12, width=64), eval_samples=16).verdict
    assert verdict.label == "vanishing"
    assert (verdict.evidence.saturation_frac_max or 0) < 0.05
    switch = next(a for a in verdict.advice if a.startswith("Switch sigmoid"))
    assert "at most 1/4" in switch and "few units are saturated" in switch


def test_kaiming_advice_states_its_predicted_span_not_chi_one() -> None:
    verdict = run_probe(tiny(activation="gelu", depth=20, width=64), eval_samples=16).verdict
    assert verdict.label == "vanishing"
    kaiming = [a for a in verdict.advice if "kaiming_normal, bias_init=zeros" in a]
    assert all("χ₁ = 1" not in a for a in verdict.advice)
    for item in kaiming:  # each advised remedy keeps the predicted span within ±2 decades
        predicted = float(item.split("predicted ")[1].split(" decades")[0])
        assert abs(predicted) < 2


def test_forward_explosion_of_a_residual_relu_net_is_a_finding_with_the_loss_at_init() -> None:
    spec = tiny(activation="relu", depth=30, residual=True, width=64, optimizer="adam", lr=1e-4)
    verdict = run_probe(spec, eval_samples=16).verdict
    forward = next(f for f in verdict.findings if f.kind == "forward_signal")
    assert forward.severity == "critical"
    assert forward.evidence["forward_span_decades"] > 2
    assert forward.evidence["loss_init_over_ln10"] == pytest.approx(verdict.evidence.loss_first / math.log(10))
    assert verdict.theory.applicable is False and "non-zero mean" in verdict.theory.reason


def test_theory_covers_cnns_and_agrees() -> None:
    spec = tiny(arch="cnn", activation="sigmoid", depth=9, width=16, bias_init="default")
    theory = run_probe(spec, eval_samples=16).verdict.theory
    assert theory.applicable is True and theory.model == "plain"
    assert theory.agrees is True, theory.reason


def test_decide_on_partial_evidence_is_safe_without_layers() -> None:
    # Progress reports judge a run in flight without theory or layer infos.
    verdict = decide(Spec(), Evidence(), None)
    assert verdict.label == "healthy" and verdict.findings == []
