"""Sweeps: a grid over spec fields, one queued run per grid point, and the grid's progress and summary."""

from __future__ import annotations

import itertools
import math
import uuid
from datetime import datetime
from typing import Any, Literal, cast

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from graddiag.models.spec import RECURRENT_ARCHS, Spec, SpecCaps, combination_field
from graddiag.service.engine.profile import SPAN_DECADES
from graddiag.service.engine.report import FindingKind, Label, Severity
from graddiag.service.store.query import has_tag, name_contains
from graddiag.service.store.runs import build_run
from graddiag.service.store.tables import FINISHED, STATUSES, Run, RunStatus, Sweep, stamp

# At most this many errors are reported, and validation stops once it has them: a bad axis would otherwise
# repeat one message per point (200 points), and 95,000 unknown keys would make 95,000 errors.
_MAX_ERRORS = 20
# Values and keys quoted in a message are cut to this many characters, so a 1 MB value cannot make a
# 1 MB message (let alone one per grid point).
_MAX_QUOTED_CHARS = 40

# Critical sequence lengths beyond this many time steps are reported as null: a slope under 0.002 decades per
# step changes the gradient by under 0.06 decades across the 32 steps measured, which no fit tells from level.
MAX_SEQUENCE_LENGTH = 1000


class SweepInvalid(ValueError):
    """The sweep was refused; `errors` holds one {"loc", "msg"} per problem, naming the point and field."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


class SweepNotFound(LookupError):
    """No sweep has this id."""

    def __init__(self, sweep_id: str) -> None:
        super().__init__(f"sweep {sweep_id!r} not found")
        self.sweep_id = sweep_id


class FindingBrief(BaseModel):
    """A finding as a sweep lists it: its kind, severity, phase and sentence (the run has the rest)."""

    kind: FindingKind
    severity: Severity
    phase: Literal["init", "training"] | None = None
    message: str


class SweepRun(BaseModel):
    """One grid point of a sweep and where its run stands."""

    run_id: str
    grid: dict[str, Any]
    status: RunStatus
    verdict: Label | None
    findings: list[FindingBrief] | None = Field(None, description="The verdict's findings; null until succeeded.")


class SweepStatus(BaseModel):
    """A sweep's progress: counts by status and every run."""

    id: str
    name: str | None = Field(None, description="The sweep's name (editable).")
    tags: list[str] = Field(default_factory=list, description="The sweep's tags (editable).")
    base: dict[str, Any] = Field(default_factory=dict, description="The spec fields every point shares, as given.")
    grid: dict[str, Any] = Field(default_factory=dict, description="Spec field → the values swept.")
    created_at: datetime
    total: int
    counts: dict[str, int]
    done: bool
    runs: list[SweepRun] = Field(
        description="Every run, or with `finding` only those whose verdict has one of that kind."
    )


class SweepConfig(BaseModel):
    """One combination of the non-depth grid axes, across the depths swept."""

    config: dict[str, Any]
    depths: list[int]
    verdicts: list[Label | None]
    critical_depth: int | None
    first_last_ratio: list[float | None]
    profile_span: list[float | None] = Field(
        description="Per depth, the fitted change across the interior layers at initialisation, in decades, of "
        "the profile the verdict judges steeper: the weight gradient ‖∂L/∂W‖ or the back-propagated signal "
        "‖∂L/∂h‖ (see profile_statistic). Null before the run succeeded, and when the network has fewer than "
        "2 interior layers (no profile to fit: depth 2 for an mlp)."
    )
    profile_statistic: list[Literal["grad_norm", "act_grad_norm"] | None] = Field(
        description="Per depth, which profile profile_span measures; null where it is null."
    )
    span_threshold: list[float | None] = Field(
        description="Per depth, the span (either sign) at which the verdict calls the profile vanishing or "
        "exploding: 2 decades plus the run's finite-width allowance."
    )
    findings: list[list[FindingBrief] | None] = Field(
        description="Per depth, the run's findings (null until it succeeded), in the order of `depths`."
    )
    finding_depths: dict[FindingKind, int] = Field(
        description="Each finding kind seen in this configuration → the shallowest depth where it appears."
    )
    time_decades_per_step: list[float | None] = Field(
        description="Per depth, a recurrent net's fitted slope of log10 ‖∂L/∂h_t‖ against the time step t at "
        "initialisation, in decades per step toward t = 0 (negative: the gradient shrinks into the past); null "
        "for other architectures and before the run succeeded."
    )
    critical_sequence_length: list[float | None] = Field(
        description="Per depth, 2 / |time_decades_per_step|: the number of time steps over which the fitted "
        "gradient through time changes by 2 decades, the verdict's line (longer sequences than this vanish or "
        f"explode through time). Null where the slope is null, and where it exceeds {MAX_SEQUENCE_LENGTH} "
        "steps (a slope that small is level within what the 32 measured steps can tell)."
    )


