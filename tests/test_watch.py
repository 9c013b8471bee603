"""graddiag.watch inside the user's own loop: what it records and when, include/exclude, evaluation passes,
DataParallel, DistributedDataParallel (gloo, world size 1) and torch.compile."""

from __future__ import annotations

import copy
import os
import socket
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import graddiag
from graddiag.service.engine.watch import Watch


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def _data(n: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(n)]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, data: list[tuple[Tensor, Tensor]], w: Watch) -> None:
    for inputs, targets in data:
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        w.loss(loss)
        with torch.no_grad():  # an evaluation pass between steps changes nothing recorded
            model.eval()
            model(inputs)
            model.train()


def _step0_norms(model: nn.Module, data: list[tuple[Tensor, Tensor]], names: list[str]) -> list[float]:
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    loss = F.cross_entropy(reference(data[0][0]), data[0][1])
    grads = torch.autograd.grad(loss, [modules[name].weight for name in names])
    return [float(torch.linalg.vector_norm(g, dtype=torch.float64)) for g in grads]


def test_watch_records_every_nth_step_and_matches_autograd() -> None:
    model, data = _net(), _data(12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    expected_names = ["0", "1", "3", "7", "9"]
    expected = _step0_norms(model, data, expected_names)
    with graddiag.watch(model, optimizer, every=5) as w:
        _train(model, optimizer, data, w)
    report = w.report()
    assert [layer.name for layer in report.layers] == expected_names
    assert sorted({r.step for r in report.records}) == [0, 5, 10]
    assert [s.step for s in report.steps] == [0, 5, 10]
    assert all(s.loss is not None for s in report.steps)
    step0 = [r for r in report.records if r.step == 0]
    for record, want in zip(step0, expected, strict=True):
        assert record.grad_norm == pytest.approx(want, rel=1e-5)
    # The forward statistics are of the training pass, not of the no-grad evaluation pass after it.
    assert all(r.act_norm is not None and r.act_grad_norm is not None for r in step0)
    assert all(r.update_ratio is not None and r.update_ratio > 0 for r in step0)
    assert report.model is not None and report.model.optimizer == "momentum" and report.model.eager_statistics
    assert report.timing.steps_run == 12
    # The hooks are gone after the block: training on records nothing more.
    _train(model, optimizer, data[:2], w)
    assert len(w.report().records) == len(report.records)


def test_include_and_exclude_select_layers_by_name() -> None:
    model, data = _net(), _data(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with graddiag.watch(model, optimizer, every=1, include=["0*", "3*", "7*", "9*"], exclude=["7"]) as w:
        _train(model, optimizer, data, w)
    assert [layer.name for layer in w.report().layers] == ["0", "3", "9"]
    with pytest.raises(ValueError, match="no layer"), graddiag.watch(model, optimizer, include=["nothing"]) as w2:
        model(data[0][0])
    assert w2.recorder is None


def test_data_parallel_is_unwrapped() -> None:
    model, data = _net(), _data(3)
    wrapped = nn.DataParallel(model)  # with no GPU it calls the module itself
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.01)
    with graddiag.watch(wrapped, optimizer, every=2) as w:
        _train(wrapped, optimizer, data, w)
    report = w.report()
    assert [layer.name for layer in report.layers] == ["0", "1", "3", "7", "9"]
    assert report.model is not None and report.model.class_name == "Sequential"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_distributed_data_parallel_gloo_world_size_1() -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model, data = _net(), _data(3)
        expected = _step0_norms(model, data, ["0", "1", "3", "7", "9"])
        wrapped = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.01)
        with graddiag.watch(wrapped, optimizer, every=2) as w:
            _train(wrapped, optimizer, data, w)
        report = w.report()
    finally:
        dist.destroy_process_group()
    step0 = [r.grad_norm for r in report.records if r.step == 0]
    assert step0 == pytest.approx(expected, rel=1e-5)  # the all-reduced gradient of one rank is its own


@pytest.mark.slow
def test_compiled_model_records_parameter_statistics() -> None:
    model, data = _net(), _data(3)
    expected = _step0_norms(model, data, ["0", "1", "3", "7", "9"])
    # aot_eager runs dynamo and AOTAutograd (the graph capture watch must survive) without a C++ build.
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.01)
    with graddiag.watch(compiled, optimizer, every=2) as w:
        _train(compiled, optimizer, data, w)
    report = w.report()
    assert report.model is not None and report.model.eager_statistics is False
    step0 = [r for r in report.records if r.step == 0]
    assert [r.grad_norm for r in step0] == pytest.approx(expected, rel=1e-5)
    assert all(r.act_norm is None and r.act_grad_norm is None for r in step0)
    assert all(r.weight_norm and r.update_ratio and r.zero_grad_frac is not None for r in step0)


def test_report_before_any_step_says_so() -> None:
    model = _net()
    with graddiag.watch(model, torch.optim.SGD(model.parameters(), lr=0.01)) as w, pytest.raises(RuntimeError):
        w.report()


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),  # update read from the gradient
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),  # from the momentum buffer
        lambda p: torch.optim.Adam(p, lr=1e-3),  # from a weight snapshot
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),  # snapshot too
    ],
)
def test_update_ratio_is_the_update_the_optimizer_made(make: Any) -> None:
    model, data = _net(), _data(2)
    optimizer = make(model.parameters())
    names = ["0", "1", "3", "7", "9"]
    modules = dict(model.named_modules())
    with graddiag.watch(model, optimizer, every=1) as w:
        for inputs, targets in data:
            before = [modules[n].weight.detach().clone() for n in names]
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    last = [r for r in w.report().records if r.step == 1]
    for record, name, w0 in zip(last, names, before, strict=True):
        moved = float(torch.linalg.vector_norm((modules[name].weight.detach() - w0).double()))
        assert record.update_ratio == pytest.approx(moved / float(torch.linalg.vector_norm(w0.double())), rel=1e-4)
