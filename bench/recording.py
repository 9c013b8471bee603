"""What recording costs on whole runs: `run_probe` at the default record_every=10 and at every step,
against a bare PyTorch loop over the same batches.

Networks: MLP depth 20 width 256 and CNN depth 8 width 32; batch 128, SGD lr 0.01, CIFAR-10; the
spec's default 100 steps for the MLP (``--steps``), 30 for the CNN (``--cnn-steps``: a CNN step takes
~0.2 s here). Three arms, each a whole run of every step:

(a) bare: ``build_network`` + the probe's own optimizer over ``make_source(spec).batch(step)`` for
    every step (forward, loss, zero_grad, backward, step), nothing recorded; timed from before the
    first batch to after the last step.
(d) probe, default: ``run_probe`` with ``record_every=10`` (steps 0, 10, ..., 90 and the last are
    recorded); its training loop (``probe._train``, timed by a wrapper: wall and CPU seconds), i.e.
    every step with every record, hook and host copy in it.
(e) probe, every step: the same with ``record_every=1``.

The three train the same network from the same initial weights on the same batches (their last
losses are compared). Arms are interleaved: each repetition runs all three, in an order that rotates
from one repetition to the next, so every arm sees the same spells of load on a shared machine;
ratios are paired within a repetition, and the median and the interquartile range (IQR) of the
per-repetition ratios are reported, of wall time and of CPU time, with the 1-minute load average at
each repetition's start beside them. A target counts as met only when the upper quartile of the
wall-time ratios meets it; a median that meets it with the upper quartile above is "not shown". The
whole ``run_probe`` call (set-up, held-out evaluation of ``--eval-samples`` images, theory and verdict
included) against the bare loop plus its set-up is reported too.

Step-paired (``--paired-reps``, default 5): the same whole runs of (d) and (e), each with a step of (a)
run inside the probe's ``should_stop()`` poll just before every probe step, so both arms take turns
step by step under the same momentary load; a repetition's ratio is the probe's summed loop-body time
over the bare steps' (wall and CPU). Load that changes from second to second, which moves whole-run
ratios by several percent on a shared machine, falls on both arms alike here.

torch threads: ``--threads`` (default 1, as each graddiag worker runs on a CPU machine: one
single-threaded worker per core).

    python -m bench.recording [--reps 11] [--steps 100] [--cnn-reps 9] [--cnn-steps 30] [--paired-reps 5]
        [--threads 1] [--only mlp,cnn]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from graddiag.models.networks import build_network
from graddiag.models.spec import Spec
from graddiag.service.engine import probe as probe_module
from graddiag.service.engine.data import ImageSet, load_cifar10, make_source
from graddiag.service.engine.probe import make_optimizer, run_probe

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10"
CPU = torch.device("cpu")
TARGET_DEFAULT = 1.03
TARGET_EVERY_STEP_MLP = 1.20
NETS = {"mlp": ("MLP depth 20, width 256", "mlp", 20, 256), "cnn": ("CNN depth 8, width 32", "cnn", 8, 32)}
ARMS = ("a_bare", "d_default", "e_every_step")

Data = tuple[ImageSet, ImageSet]


def make_spec(key: str, steps: int, record_every: int) -> Spec:
    _, arch, depth, width = NETS[key]
    return Spec(
        arch=arch,
        depth=depth,
        width=width,
        batch_size=128,
        steps=steps,
        record_every=record_every,
        optimizer="sgd",
        lr=0.01,
        device="cpu",
        dataset="cifar10",
        seed=0,
    )


def _clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): with one torch thread the CPU time is the work done,
    which other processes' load on a shared machine disturbs far less than the wall time."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


class BareLoop:
    """Arm (a): the loop a user would write, over the probe's batches, one step per call."""

    def __init__(self, spec: Spec, data: Data) -> None:
        self.model = build_network(spec).to(CPU)
        self.model.train()
        self.optimizer = make_optimizer(spec, list(self.model.parameters()))
        self.source = make_source(spec, data=data, device=CPU, eval_samples=1)

    def step(self, step: int) -> torch.Tensor:
        inputs, labels = self.source.batch(step)
        loss = F.cross_entropy(self.model(inputs), labels)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.optimizer.step()
        return loss