class ArchSequenceLength(BaseModel):
    """A recurrent architecture of the sweep and the shortest critical sequence length among its grid points."""

    arch: str
    critical_sequence_length: float | None = Field(
        description="The shortest critical_sequence_length of this architecture's succeeded runs; null when none "
        "has one (none succeeded yet, or every slope is level)."
    )
    grid: dict[str, Any] | None = Field(description="The grid point where it is shortest; null with it.")
    runs: int = Field(description="This architecture's succeeded runs, the ones it was taken over.")


class SweepSummary(BaseModel):
    """Per configuration: verdict by depth, the shallowest unhealthy depth and the gradient ratio; per
    recurrent architecture, the shortest critical sequence length."""

    id: str
    done: bool
    finding: FindingKind | None = Field(
        None, description="The filter asked for: only configurations with this finding."
    )
    configs: list[SweepConfig]
    sequence_lengths: list[ArchSequenceLength] = Field(
        default_factory=list,
        description="Per recurrent architecture (rnn, gru, lstm) among the sweep's runs, in that order; empty for "
        "a sweep of other architectures.",
    )


def quoted(value: Any, limit: int = _MAX_QUOTED_CHARS) -> str:
    """`repr(value)` cut to about `limit` characters, for error messages that quote user input.

    The repr of a huge container is never built whole: a list or dict is summarised by its length.
    """
    if isinstance(value, list | dict):
        text = f"<{type(value).__name__} of {len(value)}>"
    elif isinstance(value, int) and value.bit_length() > 64:
        text = f"<integer of {value.bit_length()} bits>"  # repr of a huge int is slow, or refused past 4300 digits
    elif isinstance(value, str) and len(value) > limit:
        text = repr(value[:limit]) + f"… ({len(value)} characters)"
    else:
        text = repr(value)
    return text if len(text) <= limit + 40 else text[:limit] + "…"


def cut(text: str, limit: int = _MAX_QUOTED_CHARS) -> str:
    """`text` cut to `limit` characters (a key named in an error's location may be megabytes long)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _point_label(point: dict[str, Any]) -> str:
    # Bounded however many axes: every error of a point repeats its label.
    return cut(", ".join(f"{cut(field)}={quoted(value)}" for field, value in point.items()), 4 * _MAX_QUOTED_CHARS)


class _Errors:
    """Collects up to _MAX_ERRORS errors; `full` tells the caller to stop validating."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    @property
    def full(self) -> bool:
        return len(self.items) >= _MAX_ERRORS

    def add(self, loc: list[str | int], msg: str) -> None:
        if not self.full:
            self.items.append({"loc": [cut(part) if isinstance(part, str) else part for part in loc], "msg": msg})


def _check_shape(base: dict[str, Any], grid: dict[str, list[Any]], max_size: int) -> list[dict[str, Any]]:
    errors = _Errors()
    known = Spec.model_fields
    for field in base:
        if errors.full:
            break
        if field not in known:
            errors.add(["base", field], "not a spec field")
    if not grid:
        errors.add(["grid"], "name at least one spec field to vary")
    for field, values in grid.items():
        if errors.full:
            break
        if field not in known:
            errors.add(["grid", field], "not a spec field")
        elif not isinstance(values, list) or not values:
            errors.add(["grid", field], "give a non-empty list of values")
    if not errors.items:
        size = math.prod(len(values) for values in grid.values())
        if size > max_size:
            errors.add(["grid"], f"{size} grid points exceed this server's sweep cap of {max_size}")
    return errors.items


