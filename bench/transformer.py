"""Pre-LN against post-LN transformers across depth on CIFAR-10: the across-block verdict beside Xiong et al.

Two tables:

1. **Runs**: a small ViT (4×4 patches, width 64, 4 heads, MLP ratio 4, class token) at depths 2, 6, 12,
   pre-LN and post-LN, under SGD at the spec's default lr and under Adam at ViT's usual 1e-3, a short run
   each; and SGD at lr 1.0 at the deepest depth, where the step-size rule fires. Per run: the across-block
   spans at init (block-output ‖∂L/∂h‖ and mlp.fc2's ‖∂L/∂W‖, decades toward the input), the near-output
   scale (last block's fc2 gradient over the blocks' geometric mean), the blocks' largest update ratio at
   step 0 and its block, the label, the findings and the advice.
2. **Depth scaling**: Xiong et al. (2020), Theorem 1: at init the last block's ‖∂L/∂W^{2,L}‖ is
   O(d·√(ln d)) for post-LN and O(d·√(ln d / L)) for pre-LN. Per depth, the geometric mean over seeds
   of the last block's recorded fc2 gradient at step 0, and the fitted exponent of L (0.5 for pre-LN,
   0 for post-LN by the theorem).

Not a timing benchmark: the numbers do not depend on load.

    python -m bench.transformer [--data-dir DIR] [--steps 20] [--depths 2,6,12] [--seeds 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from graddiag.models.spec import Spec
from graddiag.service.engine.data import DatasetCache, ImageSet
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.report import Report

WIDTH, HEADS = 64, 4
# (name, spec fields): SGD at the spec's default lr, and Adam at the lr ViTs usually train with.
OPTIMIZERS: list[tuple[str, dict[str, Any]]] = [
    ("sgd 0.01", dict(optimizer="sgd", lr=0.01)),
    ("adam 1e-3", dict(optimizer="adam", lr=1e-3)),
]
# A learning rate large enough for step_size to fire, run at the deepest depth only: what the verdict
# advises when the step, not the profile, is the problem.
LARGE_LR: tuple[str, dict[str, Any]] = ("sgd 1.0", dict(optimizer="sgd", lr=1.0))
RESULTS = Path(__file__).parent / "results"


def _spec(data: tuple[ImageSet, ImageSet] | None, **fields: Any) -> Spec:
    base: dict[str, Any] = dict(
        arch="transformer",
        width=WIDTH,
        heads=HEADS,
        batch_size=128,
        dataset="cifar10" if data else "synthetic",
        record_every=5,
    )
    base.update(fields)
    return Spec.model_validate(base)


def _finding(report: Report, kind: str) -> dict[str, Any]:
    found = [f for f in report.verdict.findings if f.kind == kind]
    return found[0].evidence if found else {}


def run_rows(data: tuple[ImageSet, ImageSet] | None, depths: list[int], steps: int) -> list[dict[str, Any]]:
    """One short run per optimizer, depth and norm position, and the large learning rate at the deepest depth."""
    grid = [(optimizer, fields, depth) for optimizer, fields in OPTIMIZERS for depth in depths]
    grid.append((*LARGE_LR, max(depths)))
    rows = []
    for (optimizer, fields, depth), position in itertools.product(grid, ("pre", "post")):
        spec = _spec(data, depth=depth, norm_position=position, steps=steps, **fields)
        report = run_probe(spec, data=data, eval_samples=500)
        verdict, evidence = report.verdict, report.verdict.evidence
        position_numbers = _finding(report, "layer_norm_position")
        rows.append(
            {
                "optimizer": optimizer,
                "depth": depth,
                "norm_position": position,
                "act_span": evidence.act_span_decades,
                "fc2_span": evidence.span_decades,
                "near_output": evidence.near_output_ratio,
                "act_near_output": position_numbers.get("act_near_output_ratio"),
                "block_update_init_max": position_numbers.get("update_ratio_init_block_max"),
                "largest_update_block": position_numbers.get("update_ratio_init_largest_block"),
                "max_update_ratio": evidence.max_update_ratio,
                "loss_first": evidence.loss_first,
                "loss_last": evidence.loss_last,
                "label": verdict.label,
                "findings": sorted({f.kind for f in verdict.findings}),
                "advice": verdict.advice,
            }
        )
        print(rows[-1], flush=True)
    return rows


def _last_fc2(report: Report) -> float:
    depth = report.spec.depth if report.spec else 0
    (index,) = [layer.index for layer in report.layers if layer.name == f"block{depth}.mlp.fc2"]
    (grad,) = [r.grad_norm for r in report.records if r.step == 0 and r.layer == index]
    assert grad is not None
    return grad


def scaling_rows(data: tuple[ImageSet, ImageSet] | None, depths: list[int], seeds: int) -> list[dict[str, Any]]:
    """Per norm position and depth, the geometric mean over seeds of the last block's fc2 gradient at init."""
    rows = []
    for position in ("pre", "post"):
        for depth in depths:
            grads = [
                _last_fc2(
                    run_probe(
                        _spec(data, depth=depth, norm_position=position, steps=1, seed=seed),
                        data=data,
                        eval_samples=100,
                    )
                )
                for seed in range(seeds)
            ]
            rows.append(
                {
                    "norm_position": position,
                    "depth": depth,
                    "last_fc2": math.exp(np.mean(np.log(grads))),
                    "seeds": grads,
                }
            )
    return rows