def run_bare(spec: Spec, data: Data) -> dict[str, float]:
    """Arm (a) as a whole run; seconds of the loop and with set-up."""
    started = _clock()
    bare = BareLoop(spec, data)
    loop_started = _clock()
    loss = torch.tensor(float("nan"))
    for step in range(spec.steps):
        loss = bare.step(step)
    (train_s, train_cpu), (total_s, total_cpu) = _since(loop_started), _since(started)
    return {"train_s": train_s, "train_cpu_s": train_cpu, "total_s": total_s, "total_cpu_s": total_cpu,
            "last_loss": float(loss.detach())}  # fmt: skip


def run_probe_arm(spec: Spec, data: Data, eval_samples: int) -> dict[str, float]:
    """Arms (d) and (e): one whole run_probe call; its training loop's seconds (wall and CPU) and the call's."""
    loop: dict[str, float] = {}
    train = probe_module._train

    def timed_train(*args: Any, **kwargs: Any) -> None:
        started = _clock()
        try:
            train(*args, **kwargs)
        finally:
            loop["train_s"], loop["train_cpu_s"] = _since(started)

    started = _clock()
    with mock.patch.object(probe_module, "_train", timed_train):
        report = run_probe(spec, data=data, eval_samples=eval_samples)
    total_s, total_cpu = _since(started)
    if report.timing.steps_run != spec.steps:
        raise RuntimeError(f"the probe stopped early at step {report.timing.steps_run}")
    last = report.steps[-1].loss
    return {
        **loop,
        "total_s": total_s,
        "total_cpu_s": total_cpu,
        "last_loss": float("nan") if last is None else last,
        "records": len({r.step for r in report.records}),
    }


def run_paired(spec: Spec, data: Data, eval_samples: int) -> dict[str, float]:
    """A whole run_probe with one (a) step in each should_stop() poll; summed seconds of both, wall and CPU.

    The probe's step is its loop body, from the poll's return to the next poll (the last one closed when
    its training loop returns); the (a) step runs in the poll, just before the probe's step of the same index.
    """
    bare = BareLoop(spec, data)
    sums = {"a_s": 0.0, "a_cpu_s": 0.0, "probe_s": 0.0, "probe_cpu_s": 0.0}
    opened: list[tuple[float, float]] = []
    bare_steps = 0

    def close() -> None:
        if opened:
            wall, cpu = _since(opened.pop())
            sums["probe_s"] += wall
            sums["probe_cpu_s"] += cpu

    def poll() -> bool:
        nonlocal bare_steps
        close()
        started = _clock()
        bare.step(bare_steps)
        bare_steps += 1
        wall, cpu = _since(started)
        sums["a_s"] += wall
        sums["a_cpu_s"] += cpu
        opened.append(_clock())
        return False

    train = probe_module._train

    def timed_train(*args: Any, **kwargs: Any) -> None:
        try:
            train(*args, **kwargs)
        finally:
            close()

    with mock.patch.object(probe_module, "_train", timed_train):
        report = run_probe(spec, data=data, eval_samples=eval_samples, should_stop=poll)
    if report.timing.steps_run != spec.steps or bare_steps != spec.steps:
        raise RuntimeError(f"the paired probe stopped early at step {report.timing.steps_run}")
    return sums


def _spread(values: list[float]) -> dict[str, float]:
    q1, median, q3 = _quartiles(values)
    return {"median": round(median, 3), "q1": round(q1, 3), "q3": round(q3, 3)}


