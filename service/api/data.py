"""Whether this server has CIFAR-10: for `/readyz`, the dashboard, and refusing CIFAR-10 specs at submit time.

The API never loads the data (nor imports torch); it only checks that a copy is where its workers read
it (engine.dataset_files). It can only judge the workers it supervises itself (`graddiag serve`): those
read the same directory. An API hosted apart from its workers does not know their disks, so it reports
the data set as not monitored and accepts every spec, as before.
"""

from __future__ import annotations

from fastapi import Request

from graddiag.service.api.errors import ApiProblem
from graddiag.service.api.schemas import Check
from graddiag.service.engine.dataset_files import find_cifar10, how_to_fix
from graddiag.service.settings import Settings


def local_workers(request: Request) -> bool:
    """Whether this API supervises the workers that will execute its runs (so shares their data directory):
    a `serve` with at least one local worker (with none, external workers run everything)."""
    probe = request.app.state.worker_probe
    return probe is not None and probe()[1] > 0


def cifar10_check(settings: Settings, monitored: bool) -> Check:
    """Whether CIFAR-10 is where this server's workers read it, and where that is."""
    if not monitored:
        return Check(ok=True, detail="not monitored: workers run outside this process's supervision")
    directory = settings.cifar10_dir()
    found = find_cifar10(directory)
    if found is not None:
        return Check(ok=True, detail=f"available in {found}")
    return Check(
        ok=False,
        detail=f"not found in {directory}: runs with dataset='cifar10' are refused until it is there "
        "(dataset='synthetic' runs work). " + how_to_fix(directory),
    )


def require_cifar10(request: Request, settings: Settings) -> None:
    """Refuse (503 data_unavailable) a submission needing CIFAR-10 when this server's workers have none."""
    check = cifar10_check(settings, local_workers(request))
    if not check.ok:
        raise ApiProblem(503, "data_unavailable", f"This server cannot run dataset='cifar10': CIFAR-10 {check.detail}")
