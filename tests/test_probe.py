"""The probe: every knob trains, recorded numbers equal a direct computation, verdict examples hold."""

from __future__ import annotations

import itertools
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from graddiag.models.networks import build_network
from graddiag.models.spec import Spec
from graddiag.service.engine.data import make_source
from graddiag.service.engine.probe import ProbeCancelled, ProbeTimeout, Progress, run_probe
from graddiag.service.engine.recorder import Recorder

ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "silu", "softsign", "identity"]
INITS = [
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "orthogonal",
    "normal",
]
STRUCTURES = list(itertools.product(["mlp", "cnn"], ["none", "batch", "layer"], [False, True]))


def tiny(**fields: object) -> Spec:
    base: dict[str, object] = dict(dataset="synthetic", depth=3, width=8, steps=3, batch_size=4, record_every=1)
    base.update(fields)
    return Spec.model_validate(base)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("init", INITS)
def test_every_combination_builds_and_trains(activation: str, init: str) -> None:
    for arch, norm, residual in STRUCTURES:
        spec = tiny(
            arch=arch,
            norm=norm,
            residual=residual,
            activation=activation,
            init=init,
            init_std=0.05 if init == "normal" else None,
            width=4 if arch == "cnn" else 8,
        )
        report = run_probe(spec, eval_samples=8)
        assert report.timing.steps_run == 3, (arch, norm, residual)
        weight_layers = [layer for layer in report.layers if layer.kind in ("linear", "conv")]
        assert len(weight_layers) == spec.depth + 1
        assert {r.step for r in report.records} == {0, 1, 2}
        assert len(report.records) == 3 * len(report.layers)
        assert all(r.grad_norm is not None and r.grad_norm >= 0 for r in report.records)
        assert report.verdict.label in ("vanishing", "exploding", "healthy")


def _direct_step0(spec: Spec) -> dict[str, object]:
    """Step 0 computed by hand, without the recorder: the reference for the recorded numbers."""
    model = build_network(spec)
    x, y = make_source(spec, data=None, device=torch.device("cpu"), eval_samples=8).batch(0)
    outputs: dict[int, torch.Tensor] = {}
    activations: dict[int, torch.Tensor] = {}
    for layer in model.layers:

        def keep(_m, _i, out, index=layer.index):
            out.retain_grad()
            outputs[index] = out

        layer.module.register_forward_hook(keep)
        if layer.activation is not None:
            layer.activation.register_forward_hook(
                lambda _m, _i, out, index=layer.index: activations.__setitem__(index, out)
            )
    loss = F.cross_entropy(model(x), y)
    # The recorded per-layer statistics are of the data loss alone; the optimizer sees loss + L1.
    loss.backward()
    penalties = {
        layer.index: spec.l1 * torch.sign(layer.module.weight.detach())
        for layer in model.layers
        if layer.kind != "norm"
    }
    return {"model": model, "loss": loss.item(), "outputs": outputs, "activations": activations, "penalty": penalties}


@pytest.mark.parametrize("l1", [0.0, 0.01])
def test_recorded_norms_equal_direct_computation(l1: float) -> None:
    spec = tiny(activation="tanh", depth=4, width=16, steps=1, batch_size=8, optimizer="sgd", lr=0.1, l1=l1)
    report = run_probe(spec, eval_samples=8)
    ref = _direct_step0(spec)
    model = ref["model"]
    assert report.steps[0].loss == pytest.approx(ref["loss"], rel=1e-5)
    penalty = ref["penalty"]
    # The total is of what the optimizer receives: the data gradient plus the L1 subgradient.
    full = [
        (p.grad + penalty[layer.index]) if name == "weight" and layer.index in penalty else p.grad
        for layer in model.layers
        for name, p in layer.module.named_parameters()
    ]
    assert report.steps[0].grad_norm_total_pre == pytest.approx(
        torch.cat([g.flatten() for g in full]).norm().item(), rel=1e-5
    )
    records = {r.layer: r for r in report.records if r.step == 0}
    for layer in model.layers:
        record, module = records[layer.index], layer.module
        assert record.grad_norm == pytest.approx(module.weight.grad.norm().item(), rel=1e-5)
        assert record.bias_grad_norm == pytest.approx(module.bias.grad.norm().item(), rel=1e-5)
        assert record.weight_norm == pytest.approx(module.weight.norm().item(), rel=1e-5)
        assert record.rel_grad == pytest.approx(record.grad_norm / record.weight_norm, rel=1e-5)
        step = module.weight.grad + penalty.get(layer.index, 0.0)
        # Plain SGD moves W by exactly lr * (data gradient + penalty gradient).
        assert record.update_ratio == pytest.approx(spec.lr * step.norm().item() / record.weight_norm, rel=1e-4)
        if l1 > 0:
            assert record.penalty_grad_norm == pytest.approx(penalty[layer.index].norm().item(), rel=1e-5)
        else:
            assert record.penalty_grad_norm is None
        output = ref["outputs"][layer.index]
        assert record.act_grad_norm == pytest.approx(output.grad.norm().item(), rel=1e-5)
        assert record.act_norm == pytest.approx(output.detach().square().mean().sqrt().item(), rel=1e-5)
        assert record.zero_grad_frac == pytest.approx((module.weight.grad == 0).float().mean().item())
        if layer.activation is not None:
            y = ref["activations"][layer.index]
            assert record.saturation_frac == pytest.approx(((1 - y * y) < 0.05).float().mean().item())
        else:
            assert record.saturation_frac is None


