"""The networks graddiag probes, built from a Spec, with a forward-ordered record of their layers.

mlp: flatten → ``input`` (Linear 3072→width) → ``hidden1`` … ``hidden{depth-1}`` (Linear width→width) →
``output`` (Linear width→10). Every hidden block is linear → norm → activation; with ``residual`` each
block after ``input`` computes x + block(x).

cnn: ``depth`` 3×3 convolutions (padding 1) of ``width`` channels in min(3, depth) stages, split as
evenly as possible with earlier stages taking the extra convs, a MaxPool2d(2) after every stage but the
last, then global average pooling and ``output`` (Linear width→10). The first conv is ``stem`` (3→width)
and counts towards stage 1. Without ``residual`` every other conv is a block ``stage{s}.layer{j}``:
conv → norm → activation. With ``residual`` the rest of each stage forms basic blocks
``stage{s}.block{j}`` (conv1 → norm1 → act1 → conv2 → norm2, then act(x + ·)); a stage's odd conv out is
a last one-conv block (conv → norm, then act(x + ·)).

Layer names are the modules' qualified names in the network (``dict(network.named_modules())``), e.g.
``hidden3.linear``, ``hidden3.norm``, ``stem.conv``, ``stage2.block1.conv2``, ``output.linear``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from graddiag.models.init import LEAKY_RELU_SLOPE, initialise
from graddiag.models.shapes import CONV_KERNEL, IMAGE_SHAPE, INPUT_FEATURES, NUM_CLASSES, LayerKind, cnn_stage_sizes
from graddiag.models.spec import Spec

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(negative_slope=LEAKY_RELU_SLOPE),
    "elu": lambda: nn.ELU(alpha=1.0),
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softsign": nn.Softsign,
    "identity": nn.Identity,
}

# Module constructors draw PyTorch's default init from the process-wide RNG; serialising builds keeps two
# concurrent builds from interleaving their draws.
_GLOBAL_RNG_LOCK = threading.Lock()


@dataclass(frozen=True)
class Layer:
    """A parameterised layer of a Network: a weight layer (linear, conv) or a norm layer."""

    index: int
    name: str
    kind: LayerKind
    module: nn.Module
    activation: nn.Module | None
    params: int

    @property
    def weight(self) -> Tensor:
        """The weight (linear, conv) or scale (norm) parameter."""
        weight = self.module.weight
        assert isinstance(weight, Tensor)
        return weight

    @property
    def bias(self) -> Tensor | None:
        """The bias parameter, or None where the module has none."""
        bias = getattr(self.module, "bias", None)
        return bias if isinstance(bias, Tensor) else None


class Network(nn.Module):
    """Named blocks run one after another; `layers` lists every parameterised layer in forward order."""

    layers: list[Layer]

    def __init__(self, blocks: Iterable[tuple[str, nn.Module]]) -> None:
        super().__init__()
        for name, block in blocks:
            self.add_module(name, block)
        self.layers = _collect_layers(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, 10) for images (B, 3, 32, 32)."""
        for block in self.children():
            x = block(x)
        return x


def make_activation(name: str) -> nn.Module:
    """A fresh module for one of the spec's activations (leaky_relu slope 0.01, elu alpha 1).

    Never inplace, so forward hooks on a layer and on its activation each see that module's own output.
    """
    try:
        factory = _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None
    return factory()


def build_network(spec: Spec) -> Network:
    """Build and initialise the network a spec describes (see the module docstring for its shape).

    Deterministic: the same spec, seed included, gives identical weights. Construction runs under a
    forked global RNG seeded with spec.seed, so the caller's global RNG state is left as it was, and
    initialisation draws from a local generator.
    """
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        network = Network(_mlp_blocks(spec) if spec.arch == "mlp" else _cnn_blocks(spec))
        # Continue the construction stream rather than reseed with spec.seed: a second stream from the
        # same seed would replay the bits behind the default biases, making new weights functions of them.
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
    initialise(network, spec, generator)
    return network


class _SkipBlock(nn.Sequential):
    """x + block(x) with the activation inside the block: the residual MLP block."""

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class _ResidualConvBlock(nn.Sequential):
    """act(x + branch(x)): every child but the last is the branch, the last is the post-sum activation."""

    def forward(self, x: Tensor) -> Tensor:
        *branch, activation = self
        h = x
        for module in branch:
            h = module(h)
        return activation(x + h)


