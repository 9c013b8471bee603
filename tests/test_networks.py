"""graddiag.models.networks and models.init: every spec builds and trains, layer records, determinism, init."""

from __future__ import annotations

import itertools
import math
from typing import Any, get_args

import pytest
import torch
from torch import Tensor, nn

from graddiag.models.init import kaiming_nonlinearity
from graddiag.models.networks import Network, build_network, make_activation
from graddiag.models.spec import Activation, Init, Norm, Spec

ACTIVATIONS = get_args(Activation)
# identity applies to recurrent matrices only (tests/test_sequence_models.py).
INITS = tuple(init for init in get_args(Init) if init != "identity")
NORMS = get_args(Norm)
ARCHS = ("mlp", "cnn")
BATCH = 4


def make_spec(**overrides: Any) -> Spec:
    fields: dict[str, Any] = {"width": 8, "depth": 3, "init_std": 0.1}
    fields.update(overrides)
    return Spec(**fields)


def images(seed: int = 0) -> Tensor:
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def weight(network: Network, name: str) -> Tensor:
    return network.get_submodule(name).get_parameter("weight").detach()


def weight_layers(network: Network) -> list[str]:
    return [layer.name for layer in network.layers if layer.kind != "norm"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_combination_runs_forward_and_backward(arch, norm, residual, init, activation):
    # cnn depth 5 has a stem, one-conv and two-conv residual blocks and all three stages.
    depth = 5 if arch == "cnn" else 3
    spec = make_spec(arch=arch, depth=depth, norm=norm, residual=residual, init=init, activation=activation)
    network = build_network(spec)

    logits = network(images())

    assert logits.shape == (BATCH, 10)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.arange(BATCH)).backward()
    for layer in network.layers:
        for param in layer.module.parameters():
            assert param.grad is not None, layer.name
            assert torch.isfinite(param.grad).all(), layer.name


STRUCTURES = [
    (arch, depth, residual, norm)
    for arch in ARCHS
    for depth in (1, 2, 3, 4, 5, 7)
    for residual in (False, True)
    for norm in NORMS
]


@pytest.mark.parametrize(("arch", "depth", "residual", "norm"), STRUCTURES)
def test_layer_records_follow_the_module_tree_in_forward_order(arch, depth, residual, norm):
    network = build_network(make_spec(arch=arch, depth=depth, residual=residual, norm=norm))
    layers = network.layers
    modules = dict(network.named_modules())

    assert [layer.index for layer in layers] == list(range(len(layers)))
    assert len({layer.name for layer in layers}) == len(layers)
    assert len(weight_layers(network)) == depth + 1
    for layer in layers:
        assert modules[layer.name] is layer.module
        assert layer.params == sum(p.numel() for p in layer.module.parameters())
    # Every parameter belongs to exactly one recorded layer, so per-layer statistics miss nothing.
    recorded = [id(p) for layer in layers for p in layer.module.parameters()]
    assert sorted(recorded) == sorted(id(p) for p in network.parameters())

    events: list[tuple[str, int]] = []
    for layer in layers:
        layer.module.register_forward_hook(lambda *_, i=layer.index: events.append(("layer", i)))
        if layer.activation is not None:
            layer.activation.register_forward_hook(lambda *_, i=layer.index: events.append(("act", i)))
    network(images())

    assert [i for event, i in events if event == "layer"] == list(range(len(layers)))
    # A weight layer's activation fires after it and before the next weight layer.
    weight_positions = [events.index(("layer", i)) for i, layer in enumerate(layers) if layer.kind != "norm"]
    for position, next_position in itertools.pairwise(weight_positions):
        index = events[position][1]
        assert position < events.index(("act", index)) < next_position, layers[index].name


