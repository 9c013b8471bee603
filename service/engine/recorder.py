"""Measures per-layer gradient statistics during training, cheaply.

Measurement point: every statistic of a step is taken after ``backward()`` and before gradient
clipping, except ``grad_norm_total_post`` (after clipping) and ``update_ratio`` (the step the
optimizer actually took, so it reflects clipping). All per-layer norms come from one batched
``torch._foreach_norm`` pass and stay on the device; the host receives one stacked tensor per
recorded step, never one ``.item()`` per layer, so a CUDA run does not synchronise per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class HookTarget(Protocol):
    """Something a forward hook can be registered on: an nn.Module, or an adapter that picks its output."""

    def register_forward_hook(self, hook: Callable[..., Any]) -> RemovableHandle: ...


class RecordedLayer(Protocol):
    """What the Recorder reads of a layer: graddiag's own `models.networks.Layer`, or a layer that
    `service.engine.discover` found in a model graddiag did not build."""

    @property
    def index(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def module(self) -> HookTarget: ...
    @property
    def activation(self) -> HookTarget | None: ...
    @property
    def weight(self) -> Tensor: ...
    @property
    def bias(self) -> Tensor | None: ...


# Columns of the per-layer matrix returned by Recorder.layer_stats, in this order.
STAT_COLUMNS = (
    "grad_norm",
    "bias_grad_norm",
    "weight_norm",
    "rel_grad",
    "update_ratio",
    "act_grad_norm",
    "zero_grad_frac",
    "saturation_frac",
    "act_norm",
    "penalty_grad_norm",
)

# float32 squares underflow below ~1e-38, i.e. entries below ~1e-19: a norm under this bound may have lost
# entries and is recomputed (up to 1e6 entries of 1e-19 still give 1e-16, far below it).
_UNDERFLOW_NORM = 1e-12
# 2**60 ≈ 1e18 lifts entries of 1e-25 to 1e-7 while a norm under 1e-12 stays far below float32's maximum.
_PRESCALE = 2.0**60

# float32 norms of large tensors drift: _foreach_norm's float32 accumulation is off by 1.3e-5 at 6e5 entries,
# 5e-5 at 2.4e6 and 1 % at 1e8 (CPU). Recorded norms of larger tensors are taken over chunks of this many
# entries, combined in float64: within 1e-6 at 1e8 entries, for about the cost of the one pass.
_CHUNK = 1 << 16


def _precise_norms(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of each tensor, one batched pass; tensors over _CHUNK entries are summed chunk by chunk."""
    norms = torch.stack(torch._foreach_norm(list(tensors)))
    for i, tensor in enumerate(tensors):
        if tensor.numel() > _CHUNK:
            parts = torch.stack(torch._foreach_norm(list(tensor.reshape(-1).split(_CHUNK))))
            norms[i] = parts.double().square().sum().sqrt()
    return norms


# A unit counts as saturated where the activation's local derivative is below 5% of its maximum,
# computed from the output y: sigmoid y(1-y)/0.25, tanh 1 - y², softsign (1 - |y|)².
_SATURATION_DERIVATIVE = 0.05
SATURATING = ("sigmoid", "tanh", "softsign")


def _saturated_fraction(activation: str, output: Tensor) -> Tensor:
    if activation == "sigmoid":
        derivative = output * (1 - output) / 0.25
    elif activation == "tanh":
        derivative = 1 - output * output
    else:
        derivative = (1 - output.abs()).square()
    return (derivative < _SATURATION_DERIVATIVE).float().mean()


