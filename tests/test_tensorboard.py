"""TensorBoard export: a real tiny probe's events read back with TensorBoard's own reader equal the report."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from graddiag.models.networks import build_network
from graddiag.models.spec import Spec
from graddiag.service.engine.data import make_source
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.report import Finding, Report
from graddiag.service.export import tensorboard as tensorboard_export
from graddiag.service.export.tensorboard import (
    EVENT_FILE,
    HistogramCollector,
    archive,
    export_run,
    run_name,
    write_events,
)
from tests.support.reports import plain_report, recurrent_report

SPEC = Spec(dataset="synthetic", depth=3, width=8, steps=4, batch_size=8, record_every=1)
LAYER_FIELDS = ("grad_norm", "act_grad_norm", "rel_grad", "update_ratio", "act_norm", "penalty_grad_norm")
STEP_TAGS = {
    "loss": "loss",
    "accuracy": "accuracy",
    "grad_norm_total_pre": "grad_norm_total/pre",
    "grad_norm_total_post": "grad_norm_total/post",
}


@pytest.fixture(scope="module")
def report() -> Report:
    return run_probe(SPEC, eval_samples=64)


def step0_gradients(spec: Spec) -> HistogramCollector:
    """The probe's step-0 gradients, reproduced: same network, same batch, one backward."""
    model = build_network(spec)
    inputs, labels = make_source(spec, data=None, device=torch.device("cpu"), eval_samples=1).batch(0)
    F.cross_entropy(model(inputs), labels).backward()
    collector = HistogramCollector()
    collector.collect(0, model.layers)
    return collector


def read(log_dir: Path) -> event_accumulator.EventAccumulator:
    guidance = dict.fromkeys(event_accumulator.DEFAULT_SIZE_GUIDANCE, 0)
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


