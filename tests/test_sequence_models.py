"""Recurrent nets and transformers: the networks equal PyTorch's own modules, the init does what the spec
says, and the gradient through time graddiag records equals an independent autograd computation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graddiag.models.networks import Block, Network, Recurrent, build_network
from graddiag.models.shapes import PATCHES, SEQUENCE_FEATURES, SEQUENCE_LENGTH
from graddiag.models.spec import Spec
from graddiag.service.engine.data import make_source
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.time_recorder import TimeRecorder

BATCH = 4


def images(seed: int = 0) -> Tensor:
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def recurrent_spec(arch: str, **fields: Any) -> Spec:
    values: dict[str, Any] = {"arch": arch, "depth": 2, "width": 16, "dataset": "synthetic", "batch_size": 8}
    values.update(fields)
    return Spec(**values)


def cells(network: Network) -> list[Recurrent]:
    return [cell for _, cell in network.recurrent]


def torch_recurrent(spec: Spec, network: Network) -> nn.Module:
    """PyTorch's fused stacked RNN/GRU/LSTM carrying the same weights as graddiag's layers."""
    kind = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[spec.arch]
    extra = {"nonlinearity": spec.activation} if spec.arch == "rnn" else {}
    reference = kind(SEQUENCE_FEATURES, spec.width, num_layers=spec.depth, batch_first=True, **extra)
    with torch.no_grad():
        for k, cell in enumerate(cells(network)):
            getattr(reference, f"weight_ih_l{k}").copy_(cell.ih.weight)
            getattr(reference, f"bias_ih_l{k}").copy_(cell.ih.bias)
            getattr(reference, f"weight_hh_l{k}").copy_(cell.hh.weight)
            getattr(reference, f"bias_hh_l{k}").copy_(cell.hh.bias)
    return reference


@pytest.mark.parametrize(("arch", "activation"), [("rnn", "tanh"), ("rnn", "relu"), ("gru", "tanh"), ("lstm", "tanh")])
def test_unrolled_network_equals_pytorchs_stacked_layers(arch: str, activation: str) -> None:
    """The unrolled path (a state hook is registered, as on a recorded step) computes PyTorch's RNN."""
    spec = recurrent_spec(arch, activation=activation, depth=3)
    network = build_network(spec)
    x = images()
    rows = x.permute(0, 2, 3, 1).reshape(BATCH, SEQUENCE_LENGTH, SEQUENCE_FEATURES)
    sequence, _ = torch_recurrent(spec, network)(rows)
    head = network.get_submodule("output.linear")
    expected = head(sequence[:, -1])
    seen: list[int] = []
    handles = [cell.register_state_hook(lambda t, *_: seen.append(t)) for cell in cells(network)]
    unrolled = network(x)
    for handle in handles:
        handle.remove()
    assert seen == list(range(SEQUENCE_LENGTH)) * spec.depth
    torch.testing.assert_close(unrolled, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["rnn", "gru", "lstm"])
