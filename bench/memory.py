"""Memory benchmark: the estimate behind the memory cap against the measured peak of real runs.

For each spec a fresh subprocess does what a worker does: fixes glibc's mmap threshold (the memory
guard's `pin_malloc_mmap_threshold`), imports torch, trains tiny warm-up probes (an MLP, a CNN, an
LSTM and a transformer, so torch's and numpy's first-use allocations are in the baseline, as in a worker
after its first runs), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``),
runs ``run_probe(spec, eval_samples=2000)`` (the worker's default evaluation) and reads the peak
(``VmHWM``). The peak growth over the RSS before the run is what the run cost; it is compared with
``estimate_run_memory_mb`` (models/memory.py), which the API compares with ``max_run_memory_mb``.

The grid covers every activation on both archs, both norms, residual blocks, batch 2 and 1024, width 2
and the widest, Adam, and the two attacks of issue 12 at full size (the softsign CNN the old estimate
put at 3,096 MiB, and batch 2 where only the evaluation is large). Every spec is measured, also those
the default 4096 MiB cap refuses, so the table shows the estimate holds there too.

    python -m bench.memory [--out-dir bench/results] [--only SUBSTRING [--merge]]

Writes bench/results/memory.json and memory.md (a run with --only writes nothing unless --merge puts its
rows into the existing results, replacing those of the same spec). About 10 minutes on 2 cores for the
MLP and CNN rows, as many again for the recurrent nets and transformers (one run at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from graddiag.models.memory import TORCH_BASELINE_MIB, estimate_run_memory
from graddiag.models.spec import Activation, Spec
from graddiag.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
EVAL_SAMPLES = 2000  # settings.eval_samples' default: what a worker evaluates
DEFAULT_CAP_MIB = 4096.0  # settings.max_run_memory_mb's default
# A run may peak at most this much above its estimate (issue 12).
TARGET_RATIO = 1.25
STEPS = 2
# What `measure` returns: the figures of a run (a row's estimate is recomputed, these are not).
MEASURED_KEYS = ("baseline_mib", "peak_mib", "growth_mib")

ACTIVATIONS: tuple[str, ...] = get_args(Activation)
SPECS: list[dict[str, Any]] = [
    # every activation, both archs: the per-activation saved tensors (cnn: stem, pool, conv)
    *({"depth": 10, "width": 1024, "batch_size": 1024, "activation": a} for a in ACTIVATIONS),
    *({"arch": "cnn", "depth": 2, "width": 32, "batch_size": 512, "activation": a} for a in ACTIVATIONS),
    # norms and residual blocks
    {"depth": 10, "width": 1024, "batch_size": 1024, "norm": "batch", "activation": "gelu"},
    {"depth": 10, "width": 1024, "batch_size": 1024, "norm": "layer", "activation": "softsign"},
    {"depth": 10, "width": 1024, "batch_size": 1024, "residual": True, "activation": "tanh"},
    {"depth": 20, "width": 512, "batch_size": 512, "residual": True, "norm": "layer", "activation": "silu"},
    {"arch": "cnn", "depth": 3, "width": 32, "batch_size": 512, "norm": "batch", "activation": "elu"},
    {"arch": "cnn", "depth": 3, "width": 32, "batch_size": 512, "norm": "layer", "activation": "relu"},
    {"arch": "cnn", "depth": 5, "width": 16, "batch_size": 512, "residual": True, "activation": "leaky_relu"},
    {
        "arch": "cnn",
        "depth": 6,
        "width": 16,
        "batch_size": 512,
        "residual": True,
        "norm": "batch",
        "activation": "softsign",
    },
    # extremes: batch 2 and 1024, width 2 and the widest, depth 100, the optimizers' state and penalties
    {"depth": 100, "width": 1024, "batch_size": 2, "optimizer": "adam"},
    {"depth": 100, "width": 2, "batch_size": 1024},
    {
        "depth": 50,
        "width": 512,
        "batch_size": 256,
        "activation": "sigmoid",
        "optimizer": "momentum",
        "weight_decay": 0.01,
    },
    {"depth": 30, "width": 1024, "batch_size": 64, "optimizer": "adamw", "l1": 0.001},
    {"arch": "cnn", "depth": 100, "width": 2, "batch_size": 1024, "activation": "softsign"},
    {"arch": "cnn", "depth": 1, "width": 256, "batch_size": 256, "activation": "gelu", "norm": "layer"},
    # CIFAR-10 (real images: uint8 batches normalised into float; the data set is loaded before the baseline,
    # as a worker's DatasetCache holds it across runs); skipped where GRADDIAG_DATA_DIR has none
    {"dataset": "cifar10", "depth": 10, "width": 1024, "batch_size": 1024, "activation": "gelu"},
    {"dataset": "cifar10", "arch": "cnn", "depth": 3, "width": 32, "batch_size": 512, "norm": "batch"},
    # issue 12's attacks at full size: softsign at batch 1024, and the evaluation at batch 2
    {"arch": "cnn", "depth": 1, "width": 256, "batch_size": 1024, "activation": "softsign"},
    {"arch": "cnn", "depth": 1, "width": 256, "batch_size": 2, "activation": "softsign"},
    # recurrent nets (issue 14): each cell, tanh and relu, width 512-1024 (128 and 32 where the states are
    # small enough for the C heap), depth 1-8, batch 2-1024, Adam; the time records of a run recorded
    # every step. Sizes keep each run to a few minutes on one thread: the evaluation of 2000 examples
    # costs as much as training. Three steps: the middle one records nothing, so it runs PyTorch's fused
    # layer (an LSTM's oneDNN kernel keeps a larger workspace than the unrolled cells of recorded steps).
    {"arch": "rnn", "depth": 1, "width": 1024, "batch_size": 1024, "activation": "tanh", "steps": 3},
    {"arch": "rnn", "depth": 8, "width": 512, "batch_size": 256, "activation": "relu", "steps": 3},
    {"arch": "gru", "depth": 2, "width": 512, "batch_size": 512, "steps": 3},
    {"arch": "lstm", "depth": 1, "width": 1024, "batch_size": 512, "steps": 3},
    {"arch": "lstm", "depth": 2, "width": 512, "batch_size": 1024, "steps": 3},
    {"arch": "lstm", "depth": 8, "width": 128, "batch_size": 256, "optimizer": "adam", "steps": 3},
    {"arch": "lstm", "depth": 1, "width": 1024, "batch_size": 2, "steps": 3},
    {"arch": "lstm", "depth": 8, "width": 32, "batch_size": 32, "steps": 500, "record_every": 1},
    # transformers: pre and post norm, widths 64-512, heads 1-16, depth 1-24, mlp_ratio 1-8, both poolings
    {"arch": "transformer", "depth": 12, "width": 128, "heads": 4, "batch_size": 256},
    {"arch": "transformer", "depth": 12, "width": 128, "heads": 4, "batch_size": 256, "norm_position": "post"},
    {
        "arch": "transformer",
        "depth": 24,
        "width": 64,
        "heads": 16,
        "mlp_ratio": 8,
        "pooling": "mean",
        "activation": "relu",
        "batch_size": 256,
    },
    {
        "arch": "transformer",
        "depth": 24,
        "width": 64,
        "heads": 2,
        "mlp_ratio": 2,
        "norm_position": "post",
        "batch_size": 256,
        "optimizer": "adam",
    },
    {"arch": "transformer", "depth": 1, "width": 512, "heads": 8, "batch_size": 256},
    {"arch": "transformer", "depth": 1, "width": 512, "heads": 1, "mlp_ratio": 1, "pooling": "mean", "batch_size": 2},
]

CHILD = """
import json, sys
from graddiag.service.worker.memory_guard import pin_malloc_mmap_threshold, resident_bytes
pin_malloc_mmap_threshold()
import torch
torch.set_num_threads(1)
from graddiag.models.spec import Spec
from graddiag.service.engine.data import load_cifar10
from graddiag.service.engine.probe import run_probe
from graddiag.service.settings import Settings
spec = Spec.model_validate_json(sys.argv[1])
settings = Settings()
data = load_cifar10(settings.data_dir, settings.cache_dir) if spec.dataset == "cifar10" else None
if data is not None:
    # The data set is a memory-mapped cache: touch every page now, so the pages a run's batches map into
    # the process (shared page cache, not the run's memory) are in the baseline, as in a worker that has
    # run a few CIFAR-10 runs.
    for part in data:
        part.images.sum(), part.labels.sum()