def exponent(rows: list[dict[str, Any]], position: str) -> float:
    """The least-squares exponent a of ‖∂L/∂W‖ ∝ L^(−a) over the depths."""
    points = [(math.log(r["depth"]), math.log(r["last_fc2"])) for r in rows if r["norm_position"] == position]
    x, y = np.array(points).T
    return -float(np.polyfit(x, y, 1)[0])


def _fmt(value: float | None, spec: str = "+.2f") -> str:
    return "—" if value is None else format(value, spec)


def _run_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| optimizer | depth | LN | ‖∂L/∂h‖ span | fc2 ‖∂L/∂W‖ span | near-output fc2 | near-output ‖∂L/∂h‖ "
        "| step-0 block update (block) | loss first → last | label | findings |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        update = (
            "—"
            if r["block_update_init_max"] is None
            else f"{r['block_update_init_max']:.3g}"
            + (f" ({r['largest_update_block']})" if r["largest_update_block"] else "")
        )
        lines.append(
            f"| {r['optimizer']} | {r['depth']} | {r['norm_position']} | {_fmt(r['act_span'])} | {_fmt(r['fc2_span'])} "
            f"| {_fmt(r['near_output'], '.2f')} | {_fmt(r['act_near_output'], '.2f')} | {update} "
            f"| {_fmt(r['loss_first'], '.3f')} → {_fmt(r['loss_last'], '.3f')} | {r['label']} "
            f"| {', '.join(r['findings'])} |"
        )
    return "\n".join(lines)


def _advice(rows: list[dict[str, Any]]) -> str:
    """The advice of every run that got some, verbatim."""
    lines = [
        f"- {r['optimizer']}, depth {r['depth']}, {r['norm_position']}-LN: {item}" for r in rows for item in r["advice"]
    ]
    return "Advice given:\n\n" + ("\n".join(lines) if lines else "- none")


def _scaling_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| LN | depth | last block's fc2 ‖∂L/∂W‖ (geometric mean) |", "|---|---|---|"]
    lines += [f"| {r['norm_position']} | {r['depth']} | {r['last_fc2']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run both tables and write bench/results/transformer.{json,md}."""
    parser = argparse.ArgumentParser(prog="bench.transformer", description=__doc__)
    parser.add_argument("--data-dir", default=os.environ.get("GRADDIAG_DATA_DIR"))
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "graddiag"))
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (table 1)")
    parser.add_argument("--depths", default="2,6,12", help="comma-separated block counts")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per depth for the depth scaling (table 2)")
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    data = DatasetCache(args.data_dir, args.cache_dir).get() if args.data_dir else None
    dataset = "CIFAR-10" if data else "synthetic data"
    runs = run_rows(data, depths, args.steps)
    scaling = scaling_rows(data, depths, args.seeds)
    exponents = {position: exponent(scaling, position) for position in ("pre", "post")}
    summary = (
        f"Last block's fc2 gradient at init ∝ L^(−a): a = {exponents['pre']:.2f} for pre-LN (Xiong et al.: 0.5), "
        f"{exponents['post']:.2f} for post-LN (0), depths {args.depths}, {args.seeds} seeds ({dataset})."
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "transformer.json").write_text(
        json.dumps(
            {"dataset": dataset, "summary": summary, "exponents": exponents, "runs": runs, "scaling": scaling},
            indent=1,
        )
    )
    text = (
        f"# Pre-LN against post-LN transformers on {dataset}\n\n{summary}\n\n"
        f"## Short runs ({args.steps} steps, batch 128, width {WIDTH}, {HEADS} heads)\n\n"
        "Spans are at initialisation, in decades toward the input (negative: the value falls toward the "
        "input, i.e. it is largest near the output); near-output is the last block's value over the blocks' "
        "geometric mean.\n\n"
        f"{_run_table(runs)}\n\n"
        f"{_advice(runs)}\n\n"
        "## The last block's gradient across depth (step 0)\n\n"
        f"{_scaling_table(scaling)}\n"
    )
    (RESULTS / "transformer.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
