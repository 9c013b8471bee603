"""First run on a fresh machine: CIFAR-10 is downloaded (checksum verified, progress shown) when no copy is
found — here from a local HTTP server on 127.0.0.1 serving a small fake archive — or the user is told
exactly what to do; `/readyz`, the dashboard and submissions say whether the data is there."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torchvision

from graddiag.service.engine.dataset_files import DataDownloadError, download_cifar10, ensure_cifar10, find_cifar10
from graddiag.service.local import probe
from graddiag.service.serve import prepare_cifar10
from graddiag.service.settings import Settings
from tests.support.api import TINY, assert_problem, serve_app
from tests.support.cifar import fake_archive, write_batches_py


class Files:
    """A local HTTP server answering GET /<name> with the bytes given for it (404 otherwise)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        files, requests = self.files, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                body = files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _no_configured_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests stand for a fresh machine: CI's GRADDIAG_DATA_DIR (the shared copy) must not leak in."""
    monkeypatch.delenv("GRADDIAG_DATA_DIR", raising=False)


@pytest.fixture
def files() -> Iterator[Files]:
    server = Files()
    yield server
    server.close()


@pytest.fixture
def archive(tmp_path: Path, files: Files) -> tuple[str, str]:
    """(URL, MD5) of a fake CIFAR-10 archive on the local server."""
    data, md5 = fake_archive(tmp_path / "source")
    files.files["cifar-10-python.tar.gz"] = data
    return f"{files.url}/cifar-10-python.tar.gz", md5


def test_download_verifies_unpacks_and_shows_progress(tmp_path: Path, archive: tuple[str, str]) -> None:
    url, md5 = archive
    progress = io.StringIO()
    target = tmp_path / "data"
    assert download_cifar10(target, url=url, md5=md5, progress=progress) == target
    assert sorted(p.name for p in (target / "cifar-10-batches-py").iterdir()) == sorted(
        p.name for p in (tmp_path / "source" / "cifar-10-batches-py").iterdir()
    )
    assert find_cifar10(target) == target
    # The archive and the unpacking folder are gone: only the data set remains.
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-batches-py"]
    lines = progress.getvalue().splitlines()
    assert lines and lines[-1].startswith("downloading CIFAR-10: 100% ") and " MB" in lines[-1]


def test_a_corrupt_archive_is_refused_and_nothing_unpacked(tmp_path: Path, archive: tuple[str, str]) -> None:
    url, md5 = archive
    with pytest.raises(DataDownloadError) as info:
        download_cifar10(tmp_path / "data", url=url, md5="0" * 32, progress=None)
    message = str(info.value)
    assert "corrupt" in message and md5 in message and "0" * 32 in message and "GRADDIAG_DATA_DIR" in message
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize("where", ["missing file", "closed port"])
def test_a_failed_download_says_what_to_do(tmp_path: Path, files: Files, where: str) -> None:
    url = f"{files.url}/nothing.tar.gz" if where == "missing file" else "http://127.0.0.1:9/cifar-10-python.tar.gz"
    with pytest.raises(DataDownloadError) as info:
        download_cifar10(tmp_path / "data", url=url, md5="0" * 32, progress=None)
    message = str(info.value)
    assert f"Downloading CIFAR-10 from {url} into {tmp_path / 'data'} failed" in message
    assert ("Not Found" if where == "missing file" else "refused") in message
    for advice in ("cifar-10-batches-py", "GRADDIAG_DATA_DIR", "--data-dir", "dataset='synthetic'"):
        assert advice in message


def test_an_archive_escaping_its_folder_is_refused(tmp_path: Path, files: Files) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    data = buffer.getvalue()
    files.files["evil.tar.gz"] = data
    with pytest.raises(DataDownloadError):
        download_cifar10(
            tmp_path / "data",
            url=f"{files.url}/evil.tar.gz",
            md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
            progress=None,
        )
    assert not (tmp_path / "escaped.txt").exists()


def test_ensure_uses_a_copy_in_place_and_downloads_only_when_allowed(
    tmp_path: Path, files: Files, archive: tuple[str, str]
) -> None:
    url, md5 = archive
    present = tmp_path / "present"
    write_batches_py(present)
    assert ensure_cifar10(present, download=True, url=url, md5=md5, progress=None) == present
    assert files.requests == []  # a copy in place: no download
    with pytest.raises(DataDownloadError, match="downloads are off"):
        ensure_cifar10(tmp_path / "absent", download=False, url=url, md5=md5, progress=None)
    assert files.requests == []