def test_saturation_is_measured_for_sigmoid_only_among_relus() -> None:
    sig = run_probe(tiny(activation="sigmoid", init="normal", init_std=1.0), eval_samples=8)
    relu = run_probe(tiny(activation="relu"), eval_samples=8)
    assert any(r.saturation_frac and r.saturation_frac > 0.3 for r in sig.records)
    assert all(r.saturation_frac is None for r in relu.records)


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_clipping_is_applied_and_measured(mode: str) -> None:
    spec = tiny(clip_value=1e-3, clip_mode=mode, steps=2, lr=0.1)
    report = run_probe(spec, eval_samples=8)
    for step in report.steps:
        assert step.grad_norm_total_pre > 1e-3
        if mode == "norm":
            assert step.grad_norm_total_post == pytest.approx(1e-3, rel=1e-3)
        else:
            params = sum(layer.params for layer in report.layers)
            assert step.grad_norm_total_post <= 1e-3 * math.sqrt(params) + 1e-9
            assert step.grad_norm_total_post < step.grad_norm_total_pre
    # The update reflects the clipped gradient: far below lr * unclipped grad / weight.
    r = next(r for r in report.records if r.step == 0 and r.layer == 1)
    assert r.update_ratio < 0.5 * spec.lr * r.grad_norm / r.weight_norm


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw"])
def test_optimizers_and_weight_decay_change_the_update(optimizer: str) -> None:
    plain = run_probe(tiny(optimizer=optimizer, steps=2), eval_samples=8)
    decayed = run_probe(tiny(optimizer=optimizer, steps=2, weight_decay=0.5), eval_samples=8)
    u_plain = [r.update_ratio for r in plain.records if r.step == 0]
    u_decay = [r.update_ratio for r in decayed.records if r.step == 0]
    assert u_plain != u_decay


def test_synthetic_runs_are_deterministic_by_seed() -> None:
    a = run_probe(tiny(seed=7), eval_samples=8)
    b = run_probe(tiny(seed=7), eval_samples=8)
    c = run_probe(tiny(seed=8), eval_samples=8)
    assert a.records == b.records and a.steps == b.steps
    assert a.records != c.records


def test_record_every_and_last_step() -> None:
    report = run_probe(tiny(steps=7, record_every=3), eval_samples=8)
    assert sorted({r.step for r in report.records}) == [0, 3, 6]
    assert [s.step for s in report.steps] == list(range(7))


# The verdict examples the product promises (synthetic inputs: the real-data versions are below).
def test_sigmoid_default_depth20_vanishes_and_matches_theory() -> None:
    report = run_probe(tiny(activation="sigmoid", depth=20, width=128, steps=5, batch_size=64), eval_samples=64)
    verdict = report.verdict
    assert verdict.label == "vanishing" and verdict.at_init == "vanishing"
    assert verdict.evidence.decades_per_layer < -0.5
    assert verdict.theory.applicable and verdict.theory.agrees
    assert verdict.theory.predicted_decades_per_layer == pytest.approx(-0.85, abs=0.05)
    assert any("ReLU" in advice for advice in verdict.advice)


def test_relu_kaiming_depth20_is_healthy() -> None:
    spec = tiny(
        activation="relu",
        init="kaiming_normal",
        bias_init="zeros",
        depth=20,
        width=128,
        steps=5,
        batch_size=64,
    )
    report = run_probe(spec, eval_samples=64)
    assert report.verdict.label == "healthy", report.verdict.reasons
    assert abs(report.verdict.evidence.decades_per_layer) < 0.1
    assert report.verdict.theory.agrees
    assert report.verdict.advice == []


