"""How much memory a probe run takes, from its spec alone (no torch): the model behind the memory cap.

The API refuses a spec whose estimate is over `max_run_memory_mb`, and the worker's memory guard stops a
run that grows far past its estimate, so the estimate must hold for every spec the caps accept. It is
the peak growth of a process's resident memory while `run_probe` trains the spec and evaluates it, over
a process that already imported torch and ran tiny probes (torch's own libraries, thread pools,
kernels and lazy imports are that baseline, `TORCH_BASELINE_MIB`, paid once per worker, not per run).
It is built from what really stays alive (on the CPU; a CUDA run keeps its tensors in GPU memory):

* parameters: the weights, their gradients, the optimizer's state, the probe's copy of the weight
  layers' initial weights, the recorder's snapshot of the weights (`recorder_buffer_bytes`);
* the training step: the data batch, every tensor autograd saves for backward (per activation, per
  norm, per residual sum and pool, `ACTIVATIONS` and the trace below, read from autograd; per time
  step of a recurrent layer, `CELLS`, or on a step that records nothing the fused LSTM kernel's
  workspace, `FUSED_LSTM_WORKSPACE`; a transformer's q, k, v, attention output and MLP activations:
  the CPU's fused attention keeps no tokens x tokens matrix), and the gradients and temporaries
  backward holds at its worst layer; or, if larger, the temporaries of the optimizer step, of the
  theory's float64 reads and of the input's second moment;
* freed tensors under the worker's mmap threshold, which the C heap keeps resident (`HEAP_RETAINED`);
* the held-out evaluation after training: the held-out sample and a no-grad forward pass in batches of
  `EVAL_BATCH` (the probe's), each block's input held while its layers run;
* the report's Python records (one per layer and recorded step; a recurrent net's also one per layer,
  time step and recorded step) and a fixed allowance for the rest.

`python -m bench.memory` measures peak RSS against this estimate over a grid of specs (every activation,
every arch, both norms, residual, batch and width extremes, the real evaluation size) and
bench/results/memory.md shows the ratios; tests/test_memory.py checks the per-activation table against
autograd and the estimate against measured runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from graddiag.models.shapes import (
    INPUT_FEATURES,
    NUM_CLASSES,
    PATCHES,
    SEQUENCE_LENGTH,
    cnn_stage_sizes,
    gate_count,
    largest_layer_parameter_count,
    layer_count,
    layer_shapes,
    parameter_count,
    stage_pixels,
    transformer_tokens,
    weight_count,
    weight_layer_parameter_count,
)
from graddiag.models.spec import RECURRENT_ARCHS, Activation, Spec

MIB: Final = 2**20
FLOAT: Final = 4  # bytes of a float32
INDEX: Final = 8  # bytes of an int64 (a max-pool's saved indices)
# run_probe evaluates the held-out sample in batches of this many examples (engine/probe.py `_evaluate`).
EVAL_BATCH: Final = 500
# Resident memory of a process that imported torch and ran tiny probes (measured by bench/memory.py on
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
# A recurrent net's report also keeps a TimeRecord per recurrent layer, time step and recorded step.
TIME_RECORD_BYTES: Final = 1536
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
# Tensors smaller than this come from the C heap, larger ones are mapped and unmapped on their own: the
# worker pins glibc's mmap threshold here (service/worker/memory_guard.py MMAP_THRESHOLD_BYTES; a test
# checks the two agree).
MMAP_THRESHOLD_BYTES: Final = 256 * 1024
# Freed heap memory stays resident and fragments from step to step: a training step's small saved tensors
# (a recurrent net's per-step states at small batch x width) are kept about once more beyond the step's
# own peak, through the evaluation too (lstm 2x128, batch 256: 95, 120 and 127 MiB resident after 1, 2
# and 4 steps against 56 MiB of small saved tensors).
HEAP_RETAINED: Final = 1.0
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
class CellMemory:
    """What one time step of a recurrent layer (models/networks.py `Recurrent`) keeps for backward.

    In tensors of the hidden state's size (batch x width), besides h_{t-1}, which W_hh's F.linear saves.
    Read from autograd (tests/test_memory.py counts the saved storages of a built layer).
    """

    # New hidden-sized tensors the step saves besides h_t: lstm the sigmoid gates i, f, o, tanh(g) and
    # tanh(c_t); gru the gates r, z, the candidate n and 1 - z.
    saved: int
    # rnn: h_t itself (tanh and relu save their result); lstm's and gru's h_t is saved by the next step.
    saves_output: bool = False
    # lstm: c_{t-1}, saved by f * c_{t-1} (c_0 is h_0's zeros, already saved).
    saves_cell_state: bool = False
    # gru: r * (W_hn h + b_hn) saves a view of the whole recurrent projection (3 x width).
    saves_projection: bool = False
    # Hidden-sized temporaries alive within a step besides the recurrent projection and h_t: the gate
    # pre-activations, lstm's f * c and i * g and the previous step's gates its names still hold.
    temporaries: int = 0
    # On a recorded step, the time recorder's per-step statistics (engine/time_recorder.py): float64
    # copies of h_t and of the kept gate, the saturation test over the concatenated sigmoid gates.
    recorder_temporaries: int = 0


# On a step that records nothing an LSTM layer runs PyTorch's fused kernel (oneDNN on the CPU), which
# saves its own workspace: it allocates 15.4-16 floats per hidden unit, example and time step (hidden
# 96-1024); forward leaves about 4 of them resident (6 here), backward the rest while it runs. The kernel
# also holds copies of the layer's weights in its own layout and their gradients, per call: about 3 times
# the layer's parameters (4 here). Fitted to peak RSS of LSTMs of hidden 256-1024 at batch 64 and 256
# (within 0.85-0.93 of this model). rnn and gru run PyTorch's native kernels, which keep less than their
# unrolled cells (measured: 0.94 and 0.79 of the unrolled step's peak at hidden 1024 and 512).
FUSED_LSTM_WORKSPACE: Final = 6
FUSED_LSTM_BACKWARD: Final = 10
FUSED_LSTM_WEIGHT_COPIES: Final = 4
# The no-grad evaluation runs the fused kernels too: an LSTM's keeps scratch of about 1.5 floats per
# hidden unit, example and time step besides its input and output sequences (measured 1.5-1.7 at hidden
# 256 and 1024, batch 500); rnn's and gru's compute the input projection at once and collect the states
# as the unrolled pass does (measured 0.99 of its no-grad peak).
FUSED_LSTM_INFERENCE: Final = 1.5

CELLS: Final[dict[str, CellMemory]] = {
    "rnn": CellMemory(saved=0, saves_output=True, temporaries=1, recorder_temporaries=4),
    "gru": CellMemory(saved=4, saves_projection=True, temporaries=3, recorder_temporaries=9),
    "lstm": CellMemory(saved=5, saves_cell_state=True, temporaries=11, recorder_temporaries=12),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """A run's estimated peak memory growth in MiB, with its parts (what an error message can name)."""

    parameters_mib: float
    training_mib: float
    evaluation_mib: float
    report_mib: float
    overhead_mib: float
    # Freed small tensors the C heap keeps resident (`HEAP_RETAINED`), beside training and evaluation.
    heap_mib: float = 0.0

    @property
    def run_mib(self) -> float:
        """Peak growth of the resident memory of a warm process running the spec: what the caps compare."""
        peak = max(self.training_mib, self.evaluation_mib)
        return self.parameters_mib + peak + self.heap_mib + self.report_mib + self.overhead_mib

    @property
    def largest_part(self) -> tuple[str, float]:
        """The part that weighs most, named for a person (an error message), with its MiB."""
        parts = {
            "parameters and optimizer state": self.parameters_mib,
            "training (activations kept for backward)": self.training_mib,
            "evaluation": self.evaluation_mib,
            "freed small tensors the heap keeps": self.heap_mib,
            "report records": self.report_mib,
        }
        name = max(parts, key=lambda part: parts[part])
        return name, parts[name]

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
        # How many tensors of that size an entry stands for: a recurrent layer's first steps save the same
        # tensors over and over, traced as one entry each.
        self.counts: list[int] = []
        self.first_saver: list[int | None] = []
        # per op: (input, output, backward working set, held tensors, forward temporaries in training
        # and in a no-grad pass)
        self.ops: list[tuple[int, int, float, tuple[int, ...], float, float]] = []

    def tensor(self, size: float, count: int = 1) -> int:
        self.sizes.append(size)
        self.counts.append(count)
        self.first_saver.append(None)
        return len(self.sizes) - 1

    def _bytes(self, tensor: int) -> float:
        return self.sizes[tensor] * self.counts[tensor]

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

    def norm(self, x: int, held: tuple[int, ...], stats: float = 0.0) -> int:
        """Batch, layer or group norm: saves its input and `stats` bytes of per-row mean and 1/std.

        An MLP's or CNN's statistics are two numbers per example (negligible); a transformer's layer
        norm keeps two per token.
        """
        self.save(x)
        if stats:
            self.save(self.tensor(stats))
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

    def copy(self, x: int, size: float, held: tuple[int, ...] = ()) -> int:
        """A new tensor made from `x` that saves nothing: a reshaped copy, a concatenation, a broadcast sum.

        Backward hands on (slices of) the incoming gradient: the gradient of the output is its work.
        """
        return self.op(x, self.tensor(size), size, held)

    def attention(self, q: int, k: int, v: int, logsumexp: float, held: tuple[int, ...]) -> int:
        """Scaled dot-product attention on the CPU's fused (flash) path: saves q, k, v, its output and a
        log-sum-exp per head and token, never the tokens x tokens matrix (tests/test_memory.py checks
        which path runs); backward makes the gradients of q, k and v besides the incoming one."""
        for tensor in (q, k, v):
            self.save(tensor)
        out = self.tensor(self.sizes[q])
        self.save(out)
        self.save(self.tensor(logsumexp))
        return self.op(q, out, 4 * self.sizes[q], (*held, k, v))

    def fused_lstm(self, x: int, width: int, first: bool) -> int:
        """One LSTM layer in PyTorch's fused kernel (`FUSED_LSTM_WORKSPACE`): saves its time-major input
        (a copy of the data's rows for the first layer, the layer below's output otherwise), its
        workspace, its output sequence and last states; backward works through the workspace and makes
        the gradients of its output and input sequences. Returns the output sequence."""
        unit = width * FLOAT
        sequence = SEQUENCE_LENGTH * unit
        held: tuple[int, ...] = ()
        if first:
            held = (x,)  # the data's rows, held by the network's loop while the layer runs
            x = self.copy(x, self.sizes[x])
        self.save(x)
        self.save(self.tensor(SEQUENCE_LENGTH * FUSED_LSTM_WORKSPACE * unit))
        self.save(self.tensor(2 * unit))
        out = self.tensor(sequence)
        self.save(out)
        backward = SEQUENCE_LENGTH * FUSED_LSTM_BACKWARD * unit + sequence + (0 if first else self.sizes[x])
        return self.op(x, out, backward, held, 0.0, SEQUENCE_LENGTH * FUSED_LSTM_INFERENCE * unit)

    def recurrent(self, x: int, cell_name: str, width: int, first: bool) -> int:
        """One recurrent layer unrolled over the sequence: ``ih`` once, then W_hh and the cell per step.

        The input projection P (sequence x gates x width) is alive through the loop and saved by nobody:
        every step adds a slice of it. In backward each step's slice gradient is a zero-filled tensor of
        P's size added into P's gradient, so two P-sized tensors and the gradient of the layer's output
        sequence are alive at every step. Returns the stacked hidden states (sequence x width).
        """
        cell = CELLS[cell_name]
        unit = width * FLOAT
        gates = gate_count(cell_name) * unit
        projected = self.weight(x, SEQUENCE_LENGTH * gates, (), first)
        held = (x, projected)
        sequence = SEQUENCE_LENGTH * unit
        backward = 2 * self.sizes[projected] + sequence + gates + unit
        temps = cell.temporaries * unit
        # Each step runs W_hh on h_{t-1} (saving it) and the cell. The list of states grows to the whole
        # sequence before it is stacked (saved in training).
        training, no_grad = temps + cell.recorder_temporaries * unit, temps + sequence
        # Every step saves the same tensors and the peaks come at the last, after the others saved theirs:
        # steps 0 .. T-2 are traced as one op of repeated tensors, the last step on its own. Before it:
        # h_0 (= c_0), the states h_1 .. h_{T-2} (h_{T-1} too where the cell saves its output: rnn),
        # lstm's c_1 .. c_{T-2}, and every step's own saved tensors.
        first_steps = SEQUENCE_LENGTH - 1
        h = self.tensor(unit)
        self.save(h)
        states = first_steps - 1 + cell.saves_output + cell.saves_cell_state * (first_steps - 1)
        self.save(self.tensor(unit, states + cell.saved * first_steps))
        if cell.saves_projection:
            self.save(self.tensor(gates, first_steps))
        self.op(h, self.tensor(gates), backward, held, training, no_grad)
        # The last step: h_{T-1} (W_hh's input, unless saved as an output already), c_{T-1}, its own tensors.
        last = 1 - cell.saves_output + cell.saves_cell_state + cell.saved
        if last:
            self.save(self.tensor(unit, last))
        recurrent = self.tensor(gates)
        if cell.saves_projection:
            self.save(recurrent)
        h = self.tensor(unit)
        if cell.saves_output:
            self.save(h)
        self.op(recurrent, h, backward, held, training, no_grad)
        # The last step's temporaries are still referenced when the states are stacked.
        return self.op(h, self.tensor(sequence), sequence, held, 0.0, sequence + temps)

    def _saved_before(self, tensor: int, op: int) -> bool:
        first = self.first_saver[tensor]
        return first is not None and first < op

    # --- the peaks ----------------------------------------------------------------------------------

    def saved(self, below: float = float("inf"), batch: int = 1) -> float:
        """Bytes per example autograd keeps for backward once the forward pass is done.

        Only tensors whose `batch` examples take fewer than `below` bytes count, when `below` is given.
        """
        return sum(
            size * count
            for size, count, first in zip(self.sizes, self.counts, self.first_saver, strict=True)
            if first is not None and size * batch < below
        )

    def training_peak(self) -> float:
        """Bytes per example at the worst moment of forward and backward (saved tensors plus work)."""
        saved_from = [0.0] * (len(self.ops) + 1)
        for size, count, first in zip(self.sizes, self.counts, self.first_saver, strict=True):
            if first is not None:
                saved_from[first] += size * count
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
            forward = max(forward, before + sum(self._bytes(t) for t in unsaved) + temporaries)
        return max(forward, backward)

    def evaluation_peak(self) -> float:
        """Bytes per example at the worst op of a no-grad pass: held tensors, input, output, kept extras."""
        return max(
            sum(self._bytes(t) for t in {x, out, *held}) + temps for x, out, _work, held, _train, temps in self.ops
        )


