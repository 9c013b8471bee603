"""Diagnose any PyTorch model: the public :func:`graddiag.diagnose`.

The same measurement as a probe (`probe.py`), on a model graddiag did not build: `discover` lists its
layers in forward order, the `Recorder` records them, and the verdict judges the main path's depth
profile (branch layers are recorded and listed, never fitted: docs/verdict.md). There is no spec, so
the report carries a `ModelDescription` instead and the mean-field theory says why it does not apply.
"""

from __future__ import annotations

import copy as copying
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graddiag.service.engine.discover import Discovery, discover, unwrap
from graddiag.service.engine.probe import _records, _steps, resolve_device
from graddiag.service.engine.recorder import Recorder, locate_nonfinite
from graddiag.service.engine.report import (
    EvalResult,
    LayerInfo,
    LayerRecord,
    ModelDescription,
    Report,
    StepMetrics,
    Theory,
    Timing,
    Verdict,
)
from graddiag.service.engine.verdict import decide, measure

# The spec's defaults, for a model diagnosed without an optimizer of the user's.
DEFAULT_LR = 0.01
DEFAULT_STEPS = 20
DEFAULT_RECORD_EVERY = 5

LossFn = Callable[[Any, Any], Tensor]


def theory_not_applicable(class_name: str) -> Theory:
    """The theory's answer for a model graddiag did not build."""
    return Theory(
        applicable=False,
        reason=(
            f"Mean-field theory is derived for graddiag's own networks (a chain of equal-width Linear or 3×3 Conv "
            f"layers, each followed by one activation, with the norms and residual blocks of the spec); {class_name} "
            "is a model graddiag did not build, whose widths, branches, kernels and activations the q-map does not "
            "cover, so no prediction is made and the verdict rests on the measured profiles alone."
        ),
    )


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """sgd, momentum, adam or adamw (the spec's names, which the verdict knows), else the class name."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    if type(optimizer) is torch.optim.SGD:
        return "momentum" if group.get("momentum", 0) else "sgd"
    if type(optimizer) is torch.optim.Adam:
        return "adam"
    if type(optimizer) is torch.optim.AdamW:
        return "adamw"
    return type(optimizer).__name__


def describe(
    model: nn.Module, found: Discovery, optimizer: torch.optim.Optimizer, *, loss: str | None, eager: bool = True
) -> ModelDescription:
    """The report's description of `model` (unwrapped) with the optimizer it trains under."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    lr = group.get("lr", 0.0)
    return ModelDescription(
        class_name=type(unwrap(model)).__name__,
        params=sum(p.numel() for p in unwrap(model).parameters()),
        optimizer=optimizer_name(optimizer),
        lr=float(lr.item() if isinstance(lr, Tensor) else lr),
        weight_decay=float(group.get("weight_decay", 0.0) or 0.0),
        loss=loss,
        activations=found.activations,
        width=found.width,
        norm=found.norm,
        branches=found.branches,
        unrecorded=found.unrecorded,
        tied=found.tied,
        eager_statistics=eager,
    )


def layer_infos(found: Discovery) -> list[LayerInfo]:
    """The report's layers, in forward order."""
    return [
        LayerInfo(
            index=layer.index,
            name=layer.name,
            kind=layer.kind,
            params=layer.params,
            structural_zero_bias=layer.feeds_batch_norm,
        )
        for layer in found.layers
    ]


def coupled_weight_decay(optimizer: torch.optim.Optimizer) -> float:
    """The weight decay the optimizer adds to the gradient (all but AdamW's decoupled decay)."""
    if isinstance(optimizer, torch.optim.AdamW) or not optimizer.param_groups:
        return 0.0
    return float(optimizer.param_groups[0].get("weight_decay", 0.0) or 0.0)


