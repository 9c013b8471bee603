"""`graddiag probe` as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graddiag.models.spec import Spec
from graddiag.service.cli import build_parser
from graddiag.service.engine.report import LayerInfo, Report, TimeRecord, TimeTheory
from graddiag.service.flags import given_values, load_spec
from graddiag.service.render import WIDTH, render_report
from tests.support.reports import external_report, finding, plain_report, with_findings

TINY = ["--dataset", "synthetic", "--depth", "3", "--width", "8", "--steps", "3", "--batch-size", "8"]


def graddiag(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "graddiag.service.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_probe_json_has_the_report_keys() -> None:
    result = graddiag("probe", *TINY, "--record-every", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"spec", "layers", "steps", "records", "time_records", "verdict", "eval", "timing"}
    assert report["time_records"] == []  # an mlp has no time axis
    assert set(report["layers"][0]) == {"index", "name", "kind", "params", "structural_zero_bias"}
    assert set(report["steps"][0]) == {"step", "loss", "accuracy", "grad_norm_total_pre", "grad_norm_total_post"}
    assert set(report["records"][0]) == {
        "step", "layer", "grad_norm", "bias_grad_norm", "weight_norm", "rel_grad",
        "update_ratio", "act_grad_norm", "zero_grad_frac", "saturation_frac", "act_norm", "penalty_grad_norm",
    }  # fmt: skip
    assert {"label", "at_init", "evidence", "reasons", "advice", "theory", "findings"} <= set(report["verdict"])
    assert {"decades_per_layer", "nonfinite_step", "nonfinite_layer"} <= set(report["verdict"]["evidence"])
    assert report["spec"]["depth"] == 3 and len(report["records"]) == 3 * len(report["layers"])


def test_probe_table_shows_layers_verdict_and_theory() -> None:
    result = graddiag("probe", *TINY, "--activation", "sigmoid")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "input.linear" in out and "output.linear" in out
    assert "verdict:" in out and "theory:" in out and "held-out" in out


def test_report_text_shows_findings_forward_rms_and_zero_bias_layers() -> None:
    report = with_findings(
        plain_report(Spec(dataset="synthetic", depth=4, width=8, steps=3, record_every=1, norm="batch")),
        "forward_signal",
        "step_size",
    )
    long = finding("nonfinite").model_copy(
        update={"severity": "info", "phase": None, "message": "A sentence long enough to wrap. " * 8}
    )
    report.verdict.findings.insert(0, long)
    report.verdict.findings.append(finding("step_size", 4))  # a second step_size finding, the same advice
    report.verdict.reasons.append("A reason long enough to wrap. " * 8)
    lines = render_report(report).splitlines()
    assert max(len(line) for line in lines) <= WIDTH

    # The table: the forward RMS at init in the last column, the zero-bias layer marked and explained.
    assert lines[0].split()[-1] == "rms@init"
    rows = {line.split()[1]: line.split() for line in lines[1:6]}
    assert rows["input.linear†"][-1] == "1" and rows["hidden3.linear"][-1] == "8"
    assert any(line.startswith("† bias gradient zero by construction") for line in lines)

    # Findings, most severe first; each with its phase, evidence and advice.
    section = lines[lines.index("findings:") + 1 : lines.index("advice:")]
    heads = [line for line in section if line.startswith("  - ")]
    assert heads == [
        "  - CRITICAL forward_signal (at init): The forward signal finding, number 0.",
        "  - WARNING step_size (during training): The step size finding, number 1.",
        "  - WARNING step_size (at init): The step size finding, number 4.",
        "  - INFO nonfinite: A sentence long enough to wrap. A sentence long enough to wrap. A sentence long enough to "
        "wrap. A",
    ]
    wrapped = section[section.index(heads[3]) + 1]
    assert wrapped.startswith("    sentence long enough to wrap.")
    assert "    evidence: span_decades=2.5, interior_layers=7, note=x" in section
    # Printed once, under the first finding that gives it.
    assert section.count("    advice: Change something about step_size (finding: step_size).") == 1
    # The advice list stays, each item naming its finding.
    advice = lines[lines.index("advice:") + 1 :]
    assert advice[:2] == [
        "  - Change something about forward_signal (finding: forward_signal).",
        "  - Change something about step_size (finding: step_size).",
    ]


def test_spec_file_with_flag_override(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"dataset": "synthetic", "depth": 4, "width": 8, "steps": 2, "batch_size": 4}))
    result = graddiag("probe", "--spec", str(spec_file), "--depth", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spec"]["depth"] == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--depth", "1000"], "depth: Input should be less than or equal to 100"),
        (["--activation", "swish"], "activation: Input should be 'sigmoid', 'tanh'"),
        (["--init", "normal"], "init_std is required when init='normal'"),
        (["--lr", "fast"], "lr: Input should be a valid number"),
        # Refused combinations are put under the field they name; a union's members' messages share a line.
        (["--arch", "rnn", "--forget-bias", "1"], "  forget_bias: forget_bias applies to arch='lstm' only"),
        (["--arch", "transformer", "--width", "30"], "  width: width=30 must be a multiple of heads=4"),
        (["--arch", "gru", "--activation", "relu"], "  activation: activation='relu' is not available for arch='gru'"),
        (
            ["--arch", "lstm", "--forget-bias", "Chrono"],
            "  forget_bias: Input should be a valid number, unable to parse string as a number or Input should be "
            "'chrono'\n",
        ),
    ],
)
def test_invalid_spec_exits_2_with_a_readable_message(args: list[str], expected: str) -> None:
    result = graddiag("probe", *TINY, *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_cifar10_is_a_clear_error(tmp_path: Path) -> None:
    # Downloads off: the message for a machine that may not (or cannot) fetch the data set.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GRADDIAG_DOWNLOAD_DATA": "false"}
    result = graddiag("probe", "--data-dir", str(tmp_path / "nowhere"), "--steps", "1", env=env)
    assert result.returncode == 1
    assert "GRADDIAG_DATA_DIR" in result.stderr and str(tmp_path / "nowhere") in result.stderr
    assert "Traceback" not in result.stderr


def _recurrent_report(arch: str) -> Report:
    """plain_report's steps and verdict for a 2-layer recurrent spec, with its layer names and time records:
    ‖∂L/∂h_t‖ = 10^((t − 31)/10 + layer)·(1 + step) (the top layer is index 3), gate mean 0.5 + t/100 and
    saturation t/1000 where the cell has gates, and the verdict's fitted slope in the evidence."""
    spec = Spec(arch=arch, dataset="synthetic", depth=2, width=8, steps=3, record_every=1)  # type: ignore[arg-type]
    base = plain_report(spec)
    names = [(f"{arch}1.ih", "linear"), (f"{arch}1.hh", "recurrent"), (f"{arch}2.ih", "linear")]
    names += [(f"{arch}2.hh", "recurrent"), ("output.linear", "linear")]
    layers = [LayerInfo(index=i, name=name, kind=kind, params=10) for i, (name, kind) in enumerate(names)]  # type: ignore[arg-type]
    records = [r.model_copy(update={"layer": layer.index}) for r in base.records if r.layer == 0 for layer in layers]
    gated = arch != "rnn"
    times = [
        TimeRecord(
            step=step,
            layer=layer,
            t=t,
            grad_norm=10 ** ((t - 31) / 10 + layer) * (1 + step),
            gate_mean=0.5 + t / 100 if gated else None,
            saturation_frac=t / 1000,
        )
        for step in range(3)
        for layer in (1, 3)
        for t in range(32)
    ]
    evidence = base.verdict.evidence.model_copy(
        update={
            "time_layer": 3,
            "time_decades_per_step": -0.1,
            "time_span_decades": -3.1,
            "time_decades_per_step_trained": -0.05,
            "time_span_decades_trained": -1.55,
        }
    )
    theory = TimeTheory(
        applicable=True,
        reason="",
        model={"rnn": "rnn", "lstm": "lstm_cell", "gru": "gru_update"}[arch],
        predicted_decades_per_step=-0.3,
        measured_decades_per_step=-0.1,
        tolerance=0.05,
        agrees=False,
        spectral_radius=0.68 if arch == "rnn" else None,  # the rnn's own W_hh sets its rate
    )
    verdict = base.verdict.model_copy(
        update={"evidence": evidence, "theory": base.verdict.theory.model_copy(update={"time": theory})}
    )
    return base.model_copy(update={"layers": layers, "records": records, "time_records": times, "verdict": verdict})


