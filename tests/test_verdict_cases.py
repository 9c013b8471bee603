"""The labelled case table (tests/support/verdict_cases.py) run through the probe on synthetic data.

graddiag's label must equal each case's expected label, which follows from the case's source (a closed
form from the literature, or the profile measured with plain autograd); graddiag's measured span must
match the source's (formula: within 0.05 decades per layer; independent: to 1e-3).
"""

from __future__ import annotations

import pytest

from graddiag.models.spec import Spec
from graddiag.service.engine.probe import run_probe
from tests.support.verdict_cases import CASES, Case, expected_label, independent, source_span


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_table(case: Case) -> None:
    spec = case.spec()
    report = run_probe(spec, eval_samples=64)
    verdict = report.verdict
    interior = verdict.evidence.interior_layers
    measured = verdict.evidence.act_span_decades
    assert measured is not None

    plain = independent(spec)
    assert plain.points == interior
    span = source_span(case, spec, interior, plain)
    if case.source == "formula":
        assert abs(measured - span) <= 0.05 * (interior - 1), (case.name, measured, span)
    else:
        assert measured == pytest.approx(span, abs=1e-3), case.name
    assert verdict.evidence.rel_grad_max == pytest.approx(plain.rel_max, rel=1e-4)
    # The source's label follows the product's definition, and the case is clear of the line.
    assert expected_label(span, plain) == case.expected, (case.name, span)
    if not case.borderline:
        assert abs(span) <= 1.5 or abs(span) >= 2.5, (case.name, span)
    assert verdict.label == case.expected, (case.name, span, verdict.reasons)
    assert verdict.at_init == case.expected, (case.name, span)
    kinds = {f.kind for f in verdict.findings}
    if case.finding is not None:
        assert case.finding in kinds, (case.name, kinds)
    # Every advice item names the finding that triggered it, and that finding is in the list.
    for item in verdict.advice:
        assert item.endswith("]") and item.rsplit("[", 1)[1][:-1] in kinds, item


def test_the_table_covers_every_kind_of_spec() -> None:
    specs = [case.spec() for case in CASES]
    assert len(CASES) >= 40
    assert {s.activation for s in specs} == set(Spec.model_fields["activation"].annotation.__args__)  # type: ignore[union-attr]
    # init='identity' names a recurrent matrix (rnn, gru, lstm): tests/test_verdict_time.py covers it.
    inits = set(Spec.model_fields["init"].annotation.__args__) - {"identity"}  # type: ignore[union-attr]
    assert {s.init for s in specs} == inits
    assert {s.norm for s in specs} == {"none", "batch", "layer"}
    assert {s.optimizer for s in specs} == {"sgd", "momentum", "adam", "adamw"}
    assert {s.arch for s in specs} == {"mlp", "cnn"}
    assert {s.clip_mode for s in specs if s.clip_value} == {"norm", "value"}
    assert any(s.residual for s in specs) and any(s.l1 > 0 for s in specs) and any(s.weight_decay for s in specs)
    assert {c.expected for c in CASES} == {"vanishing", "exploding", "healthy"}
