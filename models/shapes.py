"""Facts about the networks graddiag builds, without torch: the image shape, the layers and their sizes.

`models/networks.py` builds networks from these facts and the API (`service/api/limits.py`, through
`models/memory.py`) sizes runs from them without building anything, so the two can never disagree on
how a CNN's convolutions split into stages or how many parameters a spec has. This module must stay
importable without torch: the API process never imports it.
"""

from __future__ import annotations

import math
from typing import Final, Literal

from graddiag.models.spec import Spec

# Both data sets (CIFAR-10 and the synthetic one) have this shape: 3 x 32 x 32 images in 10 classes.
IMAGE_SHAPE: Final[tuple[int, int, int]] = (3, 32, 32)
NUM_CLASSES: Final = 10
INPUT_FEATURES: Final = math.prod(IMAGE_SHAPE)
IMAGE_PIXELS: Final = IMAGE_SHAPE[1] * IMAGE_SHAPE[2]

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


def norm_parameter_count(spec: Spec) -> int:
    """Parameters of one norm layer of `spec` (a scale and a shift per unit or channel), 0 without norm."""
    return 2 * spec.width if spec.norm != "none" else 0


def parameter_count(spec: Spec) -> int:
    """Every parameter of the network `spec` describes: weights, biases, norm scales and shifts.

    mlp: Linear(3072 -> width), depth - 1 x Linear(width -> width), Linear(width -> 10); cnn: a 3x3 conv
    3 -> width, depth - 1 convs width -> width, Linear(width -> 10); a norm layer after every hidden
    weight layer. Residual connections add no parameters.
    """
    w = spec.width
    if spec.arch == "cnn":
        kernel = CONV_KERNEL * CONV_KERNEL
        first, hidden = IMAGE_SHAPE[0] * kernel * w + w, kernel * w * w + w
    else:
        first, hidden = INPUT_FEATURES * w + w, w * w + w
    output = NUM_CLASSES * w + NUM_CLASSES
    return first + (spec.depth - 1) * hidden + spec.depth * norm_parameter_count(spec) + output


def largest_layer_parameter_count(spec: Spec) -> int:
    """Parameters of the network's largest weight layer (its weight and bias)."""
    w = spec.width
    if spec.arch == "cnn":
        kernel = CONV_KERNEL * CONV_KERNEL
        first, hidden = IMAGE_SHAPE[0] * kernel * w + w, kernel * w * w + w
    else:
        first, hidden = INPUT_FEATURES * w + w, w * w + w
    return max(first, hidden if spec.depth > 1 else 0, NUM_CLASSES * w + NUM_CLASSES)


def weight_layer_parameter_count(spec: Spec) -> int:
    """Parameters of the network's weight layers (linear, conv: weights and biases), norm layers excluded."""
    return parameter_count(spec) - spec.depth * norm_parameter_count(spec)


def weight_count(spec: Spec) -> int:
    """Weights (and norm scales) of every layer, biases and norm shifts excluded."""
    biases = spec.depth * spec.width + NUM_CLASSES + spec.depth * norm_parameter_count(spec) // 2
    return parameter_count(spec) - biases


def layer_count(spec: Spec) -> int:
    """Parameterised layers in the network's `layers` list: a weight layer per hidden layer, its norm, the output."""
    return spec.depth * (2 if spec.norm != "none" else 1) + 1
