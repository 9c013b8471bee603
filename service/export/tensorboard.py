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
- with ``histograms`` given: ``grad/<layer>`` weight-gradient histograms (see :class:`HistogramCollector`).

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
from graddiag.service.engine.report import Report, Verdict

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
