"""Request and response bodies of the REST API (pydantic at the edge; OpenAPI is built from these).

The spec and the report are the engine's own models, so `GET /v1/runs/{id}` serves exactly what
`graddiag probe --json` prints. Sweep bodies are the store's models for the same reason.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, field_validator, model_validator

from graddiag.models.shapes import LayerKind
from graddiag.models.spec import Spec
from graddiag.service.engine.report import FindingKind, Label, ModelDescription, Report, TimeRecord
from graddiag.service.store.labels import MAX_TAGS, Name, Tag
from graddiag.service.store.query import run_metrics
from graddiag.service.store.runs import decode_finding_kinds
from graddiag.service.store.tables import Run, RunSource, RunStatus


class FieldError(BaseModel):
    """One offending input: where it is (e.g. ``["body", "depth"]``) and what is wrong with it."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error response."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    code: str = Field(description="Stable machine-readable problem slug, e.g. run_not_found.")
    errors: list[FieldError] | None = Field(None, description="Per-field errors (validation only).")


class RunProgress(BaseModel):
    """The worker's latest heartbeat of a running probe."""

    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    label_so_far: Label | None = None
    updated_at: datetime | None = None


class RunSummary(BaseModel):
    """A run as listed: its spec, state and verdict, without the (large) report."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    status: RunStatus
    verdict: Label | None = Field(None, description="The verdict label once the run succeeded.")
    finding_kinds: list[FindingKind] | None = Field(
        None, description="The distinct kinds of the verdict's findings, sorted; null until the run succeeded."
    )
    source: RunSource = Field(
        "probe", description="probe (graddiag trained a spec) or external (an uploaded report of your own model)."
    )
    spec: Spec | None = Field(description="The probe's spec; null for an external run.")
    model: ModelDescription | None = Field(None, description="An external run's model description.")
    name: str | None = Field(None, description="The run's name (given at submit or upload; PATCH edits it).")
    tags: list[str] = Field(
        default_factory=list, description="The run's tags (given at submit or upload; PATCH edits them)."
    )
    sweep_id: str | None = None
    grid: dict[str, Any] | None = Field(None, description="This run's grid point within its sweep.")
    attempt: int = Field(description="Claims so far; above 1 when a worker died or lost its lease.")
    cancel_requested: bool = False
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    metrics: dict[str, float | None] | None = Field(
        None,
        description="Key result numbers: decades_per_layer, act_decades_per_layer, rel_grad_median, "
        "eval_accuracy, eval_loss, total_s (null each until the run has them). Sort and filter on them.",
    )

    @field_validator("tags", mode="before")
    @classmethod
    def _no_tags(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("finding_kinds", mode="before")
    @classmethod
    def _stored_kinds(cls, value: Any) -> Any:
        # Read from a Run row, the kinds are the store's delimited column; given as a list, they pass as is.
        return decode_finding_kinds(value) if isinstance(value, str) else value

    @model_validator(mode="wrap")
    @classmethod
    def _with_metrics(cls, data: Any, handler: ModelWrapValidatorHandler[RunSummary]) -> RunSummary:
        # A Run row has no `metrics` attribute: they are picked from its evidence, evaluation and timing.
        summary = handler(data)
        if isinstance(data, Run) and summary.metrics is None:
            summary.metrics = run_metrics(data)
        return summary


class RunDetail(RunSummary):
    """One run in full: progress while running, the error if it failed, the report once succeeded."""

    progress: RunProgress | None = None
    error: str | None = None
    worker: str | None = Field(
        None, validation_alias="lease_owner", description="The worker holding the run while it runs."
    )
    report: Report | None = Field(None, description="Same keys as `graddiag probe --json`.")


class RunList(BaseModel):
    """A page of runs and the number of runs matching the filters."""

    items: list[RunSummary]
    total: int
    limit: int
    offset: int


class SweepIn(BaseModel):
    """A sweep request: every grid point is `base` updated with one value per grid axis."""

    model_config = ConfigDict(extra="forbid")

    base: dict[str, Any] = Field(default_factory=dict, description="Spec fields shared by every point.")
    grid: dict[str, list[Any]] = Field(
        min_length=1,
        description="Spec field → values, e.g. {'activation': ['sigmoid', 'relu'], 'depth': [2, 10]}.",
        examples=[{"activation": ["sigmoid", "relu"], "depth": [2, 5, 10, 20, 30]}],
    )
    name: Name | None = Field(None, description="A name for the sweep (editable later).")
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS, description="Labels to find it by.")

    @field_validator("base", "grid", mode="before")
    @classmethod
    def _no_more_keys_than_spec_fields(cls, value: Any) -> Any:
        # Each key must be a spec field, so more keys than fields is wrong whatever they are: refused before
        # anything checks them one by one (95,000 keys would otherwise make 95,000 checks and errors).
        fields = Spec.model_fields
        if isinstance(value, dict) and len(value) > len(fields):
            named = ", ".join(repr(str(key)[:40]) for key in itertools.islice((k for k in value if k not in fields), 3))
            raise ValueError(f"{len(value)} keys, but a spec has {len(fields)} fields (not fields: {named}, …)")
        return value


class GradientPoint(BaseModel):
    """The per-layer figures `compare` puts side by side at one step."""

    grad_norm: float | None
    act_grad_norm: float | None
    rel_grad: float | None


class LayerProfile(BaseModel):
    """One layer of a compared run, at initialisation and at the last recorded step."""

    index: int
    name: str
    kind: LayerKind
    init: GradientPoint | None
    last: GradientPoint | None


class RunProfile(BaseModel):
    """A finished run's per-layer gradient profile."""

    run_id: str
    source: RunSource = "probe"
    spec: Spec | None = Field(description="The probe's spec; null for an external run.")
    model: ModelDescription | None = Field(None, description="An external run's model description.")
    name: str | None = Field(None, description="The run's name (given at submit or upload; PATCH edits it).")
    verdict: Label | None
    init_step: int | None = Field(description="The first recorded step (0 = before any update).")
    last_step: int | None = Field(description="The last recorded step.")
    layers: list[LayerProfile]


class Comparison(BaseModel):
    """Profiles of several runs, in the order their ids were given."""

    runs: list[RunProfile]


class RecurrentLayer(BaseModel):
    """A recurrent layer of a run (its recurrent matrix, kind "recurrent"): what its time records are of."""

    index: int = Field(description="The LayerInfo index, as the rows' `layer` names it.")
    name: str = Field(description="e.g. lstm1.hh.")


class TimeProfile(BaseModel):
    """A run's gradient through time: its recurrent layers and the time records of each recorded step."""

    run_id: str
    layers: list[RecurrentLayer] = Field(
        description="The run's recurrent layers in forward order; empty for a run without any (mlp, cnn, "
        "transformer) and until the run succeeded."
    )
    rows: list[TimeRecord] = Field(
        description="One per (step, layer, t), ordered by step, then layer, then t (0 = the first time step)."
    )


class Health(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"] = "ok"


class Check(BaseModel):
    """One readiness check."""

    ok: bool
    detail: str


class Readiness(BaseModel):
    """Readiness: the database answers and something will execute queued runs."""

    status: Literal["ready", "not_ready"]
    database: Check
    workers: Check
    cifar10: Check | None = Field(
        None,
        description="Whether CIFAR-10 is where the workers read it. Informational: without it the server is still "
        "ready (synthetic runs work) and refuses dataset='cifar10' specs with a 503 data_unavailable.",
    )
