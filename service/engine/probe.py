"""The probe: build the spec's network, train it briefly, record every layer, judge the result.

Read top to bottom: `_set_up` (network, optimizer, recorder), `_train` (the train-and-record loop,
one `_train_step` per step), `_finish` (held-out evaluation, evidence, theory, verdict); `run_probe`
calls the three. Step 0 is the gradient at initialisation, measured before any update. The loop never
raises on a non-finite loss or gradient: it records the step and the layer, stops, and the verdict says
exploding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graddiag.models.networks import Layer, Network, build_network
from graddiag.models.shapes import SEQUENCE_LENGTH
from graddiag.models.spec import Spec
from graddiag.service.engine.data import BatchSource, ImageSet, make_source
from graddiag.service.engine.recorder import STAT_COLUMNS, Recorder, locate_nonfinite
from graddiag.service.engine.report import (
    EvalResult,
    LayerInfo,
    LayerRecord,
    Report,
    StepMetrics,
    TimeRecord,
    Timing,
)
from graddiag.service.engine.theory import theory_for
from graddiag.service.engine.theory_time import time_theory_for
from graddiag.service.engine.time_recorder import TimeRecorder
from graddiag.service.engine.verdict import decide, measure


@dataclass(frozen=True)
class Progress:
    """What a caller sees of a probe in flight."""

    step: int
    steps: int
    loss: float | None
    label_so_far: str | None


class ProbeCancelled(Exception):
    """The caller's should_stop() asked the probe to stop."""


class ProbeTimeout(Exception):
    """The probe ran past its wall-clock deadline."""


