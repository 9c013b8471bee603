"""graddiag: gradient-stability diagnostics for neural networks.

The public Python API, importable as ``import graddiag``:

- :func:`probe` — train a spec briefly in this process and return its judged :class:`Report`
  (loads CIFAR-10 from the configured data directory when the spec needs it);
- :func:`run_probe` — the engine call underneath, for callers that bring their own data;
- :func:`diagnose` — train any PyTorch model briefly on the caller's batches and return its judged
  :class:`Report` (with a :class:`ModelDescription` in place of a spec);
- :func:`watch` — a context manager that records a model inside the caller's own training loop;
- :class:`Spec` — the network and training spec (depth, activation, init, norm, optimizer, ...);
- :class:`Report` — the one report shape the engine, CLI, store and API share;
- :class:`Client` / :class:`AsyncClient` — the REST clients of a running service; they raise
  :class:`GraddiagError` for an error answer and :class:`RunFailed` for a run that did not succeed.

Names are resolved lazily: ``import graddiag`` (and so every ``graddiag.service.*`` import, such as the
API's) does not import torch; only touching ``probe``, ``run_probe``, ``diagnose`` or ``watch`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → the module that defines it
_EXPORTS: dict[str, str] = {
    "probe": "graddiag.service.local",
    "run_probe": "graddiag.service.engine.probe",
    "diagnose": "graddiag.service.engine.diagnose",
    "watch": "graddiag.service.engine.watch",
    "ModelDescription": "graddiag.service.engine.report",
    "Spec": "graddiag.models.spec",
    "Report": "graddiag.service.engine.report",
    "Client": "graddiag.service.client",
    "AsyncClient": "graddiag.service.client",
    "GraddiagError": "graddiag.service.client",
    "RunFailed": "graddiag.service.client",
}

__all__ = [
    "AsyncClient",
    "Client",
    "GraddiagError",
    "ModelDescription",
    "Report",
    "RunFailed",
    "Spec",
    "diagnose",
    "probe",
    "run_probe",
    "watch",
]

if TYPE_CHECKING:
    from graddiag.models.spec import Spec
    from graddiag.service.client import AsyncClient, Client, GraddiagError, RunFailed
    from graddiag.service.engine.diagnose import diagnose
    from graddiag.service.engine.probe import run_probe
    from graddiag.service.engine.report import ModelDescription, Report
    from graddiag.service.engine.watch import watch
    from graddiag.service.local import probe


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graddiag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