@pytest.mark.parametrize(("arch", "norm"), [(arch, norm) for arch in ARCHS for norm in NORMS])
def test_layer_kinds_activations_and_norm_types(arch, norm):
    network = build_network(make_spec(arch=arch, depth=5, residual=True, norm=norm, activation="tanh"))
    weights = [layer for layer in network.layers if layer.kind != "norm"]
    norms = [layer for layer in network.layers if layer.kind == "norm"]
    expected_norm = {
        ("mlp", "batch"): nn.BatchNorm1d,
        ("mlp", "layer"): nn.LayerNorm,
        ("cnn", "batch"): nn.BatchNorm2d,
        ("cnn", "layer"): nn.GroupNorm,
    }.get((arch, norm))

    assert all(layer.activation is None for layer in norms)
    assert all(type(layer.module) is expected_norm for layer in norms)
    assert len(norms) == (0 if expected_norm is None else 5)
    if expected_norm is nn.GroupNorm:
        assert all(layer.module.num_groups == 1 for layer in norms)
    assert [layer.kind for layer in weights] == ["linear" if arch == "mlp" else "conv"] * 5 + ["linear"]
    assert all(layer.module.get_parameter("bias") is not None for layer in weights)
    assert weights[-1].name == "output.linear"
    assert weights[-1].activation is None
    activations = [layer.activation for layer in weights[:-1]]
    assert all(isinstance(a, nn.Tanh) for a in activations)
    assert len({id(a) for a in activations}) == len(activations)


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        (
            make_spec(arch="mlp", depth=3, norm="batch"),
            [
                "input.linear",
                "input.norm",
                "hidden1.linear",
                "hidden1.norm",
                "hidden2.linear",
                "hidden2.norm",
                "output.linear",
            ],
        ),
        (make_spec(arch="mlp", depth=1), ["input.linear", "output.linear"]),
        (make_spec(arch="cnn", depth=1, residual=True), ["stem.conv", "output.linear"]),
        (
            make_spec(arch="cnn", depth=4),
            ["stem.conv", "stage1.layer1.conv", "stage2.layer1.conv", "stage3.layer1.conv", "output.linear"],
        ),
        (make_spec(arch="cnn", depth=2, residual=True), ["stem.conv", "stage2.block1.conv", "output.linear"]),
        (
            make_spec(arch="cnn", depth=5, residual=True),
            [
                "stem.conv",
                "stage1.block1.conv",
                "stage2.block1.conv1",
                "stage2.block1.conv2",
                "stage3.block1.conv",
                "output.linear",
            ],
        ),
        (
            make_spec(arch="cnn", depth=10, residual=True, norm="layer"),
            [
                "stem.conv",
                "stem.norm",
                "stage1.block1.conv1",
                "stage1.block1.norm1",
                "stage1.block1.conv2",
                "stage1.block1.norm2",
                "stage1.block2.conv",
                "stage1.block2.norm",
                "stage2.block1.conv1",
                "stage2.block1.norm1",
                "stage2.block1.conv2",
                "stage2.block1.norm2",
                "stage2.block2.conv",
                "stage2.block2.norm",
                "stage3.block1.conv1",
                "stage3.block1.norm1",
                "stage3.block1.conv2",
                "stage3.block1.norm2",
                "stage3.block2.conv",
                "stage3.block2.norm",
                "output.linear",
            ],
        ),
    ],
)
def test_layer_names(spec, names):
    assert [layer.name for layer in build_network(spec).layers] == names


def test_residual_conv_block_activation_is_the_one_after_the_sum():
    network = build_network(make_spec(arch="cnn", depth=7, residual=True))
    block = network.get_submodule("stage2.block1")
    layers = {layer.name: layer for layer in network.layers}

    assert layers["stage2.block1.conv1"].activation is block.get_submodule("act1")
    assert layers["stage2.block1.conv2"].activation is block.get_submodule("act")


@pytest.mark.parametrize("depth", [1, 2, 3, 6])
def test_cnn_pools_between_stages(depth):
    network = build_network(make_spec(arch="cnn", depth=depth))
    sizes: dict[str, int] = {}
    for layer in network.layers:
        layer.module.register_forward_pre_hook(lambda _, args, name=layer.name: sizes.update({name: args[0].shape[-1]}))
    network(images())

    stage_sizes = {name.split(".")[0]: size for name, size in sizes.items() if name != "output.linear"}
    expected = {1: {"stem": 32}, 2: {"stem": 32, "stage2": 16}, 3: {"stem": 32, "stage2": 16, "stage3": 8}}
    assert stage_sizes == expected.get(depth, {"stem": 32, "stage1": 32, "stage2": 16, "stage3": 8})
    assert sum(isinstance(m, nn.MaxPool2d) for m in network.modules()) == min(3, depth) - 1


