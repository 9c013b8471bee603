"""Shared fixtures: the real CIFAR-10 copy (from GRADDIAG_DATA_DIR), tiny specs, the async backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from graddiag.service.engine.data import ImageSet, load_cifar10

pytest_plugins = ["tests.pg"]

# Test tensors are tiny: a second intra-op thread only adds contention with the server and worker
# processes the end-to-end tests start beside this one.
torch.set_num_threads(1)


@pytest.fixture
def anyio_backend() -> str:
    """The async tests (pytest's anyio plugin) run on asyncio, as uvicorn serves the API."""
    return "asyncio"


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The real CIFAR-10 copy; under CI a missing copy fails instead of skipping."""
    value = os.environ.get("GRADDIAG_DATA_DIR")
    if not value or not Path(value).is_dir():
        message = f"GRADDIAG_DATA_DIR={value!r} does not point at the CIFAR-10 copy"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(value)


@pytest.fixture(scope="session")
def cifar10_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-data cache for the whole session, so the JPEGs are decoded once."""
    return tmp_path_factory.mktemp("graddiag-cache")


@pytest.fixture(scope="session")
def cifar10_data(cifar10_dir: Path, cifar10_cache: Path) -> tuple[ImageSet, ImageSet]:
    """The decoded (train, test) CIFAR-10 sets."""
    return load_cifar10(cifar10_dir, cifar10_cache)