def measure_paired(key: str, data: Data, steps: int, reps: int, eval_samples: int) -> dict[str, Any]:
    """The step-paired protocol for (d) and (e), `reps` repetitions each, their order alternating."""
    arms = ("d_default", "e_every_step")
    specs = {"d_default": make_spec(key, steps, 10), "e_every_step": make_spec(key, steps, 1)}
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    loads = []
    for rep in range(reps):
        loads.append(round(os.getloadavg()[0], 2))
        for arm in arms if rep % 2 == 0 else arms[::-1]:
            gc.collect()
            runs[arm].append(run_paired(specs[arm], data, eval_samples))
        print(
            f"  {key} paired rep {rep + 1}/{reps}: "
            + ", ".join(f"{arm} {r[-1]['probe_s'] / r[-1]['a_s']:.3f}" for arm, r in runs.items()),
            flush=True,
        )
    out: dict[str, Any] = {
        "reps": reps,
        "steps": steps,
        "loadavg_1min_at_rep_start": loads,
        "loadavg_1min": {"median": round(statistics.median(loads), 2), "min": min(loads), "max": max(loads)},
        "ms_per_step": {
            "a_bare": round(1000 * statistics.median(r["a_s"] for arm in arms for r in runs[arm]) / steps, 3),
            **{arm: round(1000 * statistics.median(r["probe_s"] for r in runs[arm]) / steps, 3) for arm in arms},
        },
    }
    for arm in arms:
        wall = [round(r["probe_s"] / r["a_s"], 4) for r in runs[arm]]
        cpu = [round(r["probe_cpu_s"] / r["a_cpu_s"], 4) for r in runs[arm]]
        out[f"{arm}_over_a"] = {"wall": _spread(wall), "wall_per_rep": wall, "cpu": _spread(cpu), "cpu_per_rep": cpu}
    return out


