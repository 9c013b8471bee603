"""Record inside the user's own training loop: the public :func:`graddiag.watch`.

    with graddiag.watch(model, optimizer, every=10) as w:
        for inputs, targets in loader:
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            w.loss(loss)          # optional: the report then has the loss curve
    report = w.report()

How: a forward pre-hook on the model finds its layers on its first forward pass (`discover`, on the same
inputs) and arms the `Recorder` before every forward; the optimizer's step pre-hook reads the gradients
the optimizer is about to use (after the user's own clipping, if any) and the step post-hook the update it
made. A step that is not recorded costs one attribute check per hooked module and two empty optimizer
hooks, nothing on the device. Step k is the k-th ``optimizer.step()`` inside the block; every `every`-th
(0, every, 2·every, ...) is recorded.

A ``torch.compile``'d model is watched through its optimizer only: module hooks would be traced into (or
silently dropped from) the compiled graph, so the forward statistics (act_norm, act_grad_norm,
saturation_frac) are null and the description says ``eager_statistics: false``; the parameter-gradient
statistics (grad_norm, bias_grad_norm, weight_norm, rel_grad, update_ratio, zero_grad_frac) are recorded.
DataParallel and DistributedDataParallel models are unwrapped for their layers and names; their
gradients are the reduced ones the optimizer steps with.

Gradient accumulation (several forward passes per ``optimizer.step()``): the gradient statistics are of
the accumulated gradient the step uses, the forward ones of the last pass. Under a GradScaler the
optimizer sees unscaled gradients, and a step the scaler skips (non-finite gradients) never calls
``optimizer.step()``, so it is neither counted nor recorded.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from graddiag.service.engine.diagnose import coupled_weight_decay, describe, judge, layer_infos, training_figures
from graddiag.service.engine.discover import Discovery, FoundLayer, Tap, discover, unwrap
from graddiag.service.engine.probe import _records
from graddiag.service.engine.recorder import Recorder
from graddiag.service.engine.report import LayerRecord, Report, StepMetrics, Timing


def is_compiled(model: nn.Module) -> bool:
    """Whether `model` (or a wrapper around it) runs through torch.compile."""
    while True:
        if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
            return True
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return False


def _selected(layer: FoundLayer, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    names = [layer.name, f"{layer.name}.weight", f"{layer.name}.bias"]

    def matches(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)

    return (include is None or matches(include)) and not matches(exclude)


def _plain_sgd(optimizer: torch.optim.Optimizer) -> tuple[float, float] | None:
    """(lr, momentum) of a torch.optim.SGD whose update the Recorder can read without a weight snapshot:
    one setting for all groups, no dampening, not Nesterov, not maximising; None for any other optimizer."""
    if type(optimizer) is not torch.optim.SGD or not optimizer.param_groups:
        return None
    settings = {
        (g["lr"], g["momentum"], g["dampening"], g["nesterov"], g["maximize"], g["weight_decay"])
        for g in optimizer.param_groups
    }
    if len(settings) != 1:
        return None
    lr, momentum, dampening, nesterov, maximize, _ = settings.pop()
    if dampening or nesterov or maximize or isinstance(lr, Tensor):
        return None
    return float(lr), float(momentum)


class Watch:
    """Records a model's layers inside the caller's loop; :meth:`report` judges what was recorded."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        every: int = 10,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        if every < 1:
            raise ValueError("every must be at least 1")
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude)
        self.eager = not is_compiled(model)
        self.found: Discovery | None = None
        self.recorder: Recorder | None = None
        self.records: list[LayerRecord] = []
        self.steps: list[StepMetrics] = []
        self.step = 0
        self.nonfinite_step: int | None = None
        self.nonfinite_layer: int | None = None
        self._handles: list[RemovableHandle] = []
        # A recorded step's figures from before optimizer.step(), for after it: grad norms, zero fractions,
        # penalty norms, weight norms and update norms (the last two None where a weight snapshot is used).
        self._pending: tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None] | None = None
        self._loss: Tensor | None = None
        self._loss_step = -1
        self._paused = False
        self._discovering = False
        self._forward_since_step = False
        self._started = 0.0
        self._elapsed = 0.0
        self._device = "cpu"

    # --- the context ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._started = time.perf_counter()
        self._handles = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward),
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
        ]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook; what was recorded stays (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.recorder is not None:
            self.recorder.close()
        if self._started:
            self._elapsed += time.perf_counter() - self._started
            self._started = 0.0

    def loss(self, value: Tensor | float) -> None:
        """The step's loss (optional), for the report's loss curve: call it before or right after the step's
        ``optimizer.step()`` (before the next forward pass). Kept for recorded steps only."""
        if self._forward_since_step:  # before this step's optimizer.step()
            if self.step % self.every == 0:
                self._loss = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
                self._loss_step = self.step
        elif self.steps and self.steps[-1].step == self.step - 1 and self.steps[-1].loss is None:
            loss = float(value.detach() if isinstance(value, Tensor) else value)  # right after a recorded step
            self.steps[-1] = self.steps[-1].model_copy(update={"loss": loss if math.isfinite(loss) else None})

    # --- hooks ---------------------------------------------------------------------------------

    def _discover(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inner = unwrap(self.model)
        found = discover(inner, lambda m: m(*args, **kwargs))
        chosen = [layer for layer in found.layers if _selected(layer, self.include, self.exclude)]
        if not chosen:
            raise ValueError("watch: no layer of the model matches include/exclude")
        # Indices follow the chosen layers' order: the records name layers by position.
        layers = [
            dataclasses.replace(
                layer,
                index=position,
                branch_of=0 if layer.branch_of is not None else None,  # only whether it is a branch is kept
                module=layer.module if self.eager else Tap(None),
                activation=layer.activation if self.eager else None,
            )
            for position, layer in enumerate(chosen)
        ]
        self.found = dataclasses.replace(found, layers=layers)
        saturating = found.activations[0] if any(layer.activation is not None for layer in layers) else ""
        self.recorder = Recorder(layers, saturating)
        self._device = str(layers[0].weight.device)

    def _before_forward(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._discovering:  # discovery's own pass through this very module
            return
        if self.recorder is None:
            self._discovering = True
            try:
                self._discover(args, kwargs)
            finally:
                self._discovering = False
        assert self.recorder is not None
        # Evaluation passes (no grad, or eval mode) between two steps must not overwrite the step's values.
        self._paused = not (torch.is_grad_enabled() and self.model.training)
        if self._paused:
            self.recorder.recording = False
        else:
            self._forward_since_step = True
            self.recorder.begin_step(self.step % self.every == 0)

    def _after_forward(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        if self._discovering:
            return
        if self._paused and self.recorder is not None:
            self._paused = False
            self.recorder.recording = self.step % self.every == 0

    def _before_step(self, _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        recorder = self.recorder
        if recorder is None or self.step % self.every:
            return
        grad_norms = recorder.param_grad_norms(precise=True)
        zero_fracs = recorder.zero_fractions()
        wd = coupled_weight_decay(self.optimizer)
        penalty = recorder.penalty_grad_norms(0.0, wd) if wd else None
        weight_norms: Tensor | None = None
        update_norms: Tensor | None = None
        sgd = _plain_sgd(self.optimizer)
        if sgd is not None:
            # SGD's update is known before it is made (momentum's after, from its buffer): no weight copy.
            lr, momentum = sgd
            weight_norms = recorder.weight_norms()
            if momentum == 0:
                update_norms = recorder.sgd_update_norms(lr, wd, grad_norms)
        else:
            recorder.snapshot_weights()
        self._pending = (grad_norms, zero_fracs, penalty, weight_norms, update_norms)

    def _after_step(self, _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        step = self.step
        self.step += 1
        self._forward_since_step = False
        if self.recorder is None or self._pending is None:
            return
        grad_norms, zero_fracs, penalty, weight_norms, update_norms = self._pending
        self._pending = None
        sgd = _plain_sgd(self.optimizer)
        if weight_norms is not None and update_norms is None and sgd is not None:
            update_norms = self.recorder.momentum_update_norms(self.optimizer, sgd[0])
        stats = self.recorder.layer_stats(
            grad_norms, zero_fracs, penalty, weight_norms=weight_norms, update_norms=update_norms
        )
        rows = _records(step, stats.cpu().tolist())
        self.records += rows
        total = float(torch.linalg.vector_norm(grad_norms))
        loss = float(self._loss) if self._loss is not None and self._loss_step == step else None
        self.steps.append(
            StepMetrics(
                step=step,
                loss=loss if loss is None or math.isfinite(loss) else None,
                accuracy=None,
                grad_norm_total_pre=total if math.isfinite(total) else None,
                grad_norm_total_post=total if math.isfinite(total) else None,
            )
        )
        if self.nonfinite_step is None and (not math.isfinite(total) or (loss is not None and not math.isfinite(loss))):
            self.nonfinite_step = step
            self.nonfinite_layer = next((r.layer for r in rows if r.grad_norm is None), None)

    # --- the result ----------------------------------------------------------------------------

    def report(self) -> Report:
        """The judged report of what was recorded so far (at least one recorded step is needed)."""
        if self.found is None or not self.records:
            raise RuntimeError("watch recorded nothing: run at least one forward pass and optimizer.step() inside it")
        description = describe(self.model, self.found, self.optimizer, loss=None, eager=self.eager)
        layers = layer_infos(self.found)
        verdict = judge(
            description,
            layers,
            self.records,
            self.steps,
            nonfinite_step=self.nonfinite_step,
            nonfinite_layer=self.nonfinite_layer,
        )
        elapsed = self._elapsed + (time.perf_counter() - self._started if self._started else 0.0)
        return Report(
            spec=None,
            model=description,
            layers=layers,
            steps=list(self.steps),
            records=list(self.records),
            verdict=verdict,
            eval=training_figures(self.steps),
            timing=Timing(
                device=self._device,
                data_s=0.0,
                train_s=round(elapsed, 4),
                eval_s=0.0,
                total_s=round(elapsed, 4),
                step_ms=round(1000 * elapsed / max(self.step, 1), 4),
                steps_run=self.step,
            ),
        )


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    every: int = 10,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> Watch:
    """A context manager that records `model`'s layers at every `every`-th ``optimizer.step()`` of the
    caller's own loop; ``w.report()`` (inside or after the block) returns the judged report.

    `include` / `exclude` are fnmatch patterns on layer names (``layer4.*``) or their parameter names
    (``*.bias``): only matching layers (all by default), less the excluded ones, are recorded. Works on
    DataParallel/DistributedDataParallel models and, with parameter statistics only, on torch.compile'd ones.
    """
    return Watch(model, optimizer, every=every, include=include, exclude=exclude)