def scalars(accumulator: event_accumulator.EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def f32(value: float) -> float:
    """TensorBoard keeps scalars as float32."""
    return float(np.float32(value))


def text(accumulator: event_accumulator.EventAccumulator, tag: str) -> str:
    (event,) = accumulator.Tensors(f"{tag}/text_summary")
    return event.tensor_proto.string_val[0].decode()


def test_scalars_equal_the_report(report: Report, tmp_path: Path) -> None:
    assert write_events(report, tmp_path / "run") == tmp_path / "run"
    acc = read(tmp_path / "run")
    names = {layer.index: layer.name for layer in report.layers}
    assert len(report.steps) == SPEC.steps and len(names) == SPEC.depth + 1

    for field in LAYER_FIELDS:
        for index, name in names.items():
            expected = {r.step: f32(v) for r in report.records if r.layer == index and (v := getattr(r, field))}
            # A field never measured (penalty_grad_norm without a penalty) writes no tag at all.
            drawn = scalars(acc, f"{field}/{name}") if f"{field}/{name}" in acc.Tags()["scalars"] else {}
            assert drawn == expected, (field, name)
    assert all(len(scalars(acc, f"act_norm/{name}")) == SPEC.steps for name in names.values())
    # grad_norm is measured at every recorded step (record_every=1: every step) for every layer.
    assert all(len(scalars(acc, f"grad_norm/{name}")) == SPEC.steps for name in names.values())

    for field, tag in STEP_TAGS.items():
        assert scalars(acc, tag) == {m.step: f32(getattr(m, field)) for m in report.steps}, tag
    assert report.eval.loss is not None and report.eval.accuracy is not None
    assert scalars(acc, "eval/loss") == {SPEC.steps - 1: f32(report.eval.loss)}
    assert scalars(acc, "eval/accuracy") == {SPEC.steps - 1: f32(report.eval.accuracy)}
    assert not acc.Tags()["histograms"]


def test_verdict_and_spec_text_and_hparams(report: Report, tmp_path: Path) -> None:
    acc = read(write_events(report, tmp_path / "run"))
    verdict = text(acc, "verdict")
    assert verdict.startswith(f"**{report.verdict.label.upper()}**")
    assert all(reason in verdict for reason in report.verdict.reasons)
    spec_text = text(acc, "spec")
    assert "| depth | 3 |" in spec_text and "| activation | relu |" in spec_text
    assert SPEC.fingerprint() in spec_text

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["depth"].number_value == 3 and hparams["width"].number_value == 8
    assert hparams["activation"].string_value == "relu" and hparams["dataset"].string_value == "synthetic"
    assert "init_std" not in hparams and "clip_value" not in hparams  # None: left out
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert {"eval/loss", "eval/accuracy"} <= metrics <= set(acc.Tags()["scalars"])
    domains = {info.name: [v.string_value for v in info.domain_discrete.values] for info in experiment.hparam_infos}
    assert "sigmoid" in domains["activation"] and domains["dataset"] == ["cifar10", "synthetic"]


def test_verdict_text_lists_the_findings(report: Report, tmp_path: Path) -> None:
    findings = [
        Finding(kind="step_size", severity="warning", phase="training", message="Steps are large."),
        Finding(kind="structural_zero_bias", severity="info", message="Biases feed batch norm."),
    ]
    with_findings = report.model_copy(update={"verdict": report.verdict.model_copy(update={"findings": findings})})
    verdict = text(read(write_events(with_findings, tmp_path / "run")), "verdict")
    assert "**Findings**" in verdict
    assert "- **warning** step_size (during training): Steps are large." in verdict
    assert "- **info** structural_zero_bias: Biases feed batch norm." in verdict


def test_non_finite_values_are_skipped(report: Report, tmp_path: Path) -> None:
    steps = [m.model_copy(update={"loss": None}) if m.step == 2 else m for m in report.steps]
    records = [r.model_copy(update={"grad_norm": None}) if (r.step, r.layer) == (1, 0) else r for r in report.records]
    broken = report.model_copy(
        update={"steps": steps, "records": records, "eval": report.eval.model_copy(update={"loss": None})}
    )
    collector = step0_gradients(SPEC)
    collector.histograms[0][0][:5] = math.inf  # partly non-finite: the finite rest is kept
    collector.histograms[0][1].fill_(math.nan)  # nothing finite: no histogram
    acc = read(write_events(broken, tmp_path / "run", histograms=collector.histograms))

    assert sorted(scalars(acc, "loss")) == [0, 1, 3]
    assert sorted(scalars(acc, f"grad_norm/{report.layers[0].name}")) == [0, 2, 3]
    assert "eval/loss" not in acc.Tags()["scalars"] and "eval/accuracy" in acc.Tags()["scalars"]
    (first,) = acc.Histograms(f"grad/{report.layers[0].name}")
    assert first.histogram_value.num == collector.histograms[0][0].numel() - 5
    assert f"grad/{report.layers[1].name}" not in acc.Tags()["histograms"]


def test_histograms_hold_the_probes_gradients(report: Report, tmp_path: Path) -> None:
    collector = step0_gradients(SPEC)
    acc = read(write_events(report, tmp_path / "run", histograms=collector.histograms))
    assert len(acc.Tags()["histograms"]) == len(report.layers)
    for layer in report.layers:
        (event,) = acc.Histograms(f"grad/{layer.name}")
        histogram = event.histogram_value
        grad = collector.histograms[0][layer.index]
        assert event.step == 0 and histogram.num == grad.numel()
        assert histogram.min == pytest.approx(grad.min().item()) and histogram.max == pytest.approx(grad.max().item())
        # Same network, same batch: the histogram's L2 norm is the norm the probe recorded at step 0.
        (recorded,) = [r.grad_norm for r in report.records if r.step == 0 and r.layer == layer.index]
        assert math.sqrt(histogram.sum_squares) == pytest.approx(recorded, rel=1e-5)


def test_collector_copies_each_weight_gradient_to_the_cpu() -> None:
    spec = SPEC.model_copy(update={"arch": "cnn", "norm": "batch"})
    model = build_network(spec)
    untouched = model.layers[-1]
    collector = HistogramCollector(max_values=100)
    collector.collect(0, model.layers)
    assert collector.histograms == {0: {}}  # before any backward there is no gradient

    inputs, labels = make_source(spec, data=None, device=torch.device("cpu"), eval_samples=1).batch(0)
    F.cross_entropy(model(inputs), labels).backward()
    untouched.weight.grad = None
    collector(3, model.layers)
    copies = collector.histograms[3]
    assert sorted(copies) == [layer.index for layer in model.layers[:-1]]
    for layer in model.layers[:-1]:
        grad = layer.weight.grad
        assert grad is not None
        copy = copies[layer.index]
        assert copy.device.type == "cpu" and copy.dtype == torch.float32 and copy.dim() == 1
        if grad.numel() <= 100:
            assert torch.equal(copy, grad.reshape(-1))
        else:  # thinned to an evenly strided sample of at most max_values
            stride = math.ceil(grad.numel() / 100)
            assert torch.equal(copy, grad.reshape(-1)[::stride]) and copy.numel() <= 100
    # Copies, not views: the next step's gradients leave them as they were.
    before = {index: copy.clone() for index, copy in copies.items()}
    for layer in model.layers:
        if layer.weight.grad is not None:
            layer.weight.grad.mul_(2)
    assert all(torch.equal(before[index], copies[index]) for index in copies)
    with pytest.raises(ValueError, match="max_values"):
        HistogramCollector(max_values=0)


def test_reexport_replaces_and_archive_round_trips(report: Report, tmp_path: Path) -> None:
    log_dir = export_run(report, tmp_path / "logs", name="run-42")
    export_run(report, tmp_path / "logs", name="run-42", histograms=step0_gradients(SPEC).histograms)
    assert log_dir == tmp_path / "logs" / "run-42"
    assert [p.name for p in log_dir.iterdir()] == [EVENT_FILE]  # one file: no host name, no duplicates
    assert len(scalars(read(log_dir), "loss")) == SPEC.steps

    data = archive(log_dir)
    assert data == archive(log_dir)  # byte-stable
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"run-42/{EVENT_FILE}"]
        assert all(m.uname == "" and m.uid == 0 for m in members)
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert (tmp_path / "unpacked" / "run-42" / EVENT_FILE).read_bytes() == (log_dir / EVENT_FILE).read_bytes()
    unpacked = read(tmp_path / "unpacked" / "run-42")
    assert scalars(unpacked, "loss") == scalars(read(log_dir), "loss")
    assert unpacked.Tags()["histograms"]

    with tarfile.open(fileobj=io.BytesIO(archive(log_dir, arcname="renamed")), mode="r:gz") as tar:
        assert tar.getnames() == [f"renamed/{EVENT_FILE}"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        archive(tmp_path / "empty")


def test_export_run_names(report: Report, tmp_path: Path) -> None:
    default = export_run(report, tmp_path)
    assert default.name == run_name(report) and default.name.startswith("mlp-d3-w8-relu-")
    for bad in ("", ".", "..", "a/b", "../x", "a\\b"):
        with pytest.raises(ValueError, match="single path component"):
            export_run(report, tmp_path, name=bad)


def test_unknown_histogram_layer_is_refused(report: Report, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"layers \[99\]"):
        write_events(report, tmp_path / "run", histograms={0: {99: torch.ones(3)}})
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_missing_tensorboard_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were absent
    monkeypatch.delitem(sys.modules, "graddiag.service.export.tensorboard")
    with pytest.raises(ImportError, match=r"graddiag\[tensorboard\]"):
        import graddiag.service.export.tensorboard  # noqa: F401


def test_export_imports_neither_store_nor_api() -> None:
    code = (
        "import sys, graddiag.service.export.tensorboard\n"
        "upper = ('graddiag.service.store', 'graddiag.service.api', 'graddiag.service.worker')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(upper))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- the gradient through time ------------------------------------------------------------------------

RECURRENT = Spec(arch="lstm", depth=2, width=16, steps=7, record_every=3, batch_size=8, dataset="synthetic")
TIME_FIELDS = ("grad_norm", "cell_grad_norm", "state_rms", "gate_mean", "saturation_frac")


def pixels(accumulator: event_accumulator.EventAccumulator, tag: str) -> tuple[int, np.ndarray]:
    """The step and the RGB pixels of the one image under `tag`."""
    from PIL import Image

    (event,) = accumulator.Images(tag)
    return event.step, np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


@pytest.mark.parametrize(("arch", "activation"), [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "relu")])
def test_time_curves_at_the_first_and_last_step(tmp_path: Path, arch: str, activation: str) -> None:
    report = recurrent_report(RECURRENT.model_copy(update={"arch": arch, "activation": activation}), time_steps=5)
    acc = read(write_events(report, tmp_path / "run"))
    names = {layer.index: layer.name for layer in report.layers}
    tags = set(acc.Tags()["scalars"])
    for index in (1, 3):
        for field in TIME_FIELDS:
            for which, step in (("first", 0), ("last", 6)):
                tag = f"time/{names[index]}/{field}/{which}"
                expected = {
                    r.t: f32(value)
                    for r in report.time_records
                    if (r.layer, r.step) == (index, step) and (value := getattr(r, field)) is not None
                }
                # A field the cell does not have (the rnn's gate, its relu's saturation) writes no tag.
                assert (scalars(acc, tag) if tag in tags else {}) == expected, tag
    assert f"time/{arch}1.hh/cell_grad_norm/last" in tags if arch == "lstm" else not any("cell_grad" in t for t in tags)
    assert not any(tag.startswith(f"time/{names[0]}/") for tag in tags)  # an input projection has no time records
    assert "step 0" in text(acc, "time") and "step 6" in text(acc, "time")


def test_time_heatmap_image(tmp_path: Path) -> None:
    report = recurrent_report(RECURRENT, time_steps=5)
    # One norm not measured: its cell is red.
    gone = (3, 3, 2)
    rows = [
        r.model_copy(update={"grad_norm": None}) if (r.step, r.layer, r.t) == gone else r for r in report.time_records
    ]
    acc = read(write_events(report.model_copy(update={"time_records": rows}), tmp_path / "run"))
    assert set(acc.Tags()["images"]) == {"time/lstm1.hh/heatmap", "time/lstm2.hh/heatmap"}
    step, image = pixels(acc, "time/lstm1.hh/heatmap")
    assert step == 6 and image.shape == (3 * 8, 5 * 8, 3)  # 3 recorded steps x 5 time steps, 8 px cells
    cells = image[4::8, 4::8]  # one pixel inside each cell
    grey = cells[..., 0].astype(int)
    assert (cells[..., 0] == cells[..., 1]).all() and (cells[..., 1] == cells[..., 2]).all()
    # Black at the smallest norm (step 0, t = 0), white at the largest (step 6, t = 4), rising along t and steps.
    assert grey[0, 0] == 0 and grey[2, 4] == 255
    assert (np.diff(grey, axis=1) > 0).all() and (np.diff(grey, axis=0) > 0).all()
    _, other = pixels(acc, "time/lstm2.hh/heatmap")
    assert tuple(other[4 + 8 * 1, 4 + 8 * 2]) == (255, 0, 0)  # step 3 (row 1), t = 2
    # The text gives the range: 10^-0.4 at step 0, t = 0 up to 7 at step 6, t = 4 (over layer index + 1).
    assert (
        f"| lstm1.hh | {math.log10(10**-0.4 / 2):.4g} | {math.log10(7 / 2):.4g} | {0.4 + math.log10(7):.4g} |"
        in text(acc, "time")
    )


def test_no_time_records_no_time_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    acc = read(write_events(plain_report(SPEC), tmp_path / "mlp"))
    assert not any(tag.startswith("time/") for tag in acc.Tags()["scalars"]) and not acc.Tags()["images"]
    assert "time/text_summary" not in acc.Tags()["tensors"]
    # A table too large to draw keeps its curves and says why it has no image.
    monkeypatch.setattr(tensorboard_export, "MAX_HEATMAP_CELLS", 10)
    acc = read(write_events(recurrent_report(RECURRENT, time_steps=5), tmp_path / "lstm"))
    assert not acc.Tags()["images"] and "time/lstm1.hh/grad_norm/last" in acc.Tags()["scalars"]
    assert "| lstm1.hh | no heatmap: over 10 (step, t) cells | | |" in text(acc, "time")
