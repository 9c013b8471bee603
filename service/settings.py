"""Every knob of graddiag in one pydantic-settings class (environment prefix ``GRADDIAG_``).

The engine never reads the environment: the CLI, the worker and the API build a Settings and pass
plain values down.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.spec import MAX_BATCH_SIZE, MAX_DEPTH, MAX_STEPS, MAX_WIDTH, SpecCaps


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "graddiag"


class Settings(BaseSettings):
    """Deployment settings; each is also a command-line flag of `graddiag serve` / `worker`."""

    model_config = SettingsConfigDict(env_prefix="GRADDIAG_", extra="ignore")

    db_url: str = Field("sqlite:///graddiag.db", description="SQLAlchemy URL of the store.")
    data_dir: Path | None = Field(None, description="CIFAR-10 directory (batches-py or class folders).")
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Decoded data-set cache.")
    host: str = Field("127.0.0.1", description="API bind address.")
    port: int = Field(8000, ge=1, le=65535, description="API port.")
    workers: int | None = Field(None, ge=0, le=64, description="Local worker processes; None = automatic.")
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch threads per worker.")
    lease_seconds: float = Field(30.0, gt=0, description="A claimed run's lease; renewed by heartbeats.")
    max_attempts: int = Field(3, ge=1, le=20, description="Claims of one run before it is failed.")
    poll_seconds: float = Field(0.2, gt=0, description="Idle worker's queue polling interval.")
    run_timeout_seconds: float = Field(3600.0, gt=0, description="Wall-clock limit of one run.")
    eval_samples: int = Field(2000, ge=10, le=10000, description="Held-out test images evaluated per run.")
    max_depth: int = Field(MAX_DEPTH, ge=1, le=MAX_DEPTH)
    max_width: int = Field(MAX_WIDTH, ge=2, le=MAX_WIDTH)
    max_steps: int = Field(MAX_STEPS, ge=1, le=MAX_STEPS)
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=2, le=MAX_BATCH_SIZE)
    max_sweep_size: int = Field(200, ge=1, le=5000, description="Grid points one sweep may create.")

    def caps(self) -> SpecCaps:
        """The spec caps this deployment enforces."""
        return SpecCaps(
            max_depth=self.max_depth,
            max_width=self.max_width,
            max_steps=self.max_steps,
            max_batch_size=self.max_batch_size,
        )
