"""RNN against GRU and LSTM on sequential CIFAR-10: the gradient through time, judged and trained.

Each image is read row by row (32 time steps of 96 features). Every network has two stacked recurrent
layers of 128 units and trains for a few hundred steps under Adam 1e-3 with gradient clipping at norm 1
(the usual recipe for recurrent nets), batch 128. Per network: the top layer's ‖∂L/∂h_t‖ at t = 31 and
t = 0 at initialisation, the fitted change across the sequence at init and during training (decades,
negative: smaller toward t = 0), the critical sequence length (steps until the fit crosses the 2-decade
line), the mean-field prediction through time beside the measurement, the label, the findings, and the
held-out accuracy reached. The point is the comparison the literature makes (Hochreiter & Schmidhuber
1997; Jozefowicz et al. 2015; Le et al. 2015; Tallec & Ollivier 2018): which cells carry the gradient
back to the first rows, and what that does to learning in the same budget.

Not a timing benchmark (ms/step is shown for scale; it depends on load).

    python -m bench.recurrent [--data-dir DIR] [--steps 300] [--width 128] [--depth 2]
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

RESULTS = Path(__file__).parent / "results"
# (name, spec fields): the cells and the remedies the verdict knows through time.
NETWORKS: list[tuple[str, dict[str, Any]]] = [
    ("rnn tanh", dict(arch="rnn", activation="tanh")),
    ("rnn relu, identity (IRNN)", dict(arch="rnn", activation="relu", init="identity", bias_init="zeros")),
    ("gru", dict(arch="gru")),
    ("lstm", dict(arch="lstm")),
    ("lstm, forget bias 1", dict(arch="lstm", forget_bias=1.0)),
    ("lstm, chrono", dict(arch="lstm", forget_bias="chrono")),
]


def _top_profile(report: Report, step: int) -> dict[int, float | None]:
    """‖∂L/∂h_t‖ of the top recurrent layer at `step`, by t."""
    top = max(layer.index for layer in report.layers if layer.kind == "recurrent")
    return {r.t: r.grad_norm for r in report.time_records if r.step == step and r.layer == top}


def _critical_length(slope: float | None) -> float | None:
    """Time steps over which a fitted slope (decades per step) changes the gradient by 2 decades."""
    return None if slope is None or slope == 0 else 2 / abs(slope)


def run_rows(data: tuple[ImageSet, ImageSet] | None, steps: int, width: int, depth: int) -> list[dict[str, Any]]:
    """One run per network; the through-time numbers, the verdict and the accuracy reached."""
    rows = []
    for name, fields in NETWORKS:
        spec = Spec.model_validate(
            dict(
                depth=depth,
                width=width,
                optimizer="adam",
                lr=1e-3,
                clip_value=1.0,
                batch_size=128,
                steps=steps,
                record_every=25,
                dataset="cifar10" if data else "synthetic",
                **fields,
            )
        )
        report = run_probe(spec, data=data, eval_samples=2000)
        evidence, theory = report.verdict.evidence, report.verdict.theory
        at_init = _top_profile(report, 0)
        time_theory = theory.time
        rows.append(
            {
                "network": name,
                "spec": spec.model_dump(mode="json", exclude_defaults=True),
                "grad_t31_init": at_init.get(31),
                "grad_t0_init": at_init.get(0),
                "span_init": evidence.time_span_decades,
                "span_trained": evidence.time_span_decades_trained,
                "slope_init": evidence.time_decades_per_step,
                "critical_length": _critical_length(evidence.time_decades_per_step),
                "cell_slope_init": evidence.cell_decades_per_step,
                "predicted": time_theory.predicted_decades_per_step if time_theory else None,
                "measured_for_theory": time_theory.measured_decades_per_step if time_theory else None,
                "theory_agrees": time_theory.agrees if time_theory else None,
                "theory_reason": None if time_theory is None or time_theory.applicable else time_theory.reason,
                "label": report.verdict.label,
                "findings": sorted({f.kind for f in report.verdict.findings}),
                "advice": report.verdict.advice,
                "eval_accuracy": report.eval.accuracy,
                "train_loss": report.eval.train_loss,
                "step_ms": report.timing.step_ms,
            }
        )
        print(rows[-1], flush=True)
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| network | ‖∂L/∂h_31‖ → ‖∂L/∂h_0‖ at init | span at init | span trained | critical length "
        "| theory / measured (decades per step) | label | findings | held-out acc | ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        theory = (
            f"{_fmt(r['predicted'], '+.3f')} / {_fmt(r['measured_for_theory'], '+.3f')}"
            if r["predicted"] is not None
            else "not covered"
        )
        critical = _fmt(r["critical_length"], ".0f")
        lines.append(
            f"| {r['network']} | {_fmt(r['grad_t31_init'], '.2g')} → {_fmt(r['grad_t0_init'], '.2g')} "
            f"| {_fmt(r['span_init'], '+.2f')} | {_fmt(r['span_trained'], '+.2f')} | {critical} | {theory} "
            f"| {r['label']} | {', '.join(r['findings'])} | {_fmt(r['eval_accuracy'], '.3f')} "
            f"| {_fmt(r['step_ms'], '.0f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and write bench/results/recurrent.{json,md}."""
    parser = argparse.ArgumentParser(prog="bench.recurrent", description=__doc__)
    parser.add_argument("--data-dir", default=os.environ.get("GRADDIAG_DATA_DIR"))
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "graddiag"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args(argv)
    data = DatasetCache(args.data_dir, args.cache_dir).get() if args.data_dir else None
    dataset = "sequential CIFAR-10" if data else "synthetic data"
    rows = run_rows(data, args.steps, args.width, args.depth)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recurrent.json").write_text(
        json.dumps({"dataset": dataset, "args": vars(args), "runs": rows}, indent=1)
    )
    advice = "\n".join(f"- {r['network']}: {item}" for r in rows for item in r["advice"]) or "- none"
    text = (
        f"# RNN, GRU and LSTM on {dataset}\n\n"
        f"Depth {args.depth}, width {args.width}, {args.steps} steps of Adam 1e-3 with clipping at norm 1, batch "
        "128; the top recurrent layer's gradient through time. Spans are the fitted change of log10 ‖∂L/∂h_t‖ "
        "across the 32 steps toward t = 0 (negative: smaller at the first row); the critical length is "
        "2 / |decades per step| at init. Command: `python -m bench.recurrent`.\n\n"
        f"{_table(rows)}\n\nAdvice given:\n\n{advice}\n"
    )
    (RESULTS / "recurrent.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
