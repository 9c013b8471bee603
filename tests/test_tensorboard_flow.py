"""TensorBoard through the service: the worker's events with histograms, the download, `tensorboard-export`."""

from __future__ import annotations

import io
import logging
import sys
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from graddiag.service.cli import main
from graddiag.service.export.archive import folder_name
from graddiag.service.export.tensorboard import EVENT_FILE
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine, make_sessionmaker
from graddiag.service.store.runs import gradient_rows, layer_rows
from graddiag.service.worker.worker import run_worker

# Shared fixtures (imported so pytest finds them here too).
from tests.support.api import TINY, assert_problem, serve_app

pytestmark = pytest.mark.anyio

LAYER_FIELDS = ("grad_norm", "act_grad_norm", "rel_grad", "update_ratio")


@contextmanager
def running_worker(config: Settings) -> Iterator[None]:
    """A real worker loop in a thread of this process, with these settings."""
    stop = threading.Event()
    thread = threading.Thread(target=run_worker, args=(config,), kwargs={"stop": stop, "grace_seconds": 0}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


def read(log_dir: Path) -> event_accumulator.EventAccumulator:
    guidance = dict.fromkeys(event_accumulator.DEFAULT_SIZE_GUIDANCE, 0)
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


def folder(run: dict[str, Any]) -> str:
    """The TensorBoard run name of a stored run (its archive's one folder)."""
    return folder_name(run["id"], run.get("name"), run.get("spec"), run.get("model"))


def unpack(data: bytes, into: Path, run: dict[str, Any]) -> Path:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert tar.getnames() == [f"{folder(run)}/{EVENT_FILE}"]
        tar.extractall(into, filter="data")
    return into / folder(run)


def assert_events_equal_the_store(db_url: str, run_id: str, log_dir: Path, *, histograms: bool) -> None:
    """Every per-layer scalar equals the stored record (as float32); histograms at every recorded step or none."""
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            layers, records = layer_rows(session, run_id), gradient_rows(session, run_id)
    finally:
        engine.dispose()
    accumulator = read(log_dir)
    for layer in layers:
        for field in LAYER_FIELDS:
            expected = {
                r.step: float(np.float32(v)) for r in records if r.layer == layer.index and (v := getattr(r, field))
            }
            events = accumulator.Scalars(f"{field}/{layer.name}")
            assert {e.step: e.value for e in events} == expected, (field, layer.name)
    if not histograms:
        assert not accumulator.Tags()["histograms"]
        return
    recorded = sorted({r.step for r in records})
    for layer in layers:
        events = accumulator.Histograms(f"grad/{layer.name}")
        assert [e.step for e in events] == recorded
        # record_every=1 and a tiny network: the histogram holds every value, so its L2 norm is the recorded one.
        for event in events:
            (norm,) = [r.grad_norm for r in records if r.step == event.step and r.layer == layer.index]
            assert np.sqrt(event.histogram_value.sum_squares) == pytest.approx(norm, rel=1e-4)


async def submit_and_wait(api: httpx.AsyncClient, spec: dict[str, Any]) -> dict[str, Any]:
    response = await api.post("/v1/runs", params={"wait": 60}, json=spec)
    assert response.status_code == 200, response.text
    run: dict[str, Any] = response.json()
    assert run["status"] == "succeeded"
    return run


async def test_the_worker_writes_histograms_when_the_spec_asks(settings: Settings, tmp_path: Path) -> None:
    async with serve_app(settings) as api:
        with running_worker(settings):
            run = await submit_and_wait(api, {**TINY, "tensorboard": True})
        written = settings.tensorboard_run_dir(run["id"])
        assert written == tmp_path / "graddiag-tensorboard" / run["id"]  # beside the SQLite file by default
        assert [p.name for p in written.iterdir()] == [EVENT_FILE]

        response = await api.get(f"/v1/runs/{run['id']}/tensorboard")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/gzip"
    assert response.headers["graddiag-events-source"] == "worker"
    assert f'filename="{folder(run)}-tensorboard.tar.gz"' in response.headers["content-disposition"]
    log_dir = unpack(response.content, tmp_path / "download", run)
    assert (log_dir / EVENT_FILE).read_bytes() == (written / EVENT_FILE).read_bytes()
    assert_events_equal_the_store(settings.db_url, run["id"], log_dir, histograms=True)


async def test_without_tensorboard_the_download_is_built_from_the_report(settings: Settings, tmp_path: Path) -> None:
    async with serve_app(settings) as api:
        with running_worker(settings):
            run = await submit_and_wait(api, TINY)
        assert not settings.tensorboard_root().exists()  # the worker wrote nothing
        response = await api.get(f"/v1/runs/{run['id']}/tensorboard")
    assert response.status_code == 200 and response.headers["graddiag-events-source"] == "report"
    log_dir = unpack(response.content, tmp_path / "download", run)
    assert_events_equal_the_store(settings.db_url, run["id"], log_dir, histograms=False)


async def test_tensorboard_all_writes_every_run(settings: Settings, tmp_path: Path) -> None:
    everything = settings.model_copy(update={"tensorboard_all": True, "tensorboard_dir": tmp_path / "tb"})
    async with serve_app(everything) as api:
        with running_worker(everything):
            run = await submit_and_wait(api, TINY)
        response = await api.get(f"/v1/runs/{run['id']}/tensorboard")
    assert (tmp_path / "tb" / run["id"] / EVENT_FILE).is_file()
    assert response.headers["graddiag-events-source"] == "worker"
    assert_events_equal_the_store(
        everything.db_url, run["id"], unpack(response.content, tmp_path / "d", run), histograms=True
    )


async def test_a_failed_write_warns_and_the_run_still_succeeds(
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the events root should be")
    broken = settings.model_copy(update={"tensorboard_dir": blocked})
    caplog.set_level(logging.WARNING, logger="graddiag.service.worker.worker")
    async with serve_app(broken) as api:
        with running_worker(broken):
            run = await submit_and_wait(api, {**TINY, "tensorboard": True})
        response = await api.get(f"/v1/runs/{run['id']}/tensorboard")
    assert any("could not write TensorBoard events" in r.getMessage() for r in caplog.records)
    assert response.status_code == 200 and response.headers["graddiag-events-source"] == "report"


async def test_refusals(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve_app(settings) as api:
        queued = (await api.post("/v1/runs", json=TINY)).json()
        body = assert_problem(await api.get(f"/v1/runs/{queued['id']}/tensorboard"), 409, "run_not_succeeded")
        assert "queued" in body["detail"]
        assert_problem(await api.get("/v1/runs/feed/tensorboard"), 404, "run_not_found")
        assert_problem(await api.get("/v1/runs/%2E%2E/tensorboard"), 404, "run_not_found")
        assert_problem(await api.get("/v1/runs/a%5C..%5Cb/tensorboard"), 404, "run_not_found")

        with running_worker(settings):
            run = await submit_and_wait(api, TINY)
        monkeypatch.setitem(sys.modules, "graddiag.service.export.tensorboard", None)  # as if tensorboard were absent
        body = assert_problem(await api.get(f"/v1/runs/{run['id']}/tensorboard"), 501, "tensorboard_unavailable")
    assert "graddiag[tensorboard]" in body["detail"]


def test_run_dirs_stay_inside_the_root(tmp_path: Path) -> None:
    beside = Settings(db_url=f"sqlite:///{tmp_path / 'store' / 'main.db'}")
    assert beside.tensorboard_root() == tmp_path / "store" / "main-tensorboard"
    assert beside.tensorboard_run_dir("ab12") == tmp_path / "store" / "main-tensorboard" / "ab12"
    for bad in ("..", ".", "", "a/b", "../x", "a\\b", "/etc", "a b"):
        with pytest.raises(ValueError, match="not a run id"):
            beside.tensorboard_run_dir(bad)
    assert Settings(db_url="postgresql://db/graddiag").tensorboard_root() == Path("graddiag-tensorboard")
    assert Settings(db_url="sqlite://", tensorboard_dir=tmp_path / "tb").tensorboard_root() == tmp_path / "tb"


# --- graddiag tensorboard-export ----------------------------------------------------------------------


def test_export_from_the_database_and_from_the_server(
    settings: Settings,
    base_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with running_worker(settings), httpx.Client(base_url=base_url, timeout=60) as http:
        with_histograms = http.post("/v1/runs", params={"wait": 60}, json={**TINY, "tensorboard": True}).json()
        plain = http.post("/v1/runs", params={"wait": 60}, json=TINY).json()
        queued_spec = {**TINY, "steps": 5000, "width": 4, "batch_size": 2}
    queued = httpx.post(f"{base_url}/v1/runs", json=queued_spec).json()  # no worker left: stays queued
    assert with_histograms["status"] == plain["status"] == "succeeded"

    logs = tmp_path / "logs"
    assert main(["tensorboard-export", with_histograms["id"], str(logs), "--db", settings.db_url]) == 0
    assert capsys.readouterr().out.strip() == str(logs / folder(with_histograms))
    assert_events_equal_the_store(
        settings.db_url, with_histograms["id"], logs / folder(with_histograms), histograms=True
    )

    assert main(["tensorboard-export", plain["id"], str(logs), "--url", base_url]) == 0
    assert capsys.readouterr().out.strip() == str(logs / folder(plain))
    assert_events_equal_the_store(settings.db_url, plain["id"], logs / folder(plain), histograms=False)
    # Exporting again replaces the run's events rather than adding a second file.
    assert main(["tensorboard-export", plain["id"], str(logs), "--db", settings.db_url]) == 0
    assert [p.name for p in (logs / folder(plain)).iterdir()] == [EVENT_FILE]
    capsys.readouterr()

    assert main(["tensorboard-export", queued["id"], str(logs), "--db", settings.db_url]) == 1
    assert "queued" in capsys.readouterr().err
    assert main(["tensorboard-export", queued["id"], str(logs), "--url", base_url]) == 1
    assert "409" in capsys.readouterr().err
    assert main(["tensorboard-export", "feed", str(logs), "--db", settings.db_url]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["tensorboard-export", plain["id"], str(logs), "--db", settings.db_url, "--url", base_url]) == 2
    assert not (logs / folder(queued)).exists()
