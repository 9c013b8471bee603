"""The probe spec: one pydantic model shared by the engine, the CLI, the store and the API.

Field names are a public contract (they appear in JSON reports, REST bodies, database columns and
CLI flags), so they never change meaning. Every field has a default, a documented range and a hard
cap; an operator may lower the caps further with :class:`SpecCaps`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

Arch = Literal["mlp", "cnn"]
Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "silu", "softsign", "identity"]
Init = Literal[
    "default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "normal"
]
BiasInit = Literal["default", "zeros"]
Norm = Literal["none", "batch", "layer"]
ClipMode = Literal["norm", "value"]
Optimizer = Literal["sgd", "momentum", "adam", "adamw"]
Dataset = Literal["cifar10", "synthetic"]
Device = Literal["auto", "cpu", "cuda"]

# Hard caps: the largest values any deployment accepts. Operators lower them with SpecCaps.
MAX_DEPTH = 100
MAX_WIDTH = 1024
MAX_CNN_WIDTH = 256
MAX_STEPS = 5000
MAX_BATCH_SIZE = 1024


class Spec(BaseModel):
    """A network and a brief training recipe whose gradient flow graddiag judges."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Arch = Field("mlp", description="mlp: fully connected; cnn: 3x3 convolutions.")
    depth: int = Field(10, ge=1, le=MAX_DEPTH, description="Hidden layers (mlp) or convolution layers (cnn), 1-100.")
    width: int = Field(
        128, ge=2, le=MAX_WIDTH, description="Units per hidden layer (mlp, 2-1024) or channels (cnn, 2-256)."
    )
    activation: Activation = Field("relu", description="Nonlinearity after every hidden layer.")
    init: Init = Field("default", description="Weight initialisation; 'default' keeps PyTorch's own.")
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
    device: Device = Field("auto", description="auto picks CUDA when present, else the CPU.")
    tensorboard: bool = Field(False, description="Write TensorBoard event files for this run.")

    @model_validator(mode="after")
    def _check_combinations(self) -> Self:
        if self.init == "normal" and self.init_std is None:
            raise ValueError("init_std is required when init='normal' (a positive standard deviation)")
        if self.arch == "cnn" and self.width > MAX_CNN_WIDTH:
            raise ValueError(f"width must be at most {MAX_CNN_WIDTH} channels for arch='cnn'")
        return self

    def fingerprint(self) -> str:
        """A stable hash of every field: equal specs give equal fingerprints."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


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
