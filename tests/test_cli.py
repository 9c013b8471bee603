"""`graddiag probe` as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graddiag.models.spec import Spec
from graddiag.service.render import WIDTH, render_report
from tests.support.reports import finding, plain_report, with_findings

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
