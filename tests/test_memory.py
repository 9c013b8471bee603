"""graddiag.models.memory: the per-activation table is what autograd does, and the estimate holds for real runs.

The table is checked two ways: which tensors autograd saves (`saved_tensors_hooks`), and how much a
large tensor's forward and backward really take (peak RSS in a fresh process). The estimate is checked
against measured runs of the kinds issue 12 found under-estimated, at sizes a test can afford; the
full-size runs are in bench/memory.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any, get_args

import pytest
import torch

from bench.memory import measure
from graddiag.models.memory import (
    ACTIVATIONS,
    EVAL_BATCH,
    RECORD_BYTES,
    RECORDER_SATURATING,
    STEP_BYTES,
    estimate_run_memory,
    estimate_run_memory_mb,
)
from graddiag.models.networks import make_activation
from graddiag.models.spec import Activation, Spec
from graddiag.service.engine.recorder import SATURATING
from graddiag.service.engine.report import LayerRecord, StepMetrics

ROOT = Path(__file__).resolve().parents[1]
# A run may peak at most this much above its estimate (issue 12), and should not be far below it.
MAX_RATIO = 1.25
MIN_RATIO = 0.5


@pytest.mark.parametrize("name", get_args(Activation))
def test_saved_tensors_are_those_autograd_saves(name: Activation) -> None:
    z = torch.randn(4, 8, requires_grad=True) * 2  # a non-leaf input, as in a network
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = make_activation(name)(z)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    inputs, output = z.untyped_storage().data_ptr(), out.untyped_storage().data_ptr()
    table = ACTIVATIONS[name]
    assert (output == inputs) == table.aliases_input
    assert (inputs in storages) == table.saves_input
    assert (output in storages and not table.aliases_input) == table.saves_output
    assert len(storages - {inputs, output}) == table.extra_saved


MEASURE_ACTIVATIONS = """
import gc, json, torch
from graddiag.service.worker.memory_guard import pin_malloc_mmap_threshold, resident_bytes
pin_malloc_mmap_threshold()
from graddiag.models.networks import make_activation
torch.set_num_threads(1)
N = 4 << 20
def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
def reset():
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    return resident_bytes()
x0, g = torch.randn(N), torch.randn(N)
result = {}
for name in %r:
    act, w, runs = make_activation(name), torch.zeros(1, requires_grad=True), []
    for _ in range(3):
        start = reset()
        y = act(x0 + w)
        forward = peak() - start
        y.backward(g)
        del y
        both = peak() - start
        runs.append((forward / (4 * N), both / (4 * N)))
    result[name] = sorted(runs)[1]  # the median run: the first use of a kernel may allocate extra
print(json.dumps(result))
"""


def test_forward_and_backward_take_what_the_table_says() -> None:
    # z = x0 + w is the activation's input (only w needs a gradient, so add's backward allocates
    # nothing); the incoming gradient is allocated beforehand. In units of z's size:
    # forward: z, the output (unless it is z) and the saved extras;
    # backward: what forward left alive (z if saved, the output, the extras), z's gradient (not for
    # identity, which passes the incoming one on) and the backward's temporaries.
    names = list(get_args(Activation))
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_ACTIVATIONS % names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    for name in get_args(Activation):
        table = ACTIVATIONS[name]
        out = 0 if table.aliases_input else 1
        forward = 1 + out + table.extra_saved
        after_forward = (1 if table.saves_input or table.aliases_input else 0) + out + table.extra_saved
        backward = after_forward + out + table.backward_temps
        assert measured[name][0] == pytest.approx(forward, abs=0.3), (name, measured[name])
        assert measured[name][1] == pytest.approx(max(forward, backward), abs=0.3), (name, measured[name])


def test_the_recorder_measures_saturation_of_the_activations_the_model_counts() -> None:
    assert frozenset(SATURATING) == RECORDER_SATURATING


def test_report_records_take_at_most_what_the_model_allows() -> None:
    def make(model: Any, i: int) -> Any:
        fields = {name: (i if info.annotation is int else float(i) + 0.5) for name, info in model.model_fields.items()}
        return model(**fields)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        records = [make(LayerRecord, i) for i in range(2000)]
        records_bytes = (tracemalloc.get_traced_memory()[0] - before) / len(records)
        before = tracemalloc.get_traced_memory()[0]
        steps = [make(StepMetrics, i) for i in range(2000)]
        steps_bytes = (tracemalloc.get_traced_memory()[0] - before) / len(steps)
    finally:
        tracemalloc.stop()
    assert records and steps
    assert records_bytes <= RECORD_BYTES
    assert steps_bytes <= STEP_BYTES


def test_the_evaluation_is_in_the_estimate() -> None:
    # Issue 12: batch 2 was estimated at 6 MiB while the evaluation in batches of 500 peaks near 1 GiB.
    spec = Spec(arch="cnn", depth=1, width=256, batch_size=2, activation="softsign")
    small, full = estimate_run_memory(spec, 10), estimate_run_memory(spec, 2000)
    feature_map = EVAL_BATCH * 256 * 32 * 32 * 4 / 2**20
    assert full.evaluation_mib >= 3 * feature_map  # input, denominator and output of the softsign
    assert full.run_mib > small.run_mib + 2 * feature_map
    # The issue measured the relu spec at 1,050 MiB (its estimate: 6 MiB).
    assert estimate_run_memory_mb(spec.model_copy(update={"activation": "relu"}), 2000) >= 1050 / MAX_RATIO


def test_the_attacks_of_issue_12_are_refused_by_the_default_cap() -> None:
    # Measured by the issue: 7,205 MiB peak (estimated 3,096 MiB and accepted). With the default
    # max_run_memory_mb=4096 it is refused; bench/memory.py measures it against the estimate.
    attack = Spec(dataset="synthetic", arch="cnn", depth=1, width=256, batch_size=1024, activation="softsign", steps=2)
    assert estimate_run_memory_mb(attack, 2000) >= 7205 / MAX_RATIO
    assert estimate_run_memory_mb(attack, 2000) > 4096
    # relu saves its output only: much less than softsign, which keeps input, denominator and output.
    relu = attack.model_copy(update={"activation": "relu"})
    assert estimate_run_memory_mb(relu, 2000) < 0.6 * estimate_run_memory_mb(attack, 2000)


# The kinds of spec issue 12 found under-estimated, small enough to run in a test (a few seconds each).
MEASURED: list[dict[str, Any]] = [
    {"arch": "cnn", "depth": 1, "width": 64, "batch_size": 256, "activation": "softsign"},
    {"arch": "cnn", "depth": 1, "width": 64, "batch_size": 2, "activation": "softsign"},  # the evaluation
    {"arch": "mlp", "depth": 6, "width": 512, "batch_size": 512, "activation": "softsign", "norm": "layer"},
    {
        "arch": "cnn",
        "depth": 3,
        "width": 16,
        "batch_size": 256,
        "activation": "gelu",
        "residual": True,
        "norm": "batch",
    },
]


@pytest.mark.parametrize("fields", MEASURED, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_measured_runs_peak_within_the_estimate(fields: dict[str, Any]) -> None:
    spec = Spec(dataset="synthetic", steps=2, **fields)
    estimate = estimate_run_memory_mb(spec, 2000)
    growth = measure(spec, eval_samples=2000, timeout=120)["growth_mib"]
    assert MIN_RATIO * estimate <= growth <= MAX_RATIO * estimate, (growth, estimate)
