"""Names and tags of runs and sweeps (given at submit time, edited later, filtered on) and the sweeps list."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from graddiag.models.spec import Spec
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine
from tests.support.api import TINY, assert_problem
from tests.support.reports import plain_report, succeed

pytestmark = pytest.mark.anyio


async def test_runs_are_named_and_tagged_at_submit_and_later(api: httpx.AsyncClient) -> None:
    created = await api.post(
        "/v1/runs", params=[("name", " baseline "), ("tag", "lr"), ("tag", "a b"), ("tag", "lr")], json=TINY
    )
    assert created.status_code == 202, created.text
    run = created.json()
    assert run["name"] == "baseline" and run["tags"] == ["lr", "a b"]

    renamed = await api.patch(f"/v1/runs/{run['id'][:8]}", json={"name": "baseline v2"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "baseline v2"
    assert renamed.json()["tags"] == ["lr", "a b"]  # left out: unchanged
    retagged = (await api.patch(f"/v1/runs/{run['id']}", json={"tags": ["x_y", "100%"]})).json()
    assert retagged["tags"] == ["x_y", "100%"] and retagged["name"] == "baseline v2"
    cleared = (await api.patch(f"/v1/runs/{run['id']}", json={"name": "", "tags": []})).json()
    assert cleared["name"] is None and cleared["tags"] == []


async def test_bad_labels_are_422s(api: httpx.AsyncClient) -> None:
    run_id = (await api.post("/v1/runs", json=TINY)).json()["id"]
    for body, where in (
        ({"name": "x" * 201}, "name"),
        ({"tags": [""]}, "tags"),
        ({"tags": ["t" * 51]}, "tags"),
        ({"tags": [f"t{i}" for i in range(21)]}, "tags"),
        ({"colour": "red"}, "colour"),
    ):
        problem = assert_problem(await api.patch(f"/v1/runs/{run_id}", json=body), 422, "validation_error")
        assert problem["errors"][0]["loc"][:2] == ["body", where], problem
    problem = assert_problem(await api.post("/v1/runs", params={"tag": "t" * 51}, json=TINY), 422, "validation_error")
    assert problem["errors"][0]["loc"][:2] == ["query", "tag"]
    assert_problem(await api.patch("/v1/runs/ffffffff", json={"name": "x"}), 404, "run_not_found")


async def test_runs_filter_by_name_and_tags(api: httpx.AsyncClient) -> None:
    async def submit(name: str, *tags: str) -> str:
        params = [("name", name), *(("tag", tag) for tag in tags)]
        return str((await api.post("/v1/runs", params=params, json=TINY)).json()["id"])

    a = await submit("Sigmoid deep", "paper", "fig_2")
    b = await submit("relu deep", "paper")
    c = await submit("relu shallow", "fig2")

    async def ids(**params: Any) -> set[str]:
        return {item["id"] for item in (await api.get("/v1/runs", params=params)).json()["items"]}

    assert await ids(name="DEEP") == {a, b}
    assert await ids(tag="paper") == {a, b}
    assert await ids(tag=["paper", "fig_2"]) == {a}
    # Whole tags only: "fig2" is not "fig_2" ('_' is no wildcard), and "pap" is no tag.
    assert await ids(tag="fig2") == {c} and await ids(tag="pap") == set()
    assert await ids(name="100%") == set()
    # Sorted and filtered by name like any other column.
    # (Only the lowercase names' order is asserted: where capitals sort depends on the database's collation.)
    for sort, expected in (("name", ["relu deep", "relu shallow"]), ("-name", ["relu shallow", "relu deep"])):
        listed = (await api.get("/v1/runs", params={"sort": sort})).json()["items"]
        assert [item["name"] for item in listed if item["name"].startswith("relu")] == expected
    assert await ids(filter="name = 'relu deep'") == {b}


async def test_sweeps_are_named_listed_and_show_their_base(api: httpx.AsyncClient, settings: Settings) -> None:
    body = {"base": {**TINY, "width": 6}, "grid": {"activation": ["sigmoid", "relu"], "depth": [2, 3]}}
    first = (await api.post("/v1/sweeps", json={**body, "name": "act × depth", "tags": ["paper"]})).json()
    assert first["name"] == "act × depth" and first["tags"] == ["paper"]
    assert first["base"] == {**TINY, "width": 6} and first["grid"] == body["grid"]
    second = (await api.post("/v1/sweeps", json=body)).json()
    assert second["name"] is None and second["tags"] == []

    # The sigmoid runs turn vanishing from depth 3; relu stays healthy.
    engine = make_engine(settings.db_url)
    for run in first["runs"]:
        label = "vanishing" if run["grid"] == {"activation": "sigmoid", "depth": 3} else "healthy"
        succeed(engine, run["run_id"], plain_report(Spec.model_validate({**TINY, "width": 6, **run["grid"]}), label))
    engine.dispose()

    listed = (await api.get("/v1/sweeps")).json()
    assert listed["total"] == 2 and [item["id"] for item in listed["items"]] == [second["id"], first["id"]]
    item = listed["items"][1]
    assert item["name"] == "act × depth" and item["base"] == {**TINY, "width": 6} and item["size"] == 4
    assert item["counts"]["succeeded"] == 4 and item["done"] is True
    critical = {c["config"]["activation"]: c["critical_depth"] for c in item["critical_depths"]}
    assert critical == {"sigmoid": 3, "relu": None}
    assert listed["items"][0]["done"] is False and listed["items"][0]["counts"]["queued"] == 4

    assert [i["id"] for i in (await api.get("/v1/sweeps", params={"tag": "paper"})).json()["items"]] == [first["id"]]
    assert [i["id"] for i in (await api.get("/v1/sweeps", params={"name": "DEPTH"})).json()["items"]] == [first["id"]]
    page = (await api.get("/v1/sweeps", params={"limit": 1, "offset": 1})).json()
    assert page["total"] == 2 and [i["id"] for i in page["items"]] == [first["id"]]

    renamed = await api.patch(f"/v1/sweeps/{second['id'][:8]}", json={"name": "rerun", "tags": ["b"]})
    assert renamed.status_code == 200 and renamed.json()["name"] == "rerun" and renamed.json()["tags"] == ["b"]
    assert (await api.get(f"/v1/sweeps/{second['id']}")).json()["name"] == "rerun"
    assert_problem(await api.patch("/v1/sweeps/ffffffff", json={"name": "x"}), 404, "sweep_not_found")