def test_report_text_shows_the_gradient_through_time() -> None:
    lines = render_report(_recurrent_report("lstm")).splitlines()
    assert max(len(line) for line in lines) <= WIDTH
    at = lines.index(
        "through time: ‖∂L/∂h_t‖ per recurrent layer (t = 0 is the first row read, the classifier reads the last)"
    )
    header = ["#", "layer", "step", "t=31", "t=24", "t=16", "t=8", "t=0", "dec/step", "gate", "mean", "saturated"]
    assert lines[at + 1].split() == header
    # Per recurrent layer, the first and the last recorded step: the norm falls 0.1 decades per step toward
    # t = 0 in every row; the gate columns are averaged over t = 0..31.
    rows = [line.split() for line in lines[at + 2 : at + 6]]
    assert rows == [
        ["1", "lstm1.hh", "0", "10", "2", "0.316", "0.0501", "0.00794", "-0.1", "0.655", "0.0155"],
        ["2", "30", "5.99", "0.949", "0.15", "0.0238", "-0.1", "0.655", "0.0155"],
        ["3", "lstm2.hh", "0", "1e+03", "200", "31.6", "5.01", "0.794", "-0.1", "0.655", "0.0155"],
        ["2", "3e+03", "599", "94.9", "15", "2.38", "-0.1", "0.655", "0.0155"],
    ]
    assert lines[at + 6].startswith("dec/step: the least-squares slope of log10 ‖∂L/∂h_t‖ over every t")
    assert "gate mean: the forget gate f_t, averaged over t;" in " ".join(lines[at + 6 : at + 9])
    fitted = next(line for line in lines if line.startswith("fitted through time"))
    assert fitted == (
        "fitted through time (lstm2.hh): -0.1 decades per step toward t = 0 at init, -3.1 across the sequence; at the "
        "end -0.05"
    )
    # The LSTM's prediction is about its cell path.
    theory = "predicted -0.3 decades/step, measured -0.1 (off by more than ±0.05)"
    assert f"theory through time (lstm_cell, ‖∂L/∂c_t‖): {theory}" in lines
    # The main table's kind column holds the recurrent matrices' kind whole.
    assert lines[2].split()[1:3] == ["lstm1.hh", "recurrent"]

    # A GRU's gate is its update gate; an rnn has none (its column stays empty) but its tanh saturates.
    def prose(report: Report) -> str:  # the text with wrapped lines joined
        return " ".join(line.strip() for line in render_report(report).splitlines())

    assert "; gate mean: the update gate z_t, averaged over t;" in prose(_recurrent_report("gru"))
    rnn = render_report(_recurrent_report("rnn")).splitlines()
    theory = "predicted -0.3 decades/step, measured -0.1 (off by more than ±0.05), ρ(W_hh) = 0.68"  # wrapped once
    assert f"theory through time (rnn, ‖∂L/∂h_t‖): {theory}" in prose(_recurrent_report("rnn"))
    assert next(line for line in rnn if "rnn1.hh" in line and "—" in line).split()[-2:] == ["—", "0.0155"]
    assert "; gate mean: none (an rnn has no gates);" in prose(_recurrent_report("rnn"))
    # A model graddiag did not build (an uploaded report) names the gate by what it does.
    external = _recurrent_report("lstm").model_copy(update={"spec": None, "model": external_report().model})
    assert "; gate mean: the gate that keeps the past (LSTM forget gate, GRU update gate), averaged" in prose(external)
    # Networks without a time axis have no such section.
    assert "through time" not in render_report(plain_report(Spec(dataset="synthetic", depth=3, steps=2)))