class Recorder:
    """Hooks into a network's layers and turns each step's gradients into device-side statistics."""

    def __init__(self, layers: Sequence[RecordedLayer], activation: str) -> None:
        self.layers = list(layers)
        self.weights: list[Tensor] = [layer.weight for layer in self.layers]
        self.biases: list[Tensor | None] = [layer.bias for layer in self.layers]
        # Every parameter, weights and biases of each layer in forward order, for one foreach pass.
        self.params: list[Tensor] = [
            p for w, b in zip(self.weights, self.biases, strict=True) for p in (w, b) if p is not None
        ]
        self._weight_pos: list[int] = []
        self._bias_pos: list[int | None] = []
        position = 0
        for bias in self.biases:
            self._weight_pos.append(position)
            position += 1
            self._bias_pos.append(position if bias is not None else None)
            position += bias is not None
        self.recording = False
        # Whether the hook buffers hold values of an earlier step: a step that is not recorded must not
        # report them as its own (a non-finite step between records writes its rows with nulls there).
        self._stale = False
        self._act_grad: list[Tensor | None] = [None] * len(self.layers)
        self._act_norm: list[Tensor | None] = [None] * len(self.layers)
        self._saturation: list[Tensor | None] = [None] * len(self.layers)
        self._weights_before: list[Tensor] | None = None
        self._buffers: list[Tensor] | None = None
        self._handles: list[RemovableHandle] = []
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(partial(self._on_output, i)))
            if activation in SATURATING and layer.activation is not None:
                hook = partial(self._on_activation, i, activation)
                self._handles.append(layer.activation.register_forward_hook(hook))

    def close(self) -> None:
        """Remove every hook from the network."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_output(self, index: int, _module: nn.Module, _inputs: object, output: Tensor) -> None:
        if not self.recording:
            return
        # RMS rather than the norm: comparable across layers of different widths and batch sizes.
        self._act_norm[index] = torch.linalg.vector_norm(output.detach()) / math.sqrt(max(output.numel(), 1))
        if output.requires_grad:
            output.register_hook(partial(self._on_output_grad, index))

    def _on_output_grad(self, index: int, grad: Tensor) -> None:
        grad = grad.detach()
        norm = torch.linalg.vector_norm(grad)
        # A second pass on a prescaled copy keeps gradients whose squares underflow float32 (entries
        # below ~1e-19) exact, without a host sync; the first pass keeps huge ones from overflowing.
        rescued = torch.linalg.vector_norm(grad * _PRESCALE) / _PRESCALE
        self._act_grad[index] = torch.where(norm < _UNDERFLOW_NORM, rescued, norm)

    def _on_activation(self, index: int, activation: str, _module: nn.Module, _inputs: object, output: Tensor) -> None:
        if self.recording:
            self._saturation[index] = _saturated_fraction(activation, output.detach())

    def begin_step(self, record: bool) -> None:
        """Arm (or disarm) the hooks for the coming forward and backward pass."""
        self.recording = record
        if record or self._stale:
            self._act_grad = [None] * len(self.layers)
            self._act_norm = [None] * len(self.layers)
            self._saturation = [None] * len(self.layers)
        self._stale = record

    def param_grad_norms(self, precise: bool = False) -> Tensor:
        """L2 norm of every parameter's gradient, one batched pass; a vector on the device.

        `precise` (recorded steps): norms that float32 may have underflowed are recomputed in float64.
        Elsewhere only the total matters, and tiny layers do not change it.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norms = _precise_norms(grads) if precise else torch.stack(torch._foreach_norm(grads))
        if precise:
            for i in (norms < _UNDERFLOW_NORM).nonzero().flatten().tolist():
                norms[i] = torch.linalg.vector_norm(grads[i], dtype=torch.float64)
        return norms

    def snapshot_weights(self) -> None:
        """Copy the weights before the optimizer step, to measure the update it makes."""
        # Buffers are allocated once and refilled: recording every step must cost next to nothing.
        if self._buffers is None:
            self._buffers = [w.detach().clone() for w in self.weights]
        else:
            torch._foreach_copy_(self._buffers, [w.detach() for w in self.weights])
        self._weights_before = self._buffers

    def penalty_grad_norms(self, l1: float, coupled_weight_decay: float) -> Tensor | None:
        """Per layer, ‖l1·sign(W) + wd·W‖: the penalty's share of the weight's gradient, or None if none.

        `coupled_weight_decay` is the weight decay the optimizer adds to the gradient (SGD, Adam; not
        AdamW's decoupled decay). L1 applies to weight layers only, as the probe's penalty does.
        """
        if l1 == 0 and coupled_weight_decay == 0:
            return None
        weights = [w.detach() for w in self.weights]
        penalties = [w * coupled_weight_decay for w in weights]
        if l1 > 0:
            for penalty, weight, layer in zip(penalties, weights, self.layers, strict=True):
                if layer.kind != "norm":
                    penalty.add_(torch.sign(weight), alpha=l1)
        return torch.stack(torch._foreach_norm(penalties))

    def zero_fractions(self) -> Tensor:
        """Per layer, the fraction of exactly-zero entries of ∂L/∂W: call it before a penalty is added."""
        nan = torch.tensor(float("nan"), device=self.weights[0].device)
        # bool().sum(dtype=int32) counts non-zeros ~10x faster than count_nonzero (and 2x faster than an
        # int64 sum) on the CPU; int32 is exact up to 2**31 entries, far above any capped layer.
        return torch.stack(
            [
                1 - w.grad.bool().sum(dtype=torch.int32) / w.grad.numel() if w.grad is not None else nan
                for w in self.weights
            ]
        )

    def layer_stats(self, grad_norms: Tensor, zero_fracs: Tensor, penalty_norms: Tensor | None = None) -> Tensor:
        """The (layers × STAT_COLUMNS) matrix of the recorded step, on the device (NaN = not measured).

        `grad_norms` and `zero_fracs` are the results of `param_grad_norms` and `zero_fractions` for this
        step, of the data loss alone (before any penalty and before clipping); `penalty_norms` that of
        `penalty_grad_norms`. Call this after
        the optimizer step when `snapshot_weights` was called before it.
        """
        device = grad_norms.device
        nan = torch.tensor(float("nan"), device=device)
        weight_grad = grad_norms[self._weight_pos]
        bias_grad = torch.stack([grad_norms[i] if i is not None else nan for i in self._bias_pos])
        # Norms of the weights the gradient was computed at, i.e. before this step's update.
        before = self._weights_before if self._weights_before is not None else [w.detach() for w in self.weights]
        weight_norm = _precise_norms(before)
        if self._weights_before is not None:
            # In place: the buffers become W_before - W_after, refilled at the next snapshot.
            torch._foreach_sub_(self._weights_before, [w.detach() for w in self.weights])
            update_ratio = _precise_norms(self._weights_before) / weight_norm
            self._weights_before = None
        else:
            update_ratio = torch.full_like(weight_norm, float("nan"))
        act_grad = torch.stack([g if g is not None else nan for g in self._act_grad])
        act_norm = torch.stack([a if a is not None else nan for a in self._act_norm])
        saturation = torch.stack([s if s is not None else nan for s in self._saturation])
        penalty = penalty_norms if penalty_norms is not None else torch.full_like(weight_norm, float("nan"))
        columns = (
            weight_grad,
            bias_grad,
            weight_norm,
            weight_grad / weight_norm,
            update_ratio,
            act_grad,
            zero_fracs,
            saturation,
            act_norm,
            penalty,
        )
        return torch.stack(columns, dim=1)


def locate_nonfinite(layers: Sequence[RecordedLayer], model: nn.Module, inputs: Tensor) -> int | None:
    """Index of the first layer where a non-finite value appeared, or None if none is found.

    Looks in the order a value goes bad: a weight an earlier update already broke, then the first
    forward output that overflows, then the gradient nearest the output (where backprop starts).
    """
    for layer in layers:
        if not torch.isfinite(layer.weight).all():
            return layer.index
    bad_outputs: list[int] = []

    def check(index: int, _module: nn.Module, _inputs: object, output: Tensor) -> None:
        if not torch.isfinite(output).all():
            bad_outputs.append(index)

    handles = [layer.module.register_forward_hook(partial(check, layer.index)) for layer in layers]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if bad_outputs:
        return min(bad_outputs)
    for layer in reversed(layers):
        grad = layer.weight.grad
        if grad is not None and not torch.isfinite(grad).all():
            return layer.index
    return None
