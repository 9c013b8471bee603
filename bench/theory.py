"""Mean-field prediction against measurement, for every activation under three initialisations.

Each probe is a plain depth-20 MLP at initialisation (one step) on CIFAR-10; the table compares the
predicted decades per layer (½·log10 χ₁) with the fitted slope of the back-propagated signal and of
the weight gradients, and gives the verdict. Not a timing benchmark: the numbers do not depend on load.

    python -m bench.theory [--depth 20] [--width 256] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from graddiag.models.spec import Spec
from graddiag.service.engine.data import DatasetCache
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.report import Report

ACTIVATIONS = ["sigmoid", "tanh", "softsign", "relu", "leaky_relu", "elu", "selu", "gelu", "silu", "identity"]
INITS = [("default", "default"), ("xavier_normal", "zeros"), ("kaiming_normal", "zeros")]
RESULTS = Path(__file__).parent / "results"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}"


def measure(depth: int, width: int, data_dir: str | None, cache_dir: str) -> list[Report]:
    """One initialisation probe per (activation, init) pair."""
    data = DatasetCache(data_dir, cache_dir).get() if data_dir else None
    reports = []
    for activation in ACTIVATIONS:
        for init, bias in INITS:
            spec = Spec(
                activation=activation,
                init=init,
                bias_init=bias,
                depth=depth,
                width=width,
                steps=1,
                batch_size=256,
                dataset="cifar10" if data is not None else "synthetic",
            )
            reports.append(run_probe(spec, data=data, eval_samples=100))
    return reports


def table(reports: list[Report]) -> str:
    """Markdown: predicted vs measured slopes and the verdict per (activation, init)."""
    lines = [
        "| activation | init | χ₁ | predicted | measured ‖∂L/∂h‖ | measured ‖∂L/∂W‖ | agrees | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        theory, evidence = report.verdict.theory, report.verdict.evidence
        chi1 = "—" if theory.chi1 is None else f"{theory.chi1:.3g}"
        lines.append(
            f"| {report.spec.activation} | {report.spec.init} | {chi1} | {_fmt(theory.predicted_decades_per_layer)} "
            f"| {_fmt(evidence.act_decades_per_layer)} | {_fmt(evidence.decades_per_layer)} "
            f"| {'yes' if theory.agrees else 'no'} | {report.verdict.label} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and write bench/results/theory.{json,md}."""
    parser = argparse.ArgumentParser(prog="bench.theory", description=__doc__)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--data-dir", default=os.environ.get("GRADDIAG_DATA_DIR"))
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "graddiag"))
    args = parser.parse_args(argv)
    reports = measure(args.depth, args.width, args.data_dir, args.cache_dir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "activation": r.spec.activation,
            "init": r.spec.init,
            "theory": r.verdict.theory.model_dump(),
            "act_decades_per_layer": r.verdict.evidence.act_decades_per_layer,
            "decades_per_layer": r.verdict.evidence.decades_per_layer,
            "label": r.verdict.label,
        }
        for r in reports
    ]
    dataset = reports[0].spec.dataset
    (RESULTS / "theory.json").write_text(json.dumps({"depth": args.depth, "dataset": dataset, "rows": rows}, indent=1))
    header = f"Depth-{args.depth}, width-{args.width} MLP at initialisation on {dataset}, batch 256.\n\n"
    (RESULTS / "theory.md").write_text(header + table(reports) + "\n")
    print(header + table(reports))


if __name__ == "__main__":
    main()