def judge(
    description: ModelDescription,
    layers: list[LayerInfo],
    records: list[LayerRecord],
    steps: list[StepMetrics],
    *,
    nonfinite_step: int | None = None,
    nonfinite_layer: int | None = None,
) -> Verdict:
    """The verdict on the main path: branch layers stay out of the depth profile (docs/verdict.md)."""
    branches = set(description.branches)
    main = [layer for layer in layers if layer.index not in branches]
    evidence = measure(main, records, steps, nonfinite_step=nonfinite_step, nonfinite_layer=nonfinite_layer)
    return decide(description, evidence, theory_not_applicable(description.class_name), layers=main, records=records)


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (nested tuples, lists, dicts) on `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _cycle(batches: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    """The batches, again from the start when they run out: a re-iterable (a DataLoader, a list) is
    iterated again; a one-shot iterator's batches are kept and replayed."""
    empty = ValueError("batches is empty: give at least one (inputs, targets) pair")
    if not isinstance(batches, Iterator):
        while True:
            produced = False
            for batch in batches:
                produced = True
                yield batch
            if not produced:
                raise empty
    kept: list[tuple[Any, Any]] = []
    for batch in batches:
        kept.append(batch)
        yield batch
    if not kept:
        raise empty
    while True:
        yield from kept


def _copy_optimizer(optimizer: torch.optim.Optimizer, original: nn.Module, copied: nn.Module) -> torch.optim.Optimizer:
    """The user's optimizer (its class, groups, hyperparameters and state) over the copied model's parameters."""
    position = {id(p): i for i, p in enumerate(original.parameters())}
    params = list(copied.parameters())
    groups = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in position]
        if missing:
            raise ValueError(
                "the optimizer holds parameters that are not the model's: pass copy=False to train in place"
            )
        groups.append({**group, "params": [params[position[id(p)]] for p in group["params"]]})
    clone = type(optimizer)(groups, **optimizer.defaults)
    clone.load_state_dict(optimizer.state_dict())
    return clone


def diagnose(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    *,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int = DEFAULT_STEPS,
    record_every: int = DEFAULT_RECORD_EVERY,
    device: str = "auto",
    copy: bool = True,
) -> Report:
    """Train `model` briefly on `batches`, record every layer's gradients and return the judged report.

    `batches` is any iterable of ``(inputs, targets)`` (a DataLoader, a list), cycled when shorter than
    `steps`; ``model(inputs)`` must give what ``loss_fn(output, targets)`` takes (cross-entropy by
    default). `optimizer` is SGD at lr 0.01 over the model's parameters unless given. With `copy`
    (the default) the model, and the optimizer with its state, are deep-copied first, so the user's
    weights never change; ``copy=False`` trains the model (and the optimizer) in place. Step 0 is the
    gradient at initialisation; every `record_every`-th step and the last are recorded. A non-finite
    loss or gradient stops training and the verdict says exploding.
    """
    if steps < 1 or record_every < 1:
        raise ValueError("steps and record_every must be at least 1")
    started = time.perf_counter()
    target = resolve_device(device)
    original = unwrap(model)
    net = copying.deepcopy(original) if copy else original
    net.to(target)
    if optimizer is None:
        optimizer = torch.optim.SGD(net.parameters(), lr=DEFAULT_LR)
    elif copy:
        optimizer = _copy_optimizer(optimizer, original, net)
    loss_fn = loss_fn or F.cross_entropy
    feed = _cycle(batches)
    first = to_device(next(feed), target)
    pending: list[tuple[Any, Any]] = [first]

    found = discover(net, lambda m: m(first[0]))
    if not found.layers:
        raise ValueError(f"{type(original).__name__} has no module with a weight that its forward pass calls")
    description = describe(net, found, optimizer, loss=getattr(loss_fn, "__name__", type(loss_fn).__name__))
    layers = layer_infos(found)
    saturating = found.activations[0] if any(layer.activation is not None for layer in found.layers) else ""
    recorder = Recorder(found.layers, saturating)
    recorded_ids = {id(p) for p in recorder.params}
    others = [p for p in net.parameters() if id(p) not in recorded_ids]
    wd = coupled_weight_decay(optimizer)
    data_s = time.perf_counter() - started

    net.train()
    metrics = torch.full((steps, 4), float("nan"), device=target)
    records: list[LayerRecord] = []
    nonfinite_step: int | None = None
    nonfinite_layer: int | None = None
    steps_run = 0
    train_started = time.perf_counter()
    try:
        for step in range(steps):
            record = step % record_every == 0 or step == steps - 1
            inputs, targets = pending.pop() if pending else to_device(next(feed), target)
            recorder.begin_step(record)
            output = net(inputs)
            loss = loss_fn(output, targets)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            grad_norms = recorder.param_grad_norms(precise=record)
            zero_fracs = recorder.zero_fractions() if record else None
            penalty = recorder.penalty_grad_norms(0.0, wd) if record else None
            # The total is of every parameter's gradient, those outside any recorded layer included.
            squares = grad_norms.square().sum()
            grads = [p.grad for p in others if p.grad is not None]
            if grads:
                squares = squares + torch.stack(torch._foreach_norm(grads)).square().sum()
            total = squares.sqrt()
            metrics[step] = torch.stack((loss.detach().float(), _accuracy(output, targets), total, total))
            steps_run = step + 1
            # Loss and total gradient norm (the accuracy is NaN by design for tasks other than classification).
            if not bool(torch.isfinite(metrics[step, [0, 2]]).all()):
                nonfinite_step = step
                nonfinite_layer = locate_nonfinite(found.layers, net, inputs)
                fracs = zero_fracs if zero_fracs is not None else recorder.zero_fractions()
                records += _records(step, recorder.layer_stats(grad_norms, fracs, penalty).cpu().tolist())
                break
            if record:
                recorder.snapshot_weights()
            optimizer.step()
            if record:
                assert zero_fracs is not None
                records += _records(step, recorder.layer_stats(grad_norms, zero_fracs, penalty).cpu().tolist())
    finally:
        recorder.close()
    train_s = time.perf_counter() - train_started

    step_metrics = _steps(metrics, steps_run)
    verdict = judge(
        description, layers, records, step_metrics, nonfinite_step=nonfinite_step, nonfinite_layer=nonfinite_layer
    )
    return Report(
        spec=None,
        model=description,
        layers=layers,
        steps=step_metrics,
        records=records,
        verdict=verdict,
        eval=training_figures(step_metrics),
        timing=Timing(
            device=str(target),
            data_s=round(data_s, 4),
            train_s=round(train_s, 4),
            eval_s=0.0,
            total_s=round(time.perf_counter() - started, 4),
            step_ms=round(1000 * train_s / max(steps_run, 1), 4),
            steps_run=steps_run,
        ),
    )


def _accuracy(output: Any, targets: Any) -> Tensor:
    """Batch accuracy for class logits (N × C) against class indices (N); NaN for any other task."""
    if (
        isinstance(output, Tensor)
        and isinstance(targets, Tensor)
        and output.dim() == 2
        and targets.dim() == 1
        and not targets.is_floating_point()
        and len(output) == len(targets)
    ):
        return (output.detach().argmax(1) == targets).float().mean()
    device = output.device if isinstance(output, Tensor) else None
    return torch.tensor(math.nan, device=device)


def training_figures(steps: list[StepMetrics]) -> EvalResult:
    """The training figures over the last 10 steps; no held-out set: graddiag has none for a user's model."""
    tail = [m for m in steps[-10:] if m.loss is not None]
    accuracies = [m.accuracy for m in tail if m.accuracy is not None]
    return EvalResult(
        loss=None,
        accuracy=None,
        samples=0,
        train_loss=sum(m.loss for m in tail if m.loss is not None) / len(tail) if tail else None,
        train_accuracy=sum(accuracies) / len(accuracies) if accuracies else None,
        generalization_gap=None,
    )