def test_residual_mlp_adds_the_skip():
    # With its linear zeroed and no norm, a relu block outputs relu(0) = 0: only a skip passes x through.
    outputs: dict[bool, dict[str, Tensor]] = {}
    for residual in (False, True):
        network = build_network(make_spec(arch="mlp", depth=3, residual=residual, activation="relu"))
        with torch.no_grad():
            for param in network.get_submodule("hidden1.linear").parameters():
                param.zero_()
        captured: dict[str, Tensor] = {}
        network.get_submodule("hidden1").register_forward_hook(
            lambda _, args, out, captured=captured: captured.update(x=args[0], out=out)
        )
        network(images())
        outputs[residual] = captured

    assert torch.equal(outputs[True]["out"], outputs[True]["x"])
    assert outputs[True]["x"].abs().sum() > 0
    assert torch.equal(outputs[False]["out"], torch.zeros_like(outputs[False]["x"]))


def test_residual_mlp_block_is_input_plus_activation():
    network = build_network(make_spec(arch="mlp", depth=3, residual=True, norm="layer", activation="tanh"))
    captured: dict[str, Tensor] = {}
    network.get_submodule("hidden2").register_forward_hook(lambda _, args, out: captured.update(x=args[0], out=out))
    network.get_submodule("hidden2.act").register_forward_hook(lambda *args: captured.update(act=args[2]))
    network(images())

    torch.testing.assert_close(captured["out"], captured["x"] + captured["act"])


def test_residual_cnn_blocks_add_the_skip():
    # Zeroing each block's last conv leaves act(x + 0) = relu(x) = x, as x is itself a relu output.
    network = build_network(make_spec(arch="cnn", depth=7, residual=True, activation="relu"))
    blocks = [network.get_submodule(f"stage{s}.block1") for s in (1, 2, 3)]
    captured: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for block in blocks:
            for param in block.get_submodule("conv2").parameters():
                param.zero_()
            block.register_forward_hook(lambda _, args, out: captured.append((args[0], out)))
    network(images())

    assert len(captured) == 3
    for x, out in captured:
        assert x.abs().sum() > 0
        assert torch.equal(out, x)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights_other_seed_other_weights(arch, init):
    spec = make_spec(arch=arch, init=init, norm="batch")
    network = build_network(spec)
    first, again = network.state_dict(), build_network(spec).state_dict()
    other = build_network(spec.model_copy(update={"seed": 1})).state_dict()

    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    weights = weight_layers(network)
    assert not any(
        torch.equal(first[f"{name}.{p}"], other[f"{name}.{p}"]) for name in weights for p in ("weight", "bias")
    )


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = build_network(make_spec(init="xavier_normal"))

    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    second = build_network(make_spec(init="xavier_normal"))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


@pytest.fixture(scope="module")
def wide_spec() -> Spec:
    return make_spec(arch="mlp", width=512, depth=2, activation="relu")


def build_wide(spec: Spec, **overrides: Any) -> Network:
    return build_network(spec.model_copy(update=overrides))


@pytest.mark.parametrize(
    ("activation", "init_gain", "gain_squared"),
    [("relu", 1.0, 2.0), ("relu", 1.5, 2.0 * 1.5**2), ("tanh", 1.0, 25 / 9), ("identity", 1.0, 1.0)],
)
@pytest.mark.parametrize("init", ["kaiming_normal", "kaiming_uniform"])
def test_kaiming_variance_is_gain_squared_over_fan_in(wide_spec, init, activation, init_gain, gain_squared):
    network = build_wide(wide_spec, init=init, activation=activation, init_gain=init_gain)
    hidden = weight(network, "hidden1.linear")

    assert hidden.var().item() * 512 == pytest.approx(gain_squared, rel=0.03)
    assert hidden.mean().item() == pytest.approx(0.0, abs=0.01)
    if init == "kaiming_uniform":
        assert hidden.abs().max().item() <= math.sqrt(3 * gain_squared / 512)


def test_kaiming_uses_the_conv_fan_in():
    network = build_network(make_spec(arch="cnn", width=64, depth=4, init="kaiming_normal"))
    conv = weight(network, "stage1.layer1.conv")

    assert conv.var().item() * 64 * 9 == pytest.approx(2.0, rel=0.05)


def test_xavier_normal_variance(wide_spec):
    network = build_wide(wide_spec, init="xavier_normal")

    assert weight(network, "hidden1.linear").var().item() == pytest.approx(2 / (512 + 512), rel=0.03)
    assert weight(network, "input.linear").var().item() == pytest.approx(2 / (3072 + 512), rel=0.03)