def _fused_lstm_trace(spec: Spec) -> _Trace:
    """The forward pass of an LSTM on a step that records nothing (`_Trace.fused_lstm`)."""
    trace = _Trace()
    x = trace.copy(trace.tensor(0.0), INPUT_FEATURES * FLOAT)
    for layer in range(spec.depth):
        x = trace.fused_lstm(x, spec.width, first=layer == 0)
    trace.weight(x, NUM_CLASSES * FLOAT, ())
    return trace


def _training_step_bytes(spec: Spec, trace: _Trace) -> float:
    """Bytes of the worst moment of a training step: a recorded step's (`trace`) or, for an LSTM, a step
    that records nothing and runs the fused kernel with its weight copies, if larger."""
    peak = spec.batch_size * trace.training_peak()
    if spec.arch == "lstm":
        shapes = layer_shapes(spec)
        # A fused layer's parameters: its input projection and recurrent matrix (the output layer is last).
        layer = max(shapes[i].params + shapes[i + 1].params for i in range(0, len(shapes) - 1, 2))
        fused = spec.batch_size * _fused_lstm_trace(spec).training_peak() + FUSED_LSTM_WEIGHT_COPIES * FLOAT * layer
        peak = max(peak, fused)
    return peak


def _evaluation_peak(spec: Spec, trace: _Trace) -> float:
    """Bytes per example at the worst op of the no-grad evaluation: an LSTM's runs the fused kernel."""
    return (_fused_lstm_trace(spec) if spec.arch == "lstm" else trace).evaluation_peak()


