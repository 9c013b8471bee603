"""`graddiag diagnose script.py:make_model`: the report table, --json, --upload, and the input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graddiag.service.cli import main
from graddiag.service.client import Client
from graddiag.service.engine.report import Report

SCRIPT = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head((self.body(h) + self.skip(h)).mean((2, 3)))


def make_model():
    return Net()


def not_a_model():
    return 3
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "mine.py"
    path.write_text(SCRIPT)
    return path


ARGS = ["--data", "synthetic", "--steps", "3", "--record-every", "1", "--batch-size", "4"]


def test_prints_the_probe_table_for_the_users_model(script: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", f"{script}:make_model", *ARGS]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: Net, ")
    lines = out.splitlines()
    table = [line.split()[1] for line in lines[2:6]]
    assert table == ["stem", "body", "skip‡", "head"]  # forward order, the shortcut marked as a branch
    assert "verdict: " in out and "theory: Mean-field theory is derived for graddiag's own networks" in out
    assert "no held-out set" in out


def test_json_is_the_report(script: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", f"{script}:make_model", *ARGS, "--json"]) == 0
    report = Report.model_validate(json.loads(capsys.readouterr().out))
    assert report.spec is None and report.model is not None and report.model.branches == [2]
    assert report.timing.steps_run == 3


def test_upload_stores_it_on_the_server(script: Path, base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", f"{script}:make_model", *ARGS, "--upload", base_url, "--name", "mine", "--tag", "x"]) == 0
    err = capsys.readouterr().err
    run_id = err.split("uploaded: run ")[1].split()[0]
    with Client(base_url) as client:
        run = client.get(run_id)
    assert (run["source"], run["name"], run["tags"], run["model"]["class_name"]) == ("external", "mine", ["x"], "Net")


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("{script}", "path/to/script.py:make_model"),
        ("{script}:nothing", "has no function 'nothing'"),
        ("{script}:not_a_model", "returned int, not a torch.nn.Module"),
        ("/no/such/file.py:f", "no such file"),
    ],
)
def test_input_errors_exit_2_with_one_line(
    script: Path, target: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diagnose", target.format(script=script), *ARGS]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