def test_relu_default_init_vanishes_in_the_backward_signal() -> None:
    report = run_probe(tiny(activation="relu", depth=20, width=128, steps=2, batch_size=64), eval_samples=64)
    assert report.verdict.label == "vanishing"
    assert report.verdict.evidence.act_decades_per_layer < -0.3
    assert any("Kaiming" in advice for advice in report.verdict.advice)


def test_huge_learning_rate_explodes_with_the_step_recorded() -> None:
    spec = tiny(activation="relu", init="kaiming_normal", depth=6, width=64, lr=1e3, steps=50, batch_size=32)
    report = run_probe(spec, eval_samples=16)
    evidence = report.verdict.evidence
    assert report.verdict.label == "exploding"
    assert evidence.nonfinite_step is not None and 0 < evidence.nonfinite_step < 50
    assert evidence.nonfinite_layer is not None
    assert report.timing.steps_run == evidence.nonfinite_step + 1
    assert report.steps[-1].step == evidence.nonfinite_step
    assert any("non-finite" in reason for reason in report.verdict.reasons)
    assert report.eval.loss is None
    assert report.model_dump_json()  # still valid JSON with non-finite values as null


def test_large_init_explodes_at_initialisation() -> None:
    spec = tiny(activation="relu", init="normal", init_std=0.3, bias_init="zeros", depth=12, width=64, steps=1)
    report = run_probe(spec, eval_samples=8)
    assert report.verdict.at_init == "exploding"
    # Weight gradients look flat (forward growth cancels backward growth); the back-propagated
    # signal grows by the predicted 0.23 decades per layer toward the input.
    assert abs(report.verdict.evidence.decades_per_layer) < 0.1
    assert report.verdict.evidence.act_decades_per_layer > 0.2
    assert report.verdict.theory.agrees


def test_progress_cancel_and_deadline() -> None:
    seen: list[Progress] = []
    run_probe(tiny(steps=30), eval_samples=8, on_progress=seen.append, progress_interval=0.0)
    assert seen and seen[-1].step == 30 and seen[-1].label_so_far in ("vanishing", "exploding", "healthy")
    with pytest.raises(ProbeCancelled):
        run_probe(tiny(steps=30), eval_samples=8, should_stop=lambda: True)
    with pytest.raises(ProbeTimeout):
        run_probe(tiny(steps=30), eval_samples=8, deadline=0.0)


def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        run_probe(tiny(device="cuda"), eval_samples=8)


@pytest.mark.slow
def test_verdict_examples_on_real_cifar10(cifar10_data) -> None:
    common = dict(dataset="cifar10", depth=20, width=128, steps=20, batch_size=64, record_every=5)
    sigmoid = run_probe(Spec(activation="sigmoid", **common), data=cifar10_data, eval_samples=500)
    relu = run_probe(
        Spec(activation="relu", init="kaiming_normal", bias_init="zeros", **common),
        data=cifar10_data,
        eval_samples=500,
    )
    assert sigmoid.verdict.label == "vanishing"
    assert sigmoid.verdict.theory.agrees
    assert relu.verdict.label == "healthy", relu.verdict.reasons
    assert relu.eval.samples == 500 and relu.eval.accuracy is not None
    # Real images carry signal: a short Adam run of a shallow healthy net beats chance on held-out data.
    learner = Spec(dataset="cifar10", depth=2, width=128, steps=60, batch_size=64, optimizer="adam", lr=1e-3)
    learned = run_probe(learner, data=cifar10_data, eval_samples=500)
    assert learned.eval.accuracy > 0.2


def test_on_record_sees_the_gradients_that_were_measured() -> None:
    seen: dict[int, list[float]] = {}

    def capture(step: int, layers) -> None:
        seen[step] = [layer.weight.grad.norm().item() for layer in layers]

    report = run_probe(tiny(steps=5, record_every=2, clip_value=1e-3), eval_samples=8, on_record=capture)
    assert sorted(seen) == [0, 2, 4]
    for record in report.records:
        assert record.grad_norm == pytest.approx(seen[record.step][record.layer], rel=1e-5)


