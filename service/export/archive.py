"""A stored run's TensorBoard events as one tar.gz, for the API's download route and the CLI's export.

The worker-written events (with gradient histograms) when the run was probed with TensorBoard on,
otherwise events built now from the stored report (scalars and text, no histograms). Unpacked into a
log root (``tar xzf run.tar.gz -C logs``) the archive is one TensorBoard run, named after the run (see
`folder_name`: its name, or its spec's shape, then the short id) rather than a 32-hex id.
Failures are domain errors (RunNotFound, RunNotSucceeded, TensorBoardUnavailable); the API turns them
into problems, the CLI into messages.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Literal

from sqlalchemy.orm import Session

from graddiag.service.settings import Settings
from graddiag.service.store import runs as store
from graddiag.service.store.runs import RunNotFound

# The optional dependencies of the TensorBoard exporter.
EXTRA: Final = "graddiag[tensorboard]"


class RunNotSucceeded(Exception):
    """Only a succeeded run has events; this one is `status`."""

    def __init__(self, run_id: str, status: str) -> None:
        self.run_id = run_id
        self.status = status
        super().__init__(f"run {run_id!r} is {status}; only a succeeded run has TensorBoard events")


class TensorBoardUnavailable(Exception):
    """The `tensorboard` package, which writes the events, is not installed here."""

    def __init__(self) -> None:
        super().__init__(f"TensorBoard export needs the 'tensorboard' package on the server: pip install '{EXTRA}'.")


@dataclass(frozen=True)
class EventsArchive:
    """A run's events as a gzipped tar, and whether the worker wrote them or they were built from the report."""

    data: bytes
    source: Literal["worker", "report"]
    folder: str  # the one folder in the archive: the TensorBoard run's name


def _exporter() -> ModuleType:
    try:
        import graddiag.service.export.tensorboard as export
    except ImportError as exc:
        raise TensorBoardUnavailable from exc
    return export


# A name in a folder name: letters, digits, '.', '_' and '-'; anything else becomes '-'.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 60


def folder_name(run_id: str, name: str | None, spec: Mapping[str, Any] | None, model: Mapping[str, Any] | None) -> str:
    """The TensorBoard run (folder) name of a stored run: what tells runs apart in TensorBoard's list.

    `<name>-<id8>` for a named run, else `<arch>-d<depth>-w<width>-<activation>-<id8>` for a probe or
    `<model class>-<id8>` for an uploaded report. The short id keeps it unique; the result is one safe path
    component.
    """
    if name:
        label = name
    elif spec:
        label = f"{spec.get('arch')}-d{spec.get('depth')}-w{spec.get('width')}-{spec.get('activation')}"
    elif model:
        label = str(model.get("class_name") or "model")
    else:
        label = "run"
    slug = _UNSAFE.sub("-", label).strip("-.")[:_MAX_NAME].strip("-.") or "run"
    return f"{slug}-{run_id[:8]}"


def events_archive(session: Session, settings: Settings, run_id: str) -> EventsArchive:
    """The run's events as a tar.gz, in one folder named by `folder_name`.

    Raises RunNotFound, RunNotSucceeded for a run that has not succeeded, TensorBoardUnavailable
    without the tensorboard package.
    """
    try:
        log_dir = settings.tensorboard_run_dir(run_id)
    except ValueError:
        # No run can have such an id (ids are uuid hex), and it must never reach the file system.
        raise RunNotFound(run_id) from None
    run = store.get_run(session, run_id)
    if run.status != "succeeded":
        raise RunNotSucceeded(run_id, run.status)
    export = _exporter()
    folder = folder_name(run.id, run.name, run.spec, run.model)
    if log_dir.is_dir():
        try:
            return EventsArchive(export.archive(log_dir, arcname=folder), "worker", folder)
        except FileNotFoundError:
            pass  # the directory holds no event file (a write that failed midway): build them from the report
    report = store.load_report(session, run_id)
    assert report is not None  # the run has succeeded
    with tempfile.TemporaryDirectory(prefix="graddiag-tb-") as scratch:
        built = export.write_events(report, Path(scratch) / folder)
        return EventsArchive(export.archive(built, arcname=folder), "report", folder)
