"""Facts about the networks graddiag builds, without torch: the image shape, the layers and their sizes.

`models/networks.py` builds networks from these facts and the API (`service/api/limits.py`, through
`models/memory.py`) sizes runs from them without building anything, so the two can never disagree on
how a CNN's convolutions split into stages or how many parameters a spec has. This module must stay
importable without torch: the API process never imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from graddiag.models.spec import RECURRENT_ARCHS, Spec

# Both data sets (CIFAR-10 and the synthetic one) have this shape: 3 x 32 x 32 images in 10 classes.
IMAGE_SHAPE: Final[tuple[int, int, int]] = (3, 32, 32)
NUM_CLASSES: Final = 10
INPUT_FEATURES: Final = math.prod(IMAGE_SHAPE)
IMAGE_PIXELS: Final = IMAGE_SHAPE[1] * IMAGE_SHAPE[2]

# Recurrent nets read an image row by row: 32 time steps of 32 pixels x RGB.
SEQUENCE_LENGTH: Final = IMAGE_SHAPE[1]
SEQUENCE_FEATURES: Final = IMAGE_SHAPE[0] * IMAGE_SHAPE[2]
# Transformers read an image as 4x4 patches: 64 tokens of 3 x 4 x 4 features.
PATCH: Final = 4
PATCHES: Final = (IMAGE_SHAPE[1] // PATCH) * (IMAGE_SHAPE[2] // PATCH)
PATCH_FEATURES: Final = IMAGE_SHAPE[0] * PATCH * PATCH
# Gate blocks stacked in a recurrent layer's matrices: rnn one, gru three (r, z, n), lstm four (i, f, g, o).
_GATES: Final = {"rnn": 1, "gru": 3, "lstm": 4}


def gate_count(cell: str) -> int:
    """Gate blocks of `width` rows stacked in a recurrent layer's W_ih and W_hh (rnn 1, gru 3, lstm 4)."""
    try:
        return _GATES[cell]
    except KeyError:
        raise ValueError(f"unknown recurrent cell {cell!r}; expected one of {', '.join(_GATES)}") from None


# A parameterised layer of a network: a weight layer (linear, conv), a normalisation layer, an embedding
# table (a transformer's position table and class token; a user's nn.Embedding), a recurrent matrix (the
# hidden-to-hidden weights of rnn/gru/lstm; a user's RNN weights) or an attention projection (q, k, v, out).
# The depth profile runs over the linear and conv layers (a recurrent net's input projections, a
# transformer's MLPs); the others are recorded beside it.
LayerKind = Literal["linear", "conv", "norm", "embedding", "recurrent", "attention"]

# A CNN has at most this many stages, a 2x2 max-pool between consecutive ones.
MAX_STAGES: Final = 3
CONV_KERNEL: Final = 3


def cnn_stage_sizes(depth: int) -> list[int]:
    """Convolutions per stage of a CNN of `depth` convs, the stem included in stage 1.

    min(3, depth) stages, split as evenly as possible with earlier stages taking the extra convs.
    """
    stages = min(MAX_STAGES, depth)
    base, extra = divmod(depth, stages)
    return [base + 1 if s < extra else base for s in range(stages)]


def stage_pixels(stage: int) -> int:
    """Pixels of one feature map in CNN stage `stage` (0-based): each max-pool halves both sides."""
    return (IMAGE_SHAPE[1] >> stage) * (IMAGE_SHAPE[2] >> stage)


def transformer_tokens(spec: Spec) -> int:
    """Tokens a transformer's blocks see: the 64 patches, plus the class token with pooling='cls'."""
    return PATCHES + (spec.pooling == "cls")


@dataclass(frozen=True)
class LayerShape:
    """One entry of a network's `layers` list (models/networks.py), by size: what `Layer` holds of it.

    `weights`: entries of the weight (linear, conv, recurrent, attention), the scale (norm) or the table
    (embedding); `biases`: entries of the bias or the norm's shift, 0 where there is none.
    """

    kind: LayerKind
    weights: int
    biases: int

    @property
    def params(self) -> int:
        """Every parameter of the layer."""
        return self.weights + self.biases


def _dense(kind: LayerKind, fan_in: int, fan_out: int) -> LayerShape:
    return LayerShape(kind, fan_in * fan_out, fan_out)


