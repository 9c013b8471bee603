"""A sweep summary's profile_span: the span the verdict judged (the steeper of the weight-gradient and
back-propagated-signal profiles), null where there is none, with the threshold it was judged against."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import Engine

from graddiag.models.spec import Spec, SpecCaps
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine, make_sessionmaker
from graddiag.service.store.sweeps import create_sweep
from graddiag.service.store.tables import Run
from tests.support.api import TINY
from tests.support.reports import plain_report, succeed

pytestmark = pytest.mark.anyio


async def test_profile_span_is_what_the_verdict_judged(api: httpx.AsyncClient, settings: Settings) -> None:
    engine = make_engine(settings.db_url)
    with make_sessionmaker(engine)() as session:
        sweep = create_sweep(session, TINY, {"depth": [2, 5, 10, 20]}, caps=SpecCaps(), max_size=8)
        runs = {run.depth: run.id for run in session.query(Run).filter(Run.sweep_id == sweep.id)}
    # (weight-gradient span, back-propagated-signal span, finite-width allowance) by depth; 20 stays queued.
    spans = {2: (None, None, None), 5: (-1.0, -3.5, 0.25), 10: (4.0, -0.5, None)}
    for depth, (weight, act, noise) in spans.items():
        report = plain_report(Spec.model_validate({**TINY, "depth": depth}))
        evidence = report.verdict.evidence.model_copy(
            update={"span_decades": weight, "act_span_decades": act, "noise_decades": noise}
        )
        succeed(
            engine,
            runs[depth],
            report.model_copy(update={"verdict": report.verdict.model_copy(update={"evidence": evidence})}),
        )
    engine.dispose()

    (config,) = (await api.get(f"/v1/sweeps/{sweep.id}/summary")).json()["configs"]
    assert config["depths"] == [2, 5, 10, 20]
    # Depth 2 succeeded without a span (no interior profile): null, not left out of the lists.
    assert config["profile_span"] == [None, -3.5, 4.0, None]
    assert config["profile_statistic"] == [None, "act_grad_norm", "grad_norm", None]
    assert config["span_threshold"] == [2.0, 2.25, 2.0, None]


def _succeed_with_time_slope(engine: Engine, run_id: str, spec: Spec, slope: float | None) -> None:
    """Store a report of `spec` whose verdict measured `slope` decades per time step (None: not measured)."""
    report = plain_report(spec)
    evidence = report.verdict.evidence.model_copy(update={"time_decades_per_step": slope})
    succeed(
        engine, run_id, report.model_copy(update={"verdict": report.verdict.model_copy(update={"evidence": evidence})})
    )


async def test_critical_sequence_length_per_grid_point_and_per_arch(api: httpx.AsyncClient, settings: Settings) -> None:
    engine = make_engine(settings.db_url)
    with make_sessionmaker(engine)() as session:
        sweep = create_sweep(
            session, TINY, {"arch": ["rnn", "gru", "lstm"], "depth": [1, 2]}, caps=SpecCaps(), max_size=8
        )
        runs = {(run.arch, run.depth): run.id for run in session.query(Run).filter(Run.sweep_id == sweep.id)}
    # Decades per time step toward t = 0 by (arch, depth); lstm at depth 2 stays queued.
    slopes = {
        ("rnn", 1): -0.1,  # 2 decades over 20 steps
        ("rnn", 2): -0.25,  # over 8: the rnn's shortest
        ("gru", 1): 0.0,  # level: no critical length
        ("gru", 2): None,  # not measured
        ("lstm", 1): -0.001,  # 2000 steps: beyond what 32 steps can tell, null
    }
    for (arch, depth), slope in slopes.items():
        _succeed_with_time_slope(
            engine, runs[(arch, depth)], Spec.model_validate({**TINY, "arch": arch, "depth": depth}), slope
        )
    engine.dispose()

    summary = (await api.get(f"/v1/sweeps/{sweep.id}/summary")).json()
    configs = {config["config"]["arch"]: config for config in summary["configs"]}
    assert configs["rnn"]["time_decades_per_step"] == [-0.1, -0.25]
    assert configs["rnn"]["critical_sequence_length"] == pytest.approx([20.0, 8.0])
    assert configs["gru"]["time_decades_per_step"] == [0.0, None]
    assert configs["gru"]["critical_sequence_length"] == [None, None]
    assert configs["lstm"]["time_decades_per_step"] == [-0.001, None]
    assert configs["lstm"]["critical_sequence_length"] == [None, None]
    assert summary["sequence_lengths"] == [
        {"arch": "rnn", "critical_sequence_length": pytest.approx(8.0), "grid": {"arch": "rnn", "depth": 2}, "runs": 2},
        {"arch": "gru", "critical_sequence_length": None, "grid": None, "runs": 2},
        {"arch": "lstm", "critical_sequence_length": None, "grid": None, "runs": 1},
    ]


async def test_exploding_through_time_has_a_critical_length_and_other_archs_none(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    engine = make_engine(settings.db_url)
    with make_sessionmaker(engine)() as session:
        sweep = create_sweep(session, TINY, {"arch": ["mlp", "rnn"]}, caps=SpecCaps(), max_size=8)
        runs = {run.arch: run.id for run in session.query(Run).filter(Run.sweep_id == sweep.id)}
    _succeed_with_time_slope(engine, runs["mlp"], Spec.model_validate(TINY), None)
    _succeed_with_time_slope(engine, runs["rnn"], Spec.model_validate({**TINY, "arch": "rnn"}), 0.5)
    engine.dispose()

    summary = (await api.get(f"/v1/sweeps/{sweep.id}/summary")).json()
    configs = {config["config"]["arch"]: config for config in summary["configs"]}
    assert configs["mlp"]["critical_sequence_length"] == [None]
    assert configs["rnn"]["critical_sequence_length"] == [4.0]  # growing into the past counts as well
    assert [item["arch"] for item in summary["sequence_lengths"]] == ["rnn"]