def test_xavier_uniform_variance_with_gain(wide_spec):
    network = build_wide(wide_spec, init="xavier_uniform", init_gain=2.0)

    assert weight(network, "hidden1.linear").var().item() == pytest.approx(4 * 2 / (512 + 512), rel=0.03)


def test_normal_std_is_init_std_times_gain(wide_spec):
    network = build_wide(wide_spec, init="normal", init_std=0.05, init_gain=2.0)

    for name in ("input.linear", "hidden1.linear"):
        assert weight(network, name).std().item() == pytest.approx(0.1, rel=0.03)


@pytest.mark.parametrize("init_gain", [1.0, 2.0])
def test_orthogonal_rows_are_orthonormal(wide_spec, init_gain):
    network = build_wide(wide_spec, init="orthogonal", init_gain=init_gain)
    expected = init_gain**2 * torch.eye(512)

    for name in ("hidden1.linear", "input.linear"):
        w = weight(network, name)
        torch.testing.assert_close(w @ w.T, expected, atol=1e-4, rtol=0)
    hidden = weight(network, "hidden1.linear")
    torch.testing.assert_close(hidden.T @ hidden, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_init_gain_scales_the_weights_only(arch):
    plain = build_network(make_spec(arch=arch))
    doubled = build_network(make_spec(arch=arch, init_gain=2.0))

    for a, b in zip(plain.layers, doubled.layers, strict=True):
        if a.kind == "norm":
            continue
        assert torch.equal(b.module.get_parameter("weight"), 2 * a.module.get_parameter("weight"))
        assert torch.equal(b.module.get_parameter("bias"), a.module.get_parameter("bias"))


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", ARCHS)
def test_bias_zeros_and_norms_start_at_identity(arch, init):
    network = build_network(make_spec(arch=arch, init=init, bias_init="zeros", norm="batch"))

    for layer in network.layers:
        bias = layer.module.get_parameter("bias")
        assert torch.equal(bias, torch.zeros_like(bias)), layer.name
        if layer.kind == "norm":
            assert torch.equal(layer.module.get_parameter("weight"), torch.ones_like(bias)), layer.name


@pytest.mark.parametrize("arch", ARCHS)
def test_default_bias_is_pytorchs_whatever_the_weight_init(arch):
    biases = {
        init: [layer.module.get_parameter("bias") for layer in build_network(make_spec(arch=arch, init=init)).layers]
        for init in INITS
    }

    assert all(b.abs().sum() > 0 for b in biases["default"])
    for init in INITS:
        assert all(torch.equal(a, b) for a, b in zip(biases["default"], biases[init], strict=True)), init


@pytest.mark.parametrize(
    ("activation", "expected"),
    [
        ("relu", ("relu", 0.0)),
        ("leaky_relu", ("leaky_relu", 0.01)),
        ("tanh", ("tanh", 0.0)),
        ("sigmoid", ("sigmoid", 0.0)),
        ("selu", ("selu", 0.0)),
        ("identity", ("linear", 0.0)),
        ("elu", ("relu", 0.0)),
        ("gelu", ("relu", 0.0)),
        ("silu", ("relu", 0.0)),
        ("softsign", ("tanh", 0.0)),
    ],
)
def test_kaiming_nonlinearity(activation, expected):
    assert kaiming_nonlinearity(activation) == expected


def test_kaiming_nonlinearity_covers_every_spec_activation_and_refuses_others():
    for activation in ACTIVATIONS:
        # torch accepts every pair, so Kaiming init never fails on a valid spec.
        assert nn.init.calculate_gain(*kaiming_nonlinearity(activation)) > 0
    with pytest.raises(ValueError, match="unknown activation"):
        kaiming_nonlinearity("swish")


def test_make_activation():
    x = torch.linspace(-3, 3, 61)
    for name in ACTIVATIONS:
        first, second = make_activation(name), make_activation(name)
        assert first is not second
        assert not getattr(first, "inplace", False), name
        y = x.clone()
        first(y)
        assert torch.equal(y, x), name
    torch.testing.assert_close(make_activation("leaky_relu")(torch.tensor([-1.0])), torch.tensor([-0.01]))
    torch.testing.assert_close(make_activation("elu")(torch.tensor([-50.0])), torch.tensor([-1.0]))
    torch.testing.assert_close(make_activation("softsign")(torch.tensor([1.0])), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("swish")