def test_an_unrecorded_step_registers_no_hook_and_takes_no_norm() -> None:
    # Counted per step between should_stop() polls (each poll opens the next step).
    counts: dict[str, int] = {"forward_hooks": 0, "hook_calls": 0, "tensor_hooks": 0, "norms": 0}
    per_step: list[dict[str, int]] = []

    def counting(name: str, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    def poll() -> bool:
        per_step.append(dict(counts))
        return False

    patches = [
        mock.patch.object(
            torch.nn.Module, "register_forward_hook", counting("forward_hooks", torch.nn.Module.register_forward_hook)
        ),
        mock.patch.object(Recorder, "_on_output", counting("hook_calls", Recorder._on_output)),
        mock.patch.object(torch.Tensor, "register_hook", counting("tensor_hooks", torch.Tensor.register_hook)),
        mock.patch.object(torch, "_foreach_norm", counting("norms", torch._foreach_norm)),
        mock.patch.object(torch.linalg, "vector_norm", counting("norms", torch.linalg.vector_norm)),
    ]
    for patch in patches:
        patch.start()
    try:
        report = run_probe(tiny(activation="tanh", steps=12, record_every=10), eval_samples=8, should_stop=poll)
    finally:
        for patch in reversed(patches):
            patch.stop()
    delta = [{k: b[k] - a[k] for k in a} for a, b in itertools.pairwise(per_step)]  # delta[k]: step k
    assert all(v > 0 for v in delta[0].values()) and all(v > 0 for v in delta[10].values())
    for step in range(1, 10):
        assert delta[step] == {"forward_hooks": 0, "hook_calls": 0, "tensor_hooks": 0, "norms": 0}, step
    assert sorted({r.step for r in report.records}) == [0, 10, 11]


def test_unrecorded_steps_keep_their_loss_and_totals_come_from_records_and_clipping() -> None:
    plain = run_probe(tiny(steps=12, record_every=5), eval_samples=8)
    assert all(s.loss is not None and s.accuracy is not None for s in plain.steps)
    measured = [s.step for s in plain.steps if s.grad_norm_total_pre is not None]
    assert measured == [0, 5, 10, 11]
    # clip_grad_norm_ computes the total on every step anyway: it is kept, and the post-clip total with it.
    clipped = run_probe(tiny(steps=12, record_every=5, clip_value=1e-3), eval_samples=8)
    assert all(s.grad_norm_total_pre is not None for s in clipped.steps)
    assert all(s.grad_norm_total_post == pytest.approx(1e-3, rel=1e-3) for s in clipped.steps)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_update_read_from_the_optimizer_equals_the_weights_difference(optimizer: str, weight_decay: float) -> None:
    spec = tiny(optimizer=optimizer, weight_decay=weight_decay, steps=3, lr=0.1)
    report = run_probe(spec, eval_samples=8)
    # The same run by hand: the update ratio is ‖W_before - W_after‖ / ‖W_before‖ at every step.
    model = build_network(spec)
    optimizer_ = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9 if optimizer == "momentum" else 0, weight_decay=weight_decay
    )
    source = make_source(spec, data=None, device=torch.device("cpu"), eval_samples=8)
    for step in range(spec.steps):
        x, y = source.batch(step)
        optimizer_.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = [layer.weight.detach().clone() for layer in model.layers]
        optimizer_.step()
        for layer, w in zip(model.layers, before, strict=True):
            record = next(r for r in report.records if r.step == step and r.layer == layer.index)
            expected = (w - layer.weight.detach()).norm().item() / w.norm().item()
            assert record.update_ratio == pytest.approx(expected, rel=1e-4), (step, layer.name)


def test_the_probe_leaves_the_torch_thread_count_as_it_found_it() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_probe(tiny(steps=3), eval_samples=8)  # every step recorded: the statistics run on one thread
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_one_pass_gradient_and_weight_norms_equal_the_separate_passes() -> None:
    # width 32: the first layer's 3072 × 32 weight is chunked; one layer's gradient underflows float32 squares.
    model = build_network(tiny(width=32, depth=3))
    recorder = Recorder(model.layers, "relu")
    generator = torch.Generator().manual_seed(0)
    for layer in model.layers:
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.grad = torch.randn(p.shape, generator=generator)
    model.layers[1].weight.grad.mul_(1e-25)
    grad_norms, weight_norms = recorder.grad_and_weight_norms()
    assert model.layers[0].weight.numel() > 2**16
    assert torch.equal(grad_norms, recorder.param_grad_norms(precise=True))
    assert torch.equal(weight_norms, recorder.weight_norms())
    position = next(i for i, p in enumerate(recorder.params) if p is model.layers[1].weight)
    assert grad_norms[position].item() == pytest.approx(model.layers[1].weight.grad.double().norm().item(), rel=1e-6)
