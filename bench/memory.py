"""Memory-guard calibration: the API's estimate of a run's training memory against the measured peak.

For each spec, a fresh subprocess trains a 1-step warm-up probe (so torch's own allocations are in the
baseline), records its peak RSS, trains the spec for 2 steps and records the peak again; the difference
is what the spec's run cost. The API's `estimate_run_memory_mb` (service/api/limits.py), which refuses
specs above `max_run_memory_mb` at submit time, is printed beside it with the ratio.

    python -m bench.memory [--out-dir bench/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graddiag.models.spec import Spec
from graddiag.service.api.limits import estimate_run_memory_mb

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
SPECS: list[dict[str, Any]] = [
    {"depth": 10, "width": 1024, "batch_size": 1024},
    {"depth": 50, "width": 512, "batch_size": 256},
    {"depth": 30, "width": 1024, "batch_size": 64},
    {"depth": 20, "width": 256, "batch_size": 1024, "norm": "batch"},
    {"depth": 10, "width": 512, "batch_size": 256, "optimizer": "adam"},
    {"arch": "cnn", "depth": 6, "width": 64, "batch_size": 128},
    {"arch": "cnn", "depth": 12, "width": 128, "batch_size": 64},
    {"arch": "cnn", "depth": 4, "width": 32, "batch_size": 512, "norm": "batch"},
]
CHILD = """
import json, resource, sys
import torch
torch.set_num_threads(1)
from graddiag.models.spec import Spec
from graddiag.service.engine.probe import run_probe
run_probe(Spec(dataset="synthetic", depth=1, width=2, steps=1, batch_size=2), eval_samples=10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run_probe(Spec.model_validate(json.loads(sys.argv[1])), eval_samples=10)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps((after - before) / 1024))
"""


def measure(spec: Spec) -> float:
    """Peak RSS growth (MiB) of a fresh process training `spec`, over a warmed-up torch."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, spec.model_dump_json()], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every spec, print the table and save bench/results/memory.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(list(argv) if argv is not None else None)
    rows = []
    for fields in SPECS:
        spec = Spec(dataset="synthetic", steps=2, **fields)
        measured, estimated = measure(spec), estimate_run_memory_mb(spec)
        rows.append({"spec": fields, "measured_mib": round(measured, 1), "estimated_mib": round(estimated, 1)})
        rows[-1]["estimate_over_measured"] = round(estimated / measured, 2)
        print(json.dumps(rows[-1]), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "memory", "command": "python -m bench.memory", "rows": rows}
    (args.out_dir / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
