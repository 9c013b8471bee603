"""How much memory a probe run takes, from its spec alone (no torch): the model behind the memory cap.

The API refuses a spec whose estimate is over `max_run_memory_mb`, and the worker's memory guard stops a
run that grows far past its estimate, so the estimate must hold for every spec the caps accept. It is
the peak growth of a process's resident memory while `run_probe` trains the spec and evaluates it, over
a process that already imported torch and ran two tiny probes (torch's own libraries, thread pools,
kernels and lazy imports are that baseline, `TORCH_BASELINE_MIB`, paid once per worker, not per run).
It is built from what really stays alive (on the CPU; a CUDA run keeps its tensors in GPU memory):

* parameters: the weights, their gradients, the optimizer's state, the probe's copy of the weight
  layers' initial weights, the recorder's snapshot of the weights (`recorder_buffer_bytes`);
* the training step: the data batch, every tensor autograd saves for backward (per activation, per
  norm, per residual sum and pool, `ACTIVATIONS` and the trace below, read from autograd), and the
  gradients and temporaries backward holds at its worst layer; or, if larger, the temporaries of the
  optimizer step, of the theory's float64 reads and of the input's second moment;
* the held-out evaluation after training: the held-out sample and a no-grad forward pass in batches of
  `EVAL_BATCH` (the probe's), each block's input held while its layers run;
* the report's Python records (one per layer and recorded step) and a fixed allowance for the rest.

`python -m bench.memory` measures peak RSS against this estimate over a grid of specs (every activation,
both archs and norms, residual, batch and width extremes, the real evaluation size) and
bench/results/memory.md shows the ratios; tests/test_memory.py checks the per-activation table against
autograd and the estimate against measured runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from graddiag.models.shapes import (
    INPUT_FEATURES,
    NUM_CLASSES,
    cnn_stage_sizes,
    largest_layer_parameter_count,
    layer_count,
    parameter_count,
    stage_pixels,
    weight_count,
    weight_layer_parameter_count,
)
from graddiag.models.spec import Activation, Spec

MIB: Final = 2**20
FLOAT: Final = 4  # bytes of a float32
INDEX: Final = 8  # bytes of an int64 (a max-pool's saved indices)
# run_probe evaluates the held-out sample in batches of this many examples (engine/probe.py `_evaluate`).
EVAL_BATCH: Final = 500
# Resident memory of a process that imported torch and ran two tiny probes (measured by bench/memory.py on
# the CUDA build of torch 2.x, x86_64; the CPU build is smaller). Reported beside the estimate, not in it:
# it is paid once per worker process, not per run.
TORCH_BASELINE_MIB: Final = 966.0
# What a run allocates besides the modelled tensors (autograd's graph nodes, the allocator's slack, the
# network's modules and hooks): a fixed part and a part per layer, fitted to bench/results/memory.json.
FIXED_OVERHEAD_MIB: Final = 8.0
OVERHEAD_PER_LAYER_BYTES: Final = 64 * 1024
# Python memory of the report: a LayerRecord per layer per recorded step, a StepMetrics per step
# (pydantic objects with their floats; measured with tracemalloc in tests/test_memory.py).
RECORD_BYTES: Final = 2048
STEP_BYTES: Final = 1536
# Activations whose saturation the recorder measures (engine/recorder.py SATURATING).
RECORDER_SATURATING: Final = frozenset({"sigmoid", "tanh", "softsign"})
# Extra tensors (of its input's size) a norm layer's backward allocates besides the two gradients.
NORM_BACKWARD_TEMPS: Final = 1
# After training, the mean-field theory reads each weight layer in float64 and squares it
# (engine/theory.py): about this many float32 copies of the largest layer at once.
THEORY_LAYER_COPIES: Final = 4
# At step 0 the probe measures the input's second moment for the theory in float64 (engine/probe.py
# `_train_step`): a float64 copy of the batch and its square, four float32 batches at once.
INPUT_MOMENT_BATCHES: Final = 4
# Optimizers whose update the recorder reads from the optimizer instead of a snapshot of the weights
# (engine/probe.py `_recorded_step`).
UPDATE_READ_FROM_OPTIMIZER: Final = frozenset({"sgd", "momentum"})
# Optimizer state per parameter (float32 copies), and the temporaries its foreach step allocates.
OPTIMIZER_STATES: Final = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
OPTIMIZER_STEP_TEMPS: Final = {"sgd": 0, "momentum": 0, "adam": 1, "adamw": 1}


@dataclass(frozen=True)
class ActivationMemory:
    """What one activation keeps for backward and allocates in it, in tensors of its input's size.

    Read from autograd (tests/test_memory.py checks every entry with `saved_tensors_hooks` and by
    measuring the forward and backward of a large tensor).
    """

    saves_input: bool
    saves_output: bool
    # New tensors it saves besides its input and output (softsign keeps the denominator 1 + |x|).
    extra_saved: int = 0
    # Temporaries its backward allocates besides the incoming and the outgoing gradient.
    backward_temps: int = 0
    # identity returns its input: no new tensor.
    aliases_input: bool = False


ACTIVATIONS: Final[dict[Activation, ActivationMemory]] = {
    "sigmoid": ActivationMemory(saves_input=False, saves_output=True),
    "tanh": ActivationMemory(saves_input=False, saves_output=True),
    "relu": ActivationMemory(saves_input=False, saves_output=True),
    "leaky_relu": ActivationMemory(saves_input=True, saves_output=False),
    "elu": ActivationMemory(saves_input=True, saves_output=False),
    "selu": ActivationMemory(saves_input=True, saves_output=False),
    "gelu": ActivationMemory(saves_input=True, saves_output=False),
    "silu": ActivationMemory(saves_input=True, saves_output=False),
    # x / (1 + |x|) is three autograd ops: abs and div save x, div saves the denominator too; the
    # backward of div and abs holds three more x-sized temporaries at its worst.
    "softsign": ActivationMemory(saves_input=True, saves_output=False, extra_saved=1, backward_temps=3),
    "identity": ActivationMemory(saves_input=False, saves_output=False, aliases_input=True),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """A run's estimated peak memory growth in MiB, with its parts (what an error message can name)."""

    parameters_mib: float
    training_mib: float
    evaluation_mib: float
    report_mib: float
    overhead_mib: float

    @property
    def run_mib(self) -> float:
        """Peak growth of the resident memory of a warm process running the spec: what the caps compare."""
        peak = max(self.training_mib, self.evaluation_mib)
        return self.parameters_mib + peak + self.report_mib + self.overhead_mib

    @property
    def process_mib(self) -> float:
        """Peak resident memory of a fresh process running the spec alone: torch's baseline plus the run."""
        return TORCH_BASELINE_MIB + self.run_mib


