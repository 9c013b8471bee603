"""The probe: build the spec's network, train it briefly, record every layer, judge the result.

Read top to bottom: set up, train-and-record loop, held-out evaluation, verdict. Step 0 is the
gradient at initialisation, measured before any update. The loop never raises on a non-finite
loss or gradient: it records the step and the layer, stops, and the verdict says exploding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graddiag.models.networks import Layer, Network, build_network
from graddiag.models.spec import Spec
from graddiag.service.engine.data import ImageSet, make_source
from graddiag.service.engine.recorder import STAT_COLUMNS, Recorder, locate_nonfinite
from graddiag.service.engine.report import EvalResult, LayerInfo, LayerRecord, Report, StepMetrics, Timing
from graddiag.service.engine.theory import theory_for
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
    sees the layers at each recorded step, after backward and before clipping (e.g. to capture
    gradient histograms).
    """
    started = time.perf_counter()
    device = resolve_device(spec.device)
    source = make_source(spec, data=data, device=device, eval_samples=eval_samples)
    data_s = time.perf_counter() - started

    model = build_network(spec).to(device)
    model.train()
    init_weights = [layer.weight.detach().clone() for layer in model.layers if layer.kind == "linear"]
    init_biases = [
        layer.bias.detach().clone() if layer.bias is not None else None
        for layer in model.layers
        if layer.kind == "linear"
    ]
    optimizer = make_optimizer(spec, list(model.parameters()))
    recorder = Recorder(model.layers, spec.activation)
    l1_weights = [layer.weight for layer in model.layers if layer.kind != "norm"]
    # The recorder's parameters are every parameter of the model, so its norms give the total.
    all_params = recorder.params
    if len(all_params) != len(list(model.parameters())):
        raise RuntimeError("network has parameters outside its recorded layers")

    # Whole-model figures stay on the device: (loss, accuracy, total norm pre, total norm post).
    metrics = torch.full((spec.steps, 4), float("nan"), device=device)
    layers = _layer_infos(model)
    # Built once per recorded step, so progress reports do not rebuild every earlier record.
    records: list[LayerRecord] = []
    nonfinite_step: int | None = None
    nonfinite_layer: int | None = None
    last_progress = time.monotonic()
    steps_run = 0

    train_started = time.perf_counter()
    for step in range(spec.steps):
        if should_stop is not None and should_stop():
            raise ProbeCancelled(f"cancelled at step {step}")
        if deadline is not None and time.monotonic() > deadline:
            raise ProbeTimeout(f"wall-clock limit reached at step {step} of {spec.steps}")
        record = step % spec.record_every == 0 or step == spec.steps - 1
        recorder.begin_step(record)

        inputs, labels = source.batch(step)
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels)
        objective = loss
        if spec.l1 > 0:
            objective = loss + spec.l1 * sum(w.abs().sum() for w in l1_weights)
        optimizer.zero_grad(set_to_none=False)
        objective.backward()

        grad_norms = recorder.param_grad_norms()
        if record and on_record is not None:
            on_record(step, model.layers)
        total_pre = torch.linalg.vector_norm(grad_norms)
        if spec.clip_value is not None:
            if spec.clip_mode == "norm":
                nn.utils.clip_grad_norm_(all_params, spec.clip_value, foreach=True)
            else:
                nn.utils.clip_grad_value_(all_params, spec.clip_value, foreach=True)
            total_post = torch.linalg.vector_norm(recorder.param_grad_norms())
        else:
            total_post = total_pre
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        metrics[step] = torch.stack((loss.detach(), accuracy, total_pre, total_post))
        steps_run = step + 1

        # On the CPU a finiteness check costs nothing; on CUDA it is a sync, so only at recorded steps.
        if device.type == "cpu" or record:
            finite = bool(torch.isfinite(metrics[step]).all())
            if not finite:
                nonfinite_step = step
                nonfinite_layer = locate_nonfinite(model.layers, model, inputs)
                records += _records(step, recorder.layer_stats(grad_norms).cpu().tolist())
                break

        if record:
            recorder.snapshot_weights()
        optimizer.step()
        if record:
            records += _records(step, recorder.layer_stats(grad_norms).cpu().tolist())

        if on_progress is not None and time.monotonic() - last_progress >= progress_interval:
            last_progress = time.monotonic()
            loss_now = _finite_or_none(loss.item())
            partial_evidence = measure(layers, records, _steps(metrics, steps_run))
            on_progress(Progress(step + 1, spec.steps, loss_now, decide(spec, partial_evidence, None).label))
    recorder.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - train_started

    # A CUDA run checks finiteness only at recorded steps; find the first bad step afterwards.
    step_metrics = _steps(metrics, steps_run)
    if nonfinite_step is None:
        bad = [m.step for m in step_metrics if None in (m.loss, m.grad_norm_total_pre)]
        if bad:
            nonfinite_step = bad[0]

    eval_started = time.perf_counter()
    heldout_x, heldout_y = source.heldout()
    eval_loss, eval_acc = _evaluate(model, heldout_x, heldout_y) if nonfinite_step is None else (math.nan, math.nan)
    eval_s = time.perf_counter() - eval_started

    evidence = measure(layers, records, step_metrics, nonfinite_step=nonfinite_step, nonfinite_layer=nonfinite_layer)
    theory = theory_for(spec, init_weights[1:-1], list(init_biases[1:-1]), evidence.act_decades_per_layer)
    verdict = decide(spec, evidence, theory)

    tail = [m for m in step_metrics[-10:] if m.loss is not None]
    train_loss = sum(m.loss for m in tail if m.loss is not None) / len(tail) if tail else None
    train_acc = sum(m.accuracy for m in tail if m.accuracy is not None) / len(tail) if tail else None
    held_loss = _finite_or_none(eval_loss)
    return Report(
        spec=spec,
        layers=layers,
        steps=step_metrics,
        records=records,
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
            device=str(device),
            data_s=round(data_s, 4),
            train_s=round(train_s, 4),
            eval_s=round(eval_s, 4),
            total_s=round(time.perf_counter() - started, 4),
            step_ms=round(1000 * train_s / max(steps_run, 1), 4),
            steps_run=steps_run,
        ),
    )


def _layer_infos(model: Network) -> list[LayerInfo]:
    return [
        LayerInfo(index=layer.index, name=layer.name, kind=layer.kind, params=layer.params) for layer in model.layers
    ]


def _records(step: int, rows: list[list[float]]) -> list[LayerRecord]:
    return [
        LayerRecord(
            step=step,
            layer=index,
            **{name: _finite_or_none(value) for name, value in zip(STAT_COLUMNS, row, strict=True)},
        )
        for index, row in enumerate(rows)
    ]


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