def measure(key: str, data: Data, steps: int, reps: int, eval_samples: int) -> dict[str, Any]:
    specs = {
        "a_bare": make_spec(key, steps, 10),
        "d_default": make_spec(key, steps, 10),
        "e_every_step": make_spec(key, steps, 1),
    }

    def run(arm: str, spec: Spec) -> dict[str, float]:
        gc.collect()
        return run_bare(spec, data) if arm == "a_bare" else run_probe_arm(spec, data, eval_samples)

    # Untimed warm-up of each arm (first-call allocations, lazy imports), on a few steps.
    for arm in ARMS:
        run(arm, specs[arm].model_copy(update={"steps": min(steps, 12)}))
    rows: list[dict[str, dict[str, float]]] = []
    loads = []
    for rep in range(reps):
        loads.append(round(os.getloadavg()[0], 2))
        order = ARMS[rep % 3 :] + ARMS[: rep % 3]
        row = {arm: run(arm, specs[arm]) for arm in order}
        rows.append(row)
        print(
            f"  {key} rep {rep + 1}/{reps} ({' → '.join(order)}): "
            + ", ".join(f"{arm} {1000 * row[arm]['train_s'] / steps:.2f} ms/step" for arm in ARMS),
            flush=True,
        )

    def ratios(arm: str, field: str) -> list[float]:
        return [round(r[arm][field] / r["a_bare"][field], 4) for r in rows]

    def ms(arm: str, field: str = "train_s") -> float:
        return round(1000 * statistics.median(r[arm][field] for r in rows) / steps, 3)

    out: dict[str, Any] = {
        "net": NETS[key][0],
        "steps": steps,
        "reps": reps,
        "loadavg_1min_at_rep_start": loads,
        "loadavg_1min": {"median": round(statistics.median(loads), 2), "min": min(loads), "max": max(loads)},
        "ms_per_step": {arm: ms(arm) for arm in ARMS},
        "cpu_ms_per_step": {arm: ms(arm, "train_cpu_s") for arm in ARMS},
        "recorded_steps": {"d_default": rows[0]["d_default"]["records"], "e_every_step": steps},
        "last_loss": {arm: rows[0][arm]["last_loss"] for arm in ARMS},
    }
    for arm in ("d_default", "e_every_step"):
        train, total = ratios(arm, "train_s"), ratios(arm, "total_s")
        cpu = ratios(arm, "train_cpu_s")
        out[f"{arm}_over_a"] = {
            "train": _spread(train),
            "train_per_rep": train,
            "train_cpu": _spread(cpu),
            "train_cpu_per_rep": cpu,
            "whole_call": _spread(total),
            "whole_call_per_rep": total,
        }
    return out


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """(lower quartile, median, upper quartile) of `values`, the quartiles interpolated between them."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _mark(ratio: dict[str, float], target: float) -> str:
    """Met only where three repetitions in four meet it; a median alone on the right side is not shown."""
    if ratio["q3"] <= target:
        return "met"
    return "**not shown** (upper quartile above)" if ratio["median"] <= target else "**missed**"


def _cell(ratio: dict[str, float]) -> str:
    return f"{ratio['median']:.3f} [{ratio['q1']:.3f}–{ratio['q3']:.3f}]"


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "### Recording cost on whole runs",
        "",
        f"{result['machine']}, torch {result['torch']}, {result['threads']} torch thread(s), {result['date']}. "
        f"Load average (1 min) at start {result['loadavg_at_start'][0]}, at end {result['loadavg_at_end'][0]}. "
        f"Batch 128, SGD lr 0.01, CIFAR-10. Command: `{result['command']}`.",
        "",
        "| network | reps × steps | (a) bare loop | (d) probe, record_every=10 | (e) probe, every step "
        f"| (d)/(a) wall (target ≤ {TARGET_DEFAULT}) | (d)/(a) CPU "
        f"| (e)/(a) wall (target ≤ {TARGET_EVERY_STEP_MLP}, MLP) | (e)/(a) CPU | 1-min load: median (min–max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["nets"]:
        d, e = row["d_default_over_a"], row["e_every_step_over_a"]
        e_mark = _mark(e["train"], TARGET_EVERY_STEP_MLP) if row["net"].startswith("MLP") else ""
        ms, load = row["ms_per_step"], row["loadavg_1min"]
        lines.append(
            f"| {row['net']} | {row['reps']} × {row['steps']} | {ms['a_bare']} ms | {ms['d_default']} ms "
            f"| {ms['e_every_step']} ms | {_cell(d['train'])} {_mark(d['train'], TARGET_DEFAULT)} "
            f"| {_cell(d['train_cpu'])} | {_cell(e['train'])} {e_mark} | {_cell(e['train_cpu'])} "
            f"| {load['median']} ({load['min']}–{load['max']}) |"
        )
    paired = [row for row in result["nets"] if "paired" in row]
    if paired:
        lines += [
            "",
            "**Step-paired** (the same whole runs, a bare step before every probe step, in the probe's "
            "`should_stop()` poll):",
            "",
            "| network | reps × steps | (a) bare step | (d) probe, record_every=10 | (e) probe, every step "
            f"| (d)/(a) wall (target ≤ {TARGET_DEFAULT}) | (d)/(a) CPU "
            f"| (e)/(a) wall (target ≤ {TARGET_EVERY_STEP_MLP}, MLP) | (e)/(a) CPU | 1-min load: median (min–max) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in paired:
            p = row["paired"]
            d, e, ms, load = p["d_default_over_a"], p["e_every_step_over_a"], p["ms_per_step"], p["loadavg_1min"]
            e_mark = _mark(e["wall"], TARGET_EVERY_STEP_MLP) if row["net"].startswith("MLP") else ""
            lines.append(
                f"| {row['net']} | {p['reps']} × {p['steps']} | {ms['a_bare']} ms | {ms['d_default']} ms "
                f"| {ms['e_every_step']} ms | {_cell(d['wall'])} {_mark(d['wall'], TARGET_DEFAULT)} "
                f"| {_cell(d['cpu'])} | {_cell(e['wall'])} {e_mark} | {_cell(e['cpu'])} "
                f"| {load['median']} ({load['min']}–{load['max']}) |"
            )
    lines += [
        "",
        "Milliseconds per step (wall) are whole training loops over every step, recorded steps included, "
        "medians over repetitions. Ratios are paired within a repetition: median [lower–upper quartile] over "
        "repetitions, of wall time and of the process's CPU time (with one torch thread, the work done: the "
        "least disturbed by other processes on a shared machine). The arms run interleaved, their order "
        "rotating per repetition. A target is met when the upper quartile of the wall-time ratios meets it; "
        "*not shown* when only the median does.",
        "",
    ]
    for row in result["nets"]:
        d, e = row["d_default_over_a"], row["e_every_step_over_a"]
        losses = row["last_loss"]
        lines.append(
            f"- {row['net']}, {row['reps']} × {row['steps']} steps ({row['recorded_steps']['d_default']} recorded "
            f"at the default): per repetition (d)/(a) wall {', '.join(map(str, d['train_per_rep']))}, CPU "
            f"{', '.join(map(str, d['train_cpu_per_rep']))}; (e)/(a) wall {', '.join(map(str, e['train_per_rep']))}, "
            f"CPU {', '.join(map(str, e['train_cpu_per_rep']))}. The whole `run_probe` call (set-up, evaluation "
            f"of {result['eval_samples']} held-out images, theory, verdict) over bare loop + set-up: (d) "
            f"{_cell(d['whole_call'])}, (e) {_cell(e['whole_call'])}. Last losses (a) {losses['a_bare']:.6f}, "
            f"(d) {losses['d_default']:.6f}, (e) {losses['e_every_step']:.6f}; 1-min load at each repetition's "
            f"start {', '.join(map(str, row['loadavg_1min_at_rep_start']))}."
        )
        if "paired" in row:
            p = row["paired"]
            d, e = p["d_default_over_a"], p["e_every_step_over_a"]
            lines.append(
                f"- {row['net']}, step-paired, {p['reps']} × {p['steps']} steps: per repetition (d)/(a) wall "
                f"{', '.join(map(str, d['wall_per_rep']))}, CPU {', '.join(map(str, d['cpu_per_rep']))}; (e)/(a) "
                f"wall {', '.join(map(str, e['wall_per_rep']))}, CPU {', '.join(map(str, e['cpu_per_rep']))}; "
                f"1-min load at each repetition's start {', '.join(map(str, p['loadavg_1min_at_rep_start']))}."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the whole-run recording benchmark and write bench/results/recording.{json,md}."""
    parser = argparse.ArgumentParser(prog="bench.recording", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cnn-steps", type=int, default=30, help="a CNN step takes ~0.2 s: 4 records in 30")
    parser.add_argument("--cnn-reps", type=int, default=9)
    parser.add_argument("--paired-reps", type=int, default=5, help="step-paired repetitions per network (0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--only", default="mlp,cnn", help="comma-separated networks")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("GRADDIAG_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "graddiag")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args, _ = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    data = load_cifar10(args.data_dir, args.cache_dir)
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m bench.run_all --only recording", *(sys.argv[1:] if argv is None else argv)]),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "eval_samples": args.eval_samples,
        "nets": [],
    }
    for key in args.only.split(","):
        steps, reps = (args.steps, args.reps) if key == "mlp" else (args.cnn_steps, args.cnn_reps)
        row = measure(key, data, steps, reps, args.eval_samples)
        if args.paired_reps:
            row["paired"] = measure_paired(key, data, steps, args.paired_reps, args.eval_samples)
        result["nets"].append(row)
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "recording.json").write_text(json.dumps(result, indent=1) + "\n")
    markdown = _markdown(result)
    (args.out_dir / "recording.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