def _norm(spec: Spec) -> nn.Module | None:
    match (spec.norm, spec.arch):
        case ("batch", "mlp"):
            return nn.BatchNorm1d(spec.width)
        case ("layer", "mlp"):
            return nn.LayerNorm(spec.width)
        case ("batch", "cnn"):
            return nn.BatchNorm2d(spec.width)
        case ("layer", "cnn"):
            # One group: normalise over channels and space together, layer norm for feature maps.
            return nn.GroupNorm(1, spec.width)
    return None


def _weight_and_norm(spec: Spec, weight: nn.Module, suffix: str = "") -> list[tuple[str, nn.Module]]:
    kind = "linear" if spec.arch == "mlp" else "conv"
    parts = [(f"{kind}{suffix}", weight)]
    norm = _norm(spec)
    if norm is not None:
        parts.append((f"norm{suffix}", norm))
    return parts


def _mlp_blocks(spec: Spec) -> list[tuple[str, nn.Module]]:
    def hidden(in_features: int, residual: bool) -> nn.Module:
        parts = _weight_and_norm(spec, nn.Linear(in_features, spec.width))
        parts.append(("act", make_activation(spec.activation)))
        return (_SkipBlock if residual else nn.Sequential)(OrderedDict(parts))

    blocks = [("flatten", nn.Flatten()), ("input", hidden(INPUT_FEATURES, residual=False))]
    blocks += [(f"hidden{i}", hidden(spec.width, spec.residual)) for i in range(1, spec.depth)]
    blocks.append(("output", nn.Sequential(OrderedDict(linear=nn.Linear(spec.width, NUM_CLASSES)))))
    return blocks


def _cnn_blocks(spec: Spec) -> list[tuple[str, nn.Module]]:
    def conv(in_channels: int) -> nn.Conv2d:
        return nn.Conv2d(in_channels, spec.width, kernel_size=CONV_KERNEL, padding=CONV_KERNEL // 2)

    def plain(in_channels: int) -> nn.Module:
        parts = _weight_and_norm(spec, conv(in_channels))
        parts.append(("act", make_activation(spec.activation)))
        return nn.Sequential(OrderedDict(parts))

    def residual(convs: int) -> nn.Module:
        if convs == 1:
            parts = _weight_and_norm(spec, conv(spec.width))
        else:
            parts = [
                *_weight_and_norm(spec, conv(spec.width), "1"),
                ("act1", make_activation(spec.activation)),
                *_weight_and_norm(spec, conv(spec.width), "2"),
            ]
        parts.append(("act", make_activation(spec.activation)))
        return _ResidualConvBlock(OrderedDict(parts))

    sizes = cnn_stage_sizes(spec.depth)
    stages = len(sizes)
    sizes[0] -= 1  # the stem is stage 1's first conv
    blocks = [("stem", plain(IMAGE_SHAPE[0]))]
    for stage, size in enumerate(sizes, start=1):
        if spec.residual:
            convs_per_block = [2] * (size // 2) + [1] * (size % 2)
            members = [(f"block{j}", residual(n)) for j, n in enumerate(convs_per_block, start=1)]
        else:
            members = [(f"layer{j}", plain(spec.width)) for j in range(1, size + 1)]
        if members:
            blocks.append((f"stage{stage}", nn.Sequential(OrderedDict(members))))
        if stage < stages:
            blocks.append((f"pool{stage}", nn.MaxPool2d(2)))
    blocks += [
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("output", nn.Sequential(OrderedDict(linear=nn.Linear(spec.width, NUM_CLASSES)))),
    ]
    return blocks


def _kind(module: nn.Module) -> LayerKind | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm):
        return "norm"
    return None


def _collect_layers(network: nn.Module) -> list[Layer]:
    """Every parameterised leaf module of `network`, in forward order.

    Blocks register their children in the order they run them, so registration order is forward order.
    A weight layer's activation is the next sibling in its block that is neither a weight nor a norm
    layer: for the last conv of a residual block that is the activation after the sum.
    """
    leaves = [(name, m) for name, m in network.named_modules() if next(m.children(), None) is None]
    layers: list[Layer] = []
    for position, (name, module) in enumerate(leaves):
        kind = _kind(module)
        if kind is None:
            continue
        activation = None
        if kind != "norm":
            block = name.rpartition(".")[0]
            activation = next(
                (m for n, m in leaves[position + 1 :] if n.rpartition(".")[0] == block and _kind(m) is None),
                None,
            )
        params = sum(p.numel() for p in module.parameters())
        layers.append(Layer(len(layers), name, kind, module, activation, params))
    return layers
