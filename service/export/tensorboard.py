"""TensorBoard export of one probe: its report as event files, and those files as a tar.gz download.

A pure layer over :class:`~service.engine.report.Report` (it imports neither the store nor the API).
One run is one TensorBoard run directory holding one event file, with these tags:

- per layer, at each recorded step: ``grad_norm/<layer>``, ``act_grad_norm/<layer>``,
  ``rel_grad/<layer>``, ``update_ratio/<layer>``, ``act_norm/<layer>`` (the forward signal) and, with a
  penalty, ``penalty_grad_norm/<layer>`` (``<layer>`` is the LayerInfo name, e.g. ``hidden2.linear``);
- per step: ``loss``, ``accuracy``, ``grad_norm_total/pre``, ``grad_norm_total/post``;
- at the last step run: ``eval/loss``, ``eval/accuracy``, and the verdict as numbers: ``verdict/label``
  (0 healthy, 1 vanishing, 2 exploding), ``verdict/decades_per_layer``, ``verdict/act_decades_per_layer``,
  ``verdict/span_decades``, ``verdict/act_span_decades``, ``verdict/rel_grad_median`` (those it has);
- text: ``verdict`` (label, reasons, findings, advice, theory, evidence) and ``spec`` (a field/value table);
- the spec as hparams (TensorBoard's HPARAMS tab; ``None`` fields are left out, see the spec text), with
  the verdict's label and slopes, the held-out and the training loss and accuracy as its metric columns;
- with ``histograms`` given: ``grad/<layer>`` weight-gradient histograms (see :class:`HistogramCollector`);
- a recurrent net's gradient through time (the report's ``time_records``), per recurrent layer:
  ``time/<layer>/<field>/first`` and ``time/<layer>/<field>/last`` with the time step t as TensorBoard's
  step, for the first and the last recorded step (``<field>``: grad_norm = ‖∂L/∂h_t‖, cell_grad_norm,
  state_rms, gate_mean, saturation_frac, those measured). The tags name no step number, so runs of
  different lengths overlay in one chart (RNN vs LSTM at init, say); the ``time`` text names the steps.
  ``time/<layer>/heatmap`` is an image at the last step: recorded steps top to bottom, t left to right,
  grey from the layer's smallest log10 ‖∂L/∂h_t‖ (black) to its largest (white), red where none was
  measured; the ``time`` text gives each layer's range in decades.

Non-finite numbers (``None`` in a report) are skipped, never written as NaN, so an exploded run's
curves simply end. Scalars are stored as float32, TensorBoard's scalar format.

Needs the ``tensorboard`` package: ``pip install 'graddiag[tensorboard]'``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import tarfile
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor

from graddiag.models.networks import Layer
from graddiag.models.spec import Spec
from graddiag.service.engine.report import Report, TimeRecord, Verdict

try:
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as _hparams_summaries
except ImportError as exc:  # torch.utils.tensorboard raises this when the tensorboard package is missing
    raise ImportError(
        "TensorBoard export needs the 'tensorboard' package: install the extra with pip install 'graddiag[tensorboard]'"
    ) from exc


# Per-layer report fields written as scalars, tag prefix = field name.
LAYER_SCALARS: Final = ("grad_norm", "act_grad_norm", "rel_grad", "update_ratio", "act_norm", "penalty_grad_norm")
# Per-step report fields and their tags.
STEP_SCALARS: Final = {
    "loss": "loss",
    "accuracy": "accuracy",
    "grad_norm_total_pre": "grad_norm_total/pre",
    "grad_norm_total_post": "grad_norm_total/post",
}
# The verdict as numbers, written at the last step: the label (LABEL_VALUES) and the evidence's key figures.
LABEL_VALUES: Final = {"healthy": 0.0, "vanishing": 1.0, "exploding": 2.0}
VERDICT_SCALARS: Final = (
    "decades_per_layer",
    "act_decades_per_layer",
    "span_decades",
    "act_span_decades",
    "rel_grad_median",
)
# Scalars the HPARAMS tab shows as metric columns beside the spec (their last values): the verdict first,
# so runs can be sorted by how steep their profile is.
HPARAM_METRICS: Final = (
    "verdict/label",
    "verdict/decades_per_layer",
    "verdict/act_decades_per_layer",
    "eval/loss",
    "eval/accuracy",
    "loss",
    "accuracy",
)

# The time records' fields written as ‖·‖-against-t curves; the heatmap draws the first of them.
TIME_SCALARS: Final = ("grad_norm", "cell_grad_norm", "state_rms", "gate_mean", "saturation_frac")
# The heatmap's cells are blocks of TIME_CELL × TIME_CELL pixels, smaller along an axis of more than
# HEATMAP_PIXELS / TIME_CELL cells (at least one pixel): a 32-step sequence is 256 px wide.
TIME_CELL: Final = 8
HEATMAP_PIXELS: Final = 256
# A larger table gets no heatmap (the curves and the text still come): its image would not be readable.
MAX_HEATMAP_CELLS: Final = 1_000_000
# A heatmap cell without a measurement (a non-finite or missing norm): red, unlike any grey.
MISSING_RGB: Final = (1.0, 0.0, 0.0)

# Every file write_events leaves in a run directory; the fixed name keeps the writer's host name and
# process id (SummaryWriter's default file name) out of downloads. TensorBoard reads any file whose
# name contains "tfevents".
EVENT_FILE: Final = "events.out.tfevents.graddiag"
_EVENT_MARK: Final = "tfevents"

# A histogram needs the values, not only their norm; a layer's gradient is thinned to this many
# (an evenly strided sample) so a wide network's histograms stay a few hundred KiB per step.
DEFAULT_MAX_VALUES: Final = 65536

# Histograms: step → layer index → gradient values.
Histograms = Mapping[int, Mapping[int, Tensor]]


class HistogramCollector:
    """Copies each layer's weight gradient to the CPU at the steps it is called, for ``grad/`` histograms.

    Meant as a probe callback: call :meth:`collect` (or the collector itself) with the step and the
    network's layers right after ``backward()`` and before gradient clipping at recorded steps, the
    point where the report's ``grad_norm`` is measured. Then pass :attr:`histograms` to
    :func:`write_events`. Each copy is float32 on the CPU and independent of the live gradient;
    a gradient larger than ``max_values`` entries is thinned to an evenly strided sample of at most
    that many (``None`` keeps every value). Layers without a gradient are left out.
    """

    def __init__(self, *, max_values: int | None = DEFAULT_MAX_VALUES) -> None:
        if max_values is not None and max_values < 1:
            raise ValueError(f"max_values must be at least 1 or None, got {max_values}")
        self.max_values = max_values
        self.histograms: dict[int, dict[int, Tensor]] = {}

    def collect(self, step: int, layers: Sequence[Layer]) -> None:
        """Copy the weight gradient of every layer at ``step`` (replacing an earlier copy of that step)."""
        copies: dict[int, Tensor] = {}
        for layer in layers:
            grad = layer.weight.grad
            if grad is None:
                continue
            values = grad.detach().reshape(-1)
            if self.max_values is not None and values.numel() > self.max_values:
                values = values[:: math.ceil(values.numel() / self.max_values)]
            copies[layer.index] = values.to(device="cpu", dtype=torch.float32, copy=True)
        self.histograms[step] = copies

    __call__ = collect


def write_events(report: Report, log_dir: Path, *, histograms: Histograms | None = None) -> Path:
    """Write the report as one TensorBoard run in ``log_dir`` and return ``log_dir``.

    ``log_dir`` is created when missing. Event files already in it (an earlier export of this run)
    are replaced, so re-exporting never doubles the curves. ``histograms`` (step → layer index →
    gradient tensor, as :class:`HistogramCollector` gathers them) adds ``grad/<layer>`` histograms;
    non-finite entries are dropped and a tensor with no finite entry is skipped.
    """
    names = {layer.index: layer.name for layer in report.layers}
    for step, per_layer in (histograms or {}).items():
        unknown = sorted(set(per_layer) - set(names))
        if unknown:
            raise ValueError(f"histograms of step {step} name layers {unknown}, which the report lacks")

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in _event_files(log_dir, recursive=False):
        old.unlink()

    last_step = max((m.step for m in report.steps), default=0)
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        if report.spec is not None:
            exp, ssi, sei = _hparams_summaries(
                _hparam_values(report.spec),
                dict.fromkeys(_hparam_metrics(report), 0.0),  # only the tags matter; the values come from the scalars
                _hparam_domains(report.spec),
            )
            for summary in (exp, ssi, sei):
                writer.file_writer.add_summary(summary)
            writer.add_text("spec", _spec_markdown(report.spec), global_step=0)
        elif report.model is not None:
            # A model graddiag did not build has no spec hyperparameters: its description instead.
            writer.add_text("model", _table(report.model.model_dump(mode="json")), global_step=0)

        for metrics in report.steps:
            for field, tag in STEP_SCALARS.items():
                _scalar(writer, tag, getattr(metrics, field), metrics.step)
        for record in report.records:
            for field in LAYER_SCALARS:
                _scalar(writer, f"{field}/{names[record.layer]}", getattr(record, field), record.step)
        _scalar(writer, "eval/loss", report.eval.loss, last_step)
        _scalar(writer, "eval/accuracy", report.eval.accuracy, last_step)
        # The verdict as numbers (0 healthy, 1 vanishing, 2 exploding), for charts and the HPARAMS tab.
        _scalar(writer, "verdict/label", LABEL_VALUES[report.verdict.label], last_step)
        for field in VERDICT_SCALARS:
            _scalar(writer, f"verdict/{field}", getattr(report.verdict.evidence, field), last_step)

        for step, per_layer in sorted((histograms or {}).items()):
            for index, values in sorted(per_layer.items()):
                finite = values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
                finite = finite[torch.isfinite(finite)]
                if finite.numel():
                    writer.add_histogram(f"grad/{names[index]}", finite, global_step=step)

        if report.time_records:
            ranges = _write_time(writer, report, names, last_step)
            writer.add_text("time", _time_markdown(report, names, ranges), global_step=last_step)

        writer.add_text("verdict", _verdict_markdown(report), global_step=last_step)

    written = _event_files(log_dir, recursive=False)
    if len(written) != 1:
        raise RuntimeError(f"expected one event file in {log_dir}, found {len(written)}")
    written[0].replace(log_dir / EVENT_FILE)
    return log_dir


def export_run(report: Report, out_dir: Path, *, name: str | None = None, histograms: Histograms | None = None) -> Path:
    """Write the report as the run ``out_dir/<name>`` (for ``tensorboard --logdir out_dir``); return that path.

    ``name`` defaults to :func:`run_name` (the spec's shape and fingerprint), e.g. a run id for a stored run.
    It must be a single path component. Exporting the same name again replaces that run's events.
    """
    name = run_name(report) if name is None else name
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"run name must be a single path component, got {name!r}")
    return write_events(report, Path(out_dir) / name, histograms=histograms)


def run_name(report: Report) -> str:
    """A readable, stable run name: e.g. ``mlp-d10-w128-relu-3f2a9c1b`` (spec fingerprint prefix)."""
    spec = report.spec
    if spec is None:
        # A user's model: its class and a digest of its description and layers.
        assert report.model is not None
        digest = hashlib.sha256(report.model.model_dump_json().encode())
        for layer in report.layers:
            digest.update(layer.model_dump_json().encode())
        return f"{report.model.class_name.lower()}-{digest.hexdigest()[:8]}"
    return f"{spec.arch}-d{spec.depth}-w{spec.width}-{spec.activation}-{spec.fingerprint()[:8]}"


def archive(log_dir: Path, *, arcname: str | None = None) -> bytes:
    """The event files under ``log_dir`` as a gzipped tar, inside a folder ``arcname`` (default: its name).

    Unpacked into a TensorBoard log root (``tar xzf run.tar.gz -C logs``) it shows as one run of that
    name. Members carry no owner names and the gzip header no time stamp.
    Raises FileNotFoundError when ``log_dir`` holds no event file.
    """
    log_dir = Path(log_dir)
    files = _event_files(log_dir, recursive=True)
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {log_dir}")
    root = arcname if arcname is not None else log_dir.resolve().name
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped, tarfile.open(fileobj=zipped, mode="w") as tar:
        for path in files:
            info = tar.gettarinfo(str(path), arcname=str(Path(root) / path.relative_to(log_dir)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def _event_files(log_dir: Path, *, recursive: bool) -> list[Path]:
    candidates = log_dir.rglob("*") if recursive else log_dir.iterdir()
    return sorted(p for p in candidates if p.is_file() and _EVENT_MARK in p.name)


def _hparam_metrics(report: Report) -> list[str]:
    """HPARAM_METRICS less the verdict figures this report lacks (a metric column needs its scalar)."""
    evidence = report.verdict.evidence
    return [
        tag
        for tag in HPARAM_METRICS
        if not tag.startswith("verdict/")
        or tag == "verdict/label"
        or ((value := getattr(evidence, tag.removeprefix("verdict/"))) is not None and math.isfinite(value))
    ]


def _scalar(writer: SummaryWriter, tag: str, value: float | None, step: int) -> None:
    if value is not None and math.isfinite(value):
        writer.add_scalar(tag, value, global_step=step)


def _time_steps(report: Report) -> tuple[int, int]:
    """The first and the last step that have time records."""
    steps = [row.step for row in report.time_records]
    return min(steps), max(steps)


def _write_time(
    writer: SummaryWriter, report: Report, names: Mapping[int, str], last_step: int
) -> dict[int, tuple[float, float] | None]:
    """The curves against t at the first and last recorded step and each layer's heatmap; returns each
    layer's heatmap range (smallest, largest log10 ‖∂L/∂h_t‖), None where it has no finite norm."""
    first, last = _time_steps(report)
    for row in report.time_records:
        for which, step in (("first", first), ("last", last)):
            if row.step == step:
                for field in TIME_SCALARS:
                    _scalar(writer, f"time/{names[row.layer]}/{field}/{which}", getattr(row, field), row.t)
    by_layer: dict[int, list[TimeRecord]] = {}
    for row in report.time_records:
        by_layer.setdefault(row.layer, []).append(row)
    ranges: dict[int, tuple[float, float] | None] = {}
    for layer, rows in sorted(by_layer.items()):
        drawn = _heatmap(rows)
        if drawn is None:
            continue
        image, ranges[layer] = drawn
        writer.add_image(f"time/{names[layer]}/heatmap", image, global_step=last_step, dataformats="CHW")
    return ranges


def _heatmap(rows: Sequence[TimeRecord]) -> tuple[Tensor, tuple[float, float] | None] | None:
    """One layer's log10 ‖∂L/∂h_t‖ as an RGB image (3 × height × width, values in [0, 1]) and its (min,
    max): a cell per (recorded step, time step), grey scaled between them, MISSING_RGB where a norm is
    missing or not positive. None when the table has over MAX_HEATMAP_CELLS cells (an uploaded report may
    have any steps and time steps)."""
    steps = sorted({row.step for row in rows})
    times = sorted({row.t for row in rows})
    if len(steps) * len(times) > MAX_HEATMAP_CELLS:
        return None
    grid = torch.full((len(steps), len(times)), math.nan, dtype=torch.float64)
    step_at = {step: i for i, step in enumerate(steps)}
    t_at = {t: i for i, t in enumerate(times)}
    for row in rows:
        if row.grad_norm is not None and math.isfinite(row.grad_norm) and row.grad_norm > 0:
            grid[step_at[row.step], t_at[row.t]] = math.log10(row.grad_norm)
    measured = grid[torch.isfinite(grid)]
    span: tuple[float, float] | None = None
    grey = grid
    if measured.numel():
        span = (float(measured.min()), float(measured.max()))
        scale = span[1] - span[0]
        # A flat table (one value) is drawn mid-grey rather than divided by zero.
        grey = (grid - span[0]) / scale if scale > 0 else torch.full_like(grid, 0.5)
    image = grey.unsqueeze(0).repeat(3, 1, 1)
    missing = ~torch.isfinite(grid)
    for channel, value in enumerate(MISSING_RGB):
        image[channel][missing] = value
    image = image.repeat_interleave(_cell(len(steps)), dim=1).repeat_interleave(_cell(len(times)), dim=2)
    return image.to(torch.float32), span


def _cell(cells: int) -> int:
    """Pixels per heatmap cell along an axis of `cells` cells: TIME_CELL, fewer past HEATMAP_PIXELS, at least 1."""
    return max(1, min(TIME_CELL, HEATMAP_PIXELS // cells))


def _time_markdown(report: Report, names: Mapping[int, str], ranges: Mapping[int, tuple[float, float] | None]) -> str:
    first, last = _time_steps(report)
    lines = [
        f"Gradient through time: `time/<layer>/<field>/first` is step {first}, `…/last` step {last}; "
        "TensorBoard's step axis is the time step t (0 = the first row of the image).",
        "",
        "Heatmaps: recorded steps top to bottom, t left to right; black = the layer's smallest "
        "log10 ‖∂L/∂h_t‖, white = its largest, red = not measured.",
        "",
        "| layer | smallest log10 ‖∂L/∂h_t‖ | largest | span (decades) |",
        "| --- | --- | --- | --- |",
    ]
    for layer in sorted({row.layer for row in report.time_records}):
        if layer not in ranges:
            lines.append(f"| {names[layer]} | no heatmap: over {MAX_HEATMAP_CELLS:,} (step, t) cells | | |")
            continue
        span = ranges[layer]
        low, high = span if span is not None else (None, None)
        width = None if span is None else span[1] - span[0]
        lines.append(f"| {names[layer]} | {_fmt(low)} | {_fmt(high)} | {_fmt(width)} |")
    return "\n".join(lines)


def _hparam_values(spec: Spec) -> dict[str, Any]:
    # hparams take numbers, strings and booleans; an unset optional field has no value to compare.
    return {name: value for name, value in spec.model_dump(mode="json").items() if value is not None}


def _hparam_domains(spec: Spec) -> dict[str, list[Any]]:
    """Every choice of the spec's string enumerations, so the HPARAMS tab can filter by them."""
    domains: dict[str, list[Any]] = {}
    for name, field in type(spec).model_fields.items():
        if typing.get_origin(field.annotation) is typing.Literal:
            domains[name] = list(typing.get_args(field.annotation))
    return domains


def _fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "—"
    return str(value)


def _table(values: Mapping[str, Any]) -> str:
    rows = [f"| {name} | {_fmt(value)} |" for name, value in values.items()]
    return "\n".join(["| field | value |", "| --- | --- |", *rows])


def _spec_markdown(spec: Spec) -> str:
    return _table(spec.model_dump(mode="json")) + f"\n\nfingerprint: `{spec.fingerprint()}`"


def _verdict_markdown(report: Report) -> str:
    verdict: Verdict = report.verdict
    lines = [
        f"**{verdict.label.upper()}** (at init: {verdict.at_init}, during training: {verdict.trained or '—'})",
        "",
        *[f"- {reason}" for reason in verdict.reasons],
    ]
    if verdict.findings:
        phases = {"init": " (at init)", "training": " (during training)", None: ""}
        lines += ["", "**Findings**", ""]
        lines += [f"- **{f.severity}** {f.kind}{phases[f.phase]}: {f.message}" for f in verdict.findings]
    if verdict.advice:
        lines += ["", "**Advice**", "", *[f"- {item}" for item in verdict.advice]]
    theory = verdict.theory
    lines += ["", "**Theory**", ""]
    if theory.applicable:
        lines.append(
            f"χ₁ = {_fmt(theory.chi1)}, q* = {_fmt(theory.q_star)}; predicted "
            f"{_fmt(theory.predicted_decades_per_layer)} decades/layer, measured "
            f"{_fmt(theory.measured_decades_per_layer)} (agrees: {_fmt(theory.agrees)})"
        )
    else:
        lines.append(theory.reason)
    evidence = verdict.evidence.model_dump()
    lines += ["", "**Evidence**", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in evidence.items() if value is not None]
    e = report.eval
    lines += [
        "",
        f"held-out loss {_fmt(e.loss)}, accuracy {_fmt(e.accuracy)} on {e.samples} samples; "
        f"training loss {_fmt(e.train_loss)}, accuracy {_fmt(e.train_accuracy)}",
    ]
    return "\n".join(lines)
