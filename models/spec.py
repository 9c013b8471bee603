"""The probe spec: one pydantic model shared by the engine, the CLI, the store and the API.

Field names are a public contract (they appear in JSON reports, REST bodies, database columns and
CLI flags), so they never change meaning. Every field has a default, a documented range and a hard
cap; an operator may lower the caps further with :class:`SpecCaps`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Arch = Literal["mlp", "cnn", "rnn", "gru", "lstm", "transformer"]
Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "silu", "softsign", "identity"]
Init = Literal[
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "orthogonal",
    "normal",
    "identity",
]
BiasInit = Literal["default", "zeros"]
Norm = Literal["none", "batch", "layer"]
ClipMode = Literal["norm", "value"]
Optimizer = Literal["sgd", "momentum", "adam", "adamw"]
Dataset = Literal["cifar10", "synthetic"]
Device = Literal["auto", "cpu", "cuda"]
NormPosition = Literal["pre", "post"]
Pooling = Literal["cls", "mean"]

RECURRENT_ARCHS: tuple[Arch, ...] = ("rnn", "gru", "lstm")
# What each architecture allows beyond the MLP/CNN defaults, and the activation it takes when none is given.
# LSTM and GRU cells fix their own nonlinearities (sigmoid gates, tanh candidate): 'tanh' names the cell's.
_ACTIVATIONS_ALLOWED: dict[str, tuple[str, ...]] = {
    "rnn": ("tanh", "relu"),
    "gru": ("tanh",),
    "lstm": ("tanh",),
    "transformer": ("gelu", "relu"),
}
_DEFAULT_ACTIVATION = {"rnn": "tanh", "gru": "tanh", "lstm": "tanh", "transformer": "gelu"}

# Hard caps: the largest values any deployment accepts. Operators lower them with SpecCaps.
MAX_DEPTH = 100
MAX_WIDTH = 1024
MAX_CNN_WIDTH = 256
MAX_TRANSFORMER_WIDTH = 512
MAX_HEADS = 64
MAX_MLP_RATIO = 8
# A forget bias beyond this magnitude only saturates the gate further (sigmoid(10) = 1 - 4.5e-5).
MAX_FORGET_BIAS = 10.0
MAX_STEPS = 5000
MAX_BATCH_SIZE = 1024


class Spec(BaseModel):
    """A network and a brief training recipe whose gradient flow graddiag judges."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Arch = Field(
        "mlp",
        description="mlp: fully connected; cnn: 3x3 convolutions; rnn, gru, lstm: recurrent layers reading each "
        "image row by row (32 steps of 96 features); transformer: a small ViT on 4x4 patches (64 tokens of 48).",
    )
    depth: int = Field(
        10,
        ge=1,
        le=MAX_DEPTH,
        description="Hidden layers (mlp), convolution layers (cnn), stacked recurrent layers (rnn, gru, lstm) or "
        "blocks (transformer), 1-100.",
    )
    width: int = Field(
        128,
        ge=2,
        le=MAX_WIDTH,
        description="Units per hidden layer (mlp, 2-1024), channels (cnn, 2-256), hidden size (rnn, gru, lstm, "
        "2-1024) or model dimension (transformer, 2-512, a multiple of heads).",
    )
    activation: Activation = Field(
        "relu",
        description="Nonlinearity after every hidden layer; rnn: tanh (default) or relu; gru, lstm: tanh (their "
        "cells' own); transformer: gelu (default) or relu in the MLP.",
    )
    init: Init = Field(
        "default",
        description="Weight initialisation; 'default' keeps PyTorch's own; 'identity' (rnn, gru, lstm): the "
        "recurrent matrix is init_gain x I (the IRNN of Le et al. 2015).",
    )
    init_gain: float = Field(
        1.0, gt=0, le=10, description="Multiplies the initialisation's scale (standard deviation), (0, 10]."
    )
    init_std: float | None = Field(
        None, gt=0, le=10, description="Standard deviation for init='normal' (required there), (0, 10]."
    )
    bias_init: BiasInit = Field("default", description="'default' keeps PyTorch's bias init; 'zeros'.")
    norm: Norm = Field("none", description="Normalisation after each hidden layer, before the activation.")
    residual: bool = Field(False, description="Identity skip connections around hidden blocks.")
    clip_value: float | None = Field(
        None, gt=0, le=1e6, description="Gradient clipping threshold; null disables clipping."
    )
    clip_mode: ClipMode = Field("norm", description="'norm': clip the total L2 norm; 'value': each entry.")
    optimizer: Optimizer = Field("sgd", description="sgd, momentum (SGD with 0.9), adam or adamw.")
    lr: float = Field(0.01, gt=0, le=1e3, description="Learning rate, (0, 1000].")
    weight_decay: float = Field(0.0, ge=0, le=1, description="L2 penalty (decoupled for adamw), [0, 1].")
    l1: float = Field(0.0, ge=0, le=1, description="L1 penalty on the weights added to the loss, [0, 1].")
    batch_size: int = Field(128, ge=2, le=MAX_BATCH_SIZE, description="Examples per step, 2-1024.")
    steps: int = Field(100, ge=1, le=MAX_STEPS, description="Optimizer updates, 1-5000.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the init, the batches and synthetic data.")
    dataset: Dataset = Field("cifar10", description="cifar10 (real images) or synthetic (N(0,1) noise).")
    record_every: int = Field(
        10, ge=1, le=MAX_STEPS, description="Record per-layer statistics every N steps (and at the last)."
    )
    forget_bias: float | Literal["chrono"] | None = Field(
        None,
        description="lstm only: the forget gate's bias; null keeps PyTorch's (mean 0), a number in [-10, 10] sets "
        "it (1: Jozefowicz et al. 2015), 'chrono' draws log U(1, 31) with the input gate's bias its negative "
        "(Tallec & Ollivier 2018).",
    )
    heads: int = Field(4, ge=1, le=MAX_HEADS, description="transformer only: attention heads, 1-64, dividing width.")
    norm_position: NormPosition = Field(
        "pre", description="transformer only: layer norm before each sub-block (pre) or after the residual sum (post)."
    )
    mlp_ratio: int = Field(
        4, ge=1, le=MAX_MLP_RATIO, description="transformer only: the MLP's hidden size over width, 1-8."
    )
    pooling: Pooling = Field(
        "cls", description="transformer only: classify from a class token (cls) or the mean token."
    )
    device: Device = Field("auto", description="auto picks CUDA when present, else the CPU.")
    tensorboard: bool = Field(False, description="Write TensorBoard event files for this run.")

    @field_validator("forget_bias")
    @classmethod
    def _bounded_forget_bias(cls, value: float | str | None) -> float | str | None:
        # The union's float member takes nan, inf and any magnitude; a number must be finite and bounded.
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= MAX_FORGET_BIAS):
            raise ValueError(
                f"forget_bias must be a finite number in [-{MAX_FORGET_BIAS:g}, {MAX_FORGET_BIAS:g}], 'chrono' or null"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _architecture_defaults(cls, data: Any) -> Any:
        """Fill in what an architecture implies when the caller left it out.

        A recurrent net's activation is tanh unless asked otherwise (PyTorch's), a transformer's gelu; a
        transformer always has layer norm and residual connections. Only absent keys are filled, so an
        explicit value that contradicts the architecture is still refused by name below.
        """
        if not isinstance(data, dict):
            return data
        arch = data.get("arch")
        if not isinstance(arch, str) or arch not in _DEFAULT_ACTIVATION:
            return data
        filled = dict(data)
        filled.setdefault("activation", _DEFAULT_ACTIVATION[arch])
        if arch == "transformer":
            filled.setdefault("norm", "layer")
            filled.setdefault("residual", True)
        return filled

    @model_validator(mode="after")
    def _check_combinations(self) -> Self:
        if self.init == "normal" and self.init_std is None:
            raise ValueError("init_std is required when init='normal' (a positive standard deviation)")
        if self.arch == "cnn" and self.width > MAX_CNN_WIDTH:
            raise ValueError(f"width must be at most {MAX_CNN_WIDTH} channels for arch='cnn'")
        allowed = _ACTIVATIONS_ALLOWED.get(self.arch)
        if allowed is not None and self.activation not in allowed:
            raise ValueError(
                f"activation={self.activation!r} is not available for arch={self.arch!r}; allowed: {', '.join(allowed)}"
            )
        if self.init == "identity" and self.arch not in RECURRENT_ARCHS:
            raise ValueError("init='identity' applies to a recurrent matrix; allowed for arch rnn, gru, lstm")
        if self.forget_bias is not None and self.arch != "lstm":
            raise ValueError("forget_bias applies to arch='lstm' only; leave it null for other architectures")
        if self.arch in RECURRENT_ARCHS:
            if self.norm != "none":
                raise ValueError(f"norm={self.norm!r} is not available for arch={self.arch!r}; allowed: none")
            if self.residual:
                raise ValueError(f"residual=true is not available for arch={self.arch!r}; allowed: false")
        if self.arch != "transformer":
            for name in _TRANSFORMER_FIELDS:
                if getattr(self, name) != Spec.model_fields[name].default:
                    raise ValueError(f"{name} applies to arch='transformer' only; leave it at its default otherwise")
        if self.arch == "transformer":
            if self.width > MAX_TRANSFORMER_WIDTH:
                raise ValueError(f"width must be at most {MAX_TRANSFORMER_WIDTH} for arch='transformer'")
            if self.width % self.heads:
                raise ValueError(f"width={self.width} must be a multiple of heads={self.heads} for arch='transformer'")
            if self.norm != "layer":
                raise ValueError(f"norm={self.norm!r} is not available for arch='transformer'; allowed: layer")
            if not self.residual:
                raise ValueError("residual=false is not available for arch='transformer'; allowed: true")
        return self

    def fingerprint(self) -> str:
        """A stable hash of every field: equal specs give equal fingerprints.

        Fields added after the first release are left out while they hold their defaults, so a spec that
        does not use them keeps the fingerprint it had (stored runs and idempotent retries compare them).
        """
        dumped = self.model_dump(mode="json")
        for name in _LATER_FIELDS:
            if dumped[name] == Spec.model_fields[name].default:
                del dumped[name]
        canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


_TRANSFORMER_FIELDS = ("heads", "norm_position", "mlp_ratio", "pooling")
_LATER_FIELDS = ("forget_bias", *_TRANSFORMER_FIELDS)


def combination_field(message: str) -> str | None:
    """The field a refused combination names (each message of Spec's combination checks starts with it, after
    pydantic's "Value error, "), so a sweep or the CLI can point at it; None when the message names none."""
    word = re.match(r"[a-z_]+", message.removeprefix("Value error, "))
    return word.group() if word is not None and word.group() in Spec.model_fields else None


class SpecCaps(BaseModel):
    """Operator-set limits, at most the hard caps; a spec above them is refused by name."""

    max_depth: int = Field(MAX_DEPTH, ge=1, le=MAX_DEPTH)
    max_width: int = Field(MAX_WIDTH, ge=2, le=MAX_WIDTH)
    max_steps: int = Field(MAX_STEPS, ge=1, le=MAX_STEPS)
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=2, le=MAX_BATCH_SIZE)

    def violations(self, spec: Spec) -> list[tuple[str, str]]:
        """(field, message) for every spec field above this deployment's caps."""
        limits = {
            "depth": self.max_depth,
            "width": self.max_width,
            "steps": self.max_steps,
            "batch_size": self.max_batch_size,
        }
        return [
            (field, f"{field}={getattr(spec, field)} exceeds this server's cap; allowed: at most {cap}")
            for field, cap in limits.items()
            if getattr(spec, field) > cap
        ]
