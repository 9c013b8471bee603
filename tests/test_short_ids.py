"""Short ids: every endpoint, the dashboard and the CLI take a unique id prefix of ≥ 6 characters; an
ambiguous one is a 409 naming the candidates."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from graddiag.models.spec import Spec, SpecCaps
from graddiag.service.cli import main
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine, make_sessionmaker
from graddiag.service.store.runs import build_run
from graddiag.service.store.sweeps import create_sweep
from graddiag.service.store.tables import Run
from tests.support.api import TINY, assert_problem
from tests.support.reports import plain_report, succeed

pytestmark = pytest.mark.anyio

# Two runs sharing the prefix "abcdef0", a third alone under "abcde9".
TWINS = ("abcdef0" + "1" * 25, "abcdef0" + "2" * 25)
SINGLE = "abcde9" + "3" * 26


@pytest.fixture
def seeded(settings: Settings) -> Iterator[dict[str, Any]]:
    """Three succeeded runs with chosen ids, and a sweep of two runs (ids as uuid4 gives them)."""
    engine = make_engine(settings.db_url)
    spec = Spec.model_validate(TINY)
    with make_sessionmaker(engine)() as session:
        for run_id in (*TWINS, SINGLE):
            run = build_run(spec)
            run.id = run_id
            session.add(run)
        session.commit()
        sweep = create_sweep(session, TINY, {"depth": [2, 3]}, caps=SpecCaps(), max_size=8)
    for run_id in (*TWINS, SINGLE):
        succeed(engine, run_id, plain_report(spec))
    yield {"sweep": sweep.id}
    engine.dispose()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/runs/{}",
        "/v1/runs/{}/layers",
        "/v1/runs/{}/gradients",
        "/v1/runs/{}/gradients?format=csv",
    ],
)
async def test_a_unique_prefix_names_the_run(api: httpx.AsyncClient, seeded: dict[str, Any], path: str) -> None:
    full = await api.get(path.format(SINGLE))
    for prefix in (SINGLE[:6], SINGLE[:7], SINGLE[:12].upper()):
        response = await api.get(path.format(prefix))
        assert response.status_code == 200, response.text
        assert response.content == full.content


async def test_the_run_read_by_prefix_carries_its_full_id(api: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    assert (await api.get(f"/v1/runs/{SINGLE[:8]}")).json()["id"] == SINGLE


async def test_an_ambiguous_prefix_is_a_409_naming_the_candidates(
    api: httpx.AsyncClient, seeded: dict[str, Any]
) -> None:
    for request in (
        api.get(f"/v1/runs/{TWINS[0][:7]}"),
        api.get(f"/v1/runs/{TWINS[0][:6]}/layers"),
        api.post(f"/v1/runs/{TWINS[0][:6]}/cancel"),
        api.delete(f"/v1/runs/{TWINS[0][:6]}"),
        api.get("/v1/compare", params={"run_id": TWINS[0][:6]}),
    ):
        body = assert_problem(await request, 409, "ambiguous_id")
        assert TWINS[0] in body["detail"] and TWINS[1] in body["detail"]
    # Nothing was deleted by the ambiguous DELETE.
    assert (await api.get(f"/v1/runs/{TWINS[0]}")).status_code == 200


async def test_short_or_unknown_prefixes_are_404(api: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    # Under 6 characters a prefix would match by accident as the store grows: not accepted.
    assert_problem(await api.get(f"/v1/runs/{SINGLE[:5]}"), 404, "run_not_found")
    assert_problem(await api.get("/v1/runs/ffffff"), 404, "run_not_found")
    # LIKE wildcards in the input are literal characters.
    assert_problem(await api.get("/v1/runs/abcde%25"), 404, "run_not_found")
    assert_problem(await api.get("/v1/runs/abcdef_"), 404, "run_not_found")


async def test_cancel_and_delete_by_prefix(api: httpx.AsyncClient, settings: Settings) -> None:
    run = (await api.post("/v1/runs", json=TINY)).json()
    cancelled = await api.post(f"/v1/runs/{run['id'][:8]}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert (await api.delete(f"/v1/runs/{run['id'][:8]}")).status_code == 204
    assert_problem(await api.get(f"/v1/runs/{run['id']}"), 404, "run_not_found")


async def test_sweeps_by_prefix(api: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    sweep = seeded["sweep"]
    status = await api.get(f"/v1/sweeps/{sweep[:8]}")
    assert status.status_code == 200 and status.json()["id"] == sweep
    summary = await api.get(f"/v1/sweeps/{sweep[:8]}/summary")
    assert summary.status_code == 200 and summary.json()["id"] == sweep
    # The runs table's sweep filter takes the short id too.
    listed = (await api.get("/v1/runs", params={"sweep_id": sweep[:8]})).json()
    assert listed["total"] == 2 and {item["sweep_id"] for item in listed["items"]} == {sweep}
    assert_problem(await api.get(f"/v1/sweeps/{sweep[:5]}"), 404, "sweep_not_found")


async def test_compare_by_prefix(api: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    response = await api.get("/v1/compare", params=[("run_id", SINGLE[:8]), ("run_id", TWINS[1][:8])])
    assert response.status_code == 200, response.text
    assert [run["run_id"] for run in response.json()["runs"]] == [SINGLE, TWINS[1]]


async def test_dashboard_pages_take_prefixes(api: httpx.AsyncClient, seeded: dict[str, Any]) -> None:
    page = await api.get(f"/runs/{SINGLE[:8]}")
    assert page.status_code == 200 and f'data-run-id="{SINGLE}"' in page.text
    sweep = await api.get(f"/sweeps/{seeded['sweep'][:8]}")
    assert sweep.status_code == 200 and f'data-sweep-id="{seeded["sweep"]}"' in sweep.text
    compare = await api.get("/compare", params=[("run_id", SINGLE[:8]), ("run_id", TWINS[0][:8])])
    assert compare.status_code == 200 and f'data-run-ids="{SINGLE},{TWINS[0]}"' in compare.text
    # An ambiguous prefix: a page linking each candidate.
    ambiguous = await api.get(f"/runs/{TWINS[0][:6]}")
    assert ambiguous.status_code == 409
    assert f'href="/runs/{TWINS[0]}"' in ambiguous.text and f'href="/runs/{TWINS[1]}"' in ambiguous.text
    assert (await api.get(f"/runs/{SINGLE[:5]}")).status_code == 404


def test_cli_status_takes_the_short_id_it_prints(
    base_url: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = make_engine(settings.db_url)
    with make_sessionmaker(engine)() as session:
        run = build_run(Spec.model_validate(TINY))
        session.add(run)
        session.commit()
        run_id = run.id
        session.execute(update(Run).where(Run.id == run_id).values(status="queued"))
        session.commit()
    engine.dispose()
    assert main(["status", run_id[:8], "--url", base_url]) == 0
    assert f"run {run_id}: queued" in capsys.readouterr().out
