"""Every knob of graddiag in one pydantic-settings class (environment prefix ``GRADDIAG_``).

The engine never reads the environment: the CLI, the worker and the API build a Settings and pass
plain values down.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

from graddiag.models.spec import MAX_BATCH_SIZE, MAX_DEPTH, MAX_STEPS, MAX_WIDTH, SpecCaps

# Run ids are uuid4 hex; anything else never names a directory (no "..", no separators).
_RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "graddiag"


class Settings(BaseSettings):
    """Deployment settings; each is also a command-line flag of `graddiag serve` / `worker`."""

    model_config = SettingsConfigDict(env_prefix="GRADDIAG_", extra="ignore")

    db_url: str = Field("sqlite:///graddiag.db", description="SQLAlchemy URL of the store.")
    data_dir: Path | None = Field(None, description="CIFAR-10 directory (batches-py or class folders).")
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Decoded data-set cache.")
    download_data: bool = Field(
        True,
        description="Download CIFAR-10 when no copy is found (into data_dir, else <cache_dir>/datasets/cifar10); "
        "false: never touch the network.",
    )
    data_url: str = Field(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        description="Where CIFAR-10 is downloaded from (the official archive, or a mirror of it).",
    )
    data_md5: str = Field(
        "c58f30108f718f92721af3b95e74349a",
        pattern=r"^[0-9a-fA-F]{32}$",
        description="The archive's MD5 (the published one); nothing is unpacked from an archive that differs.",
    )
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
    max_page_size: int = Field(1000, ge=1, le=1000, description="Most runs one page of a listing may hold.")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, le=64 * 2**20, description="Largest request body accepted; larger ones get a 413."
    )
    max_run_memory_mb: float = Field(
        4096.0,
        gt=0,
        description="Refuse specs whose estimated peak memory (training and evaluation) is larger; a run that "
        "grows past it (or 1.5x its estimate) while training is failed.",
    )
    api_busy_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="How long an API request waits for a locked SQLite database before a 503."
    )
    api_token: SecretStr | None = Field(
        None, description="Bearer token required for every write (and accepted for reads); None: writes are open."
    )
    read_token: SecretStr | None = Field(
        None, description="Bearer token required for reads and the dashboard; None: reads are open."
    )
    allow_public_without_token: bool = Field(
        False, description="Let `serve` bind a non-loopback host with no api_token (anyone reaching it may write)."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (comma-separated); none: CORS off.",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster of `graddiag dispatch` (head:6379 or ray://head:10001); None: $RAY_ADDRESS."
    )
    dispatch_max_in_flight: int = Field(
        16, ge=1, le=10000, description="Runs one dispatcher holds at once: training or waiting for Ray resources."
    )
    tensorboard_all: bool = Field(False, description="Write TensorBoard events for every run, not only opted-in ones.")
    tensorboard_dir: Path | None = Field(
        None,
        description="Root of the workers' TensorBoard events (<dir>/<run id>); default: <db name>-tensorboard "
        "beside the SQLite file, ./graddiag-tensorboard for other databases.",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        # The environment and the CLI give one string; "a,b" means two origins.
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    def cifar10_dir(self) -> Path:
        """Where CIFAR-10 is read from and downloaded to: `data_dir`, else <cache_dir>/datasets/cifar10."""
        return self.data_dir if self.data_dir is not None else self.cache_dir / "datasets" / "cifar10"

    def caps(self) -> SpecCaps:
        """The spec caps this deployment enforces."""
        return SpecCaps(
            max_depth=self.max_depth,
            max_width=self.max_width,
            max_steps=self.max_steps,
            max_batch_size=self.max_batch_size,
        )

    def tensorboard_root(self) -> Path:
        """Where workers write runs' event files: `tensorboard_dir`, else derived from the database.

        Beside the SQLite file by default, so an API and workers sharing the database file (one host, or
        one volume in containers) also share the events without configuring anything else.
        """
        if self.tensorboard_dir is not None:
            return self.tensorboard_dir
        path = self.sqlite_file()
        return path.with_name(f"{path.stem}-tensorboard") if path is not None else Path("graddiag-tensorboard")

    def sqlite_file(self) -> Path | None:
        """The SQLite database file `db_url` names; None for other databases and in-memory SQLite."""
        url = make_url(self.db_url)
        database = url.database or ""
        if url.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
            return None
        return Path(database).expanduser()

    def tensorboard_run_dir(self, run_id: str) -> Path:
        """The event directory of one run; ValueError for an id that is not one plain path component."""
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"not a run id: {run_id!r}")
        return self.tensorboard_root() / run_id