def _grid_specs(
    base: dict[str, Any], grid: dict[str, list[Any]], caps: SpecCaps
) -> tuple[list[tuple[Spec, dict[str, Any]]], list[dict[str, Any]]]:
    """The distinct validated specs of the grid's points (with their normalised grid values), or errors.

    Points are compared after validation, so `[2, 2.0, "2"]` (one depth, written three ways) is one
    point and one run. Stops at the first _MAX_ERRORS errors.
    """
    specs: dict[str, tuple[Spec, dict[str, Any]]] = {}
    errors = _Errors()
    fields = list(grid)
    for index, values in enumerate(itertools.product(*grid.values())):
        if errors.full:
            break
        point = dict(zip(fields, values, strict=True))
        try:
            spec = Spec.model_validate({**base, **point})
        except ValidationError as exc:
            where = f"grid point {index} ({_point_label(point)})"
            # include_input=False: pydantic would otherwise copy every offending value into each error.
            problems: dict[str | int, list[str]] = {}
            for error in exc.errors(include_url=False, include_context=False, include_input=False):
                # A refused combination has no location of its own: it is put under the field it names. A
                # value fitting no member of a union (forget_bias) has an error per member: one line, "or".
                field = error["loc"][0] if error["loc"] else combination_field(error["msg"]) or "spec"
                problems.setdefault(field, []).append(error["msg"].removeprefix("Value error, "))
            for field, messages in problems.items():
                errors.add(["grid", index, field], f"{where}: {' or '.join(messages)}")
            continue
        violations = caps.violations(spec)
        for field, message in violations:
            errors.add(["grid", index, field], f"grid point {index} ({_point_label(point)}): {message}")
        if not violations and not errors.items:
            # The grid values as the spec normalised them (e.g. 1 → 1.0 for lr), for filters and summaries.
            specs.setdefault(spec.fingerprint(), (spec, {field: getattr(spec, field) for field in fields}))
    return list(specs.values()), errors.items


def _distinct_grid(points: list[dict[str, Any]], fields: list[str]) -> dict[str, list[Any]]:
    """Each axis's distinct normalised values in the order first met: the grid the sweep really runs."""
    grid: dict[str, list[Any]] = {field: [] for field in fields}
    for point in points:
        for field in fields:
            if point[field] not in grid[field]:
                grid[field].append(point[field])
    return grid


def create_sweep(
    session: Session,
    base: dict[str, Any],
    grid: dict[str, list[Any]],
    *,
    caps: SpecCaps,
    max_size: int,
    name: str | None = None,
    tags: list[str] | None = None,
) -> Sweep:
    """Validate every grid point (spec rules and caps), then queue one run per distinct point and commit.

    Points equal once validated (`depth` 2, 2.0 and "2") make one run. Raises SweepInvalid, creating
    nothing, when any point is invalid or the grid exceeds `max_size`; it names at most _MAX_ERRORS
    problems, each message bounded whatever the size of the input.
    """
    errors = _check_shape(base, grid, max_size)
    if errors:
        raise SweepInvalid(errors)
    specs, errors = _grid_specs(base, grid, caps)
    if errors:
        raise SweepInvalid(errors)
    ran = _distinct_grid([point for _, point in specs], list(grid))
    sweep = Sweep(
        id=uuid.uuid4().hex, base=base, grid=ran, size=len(specs), name=name or None, tags=tags, **stamp("created")
    )
    session.add(sweep)
    session.flush()  # the runs' foreign key needs the sweep row first
    session.add_all(build_run(spec, sweep_id=sweep.id, grid=point) for spec, point in specs)
    session.commit()
    return sweep


def _sweep_runs(session: Session, sweep_id: str) -> tuple[Sweep, list[Run]]:
    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        raise SweepNotFound(sweep_id)
    runs = session.scalars(select(Run).where(Run.sweep_id == sweep_id).order_by(Run.created_epoch, Run.id))
    return sweep, list(runs)


def _findings(run: Run) -> list[FindingBrief] | None:
    """The run's findings from its stored verdict; None until it succeeded."""
    if run.status != "succeeded":
        return None
    return [FindingBrief.model_validate(item) for item in (run.verdict_detail or {}).get("findings", [])]


def _has(findings: list[FindingBrief] | None, kind: FindingKind) -> bool:
    return any(item.kind == kind for item in findings or ())


def sweep_status(session: Session, sweep_id: str, finding: FindingKind | None = None) -> SweepStatus:
    """Counts by status and every run of the sweep (only those with a `finding` of that kind, if given).

    `total`, `counts` and `done` always describe the whole sweep. Raises SweepNotFound.
    """
    sweep, runs = _sweep_runs(session, sweep_id)
    counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
    for run in runs:
        counts[run.status] += 1
    return SweepStatus(
        id=sweep.id,
        name=sweep.name,
        tags=sweep.tags or [],
        base=sweep.base,
        grid=sweep.grid,
        created_at=sweep.created_at,
        total=len(runs),
        counts=counts,
        done=all(run.status in FINISHED for run in runs),
        runs=[
            SweepRun(run_id=run.id, grid=run.grid or {}, status=run.status, verdict=run.verdict, findings=findings)
            for run, findings in ((run, _findings(run)) for run in runs)
            if finding is None or _has(findings, finding)
        ],
    )


