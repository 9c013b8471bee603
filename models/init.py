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

Recurrent nets (rnn, gru, lstm): each gate's block of W_ih and W_hh (PyTorch stacks them, i f g o for
lstm, r z n for gru) is initialised as a matrix of its own, so Glorot/He/orthogonal see a gate's fans.
``default`` is PyTorch's recurrent init, U(±1/√width) for every weight and bias. ``orthogonal`` and
``identity`` (init_gain · I, the IRNN of Le et al. 2015, whose biases are zero: add bias_init='zeros')
name the recurrent matrix: W_ih and the output layer keep PyTorch's init. ``forget_bias`` (lstm) sets the
forget gate's b_ih to the number and its b_hh to 0; ``chrono`` draws b_f = log U(1, T − 1) with T the 32
steps, the input gate's bias −b_f (Tallec & Ollivier 2018).

Transformers: ``init`` applies to every Linear (patch projection, q/k/v/out, the MLPs, the output) as for
the MLP; the position table and class token are N(0, 0.02²) (the ViT convention); layer norms keep 1, 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, assert_never

import torch
from torch import nn

from graddiag.models.shapes import SEQUENCE_LENGTH, gate_count
from graddiag.models.spec import RECURRENT_ARCHS, Spec

if TYPE_CHECKING:
    from graddiag.models.networks import Network, Recurrent

KaimingNonlinearity = Literal["linear", "sigmoid", "tanh", "relu", "leaky_relu", "selu"]

LEAKY_RELU_SLOPE = 0.01
# Standard deviation of a transformer's position table and class token (ViT's).
EMBEDDING_STD = 0.02

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
        in_recurrent: set[int] = set()
        for _, cell in network.recurrent:
            _initialise_recurrent(cell, spec, generator)
            in_recurrent |= {id(parameter) for parameter in cell.parameters()}
        for layer in network.layers:
            if layer.kind == "norm" or id(layer.weight) in in_recurrent:
                continue
            if layer.kind == "embedding":
                nn.init.normal_(layer.weight, std=EMBEDDING_STD, generator=generator)
                continue
            if not (spec.arch in RECURRENT_ARCHS and spec.init in ("orthogonal", "identity")):
                _initialise_weight(layer.module.get_parameter("weight"), spec, generator)
            if spec.bias_init == "zeros":
                layer.module.get_parameter("bias").zero_()


def _initialise_recurrent(cell: Recurrent, spec: Spec, generator: torch.Generator) -> None:
    """A recurrent layer's matrices gate block by gate block, its biases, and the LSTM's forget bias."""
    hidden = cell.hidden
    for matrix, recurrent in ((cell.ih.weight, False), (cell.hh.weight, True)):
        if spec.init in ("orthogonal", "identity") and not recurrent:
            continue
        for block in matrix.split(hidden):
            if spec.init == "identity":
                nn.init.eye_(block)
                block.mul_(spec.init_gain)
            else:
                _initialise_weight(block, spec, generator)
    if spec.bias_init == "zeros":
        cell.ih.bias.zero_()
        cell.hh.bias.zero_()
    if spec.arch == "lstm" and spec.forget_bias is not None:
        assert gate_count("lstm") == 4
        gate_i, gate_f = slice(0, hidden), slice(hidden, 2 * hidden)
        if spec.forget_bias == "chrono":
            drawn = torch.empty(hidden).uniform_(1.0, SEQUENCE_LENGTH - 1, generator=generator).log_()
            cell.ih.bias[gate_f] = drawn
            cell.ih.bias[gate_i] = -drawn
            cell.hh.bias[gate_i] = 0.0
        else:
            cell.ih.bias[gate_f] = spec.forget_bias
        cell.hh.bias[gate_f] = 0.0


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
        case "identity":
            raise ValueError("init='identity' applies to a recurrent matrix only")
        case _:
            assert_never(spec.init)
