"""Where CIFAR-10 is on disk, and fetching the official archive when it is nowhere — without torch.

The API imports this (to say in `/readyz` and at submit time whether the data is there) and must not
import torch, so it holds only file checks, the download and the unpacking; decoding is engine.data's.

A copy is looked for in the data directory (GRADDIAG_DATA_DIR); without one configured, in the
download directory under the cache (``<cache_dir>/datasets/cifar10``). When none is found and downloads
are allowed, :func:`download_cifar10` streams the official ``cifar-10-python.tar.gz`` with a progress
line on the terminal, checks its MD5 against the published one before unpacking anything, and unpacks
``cifar-10-batches-py/`` (refusing links and paths outside the target, tarfile's "data" filter).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final, TextIO

BATCHES_DIR: Final = "cifar-10-batches-py"
_CHUNK: Final = 1 << 20
# The progress line is redrawn at most this often (a 170 MB download is ~170 chunks).
_PROGRESS_SECONDS: Final = 0.2


class DataDownloadError(RuntimeError):
    """The CIFAR-10 download failed; the message says why and how to use a local copy instead."""


def find_cifar10(directory: Path | None) -> Path | None:
    """`directory` when it holds CIFAR-10 in a layout the engine reads, else None.

    The layouts are those of engine.data: ``cifar-10-batches-py/`` inside it (or it being that folder),
    or ``train/`` and ``test/`` class folders.
    """
    if directory is None:
        return None
    directory = directory.expanduser()
    if (directory / BATCHES_DIR).is_dir() or (directory.name == BATCHES_DIR and directory.is_dir()):
        return directory
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        return directory
    return None


def how_to_fix(target: Path) -> str:
    """What a user can do when no copy is there and none can be downloaded."""
    return (
        f"Either copy the official {BATCHES_DIR} folder (or train/<class>/ and test/<class>/ image folders) into "
        f"{target} or another directory and set GRADDIAG_DATA_DIR (graddiag probe: --data-dir) to it, or let "
        "graddiag download it (GRADDIAG_DOWNLOAD_DATA=true, the default, with internet access), or use "
        "dataset='synthetic', which needs no data."
    )


class _Progress:
    """`CIFAR-10: 45% 73.1/162.6 MB 9.8 MB/s` redrawn in place on a terminal, a line per 10% elsewhere."""

    def __init__(self, stream: TextIO | None, total: int | None) -> None:
        self.stream = stream
        self.total = total
        self.started = time.monotonic()
        self.shown = 0.0
        self.tenths = -1
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())

    def update(self, done: int, final: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        rate = done / max(now - self.started, 1e-6) / 1e6
        size = f"{done / 1e6:.1f}" + (f"/{self.total / 1e6:.1f}" if self.total else "") + " MB"
        percent = f"{100 * done // self.total:3d}% " if self.total else ""
        line = f"downloading CIFAR-10: {percent}{size} {rate:.1f} MB/s"
        if self.tty:
            if final or now - self.shown >= _PROGRESS_SECONDS:
                self.stream.write("\r" + line + ("\n" if final else ""))
                self.stream.flush()
                self.shown = now
            return
        tenths = 10 * done // self.total if self.total else -1
        if final or tenths > self.tenths:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.tenths = tenths


def download_cifar10(
    target: Path,
    *,
    url: str,
    md5: str,
    progress: TextIO | None = sys.stderr,
    timeout: float = 60.0,
) -> Path:
    """Download the CIFAR-10 archive from `url` into `target`, check its MD5, unpack it; `target`.

    Afterwards `target` holds ``cifar-10-batches-py/`` and no archive. Nothing is unpacked from an archive
    whose checksum differs. Raises DataDownloadError saying what failed and how to use a local copy.
    """
    target = target.expanduser()
    archive = target / "cifar-10-python.tar.gz.part"
    try:
        target.mkdir(parents=True, exist_ok=True)
        digest = hashlib.md5(usedforsecurity=False)
        with urllib.request.urlopen(url, timeout=timeout) as response, archive.open("wb") as out:
            length = response.headers.get("Content-Length")
            meter = _Progress(progress, int(length) if length and length.isdigit() else None)
            done = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                meter.update(done)
            meter.update(done, final=True)
        if digest.hexdigest() != md5.lower():
            raise DataDownloadError(
                f"The CIFAR-10 archive downloaded from {url} is corrupt: its MD5 is {digest.hexdigest()}, "
                f"not the published {md5}. Nothing was unpacked. {how_to_fix(target)}"
            )
        # Unpacked beside the target, then moved in whole: an interrupted unpack never looks like a copy.
        unpacking = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=target))
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                tar.extractall(unpacking, filter="data")
            if not (unpacking / BATCHES_DIR).is_dir():
                raise DataDownloadError(f"The archive from {url} holds no {BATCHES_DIR} folder. {how_to_fix(target)}")
            os.replace(unpacking / BATCHES_DIR, target / BATCHES_DIR)
        finally:
            shutil.rmtree(unpacking, ignore_errors=True)
    except DataDownloadError:
        raise
    except (urllib.error.URLError, OSError, tarfile.TarError, ValueError) as exc:
        # URLError covers no network and unknown hosts, HTTPError a 404, OSError timeouts and a full disk.
        reason = getattr(exc, "reason", None) or exc
        raise DataDownloadError(
            f"Downloading CIFAR-10 from {url} into {target} failed: {reason}. {how_to_fix(target)}"
        ) from exc
    finally:
        archive.unlink(missing_ok=True)
    return target


def ensure_cifar10(
    directory: Path,
    *,
    download: bool,
    url: str,
    md5: str,
    progress: TextIO | None = sys.stderr,
) -> Path:
    """The directory holding CIFAR-10: `directory` if a copy is there, else (with `download`) after fetching it.

    Raises DataDownloadError when there is none and it may not, or could not, be downloaded.
    """
    found = find_cifar10(directory)
    if found is not None:
        return found
    if not download:
        raise DataDownloadError(f"CIFAR-10 was not found in {directory} and downloads are off. {how_to_fix(directory)}")
    return download_cifar10(directory, url=url, md5=md5, progress=progress)