def test_report_text_shows_a_transformers_blocks() -> None:
    spec = Spec(
        arch="transformer",
        dataset="synthetic",
        depth=2,
        width=8,
        heads=2,
        steps=3,
        record_every=1,
        norm_position="post",
    )
    base = plain_report(spec)
    # The post-LN order of a block's layers: attention first, each norm after its residual sum.
    block = ["attn.q", "attn.k", "attn.v", "attn.out", "norm1", "mlp.fc1", "mlp.fc2", "norm2"]
    names = [
        "embed.linear",
        "embed.pos",
        "embed.cls",
        *(f"block{i}.{n}" for i in (1, 2) for n in block),
        "output.linear",
    ]
    layers = [
        LayerInfo(
            index=i,
            name=name,
            kind="attention" if ".attn." in name else "norm" if "norm" in name else "linear",
            params=10,
        )  # type: ignore[arg-type]
        for i, name in enumerate(names)
    ]
    records = [
        r.model_copy(
            update={"layer": layer.index, "grad_norm": layer.index * (1 + r.step), "act_grad_norm": layer.index / 100}
        )
        for r in base.records
        if r.layer == 0
        for layer in layers
    ]
    lines = render_report(base.model_copy(update={"layers": layers, "records": records})).splitlines()
    assert max(len(line) for line in lines) <= WIDTH
    at = lines.index("blocks (post-LN): ‖∂L/∂W‖ of attn.out and mlp.fc2, ‖∂L/∂h‖ at the block output")
    assert lines[at + 1].split() == ["block", "attn@init", "fc2@init", "∂h@init", "attn@end", "fc2@end", "∂h@end"]
    # block1: attn.out is layer 6, fc2 layer 9, the output (post-LN: norm2) layer 10; the end is step 2 (3×).
    assert lines[at + 2].split() == ["block1", "6", "9", "0.1", "18", "27", "0.1"]
    assert lines[at + 3].split() == ["block2", "14", "17", "0.18", "42", "51", "0.18"]
    assert lines[at + 4] == ""