# Warm-up through every code path (theory of an MLP and a CNN included): first-use allocations (lazy
# imports, BLAS buffers) belong to the worker process, which pays them once, not to a run.
for warm in (
    {"depth": 4, "width": 8},
    {"arch": "cnn", "depth": 3, "width": 4},
    {"arch": "lstm", "depth": 2, "width": 4},
    {"arch": "transformer", "depth": 2, "width": 4, "heads": 2},
):
    run_probe(Spec(dataset="synthetic", steps=2, batch_size=4, **warm), eval_samples=10)
before = resident_bytes()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
run_probe(spec, data=data, eval_samples=int(sys.argv[2]))
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"baseline_mib": before / 2**20, "peak_mib": peak / 2**20, "growth_mib": (peak - before) / 2**20}))
"""


def measure(spec: Spec, eval_samples: int = EVAL_SAMPLES, timeout: float = 1800) -> dict[str, float]:
    """Baseline RSS, peak RSS and peak growth (MiB) of a fresh warm process running `spec`."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, spec.model_dump_json(), str(eval_samples)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def cifar10_available() -> bool:
    """Whether the CIFAR-10 the settings name (GRADDIAG_DATA_DIR) is there to measure real-image runs."""
    data_dir = Settings().data_dir
    return data_dir is not None and Path(data_dir).exists()


