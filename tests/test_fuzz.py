"""Fuzz every operation of the API from its own OpenAPI document (schemathesis, in-process over ASGI).

schemathesis's phases run per operation: the documented examples, coverage (each parameter at and just
past its bounds, missing, of the wrong type) and fuzzing (valid and invalid requests generated from the
schema). No answer may be a 5xx, and each must match the document (status, content type, body schema).
The schema is read from the app at import, so a new router is fuzzed without editing this file; the
requests go to an app on a temp SQLite store holding one succeeded run and one sweep, whose ids replace
the generated ones in part of the reads, so real bodies (reports, gradient rows, summaries) are checked
too. Hypothesis runs derandomized with a fixed budget: the same cases on every machine, in well under a
minute on two cores.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from graddiag.models.spec import Spec
from graddiag.service.api import create_app
from graddiag.service.engine.probe import run_probe
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine, make_sessionmaker, upgrade
from graddiag.service.store.runs import cancel_run, create_run
from graddiag.service.store.sweeps import create_sweep, sweep_status
from graddiag.service.worker.queue import claim_next, complete

# Generated examples per operation in the fuzzing phase (the coverage phase adds its own, ~40 each).
EXAMPLES = 25
# POST /v1/runs?wait= would block up to that many seconds for a verdict no worker produces here.
MAX_FUZZ_WAIT = 0.05
TINY = Spec(dataset="synthetic", depth=2, width=4, steps=2, batch_size=4, record_every=1)
CHECKS = [not_a_server_error, response_schema_conformance]

schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
# Filled by the `app` fixture: {"run_id": …, "sweep_id": …} of the seeded rows.
SEEDED: dict[str, str] = {}


@schema.hook
def flatmap_path_parameters(
    context: Any, path_parameters: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    """Reads sometimes address the seeded run or sweep (a fuzzed DELETE must not remove them)."""
    known = {name: SEEDED[name] for name in path_parameters or {} if name in SEEDED}
    if not path_parameters or not known or context.operation.method.upper() != "GET":
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, **known}])


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    tmp = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{tmp / 'graddiag.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            run, _ = create_run(session, TINY)
            base = {"dataset": "synthetic", "steps": 2}
            sweep = create_sweep(session, base, {"depth": [1, 2]}, caps=Settings().caps(), max_size=2)
            # A finished sweep: its event stream ends instead of waiting for runs no worker trains here.
            for point in sweep_status(session, sweep.id).runs:
                cancel_run(session, point.run_id)
        claim = claim_next(engine, "fuzz", lease_seconds=60)
        assert claim is not None and claim.run_id == run.id
        assert complete(engine, claim, run_probe(TINY, eval_samples=10))
    finally:
        engine.dispose()
    SEEDED.update(run_id=run.id, sweep_id=sweep.id)
    return create_app(Settings(db_url=url, cache_dir=tmp / "cache", max_sweep_size=8))


# Sweep bodies are objects of arbitrary keys, which generation would rarely make spec field names or lone
# surrogates (hypothesis's text leaves them out): both are mixed into the generated `base` and `grid`.
LONE_SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)
SWEEP_KEYS = st.one_of(
    st.sampled_from(sorted(Spec.model_fields)),
    LONE_SURROGATES,
    st.builds("{}{}".format, st.sampled_from(sorted(Spec.model_fields)), LONE_SURROGATES),
)
SWEEP_VALUES = st.one_of(
    st.integers(-3, 300), st.floats(allow_nan=False), st.text(max_size=4), st.booleans(), st.none()
)


@schema.hook
def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
    """POST /v1/sweeps bodies also get spec field names and lone surrogates as `base` and `grid` keys."""
    operation = context.operation
    if operation is None or operation.method.upper() != "POST" or operation.path != "/v1/sweeps":
        return st.just(body)
    if not isinstance(body, dict):
        return st.just(body)
    base = st.dictionaries(SWEEP_KEYS, SWEEP_VALUES, max_size=3)
    grid = st.dictionaries(SWEEP_KEYS, st.lists(SWEEP_VALUES, min_size=1, max_size=3), min_size=1, max_size=2)
    mixed = st.builds(lambda b, g: {**body, "base": b, "grid": g}, base, grid)
    return st.one_of(st.just(body), mixed)


def _short_wait(case: Any) -> None:
    wait = (case.query or {}).get("wait")
    try:
        too_long = float(wait) > MAX_FUZZ_WAIT
    except (TypeError, ValueError):
        return  # not a number: the API must refuse it, as generated
    if too_long:
        case.query["wait"] = MAX_FUZZ_WAIT


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_operation_never_fails_and_matches_its_schema(case: Any, app: FastAPI) -> None:
    _short_wait(case)
    case.call_and_validate(app=app, checks=CHECKS)


def test_every_router_is_in_the_fuzzed_schema() -> None:
    paths = set(schema.raw_schema["paths"])
    assert {"/v1/runs", "/v1/runs/{run_id}/gradients", "/v1/sweeps", "/v1/compare", "/healthz", "/readyz"} <= paths


def test_sweep_keys_are_fuzzed_with_spec_fields_and_lone_surrogates(app: FastAPI) -> None:
    # The raw bytes of issue 12's report: a lone surrogate as a grid key, and as a base key.
    operation = schema["/v1/sweeps"]["POST"]
    for body in ({"grid": {"\ud800": [1]}}, {"base": {"\ud800": 1}, "grid": {"depth": [1]}}):
        response = operation.Case(body=body).call_and_validate(app=app, checks=CHECKS)
        assert response.status_code == 422


def test_seeded_rows_give_real_bodies(app: FastAPI) -> None:
    operation = schema["/v1/runs/{run_id}/gradients"]["GET"]
    response = operation.Case(path_parameters={"run_id": SEEDED["run_id"]}).call_and_validate(app=app, checks=CHECKS)
    assert response.status_code == 200 and len(response.json()) == 3 * 2  # 3 layers x 2 recorded steps
