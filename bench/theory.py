"""Mean-field theory against measurement, and the labelled case table, on CIFAR-10.

Two tables, both at initialisation (one step) on real CIFAR-10 batches of 256:

1. **Theory**: every activation under three inits (plain depth-20, width-256 MLPs), then the other
   derivations the theory claims — batch norm, layer norm, residual (odd φ), CNNs — beside the
   measured slope of ‖∂L/∂h‖; "agrees" is within max(0.05, 10 %) decades per layer.
2. **Cases**: the labelled table of tests/support/verdict_cases.py (the one `make test` runs on synthetic
   data), each case's expected label re-derived on CIFAR-10 from its source (the closed form, or the
   profile measured with plain autograd on the same batch) beside graddiag's label.

Not a timing benchmark: the numbers do not depend on load.

    python -m bench.theory [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from graddiag.models.spec import Spec
from graddiag.service.engine.data import DatasetCache, ImageSet
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.report import Report
from tests.support.verdict_cases import CASES, expected_label, independent, source_span

ACTIVATIONS = ["sigmoid", "tanh", "softsign", "relu", "leaky_relu", "elu", "selu", "gelu", "silu", "identity"]
INITS = [("default", "default"), ("xavier_normal", "zeros"), ("kaiming_normal", "zeros")]
# The other derivations: (label, spec fields).
STRUCTURES: list[tuple[str, dict[str, Any]]] = [
    ("batch norm", dict(activation="relu", norm="batch", init="kaiming_normal", depth=50, width=128)),
    ("batch norm", dict(activation="identity", norm="batch", depth=30)),
    ("batch norm", dict(activation="tanh", norm="batch", depth=30)),
    ("layer norm", dict(activation="relu", norm="layer", depth=30)),
    ("layer norm", dict(activation="sigmoid", norm="layer", depth=20)),
    ("layer norm", dict(activation="tanh", norm="layer", depth=30)),
    ("residual", dict(activation="tanh", residual=True, depth=30)),
    ("residual", dict(activation="identity", residual=True, depth=30)),
    ("residual", dict(activation="relu", residual=True, depth=50)),
    ("cnn", dict(arch="cnn", activation="sigmoid", depth=9, width=32)),
    ("cnn", dict(arch="cnn", activation="tanh", depth=9, width=32)),
    ("cnn", dict(arch="cnn", activation="tanh", depth=12, width=32, init="xavier_normal", bias_init="zeros")),
    ("cnn", dict(arch="cnn", activation="relu", depth=9, width=32)),
    ("cnn", dict(arch="cnn", activation="relu", depth=9, width=32, init="kaiming_normal", bias_init="zeros")),
    ("cnn", dict(arch="cnn", activation="softsign", depth=9, width=32)),
    ("cnn", dict(arch="cnn", activation="relu", depth=9, width=32, norm="batch")),
    ("cnn", dict(arch="cnn", activation="gelu", depth=9, width=32, init="kaiming_normal", bias_init="zeros")),
]
RESULTS = Path(__file__).parent / "results"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}"


def _probe(fields: dict[str, Any], data: tuple[ImageSet, ImageSet] | None) -> Report:
    base: dict[str, Any] = dict(
        steps=1, batch_size=256, width=256, depth=20, dataset="cifar10" if data else "synthetic"
    )
    base.update(fields)
    return run_probe(Spec.model_validate(base), data=data, eval_samples=100)


def theory_rows(data: tuple[ImageSet, ImageSet] | None) -> list[dict[str, Any]]:
    """Prediction beside measurement for the activation × init grid and the other structures."""
    grid = [("plain", dict(activation=a, init=i, bias_init=b)) for a in ACTIVATIONS for i, b in INITS]
    rows = []
    for structure, fields in grid + STRUCTURES:
        report = _probe(fields, data)
        theory, evidence = report.verdict.theory, report.verdict.evidence
        rows.append(
            {
                "structure": structure,
                "spec": {k: v for k, v in fields.items() if k != "bias_init"},
                "model": theory.model,
                "applicable": theory.applicable,
                "chi1": theory.chi1,
                "predicted": theory.predicted_decades_per_layer,
                "measured_act": evidence.act_decades_per_layer,
                "measured_weight": evidence.decades_per_layer,
                "tolerance": theory.tolerance,
                "agrees": theory.agrees,
                "label": report.verdict.label,
                "reason": None if theory.applicable else theory.reason,
            }
        )
    return rows


def case_rows(data: tuple[ImageSet, ImageSet] | None) -> list[dict[str, Any]]:
    """The labelled case table on the data: source span and label beside graddiag's."""
    dataset = "cifar10" if data else "synthetic"
    rows = []
    for case in CASES:
        spec = case.spec(dataset)
        report = run_probe(spec, data=data, eval_samples=100)
        plain = independent(spec, data)
        span = source_span(case, spec, report.verdict.evidence.interior_layers, plain)
        rows.append(
            {
                "case": case.name,
                "source": case.source,
                "source_span": span,
                "expected": expected_label(span, plain),
                "measured_span": report.verdict.evidence.act_span_decades,
                "label": report.verdict.label,
                "findings": sorted({f.kind for f in report.verdict.findings}),
            }
        )
    return rows


