"""Finds the layers of any PyTorch model, in the order its forward pass runs them.

Every module that owns a weight is a layer: Linear, Conv1d/2d/3d and their transposes (`conv`),
Embedding/EmbeddingBag (`embedding`), RNN/GRU/LSTM (one `recurrent` layer per input weight and per
recurrent weight, per stacked layer and direction: `lstm.weight_ih_l0`, `lstm.weight_hh_l0`, ...),
MultiheadAttention (its in-projection and out-projection, both `linear`), the norm layers with an affine
weight (`norm`), and any other module with its own weight parameter (`linear` for a matrix, `conv` for
more dimensions, `norm` for a vector). The order is the order of the modules' first calls in one real
forward pass (forward pre-hooks), not `named_modules()` order, so the depth profile follows the data.

A weight shared by several modules (tied embeddings) is one layer, under the first module that used it.
A weight layer whose input is the very tensor an earlier weight layer read (ResNet's downsample beside
the block's first conv) is a **branch**: it sits beside the main path at that layer's depth, and so does
a layer fed directly by a branch (the downsample's batch norm). docs/verdict.md says how they are judged.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from graddiag.models.shapes import LayerKind

# Activation modules by kind; the saturating ones get a saturation statistic when a model uses only one kind.
ACTIVATION_KINDS: dict[type[nn.Module], str] = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Softsign: "softsign",
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
}
_SATURATING = ("sigmoid", "tanh", "softsign")
_NORMS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.batchnorm._BatchNorm, "batch"),
    (nn.LayerNorm, "layer"),
    (nn.GroupNorm, "group"),
    (nn.modules.instancenorm._InstanceNorm, "instance"),
    (nn.RMSNorm, "rms"),
)


def _first_tensor(output: Any) -> Tensor | None:
    # RNNs return (output, state) and MultiheadAttention (output, weights): the first is the signal.
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


class Tap:
    """Where a layer's output is observed: a module's forward output (its first tensor), or nowhere.

    The Recorder registers forward hooks on a layer's `module`; for a layer whose own output no hook
    can see (an RNN's inner weights, attention's in-projection), `module` is None and its hooks never
    fire, so those statistics are recorded as null.
    """

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module

    def register_forward_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register `hook(module, inputs, tensor)` on the module's forward output (no-op without one)."""
        if self.module is None:
            return RemovableHandle(OrderedDict())

        def call(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                hook(module, inputs, tensor)

        return self.module.register_forward_hook(call)


@dataclass(eq=False)
class FoundLayer:
    """A layer of a user's model, as the Recorder reads it (recorder.RecordedLayer)."""

    index: int
    name: str
    kind: LayerKind
    owner: nn.Module
    weight: Tensor
    bias: Tensor | None
    module: Tap
    fan_in: int
    branch_of: int | None = None
    activation: Tap | None = None
    feeds_batch_norm: bool = False

    @property
    def params(self) -> int:
        """Entries of the weight and the bias."""
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)


@dataclass
class Discovery:
    """The layers of a model in forward order, with what did not fit a layer."""

    layers: list[FoundLayer]
    unrecorded: list[str] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)
    activations: list[str] = field(default_factory=list)
    norm: str = "none"

    @property
    def branches(self) -> list[int]:
        """Indices of the layers beside the main path."""
        return [layer.index for layer in self.layers if layer.branch_of is not None]

    @property
    def width(self) -> int | None:
        """The main path's interior weight layers' median fan-in (all weight layers when fewer than 3)."""
        fans = [layer.fan_in for layer in self.layers if layer.kind in ("linear", "conv") and layer.branch_of is None]
        interior = fans[1:-1] if len(fans) > 2 else fans
        return int(statistics.median(interior)) if interior else None


@dataclass
class _Candidate:
    """A weight of a module, before the forward pass ordered it."""

    suffix: str  # appended to the module's name: "" or ".weight_hh_l0" or ".in_proj"
    kind: LayerKind
    weight: Tensor
    bias: Tensor | None
    observed: bool  # whether the module's output is this weight's output


def _fan_in(weight: Tensor, kind: LayerKind, module: nn.Module) -> int:
    if kind == "conv" and isinstance(module, nn.modules.conv._ConvTransposeNd):
        # A transposed conv's weight is (in, out/groups, *k): each output sums in/stride² · k² inputs at
        # most; (in/groups)·k is the usual fan-in convention (torch.nn.init's) and good enough for n.
        return max(weight.shape[1] * int(torch.tensor(weight.shape[2:]).prod().item()), 1)
    if kind in ("linear", "conv", "recurrent"):
        return max(weight[0].numel(), 1)
    return max(weight.numel(), 1)


