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

rnn, gru, lstm: ``rows`` reads each image row by row (32 time steps of 96 features: 32 pixels × RGB),
then ``{arch}1`` … ``{arch}{depth}`` stacked recurrent layers of ``width`` hidden units, each unrolled over
time (:class:`Recurrent`: ``ih`` projects the whole input sequence at once, ``hh`` is the recurrent matrix
applied at every step, PyTorch's cell equations and gate order), ``last`` keeps the top layer's last
hidden state and ``output`` (Linear width→10) classifies it.

transformer: ``patches`` cuts each image into 4×4 patches (64 tokens of 48 features), ``embed`` projects
them to ``width`` (``embed.linear``), prepends a class token (``embed.cls``, pooling='cls') and adds a
learned position table (``embed.pos``), then ``block1`` … ``block{depth}`` (:class:`Block`: multi-head
self-attention ``attn.q/k/v/out`` and an MLP ``mlp.fc1 → act → mlp.fc2``, layer norms before each
sub-block (pre) or after each residual sum (post)), a final ``norm`` (pre only), ``pool`` (the class token
or the mean token) and ``output`` (Linear width→10).

Layer names are the modules' qualified names in the network (``dict(network.named_modules())``), e.g.
``hidden3.linear``, ``hidden3.norm``, ``stem.conv``, ``stage2.block1.conv2``, ``output.linear``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from graddiag.models.init import LEAKY_RELU_SLOPE, initialise
from graddiag.models.shapes import (
    CONV_KERNEL,
    IMAGE_SHAPE,
    INPUT_FEATURES,
    NUM_CLASSES,
    PATCH,
    PATCH_FEATURES,
    PATCHES,
    SEQUENCE_FEATURES,
    SEQUENCE_LENGTH,
    LayerKind,
    cnn_stage_sizes,
    gate_count,
)
from graddiag.models.spec import RECURRENT_ARCHS, Spec

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
    # Each recurrent layer with the index of its recurrent matrix (kind "recurrent") in `layers`.
    recurrent: list[tuple[int, Recurrent]]

    def __init__(self, blocks: Iterable[tuple[str, nn.Module]]) -> None:
        super().__init__()
        for name, block in blocks:
            self.add_module(name, block)
        self.layers = _collect_layers(self)
        modules = dict(self.named_modules())
        self.recurrent = []
        for layer in self.layers:
            if layer.kind == "recurrent":
                owner = modules[layer.name.rpartition(".")[0]]
                assert isinstance(owner, Recurrent)
                self.recurrent.append((layer.index, owner))

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
        network = Network(_BLOCKS[spec.arch](spec))
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
    blocks.append(("output", _output(spec.width)))
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
        ("output", _output(spec.width)),
    ]
    return blocks


class Rows(nn.Module):
    """Images (B, 3, 32, 32) as sequences (B, 32, 96): time step t is row t, its 32 pixels × RGB."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], SEQUENCE_LENGTH, SEQUENCE_FEATURES)


class Patches(nn.Module):
    """Images (B, 3, 32, 32) as 64 tokens of 48 features: 4×4 patches in row-major order, channels first."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        x = x.reshape(b, c, height // PATCH, PATCH, width // PATCH, PATCH)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, PATCHES, PATCH_FEATURES)


class RecurrentLinear(nn.Linear):
    """The hidden-to-hidden matrix of a recurrent layer (kind "recurrent"): applied by its layer at every step."""


class AttentionLinear(nn.Linear):
    """A query, key, value or output projection of self-attention (kind "attention")."""


class StateHook(Protocol):
    """Called by a :class:`Recurrent` layer at every time step while registered.

    `h` is the hidden state h_t (and `c` the LSTM's cell state c_t, else None); `keep` is the gate that
    carries the past (LSTM forget gate f_t, GRU update gate z_t, None for rnn) and `gates` every sigmoid
    gate of the step (empty for rnn). They are the graph's own tensors: a hook may register gradient
    hooks on them, and must not modify them.
    """

    def __call__(self, t: int, h: Tensor, c: Tensor | None, keep: Tensor | None, gates: tuple[Tensor, ...]) -> None: ...


