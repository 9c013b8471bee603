"""Measures per-layer gradient statistics during training, cheaply.

Measurement point: every statistic of a step is taken after ``backward()`` and before gradient
clipping, except ``grad_norm_total_post`` (after clipping) and ``update_ratio`` (the step the
optimizer takes, so it reflects clipping). All per-layer norms come from batched
``torch._foreach_norm`` passes and stay on the device; the host receives one stacked tensor per
recorded step, never one ``.item()`` per layer, so a CUDA run does not synchronise per layer.

Only recorded steps cost anything: the forward hooks exist while a recorded step runs (``begin_step``
registers and removes them), and every method here is called on recorded steps only by the probe.
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


_OWNER_INDEX: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}


def _precise_norms(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of each tensor, one batched pass; tensors over _CHUNK entries are summed chunk by chunk.

    Small tensors and the chunks of large ones go through a single ``_foreach_norm`` call, so the
    float64 combination costs no second read of the large tensors.
    """
    pieces: list[Tensor] = []
    owners: list[int] = []
    for i, tensor in enumerate(tensors):
        if tensor.numel() > _CHUNK:
            parts = tensor.reshape(-1).split(_CHUNK)
            pieces += parts
            owners += [i] * len(parts)
        else:
            pieces.append(tensor)
            owners.append(i)
    norms = torch.stack(torch._foreach_norm(pieces))
    if len(pieces) == len(tensors):
        return norms
    device = norms.device
    key = (device, tuple(owners))
    index = _OWNER_INDEX.get(key)
    if index is None:
        # A network has a few fixed layouts (its gradients, its weights): build each index vector once.
        if len(_OWNER_INDEX) >= 64:  # a long-lived worker sees many specs: keep the cache small
            _OWNER_INDEX.clear()
        index = _OWNER_INDEX[key] = torch.tensor(owners, device=device)
    squares = torch.zeros(len(tensors), dtype=torch.float64, device=device).index_add_(
        0, index, norms.double().square()
    )
    return squares.sqrt().to(norms.dtype)


def _exact_norms(tensors: Sequence[Tensor]) -> Tensor:
    """`_precise_norms`, with the norms float32 may have underflowed recomputed in float64 (a recorded step's)."""
    return _rescue_underflow(_precise_norms(tensors), tensors)


