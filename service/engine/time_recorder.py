"""Measures the gradient through time of a recurrent net's layers: ‖∂L/∂h_t‖ at every time step.

At a recorded step each :class:`~graddiag.models.networks.Recurrent` layer hands its states to a state
hook at every time step; the hook registers a gradient hook on h_t (and the LSTM's c_t), which autograd
calls with the *total* derivative ∂L/∂h_t — every path summed: the layer above at t, the recurrence to
t + 1, the classifier at the last step. Norms are taken in float64 (a vanishing profile falls tens of
decades over 32 steps; float32 squares underflow below entries of ~1e-19) and stay on the device until
`rows` stacks them into one host copy. Steps that record nothing register nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from graddiag.models.networks import Recurrent
from graddiag.service.engine.report import TimeRecord

# Columns of a time step's measurements, in the order `rows` stacks them.
_COLUMNS = ("grad_norm", "cell_grad_norm", "state_rms", "gate_mean", "saturation_frac")
# A unit counts as saturated where its local derivative is under 5 % of the maximum: a sigmoid gate's
# σ(1 − σ)/0.25, a tanh state's 1 − h² (the recorder's rule for the layers' activations).
_SATURATION_DERIVATIVE = 0.05


class TimeRecorder:
    """Per recurrent layer and time step, the statistics of one recorded step (see the module docstring)."""

    def __init__(self, layers: Sequence[tuple[int, Recurrent]], length: int) -> None:
        self.layers = list(layers)
        self.length = length
        self._handles: list[RemovableHandle] = []
        self._values: list[list[list[Tensor | None]]] = []

    def begin_step(self, record: bool) -> None:
        """Register the state hooks for a recorded step (clearing the last one's values), or remove them."""
        if record:
            self._values = [[[None] * len(_COLUMNS) for _ in range(self.length)] for _ in self.layers]
            if not self._handles:
                self._handles = [
                    cell.register_state_hook(partial(self._on_state, slot))
                    for slot, (_, cell) in enumerate(self.layers)
                ]
        else:
            # A step that records nothing must not report the last recorded step's values as its own.
            self._values = []
            self.close()

    def close(self) -> None:
        """Remove every state hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_state(
        self, slot: int, t: int, h: Tensor, c: Tensor | None, keep: Tensor | None, gates: tuple[Tensor, ...]
    ) -> None:
        cell = self.layers[slot][1]
        values = self._values[slot][t]
        state = h.detach()
        values[2] = torch.linalg.vector_norm(state, dtype=torch.float64) / max(state.numel(), 1) ** 0.5
        if keep is not None:
            values[3] = keep.detach().double().mean()
        if gates:
            sigmoid = torch.cat([g.detach().flatten() for g in gates])
            values[4] = (sigmoid * (1 - sigmoid) / 0.25 < _SATURATION_DERIVATIVE).double().mean()
        elif cell.activation == "tanh":
            values[4] = (1 - state * state < _SATURATION_DERIVATIVE).double().mean()
        if h.requires_grad:
            h.register_hook(partial(self._on_grad, values, 0))
        if c is not None and c.requires_grad:
            c.register_hook(partial(self._on_grad, values, 1))

    @staticmethod
    def _on_grad(values: list[Tensor | None], column: int, grad: Tensor) -> None:
        values[column] = torch.linalg.vector_norm(grad.detach(), dtype=torch.float64)

    def rows(self, step: int) -> list[TimeRecord]:
        """The recorded step's TimeRecords, layer by layer, t = 0 first; unmeasured values are None.

        Call after backward. The values cross to the host in one copy.
        """
        if not self.layers or not self._values:
            return []
        device = self.layers[0][1].hh.weight.device
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
        flat = [value if value is not None else nan for layer in self._values for t in layer for value in t]
        table = torch.stack(flat).view(len(self.layers), self.length, len(_COLUMNS)).cpu().tolist()
        records = []
        for (index, _), per_t in zip(self.layers, table, strict=True):
            for t, row in enumerate(per_t):
                values = {
                    name: value if math.isfinite(value) else None for name, value in zip(_COLUMNS, row, strict=True)
                }
                records.append(TimeRecord.model_construct(step=step, layer=index, t=t, **values))
        return records
