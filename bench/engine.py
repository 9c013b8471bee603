"""Engine benchmark: what recording every step costs, against a bare loop and a seed-style loop.

For each network (MLP depth 20 width 256, CNN depth 8 width 32; batch 128, SGD lr 0.01, CIFAR-10)
three arms train freshly built copies of the same network (same spec, same initial weights):

(a) bare: ``build_network`` + SGD on ``make_source(spec).batch(step)`` (the probe's own in-memory
    uint8 batches, normalised the same way), nothing recorded. The limit.
(b) probe: ``run_probe`` with ``record_every=1``. A step is timed from one ``should_stop()`` poll to
    the next (the poll is the first statement of the probe's loop body), so it is the whole loop
    body: batch, forward with the recorder's hooks, backward, per-parameter norms, zero counts, the
    totals and finiteness check, the optimizer step, the update norm (read from SGD), ``layer_stats``
    and its host copy. (Whole runs at the default record_every=10: ``bench/recording.py``.)
    Data set-up, network build, evaluation and report assembly are outside it. The probe runs one
    extra step so that the last timed step also ends at a poll.
(c) seed-style: a torchvision-``CIFAR10``-style Dataset over decoded uint8 HWC arrays
    (``PIL.Image.fromarray`` → ``ToTensor`` → ``Normalize`` per sample) through a ``DataLoader``
    (batch 128, shuffle, num_workers 0), ``zero_grad()``, and per-parameter
    ``p.grad.norm().item()`` plus ``loss.item()`` logged each step.

(f) floor (lockstep only): the bare loop plus the least any exact per-layer record needs, one read
    of every gradient and every weight (two ``torch._foreach_norm`` calls, one host copy of their
    norms), after backward; no update ratio, hooks, zero count or bookkeeping. (f)/(a) bounds from
    below what any eager-PyTorch recorder of grad_norm and weight_norm can reach on this machine.

Two protocols, both after untimed warm-up steps, both reported:

* blocks: per repetition, a → b → c each run warm-up + timed steps; time per step is a timed
  window's wall time over its steps, and the figure is the median over repetitions.
* lockstep (CPU): (a) and (c) take one step each (alternating which goes first) inside the probe's
  ``should_stop()`` poll, so every probe step sits between an (a) and a (c) step; figures are
  medians over all timed steps and ratios medians of per-step ratios. On a machine whose load
  changes from second to second this is the one to trust: all three arms see the same load.

Also measured: the peak RSS (VmHWM) of fresh subprocesses running a depth-50 MLP probe for 1 and
for 500 steps, and where (b)'s extra time over (a) goes, on the real ``run_probe`` (each probe step
paired with a bare step, every Recorder method timed by a patched-in subclass, and a line trace of
probe.py and recorder.py, so the profile follows the recorder as it is optimised).

CUDA (written for a machine that has it, not run where this was written): the block protocol runs on
the GPU too, with ``torch.cuda.synchronize()`` only at the two ends of each timed window, and the
synchronising calls per step are counted with ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import inspect
import itertools
import json
import linecache
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from graddiag.models.networks import build_network
from graddiag.models.spec import Arch, Device, Spec
from graddiag.service.engine import probe as probe_module
from graddiag.service.engine import recorder as recorder_module
from graddiag.service.engine.data import CIFAR10_MEAN, CIFAR10_STD, ImageSet, load_cifar10, make_source
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.recorder import Recorder

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH_SIZE = 128
LR = 0.01
# Held-out images the probe evaluates after training: outside every timed window, so kept small.
PROBE_EVAL_SAMPLES = 500
ARMS = ("a_bare", "b_probe", "c_seed")
TARGET_B_OVER_A = 1.05
# Issue 16: recording every step costs at most this much over the bare loop (MLP).
TARGET_EVERY_STEP_MLP = 1.20
TARGET_C_OVER_B_MLP = 1.8
TARGET_MEMORY_MIB = 1024.0
# A block row whose repetitions differ by more than this factor was disturbed by other load.
UNSTABLE_SPREAD = 1.25
CPU = torch.device("cpu")

Data = tuple[ImageSet, ImageSet]


@dataclass(frozen=True)
class Net:
    key: str
    label: str
    arch: Arch
    depth: int
    width: int


NETS = (
    Net("mlp", "MLP depth 20, width 256", "mlp", 20, 256),
    Net("cnn", "CNN depth 8, width 32", "cnn", 8, 32),
)


def make_spec(net: Net, steps: int, device: torch.device) -> Spec:
    name: Device = "cuda" if device.type == "cuda" else "cpu"
    return Spec(
        arch=net.arch,
        depth=net.depth,
        width=net.width,
        batch_size=BATCH_SIZE,
        steps=steps,
        record_every=1,
        optimizer="sgd",
        lr=LR,
        device=name,
        dataset="cifar10",
        seed=0,
    )


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------
# The arms, one step at a time


class BareStepper:
    """Loop (a): one training step per call, with its parts timed (meaningful on the CPU only)."""

    def __init__(self, net: Net, data: Data, device: torch.device, steps: int, floor: bool = False) -> None:
        spec = make_spec(net, steps, device)
        self.model = build_network(spec).to(device)
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.source = make_source(spec, data=data, device=device, eval_samples=1)
        self.loss: Tensor | None = None
        # Arm (f): read every gradient and every weight once per step, nothing else.
        self.floor = floor
        self.params = list(self.model.parameters())
        self.weights = [layer.weight for layer in self.model.layers]

    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        inputs, labels = self.source.batch(step)
        t1 = time.perf_counter()
        loss = F.cross_entropy(self.model(inputs), labels)
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if self.floor:
            grads = [p.grad for p in self.params if p.grad is not None]
            torch.stack(torch._foreach_norm(grads + [w.detach() for w in self.weights])).tolist()
        t3 = time.perf_counter()
        self.optimizer.step()
        t4 = time.perf_counter()
        self.loss = loss.detach()
        return {"batch": t1 - t0, "forward + loss": t2 - t1, "zero_grad + backward": t3 - t2, "optimizer.step": t4 - t3}


class UInt8HWCDataset(Dataset[tuple[Tensor, int]]):
    """torchvision.datasets.CIFAR10's __getitem__ over already-decoded uint8 HWC arrays."""

    def __init__(self, data: np.ndarray, targets: list[int], transform: Callable[[Image.Image], Tensor]) -> None:
        self.data = data
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img, target = self.data[index], self.targets[index]
        return self.transform(Image.fromarray(img)), target


