"""TensorBoard runs are named after the run (its name, or its spec's shape, and the short id), and carry the
verdict as numbers: scalars and HPARAMS metric columns."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from graddiag.models.spec import Spec
from graddiag.service.export.archive import folder_name
from graddiag.service.export.tensorboard import EVENT_FILE, write_events
from graddiag.service.settings import Settings
from graddiag.service.store.db import make_engine
from tests.support.api import TINY
from tests.support.reports import plain_report, store_report

RUN_ID = "0f197c4548084671b4d1621521759497"
SPEC = {"arch": "mlp", "depth": 20, "width": 256, "activation": "sigmoid"}


@pytest.mark.parametrize(
    ("name", "spec", "model", "expected"),
    [
        ("baseline", SPEC, None, "baseline-0f197c45"),
        ("lr 0.1 / adam: take 2", SPEC, None, "lr-0.1-adam-take-2-0f197c45"),
        ("../../etc", SPEC, None, "etc-0f197c45"),
        ("é", SPEC, None, "run-0f197c45"),
        ("x" * 300, SPEC, None, "x" * 60 + "-0f197c45"),
        (None, SPEC, None, "mlp-d20-w256-sigmoid-0f197c45"),
        (None, None, {"class_name": "ResNet"}, "ResNet-0f197c45"),
    ],
)
def test_folder_names(name: str | None, spec: dict | None, model: dict | None, expected: str) -> None:
    assert folder_name(RUN_ID, name, spec, model) == expected


def _read(log_dir: Path) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_the_verdict_is_exported_as_numbers(tmp_path: Path) -> None:
    report = plain_report(Spec.model_validate(TINY), "vanishing")  # decades_per_layer -1.0, no act slope
    acc = _read(write_events(report, tmp_path / "run"))
    last = max(step.step for step in report.steps)
    label = acc.Scalars("verdict/label")
    assert [(e.step, e.value) for e in label] == [(last, 1.0)]  # 0 healthy, 1 vanishing, 2 exploding
    assert [e.value for e in acc.Scalars("verdict/decades_per_layer")] == [-1.0]
    assert "verdict/act_decades_per_layer" not in acc.Tags()["scalars"]  # the report has none
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert metrics[:2] == ["verdict/label", "verdict/decades_per_layer"]
    assert "verdict/act_decades_per_layer" not in metrics and set(metrics) <= set(acc.Tags()["scalars"])


@pytest.mark.anyio
async def test_a_named_runs_download_is_named_after_it(api: httpx.AsyncClient, settings: Settings) -> None:
    engine = make_engine(settings.db_url)
    run_id = store_report(engine, plain_report(Spec.model_validate(TINY)))
    engine.dispose()
    await api.patch(f"/v1/runs/{run_id}", json={"name": "my baseline"})
    response = await api.get(f"/v1/runs/{run_id}/tensorboard")
    assert response.status_code == 200
    assert (
        response.headers["content-disposition"] == f'attachment; filename="my-baseline-{run_id[:8]}-tensorboard.tar.gz"'
    )
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        assert tar.getnames() == [f"my-baseline-{run_id[:8]}/{EVENT_FILE}"]