def _candidates(module: nn.Module) -> list[_Candidate]:
    """The weights `module` owns itself (not its children's), split into layers."""
    own = dict(module.named_parameters(recurse=False))
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            ins = [_Candidate(".in_proj", "linear", module.in_proj_weight, module.in_proj_bias, False)]
        else:  # separate q, k, v projections (kdim or vdim differ from embed_dim)
            ins = [_Candidate(f".{p}_proj", "linear", getattr(module, f"{p}_proj_weight"), None, False) for p in "qkv"]
        out = module.out_proj
        return [*ins, _Candidate(".out_proj", "linear", out.weight, out.bias, True)]
    if isinstance(module, nn.RNNBase):
        found: list[_Candidate] = []
        names = [name for name in own if name.startswith("weight_")]
        for position, name in enumerate(names):
            bias = own.get(name.replace("weight_", "bias_"))
            # The module's output is the last stacked layer's: it is attached to the last weight listed.
            found.append(_Candidate(f".{name}", "recurrent", own[name], bias, position == len(names) - 1))
        return found
    weight = own.get("weight")
    if weight is None:
        return []
    bias = own.get("bias")
    if isinstance(module, nn.modules.conv._ConvNd):
        kind: LayerKind = "conv"
    elif isinstance(module, nn.Embedding | nn.EmbeddingBag):
        kind = "embedding"
    elif isinstance(module, nn.Linear):
        kind = "linear"
    elif weight.dim() <= 1:
        kind = "norm"
    else:
        kind = "linear" if weight.dim() == 2 else "conv"
    return [_Candidate("", kind, weight, bias, True)]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel, DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def discover(model: nn.Module, run_forward: Callable[[nn.Module], Any]) -> Discovery:
    """The layers of `model` (unwrapped) in forward order; `run_forward(model)` runs one forward pass.

    The pass runs under no_grad in eval mode (so batch-norm statistics are not updated), and the
    model's training mode is restored after it.
    """
    model = unwrap(model)
    # MultiheadAttention uses its out_proj's weight functionally (the child is never called): its parent
    # lists it.
    attention_outputs = {m.out_proj for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    owners: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        if module not in attention_outputs:
            owners.setdefault(module, name)

    calls: list[nn.Module] = []
    inputs_of: dict[nn.Module, Any] = {}
    outputs_of: dict[nn.Module, Any] = {}
    activations: set[str] = set()
    activation_calls: list[tuple[int, nn.Module]] = []  # (weight calls so far, activation module)

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        if module not in inputs_of:
            calls.append(module)
            inputs_of[module] = args[0] if args else None

    def after(module: nn.Module, _args: Any, output: Any) -> None:
        outputs_of.setdefault(module, _first_tensor(output))

    def activation_seen(module: nn.Module, _args: Any) -> None:
        activations.add(ACTIVATION_KINDS[type(module)])
        activation_calls.append((len(calls), module))

    handles: list[RemovableHandle] = []
    for module in owners:
        if _candidates(module):
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        elif type(module) in ACTIVATION_KINDS:
            handles.append(module.register_forward_pre_hook(activation_seen))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            run_forward(model)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()

    layers: list[FoundLayer] = []
    seen: dict[int, str] = {}  # id of a weight → the layer that records it
    first_reader: dict[int, int] = {}  # id of an input tensor → index of the first weight layer that read it
    branch_outputs: dict[int, int] = {}  # id of a branch layer's output → the layer it is beside
    saturating = next(iter(activations)) if len(activations) == 1 and activations <= set(_SATURATING) else None
    act_after: dict[int, nn.Module] = {}
    for calls_before, act in activation_calls:
        act_after.setdefault(calls_before, act)  # the first activation called after the n-th layer module
    tied: dict[str, str] = {}
    for position, module in enumerate(calls):
        name = owners[module]
        candidates = _candidates(module)
        # One branch decision per module (attention's projections all read the module's input).
        source = inputs_of.get(module)
        branch_of: int | None = None
        if isinstance(source, Tensor):
            if id(source) in branch_outputs:
                branch_of = branch_outputs[id(source)]
            elif candidates[0].kind in ("linear", "conv") and id(source) in first_reader:
                branch_of = first_reader[id(source)]
            else:
                first_reader.setdefault(id(source), len(layers))
        output = outputs_of.get(module)
        if branch_of is not None and isinstance(output, Tensor):
            branch_outputs[id(output)] = branch_of
        for candidate in candidates:
            layer_name = (name + candidate.suffix).lstrip(".") or type(module).__name__.lower()
            if id(candidate.weight) in seen:
                tied[layer_name] = seen[id(candidate.weight)]
                continue
            seen[id(candidate.weight)] = layer_name
            index = len(layers)
            activation = act_after.get(position + 1) if saturating is not None else None
            layers.append(
                FoundLayer(
                    index=index,
                    name=layer_name,
                    kind=candidate.kind,
                    owner=module,
                    weight=candidate.weight,
                    bias=candidate.bias,
                    module=Tap(module if candidate.observed else None),
                    fan_in=_fan_in(candidate.weight, candidate.kind, module),
                    branch_of=branch_of,
                    activation=Tap(activation) if activation is not None and candidate.kind != "norm" else None,
                )
            )
    # Batch norm subtracts the batch mean of its input, so a bias whose output it reads gets no gradient.
    by_output = {id(outputs_of[layer.owner]): layer for layer in layers if outputs_of.get(layer.owner) is not None}
    for layer in layers:
        source = inputs_of.get(layer.owner)
        feeder = by_output.get(id(source)) if isinstance(source, Tensor) else None
        if isinstance(layer.owner, nn.modules.batchnorm._BatchNorm) and feeder is not None and feeder.bias is not None:
            feeder.feeds_batch_norm = feeder.kind in ("linear", "conv")
    recorded = {id(p) for layer in layers for p in (layer.weight, layer.bias) if p is not None}
    unrecorded = [name for name, p in model.named_parameters() if id(p) not in recorded]
    norms = sorted({kind for layer in layers for cls, kind in _NORMS if isinstance(layer.owner, cls)})
    return Discovery(
        layers=layers,
        unrecorded=unrecorded,
        tied=tied,
        activations=sorted(activations),
        norm=norms[0] if len(norms) == 1 else ("none" if not norms else "+".join(norms)),
    )


def iter_parameters(discovery: Discovery) -> Iterator[Tensor]:
    """Every recorded parameter: each layer's weight, then its bias."""
    for layer in discovery.layers:
        yield layer.weight
        if layer.bias is not None:
            yield layer.bias
