"""The built-in dashboard: server-rendered HTML shells at `/`, `/runs/{id}`, `/sweeps/{id}` and `/compare`.

Each page is a Jinja2 shell naming the JSON endpoints it reads; small vanilla ES modules under
service/web/static draw it with plotly.js. Everything is served from the installed packages — our
static files and plotly's bundled plotly.min.js — so the dashboard works with no internet access.
Unknown ids get an HTML 404 page (the JSON API keeps answering problem+json).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Final, get_args

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from graddiag.models.spec import RECURRENT_ARCHS, Activation, Arch, Init, Norm, NormPosition
from graddiag.service.api.data import cifar10_check, local_workers
from graddiag.service.api.deps import SessionDep, SettingsDep
from graddiag.service.engine.report import FindingKind, Label
from graddiag.service.store import runs as run_store
from graddiag.service.store import sweeps as sweep_store
from graddiag.service.store.ids import AmbiguousId, resolve_run_id, resolve_sweep_id
from graddiag.service.store.runs import RunNotFound
from graddiag.service.store.sweeps import SweepNotFound
from graddiag.service.store.tables import STATUSES

WEB_DIR: Final = Path(__file__).resolve().parents[1] / "web"
# plotly.js as the `plotly` distribution bundles it, located without importing the Python package.
_PLOTLY: Final = metadata.distribution("plotly")
PLOTLY_JS: Final = Path(str(_PLOTLY.locate_file("plotly/package_data/plotly.min.js")))

# The runs table's filter choices, from the same Literals the API validates against.
FILTER_CHOICES: Final = {
    "arch": get_args(Arch),
    "activation": get_args(Activation),
    "init": get_args(Init),
    "norm": get_args(Norm),
    "norm_position": get_args(NormPosition),
    "verdict": get_args(Label),
    "status": STATUSES,
    "finding": get_args(FindingKind),
}

templates = Jinja2Templates(directory=WEB_DIR / "templates")
router = APIRouter(include_in_schema=False)


def static_files() -> StaticFiles:
    """The dashboard's own scripts and styles, for mounting at /static (name "static")."""
    return StaticFiles(directory=WEB_DIR / "static")


def _page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    # root_path: the prefix a reverse proxy mounts the service under; the scripts prefix API calls with it.
    base = request.scope.get("root_path", "").rstrip("/")
    # The recurrent archs as models.spec defines them, for the scripts (common.js's RECURRENT).
    shared = {"base": base, "plotly_version": _PLOTLY.version, "recurrent_archs": " ".join(RECURRENT_ARCHS)}
    return templates.TemplateResponse(request, template, {**shared, **context}, status_code=status_code)


def _not_found(request: Request, what: str) -> HTMLResponse:
    return _page(request, "not_found.html", status_code=404, title="Not found", what=what)


def _ambiguous(request: Request, error: AmbiguousId) -> HTMLResponse:
    # 409 as in the API, with a link to each candidate so the reader can pick.
    return _page(request, "ambiguous.html", status_code=409, title="Ambiguous id", error=error)


@router.get("/static/vendor/plotly.min.js")
def plotly_js() -> FileResponse:
    """plotly.js as bundled in the installed `plotly` package (versioned URLs let browsers cache it)."""
    return FileResponse(PLOTLY_JS, media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, settings: SettingsDep) -> HTMLResponse:
    """The runs table: filters, sorting and live status, read from GET /v1/runs; a notice when this server's
    workers have no CIFAR-10 (what to do about it)."""
    cifar10 = cifar10_check(settings, local_workers(request))
    return _page(request, "runs.html", title="Runs", choices=FILTER_CHOICES, cifar10=cifar10)


@router.get("/sweeps", response_class=HTMLResponse)
def sweeps_page(request: Request) -> HTMLResponse:
    """Every sweep: name, tags, base spec, grid, progress and critical depths, read from GET /v1/sweeps."""
    return _page(request, "sweeps.html", title="Sweeps")


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str, request: Request, session: SessionDep) -> HTMLResponse:
    """One run: progress while it runs (server-sent events), its profiles, heatmap, forward signal, curves,
    verdict and findings."""
    try:
        run = run_store.get_run(session, resolve_run_id(session, run_id))
    except RunNotFound:
        return _not_found(request, f"run {run_id}")
    except AmbiguousId as error:
        return _ambiguous(request, error)
    return _page(request, "run.html", title=f"Run {run.id[:8]}", run=run)


@router.get("/sweeps/{sweep_id}", response_class=HTMLResponse)
def sweep_page(sweep_id: str, request: Request, session: SessionDep) -> HTMLResponse:
    """One sweep: the verdict and findings matrix (filterable by finding), the first/last gradient ratio
    against depth, critical depths."""
    try:
        status = sweep_store.sweep_status(session, resolve_sweep_id(session, sweep_id))
    except SweepNotFound:
        return _not_found(request, f"sweep {sweep_id}")
    except AmbiguousId as error:
        return _ambiguous(request, error)
    return _page(
        request, "sweep.html", title=f"Sweep {status.id[:8]}", sweep=status, finding_kinds=get_args(FindingKind)
    )


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request, session: SessionDep, run_id: Annotated[list[str] | None, Query()] = None
) -> HTMLResponse:
    """Two or more runs' per-layer profiles overlaid, read from GET /v1/compare."""
    ids = []
    for rid in run_id or []:
        try:
            ids.append(resolve_run_id(session, rid))
        except RunNotFound:
            return _not_found(request, f"run {rid}")
        except AmbiguousId as error:
            return _ambiguous(request, error)
    return _page(request, "compare.html", title="Compare", run_ids=ids)