class _Trace:
    """The ops of one forward pass over one example, in forward order, with what autograd keeps.

    Sizes are bytes per example (every activation tensor scales with the batch). `held` lists the
    tensors enclosing blocks keep referenced while the op runs (a residual block's input, a stage's
    input); in a no-grad pass they are what stays alive besides the op's own input and output.
    """

    def __init__(self) -> None:
        self.sizes: list[float] = []
        self.first_saver: list[int | None] = []
        # per op: (input, output, backward working set, held tensors, forward temporaries in training
        # and in a no-grad pass)
        self.ops: list[tuple[int, int, float, tuple[int, ...], float, float]] = []

    def tensor(self, size: float) -> int:
        self.sizes.append(size)
        self.first_saver.append(None)
        return len(self.sizes) - 1

    def save(self, tensor: int) -> None:
        if self.first_saver[tensor] is None:
            self.first_saver[tensor] = len(self.ops)

    def op(
        self, x: int, out: int, backward: float, held: tuple[int, ...], training: float = 0.0, no_grad: float = 0.0
    ) -> int:
        self.ops.append((x, out, backward, held, training, no_grad))
        return out

    # --- the layers -------------------------------------------------------------------------------

    def weight(self, x: int, size: float, held: tuple[int, ...], first: bool = False) -> int:
        """Linear or conv: saves its input; backward makes the input's gradient (not for the data)."""
        self.save(x)
        out = self.tensor(size)
        return self.op(x, out, size + (0 if first else self.sizes[x]), held)

    def norm(self, x: int, held: tuple[int, ...]) -> int:
        """Batch, layer or group norm: saves its input (and per-row statistics, negligible)."""
        self.save(x)
        size = self.sizes[x]
        return self.op(x, self.tensor(size), (2 + NORM_BACKWARD_TEMPS) * size, held)

    def activation(self, x: int, kind: ActivationMemory, recorder: float, held: tuple[int, ...]) -> int:
        """An activation (`ACTIVATIONS`); `recorder`: temporaries the recorder's hook on it allocates."""
        size = self.sizes[x]
        if kind.aliases_input:
            return self.op(x, x, 0.0, held)
        if kind.saves_input:
            self.save(x)
        out = self.tensor(size)
        if kind.saves_output:
            self.save(out)
        for _ in range(kind.extra_saved):
            self.save(self.tensor(size))
        extra = kind.extra_saved * size
        return self.op(x, out, (2 + kind.backward_temps) * size, held, extra + recorder * size, extra)

    def add(self, x: int, y: int, held: tuple[int, ...]) -> int:
        """A residual sum: saves nothing; its backward hands the same gradient to both inputs."""
        return self.op(y, self.tensor(self.sizes[y]), self.sizes[y], (*held, x))

    def pool(self, x: int, held: tuple[int, ...]) -> int:
        """2x2 max-pool: saves its input and int64 indices of its output's size."""
        self.save(x)
        size = self.sizes[x] / 4
        self.save(self.tensor(size * INDEX / FLOAT))
        return self.op(x, self.tensor(size), size + self.sizes[x], held)

    def reduce(self, x: int, size: float, held: tuple[int, ...]) -> int:
        """Global average pool: saves nothing; backward expands the gradient back to its input's size."""
        return self.op(x, self.tensor(size), size + self.sizes[x], held)

    def _saved_before(self, tensor: int, op: int) -> bool:
        first = self.first_saver[tensor]
        return first is not None and first < op

    # --- the peaks ----------------------------------------------------------------------------------

    def training_peak(self) -> float:
        """Bytes per example at the worst moment of forward and backward (saved tensors plus work)."""
        saved_from = [0.0] * (len(self.ops) + 1)
        for size, first in zip(self.sizes, self.first_saver, strict=True):
            if first is not None:
                saved_from[first] += size
        # A tensor saved first by op i lives until backward has passed op i.
        cumulative, alive = 0.0, []
        for k in range(len(self.ops)):
            cumulative += saved_from[k]
            alive.append(cumulative)
        backward = max(alive[k] + op[2] for k, op in enumerate(self.ops))
        forward = 0.0
        for k, (x, out, _work, held, temporaries, _no_grad) in enumerate(self.ops):
            before = alive[k - 1] if k else 0.0
            unsaved = {t for t in (x, out, *held) if not self._saved_before(t, k)}
            forward = max(forward, before + sum(self.sizes[t] for t in unsaved) + temporaries)
        return max(forward, backward)

    def evaluation_peak(self) -> float:
        """Bytes per example at the worst op of a no-grad pass: held tensors, input, output, kept extras."""
        return max(
            sum(self.sizes[t] for t in {x, out, *held}) + temps for x, out, _work, held, _train, temps in self.ops
        )


