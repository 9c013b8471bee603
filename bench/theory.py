"""Mean-field theory against measurement, and the labelled case table, on CIFAR-10.

Three tables, all at initialisation (one step) on real CIFAR-10 batches of 256:

1. **Theory**: every activation under three inits (plain depth-20, width-256 MLPs), then the other
   derivations the theory claims — batch norm, layer norm, residual (odd φ), CNNs — beside the
   measured slope of ‖∂L/∂h‖; "agrees" is within max(0.05, 10 %) decades per layer.
2. **Cases**: the labelled table of tests/support/verdict_cases.py (the one `make test` runs on synthetic
   data), each case's expected label re-derived on CIFAR-10 from its source (the closed form, or the
   profile measured with plain autograd on the same batch) beside graddiag's label.
3. **Through time**: recurrent nets (rnn tanh/relu at several gains, identity init, lstm with PyTorch's
   forget bias, 1 and chrono, gru), the top layer's predicted rate per time step (theory_time) beside the
   measured slope of ‖∂L/∂h_t‖ (and the LSTM's ‖∂L/∂c_t‖, which its theory predicts), the spectral rate
   log10 ρ(W_hh) and the singular-value bound.

Not a timing benchmark: the numbers do not depend on load.

    python -m bench.theory [--data-dir DIR] [--only time]

``--only time`` reruns the third table alone and replaces its section of bench/results/theory.{md,json}.
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
# Recurrent nets through time: (label, spec fields); depth 2 so the forward map runs through a stack.
RECURRENT: list[tuple[str, dict[str, Any]]] = [
    ("rnn", dict(arch="rnn", activation="tanh")),
    ("rnn", dict(arch="rnn", activation="tanh", init="orthogonal", init_gain=1.0, bias_init="zeros")),
    ("rnn", dict(arch="rnn", activation="tanh", init="orthogonal", init_gain=1.5, bias_init="zeros")),
    ("rnn", dict(arch="rnn", activation="tanh", init="orthogonal", init_gain=3.0, bias_init="zeros")),
    ("rnn", dict(arch="rnn", activation="relu")),
    ("rnn", dict(arch="rnn", activation="relu", init="orthogonal", init_gain=1.0, bias_init="zeros")),
    ("rnn", dict(arch="rnn", activation="relu", init="orthogonal", init_gain=1.5, bias_init="zeros")),
    ("rnn", dict(arch="rnn", activation="relu", init="identity", init_gain=1.0, bias_init="zeros")),
    ("rnn", dict(arch="rnn", activation="tanh", init="identity", init_gain=1.0, bias_init="zeros")),
    ("lstm", dict(arch="lstm")),
    ("lstm", dict(arch="lstm", forget_bias=1.0)),
    ("lstm", dict(arch="lstm", forget_bias="chrono")),
    ("gru", dict(arch="gru")),
]
TIME_HEADING = "## Gradient through time (recurrent nets)"
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


def time_rows(data: tuple[ImageSet, ImageSet] | None) -> list[dict[str, Any]]:
    """The through-time prediction beside the measured slopes, per recurrent spec (width 128, depth 2)."""
    rows = []
    for structure, fields in RECURRENT:
        report = _probe(dict(width=128, depth=2, **fields), data)
        time, evidence = report.verdict.theory.time, report.verdict.evidence
        assert time is not None
        rows.append(
            {
                "structure": structure,
                "spec": {k: v for k, v in fields.items() if k not in ("arch", "bias_init")},
                "model": time.model,
                "applicable": time.applicable,
                "gate_mean": time.gate_mean,
                "predicted": time.predicted_decades_per_step,
                "measured_h": evidence.time_decades_per_step,
                "measured_c": evidence.cell_decades_per_step,
                "spectral": time.spectral_decades_per_step,
                "bound": time.bound_decades_per_step,
                "span": evidence.time_span_decades,
                "tolerance": time.tolerance,
                "agrees": time.agrees,
                "label": report.verdict.label,
                "findings": sorted({f.kind for f in report.verdict.findings}),
                "reason": None if time.applicable else time.reason,
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


def _time_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| arch | spec | model | E[gate] | predicted | measured ‖∂L/∂h_t‖ | measured ‖∂L/∂c_t‖ | log10 ρ | bound "
        "| span | agrees | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spec = ", ".join(f"{k}={v}" for k, v in row["spec"].items()) or "default"
        gate = "—" if row["gate_mean"] is None else f"{row['gate_mean']:.3f}"
        agrees = {True: "yes", False: "**no**", None: "—"}[row["agrees"]]
        lines.append(
            f"| {row['structure']} | {spec} | {row['model'] or 'not covered'} | {gate} | {_fmt(row['predicted'])} "
            f"| {_fmt(row['measured_h'])} | {_fmt(row['measured_c'])} | {_fmt(row['spectral'])} | {_fmt(row['bound'])} "
            f"| {_fmt(row['span'])} | {agrees} | {row['label']} |"
        )
    return "\n".join(lines)


def _time_section(rows: list[dict[str, Any]], dataset: str) -> str:
    covered = [r for r in rows if r["agrees"] is not None]
    return (
        f"{TIME_HEADING}\n\n"
        f"Theory through time agrees on {sum(r['agrees'] for r in covered)} of {len(covered)} covered rows "
        f"({dataset}). At initialisation, batch 256, width 128, depth 2; rates in decades per time step toward "
        "t = 0 for the top layer (the LSTM's theory predicts ‖∂L/∂c_t‖, the others ‖∂L/∂h_t‖); span = measured "
        "‖∂L/∂h_t‖ slope × 31.\n\n"
        f"{_time_table(rows)}\n"
    )


def _splice_time(rows: list[dict[str, Any]], dataset: str) -> str:
    """Replace the through-time section of the existing results (or append it) and return it."""
    section = _time_section(rows, dataset)
    md = RESULTS / "theory.md"
    text = md.read_text() if md.exists() else ""
    before, _, after = text.partition(TIME_HEADING)
    rest = after.split("\n## ", 1)[1] if "\n## " in after else ""
    md.write_text(before.rstrip("\n") + "\n\n" + section + (f"\n## {rest}" if rest else ""))
    path = RESULTS / "theory.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored["time"] = rows
    path.write_text(json.dumps(stored, indent=1))
    return section


def main(argv: list[str] | None = None) -> None:
    """Run both tables and write bench/results/theory.{json,md}."""
    parser = argparse.ArgumentParser(prog="bench.theory", description=__doc__)
    parser.add_argument("--data-dir", default=os.environ.get("GRADDIAG_DATA_DIR"))
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "graddiag"))
    parser.add_argument("--only", choices=["time"], help="rerun the through-time table alone")
    args = parser.parse_args(argv)
    data = DatasetCache(args.data_dir, args.cache_dir).get() if args.data_dir else None
    dataset = "CIFAR-10" if data else "synthetic data"
    if args.only == "time":
        RESULTS.mkdir(parents=True, exist_ok=True)
        print(_splice_time(time_rows(data), dataset))
        return
    theory, cases, time = theory_rows(data), case_rows(data), time_rows(data)
    covered = [r for r in theory if r["agrees"] is not None]
    matches = sum(r["expected"] == r["label"] for r in cases)
    summary = (
        f"Theory agrees on {sum(r['agrees'] for r in covered)} of {len(covered)} covered rows; "
        f"the verdict matches the source's label on {matches} of {len(cases)} cases ({dataset})."
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "theory.json").write_text(
        json.dumps({"dataset": dataset, "summary": summary, "theory": theory, "cases": cases, "time": time}, indent=1)
    )
    text = (
        f"# Theory and the labelled cases on {dataset}\n\n{summary}\n\n"
        "## Mean-field prediction against measurement\n\n"
        "At initialisation, batch 256; the plain MLPs are depth 20, width 256.\n\n"
        f"{_theory_table(theory)}\n\n"
        "## The labelled case table (tests/support/verdict_cases.py)\n\n"
        f"{_case_table(cases)}\n\n"
        f"{_time_section(time, dataset)}"
    )
    (RESULTS / "theory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
