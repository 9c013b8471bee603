"""Names, tags and the sweeps list from the Python client and the command line."""

from __future__ import annotations

import pytest

from graddiag.models.spec import Spec
from graddiag.service.cli import main
from graddiag.service.client import Client, GraddiagError
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine
from tests.support.api import TINY
from tests.support.reports import plain_report, store_report

TINY_FLAGS = [f"--{field.replace('_', '-')}={value}" for field, value in TINY.items()]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_client_names_tags_and_lists(client: Client) -> None:
    run = client.submit(TINY, name="baseline", tags=["paper", "a b"])
    assert (run["name"], run["tags"]) == ("baseline", ["paper", "a b"])
    assert client.label(run["id"][:8], name="renamed")["name"] == "renamed"
    assert client.runs(tag="paper")["total"] == 1 and client.runs(name="RENAMED")["total"] == 1
    sweep = client.sweep(TINY, {"depth": [2, 3]}, name="depths", tags=["x"])
    assert (sweep["name"], sweep["tags"]) == ("depths", ["x"])
    assert client.label_sweep(sweep["id"], tags=[])["tags"] == []
    listed = client.sweeps(name="dep")
    assert [item["id"] for item in listed["items"]] == [sweep["id"]] and listed["items"][0]["size"] == 2
    with pytest.raises(GraddiagError) as info:
        client.label(run["id"], tags=["x" * 51])
    assert info.value.status == 422


def test_cli_names_tags_and_lists(base_url: str, client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(
        capsys, "submit", "--url", base_url, *TINY_FLAGS, "--name", "cli run", "--tag", "t1", "--tag", "t2"
    )
    assert code == 0
    run = client.get(out.strip())
    assert (run["name"], run["tags"]) == ("cli run", ["t1", "t2"])

    code, out = _cli(capsys, "label", run["id"][:8], "--url", base_url, "--name", "cli run v2", "--clear-tags")
    assert code == 0 and out.strip() == f"{run['id']}: cli run v2 []"
    assert client.get(run["id"])["tags"] == []

    code, out = _cli(
        capsys,
        "sweep",
        "--url",
        base_url,
        "--grid",
        "depth=2,3",
        "--set",
        "dataset=synthetic",
        "--name",
        "grid one",
        "--tag",
        "paper",
    )
    assert code == 0
    sweep_id = out.strip()
    code, out = _cli(capsys, "sweeps", "--url", base_url, "--tag", "paper")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["sweep", "name", "tags", "done"]
    # No run has finished: no critical depth yet for the one configuration (the base spec).
    assert lines[1].split() == [sweep_id[:8], "grid", "one", "paper", "0/2", "depth=2,3", "(base", "spec):", "—"]
    assert lines[-1] == "1 sweep(s)"
    code, out = _cli(capsys, "label", sweep_id[:8], "--sweep", "--url", base_url, "--name", "")
    assert code == 0 and client.sweep_status(sweep_id)["name"] is None


def test_cli_runs_lists_filters_and_sorts_by_results(
    base_url: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = make_engine(settings.db_url)
    ids = {}
    for name, decades in (("steep", -0.8), ("mild", -0.2), ("flat", 0.05)):
        report = plain_report(Spec.model_validate(TINY), "vanishing" if decades < -0.1 else "healthy")
        evidence = report.verdict.evidence.model_copy(update={"decades_per_layer": decades})
        ids[name] = store_report(
            engine, report.model_copy(update={"verdict": report.verdict.model_copy(update={"evidence": evidence})})
        )
    engine.dispose()
    code, out = _cli(capsys, "runs", "--url", base_url, "--sort", "decades_per_layer")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "run",
        "name",
        "arch",
        "activation",
        "depth",
        "width",
        "steps",
        "lr",
        "status",
        "verdict",
        "dec/layer",
        "acc",
        "time",
    ]
    assert [line.split()[0] for line in lines[1:4]] == [ids["steep"][:8], ids["mild"][:8], ids["flat"][:8]]
    assert lines[1].split()[2] == "mlp" and lines[1].split()[10] == "-0.8" and lines[-1] == "3 run(s)"
    code, out = _cli(
        capsys, "runs", "--url", base_url, "--filter", "verdict = 'vanishing' and decades_per_layer < -0.3"
    )
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:-1]] == [ids["steep"][:8]]
    # A bad expression is the server's 422, said plainly, exit 2.
    code = main(["runs", "--url", base_url, "--filter", "happiness > 1"])
    assert code == 2 and "unknown name 'happiness'" in capsys.readouterr().err