def test_probe_an_lstm_and_a_transformer_from_flags() -> None:
    tiny = ["--dataset", "synthetic", "--width", "8", "--steps", "2", "--batch-size", "4", "--record-every", "1"]
    lstm = graddiag("probe", *tiny, "--arch", "lstm", "--depth", "1", "--forget-bias", "chrono", "--json")
    assert lstm.returncode == 0, lstm.stderr
    report = json.loads(lstm.stdout)
    assert (report["spec"]["forget_bias"], report["spec"]["activation"]) == ("chrono", "tanh")
    assert [layer["name"] for layer in report["layers"]] == ["lstm1.ih", "lstm1.hh", "output.linear"]
    # Every time step of the recurrent layer at both recorded steps.
    assert sorted((r["step"], r["t"]) for r in report["time_records"]) == [(s, t) for s in (0, 1) for t in range(32)]

    flags = ["--arch", "transformer", "--depth", "2", "--heads", "4", "--norm-position", "post", "--mlp-ratio", "2"]
    vit = graddiag("probe", *tiny, *flags, "--pooling", "mean")
    assert vit.returncode == 0, vit.stderr
    lines = vit.stdout.splitlines()
    at = lines.index("blocks (post-LN): ‖∂L/∂W‖ of attn.out and mlp.fc2, ‖∂L/∂h‖ at the block output")
    assert [line.split()[0] for line in lines[at + 2 : at + 4]] == ["block1", "block2"]
    assert "embed.cls" not in vit.stdout and "block2.norm2" in vit.stdout  # mean pooling: no class token


def test_none_is_null_only_where_a_field_takes_null() -> None:
    argv = ["probe", "--arch", "lstm", "--norm", "none", "--clip-value", "none", "--forget-bias", "null"]
    spec = load_spec(None, given_values(build_parser().parse_args(argv), Spec))
    # norm's 'none' is one of its values; clip_value and forget_bias take null.
    assert (spec.norm, spec.clip_value, spec.forget_bias) == ("none", None, None)
    argv = ["probe", "--arch", "lstm", "--forget-bias", "chrono"]
    assert load_spec(None, given_values(build_parser().parse_args(argv), Spec)).forget_bias == "chrono"