def _trace(spec: Spec) -> _Trace:
    """The forward pass of `spec`'s network (models/networks.py), one example at a time.

    A recurrent net's layers are traced unrolled, as on a recorded step; `_training_step_bytes` and
    `_evaluation_peak` add the LSTM's fused kernel.
    """
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
    if spec.arch in RECURRENT_ARCHS:
        # Rows copies the image into a sequence; the top layer's last state is a view of its sequence, so
        # the output layer keeps the whole sequence saved.
        x = trace.copy(image, INPUT_FEATURES * FLOAT)
        for layer in range(spec.depth):
            x = trace.recurrent(x, spec.arch, spec.width, first=layer == 0)
        trace.weight(x, NUM_CLASSES * FLOAT, ())
        return trace
    if spec.arch == "transformer":
        _transformer(trace, spec, act, recorder, image)
        return trace
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


def _transformer(trace: _Trace, spec: Spec, act: ActivationMemory, recorder: float, image: int) -> None:
    """The forward pass of a transformer (models/networks.py `Block`), one example at a time."""
    tokens = transformer_tokens(spec)
    unit = tokens * spec.width * FLOAT
    stats = 2 * tokens * FLOAT  # a layer norm's mean and 1/std per token
    logsumexp = spec.heads * tokens * FLOAT
    patches = trace.copy(image, INPUT_FEATURES * FLOAT)
    x = trace.weight(patches, PATCHES * spec.width * FLOAT, (), first=True)
    if spec.pooling == "cls":
        x = trace.copy(x, unit)  # the class token prepended
    x = trace.copy(x, unit)  # plus the position table

    # A sub-block's input stays referenced by its caller until the sub-block returns.
    def attention(x: int, held: tuple[int, ...]) -> int:
        inner = (*held, x)
        q = trace.weight(x, unit, inner)
        k = trace.weight(x, unit, (*inner, q))
        v = trace.weight(x, unit, (*inner, q, k))
        # The fused kernel's output is laid out token-major, so the heads merge back without a copy.
        mixed = trace.attention(q, k, v, logsumexp, inner)
        return trace.weight(mixed, unit, inner)

    def mlp(x: int, held: tuple[int, ...]) -> int:
        inner = (*held, x)
        h = trace.weight(x, spec.mlp_ratio * unit, inner)
        h = trace.activation(h, act, recorder, inner)
        return trace.weight(h, unit, inner)

    for _ in range(spec.depth):
        block = (x,)  # the network's loop holds a block's input until the block returns
        if spec.norm_position == "pre":
            x = trace.add(x, attention(trace.norm(x, block, stats), block), block)
            x = trace.add(x, mlp(trace.norm(x, (*block, x), stats), (*block, x)), block)
        else:
            x = trace.norm(trace.add(x, attention(x, block), block), block, stats)
            x = trace.norm(trace.add(x, mlp(x, (*block, x)), block), block, stats)
    if spec.norm_position == "pre":
        x = trace.norm(x, (), stats)
    if spec.pooling == "mean":
        x = trace.reduce(x, spec.width * FLOAT, ())
    # The class token is a view of the last tokens: the output layer keeps them all saved.
    trace.weight(x, NUM_CLASSES * FLOAT, ())


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
    step = _training_step_bytes(spec, trace) + largest_layer
    # After backward: Adam's step, a weight decay the optimizer adds to the gradient, and the probe's L1
    # (sign of the weights) and penalty norms allocate parameter-sized temporaries.
    temps = OPTIMIZER_STEP_TEMPS[spec.optimizer] + (spec.weight_decay > 0 or spec.l1 > 0)
    theory = THEORY_LAYER_COPIES * largest_layer
    training = batch + max(step, FLOAT * params * temps, theory, INPUT_MOMENT_BATCHES * batch)
    eval_batch = min(EVAL_BATCH, eval_samples)
    evaluation = eval_samples * INPUT_FEATURES * FLOAT + eval_batch * _evaluation_peak(spec, trace)
    heap = HEAP_RETAINED * spec.batch_size * trace.saved(MMAP_THRESHOLD_BYTES, spec.batch_size)
    recorded_steps = -(-spec.steps // spec.record_every) + 1
    time_records = spec.depth * SEQUENCE_LENGTH if spec.arch in RECURRENT_ARCHS else 0
    per_record = layer_count(spec) * RECORD_BYTES + time_records * TIME_RECORD_BYTES
    report = recorded_steps * per_record + spec.steps * STEP_BYTES
    overhead = FIXED_OVERHEAD_MIB * MIB + layer_count(spec) * OVERHEAD_PER_LAYER_BYTES
    return MemoryEstimate(
        parameters_mib=parameters / MIB,
        training_mib=training / MIB,
        evaluation_mib=evaluation / MIB,
        report_mib=report / MIB,
        overhead_mib=overhead / MIB,
        heap_mib=heap / MIB,
    )


def saved_bytes_per_example(spec: Spec) -> float:
    """Bytes per example the model says autograd keeps for backward after `spec`'s forward pass.

    Beside the peaks it is the one figure a test can compare exactly with autograd (the storages that
    `saved_tensors_hooks` sees, parameters excluded).
    """
    return _trace(spec).saved()


def sizing_fields(spec: Spec, estimate: MemoryEstimate) -> tuple[str, ...]:
    """The spec fields to lower to shrink `estimate`: what its large parts grow with.

    Activations, parameters and the evaluation grow with depth, width and batch_size (a transformer's
    also with mlp_ratio); when the report's records are most of it (a recurrent net's time steps
    recorded every step), steps and record_every.
    """
    fields: tuple[str, ...] = ("depth", "width", "batch_size")
    if spec.arch == "transformer":
        fields += ("mlp_ratio",)
    if estimate.report_mib > estimate.run_mib / 2:
        fields += ("steps", "record_every")
    return fields


def estimate_run_memory_mb(spec: Spec, eval_samples: int) -> float:
    """The peak memory growth of one run of `spec` in MiB: `estimate_run_memory(...).run_mib`."""
    return estimate_run_memory(spec, eval_samples).run_mib