class Recurrent(nn.Module):
    """One recurrent layer: (B, T, in) → (B, T, hidden), the hidden states h_1 … h_T, with h_0 = c_0 = 0.

    Two paths compute the same function. While a :class:`StateHook` or a forward hook on ``ih`` is
    registered (a recorded step), the layer is unrolled in Python with PyTorch's cell equations (nn.RNN,
    nn.GRU, nn.LSTM; gates stacked in the order i, f, g, o for lstm and r, z, n for gru): ``ih`` applies
    W_ih x + b_ih to the whole sequence in one call, ``hh`` (W_hh, b_hh) is applied with F.linear at each
    step (forward hooks on it never fire), and every step's states reach the state hooks, so gradient hooks
    can read the total ∂L/∂h_t. Otherwise ``fused``, PyTorch's own layer holding the very same parameters,
    runs it in one kernel: a step that records nothing costs what PyTorch's RNN costs. The two agree to
    float32 rounding (tests/test_sequence_models.py). Parameters are drawn as PyTorch draws a recurrent
    layer's, U(−1/√hidden, 1/√hidden) for every weight and bias.
    """

    def __init__(self, cell: str, in_features: int, hidden: int, activation: str) -> None:
        super().__init__()
        if cell not in RECURRENT_ARCHS:
            raise ValueError(f"unknown recurrent cell {cell!r}; expected one of {', '.join(RECURRENT_ARCHS)}")
        self.cell = cell
        self.hidden = hidden
        self.activation = activation
        self.ih = nn.Linear(in_features, gate_count(cell) * hidden)
        self.hh = RecurrentLinear(hidden, gate_count(cell) * hidden)
        fused: nn.RNNBase
        if cell == "rnn":
            fused = nn.RNN(in_features, hidden, nonlinearity=activation, batch_first=True)
        else:
            fused = (nn.GRU if cell == "gru" else nn.LSTM)(in_features, hidden, batch_first=True)
        # PyTorch's constructor drew U(±1/√hidden) for its parameters: the two linear layers adopt them.
        for linear, kind in ((self.ih, "ih"), (self.hh, "hh")):
            linear.weight = fused.get_parameter(f"weight_{kind}_l0")
            linear.bias = fused.get_parameter(f"bias_{kind}_l0")
        self.fused = fused
        self._state_hooks: OrderedDict[int, StateHook] = OrderedDict()

    def register_state_hook(self, hook: StateHook) -> RemovableHandle:
        """Call `hook` at every time step of every forward pass until the returned handle is removed."""
        handle = RemovableHandle(self._state_hooks)
        self._state_hooks[handle.id] = hook
        return handle

    def forward(self, x: Tensor) -> Tensor:
        if not self._state_hooks and not self.ih._forward_hooks:
            return self.fused(x)[0]
        projected = self.ih(x)
        h = x.new_zeros(x.shape[0], self.hidden)
        c = h if self.cell == "lstm" else None
        weight, bias = self.hh.weight, self.hh.bias
        states = []
        for t in range(x.shape[1]):
            recurrent = F.linear(h, weight, bias)
            keep: Tensor | None = None
            gates: tuple[Tensor, ...] = ()
            if self.cell == "rnn":
                pre = projected[:, t] + recurrent
                h = torch.tanh(pre) if self.activation == "tanh" else torch.relu(pre)
            elif self.cell == "lstm":
                assert c is not None
                i, f, g, o = (projected[:, t] + recurrent).chunk(4, dim=1)
                i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
                c = f * c + i * torch.tanh(g)
                h = o * torch.tanh(c)
                keep, gates = f, (i, f, o)
            else:
                x_r, x_z, x_n = projected[:, t].chunk(3, dim=1)
                h_r, h_z, h_n = recurrent.chunk(3, dim=1)
                r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
                keep, gates = z, (r, z)
            for hook in self._state_hooks.values():
                hook(t, h, c, keep, gates)
            states.append(h)
        return torch.stack(states, dim=1)