def make_seed_dataset(train: ImageSet) -> UInt8HWCDataset:
    # Like CIFAR10.data: one contiguous (N, 32, 32, 3) uint8 array; targets a list of ints.
    hwc = np.ascontiguousarray(train.images.permute(0, 2, 3, 1).numpy())
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    return UInt8HWCDataset(hwc, train.labels.tolist(), transform)


class SeedStepper:
    """Loop (c): DataLoader batches, per-parameter .norm().item() and loss.item() logged each step."""

    def __init__(self, net: Net, dataset: UInt8HWCDataset, device: torch.device, steps: int) -> None:
        self.device = device
        self.model = build_network(make_spec(net, steps, device)).to(device)
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.loader = DataLoader(
            dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=0, drop_last=True,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        self.batches = iter(self.loader)
        self.history: list[list[float]] = []
        self.losses: list[float] = []

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            inputs, labels = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            inputs, labels = next(self.batches)
        inputs, labels = inputs.to(self.device), labels.to(self.device)
        t1 = time.perf_counter()
        loss = F.cross_entropy(self.model(inputs), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.history.append([p.grad.norm().item() for p in self.model.parameters() if p.grad is not None])
        self.losses.append(loss.item())
        self.optimizer.step()
        return {"batch": t1 - t0, "train + logging": time.perf_counter() - t1}


# --------------------------------------------------------------------------------------------
# Block protocol: a → b → c per repetition, each a window of warm-up + timed steps


class Window:
    """Per-step timestamps; on CUDA it synchronises only at the two ends of the timed window."""

    def __init__(self, device: torch.device, warmup: int, steps: int, sync: bool = True) -> None:
        self.stamps: list[float] = []
        self.bounds = (warmup, warmup + steps)
        self.cuda = device.type == "cuda"
        self.sync = sync

    def mark(self) -> None:
        if self.cuda and self.sync and len(self.stamps) in self.bounds:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def mean_ms(self) -> float:
        start, end = self.bounds
        return 1000.0 * (self.stamps[end] - self.stamps[start]) / (end - start)

    def step_median_ms(self) -> float | None:
        if self.cuda:
            return None  # without a sync per step these would be enqueue times
        start, end = self.bounds
        return 1000.0 * _median([b - a for a, b in itertools.pairwise(self.stamps[start : end + 1])])


@dataclass
class ArmRun:
    mean_ms: float
    step_median_ms: float | None
    final_loss: float
    batch_ms: float | None = None  # median time to produce a batch (CPU)
    report_timing: dict[str, Any] | None = None


def run_bare(net: Net, data: Data, device: torch.device, warmup: int, steps: int, sync: bool = True) -> ArmRun:
    stepper = BareStepper(net, data, device, warmup + steps)
    window = Window(device, warmup, steps, sync)
    batch_s = []
    for step in range(warmup + steps):
        window.mark()
        batch_s.append(stepper.step(step)["batch"])
    window.mark()
    loss = float(stepper.loss) if stepper.loss is not None else float("nan")
    batch_ms = None if window.cuda else 1000.0 * _median(batch_s[warmup:])
    return ArmRun(window.mean_ms(), window.step_median_ms(), loss, batch_ms)


def run_probe_arm(net: Net, data: Data, device: torch.device, warmup: int, steps: int, sync: bool = True) -> ArmRun:
    spec = make_spec(net, warmup + steps + 1, device)  # +1: a poll closes the last timed step
    window = Window(device, warmup, steps, sync)

    def poll() -> bool:
        window.mark()
        return False

    report = run_probe(spec, data=data, eval_samples=PROBE_EVAL_SAMPLES, should_stop=poll)
    if report.timing.steps_run != spec.steps:
        raise RuntimeError(f"the probe stopped early at step {report.timing.steps_run} (non-finite?)")
    loss = report.steps[warmup + steps - 1].loss
    return ArmRun(
        window.mean_ms(),
        window.step_median_ms(),
        float("nan") if loss is None else loss,
        report_timing=report.timing.model_dump(),
    )


def run_seed(
    net: Net, dataset: UInt8HWCDataset, device: torch.device, warmup: int, steps: int, sync: bool = True
) -> ArmRun:
    stepper = SeedStepper(net, dataset, device, warmup + steps)
    window = Window(device, warmup, steps, sync)
    batch_s = []
    for _ in range(warmup + steps):
        window.mark()
        batch_s.append(stepper.step()["batch"])
    window.mark()
    batch_ms = None if window.cuda else 1000.0 * _median(batch_s[warmup:])
    return ArmRun(window.mean_ms(), window.step_median_ms(), stepper.losses[-1], batch_ms)


def block_protocol(
    net: Net, data: Data, seed_set: UInt8HWCDataset, device: torch.device, warmup: int, steps: int, reps: int
) -> dict[str, Any]:
    runs: dict[str, list[ArmRun]] = {arm: [] for arm in ARMS}
    loads = []
    for rep in range(reps):
        loads.append(_loadavg()[0])
        for arm in ARMS:
            gc.collect()
            if arm == "a_bare":
                run = run_bare(net, data, device, warmup, steps)
            elif arm == "b_probe":
                run = run_probe_arm(net, data, device, warmup, steps)
            else:
                run = run_seed(net, seed_set, device, warmup, steps)
            runs[arm].append(run)
            print(f"  blocks {device.type} {net.key} rep {rep + 1}/{reps} {arm}: {run.mean_ms:.2f} ms/step", flush=True)

    arms: dict[str, Any] = {}
    for arm, arm_runs in runs.items():
        means = [r.mean_ms for r in arm_runs]
        step_medians = [r.step_median_ms for r in arm_runs if r.step_median_ms is not None]
        batch_ms = [r.batch_ms for r in arm_runs if r.batch_ms is not None]
        arms[arm] = {
            "ms": round(_median(means), 3),
            "reps_ms": [round(m, 3) for m in means],
            "step_median_ms": round(_median(step_medians), 3) if step_medians else None,
            "batch_ms": round(_median(batch_ms), 3) if batch_ms else None,
            "final_loss": [r.final_loss for r in arm_runs],
        }
    arms["b_probe"]["report_timing"] = [r.report_timing for r in runs["b_probe"]]

    def ratio(num: str, den: str) -> dict[str, Any]:
        paired = [n.mean_ms / d.mean_ms for n, d in zip(runs[num], runs[den], strict=True)]
        return {"of_medians": round(arms[num]["ms"] / arms[den]["ms"], 3), "reps_paired": [round(p, 3) for p in paired]}

    return {
        "protocol": "blocks",
        "net": net.label,
        "device": device.type,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "reps": reps,
        "loadavg_1min_at_rep_start": loads,
        "arms": arms,
        "b_over_a": ratio("b_probe", "a_bare"),
        "c_over_b": ratio("c_seed", "b_probe"),
        # (a) and (b) train on the same batches from the same weights: their losses must agree.
        "a_b_final_loss_abs_diff": abs(runs["a_bare"][0].final_loss - runs["b_probe"][0].final_loss),
    }


# --------------------------------------------------------------------------------------------
# Lockstep protocol (CPU): an (a) step and a (c) step inside every probe poll


class LockstepPoll:
    """The probe's should_stop(): closes the probe step that just ended, steps (a), (f) and (c), reopens."""

    def __init__(self, bare: BareStepper, floor: BareStepper, seed: SeedStepper, warmup: int, steps: int) -> None:
        self.bare, self.floor, self.seed = bare, floor, seed
        self.warmup, self.steps = warmup, steps
        self.step = 0  # the probe step about to start
        self.exit = 0.0
        self.last: dict[str, float] = {}  # seconds of the (a), (f), (c) steps run before the probe step
        self.rows: list[dict[str, float]] = []  # a, b, c, f seconds per timed step

    def _timed(self, fn: Callable[[], object]) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    def __call__(self) -> bool:
        now = time.perf_counter()
        if self.step - 1 >= self.warmup:
            self.rows.append({**self.last, "b": now - self.exit})
        if self.step < self.warmup + self.steps:
            k = self.step
            arms: list[tuple[str, Callable[[], object]]] = [
                ("a", lambda: self.bare.step(k)),
                ("f", lambda: self.floor.step(k)),
                ("c", self.seed.step),
            ]
            # Rotate which arm goes first, so none always runs on the caches another just filled.
            arms = arms[k % 3 :] + arms[: k % 3]
            self.last = {name: self._timed(fn) for name, fn in arms}
        self.step += 1
        self.exit = time.perf_counter()
        return False


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    """Lower and upper quartile of `values`, interpolated between them."""
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def _lockstep_figures(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    b_over_a = [r["b"] / r["a"] for r in rows]
    q1, q3 = _quartiles(b_over_a)
    return {
        **{f"{arm}_ms": round(1000 * _median([r[arm] for r in rows]), 3) for arm in "abcf"},
        "b_over_a": round(_median(b_over_a), 3),
        "b_over_a_q1": round(q1, 3),
        "b_over_a_q3": round(q3, 3),
        "c_over_b": round(_median([r["c"] / r["b"] for r in rows]), 3),
        "f_over_a": round(_median([r["f"] / r["a"] for r in rows]), 3),
        "c_over_f": round(_median([r["c"] / r["f"] for r in rows]), 3),
    }


def lockstep_protocol(
    net: Net, data: Data, seed_set: UInt8HWCDataset, warmup: int, steps: int, reps: int
) -> dict[str, Any]:
    rows: list[dict[str, float]] = []
    per_rep: list[dict[str, float]] = []
    loads = []
    loss_diffs = []
    for rep in range(reps):
        loads.append(_loadavg()[0])
        gc.collect()
        bare = BareStepper(net, data, CPU, warmup + steps)
        floor = BareStepper(net, data, CPU, warmup + steps, floor=True)
        poll = LockstepPoll(bare, floor, SeedStepper(net, seed_set, CPU, warmup + steps), warmup, steps)
        spec = make_spec(net, warmup + steps + 1, CPU)
        report = run_probe(spec, data=data, eval_samples=PROBE_EVAL_SAMPLES, should_stop=poll)
        if report.timing.steps_run != spec.steps:
            raise RuntimeError("the lockstep probe stopped early")
        probe_loss = report.steps[warmup + steps - 1].loss
        bare_loss = float(bare.loss) if bare.loss is not None else float("nan")
        loss_diffs.append(abs(bare_loss - (float("nan") if probe_loss is None else probe_loss)))
        rows += poll.rows
        per_rep.append(_lockstep_figures(poll.rows))
        print(f"  lockstep cpu {net.key} rep {rep + 1}/{reps}: {per_rep[-1]}", flush=True)
    figures = _lockstep_figures(rows)
    rep_q1, rep_q3 = _quartiles([r["b_over_a"] for r in per_rep])
    return {
        "protocol": "lockstep",
        "net": net.label,
        "device": "cpu",
        "warmup_steps": warmup,
        "timed_steps": steps,
        "reps": reps,
        "loadavg_1min_at_rep_start": loads,
        "arms": {
            "a_bare": {"ms": figures["a_ms"]},
            "b_probe": {"ms": figures["b_ms"]},
            "c_seed": {"ms": figures["c_ms"]},
            "f_floor": {"ms": figures["f_ms"]},
        },
        "b_over_a": {
            "median_per_step": figures["b_over_a"],
            "per_step_q1": figures["b_over_a_q1"],
            "per_step_q3": figures["b_over_a_q3"],
            # Run-to-run spread: quartiles of the repetitions' medians.
            "per_rep_q1": round(rep_q1, 3),
            "per_rep_q3": round(rep_q3, 3),
        },
        "c_over_b": {"median_per_step": figures["c_over_b"]},
        "f_over_a": {"median_per_step": figures["f_over_a"]},
        "c_over_f": {"median_per_step": figures["c_over_f"]},
        "per_rep": per_rep,
        # (a) and (b) train on the same batches from the same weights: their losses must agree.
        "a_b_final_loss_abs_diff": max(loss_diffs),
    }


# --------------------------------------------------------------------------------------------
# CUDA synchronisation count (not run where this was written)


def count_cuda_syncs(fn: Callable[[], object], steps: int) -> float:
    """Synchronising CUDA calls per step while `fn` runs, from torch's sync debug mode warnings.

    Includes the run's set-up and, for the probe, its end-of-run evaluation and report copies.
    """
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower()) / steps


def cuda_sync_counts(net: Net, data: Data, seed_set: UInt8HWCDataset) -> dict[str, float]:
    device, n = torch.device("cuda"), 20
    return {
        "a_bare": count_cuda_syncs(lambda: run_bare(net, data, device, 0, n, sync=False), n),
        "b_probe": count_cuda_syncs(lambda: run_probe_arm(net, data, device, 0, n, sync=False), n),
        "c_seed": count_cuda_syncs(lambda: run_seed(net, seed_set, device, 0, n, sync=False), n),
    }


# --------------------------------------------------------------------------------------------
# Peak memory of a long probe, in fresh subprocesses

# The subprocess imports only what a graddiag worker imports (torch and the engine; no torchvision,
# which this module needs for arm (c) but the service does not load once the cache exists), so its
# RSS is the service's. VmHWM is the kernel's peak RSS of the process's own address space;
# getrusage's ru_maxrss is not used because Linux carries the (large) parent's RSS over the fork.
MEMORY_MARK = "ENGINE_MEMORY_RESULT:"
MEMORY_CHILD = """
import json, sys, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out
mark, data_dir, cache_dir, threads, depth, steps, batch, lr = sys.argv[1:9]
import torch
torch.set_num_threads(int(threads))
after_torch = status()
from graddiag.models.spec import Spec
from graddiag.service.engine.data import load_cifar10
from graddiag.service.engine.probe import run_probe
after_import = status()
# The first torch.optim optimizer imports torch._dynamo, sympy, triton, ... lazily; run_probe would do
# it anyway, so doing it here only makes that cost visible on its own (the peak is unchanged).
modules = len(sys.modules)
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
after_optim = status()
optim_modules = len(sys.modules) - modules
data = load_cifar10(data_dir, cache_dir)
after_data = status()
spec = Spec(arch="mlp", depth=int(depth), width=256, batch_size=int(batch), steps=int(steps), record_every=1,
            optimizer="sgd", lr=float(lr), device="cpu", dataset="cifar10")
started = time.perf_counter()
report = run_probe(spec, data=data)
wall_s = time.perf_counter() - started
after_probe = status()
print(mark + json.dumps({
    "after_import_torch": after_torch, "after_import": after_import, "after_optim": after_optim,
    "optim_lazy_modules": optim_modules, "after_data": after_data,
    "after_probe": after_probe, "torchvision_imported": "torchvision" in sys.modules,
    "probe_wall_s": round(wall_s, 2), "probe_step_ms": report.timing.step_ms,
    "records": len(report.records), "verdict": report.verdict.label,
}), flush=True)
"""


def _memory_child(args: argparse.Namespace, steps: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-c", MEMORY_CHILD, MEMORY_MARK, str(args.data_dir), str(args.cache_dir),
        str(args.threads), str(args.memory_depth), str(steps), str(BATCH_SIZE), str(LR),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MEMORY_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory subprocess failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(MEMORY_MARK) :])
    return result


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    full = _memory_child(args, args.memory_steps)
    one = _memory_child(args, 1)
    peak = full["after_probe"]["VmHWM"]
    return {
        "spec": f"MLP depth {args.memory_depth}, width 256, batch {BATCH_SIZE}, {args.memory_steps} steps, "
        "record_every=1, CIFAR-10, eval_samples=2000 (run_probe's default), CPU",
        "method": "fresh `python -c` subprocess importing torch + graddiag's engine only; /proc/self/status "
        "VmRSS/VmHWM in MiB after each stage; a second subprocess runs the same probe for 1 step",
        "steps": args.memory_steps,
        "run": full,
        "one_step_run": one,
        "peak_rss_mib": peak,
        "probe_share_mib": round(peak - full["after_data"]["VmRSS"], 1),
        "one_step_probe_share_mib": round(one["after_probe"]["VmHWM"] - one["after_data"]["VmRSS"], 1),
        "target_mib": TARGET_MEMORY_MIB,
        "meets_target": peak < TARGET_MEMORY_MIB,
    }


# --------------------------------------------------------------------------------------------
# Profile of (b)'s extra time over (a) (CPU), on the real run_probe


class MethodTimer:
    """Wall time per Recorder method; outermost calls only, so nested calls are not counted twice."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.instances = 0
        self.depth = 0

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def timed_recorder_class(timer: MethodTimer) -> type[Recorder]:
    """A Recorder subclass whose every method (hook callbacks included) reports its time to `timer`.

    Built from whatever methods Recorder has now, so it follows the recorder as it changes.
    """

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if name == "__init__":
                timer.instances += 1
                return fn(*args, **kwargs)
            if timer.depth:
                return fn(*args, **kwargs)
            timer.depth += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - started
                timer.depth -= 1

        return wrapper

    namespace = {name: wrap(name, fn) for name, fn in vars(Recorder).items() if inspect.isfunction(fn)}
    return type("TimedRecorder", (Recorder,), namespace)


class LineTimer:
    """A minimal line profiler for a few source files (sys.settrace; CPU only).

    Wall time goes to the line of the innermost traced frame that is running, so time spent in
    untraced code (torch, nn.Module) is charged to the traced line that called it. The tracer's own
    cost is excluded, except the global trace call on every Python call made while tracing.
    """

    def __init__(self, files: set[str]) -> None:
        self.files = files
        self.totals: dict[tuple[str, int], float] = {}
        self.stack: list[tuple[str, int] | None] = []
        self.current: tuple[str, int] | None = None
        self.frame: FrameType | None = None
        self.last = 0.0

    def start(self, frame: FrameType) -> None:
        """Trace `frame` (already running) and every traced-file frame started from now on."""
        self.current, self.stack, self.frame = None, [], frame
        frame.f_trace = self._local
        sys.settrace(self._global)
        self.last = time.perf_counter()

    def stop(self) -> None:
        now = time.perf_counter()
        sys.settrace(None)
        if self.frame is not None:
            self.frame.f_trace = None
            self.frame = None
        self._charge(now)
        self.current = None

    def take(self) -> dict[tuple[str, int], float]:
        out, self.totals = self.totals, {}
        return out

    def _charge(self, now: float) -> None:
        if self.current is not None:
            self.totals[self.current] = self.totals.get(self.current, 0.0) + now - self.last

    def _global(self, frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code.co_filename not in self.files:
            return None
        self._charge(time.perf_counter())
        self.stack.append(self.current)
        self.last = time.perf_counter()
        return self._local

    def _local(self, frame: FrameType, event: str, arg: object) -> Any:
        self._charge(time.perf_counter())
        if event == "line":
            self.current = (frame.f_code.co_filename, frame.f_lineno)
        elif event == "return":
            self.current = self.stack.pop() if self.stack else None
        self.last = time.perf_counter()
        return self._local


class PairedPoll:
    """The probe's should_stop(): closes the probe step that just ended, runs one bare step, reopens.

    Timed steps alternate: even ones are kept with their per-method times, odd ones are line-traced.
    """

    def __init__(self, bare: BareStepper, timer: MethodTimer, tracer: LineTimer, warmup: int, steps: int) -> None:
        self.bare, self.timer, self.tracer = bare, timer, tracer
        self.warmup, self.steps = warmup, steps
        self.step = 0  # the probe step about to start
        self.exit = 0.0
        self.bare_row: dict[str, float] = {}
        self.tracing = False
        self.rows: list[tuple[float, dict[str, float], dict[str, float]]] = []  # (probe s, bare parts, methods)
        self.line_rows: list[dict[tuple[str, int], float]] = []  # one per traced step

    def __call__(self) -> bool:
        now = time.perf_counter()
        if self.tracing:
            self.tracer.stop()
            self.tracing = False
            self.line_rows.append(self.tracer.take())
        methods = self.timer.take()
        ended = self.step - 1
        if ended >= self.warmup and (ended - self.warmup) % 2 == 0:
            self.rows.append((now - self.exit, self.bare_row, methods))
        if self.step < self.warmup + self.steps:
            self.bare_row = self.bare.step(self.step)
            if self.step >= self.warmup and (self.step - self.warmup) % 2 == 1:
                self.tracer.start(sys._getframe(1))
                self.tracing = True
        self.step += 1
        self.exit = time.perf_counter()
        return False


def profile_probe(net: Net, data: Data, warmup: int, steps: int, reps: int) -> dict[str, Any]:
    """Where (b)'s extra time over (a) goes, measured on the real run_probe (CPU).

    Each probe step is paired with a bare step run inside the probe's should_stop() poll just before
    it, so both see the same machine load. Timed steps alternate: even ones give per-method totals
    (Recorder patched in run_probe's module with a subclass timing every method), odd ones are
    line-traced over probe.py and recorder.py.
    """
    timer = MethodTimer()
    tracer = LineTimer({str(probe_module.__file__), str(recorder_module.__file__)})
    rows: list[tuple[float, dict[str, float], dict[str, float]]] = []
    line_rows: list[dict[tuple[str, int], float]] = []
    for _ in range(reps):
        gc.collect()
        poll = PairedPoll(BareStepper(net, data, CPU, warmup + steps), timer, tracer, warmup, steps)
        spec = make_spec(net, warmup + steps + 1, CPU)
        with mock.patch.object(probe_module, "Recorder", timed_recorder_class(timer)):
            report = run_probe(spec, data=data, eval_samples=PROBE_EVAL_SAMPLES, should_stop=poll)
        if report.timing.steps_run != spec.steps:
            raise RuntimeError("the profiled probe stopped early")
        rows += poll.rows
        line_rows += poll.line_rows
    if timer.instances == 0:
        raise RuntimeError("run_probe no longer builds service.engine.probe.Recorder: update the profile's patch")

    bare_total = [sum(row[1].values()) for row in rows]
    gap = _median([1000 * (row[0] - b) for row, b in zip(rows, bare_total, strict=True)])
    names = sorted({name for row in rows for name in row[2]})
    methods = {name: round(1000 * _median([row[2].get(name, 0.0) for row in rows]), 4) for name in names}
    lines: list[dict[str, Any]] = []
    for filename, line in {key for row in line_rows for key in row}:
        ms = 1000 * _median([row.get((filename, line), 0.0) for row in line_rows])
        code = linecache.getline(filename, line).strip()
        lines.append({"where": f"{Path(filename).name}:{line}", "code": code, "ms": round(ms, 4)})
    lines.sort(key=lambda row: -row["ms"])
    return {
        "net": net.label,
        "warmup_steps": warmup,
        "timed_steps_per_rep": steps,
        "reps": reps,
        "method": "real run_probe (record_every=1), each step paired with a bare loop-(a) step run inside "
        "its should_stop() poll; even timed steps: every Recorder method timed by a patched-in subclass "
        "(medians over steps); odd timed steps: line-traced over probe.py and recorder.py (medians over "
        "steps; tracing adds a little to Python-heavy lines such as the forward pass)",
        "bare_step_ms": round(_median([1000 * b for b in bare_total]), 4),
        "probe_step_ms": round(_median([1000 * row[0] for row in rows]), 4),
        "gap_ms": round(gap, 4),
        "bare_parts_ms": {k: round(1000 * _median([row[1][k] for row in rows]), 4) for k in rows[0][1]},
        "recorder_methods_ms": methods,
        "rest_of_gap_ms": round(gap - sum(methods.values()), 4),
        "traced_steps": len(line_rows),
        "lines_ms_per_step": lines,
    }


# --------------------------------------------------------------------------------------------
# Machine description and output


def _cpu_times() -> dict[str, int]:
    """Whole-machine CPU time in clock ticks (/proc/stat): user+nice, system, idle, iowait, steal."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, _irq, _softirq, steal = fields
    return {"user": user + nice, "system": system, "idle": idle, "iowait": iowait, "steal": steal}


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_info(threads: int) -> dict[str, Any]:
    cpuinfo: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break
                cpuinfo.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu_model": cpuinfo.get("model name", platform.processor() or "unknown"),
        "cpu_family_model": f"{cpuinfo.get('cpu family', '?')}/{cpuinfo.get('model', '?')}",
        "cpu_mhz": cpuinfo.get("cpu MHz"),
        "cpu_cache": cpuinfo.get("cache size"),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": _loadavg(),
        "git": commit,
    }


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _ratio(t: dict[str, Any], key: str) -> float:
    r = t[key]
    return float(r["median_per_step"] if t["protocol"] == "lockstep" else r["of_medians"])


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    busy = result["machine_cpu_share"]
    lines = [
        "### Engine benchmark",
        "",
        f"{m['cpu_model']} (family/model {m['cpu_family_model']}), {m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}, Python {m['python']}, {m['date_utc']}. "
        f"Load average (1/5/15 min) at start {' / '.join(map(str, m['loadavg_at_start']))}, at end "
        f"{' / '.join(map(str, result['loadavg_at_end']))}; during the run other processes used "
        f"{busy['others_pct']:.0f}% of the machine's CPU time (hypervisor steal {busy['steal_pct']:.0f}%). "
        f"Batch {BATCH_SIZE}, SGD lr {LR}, CIFAR-10 "
        f"(real images). Bench wall time {result['bench_wall_s']:.0f} s.",
        "",
        "| device | network | protocol | (a) bare loop | (b) probe, record_every=1 | (c) seed-style loop "
        f"| (b)/(a) (target ≤ {TARGET_B_OVER_A}) | (b)/(a) every step, MLP (target ≤ {TARGET_EVERY_STEP_MLP}) "
        "| (c)/(b) (target ≥ 1.8, MLP CPU) | 1-min load: median (min–max) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in result["timings"]:
        arms = t["arms"]
        ba, cb = _ratio(t, "b_over_a"), _ratio(t, "c_over_b")
        cb_judged = t["net"].startswith("MLP") and t["device"] == "cpu"
        ba_mark, cb_mark = _mark(ba <= TARGET_B_OVER_A), _mark(cb >= TARGET_C_OVER_B_MLP) if cb_judged else ""
        every_mark = ""
        ba_cell = f"{ba:.2f}"
        if t["protocol"] == "lockstep":
            protocol = f"lockstep, {t['reps']} × ({t['warmup_steps']} + {t['timed_steps']}) steps"
            cells = [f"{arms[a]['ms']:.1f} ms" for a in ARMS]
            r = t["b_over_a"]
            ba_cell = (
                f"{ba:.2f} (steps' IQR {r['per_step_q1']:.2f}–{r['per_step_q3']:.2f}; "
                f"repetitions' IQR {r['per_rep_q1']:.2f}–{r['per_rep_q3']:.2f})"
            )
            if t["net"].startswith("MLP"):
                # Met where three repetitions in four meet it; a median alone on the right side is not shown.
                every_mark = (
                    "met"
                    if r["per_rep_q3"] <= TARGET_EVERY_STEP_MLP
                    else "**not shown** (upper quartile above)"
                    if ba <= TARGET_EVERY_STEP_MLP
                    else "**missed**"
                )
        else:
            protocol = f"blocks, {t['reps']} × ({t['warmup_steps']} + {t['timed_steps']}) steps"
            spread = max(max(arms[a]["reps_ms"]) / min(arms[a]["reps_ms"]) for a in ARMS)
            if spread > UNSTABLE_SPREAD:
                protocol += f" ⚠ unstable (repetitions differ {spread:.1f}×)"
                # A disturbed row can neither meet nor miss a target.
                ba_mark = "(not judged)"
                cb_mark = ba_mark if cb_judged else ""
            cells = [
                f"{arms[a]['ms']:.1f} ms ({min(arms[a]['reps_ms']):.1f}–{max(arms[a]['reps_ms']):.1f})" for a in ARMS
            ]
        loads = t["loadavg_1min_at_rep_start"]
        lines.append(
            f"| {t['device']} | {t['net']} | {protocol} | "
            + " | ".join(cells)
            + f" | {ba_cell} {ba_mark} | {every_mark} | {cb:.2f} {cb_mark}".rstrip()
            + f" | {_median(loads):.2f} ({min(loads):.2f}–{max(loads):.2f}) |"
        )
    lines += [
        "",
        "Time per step after the warm-up steps. *lockstep*: every probe step runs after one step each of (a), "
        "(f) and (c) (their order rotating), all under the same momentary load; medians over all timed steps, "
        "ratios are medians of per-step ratios, with the interquartile range of the per-step ratios and of the "
        "repetitions' medians (the run-to-run spread); the every-step target is met when the repetitions' upper "
        "quartile meets it. (f), the floor, is the bare loop plus one `torch._foreach_norm` "
        "read of every gradient and every weight: the least any exact per-layer record needs. *blocks*: "
        "a → b → c, one window each per repetition; median over repetitions of each "
        "window's mean (fastest–slowest repetition in parentheses); a block row marked unstable was disturbed by "
        "other processes and only its lockstep row should be read. (b) is the whole probe loop body, from one "
        "`should_stop()` poll to the next; set-up, evaluation and report assembly are excluded.",
        "",
    ]
    for t in result["timings"]:
        if t["protocol"] == "lockstep":
            reps = t["per_rep"]
            lines.append(
                f"- lockstep {t['net']}: **floor (f) {t['arms']['f_floor']['ms']:.1f} ms, (f)/(a) = "
                f"{t['f_over_a']['median_per_step']:.2f}, (c)/(f) = {t['c_over_f']['median_per_step']:.2f}** — "
                "reading every gradient and weight once per step, and nothing else, already costs this much over "
                "the bare loop, and (c)/(f) is the most (c)/(b) could be; per-repetition (b)/(a) "
                f"{', '.join(str(r['b_over_a']) for r in reps)}, "
                f"(f)/(a) {', '.join(str(r['f_over_a']) for r in reps)}, "
                f"(c)/(b) {', '.join(str(r['c_over_b']) for r in reps)}; (a) and (b) end at the same loss "
                f"(|Δ| = {t['a_b_final_loss_abs_diff']:.1e}); 1-min load average at each repetition's "
                f"start {', '.join(map(str, t['loadavg_1min_at_rep_start']))}."
            )
            continue
        arms = t["arms"]
        a_batch, c_batch = arms["a_bare"]["batch_ms"], arms["c_seed"]["batch_ms"]
        batch = (
            f"; a batch takes {a_batch:.2f} ms in (a)/(b) (`make_source(...).batch`) and {c_batch:.2f} ms in (c) "
            "(DataLoader + PIL + ToTensor + Normalize)"
            if a_batch is not None and c_batch is not None
            else ""
        )
        lines.append(
            f"- blocks {t['device']} {t['net']}: per-repetition (b)/(a) "
            f"{', '.join(f'{r:.2f}' for r in t['b_over_a']['reps_paired'])}, (c)/(b) "
            f"{', '.join(f'{r:.2f}' for r in t['c_over_b']['reps_paired'])}{batch}; (a) and (b) end at the same "
            f"loss (|Δ| = {t['a_b_final_loss_abs_diff']:.1e}), i.e. they trained identically; 1-min load average at "
            f"each repetition's start {', '.join(map(str, t['loadavg_1min_at_rep_start']))}."
        )
    mem = result.get("memory")
    if mem:
        run = mem["run"]
        lines += [
            "",
            f"**Peak memory**, {mem['spec']}, fresh subprocess, VmHWM: **{mem['peak_rss_mib']:.0f} MiB** (target "
            f"< {mem['target_mib']:.0f} MiB: {_mark(mem['meets_target'])}). Of that, `import torch` is "
            f"{run['after_import_torch']['VmRSS']:.0f} MiB, graddiag's engine "
            f"{run['after_import']['VmRSS'] - run['after_import_torch']['VmRSS']:.0f} MiB more, constructing the "
            f"first torch.optim optimizer {run['after_optim']['VmRSS'] - run['after_import']['VmRSS']:.0f} MiB more "
            f"(it lazily imports {run['optim_lazy_modules']} modules: torch._dynamo, sympy, triton, "
            f"torch.distributed, ...; run_probe does this anyway, the child only does it first to show it), "
            f"CIFAR-10 from the cache {run['after_data']['VmRSS'] - run['after_optim']['VmRSS']:.0f} MiB more "
            f"({run['after_data']['VmRSS']:.0f} MiB before the probe starts); the probe's own share is "
            f"{mem['probe_share_mib']:.0f} MiB, of which {mem['one_step_probe_share_mib']:.0f} MiB is already there "
            f"after a 1-step probe of the same network (network, first-use allocations, evaluation), so "
            f"{mem['probe_share_mib'] - mem['one_step_probe_share_mib']:.0f} MiB comes with the other "
            f"{mem['steps'] - 1} steps. The probe "
            f"ran {run['probe_step_ms']:.1f} ms/step here (whole call / steps, evaluation included).",
        ]
        after = run["after_probe"]
        if "RssAnon" in after:
            # Since the cache is memory-mapped, CIFAR-10's pages count in RSS as the probe reads them, as
            # file-backed pages every worker shares (and the kernel may evict), not as private memory.
            lines[-1] += (
                f" VmHWM counts file-backed pages too: after the probe {after['RssFile']:.0f} MiB of the RSS are "
                f"file-backed (torch's libraries and the memory-mapped CIFAR-10 cache, "
                f"{after['RssFile'] - run['after_data']['RssFile']:.0f} MiB of it mapped during the probe, shared "
                f"by every worker) and {after['RssAnon']:.0f} MiB private (anonymous)."
            )
    for p in result.get("profiles", []):
        gap = p["gap_ms"] or float("nan")
        lines += [
            "",
            f"**Where (b)'s extra time over (a) goes — {p['net']}, CPU.** Real `run_probe`, each step paired with a "
            f"bare step run in its `should_stop()` poll ({p['reps']} × {p['timed_steps_per_rep']} steps after "
            f"{p['warmup_steps']} warm-up; half timed per method, half line-traced): bare step "
            f"{p['bare_step_ms']:.2f} ms, probe step {p['probe_step_ms']:.2f} ms, paired gap **{p['gap_ms']:.2f} ms**.",
            "",
            "| Recorder method (outermost calls, median ms/step) | ms/step | share of gap |",
            "|---|---:|---:|",
        ]
        for name, ms in sorted(p["recorder_methods_ms"].items(), key=lambda item: -item[1]):
            lines.append(f"| `{name}` | {ms:.3f} | {100 * ms / gap:.0f}% |")
        rest = p["rest_of_gap_ms"]
        lines += [
            f"| rest: probe-loop bookkeeping, host copy, hook dispatch in forward/backward, noise | {rest:.3f} "
            f"| {100 * rest / gap:.0f}% |",
            "",
            "| line (line-traced steps, median ms/step; top 20 — for comparison, bare step: "
            + ", ".join(f"{k} {v:.2f}" for k, v in p["bare_parts_ms"].items())
            + ") | ms/step |",
            "|---|---:|",
        ]
        for row in p["lines_ms_per_step"][:20]:
            code = row["code"].replace("|", "\\|")
            lines.append(f"| {row['where']} `{code[:100]}` | {row['ms']:.3f} |")
    if result.get("cuda_note"):
        lines += ["", result["cuda_note"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("GRADDIAG_DATA_DIR"), help="CIFAR-10 directory")
    default_cache = os.environ.get("GRADDIAG_CACHE_DIR") or str(Path.home() / ".cache" / "graddiag")
    parser.add_argument("--cache-dir", default=default_cache, help="decoded-data cache (default %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--nets", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--protocols", default="lockstep,blocks", help="comma-separated: lockstep, blocks")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the block protocol")
    parser.add_argument("--lockstep-reps", type=int, default=7, help="repetitions of the lockstep protocol")
    parser.add_argument("--warmup", type=int, default=30, help="MLP warm-up steps per arm and repetition")
    parser.add_argument("--steps", type=int, default=100, help="MLP timed steps per arm and repetition")
    parser.add_argument("--cnn-warmup", type=int, default=8, help="CNN warm-up steps")
    parser.add_argument("--cnn-steps", type=int, default=24, help="CNN timed steps")
    parser.add_argument("--memory-depth", type=int, default=50)
    parser.add_argument("--memory-steps", type=int, default=500)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-profile", action="store_true", help="skip the recorder profile")
    parser.add_argument("--profile-reps", type=int, default=2)
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA pass even where CUDA exists")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where engine.json/engine.md go")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not args.data_dir:
        parser.error("no CIFAR-10 directory: set GRADDIAG_DATA_DIR or pass --data-dir")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    cpu_before, own_before = _cpu_times(), _own_cpu_s()
    torch.set_num_threads(args.threads)
    machine = machine_info(torch.get_num_threads())
    print(
        f"engine bench: {machine['cpu_model']}, {machine['torch_threads']} threads, load {machine['loadavg_at_start']}"
    )
    data = load_cifar10(args.data_dir, args.cache_dir)  # decodes once and writes the cache if missing
    seed_set = make_seed_dataset(data[0])
    nets = [n for n in NETS if n.key in args.nets.split(",")]
    protocols = args.protocols.split(",")
    cuda = torch.cuda.is_available() and not args.no_cuda
    result: dict[str, Any] = {
        "machine": machine,
        "method": {
            "a_bare": "build_network + SGD(lr 0.01) on make_source(spec).batch(step); no recording; per step: "
            "batch, forward, loss, zero_grad(set_to_none=False), backward, step",
            "b_probe": "run_probe(record_every=1, eval_samples=500); a step is timed from one should_stop() poll "
            "to the next, i.e. the whole loop body (batch, forward with hooks, backward, param norms, zero counts, "
            "totals + finiteness check, optimizer step, update norm from SGD, layer_stats + .cpu().tolist()); "
            "data set-up, network build, evaluation and report assembly excluded (see report_timing)",
            "c_seed": "Dataset over uint8 HWC arrays: PIL.Image.fromarray → ToTensor → Normalize per sample; "
            "DataLoader(batch 128, shuffle, num_workers 0); zero_grad(); per-parameter p.grad.norm().item() and "
            "loss.item() each step",
            "lockstep": "(a) and (c) each take one step inside every should_stop() poll of the probe (order "
            "alternating), so the three arms' steps interleave; medians over timed steps, ratios per step",
            "blocks": "per repetition a → b → c, each a fresh network run for warm-up + timed steps; time per step "
            "= timed window wall time / timed steps; median over repetitions",
        },
        "timings": [],
        "cuda_note": (
            "CUDA rows (block protocol): each timed window is bounded by torch.cuda.synchronize() at both ends "
            "only. The probe must not synchronise per layer: cuda_syncs_per_step in engine.json counts "
            "synchronising calls per step (torch.cuda.set_sync_debug_mode, set-up and evaluation included). "
            "This path had not been run on a GPU when it was written."
            if cuda
            else None
        ),
    }
    for net in nets:
        warmup, steps = (args.warmup, args.steps) if net.arch == "mlp" else (args.cnn_warmup, args.cnn_steps)
        if "lockstep" in protocols:
            result["timings"].append(lockstep_protocol(net, data, seed_set, warmup, steps, args.lockstep_reps))
        if "blocks" in protocols:
            result["timings"].append(block_protocol(net, data, seed_set, CPU, warmup, steps, args.reps))
    if cuda:
        for net in nets:
            warmup, steps = (args.warmup, args.steps) if net.arch == "mlp" else (args.cnn_warmup, args.cnn_steps)
            timing = block_protocol(net, data, seed_set, torch.device("cuda"), warmup, steps, args.reps)
            timing["cuda_syncs_per_step"] = cuda_sync_counts(net, data, seed_set)
            result["timings"].append(timing)
    if not args.no_memory:
        print("  peak-memory subprocesses ...", flush=True)
        result["memory"] = measure_memory(args)
        print(f"  peak RSS {result['memory']['peak_rss_mib']} MiB", flush=True)
    if not args.no_profile:
        result["profiles"] = []
        for net in nets:
            warmup, steps = (20, 80) if net.arch == "mlp" else (4, 12)
            print(f"  profiling the recorder on {net.key} ...", flush=True)
            result["profiles"].append(profile_probe(net, data, warmup, steps, args.profile_reps))

    cpu_after, own_after = _cpu_times(), _own_cpu_s()
    delta = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
    ticks = max(sum(delta.values()), 1)
    own_ticks = (own_after - own_before) * os.sysconf("SC_CLK_TCK")
    busy = delta["user"] + delta["system"]
    result["machine_cpu_share"] = {
        "busy_pct": round(100 * busy / ticks, 1),
        "others_pct": round(100 * max(busy - own_ticks, 0) / ticks, 1),
        "steal_pct": round(100 * delta["steal"] / ticks, 1),
        "note": "share of the whole machine's CPU time (/proc/stat) over the bench: busy = user + system, "
        "others = busy minus this process and its subprocesses, steal = taken by the hypervisor",
    }
    result["loadavg_at_end"] = _loadavg()
    result["bench_wall_s"] = round(time.perf_counter() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "engine.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render_markdown(result)
    (args.out_dir / "engine.md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out_dir / 'engine.json'} and engine.md in {result['bench_wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
