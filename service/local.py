"""Run a probe in this process: the public :func:`graddiag.probe` and the `graddiag probe` command."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from graddiag.models.spec import Spec
from graddiag.service.engine.report import Report
from graddiag.service.settings import Settings


def probe(
    spec: Spec | Mapping[str, Any] | None = None, /, *, settings: Settings | None = None, **fields: Any
) -> Report:
    """Train `spec` (a Spec, a mapping of its fields, or keyword fields) briefly and return its report.

    CIFAR-10 comes from `settings.data_dir` (else `<cache_dir>/datasets/cifar10`) through the decoded cache in
    `settings.cache_dir` (both default to the GRADDIAG_* environment, as for the service), downloaded there
    first when no copy is found and `settings.download_data` allows it; `dataset="synthetic"` needs no data.
    Raises pydantic's ValidationError for a bad spec and DataUnavailableError when CIFAR-10 is missing.
    """
    given = spec.model_dump() if isinstance(spec, Spec) else dict(spec or {})
    spec = Spec.model_validate({**given, **fields})
    settings = settings or Settings()

    from graddiag.service.engine.data import DatasetCache
    from graddiag.service.engine.probe import run_probe

    data = None
    if spec.dataset == "cifar10":
        data = DatasetCache(cifar10_dir(settings), settings.cache_dir).get()
    return run_probe(spec, data=data, eval_samples=settings.eval_samples)


def fetch_cifar10(settings: Settings, progress: TextIO | None = sys.stderr) -> Path:
    """The directory holding CIFAR-10: the configured one, downloading the archive there first when no copy
    is found and `settings.download_data` allows it (progress on `progress`).

    Raises dataset_files.DataDownloadError saying what failed. Imports no torch, so `graddiag serve`'s API
    process calls it too.
    """
    from graddiag.service.engine.dataset_files import ensure_cifar10

    return ensure_cifar10(
        settings.cifar10_dir(),
        download=settings.download_data,
        url=settings.data_url,
        md5=settings.data_md5,
        progress=progress,
    )


def cifar10_dir(settings: Settings, progress: TextIO | None = sys.stderr) -> Path:
    """`fetch_cifar10` for a probe: raises DataUnavailableError saying what failed and how to point at a local
    copy instead."""
    from graddiag.service.engine.data import DataUnavailableError
    from graddiag.service.engine.dataset_files import DataDownloadError

    try:
        return fetch_cifar10(settings, progress)
    except DataDownloadError as exc:
        raise DataUnavailableError(str(exc)) from exc