def label(fields: dict[str, Any]) -> str:
    """A row's short description: arch depth x width, batch, then what differs from the defaults."""
    spec = Spec(**fields)
    extra = [f"{k}={v}" for k, v in fields.items() if k not in ("arch", "depth", "width", "batch_size", "activation")]
    parts = [f"{spec.arch} {spec.depth}x{spec.width}", f"batch {spec.batch_size}", spec.activation, *extra]
    return ", ".join(parts)


def _markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        "### Memory benchmark",
        "",
        f"{result['machine']}. Command: `{result['command']}` ({result['wall_s']:.0f} s). Synthetic data unless a row "
        "says dataset=cifar10 (CIFAR-10 loaded before the baseline, as a worker holds it across runs), "
        f"{STEPS} steps, eval_samples={EVAL_SAMPLES}, 1 torch thread, glibc mmap threshold fixed as the "
        "worker's memory guard fixes it. *peak growth*: VmHWM during `run_probe` minus the RSS before it, in "
        f"a fresh process that imported torch and ran tiny probes of each kind (that baseline: "
        f"{result['baseline_mib']['min']:.0f}–{result['baseline_mib']['max']:.0f} MiB; models/memory.py "
        f"reports {TORCH_BASELINE_MIB:.0f} MiB beside the estimate). *estimate*: `estimate_run_memory_mb`, "
        f"what the API compares with `max_run_memory_mb` (default {DEFAULT_CAP_MIB:.0f} MiB), from today's model "
        "for every row (rows an earlier command of a `--merge` chain measured keep that run's peak).",
        "",
        f"**Peak / estimate over {len(rows)} specs: {result['ratio_min']:.2f}–{result['ratio_max']:.2f}** "
        f"(target ≤ {TARGET_RATIO}: {'met' if result['target_met'] else '**missed**'}); over the "
        f"{result['accepted']} specs the default cap accepts: "
        f"{result['accepted_ratio_min']:.2f}–{result['accepted_ratio_max']:.2f}.",
        "",
        "| spec | estimate MiB | peak growth MiB | peak / estimate | default cap |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        accepted = "accepted" if row["accepted"] else "refused"
        lines.append(
            f"| {row['label']} | {row['estimate_mib']:,.1f} | {row['growth_mib']:,.1f} | "
            f"{row['peak_over_estimate']:.2f} | {accepted} |"
        )
    lines += [f"\nSkipped (no CIFAR-10 in GRADDIAG_DATA_DIR): {name}" for name in result["skipped"]]
    return "\n".join(lines) + "\n"