def _trace(spec: Spec) -> _Trace:
    """The forward pass of `spec`'s network (models/networks.py), one example at a time."""
    act = ACTIVATIONS[spec.activation]
    recorder = recorder_activation_temporaries(spec.activation)
    trace = _Trace()
    norm = spec.norm != "none"

    def block(x: int, size: float, held: tuple[int, ...], first: bool = False) -> int:
        h = trace.weight(x, size, (*held, x), first)
        if norm:
            h = trace.norm(h, (*held, x))
        return trace.activation(h, act, recorder, (*held, x))

    image = trace.tensor(0.0)  # the data batch is counted once, as data
    if spec.arch == "mlp":
        unit = spec.width * FLOAT
        x = block(image, unit, (), first=True)
        for _ in range(spec.depth - 1):
            x = trace.add(x, block(x, unit, ()), ()) if spec.residual else block(x, unit, ())
        trace.weight(x, NUM_CLASSES * FLOAT, ())
        return trace

    x = block(image, spec.width * stage_pixels(0) * FLOAT, (), first=True)
    for stage, size in enumerate(cnn_stage_sizes(spec.depth)):
        unit = spec.width * stage_pixels(stage) * FLOAT
        convs = size - 1 if stage == 0 else size
        stage_input = x
        held = (stage_input,)
        if not spec.residual:
            for _ in range(convs):
                x = block(x, unit, held)
        else:
            for pair in [2] * (convs // 2) + [1] * (convs % 2):
                block_input = x
                inner = (*held, block_input)
                h = block(x, unit, inner) if pair == 2 else x
                h = trace.weight(h, unit, inner)
                if norm:
                    h = trace.norm(h, inner)
                x = trace.activation(trace.add(block_input, h, held), act, recorder, held)
        if stage < len(cnn_stage_sizes(spec.depth)) - 1:
            x = trace.pool(x, ())
    x = trace.reduce(x, spec.width * FLOAT, ())
    trace.weight(x, NUM_CLASSES * FLOAT, ())
    return trace


def recorder_activation_temporaries(activation: Activation) -> float:
    """Temporaries (in tensors of the activation's size) the recorder's hook on an activation allocates.

    On a recorded step the recorder measures the saturated fraction of a saturating activation from its
    output (engine/recorder.py `_saturated_fraction`): the local derivative, its comparison and a float
    copy of that, about 2.25 tensors at once. tests/test_memory.py checks the set against the recorder's.
    """
    return 2.25 if activation in RECORDER_SATURATING else 0.0


def recorder_buffer_bytes(spec: Spec) -> float:
    """Tensors the probe and its recorder keep for the whole run besides the network's own parameters.

    The probe's copy of the weight layers' initial weights and biases (for the theory), and, for Adam and
    AdamW, the recorder's snapshot of every layer's weight before each recorded update (SGD's and
    momentum's update is read from the optimizer, without a copy). Per-layer statistics are scalars.
    When the recorder keeps more per layer, this is the one place to count it.
    """
    snapshot = weight_count(spec) if spec.optimizer not in UPDATE_READ_FROM_OPTIMIZER else 0
    return FLOAT * (weight_layer_parameter_count(spec) + snapshot)


def estimate_run_memory(spec: Spec, eval_samples: int) -> MemoryEstimate:
    """The peak memory growth of `run_probe(spec, eval_samples=eval_samples)` in a warm process, by part."""
    params = parameter_count(spec)
    # Weights, gradients, the optimizer's state and the recorder's copies live through training and evaluation.
    parameters = FLOAT * params * (2 + OPTIMIZER_STATES[spec.optimizer]) + recorder_buffer_bytes(spec)
    trace = _trace(spec)
    batch = spec.batch_size * INPUT_FEATURES * FLOAT
    # The gradient a layer's backward adds into an existing .grad is computed into a temporary first.
    largest_layer = FLOAT * largest_layer_parameter_count(spec)
    step = spec.batch_size * trace.training_peak() + largest_layer
    # After backward: Adam's step, a weight decay the optimizer adds to the gradient, and the probe's L1
    # (sign of the weights) and penalty norms allocate parameter-sized temporaries.
    temps = OPTIMIZER_STEP_TEMPS[spec.optimizer] + (spec.weight_decay > 0 or spec.l1 > 0)
    theory = THEORY_LAYER_COPIES * largest_layer
    training = batch + max(step, FLOAT * params * temps, theory, INPUT_MOMENT_BATCHES * batch)
    eval_batch = min(EVAL_BATCH, eval_samples)
    evaluation = eval_samples * INPUT_FEATURES * FLOAT + eval_batch * trace.evaluation_peak()
    recorded_steps = -(-spec.steps // spec.record_every) + 1
    report = recorded_steps * layer_count(spec) * RECORD_BYTES + spec.steps * STEP_BYTES
    overhead = FIXED_OVERHEAD_MIB * MIB + layer_count(spec) * OVERHEAD_PER_LAYER_BYTES
    return MemoryEstimate(
        parameters_mib=parameters / MIB,
        training_mib=training / MIB,
        evaluation_mib=evaluation / MIB,
        report_mib=report / MIB,
        overhead_mib=overhead / MIB,
    )


def estimate_run_memory_mb(spec: Spec, eval_samples: int) -> float:
    """The peak memory growth of one run of `spec` in MiB: `estimate_run_memory(...).run_mib`."""
    return estimate_run_memory(spec, eval_samples).run_mib