class LastStep(nn.Module):
    """The last time step of a sequence: (B, T, H) → (B, H)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, -1]


class Embedding(nn.Module):
    """A learned table added to (``pos``) or prepended as a token to (``cls``) a token sequence."""

    def __init__(self, rows: int, width: int, prepend: bool) -> None:
        super().__init__()
        # Drawn by models.init (N(0, 0.02²), the ViT convention); zeros until then.
        self.weight = nn.Parameter(torch.zeros(rows, width))
        self.prepend = prepend

    def forward(self, x: Tensor) -> Tensor:
        if self.prepend:
            return torch.cat((self.weight.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.weight


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v and out projections (scaled dot product)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = AttentionLinear(width, width)
        self.k = AttentionLinear(width, width)
        self.v = AttentionLinear(width, width)
        self.out = AttentionLinear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, tokens, width = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, tokens, self.heads, width // self.heads).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(mixed.transpose(1, 2).reshape(b, tokens, width))


class Block(nn.Module):
    """A transformer encoder block, as nn.TransformerEncoderLayer(norm_first=pre, dropout=0) computes it.

    pre: x + attn(norm1(x)), then x + mlp(norm2(x)); post: norm1(x + attn(x)), then norm2(x + mlp(x)).
    Children are registered in the order they run, so the layers list is in forward order either way.
    """

    norm1: nn.LayerNorm
    attn: Attention
    norm2: nn.LayerNorm
    mlp: nn.Sequential

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.pre = spec.norm_position == "pre"
        width, hidden = spec.width, spec.mlp_ratio * spec.width
        norm1, attn = nn.LayerNorm(width), Attention(width, spec.heads)
        norm2 = nn.LayerNorm(width)
        mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(width, hidden), act=make_activation(spec.activation), fc2=nn.Linear(hidden, width)
            )
        )
        order: tuple[tuple[str, nn.Module], ...] = (("norm1", norm1), ("attn", attn), ("norm2", norm2), ("mlp", mlp))
        if not self.pre:
            order = (("attn", attn), ("norm1", norm1), ("mlp", mlp), ("norm2", norm2))
        for name, module in order:
            self.add_module(name, module)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class Pool(nn.Module):
    """The class token (the first) or the mean over tokens: (B, T, d) → (B, d)."""

    def __init__(self, pooling: str) -> None:
        super().__init__()
        self.pooling = pooling

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0] if self.pooling == "cls" else x.mean(dim=1)


def _output(width: int) -> nn.Module:
    return nn.Sequential(OrderedDict(linear=nn.Linear(width, NUM_CLASSES)))


def _recurrent_blocks(spec: Spec) -> list[tuple[str, nn.Module]]:
    blocks: list[tuple[str, nn.Module]] = [("rows", Rows())]
    for i in range(1, spec.depth + 1):
        in_features = SEQUENCE_FEATURES if i == 1 else spec.width
        blocks.append((f"{spec.arch}{i}", Recurrent(spec.arch, in_features, spec.width, spec.activation)))
    return [*blocks, ("last", LastStep()), ("output", _output(spec.width))]


def _transformer_blocks(spec: Spec) -> list[tuple[str, nn.Module]]:
    parts: list[tuple[str, nn.Module]] = [("linear", nn.Linear(PATCH_FEATURES, spec.width))]
    tokens = PATCHES
    if spec.pooling == "cls":
        parts.append(("cls", Embedding(1, spec.width, prepend=True)))
        tokens += 1
    parts.append(("pos", Embedding(tokens, spec.width, prepend=False)))
    blocks: list[tuple[str, nn.Module]] = [("patches", Patches()), ("embed", nn.Sequential(OrderedDict(parts)))]
    blocks += [(f"block{i}", Block(spec)) for i in range(1, spec.depth + 1)]
    if spec.norm_position == "pre":
        blocks.append(("norm", nn.LayerNorm(spec.width)))
    return [*blocks, ("pool", Pool(spec.pooling)), ("output", _output(spec.width))]


_BLOCKS: dict[str, Callable[[Spec], list[tuple[str, nn.Module]]]] = {
    "mlp": _mlp_blocks,
    "cnn": _cnn_blocks,
    "rnn": _recurrent_blocks,
    "gru": _recurrent_blocks,
    "lstm": _recurrent_blocks,
    "transformer": _transformer_blocks,
}


def _kind(module: nn.Module) -> LayerKind | None:
    if isinstance(module, RecurrentLinear):
        return "recurrent"
    if isinstance(module, AttentionLinear):
        return "attention"
    if isinstance(module, Embedding):
        return "embedding"
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
