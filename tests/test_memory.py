"""graddiag.models.memory: the per-activation table is what autograd does, and the estimate holds for real runs.

The table is checked two ways: which tensors autograd saves (`saved_tensors_hooks`), and how much a
large tensor's forward and backward really take (peak RSS in a fresh process). For recurrent nets and
transformers the model's count of saved bytes is compared exactly with the storages autograd keeps. The
estimate is checked against measured runs of the kinds issue 12 found under-estimated and of every
architecture, at sizes a test can afford; the full-size runs are in bench/memory.py. The API refuses a
spec over the cap naming the estimate and the cap.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
import torch

from bench.memory import measure
from graddiag.models.memory import (
    ACTIVATIONS,
    EVAL_BATCH,
    FUSED_LSTM_BACKWARD,
    FUSED_LSTM_WORKSPACE,
    MMAP_THRESHOLD_BYTES,
    RECORD_BYTES,
    RECORDER_SATURATING,
    STEP_BYTES,
    TIME_RECORD_BYTES,
    estimate_run_memory,
    estimate_run_memory_mb,
    saved_bytes_per_example,
)
from graddiag.models.networks import build_network, make_activation
from graddiag.models.shapes import IMAGE_SHAPE, SEQUENCE_LENGTH, transformer_tokens
from graddiag.models.spec import Activation, Spec
from graddiag.service.engine.recorder import SATURATING
from graddiag.service.engine.report import LayerRecord, StepMetrics, TimeRecord
from graddiag.service.worker import memory_guard
from tests.support.api import TINY, assert_problem

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


def test_small_tensors_are_those_the_worker_leaves_to_the_heap() -> None:
    assert MMAP_THRESHOLD_BYTES == memory_guard.MMAP_THRESHOLD_BYTES
    # An LSTM's per-step states at batch 256 x width 128 (128 KiB each) stay on the heap; at width 512
    # they are mapped, and freed memory goes back to the system.
    small = estimate_run_memory(Spec(arch="lstm", depth=2, width=128, batch_size=256), 2000)
    large = estimate_run_memory(Spec(arch="lstm", depth=2, width=512, batch_size=256), 2000)
    assert small.heap_mib > 0.4 * small.training_mib
    assert large.heap_mib == 0


@pytest.mark.parametrize(
    ("model", "allowed"), [(LayerRecord, RECORD_BYTES), (StepMetrics, STEP_BYTES), (TimeRecord, TIME_RECORD_BYTES)]
)
def test_report_records_take_at_most_what_the_model_allows(model: Any, allowed: int) -> None:
    def make(i: int) -> Any:
        fields = {name: (i if info.annotation is int else float(i) + 0.5) for name, info in model.model_fields.items()}
        return model(**fields)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        records = [make(i) for i in range(2000)]
        per_record = (tracemalloc.get_traced_memory()[0] - before) / len(records)
    finally:
        tracemalloc.stop()
    assert records
    # Every field filled: a record takes at most the allowance, and not far less (the model stays honest).
    assert allowed / 2 <= per_record <= allowed


def _autograd_saved_bytes(spec: Spec, batch: int = 3) -> float:
    """Bytes per example of the storages autograd saves in the forward pass of `spec`'s network.

    Recurrent layers run unrolled, as on a recorded step (a state hook is registered).
    """
    network = build_network(spec)
    for _, layer in network.recurrent:
        layer.register_state_hook(lambda *_: None)
    parameters = {p.untyped_storage().data_ptr() for p in network.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network(torch.randn(batch, *IMAGE_SHAPE))
    return sum(storages.values()) / batch


SEQUENCE_MODELS = [
    *(Spec(arch="rnn", depth=depth, width=8, activation=a) for depth in (1, 3) for a in ("tanh", "relu")),
    *(Spec(arch=arch, depth=depth, width=8) for arch in ("gru", "lstm") for depth in (1, 3)),
    *(
        Spec(
            arch="transformer",
            depth=2,
            width=width,
            heads=heads,
            norm_position=position,
            pooling=pooling,
            mlp_ratio=ratio,
            activation=activation,
        )
        for width, heads in ((8, 2), (12, 12))
        for position in ("pre", "post")
        for pooling in ("cls", "mean")
        for ratio in (1, 3)
        for activation in ("gelu", "relu")
    ),
]


@pytest.mark.parametrize(
    "spec",
    SEQUENCE_MODELS,
    ids=lambda s: (
        f"{s.arch}-d{s.depth}-w{s.width}-h{s.heads}-{s.norm_position}-{s.pooling}-r{s.mlp_ratio}-{s.activation}"
    ),
)
def test_sequence_models_save_exactly_what_the_model_counts(spec: Spec) -> None:
    # Per time step: h_{t-1} (W_hh's input), rnn h_t, lstm i, f, o, tanh g, tanh c_t and c_{t-1}, gru the
    # recurrent projection, r, z, n and 1 - z; per block: the norms' inputs and statistics, q, k, v, the
    # attention output and log-sum-exp, the MLP's activations; Rows'/Patches' copy of the image.
    assert saved_bytes_per_example(spec) == _autograd_saved_bytes(spec)


def test_the_fused_lstm_workspace_is_within_what_the_model_touches() -> None:
    # A step that records nothing runs PyTorch's LSTM kernel, which saves one byte workspace; the model
    # counts FUSED_LSTM_WORKSPACE floats per hidden unit and step resident after forward and
    # FUSED_LSTM_BACKWARD more while backward runs: together at least what the kernel allocates.
    spec = Spec(arch="lstm", depth=1, width=256)
    network = build_network(spec)
    workspaces: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == torch.uint8:
            workspaces.append(tensor.untyped_storage().nbytes())
        return tensor

    batch = 8
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network(torch.randn(batch, *IMAGE_SHAPE))
    assert len(workspaces) == 1
    per_unit_and_step = workspaces[0] / (batch * SEQUENCE_LENGTH * spec.width * 4)
    assert FUSED_LSTM_WORKSPACE < per_unit_and_step <= FUSED_LSTM_WORKSPACE + FUSED_LSTM_BACKWARD


def test_attention_on_the_cpu_keeps_no_tokens_by_tokens_matrix() -> None:
    # The fused (flash) kernel runs, saving a log-sum-exp per head and token instead of the attention
    # matrix: with the math path the estimate would miss heads x tokens² floats per example and block.
    spec = Spec(arch="transformer", depth=1, width=16, heads=4)
    tokens = transformer_tokens(spec)
    shapes: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        build_network(spec)(torch.randn(2, *IMAGE_SHAPE))
    assert (2, 4, tokens) in shapes  # the log-sum-exp
    assert not [shape for shape in shapes if shape[-2:] == (tokens, tokens)]


def test_a_recurrent_net_recorded_every_step_counts_its_time_records() -> None:
    # 501 recorded steps x 8 layers x 32 time steps: 128,256 TimeRecords besides the layers' records.
    spec = Spec(arch="lstm", depth=8, width=32, batch_size=32, steps=500, record_every=1)
    estimate = estimate_run_memory(spec, 2000)
    assert estimate.report_mib * 2**20 >= 501 * 8 * 32 * TIME_RECORD_BYTES
    assert estimate.largest_part[0] == "report records"
    rarely = estimate_run_memory(spec.model_copy(update={"record_every": 100}), 2000)
    assert rarely.report_mib < estimate.report_mib / 50


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
    # issue 14's architectures: the time steps' saved states and the two P-sized gradients of the
    # input projection; a transformer's blocks; the evaluation of a recurrent net at batch 2
    {"arch": "lstm", "depth": 2, "width": 128, "batch_size": 256},
    # the middle step records nothing: PyTorch's fused LSTM and its workspace
    {"arch": "lstm", "depth": 2, "width": 256, "batch_size": 256, "steps": 3},
    {"arch": "gru", "depth": 1, "width": 256, "batch_size": 2},
    {"arch": "lstm", "depth": 1, "width": 256, "batch_size": 2},  # the fused kernel's evaluation
    {"arch": "transformer", "depth": 3, "width": 64, "heads": 4, "batch_size": 256, "norm_position": "post"},
]


@pytest.mark.parametrize("fields", MEASURED, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_measured_runs_peak_within_the_estimate(fields: dict[str, Any]) -> None:
    spec = Spec(**{"dataset": "synthetic", "steps": 2, **fields})
    estimate = estimate_run_memory_mb(spec, 2000)
    growth = measure(spec, eval_samples=2000, timeout=120)["growth_mib"]
    assert MIN_RATIO * estimate <= growth <= MAX_RATIO * estimate, (growth, estimate)


# Over the default cap (4096 MiB): a 24-block width-512 transformer at batch 1024 and an 8-layer
# width-1024 LSTM at batch 1024 (activations); an LSTM recorded at every one of 5000 steps (time records).
OVER_THE_CAP = [
    (
        {"arch": "transformer", "depth": 24, "width": 512, "heads": 8, "batch_size": 1024},
        "training (activations kept for backward)",
        ("depth", "width", "batch_size", "mlp_ratio"),
    ),
    (
        {"arch": "lstm", "depth": 8, "width": 1024, "batch_size": 1024},
        "training (activations kept for backward)",
        ("depth", "width", "batch_size"),
    ),
    (
        {"arch": "lstm", "depth": 50, "width": 2, "batch_size": 2, "steps": 5000, "record_every": 1},
        "report records",
        ("depth", "width", "batch_size", "steps", "record_every"),
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("fields", "part", "named"), OVER_THE_CAP, ids=["transformer", "lstm", "lstm-time-records"])
async def test_the_api_refuses_a_spec_over_the_memory_cap_naming_estimate_and_cap(
    api: httpx.AsyncClient, fields: dict[str, Any], part: str, named: tuple[str, ...]
) -> None:
    spec = Spec(**{**TINY, **fields})
    estimate = estimate_run_memory(spec, 10)  # the test settings' eval_samples
    assert estimate.run_mib > 4096
    body = assert_problem(await api.post("/v1/runs", json={**TINY, **fields}), 422, "validation_error")
    # The time-records case is also over the cap on time records (tests/test_time_api.py); here, the memory's.
    errors = [e for e in body["errors"] if "max_run_memory_mb" in e["msg"]]
    assert [tuple(e["loc"]) for e in errors] == [("body", field) for field in named]
    message = errors[0]["msg"]
    assert all(e["type"] == "over_cap" and e["msg"] == message for e in errors)
    assert f"about {estimate.run_mib:,.0f} MiB" in message
    assert f"({part}: " in message
    assert "max_run_memory_mb=4096" in message
    assert (await api.get("/v1/runs")).json()["total"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fields",
    [
        {"arch": "transformer", "depth": 2, "width": 32, "heads": 4, "batch_size": 64},
        {"arch": "lstm", "depth": 2, "width": 64, "batch_size": 64},
    ],
    ids=["transformer", "lstm"],
)
async def test_the_api_accepts_a_small_sequence_model(api: httpx.AsyncClient, fields: dict[str, Any]) -> None:
    assert (await api.post("/v1/runs", json={**TINY, **fields})).status_code == 202