def test_fused_and_unrolled_paths_give_the_same_loss_and_gradients(arch: str) -> None:
    network = build_network(recurrent_spec(arch, width=32))
    x, y = images(), torch.arange(BATCH)

    def loss_and_grads() -> tuple[Tensor, list[Tensor]]:
        network.zero_grad()
        loss = F.cross_entropy(network(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in network.parameters() if p.grad is not None]

    fused_loss, fused_grads = loss_and_grads()
    handles = [cell.register_state_hook(lambda *_: None) for cell in cells(network)]
    unrolled_loss, unrolled_grads = loss_and_grads()
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(unrolled_loss, fused_loss)
    assert len(fused_grads) == len(unrolled_grads) == len(list(network.parameters()))
    for fused, unrolled in zip(fused_grads, unrolled_grads, strict=True):
        torch.testing.assert_close(unrolled, fused, rtol=1e-4, atol=1e-7)


def test_the_fused_layer_holds_the_recorded_layers_parameters() -> None:
    network = build_network(recurrent_spec("lstm"))
    for cell in cells(network):
        assert cell.fused.weight_ih_l0 is cell.ih.weight and cell.fused.weight_hh_l0 is cell.hh.weight
        assert cell.fused.bias_ih_l0 is cell.ih.bias and cell.fused.bias_hh_l0 is cell.hh.bias
    # Shared parameters count once: the optimizer and the recorder see the same set.
    assert len(list(network.parameters())) == 2 * 2 * 2 + 2


def test_rows_are_the_image_rows_pixel_by_pixel() -> None:
    x = images()
    rows = build_network(recurrent_spec("rnn")).get_submodule("rows")(x)
    assert rows.shape == (BATCH, 32, 96)
    # Time step 5, pixel 7, channel 2 (green is 1, blue 2) is image row 5, column 7.
    assert rows[1, 5, 7 * 3 + 2] == x[1, 2, 5, 7]


def test_layer_names_and_kinds_of_a_recurrent_net() -> None:
    network = build_network(recurrent_spec("lstm", depth=3))
    assert [(layer.name, layer.kind) for layer in network.layers] == [
        ("lstm1.ih", "linear"),
        ("lstm1.hh", "recurrent"),
        ("lstm2.ih", "linear"),
        ("lstm2.hh", "recurrent"),
        ("lstm3.ih", "linear"),
        ("lstm3.hh", "recurrent"),
        ("output.linear", "linear"),
    ]
    assert [index for index, _ in network.recurrent] == [1, 3, 5]
    assert network.layers[0].weight.shape == (4 * 16, SEQUENCE_FEATURES)


def test_default_recurrent_init_is_pytorchs_uniform() -> None:
    network = build_network(recurrent_spec("gru", width=64))
    bound = 64**-0.5
    for cell in cells(network):
        for parameter in (p.detach() for p in (cell.ih.weight, cell.ih.bias, cell.hh.weight, cell.hh.bias)):
            assert float(parameter.abs().max()) <= bound
            # U(-b, b) has variance b²/3.
            assert float(parameter.var()) == pytest.approx(bound**2 / 3, rel=0.15)


@pytest.mark.parametrize("gain", [0.5, 1.0])
def test_identity_init_is_gain_times_identity_per_gate(gain: float) -> None:
    network = build_network(recurrent_spec("gru", init="identity", init_gain=gain))
    for cell in cells(network):
        for block in cell.hh.weight.detach().split(16):
            torch.testing.assert_close(block, gain * torch.eye(16))


def test_orthogonal_init_names_the_recurrent_matrix_gate_by_gate() -> None:
    default = build_network(recurrent_spec("lstm"))
    network = build_network(recurrent_spec("lstm", init="orthogonal", init_gain=1.3))
    for cell, plain in zip(cells(network), cells(default), strict=True):
        for block in cell.hh.weight.detach().split(16):
            torch.testing.assert_close(block @ block.T, 1.3**2 * torch.eye(16), atol=1e-5, rtol=0)
        # The input matrix keeps PyTorch's init (the same draw as the default spec's).
        torch.testing.assert_close(cell.ih.weight, plain.ih.weight)


def test_xavier_is_drawn_per_gate_block() -> None:
    network = build_network(recurrent_spec("lstm", width=256, depth=1, init="xavier_normal"))
    cell = cells(network)[0]
    # Each gate's 256 x 256 block: Var = 2 / (256 + 256); the stacked 1024 x 256 matrix would give 2 / 1280.
    for block in cell.hh.weight.detach().split(256):
        assert float(block.var()) == pytest.approx(2 / 512, rel=0.05)


def test_forget_bias_number_and_chrono() -> None:
    one = cells(build_network(recurrent_spec("lstm", forget_bias=1.0)))[0]
    assert torch.all(one.ih.bias[16:32] == 1.0) and torch.all(one.hh.bias[16:32] == 0.0)
    chrono = cells(build_network(recurrent_spec("lstm", width=512, depth=1, forget_bias="chrono")))[0]
    forget = chrono.ih.bias[512:1024].detach()
    # log U(1, 31): between 0 and log 31, with mean (31 log 31 - 30) / 30 - 1 ... computed, not assumed.
    assert float(forget.min()) >= 0.0 and float(forget.max()) <= math.log(31)
    uniform_mean_log = (31 * math.log(31) - 31 - (1 * math.log(1) - 1)) / 30
    assert float(forget.mean()) == pytest.approx(uniform_mean_log, abs=0.1)
    torch.testing.assert_close(chrono.ih.bias[:512], -forget)
    assert torch.all(chrono.hh.bias[:1024] == 0.0)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_transformer_block_equals_pytorchs_encoder_layer(norm_position: str, activation: str) -> None:
    spec = Spec(arch="transformer", width=32, heads=4, depth=1, norm_position=norm_position, activation=activation)
    block = build_network(spec).get_submodule("block1")
    assert isinstance(block, Block)
    reference = nn.TransformerEncoderLayer(
        32,
        4,
        dim_feedforward=4 * 32,
        dropout=0.0,
        activation=activation,
        batch_first=True,
        norm_first=norm_position == "pre",
    )
    with torch.no_grad():
        attn = block.attn
        reference.self_attn.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        reference.self_attn.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        reference.self_attn.out_proj.weight.copy_(attn.out.weight)
        reference.self_attn.out_proj.bias.copy_(attn.out.bias)
        for ours, theirs in (
            (block.mlp.fc1, reference.linear1),
            (block.mlp.fc2, reference.linear2),
            (block.norm1, reference.norm1),
            (block.norm2, reference.norm2),
        ):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    reference.eval()  # the fast path and the slow path must agree; eval keeps dropout (0) out of the question
    tokens = torch.randn(3, 65, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(block(tokens), reference(tokens), rtol=1e-5, atol=1e-5)


def test_transformer_reads_patches_and_lists_layers_in_forward_order() -> None:
    network = build_network(Spec(arch="transformer", width=16, heads=2, depth=2, norm_position="post", pooling="mean"))
    x = images()
    patches = network.get_submodule("patches")(x)
    assert patches.shape == (BATCH, PATCHES, 48)
    # Token 9 is the patch at row 1, column 1 of the 8 x 8 grid: pixels 4-7 both ways, channels first.
    torch.testing.assert_close(patches[2, 9], x[2, :, 4:8, 4:8].reshape(48))
    names = [layer.name for layer in network.layers]
    assert names[:3] == ["embed.linear", "embed.pos", "block1.attn.q"]
    # post-LN runs attention before its norm: the list follows the computation.
    assert names[3:10] == [
        "block1.attn.k",
        "block1.attn.v",
        "block1.attn.out",
        "block1.norm1",
        "block1.mlp.fc1",
        "block1.mlp.fc2",
        "block1.norm2",
    ]
    assert "norm" not in names and names[-1] == "output.linear"
    assert network(x).shape == (BATCH, 10)


def independent_time_gradients(spec: Spec) -> tuple[list[list[float]], list[list[float]]]:
    """‖∂L/∂h_t‖ and ‖∂L/∂c_t‖ per layer and t at step 0, by plain autograd through PyTorch's own cells.

    The weights come from graddiag's network for the spec, the batch from its data source; the recurrence
    is unrolled with nn.RNNCell / nn.GRUCell / nn.LSTMCell (not graddiag's equations) and every state's
    gradient is read with retain_grad.
    """
    network = build_network(spec)
    x, y = make_source(spec, data=None, device=torch.device("cpu"), eval_samples=8).batch(0)
    kind = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[spec.arch]
    sequence = x.permute(0, 2, 3, 1).reshape(x.shape[0], SEQUENCE_LENGTH, SEQUENCE_FEATURES)
    hs: list[list[Tensor]] = []
    cs: list[list[Tensor]] = []
    for cell in cells(network):
        extra = {"nonlinearity": spec.activation} if spec.arch == "rnn" else {}
        reference = kind(sequence.shape[-1], spec.width, **extra)
        with torch.no_grad():
            reference.weight_ih.copy_(cell.ih.weight)
            reference.bias_ih.copy_(cell.ih.bias)
            reference.weight_hh.copy_(cell.hh.weight)
            reference.bias_hh.copy_(cell.hh.bias)
        h = torch.zeros(x.shape[0], spec.width)
        c = torch.zeros_like(h)
        layer_h, layer_c = [], []
        for t in range(SEQUENCE_LENGTH):
            if spec.arch == "lstm":
                h, c = reference(sequence[:, t], (h, c))
                c.retain_grad()
                layer_c.append(c)
            else:
                h = reference(sequence[:, t], h)
            h.retain_grad()
            layer_h.append(h)
        hs.append(layer_h)
        cs.append(layer_c)
        sequence = torch.stack(layer_h, dim=1)
    F.cross_entropy(network.get_submodule("output.linear")(sequence[:, -1]), y).backward()

    def norms(states: list[list[Tensor]]) -> list[list[float]]:
        return [
            [float(torch.linalg.vector_norm(s.grad.double())) for s in layer if s.grad is not None] for layer in states
        ]

    return norms(hs), norms(cs)


@pytest.mark.parametrize(
    "fields",
    [
        {"arch": "rnn", "activation": "tanh"},
        {"arch": "rnn", "activation": "relu", "init": "identity", "bias_init": "zeros"},
        {"arch": "lstm"},
        {"arch": "lstm", "forget_bias": "chrono"},
        {"arch": "gru"},
    ],
)
def test_recorded_gradient_through_time_equals_autograd_through_pytorchs_cells(fields: dict[str, Any]) -> None:
    spec = recurrent_spec(width=32, steps=2, record_every=1, **fields)
    report = run_probe(spec)
    expected_h, expected_c = independent_time_gradients(spec)
    recurrent_layers = [layer.index for layer in report.layers if layer.kind == "recurrent"]
    at_init = [r for r in report.time_records if r.step == 0]
    assert len(at_init) == spec.depth * SEQUENCE_LENGTH
    for position, index in enumerate(recurrent_layers):
        rows = sorted((r for r in at_init if r.layer == index), key=lambda r: r.t)
        assert [r.t for r in rows] == list(range(SEQUENCE_LENGTH))
        measured = [r.grad_norm for r in rows]
        assert measured == pytest.approx(expected_h[position], rel=1e-4)
        if spec.arch == "lstm":
            assert [r.cell_grad_norm for r in rows] == pytest.approx(expected_c[position], rel=1e-4)
        else:
            assert all(r.cell_grad_norm is None for r in rows)
    # Step 1 is recorded too: its own values, not step 0's.
    assert {r.step for r in report.time_records} == {0, 1}
    later = [r.grad_norm for r in report.time_records if r.step == 1]
    assert later != [r.grad_norm for r in at_init]


def test_gate_statistics_follow_the_forget_bias() -> None:
    """With b_f = 3 the forget gate starts near σ(3) = 0.95; with PyTorch's default near σ(0) = 0.5."""
    high = run_probe(recurrent_spec("lstm", width=32, steps=1, forget_bias=3.0, bias_init="zeros"))
    plain = run_probe(recurrent_spec("lstm", width=32, steps=1))
    high_mean = sum(r.gate_mean for r in high.time_records if r.gate_mean is not None) / len(high.time_records)
    plain_mean = sum(r.gate_mean for r in plain.time_records if r.gate_mean is not None) / len(plain.time_records)
    assert high_mean == pytest.approx(1 / (1 + math.exp(-3)), abs=0.03)
    assert plain_mean == pytest.approx(0.5, abs=0.05)


def test_unrecorded_steps_register_no_state_hooks_and_report_no_rows() -> None:
    spec = recurrent_spec("rnn", steps=5, record_every=4)
    report = run_probe(spec)
    assert sorted({r.step for r in report.time_records}) == [0, 4]
    network = build_network(spec)
    recorder = TimeRecorder(network.recurrent, SEQUENCE_LENGTH)
    recorder.begin_step(True)
    assert all(len(cell._state_hooks) == 1 for cell in cells(network))
    network(images()).sum().backward()
    assert len(recorder.rows(0)) == spec.depth * SEQUENCE_LENGTH
    recorder.begin_step(False)
    assert all(not cell._state_hooks for cell in cells(network))
    network(images()).sum().backward()
    assert recorder.rows(1) == []


@pytest.mark.parametrize("arch", ["mlp", "cnn", "transformer"])
def test_other_architectures_have_no_time_records(arch: str) -> None:
    fields: dict[str, Any] = {"heads": 2} if arch == "transformer" else {}
    report = run_probe(Spec(arch=arch, depth=2, width=8, steps=1, batch_size=4, dataset="synthetic", **fields))
    assert report.time_records == []