def test_first_probe_on_a_fresh_machine_downloads_then_trains(
    tmp_path: Path, archive: tuple[str, str], files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake batches cannot match torchvision's md5 sums of the official files; only the test skips that
    # check (the archive's own checksum is verified above).
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    url, md5 = archive
    settings = Settings(cache_dir=tmp_path / "cache", data_url=url, data_md5=md5, eval_samples=10)
    report = probe({**TINY, "dataset": "cifar10", "steps": 2}, settings=settings)
    assert report.timing.steps_run == 2 and report.eval.samples == 10
    # Without a data_dir, the data set lands under the cache directory; the next probe reuses it.
    assert find_cifar10(tmp_path / "cache" / "datasets" / "cifar10") is not None
    probe({**TINY, "dataset": "cifar10", "steps": 1}, settings=settings)
    assert files.requests == ["/cifar-10-python.tar.gz"]


def test_serve_prepares_the_data_before_the_workers(
    tmp_path: Path, archive: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    url, md5 = archive
    settings = Settings(data_dir=tmp_path / "data", data_url=url, data_md5=md5)
    assert prepare_cifar10(settings, progress=None) is True
    assert find_cifar10(tmp_path / "data") is not None
    offline = Settings(data_dir=tmp_path / "elsewhere", download_data=False)
    assert prepare_cifar10(offline, progress=None) is False
    assert "runs with dataset='cifar10' are refused" in caplog.text and "GRADDIAG_DATA_DIR" in caplog.text


# --- what the API and the dashboard say ----------------------------------------------------------------------


def _local_workers() -> tuple[int, int]:
    return 1, 1


@pytest.mark.anyio
async def test_without_data_readyz_says_so_and_cifar10_specs_are_refused(settings: Settings) -> None:
    async with serve_app(settings, _local_workers) as api:
        ready = await api.get("/readyz")
        assert ready.status_code == 200  # still ready: synthetic runs work
        check = ready.json()["cifar10"]
        assert check["ok"] is False and str(settings.cifar10_dir()) in check["detail"]

        body = assert_problem(await api.post("/v1/runs", json={**TINY, "dataset": "cifar10"}), 503, "data_unavailable")
        assert "dataset='cifar10'" in body["detail"] and "GRADDIAG_DATA_DIR" in body["detail"]
        assert (await api.post("/v1/runs", json={**TINY, "dataset": "synthetic"})).status_code == 202
        sweep = await api.post("/v1/sweeps", json={"base": {**TINY, "dataset": "cifar10"}, "grid": {"depth": [2, 3]}})
        assert_problem(sweep, 503, "data_unavailable")
        mixed = {"base": TINY, "grid": {"dataset": ["synthetic", "cifar10"]}}
        assert_problem(await api.post("/v1/sweeps", json=mixed), 503, "data_unavailable")
        # Nothing was queued by the refused submissions.
        assert (await api.get("/v1/runs")).json()["total"] == 1

        page = await api.get("/")
        assert 'id="data-notice"' in page.text and "not found in" in page.text


@pytest.mark.anyio
async def test_with_data_readyz_names_it_and_submissions_pass(settings: Settings, tmp_path: Path) -> None:
    write_batches_py(tmp_path / "copy")
    with_data = settings.model_copy(update={"data_dir": tmp_path / "copy"})
    async with serve_app(with_data, _local_workers) as api:
        check = (await api.get("/readyz")).json()["cifar10"]
        assert check == {"ok": True, "detail": f"available in {tmp_path / 'copy'}"}
        assert (await api.post("/v1/runs", json={**TINY, "dataset": "cifar10"})).status_code == 202
        assert 'id="data-notice"' not in (await api.get("/")).text


@pytest.mark.anyio
@pytest.mark.parametrize("probe", [None, lambda: (0, 0)], ids=["api alone", "serve without local workers"])
async def test_an_api_apart_from_its_workers_does_not_judge_their_data(settings: Settings, probe: Any) -> None:
    async with serve_app(settings, probe) as api:
        assert (await api.get("/readyz")).json()["cifar10"]["detail"].startswith("not monitored")
        assert (await api.post("/v1/runs", json={**TINY, "dataset": "cifar10"})).status_code == 202
