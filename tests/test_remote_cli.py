"""The client commands (submit, sweep, status, watch, export) against a real uvicorn server and worker."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from graddiag.service.cli import main
from graddiag.service.client import Client
from graddiag.service.remote import parse_grid, parse_value, render_sweep

# Shared fixtures (imported so pytest finds them here too).
from tests.support.api import TINY

TINY_FLAGS = [f"--{field.replace('_', '-')}={value}" for field, value in TINY.items()]
FAST = ["--poll", "0.05"]


def closed_port_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_prints_the_run_id(base_url: str, client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "submit", "--url", base_url, *TINY_FLAGS, "--activation", "tanh")
    assert code == 0
    run_id = out.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", run_id)
    run = client.get(run_id)
    assert run["status"] == "queued" and run["spec"]["activation"] == "tanh" and run["spec"]["depth"] == 3


def test_submit_wait_prints_the_verdict_table(
    base_url: str,
    client: Client,
    worker: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_cli(capsys, "submit", "--url", base_url, *TINY_FLAGS, "--wait", *FAST)
    assert code == 0, err
    (run,) = client.runs()["items"]
    assert run["status"] == "succeeded"
    assert f"verdict: {run['verdict'].upper()}" in out
    assert "input.linear" in out and "output.linear" in out and "theory:" in out
    assert f"run {run['id']} submitted" in err and f"run {run['id'][:8]} succeeded" in err
    # The id is the first line on stdout, for `RUN=$(graddiag submit --wait … | head -1)`.
    assert out.splitlines()[0] == run["id"]


def test_watch_follows_a_run_to_its_verdict(
    base_url: str,
    client: Client,
    worker: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_id = client.submit({**TINY, "steps": 40})["id"]
    code, out, err = run_cli(capsys, "watch", run_id, "--url", base_url, *FAST)
    assert code == 0, err
    run = client.get(run_id)
    assert f"verdict: {run['verdict'].upper()}" in out
    assert err.strip().splitlines()[-1] == f"run {run_id[:8]} succeeded"

    code, out, _ = run_cli(capsys, "watch", run_id, "--url", base_url, "--json")
    assert code == 0 and json.loads(out)["report"] == run["report"]


def test_watch_reports_a_cancelled_run(base_url: str, client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    run_id = client.submit(TINY)["id"]
    client.cancel(run_id)
    code, out, err = run_cli(capsys, "watch", run_id, "--url", base_url)
    assert code == 1 and out == ""
    assert f"run {run_id} cancelled" in err


def test_status_of_a_run(base_url: str, client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    run_id = client.submit(TINY)["id"]
    code, out, _ = run_cli(capsys, "status", run_id, "--url", base_url)
    assert code == 0
    assert out.splitlines()[0] == f"run {run_id}: queued"
    assert "depth=3 width=16" in out
    code, out, _ = run_cli(capsys, "status", run_id, "--url", base_url, "--json")
    assert code == 0 and json.loads(out)["id"] == run_id


def table_rows(out: str) -> list[list[str]]:
    """The matrix lines (before the blank line), split on runs of 2+ spaces."""
    return [re.split(r" {2,}", line.strip()) for line in out.split("\n\n")[0].splitlines()]


def test_sweep_wait_prints_the_verdict_matrix(
    base_url: str,
    client: Client,
    worker: None,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    base = tmp_path / "base.json"
    base.write_text(json.dumps({**TINY, "steps": 50}))
    argv = ["sweep", "--url", base_url, "--base-spec", str(base), "--set", "steps=3", "--set", "lr=0.05"]
    argv += ["--grid", "activation=sigmoid,relu", "--grid", "depth=2,3", "--wait", *FAST]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err

    (sweep_id,) = re.findall(r"sweep ([0-9a-f]{32}): 4 runs \(4 succeeded\)", out)
    summary = client.sweep_summary(sweep_id)
    status = client.sweep_status(sweep_id)
    assert {run["run_id"] for run in status["runs"]} == {run["id"] for run in client.runs()["items"]}
    specs = [client.get(run["run_id"])["spec"] for run in status["runs"]]
    assert all(spec["steps"] == 3 and spec["lr"] == 0.05 and spec["width"] == 16 for spec in specs)

    header, *rows = table_rows(out)
    assert header == ["depth →", "2", "3", "critical depth"]
    expected = [
        [f"activation={c['config']['activation']}", *c["verdicts"], str(c["critical_depth"] or "—")]
        for c in summary["configs"]
    ]
    assert rows == expected and len(rows) == 2
    assert "4/4 finished" in err

    code, again, _ = run_cli(capsys, "status", "--sweep", sweep_id, "--url", base_url)
    assert code == 0 and table_rows(again) == table_rows(out)


def test_sweep_matrix_lists_where_each_finding_first_appears() -> None:
    runs = [{"grid": {"norm": norm, "depth": d}, "status": "succeeded"} for norm in ("none", "batch") for d in (2, 4)]
    status = {"id": "5d26", "total": 4, "counts": {"succeeded": 4}, "runs": runs}
    summary = {
        "configs": [
            {"config": {"norm": "none"}, "depths": [2, 4], "verdicts": ["healthy"] * 2, "critical_depth": None},
            {
                "config": {"norm": "batch"},
                "depths": [2, 4],
                "verdicts": ["healthy", "exploding"],
                "critical_depth": 4,
                "finding_depths": {"gradient_profile": 4, "structural_zero_bias": 2, "forward_signal": 4},
            },
        ]
    }
    lines = render_sweep(status, summary).splitlines()
    at = lines.index("findings, by the shallowest depth where each appears:")
    # Shallowest first, then by kind; a row without findings (or from an older server) has no line.
    assert lines[at + 1 :] == [
        "  norm=batch: structural_zero_bias from depth 2, forward_signal from depth 4, gradient_profile from depth 4"
    ]


def test_sweep_without_wait_prints_its_id_and_status_shows_pending_cells(
    base_url: str,
    client: Client,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["sweep", "--url", base_url, *(f"--set={f}={v}" for f, v in TINY.items()), "--grid", "depth=2,4"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    sweep_id = out.strip()
    assert client.sweep_status(sweep_id)["total"] == 2
    code, out, _ = run_cli(capsys, "status", "--sweep", sweep_id, "--url", base_url)
    assert code == 0
    assert table_rows(out) == [["depth →", "2", "4", "critical depth"], ["(base spec)", "queued", "queued", "—"]]


def test_sweep_refusals_name_the_field(base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The server checks every grid point: its 422 comes back field by field, exit 2.
    code, out, err = run_cli(capsys, "sweep", "--url", base_url, "--grid", "depth=2,1000")
    assert code == 2 and out == ""
    assert "422" in err and "grid.1.depth: grid point 1 (depth=1000)" in err
    code, _, err = run_cli(capsys, "sweep", "--url", base_url, "--set", "depth")
    assert code == 2 and "--set takes FIELD=VALUE" in err
    code, _, err = run_cli(capsys, "sweep", "--url", base_url, "--set", "depth=0", "--grid", "seed=1,2")
    assert code == 2 and "depth: Input should be greater than or equal to 1" in err


def test_export_csv_and_json(
    base_url: str,
    client: Client,
    worker: None,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    run_id = client.run(TINY, timeout=60)["id"]
    target = tmp_path / "gradients.csv"
    code, out, err = run_cli(capsys, "export", run_id, "--url", base_url, "-o", str(target))
    assert code == 0 and out == ""
    rows = client.gradients(run_id)
    assert f"wrote {len(rows)} records" in err
    assert target.read_bytes() == client.gradients(run_id, fmt="csv").encode()
    table = list(csv.DictReader(io.StringIO(target.read_text())))
    assert [float(r["grad_norm"]) for r in table] == [r["grad_norm"] for r in rows]

    code, out, _ = run_cli(capsys, "export", run_id, "--url", base_url, "--format", "json", "--layer", "1")
    assert code == 0 and json.loads(out) == [r for r in rows if r["layer"] == 1]


def test_errors_are_readable_with_an_exit_code(
    base_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = run_cli(capsys, "status", "feed", "--url", base_url)
    assert code == 1 and out == ""
    assert err.strip() == "error: 404 Not Found: run 'feed' not found"
    code, _, err = run_cli(capsys, "export", "feed", "--url", base_url)
    assert code == 1 and "run 'feed' not found" in err

    # The server caps depth at 50 (the `settings` fixture of tests/conftest.py): a 422 that names the field.
    code, _, err = run_cli(capsys, "submit", "--url", base_url, *TINY_FLAGS, "--depth", "60")
    assert code == 2 and "depth: depth=60 exceeds this server's cap; allowed: at most 50" in err
    # Out of the spec's own range: refused before anything is sent.
    code, _, err = run_cli(capsys, "submit", "--url", closed_port_url(), "--depth", "1000")
    assert code == 2 and "depth: Input should be less than or equal to 100" in err

    nobody = closed_port_url()
    code, _, err = run_cli(capsys, "status", "feed", "--url", nobody)
    assert code == 3 and f"cannot reach the graddiag server at {nobody}" in err and "Traceback" not in err

    monkeypatch.setenv("GRADDIAG_URL", nobody)
    code, _, err = run_cli(capsys, "watch", "feed")
    assert code == 3 and nobody in err
    monkeypatch.setenv("GRADDIAG_URL", base_url)
    code, _, err = run_cli(capsys, "status", "feed")
    assert code == 1 and "not found" in err


def test_the_console_entry_point(base_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "graddiag.service.cli", "status", "feed", "--url", base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "run 'feed' not found" in result.stderr and "Traceback" not in result.stderr


def test_value_parsing() -> None:
    assert [parse_value(v) for v in ("2", "0.5", "1e-3", "true", "null", "relu", "")] == [
        2,
        0.5,
        0.001,
        True,
        None,
        "relu",
        "",
    ]
    assert parse_grid(["activation=sigmoid,relu", "depth=2, 5,10", "init-gain=1,2.5"]) == {
        "activation": ["sigmoid", "relu"],
        "depth": [2, 5, 10],
        "init_gain": [1, 2.5],
    }


@pytest.fixture
def api_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """Requested before `base_url`, so the server's settings read it: writes and reads need the token."""
    monkeypatch.setenv("GRADDIAG_API_TOKEN", "s3cret")
    monkeypatch.setenv("GRADDIAG_READ_TOKEN", "s3cret")
    return "s3cret"