def _theory_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| structure | spec | model | χ₁ | predicted | measured ‖∂L/∂h‖ | measured ‖∂L/∂W‖ | agrees | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spec = ", ".join(f"{k}={v}" for k, v in row["spec"].items())
        chi1 = "—" if row["chi1"] is None else f"{row['chi1']:.3g}"
        agrees = {True: "yes", False: "**no**", None: "—"}[row["agrees"]]
        model = row["model"] or "not covered"
        lines.append(
            f"| {row['structure']} | {spec} | {model} | {chi1} | {_fmt(row['predicted'])} "
            f"| {_fmt(row['measured_act'])} | {_fmt(row['measured_weight'])} | {agrees} | {row['label']} |"
        )
    return "\n".join(lines)


def _case_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | source | source span | expected | graddiag span | graddiag | findings |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mark = "" if row["expected"] == row["label"] else " **≠**"
        lines.append(
            f"| {row['case']} | {row['source']} | {_fmt(row['source_span'])} | {row['expected']} "
            f"| {_fmt(row['measured_span'])} | {row['label']}{mark} | {', '.join(row['findings'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run both tables and write bench/results/theory.{json,md}."""
    parser = argparse.ArgumentParser(prog="bench.theory", description=__doc__)
    parser.add_argument("--data-dir", default=os.environ.get("GRADDIAG_DATA_DIR"))
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "graddiag"))
    args = parser.parse_args(argv)
    data = DatasetCache(args.data_dir, args.cache_dir).get() if args.data_dir else None
    dataset = "CIFAR-10" if data else "synthetic data"
    theory, cases = theory_rows(data), case_rows(data)
    covered = [r for r in theory if r["agrees"] is not None]
    matches = sum(r["expected"] == r["label"] for r in cases)
    summary = (
        f"Theory agrees on {sum(r['agrees'] for r in covered)} of {len(covered)} covered rows; "
        f"the verdict matches the source's label on {matches} of {len(cases)} cases ({dataset})."
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "theory.json").write_text(
        json.dumps({"dataset": dataset, "summary": summary, "theory": theory, "cases": cases}, indent=1)
    )
    text = (
        f"# Theory and the labelled cases on {dataset}\n\n{summary}\n\n"
        "## Mean-field prediction against measurement\n\n"
        "At initialisation, batch 256; the plain MLPs are depth 20, width 256.\n\n"
        f"{_theory_table(theory)}\n\n"
        "## The labelled case table (tests/support/verdict_cases.py)\n\n"
        f"{_case_table(cases)}\n"
    )
    (RESULTS / "theory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
