"""Run a probe in this process: the public :func:`graddiag.probe` and the `graddiag probe` command."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graddiag.models.spec import Spec
from graddiag.service.engine.report import Report
from graddiag.service.settings import Settings


def probe(
    spec: Spec | Mapping[str, Any] | None = None, /, *, settings: Settings | None = None, **fields: Any
) -> Report:
    """Train `spec` (a Spec, a mapping of its fields, or keyword fields) briefly and return its report.

    CIFAR-10 comes from `settings.data_dir` through the decoded cache in `settings.cache_dir` (both
    default to the GRADDIAG_* environment, as for the service); `dataset="synthetic"` needs no data.
    Raises pydantic's ValidationError for a bad spec and DataUnavailableError when CIFAR-10 is missing.
    """
    given = spec.model_dump() if isinstance(spec, Spec) else dict(spec or {})
    spec = Spec.model_validate({**given, **fields})
    settings = settings or Settings()

    from graddiag.service.engine.data import DatasetCache
    from graddiag.service.engine.probe import run_probe

    data = DatasetCache(settings.data_dir, settings.cache_dir).get() if spec.dataset == "cifar10" else None
    return run_probe(spec, data=data, eval_samples=settings.eval_samples)