def layer_shapes(spec: Spec) -> list[LayerShape]:
    """The network's parameterised layers in forward order, as `Network.layers` lists them.

    mlp: Linear(3072 -> width), depth - 1 x Linear(width -> width), each followed by its norm layer when
    the spec has one, Linear(width -> 10). cnn: a 3x3 conv 3 -> width, depth - 1 convs width -> width,
    each followed by its norm, Linear(width -> 10); residual connections add no parameters. rnn, gru,
    lstm: per stacked layer the input projection Linear(96 or width -> G x width) and the recurrent
    matrix width -> G x width (G gate blocks, `gate_count`), Linear(width -> 10). transformer: the patch
    projection Linear(48 -> width), the class token (1 x width, pooling='cls') and the position table
    (tokens x width), per block LayerNorm, q, k, v, out (width -> width), LayerNorm, fc1 (width ->
    mlp_ratio x width), fc2 (back to width) in the order they run (pre: norm1 first; post: attention
    first), a final LayerNorm (pre only), Linear(width -> 10).
    """
    w = spec.width
    output = _dense("linear", w, NUM_CLASSES)
    norm = [LayerShape("norm", w, w)] if spec.norm != "none" else []
    if spec.arch == "mlp":
        hidden = [_dense("linear", w, w), *norm]
        return [_dense("linear", INPUT_FEATURES, w), *norm, *hidden * (spec.depth - 1), output]
    if spec.arch == "cnn":
        kernel = CONV_KERNEL * CONV_KERNEL
        hidden = [_dense("conv", kernel * w, w), *norm]
        return [_dense("conv", kernel * IMAGE_SHAPE[0], w), *norm, *hidden * (spec.depth - 1), output]
    if spec.arch == "transformer":
        tokens = transformer_tokens(spec)
        embed = [_dense("linear", PATCH_FEATURES, w)]
        if spec.pooling == "cls":
            embed.append(LayerShape("embedding", w, 0))
        embed.append(LayerShape("embedding", tokens * w, 0))
        layer_norm = LayerShape("norm", w, w)
        attention = [_dense("attention", w, w)] * 4
        mlp = [_dense("linear", w, spec.mlp_ratio * w), _dense("linear", spec.mlp_ratio * w, w)]
        if spec.norm_position == "pre":
            block = [layer_norm, *attention, layer_norm, *mlp]
            return [*embed, *block * spec.depth, layer_norm, output]
        block = [*attention, layer_norm, *mlp, layer_norm]
        return [*embed, *block * spec.depth, output]
    gates = gate_count(spec.arch) * w
    recurrent = [_dense("linear", w, gates), _dense("recurrent", w, gates)]
    first = [_dense("linear", SEQUENCE_FEATURES, gates), _dense("recurrent", w, gates)]
    return [*first, *recurrent * (spec.depth - 1), output]


def parameter_count(spec: Spec) -> int:
    """Every parameter of the network `spec` describes: weights, biases, norm scales and shifts, tables."""
    return sum(layer.params for layer in layer_shapes(spec))


def largest_layer_parameter_count(spec: Spec) -> int:
    """Parameters of the network's largest layer other than a norm (its weight or table and its bias)."""
    return max(layer.params for layer in layer_shapes(spec) if layer.kind != "norm")


def weight_layer_parameter_count(spec: Spec) -> int:
    """Parameters of every layer but the norm layers (weights, biases, embedding tables)."""
    return sum(layer.params for layer in layer_shapes(spec) if layer.kind != "norm")


def weight_count(spec: Spec) -> int:
    """Weights, tables and norm scales of every layer, biases and norm shifts excluded."""
    return sum(layer.weights for layer in layer_shapes(spec))


def layer_count(spec: Spec) -> int:
    """Parameterised layers in the network's `layers` list."""
    return len(layer_shapes(spec))


def recorded_steps(spec: Spec) -> int:
    """Steps the probe records: every record_every-th from step 0, and the last."""
    every = -(-spec.steps // spec.record_every)
    return every + (0 if (spec.steps - 1) % spec.record_every == 0 else 1)


def time_record_count(spec: Spec) -> int:
    """Rows of a run's gradient through time: recorded steps × recurrent layers × time steps (0 if not recurrent)."""
    if spec.arch not in RECURRENT_ARCHS:
        return 0
    return recorded_steps(spec) * spec.depth * SEQUENCE_LENGTH