def _first_last_decades(run: Run) -> float | None:
    # interior_ratio is the first over the last interior weight layer's gradient norm at initialisation.
    ratio = (run.evidence or {}).get("interior_ratio")
    return math.log10(ratio) if isinstance(ratio, int | float) and ratio > 0 else None


def _time_slope(run: Run) -> float | None:
    """The run's fitted decades per time step toward t = 0 at initialisation (recurrent runs only)."""
    slope = (run.evidence or {}).get("time_decades_per_step") if run.status == "succeeded" else None
    return float(slope) if isinstance(slope, int | float) and math.isfinite(slope) else None


def critical_sequence_length(slope: float | None) -> float | None:
    """2 / |slope|: how many time steps the fitted through-time profile needs to change by 2 decades (the
    verdict's line); None without a slope or beyond MAX_SEQUENCE_LENGTH steps."""
    if slope is None or abs(slope) * MAX_SEQUENCE_LENGTH <= SPAN_DECADES:
        return None
    return SPAN_DECADES / abs(slope)


def _sequence_lengths(runs: list[Run]) -> list[ArchSequenceLength]:
    """Per recurrent architecture among `runs`: the shortest critical sequence length and where it is."""
    out = []
    for arch in RECURRENT_ARCHS:
        succeeded = [run for run in runs if run.arch == arch and run.status == "succeeded"]
        if not any(run.arch == arch for run in runs):
            continue
        lengths = [
            (length, run) for run in succeeded if (length := critical_sequence_length(_time_slope(run))) is not None
        ]
        length, shortest = min(lengths, key=lambda pair: pair[0], default=(None, None))
        out.append(
            ArchSequenceLength(
                arch=arch,
                critical_sequence_length=length,
                grid=None if shortest is None else shortest.grid or {},
                runs=len(succeeded),
            )
        )
    return out


def _profile_span(run: Run) -> tuple[float | None, Literal["grad_norm", "act_grad_norm"] | None, float | None]:
    """(span, statistic, threshold) of the steeper of the run's two profiles at initialisation."""
    evidence = run.evidence or {}
    spans = [
        (value, statistic)
        for statistic, key in (("grad_norm", "span_decades"), ("act_grad_norm", "act_span_decades"))
        if isinstance(value := evidence.get(key), int | float) and math.isfinite(value)
    ]
    noise = evidence.get("noise_decades")
    threshold = SPAN_DECADES + (noise if isinstance(noise, int | float) else 0.0) if evidence else None
    if not spans:
        return None, None, threshold
    span, statistic = max(spans, key=lambda pair: abs(pair[0]))
    return float(span), cast(Literal["grad_norm", "act_grad_norm"], statistic), threshold


def sweep_summary(session: Session, sweep_id: str, finding: FindingKind | None = None) -> SweepSummary:
    """Per combination of the non-depth grid axes: verdicts and findings by depth and the critical depth.

    critical_depth is the smallest depth whose verdict is not healthy; first_last_ratio is log10 of the
    first over the last interior weight layer's gradient norm at initialisation (None until succeeded);
    finding_depths is, per finding kind, the smallest depth whose run has it; a recurrent run's critical
    sequence length is 2 / |decades per time step|. With `finding`, only the configurations where some run
    has a finding of that kind (the per-architecture sequence lengths stay the whole sweep's).
    """
    sweep, runs = _sweep_runs(session, sweep_id)
    groups: dict[str, tuple[dict[str, Any], list[Run]]] = {}
    for run in runs:
        config = {field: value for field, value in (run.grid or {}).items() if field != "depth"}
        groups.setdefault(repr(sorted(config.items())), (config, []))[1].append(run)
    configs = []
    for config, members in groups.values():
        members.sort(key=lambda run: run.depth)
        verdicts = [run.verdict if run.status == "succeeded" else None for run in members]
        findings = [_findings(run) for run in members]
        if finding is not None and not any(_has(cell, finding) for cell in findings):
            continue
        finding_depths: dict[FindingKind, int] = {}
        for run, cell in zip(members, findings, strict=True):
            for item in cell or ():
                finding_depths[item.kind] = min(finding_depths.get(item.kind, run.depth), run.depth)
        spans = [_profile_span(run) if run.status == "succeeded" else (None, None, None) for run in members]
        slopes = [_time_slope(run) for run in members]
        unhealthy = [
            run.depth for run, verdict in zip(members, verdicts, strict=True) if verdict not in (None, "healthy")
        ]
        configs.append(
            SweepConfig(
                config=config,
                depths=[run.depth for run in members],
                verdicts=verdicts,
                critical_depth=min(unhealthy, default=None),
                first_last_ratio=[_first_last_decades(run) for run in members],
                profile_span=[span for span, _, _ in spans],
                profile_statistic=[statistic for _, statistic, _ in spans],
                span_threshold=[threshold for _, _, threshold in spans],
                findings=findings,
                finding_depths=finding_depths,
                time_decades_per_step=slopes,
                critical_sequence_length=[critical_sequence_length(slope) for slope in slopes],
            )
        )
    return SweepSummary(
        id=sweep.id,
        done=all(run.status in FINISHED for run in runs),
        finding=finding,
        configs=configs,
        sequence_lengths=_sequence_lengths(runs),
    )


