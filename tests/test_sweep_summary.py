"""A sweep summary's profile_span: the span the verdict judged (the steeper of the weight-gradient and
back-propagated-signal profiles), null where there is none, with the threshold it was judged against."""

from __future__ import annotations

import httpx
import pytest

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
