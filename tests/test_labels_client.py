"""Names, tags and the sweeps list from the Python client and the command line."""

from __future__ import annotations

import pytest

from graddiag.service.cli import main
from graddiag.service.client import Client, GraddiagError
from tests.support.api import TINY

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