def _row(fields: dict[str, Any], measured: dict[str, float]) -> dict[str, Any]:
    """One table row: the spec, its estimate now (by part) and what the run measured."""
    spec = Spec(**{"dataset": "synthetic", "steps": STEPS, **fields})
    estimate = estimate_run_memory(spec, EVAL_SAMPLES)
    return {
        "spec": fields,
        "label": label(fields),
        "estimate_mib": round(estimate.run_mib, 1),
        "estimate_parts_mib": {
            "parameters": round(estimate.parameters_mib, 1),
            "training": round(estimate.training_mib, 1),
            "evaluation": round(estimate.evaluation_mib, 1),
            "heap": round(estimate.heap_mib, 1),
            "report": round(estimate.report_mib, 1),
            "overhead": round(estimate.overhead_mib, 1),
        },
        **{k: round(v, 1) for k, v in measured.items()},
        "peak_over_estimate": round(measured["growth_mib"] / estimate.run_mib, 3),
        "accepted": estimate.run_mib <= DEFAULT_CAP_MIB,
    }


def _merged(previous: list[dict[str, Any]], measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The specs of SPECS measured earlier or now, the newest measurement of each, in SPECS order.

    Rows kept from an earlier run are estimated again with today's model: their peaks are that run's.
    """
    order = {label(fields): position for position, fields in enumerate(SPECS)}
    kept = {row["label"]: _row(row["spec"], {k: row[k] for k in MEASURED_KEYS}) for row in previous}
    by_label = kept | {row["label"]: row for row in measured}
    return sorted((row for name, row in by_label.items() if name in order), key=lambda row: order[row["label"]])


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every spec, print each row, write memory.json and memory.md; exit 1 if a ratio misses the target."""
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--only", default="", help="measure only the specs whose label contains this")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: put the measured rows into the existing memory.json (replacing rows of the same "
        "spec) and rewrite memory.json and memory.md from all its rows",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for fields in SPECS:
        if args.only not in label(fields):
            continue
        if fields.get("dataset") == "cifar10" and not cifar10_available():
            skipped.append(label(fields))
            print(f"skipped (no CIFAR-10 in GRADDIAG_DATA_DIR): {label(fields)}", flush=True)
            continue
        row = _row(fields, measure(Spec(**{"dataset": "synthetic", "steps": STEPS, **fields})))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not rows:
        parser.error(f"no spec matches --only {args.only!r}")
    command = "python -m bench.memory" + (f" --only '{args.only}'" if args.only else "")
    wall_s = round(time.perf_counter() - started, 1)
    if args.only and args.merge:
        previous = json.loads((args.out_dir / "memory.json").read_text())
        rows = _merged(previous["rows"], rows)
        # A spec skipped before (no CIFAR-10 there) and measured now is no longer skipped.
        present = {row["label"] for row in rows}
        skipped = sorted((set(previous["skipped"]) | set(skipped)) - present)
        command = f"{previous['command']}; {command} --merge"
        wall_s = round(previous["wall_s"] + wall_s, 1)
    ratios = [r["peak_over_estimate"] for r in rows]
    accepted = [r["peak_over_estimate"] for r in rows if r["accepted"]] or [float("nan")]
    baselines = [r["baseline_mib"] for r in rows]
    result = {
        "benchmark": "memory",
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "wall_s": wall_s,
        "eval_samples": EVAL_SAMPLES,
        "steps": STEPS,
        "target_ratio": TARGET_RATIO,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "accepted": sum(r["accepted"] for r in rows),
        "accepted_ratio_min": min(accepted),
        "accepted_ratio_max": max(accepted),
        "target_met": max(ratios) <= TARGET_RATIO,
        "baseline_mib": {"min": round(min(baselines), 1), "max": round(max(baselines), 1)},
        "rows": rows,
        "skipped": skipped,
    }
    print(
        f"peak/estimate {result['ratio_min']:.2f}-{result['ratio_max']:.2f} over {len(rows)} specs "
        f"(accepted by the default cap: {result['accepted_ratio_min']:.2f}-{result['accepted_ratio_max']:.2f})"
    )
    if not args.only or args.merge:  # a partial run alone does not overwrite the figures
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / "memory.md").write_text(_markdown(result))
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