def _rescue_underflow(norms: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """`norms` of `tensors`, those float32 may have underflowed recomputed in float64 (in place)."""
    for i in (norms < _UNDERFLOW_NORM).nonzero().flatten().tolist():
        norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)
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
        # Entries of each layer's output, to turn its norm into an RMS in one division per step; the
        # divisors are built once per layout (on CUDA a new host-to-device copy each step would wait).
        self._act_numel: list[int] = [1] * len(self.layers)
        self._act_roots: tuple[list[int], Tensor] | None = None
        self._saturation: list[Tensor | None] = [None] * len(self.layers)
        self._weights_before: list[Tensor] | None = None
        self._buffers: list[Tensor] | None = None
        self._activation = activation
        device = self.weights[0].device
        self._numels = torch.tensor([float(w.numel()) for w in self.weights], device=device)
        # Index vectors into param_grad_norms' result, built once: a bias-less layer points one past the
        # end, where layer_stats appends a NaN.
        self._weight_index = torch.tensor(self._weight_pos, device=device)
        self._bias_index = torch.tensor([len(self.params) if i is None else i for i in self._bias_pos], device=device)
        # Hooks exist only while a recorded step runs: an unrecorded step's forward and backward make
        # no Python call a bare loop would not make (begin_step registers and removes them).
        self._handles: list[RemovableHandle] = []

    def _register_hooks(self) -> None:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(partial(self._on_output, i)))
            if self._activation in SATURATING and layer.activation is not None:
                hook = partial(self._on_activation, i, self._activation)
                self._handles.append(layer.activation.register_forward_hook(hook))

    def close(self) -> None:
        """Remove every hook from the network."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_output(self, index: int, _module: nn.Module, _inputs: object, output: Tensor) -> None:
        if not self.recording:
            return
        # The norm here; layer_stats divides every layer's by √(entries) at once (the RMS: comparable
        # across layers of different widths and batch sizes).
        self._act_norm[index] = torch.linalg.vector_norm(output.detach())
        self._act_numel[index] = output.numel()
        if output.requires_grad:
            output.register_hook(partial(self._on_output_grad, index))

    def _on_output_grad(self, index: int, grad: Tensor) -> None:
        grad = grad.detach()
        norm = torch.linalg.vector_norm(grad)
        # Gradients whose squares underflow float32 (entries below ~1e-19) are measured again. On the
        # CPU reading the norm costs nothing, so only those take a second (float64) pass; on CUDA a
        # prescaled copy's norm is taken every time instead, so that no step waits on the device.
        if grad.device.type == "cpu":
            if float(norm) < _UNDERFLOW_NORM:
                norm = torch.linalg.vector_norm(grad, dtype=torch.float64).to(norm.dtype)
            self._act_grad[index] = norm
            return
        rescued = torch.linalg.vector_norm(grad * _PRESCALE) / _PRESCALE
        self._act_grad[index] = torch.where(norm < _UNDERFLOW_NORM, rescued, norm)

    def _on_activation(self, index: int, activation: str, _module: nn.Module, _inputs: object, output: Tensor) -> None:
        if self.recording:
            self._saturation[index] = _saturated_fraction(activation, output.detach())

    def begin_step(self, record: bool) -> None:
        """Register the hooks for a recorded step's forward and backward pass, or remove them for another."""
        if record and not self._handles:
            self._register_hooks()
        elif not record and self._handles:
            self.close()
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
        return _exact_norms(grads) if precise else torch.stack(torch._foreach_norm(grads))

    def grad_and_weight_norms(self) -> tuple[Tensor, Tensor]:
        """(`param_grad_norms(precise=True)`, `weight_norms()`) from one batched pass over both.

        One pass instead of two spares a second round of chunking, stacking and combining (measured:
        about 0.1 ms of a recorded step of the bench's MLP).
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norms = _precise_norms(grads + [w.detach() for w in self.weights])
        return _rescue_underflow(norms[: len(grads)], grads), norms[len(grads) :]

    def weight_norms(self) -> Tensor:
        """Per layer, ‖W‖ now: call it before the optimizer step to have the weights the gradient was taken at."""
        return _precise_norms([w.detach() for w in self.weights])

    def sgd_update_norms(self, lr: float, weight_decay: float, grad_norms: Tensor | None = None) -> Tensor:
        """Per layer, ‖ΔW‖ = lr·‖g + wd·W‖ that plain SGD (no momentum) is about to apply: call it before its step.

        `g` is each weight's gradient as the optimizer will see it (penalty and clipping included). With
        no weight decay, `grad_norms` (`param_grad_norms(precise=True)` of exactly those gradients) gives
        the answer without another pass. This is the step SGD computes; where it is below float32's
        resolution of W, the weights themselves move less (or not at all).
        """
        if weight_decay == 0 and grad_norms is not None:
            return lr * grad_norms[self._weight_index]
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in self.weights]
        if weight_decay != 0:
            grads = list(torch._foreach_add(grads, [w.detach() for w in self.weights], alpha=weight_decay))
        return lr * _exact_norms(grads)

    def momentum_update_norms(self, optimizer: torch.optim.Optimizer, lr: float) -> Tensor:
        """Per layer, ‖ΔW‖ = lr·‖buf‖ of SGD with momentum (no dampening, not Nesterov): call it after its step.

        The momentum buffer is the step direction itself (buf = μ·buf + g + wd·W; W -= lr·buf), so its
        norm is the update without a copy of the weights.
        """
        state = optimizer.state
        buffers = [
            state[w]["momentum_buffer"] if "momentum_buffer" in state[w] else torch.zeros_like(w) for w in self.weights
        ]
        return lr * _exact_norms(buffers)

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
        # bool().sum(dtype=int32) counts non-zeros ~10x faster than count_nonzero (and 2x faster than an
        # int64 sum) on the CPU; int32 is exact up to 2**31 entries, far above any capped layer. The
        # division is one vector operation over the layers' sizes, not one per layer.
        nonzero = torch.stack(
            [
                w.grad.bool().sum(dtype=torch.int32) if w.grad is not None else self._numels.new_tensor(float("nan"))
                for w in self.weights
            ]
        )
        return 1 - nonzero / self._numels

    def layer_stats(
        self,
        grad_norms: Tensor,
        zero_fracs: Tensor,
        penalty_norms: Tensor | None = None,
        *,
        weight_norms: Tensor | None = None,
        update_norms: Tensor | None = None,
    ) -> Tensor:
        """The (layers × STAT_COLUMNS) matrix of the recorded step, on the device (NaN = not measured).

        `grad_norms` and `zero_fracs` are the results of `param_grad_norms` and `zero_fractions` for this
        step, of the data loss alone (before any penalty and before clipping); `penalty_norms` that of
        `penalty_grad_norms`. `weight_norms` (`weight_norms()` taken before the step) and `update_norms`
        (‖ΔW‖ read from the optimizer, `sgd_update_norms` or `momentum_update_norms`) spare the weight
        snapshot; without them, call this after the optimizer step when `snapshot_weights` was called
        before it (no snapshot and no `update_norms`: the update is not measured).
        """
        device = grad_norms.device
        nan = torch.tensor(float("nan"), device=device)
        weight_grad = grad_norms[self._weight_index]
        bias_grad = torch.cat((grad_norms, nan.view(1).to(grad_norms.dtype)))[self._bias_index]
        # Norms of the weights the gradient was computed at, i.e. before this step's update.
        before = self._weights_before if self._weights_before is not None else [w.detach() for w in self.weights]
        weight_norm = weight_norms if weight_norms is not None else _precise_norms(before)
        if update_norms is not None:
            update_ratio = update_norms / weight_norm
        elif self._weights_before is not None:
            # In place: the buffers become W_before - W_after, refilled at the next snapshot.
            torch._foreach_sub_(self._weights_before, [w.detach() for w in self.weights])
            update_ratio = _precise_norms(self._weights_before) / weight_norm
            self._weights_before = None
        else:
            update_ratio = torch.full_like(weight_norm, float("nan"))
        act_grad = torch.stack([g if g is not None else nan for g in self._act_grad])
        if self._act_roots is None or self._act_roots[0] != self._act_numel:
            roots = [math.sqrt(max(n, 1)) for n in self._act_numel]
            self._act_roots = (list(self._act_numel), torch.tensor(roots, dtype=grad_norms.dtype, device=device))
        act_norm = torch.stack([a if a is not None else nan for a in self._act_norm]) / self._act_roots[1]
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