def resolve_device(requested: str) -> torch.device:
    """auto → CUDA when available, else CPU; an explicit 'cuda' without CUDA is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def make_optimizer(spec: Spec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The spec's optimizer; weight_decay is the L2 penalty (decoupled for adamw)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "momentum":
        return torch.optim.SGD(params, lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _evaluate(model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(labels), 500):
            logits = model(inputs[start : start + 500])
            target = labels[start : start + 500]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(1) == target).sum().item()
    model.train()
    return loss_sum / len(labels), correct / len(labels)


@dataclass
class _Probe:
    """One probe in flight: everything the loop reads and writes, set up once."""

    spec: Spec
    device: torch.device
    source: BatchSource
    model: Network
    optimizer: torch.optim.Optimizer
    recorder: Recorder
    # A recurrent net's gradient through time; None for the other architectures.
    time_recorder: TimeRecorder | None
    layers: list[LayerInfo]
    # Whole-model figures, kept until the report: every step's loss (a float on the CPU, where it is
    # read anyway to stop on a non-finite one; a device tensor elsewhere) and count of correct
    # predictions, and the total gradient norms (pre, post clipping) of the steps where they are
    # computed anyway.
    losses: list[Tensor | float]
    correct: list[Tensor]
    totals: dict[int, tuple[Tensor, Tensor]]
    # The weight layers' weights and biases as initialised, for the mean-field prediction.
    init_weights: list[Tensor]
    init_biases: list[Tensor | None]
    # Built once per recorded step, so progress reports do not rebuild every earlier record.
    records: list[LayerRecord] = field(default_factory=list)
    time_records: list[TimeRecord] = field(default_factory=list)
    # Per example: the mean-field map is diagonal, and images differ in contrast.
    input_second_moments: list[float] | None = None
    nonfinite_step: int | None = None
    nonfinite_layer: int | None = None
    steps_run: int = 0


def _set_up(spec: Spec, data: tuple[ImageSet, ImageSet] | None, eval_samples: int) -> _Probe:
    device = resolve_device(spec.device)
    source = make_source(spec, data=data, device=device, eval_samples=eval_samples)
    model = build_network(spec).to(device)
    model.train()
    weight_layers = [layer for layer in model.layers if layer.kind != "norm"]
    recorder = Recorder(model.layers, spec.activation)
    # The recorder's parameters must be every parameter of the model, so its norms give the total.
    if len(recorder.params) != len(list(model.parameters())):
        raise RuntimeError("network has parameters outside its recorded layers")
    return _Probe(
        spec=spec,
        device=device,
        source=source,
        model=model,
        optimizer=make_optimizer(spec, list(model.parameters())),
        recorder=recorder,
        time_recorder=TimeRecorder(model.recurrent, SEQUENCE_LENGTH) if model.recurrent else None,
        layers=_layer_infos(model),
        losses=[],
        correct=[],
        totals={},
        init_weights=[layer.weight.detach().clone() for layer in weight_layers],
        init_biases=[layer.bias.detach().clone() if layer.bias is not None else None for layer in weight_layers],
    )


def _add_l1(probe: _Probe) -> None:
    """Add the L1 penalty's (sub)gradient l1·sign(W) to every weight layer's gradient, in place.

    Applied after the data-loss gradient was measured, so grad_norm stays the data loss's; sign(0) = 0
    is the subgradient autograd's abs() gives, so the optimizer sees what ``loss + l1·Σ|W|`` would give.
    """
    weights = [layer.weight for layer in probe.model.layers if layer.kind != "norm"]
    grads = [w.grad for w in weights if w.grad is not None]
    torch._foreach_add_(
        grads, torch._foreach_sign([w.detach() for w in weights if w.grad is not None]), alpha=probe.spec.l1
    )


def _coupled_weight_decay(spec: Spec) -> float:
    """The weight decay the optimizer adds to the gradient itself (all but AdamW's decoupled decay)."""
    return 0.0 if spec.optimizer == "adamw" else spec.weight_decay


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the enclosed small-matrix work on one torch thread, where a fork and join per operation costs more
    than it saves.

    Training and the recorder's statistics keep every thread: on 2 cores a recorded step of the bench's MLP
    was 1.24-1.26x a bare step with its statistics switched to one thread and 1.22-1.24x without the switch
    (step-paired, 300 steps each, three runs), the reductions over the larger layers gaining more from the
    second core than the small ones lose to it.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _clip(probe: _Probe) -> Tensor | None:
    """Clip the gradients as the spec asks; the total norm before clipping where clipping computes it."""
    spec, params = probe.spec, probe.recorder.params
    if spec.clip_value is None:
        return None
    if spec.clip_mode == "norm":
        return nn.utils.clip_grad_norm_(params, spec.clip_value, foreach=True)
    nn.utils.clip_grad_value_(params, spec.clip_value, foreach=True)
    return None


def _clipped_total(probe: _Probe, total_pre: Tensor) -> Tensor:
    """The total norm after clip_grad_norm_ scaled every gradient by min(1, clip/(total + 1e-6))."""
    assert probe.spec.clip_value is not None
    return total_pre * torch.clamp(probe.spec.clip_value / (total_pre + 1e-6), max=1.0)


def _stop_nonfinite(
    probe: _Probe, step: int, inputs: Tensor, grad_norms: Tensor | None = None, **stats: Tensor | None
) -> bool:
    """Record the step where a value went non-finite (its rows, the first bad layer) and stop: False."""
    recorder, model = probe.recorder, probe.model
    probe.nonfinite_step = step
    probe.nonfinite_layer = locate_nonfinite(model.layers, model, inputs)
    grad_norms = grad_norms if grad_norms is not None else recorder.param_grad_norms(precise=True)
    zero_fracs = stats.get("zero_fracs")
    zero_fracs = zero_fracs if zero_fracs is not None else recorder.zero_fractions()
    rows = recorder.layer_stats(
        grad_norms, zero_fracs, stats.get("penalty_norms"), weight_norms=stats.get("weight_norms")
    )
    probe.records += _records(step, rows.cpu().tolist())
    _record_time(probe, step)
    return False


def _train_step(probe: _Probe, step: int, record: bool, on_record: Callable[[int, list[Layer]], None] | None) -> bool:
    """One forward, backward, measurement and update; False when a value went non-finite (stop).

    A step that records nothing does what a bare training loop does (plus the spec's penalty and
    clipping) and keeps its loss and accuracy on the device; on the CPU it also reads the loss, to stop
    at the first non-finite one.
    """
    spec, model, recorder = probe.spec, probe.model, probe.recorder
    recorder.begin_step(record)
    if probe.time_recorder is not None:
        probe.time_recorder.begin_step(record)
    inputs, labels = probe.source.batch(step)
    if step == 0:
        probe.input_second_moments = inputs.detach().flatten(1).double().square().mean(1).tolist()
    logits = model(inputs)
    loss = F.cross_entropy(logits, labels)
    probe.optimizer.zero_grad(set_to_none=False)
    loss.backward()
    loss = loss.detach()
    cpu = probe.device.type == "cpu"
    # On the CPU reading the loss costs nothing; on CUDA it would wait for the device every step.
    loss_value = loss.item() if cpu else math.nan
    probe.losses.append(loss_value if cpu else loss)
    probe.correct.append((logits.argmax(1) == labels).sum())
    probe.steps_run = step + 1
    if record:
        return _recorded_step(probe, step, inputs, loss, on_record)

    # A gradient that overflows while its loss is still finite breaks the weights it updates, so the
    # next step's loss is non-finite: detection is at most one step late, and names the broken layer.
    if cpu and not math.isfinite(loss_value):
        return _stop_nonfinite(probe, step, inputs)
    if spec.l1 > 0:
        _add_l1(probe)
    total_pre = _clip(probe)
    if total_pre is not None:
        # clip_grad_norm_ computed the total anyway: keep it, and stop on it as on the loss.
        probe.totals[step] = (total_pre, _clipped_total(probe, total_pre))
        if probe.device.type == "cpu" and not math.isfinite(float(total_pre)):
            return _stop_nonfinite(probe, step, inputs)
    probe.optimizer.step()
    return True


def _recorded_step(
    probe: _Probe, step: int, inputs: Tensor, loss: Tensor, on_record: Callable[[int, list[Layer]], None] | None
) -> bool:
    """Measure the step (after backward, before penalty and clipping), then update and read the update."""
    spec, model, recorder = probe.spec, probe.model, probe.recorder
    # Every per-layer statistic is of the data loss: measured before the penalty joins the gradient.
    grad_norms, weight_norms = recorder.grad_and_weight_norms()
    zero_fracs = recorder.zero_fractions()
    penalty_norms = recorder.penalty_grad_norms(spec.l1, _coupled_weight_decay(spec))
    if on_record is not None:
        on_record(step, model.layers)
    if spec.l1 > 0:
        _add_l1(probe)
    clip_total = _clip(probe)
    # The norms of the gradients the optimizer receives: data loss, plus L1, after clipping.
    seen = grad_norms if spec.l1 == 0 and spec.clip_value is None else recorder.param_grad_norms(precise=True)
    total_post = torch.linalg.vector_norm(seen)
    if clip_total is not None:
        total_pre = clip_total
    elif spec.clip_value is not None:  # clipped by value: the total before it, of data loss plus L1
        total_pre = (
            torch.linalg.vector_norm(grad_norms)
            if spec.l1 == 0
            else torch.linalg.vector_norm(recorder.param_grad_norms())
        )
    else:
        total_pre = total_post  # nothing clipped: the same gradients, the same norm
    probe.totals[step] = (total_pre, total_post)

    # On the CPU a finiteness check costs nothing; on CUDA it is a sync, so only at recorded steps.
    if not bool(torch.isfinite(torch.stack((loss, total_pre, total_post))).all()):
        return _stop_nonfinite(
            probe,
            step,
            inputs,
            grad_norms,
            zero_fracs=zero_fracs,
            penalty_norms=penalty_norms,
            weight_norms=weight_norms,
        )

    # ‖ΔW‖ from what the optimizer computes where that is exact; a copy of the weights otherwise (Adam).
    update_norms = None
    if spec.optimizer == "sgd":
        update_norms = recorder.sgd_update_norms(spec.lr, spec.weight_decay, seen)
    elif spec.optimizer != "momentum":
        recorder.snapshot_weights()
    probe.optimizer.step()
    if spec.optimizer == "momentum":
        update_norms = recorder.momentum_update_norms(probe.optimizer, spec.lr)
    stats = recorder.layer_stats(
        grad_norms, zero_fracs, penalty_norms, weight_norms=weight_norms, update_norms=update_norms
    )
    probe.records += _records(step, stats.cpu().tolist())
    _record_time(probe, step)
    return True


def _train(
    probe: _Probe,
    *,
    on_progress: Callable[[Progress], None] | None,
    progress_interval: float,
    should_stop: Callable[[], bool] | None,
    deadline: float | None,
    on_record: Callable[[int, list[Layer]], None] | None,
) -> None:
    """The training loop: every step trains, every record_every-th (and the last) also records."""
    spec = probe.spec
    last_progress = time.monotonic()
    try:
        for step in range(spec.steps):
            if should_stop is not None and should_stop():
                raise ProbeCancelled(f"cancelled at step {step}")
            if deadline is not None and time.monotonic() > deadline:
                raise ProbeTimeout(f"wall-clock limit reached at step {step} of {spec.steps}")
            record = step % spec.record_every == 0 or step == spec.steps - 1
            if not _train_step(probe, step, record, on_record):
                break
            if on_progress is not None and time.monotonic() - last_progress >= progress_interval:
                last_progress = time.monotonic()
                loss_now = _finite_or_none(float(probe.losses[step]))
                steps = _steps(_metrics(probe), probe.steps_run)
                label = decide(spec, measure(probe.layers, probe.records, steps), None).label
                on_progress(Progress(step + 1, spec.steps, loss_now, label))
    finally:
        probe.recorder.close()
        if probe.time_recorder is not None:
            probe.time_recorder.close()
    if probe.device.type == "cuda":
        torch.cuda.synchronize()


def _finish(probe: _Probe, *, started: float, data_s: float, train_s: float) -> Report:
    """Held-out evaluation, the evidence, the theory and the verdict, assembled into the report."""
    spec = probe.spec
    metrics = _metrics(probe)
    step_metrics = _steps(metrics, probe.steps_run)
    # A CUDA run checks finiteness only at recorded steps; find the first bad step afterwards: a loss,
    # or a total norm where one was computed (the others are NaN for "not measured").
    if probe.nonfinite_step is None:
        measured = torch.zeros_like(metrics[:, 2], dtype=torch.bool)
        measured[list(probe.totals)] = True
        bad = ~torch.isfinite(metrics[:, 0]) | (measured & ~torch.isfinite(metrics[:, 2]))
        if bool(bad.any()):
            probe.nonfinite_step = int(bad.nonzero()[0])

    eval_started = time.perf_counter()
    heldout_x, heldout_y = probe.source.heldout()
    finite = probe.nonfinite_step is None
    eval_loss, eval_acc = _evaluate(probe.model, heldout_x, heldout_y) if finite else (math.nan, math.nan)
    eval_s = time.perf_counter() - eval_started

    evidence = measure(
        probe.layers,
        probe.records,
        step_metrics,
        nonfinite_step=probe.nonfinite_step,
        nonfinite_layer=probe.nonfinite_layer,
        time_records=probe.time_records,
    )
    theory = theory_for(
        spec,
        probe.init_weights,
        probe.init_biases,
        q_input=probe.input_second_moments,
        measured_decades_per_layer=evidence.act_decades_per_layer,
    )
    # A recurrent net's prediction through time, from the same initial weights (None for other archs). Its
    # eigenvalues and small matrix products run on one thread, as the recorder's statistics do (on 2 busy
    # cores two threads made a 256×256 eigvals ten times slower), and so do the remedies decide predicts.
    with _one_thread():
        theory.time = time_theory_for(
            spec,
            probe.layers,
            probe.init_weights,
            probe.init_biases,
            q_input=probe.input_second_moments,
            length=SEQUENCE_LENGTH,
            measured_decades_per_step=evidence.time_decades_per_step,
            measured_cell_decades_per_step=evidence.cell_decades_per_step,
        )
        verdict = decide(
            spec, evidence, theory, layers=probe.layers, records=probe.records, time_records=probe.time_records
        )

    tail = [m for m in step_metrics[-10:] if m.loss is not None]
    train_loss = sum(m.loss for m in tail if m.loss is not None) / len(tail) if tail else None
    train_acc = sum(m.accuracy for m in tail if m.accuracy is not None) / len(tail) if tail else None
    held_loss = _finite_or_none(eval_loss)
    return Report(
        spec=spec,
        layers=probe.layers,
        steps=step_metrics,
        records=probe.records,
        time_records=probe.time_records,
        verdict=verdict,
        eval=EvalResult(
            loss=held_loss,
            accuracy=_finite_or_none(eval_acc),
            samples=len(heldout_y),
            train_loss=train_loss,
            train_accuracy=train_acc,
            generalization_gap=held_loss - train_loss if held_loss is not None and train_loss is not None else None,
        ),
        timing=Timing(
            device=str(probe.device),
            data_s=round(data_s, 4),
            train_s=round(train_s, 4),
            eval_s=round(eval_s, 4),
            total_s=round(time.perf_counter() - started, 4),
            step_ms=round(1000 * train_s / max(probe.steps_run, 1), 4),
            steps_run=probe.steps_run,
        ),
    )


def run_probe(
    spec: Spec,
    *,
    data: tuple[ImageSet, ImageSet] | None = None,
    eval_samples: int = 2000,
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 1.0,
    should_stop: Callable[[], bool] | None = None,
    deadline: float | None = None,
    on_record: Callable[[int, list[Layer]], None] | None = None,
) -> Report:
    """Train `spec` briefly, record per-layer gradient statistics and return the judged report.

    `data` is the decoded CIFAR-10 (train, test) pair, required for dataset='cifar10'. `on_progress`
    is called at most every `progress_interval` seconds; `should_stop` is polled every step and
    raises ProbeCancelled; `deadline` (a time.monotonic() value) raises ProbeTimeout. `on_record`
    sees the layers at each recorded step, after backward and before the penalty and clipping (e.g.
    to capture gradient histograms).
    """
    started = time.perf_counter()
    probe = _set_up(spec, data, eval_samples)
    data_s = time.perf_counter() - started
    train_started = time.perf_counter()
    _train(
        probe,
        on_progress=on_progress,
        progress_interval=progress_interval,
        should_stop=should_stop,
        deadline=deadline,
        on_record=on_record,
    )
    train_s = time.perf_counter() - train_started
    return _finish(probe, started=started, data_s=data_s, train_s=train_s)


def _layer_infos(model: Network) -> list[LayerInfo]:
    def feeds_batch_norm(position: int) -> bool:
        # Batch norm subtracts the batch mean of its input, so a bias right before it gets no gradient.
        layer = model.layers[position]
        following = model.layers[position + 1] if position + 1 < len(model.layers) else None
        return (
            layer.kind != "norm"
            and layer.bias is not None
            and following is not None
            and isinstance(following.module, nn.BatchNorm1d | nn.BatchNorm2d)
            and following.name.rpartition(".")[0] == layer.name.rpartition(".")[0]
        )

    return [
        LayerInfo(
            index=layer.index,
            name=layer.name,
            kind=layer.kind,
            params=layer.params,
            structural_zero_bias=feeds_batch_norm(position),
        )
        for position, layer in enumerate(model.layers)
    ]


def _records(step: int, rows: list[list[float]]) -> list[LayerRecord]:
    """One LayerRecord per row of `Recorder.layer_stats`, non-finite values as None.

    The values are Python floats from ``tolist()``, already of the model's field types, so the records
    are constructed without validation: recording every step must cost next to nothing.
    """
    isfinite = math.isfinite
    records = []
    for index, row in enumerate(rows):
        values: dict[str, Any] = {
            name: value if isfinite(value) else None for name, value in zip(STAT_COLUMNS, row, strict=True)
        }
        records.append(LayerRecord.model_construct(step=step, layer=index, **values))
    return records


def _record_time(probe: _Probe, step: int) -> None:
    """A recorded step's gradient through time, where the network has recurrent layers."""
    if probe.time_recorder is not None and probe.time_recorder.layers:
        probe.time_records += probe.time_recorder.rows(step)


def _metrics(probe: _Probe) -> Tensor:
    """The (steps run × 4) matrix of loss, accuracy, total norm pre and post clipping (NaN: not computed)."""
    metrics = torch.full((probe.steps_run, 4), float("nan"), device=probe.device)
    if probe.steps_run:
        losses = probe.losses[: probe.steps_run]
        floats = [x for x in losses if isinstance(x, float)]
        tensors = [x for x in losses if isinstance(x, Tensor)]
        metrics[:, 0] = torch.tensor(floats, device=probe.device) if floats else torch.stack(tensors)
        metrics[:, 1] = torch.stack(probe.correct[: probe.steps_run]) / probe.spec.batch_size
    if probe.totals:
        steps = list(probe.totals)
        metrics[steps, 2] = torch.stack([pre for pre, _ in probe.totals.values()]).to(metrics.dtype)
        metrics[steps, 3] = torch.stack([post for _, post in probe.totals.values()]).to(metrics.dtype)
    return metrics


def _steps(metrics: Tensor, steps_run: int) -> list[StepMetrics]:
    return [
        StepMetrics(
            step=step,
            loss=_finite_or_none(loss),
            accuracy=_finite_or_none(acc),
            grad_norm_total_pre=_finite_or_none(pre),
            grad_norm_total_post=_finite_or_none(post),
        )
        for step, (loss, acc, pre, post) in enumerate(metrics[:steps_run].cpu().tolist())
    ]
