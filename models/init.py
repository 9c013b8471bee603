"""Weight initialisation of a built network, driven by the spec's init, init_gain, init_std and bias_init.

Every Linear and Conv2d weight is initialised, the input and output layers included; norm layers keep
PyTorch's weight 1, bias 0. ``init_gain`` always multiplies the weights' standard deviation:

- ``default``: PyTorch's own init (drawn when the modules were constructed), multiplied by init_gain.
- ``xavier_uniform`` / ``xavier_normal``: Glorot, Var = gain² · 2 / (fan_in + fan_out), gain = init_gain
  (Glorot's original is gain 1).
- ``kaiming_uniform`` / ``kaiming_normal``: He, mode fan_in, Var = g² / fan_in with g the gain of
  :func:`kaiming_nonlinearity` for the spec's activation, then multiplied by init_gain.
- ``orthogonal``: a (semi-)orthogonal matrix times init_gain (convolutions flatten to out × in·k·k).
- ``normal``: N(0, (init_std · init_gain)²).

``bias_init="default"`` keeps PyTorch's bias init, ``"zeros"`` zeroes every Linear/Conv2d bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, assert_never

import torch
from torch import nn

from graddiag.models.spec import Spec

if TYPE_CHECKING:
    from graddiag.models.networks import Network

KaimingNonlinearity = Literal["linear", "sigmoid", "tanh", "relu", "leaky_relu", "selu"]

LEAKY_RELU_SLOPE = 0.01

_KAIMING: dict[str, tuple[KaimingNonlinearity, float]] = {
    "sigmoid": ("sigmoid", 0.0),
    "tanh": ("tanh", 0.0),
    "relu": ("relu", 0.0),
    "leaky_relu": ("leaky_relu", LEAKY_RELU_SLOPE),
    "selu": ("selu", 0.0),
    "identity": ("linear", 0.0),
    # calculate_gain knows none of these; they are ReLU-like (identity for large positive inputs,
    # bounded below), so the ReLU gain sqrt(2) is the conventional stand-in.
    "elu": ("relu", 0.0),
    "gelu": ("relu", 0.0),
    "silu": ("relu", 0.0),
    # Softsign has tanh's local shape (odd, slope 1 at 0, saturating at ±1), so it gets tanh's gain 5/3:
    # a tanh-versus-softsign comparison then differs only in the activation, not in the weights. At that
    # gain softsign sits nearer criticality than tanh (mean-field chi1 ≈ 1.11 against 1.21, zero bias),
    # so the borrowed gain does not push it further into the chaotic phase.
    "softsign": ("tanh", 0.0),
}


def kaiming_nonlinearity(activation: str) -> tuple[KaimingNonlinearity, float]:
    """The (nonlinearity, param) pair that Kaiming init uses for a spec activation.

    Activations that ``torch.nn.init.calculate_gain`` supports map to themselves (identity → "linear",
    leaky_relu → slope 0.01); elu, gelu and silu map to "relu" and softsign to "tanh". Note that "selu"
    gives PyTorch's gain 3/4, not the variance 1/fan_in of self-normalising networks.
    """
    try:
        return _KAIMING[activation]
    except KeyError:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_KAIMING)}") from None


def initialise(network: Network, spec: Spec, generator: torch.Generator) -> None:
    """Initialise every Linear/Conv2d layer of `network` in place as the module docstring describes.

    Every random draw comes from `generator`, so the result depends only on the network's constructed
    state, the spec and the generator's state. Norm layers are left untouched.
    """
    with torch.no_grad():
        for layer in network.layers:
            if layer.kind == "norm":
                continue
            _initialise_weight(layer.module.get_parameter("weight"), spec, generator)
            if spec.bias_init == "zeros":
                layer.module.get_parameter("bias").zero_()


def _initialise_weight(weight: torch.Tensor, spec: Spec, generator: torch.Generator) -> None:
    gain = spec.init_gain
    match spec.init:
        case "default":
            weight.mul_(gain)
        case "xavier_uniform":
            nn.init.xavier_uniform_(weight, gain=gain, generator=generator)
        case "xavier_normal":
            nn.init.xavier_normal_(weight, gain=gain, generator=generator)
        case "kaiming_uniform" | "kaiming_normal":
            nonlinearity, param = kaiming_nonlinearity(spec.activation)
            kaiming = nn.init.kaiming_uniform_ if spec.init == "kaiming_uniform" else nn.init.kaiming_normal_
            kaiming(weight, a=param, mode="fan_in", nonlinearity=nonlinearity, generator=generator)
            weight.mul_(gain)
        case "orthogonal":
            nn.init.orthogonal_(weight, gain=gain, generator=generator)
        case "normal":
            # The Spec validator requires init_std here; a spec built with model_construct skips it.
            if spec.init_std is None:
                raise ValueError("init='normal' needs init_std")
            nn.init.normal_(weight, mean=0.0, std=spec.init_std * gain, generator=generator)
        case _:
            assert_never(spec.init)