# --- the list of sweeps ---------------------------------------------------------------------------------------


class CriticalDepth(BaseModel):
    """One combination of a sweep's non-depth axes and the shallowest depth whose verdict is not healthy."""

    config: dict[str, Any]
    critical_depth: int | None


class SweepListItem(BaseModel):
    """A sweep as the list shows it: its labels, base and grid, progress and critical depths."""

    id: str
    name: str | None
    tags: list[str]
    base: dict[str, Any]
    grid: dict[str, Any]
    size: int
    created_at: datetime
    counts: dict[str, int]
    done: bool
    critical_depths: list[CriticalDepth] = Field(
        description="Per combination of the non-depth axes (as far as its runs have succeeded)."
    )


class SweepList(BaseModel):
    """One page of sweeps, newest first."""

    items: list[SweepListItem]
    total: int
    limit: int
    offset: int


def list_sweeps(
    session: Session, *, limit: int, offset: int, name: str | None = None, tags: list[str] | None = None
) -> SweepList:
    """A page of sweeps, newest first (those whose name contains `name`, with every tag of `tags`).

    Progress and critical depths come from two light queries over the page's runs (status, grid point,
    depth, verdict), not from loading each sweep's runs whole.
    """
    conditions = []
    if name:
        conditions.append(name_contains(Sweep.name, name))
    conditions.extend(has_tag(Sweep.tags, tag) for tag in tags or ())
    total = session.scalar(select(func.count()).select_from(Sweep).where(*conditions)) or 0
    page = list(
        session.scalars(
            select(Sweep).where(*conditions).order_by(Sweep.created_epoch.desc(), Sweep.id).limit(limit).offset(offset)
        )
    )
    ids = [sweep.id for sweep in page]
    counts: dict[str, dict[str, int]] = {sweep_id: dict.fromkeys(STATUSES, 0) for sweep_id in ids}
    for sweep_id, status, count in session.execute(
        select(Run.sweep_id, Run.status, func.count()).where(Run.sweep_id.in_(ids)).group_by(Run.sweep_id, Run.status)
    ):
        counts[str(sweep_id)][status] = count
    critical: dict[str, dict[str, tuple[dict[str, Any], int | None]]] = {sweep_id: {} for sweep_id in ids}
    rows = session.execute(select(Run.sweep_id, Run.grid, Run.depth, Run.verdict).where(Run.sweep_id.in_(ids)))
    for sweep_id, grid, depth, verdict in rows:
        config = {field: value for field, value in (grid or {}).items() if field != "depth"}
        key = repr(sorted(config.items()))
        configs = critical[str(sweep_id)]
        _, shallowest = configs.setdefault(key, (config, None))
        if verdict not in (None, "healthy") and depth is not None and (shallowest is None or depth < shallowest):
            configs[key] = (config, depth)
    items = [
        SweepListItem(
            id=sweep.id,
            name=sweep.name,
            tags=sweep.tags or [],
            base=sweep.base,
            grid=sweep.grid,
            size=sweep.size,
            created_at=sweep.created_at,
            counts=counts[sweep.id],
            done=all(counts[sweep.id][status] == 0 for status in STATUSES if status not in FINISHED),
            critical_depths=[
                CriticalDepth(config=config, critical_depth=depth) for config, depth in critical[sweep.id].values()
            ],
        )
        for sweep in page
    ]
    return SweepList(items=items, total=total, limit=limit, offset=offset)