def test_a_token_guarded_server(
    api_token: str,
    base_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    code, _, err = run_cli(capsys, "submit", "--url", base_url, *TINY_FLAGS)
    assert code == 1 and "401" in err
    code, out, _ = run_cli(capsys, "submit", "--url", base_url, "--token", api_token, *TINY_FLAGS)
    assert code == 0
    run_id = out.strip()

    logs = str(tmp_path / "logs")
    code, _, err = run_cli(capsys, "tensorboard-export", run_id, logs, "--url", base_url)
    assert code == 1 and "401" in err
    monkeypatch.setenv("GRADDIAG_TOKEN", api_token)
    code, _, err = run_cli(capsys, "tensorboard-export", run_id, logs, "--url", base_url)
    assert code == 1 and "queued" in err  # past the token check: the run has no verdict yet
    code, out, _ = run_cli(capsys, "status", run_id, "--url", base_url)
    assert code == 0 and out.startswith(f"run {run_id}: queued")


def test_submit_and_status_take_the_new_fields(
    base_url: str, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys, "submit", "--url", base_url, *TINY_FLAGS, "--arch", "lstm", "--forget-bias", "chrono"
    )
    assert code == 0, err
    lstm = out.strip()
    assert (client.get(lstm)["spec"]["forget_bias"], client.get(lstm)["spec"]["activation"]) == ("chrono", "tanh")
    code, out, _ = run_cli(capsys, "status", lstm, "--url", base_url)
    assert code == 0 and "spec: lstm depth=3 width=16 activation=tanh init=default norm=none forget_bias=chrono" in out
    code, out, _ = run_cli(capsys, "submit", "--url", base_url, *TINY_FLAGS, "--arch", "lstm")
    code, out, _ = run_cli(capsys, "status", out.strip(), "--url", base_url)
    assert code == 0 and "norm=none forget_bias=null steps=" in out  # PyTorch's own bias, as --forget-bias takes it

    flags = [
        "--arch",
        "transformer",
        "--heads",
        "4",
        "--norm-position",
        "post",
        "--mlp-ratio",
        "2",
        "--pooling",
        "mean",
    ]
    code, out, err = run_cli(capsys, "submit", "--url", base_url, *TINY_FLAGS, *flags)
    assert code == 0, err
    vit_id = out.strip()
    vit = client.get(vit_id)["spec"]
    shape = (vit["heads"], vit["norm_position"], vit["mlp_ratio"], vit["pooling"], vit["norm"], vit["residual"])
    assert shape == (4, "post", 2, "mean", "layer", True)
    code, out, _ = run_cli(capsys, "status", vit_id, "--url", base_url)
    assert code == 0 and "norm=layer heads=4 norm_position=post mlp_ratio=2 pooling=mean" in out


def test_sweep_base_may_need_the_grid_to_be_valid(
    base_url: str, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    # heads (and forget_bias) alone do not make a valid mlp base: the grid's arch does, point by point.
    sets = [f"--set={f}={v}" for f, v in TINY.items()]
    code, out, err = run_cli(
        capsys, "sweep", "--url", base_url, *sets, "--set", "heads=8", "--grid", "arch=transformer"
    )
    assert code == 0, err
    (run,) = client.sweep_status(out.strip())["runs"]
    assert client.get(run["run_id"])["spec"]["heads"] == 8
    code, out, err = run_cli(
        capsys,
        "sweep",
        "--url",
        base_url,
        *sets,
        "--set",
        "forget_bias=chrono",
        "--grid",
        "forget_bias=chrono,1,null",
        "--grid",
        "arch=lstm",
    )
    assert code == 0, err
    forget = out.strip()
    assert client.sweep_status(forget)["grid"] == {"forget_bias": ["chrono", 1.0, None], "arch": ["lstm"]}
    # Tables write null as --grid takes it back, not Python's None.
    code, out, _ = run_cli(capsys, "status", "--sweep", forget, "--url", base_url)
    labels = [row[0] for row in table_rows(out)[1:]]
    assert code == 0 and labels == [
        "forget_bias=chrono, arch=lstm",
        "forget_bias=1.0, arch=lstm",
        "forget_bias=null, arch=lstm",
    ]
    code, out, _ = run_cli(capsys, "sweeps", "--url", base_url)
    assert code == 0 and "forget_bias=chrono,1.0,null arch=lstm" in out
    # Where no point makes it valid, the server names each refused point and the field.
    code, out, err = run_cli(
        capsys, "sweep", "--url", base_url, *sets, "--set", "forget_bias=1", "--grid", "arch=rnn,lstm"
    )
    assert code == 2 and out == ""
    assert "grid.0.forget_bias: grid point 0 (arch='rnn'): forget_bias applies to arch='lstm' only" in err
    # A value wrong in itself is still refused here, before anything is sent.
    code, _, err = run_cli(capsys, "sweep", "--url", base_url, "--set", "heads=0", "--grid", "arch=transformer")
    assert code == 2 and "heads: Input should be greater than or equal to 1" in err


def test_sweep_matrix_lists_critical_sequence_lengths() -> None:
    runs = [{"grid": {"arch": arch, "depth": d}, "status": "succeeded"} for arch in ("rnn", "lstm") for d in (1, 2)]
    status = {"id": "5d26", "total": 4, "counts": {"succeeded": 4}, "runs": runs}

    def config(arch: str, slopes: list[float | None], lengths: list[float | None]) -> dict[str, object]:
        return {
            "config": {"arch": arch},
            "depths": [1, 2],
            "verdicts": ["healthy"] * 2,
            "critical_depth": None,
            "time_decades_per_step": slopes,
            "critical_sequence_length": lengths,
        }

    summary = {
        "configs": [config("rnn", [-0.1, -0.25], [20.0, 8.0]), config("lstm", [-0.001, None], [None, None])],
        "sequence_lengths": [
            {"arch": "rnn", "critical_sequence_length": 8.0, "grid": {"arch": "rnn", "depth": 2}, "runs": 2},
            {"arch": "lstm", "critical_sequence_length": None, "grid": None, "runs": 2},
        ],
    }
    lines = render_sweep(status, summary).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("critical sequence length:"))
    assert lines[at + 1 :] == [
        "  arch=rnn: 20 at depth 1, 8 at depth 2",
        "  arch=lstm: — at depth 1, — at depth 2",
        "shortest per arch: rnn 8 (arch=rnn, depth=2); lstm —",
    ]
    # A sweep without recurrent runs (or an older server's summary) shows no such section.
    del summary["sequence_lengths"]
    assert not any(line.startswith("critical sequence length") for line in render_sweep(status, summary).splitlines())


def test_export_the_gradient_through_time(
    base_url: str,
    client: Client,
    worker: None,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    run_id = client.run({**TINY, "arch": "rnn", "depth": 1, "width": 8, "steps": 2}, timeout=60)["id"]
    rows = client.time(run_id)
    assert {(r["layer"], r["step"]) for r in rows} == {(1, 0), (1, 1)} and len(rows) == 2 * 32
    target = tmp_path / "time.csv"
    code, out, err = run_cli(capsys, "export", run_id, "--time", "--url", base_url, "-o", str(target))
    assert code == 0 and out == "" and f"wrote {len(rows)} records" in err
    assert target.read_bytes() == client.time(run_id, fmt="csv").encode()
    table = list(csv.DictReader(io.StringIO(target.read_text())))
    assert [(int(r["t"]), float(r["grad_norm"])) for r in table] == [(r["t"], r["grad_norm"]) for r in rows]

    code, out, _ = run_cli(capsys, "export", run_id, "--time", "--step", "1", "--format", "json", "--url", base_url)
    assert code == 0 and json.loads(out) == [r for r in rows if r["step"] == 1]
    # --step belongs to --time, --step-from/--step-to to the per-layer records; the server names a wrong layer.
    code, _, err = run_cli(capsys, "export", run_id, "--time", "--step-from", "1", "--url", base_url)
    assert code == 2 and "--time takes --step STEP" in err
    code, _, err = run_cli(capsys, "export", run_id, "--step", "1", "--url", base_url)
    assert code == 2 and "--step goes with --time" in err
    code, _, err = run_cli(capsys, "export", run_id, "--time", "--layer", "0", "--url", base_url)
    assert code == 2 and "422" in err and "layer" in err


def test_sweep_over_recurrent_cells_prints_their_critical_sequence_lengths(
    base_url: str, client: Client, worker: None, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = [f"--set={f}={v}" for f, v in {**TINY, "depth": 1, "width": 8, "steps": 2}.items()]
    code, out, err = run_cli(capsys, "sweep", "--url", base_url, *sets, "--grid", "arch=rnn,lstm", "--wait", *FAST)
    assert code == 0, err
    (sweep_id,) = re.findall(r"sweep ([0-9a-f]{32}): 2 runs \(2 succeeded\)", out)
    summary = client.sweep_summary(sweep_id)
    # Through the worker's verdict and the store: each run's fitted slope and 2 / |slope| from it.
    for config in summary["configs"]:
        (slope,) = config["time_decades_per_step"]
        (length,) = config["critical_sequence_length"]
        assert slope is not None and length == pytest.approx(2 / abs(slope))
    lengths = {item["arch"]: item["critical_sequence_length"] for item in summary["sequence_lengths"]}
    assert set(lengths) == {"rnn", "lstm"}
    shortest = out.splitlines()[-1]
    assert shortest == "shortest per arch: " + "; ".join(
        f"{arch} {lengths[arch]:.0f} (arch={arch})" for arch in ("rnn", "lstm")
    )
