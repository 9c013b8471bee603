"""graddiag.models.shapes: the torch-free network facts agree exactly with the networks torch builds."""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys
from typing import get_args

import pytest
import torch

from graddiag.models.networks import build_network
from graddiag.models.shapes import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    cnn_stage_sizes,
    largest_layer_parameter_count,
    layer_count,
    layer_shapes,
    parameter_count,
    stage_pixels,
    weight_count,
    weight_layer_parameter_count,
)
from graddiag.models.spec import RECURRENT_ARCHS, Arch, Norm, Spec

# Depths 1-7 cover one, two and three stages and every remainder of the split; 100 is the cap.
GRID = [
    Spec(arch=arch, depth=depth, width=width, norm=norm, residual=residual)
    for arch, depth, width, norm, residual in itertools.product(
        ("mlp", "cnn"), (1, 2, 3, 4, 5, 7, 100), (2, 5, 16), get_args(Norm), (False, True)
    )
]
# Recurrent nets: the first layer reads 96 features, the others width; 1, 3 or 4 gate blocks.
GRID += [
    Spec(arch=arch, depth=depth, width=width)
    for arch, depth, width in itertools.product(RECURRENT_ARCHS, (1, 2, 5), (2, 5, 16))
]
# Transformers: both norm positions (the final norm is pre-LN's), both poolings (the class token adds a
# table and a row of the position table), heads and the MLP ratio.
GRID += [
    Spec(
        arch="transformer",
        depth=depth,
        width=width,
        heads=heads,
        norm_position=position,
        mlp_ratio=ratio,
        pooling=pooling,
    )
    for depth, (width, heads), position, ratio, pooling in itertools.product(
        (1, 3), ((2, 1), (6, 3), (16, 4)), ("pre", "post"), (1, 3, 8), ("cls", "mean")
    )
]


def _id(spec: Spec) -> str:
    if spec.arch == "transformer":
        return f"vit-d{spec.depth}-w{spec.width}-h{spec.heads}-{spec.norm_position}-r{spec.mlp_ratio}-{spec.pooling}"
    return f"{spec.arch}-d{spec.depth}-w{spec.width}-{spec.norm}-r{int(spec.residual)}"


@pytest.mark.parametrize("spec", GRID, ids=_id)
def test_counts_match_the_built_network_exactly(spec: Spec) -> None:
    network = build_network(spec)
    params = list(network.parameters())
    assert parameter_count(spec) == sum(p.numel() for p in params)
    weight_layers = [layer for layer in network.layers if layer.kind != "norm"]
    assert weight_layer_parameter_count(spec) == sum(layer.params for layer in weight_layers)
    assert largest_layer_parameter_count(spec) == max(layer.params for layer in weight_layers)
    assert weight_count(spec) == sum(layer.weight.numel() for layer in network.layers)
    assert layer_count(spec) == len(network.layers)
    # Layer by layer, in forward order: kind, weight (or scale, or table) and bias sizes.
    built = [
        (layer.kind, layer.weight.numel(), layer.bias.numel() if layer.bias is not None else 0)
        for layer in network.layers
    ]
    assert [(shape.kind, shape.weights, shape.biases) for shape in layer_shapes(spec)] == built


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6, 7, 8, 31, 100])
@pytest.mark.parametrize("residual", [False, True])
def test_cnn_stage_split_is_the_one_the_network_has(depth: int, residual: bool) -> None:
    network = build_network(Spec(arch="cnn", depth=depth, width=2, residual=residual))
    convs = [layer.name for layer in network.layers if layer.kind == "conv"]
    built = [sum(1 for name in convs if name.startswith(f"stage{s}.")) for s in (1, 2, 3)]
    built[0] += 1  # the stem
    assert cnn_stage_sizes(depth) == [n for n in built if n] and sum(cnn_stage_sizes(depth)) == depth
    # Each stage's feature maps are the size stage_pixels says.
    seen: dict[int, int] = {}

    def pixels(index: int, _module: object, _inputs: object, out: torch.Tensor) -> None:
        seen[index] = out.shape[-1] * out.shape[-2]

    hooks = [
        network.get_submodule(name).register_forward_hook(functools.partial(pixels, i)) for i, name in enumerate(convs)
    ]
    network(torch.zeros(1, *IMAGE_SHAPE))
    for hook in hooks:
        hook.remove()
    expected = [stage_pixels(s) for s, size in enumerate(cnn_stage_sizes(depth)) for _ in range(size)]
    assert [seen[i] for i in range(len(convs))] == expected


@pytest.mark.parametrize("arch", get_args(Arch))
def test_the_network_maps_the_image_shape_to_the_classes(arch: Arch) -> None:
    network = build_network(Spec(arch=arch, depth=2, width=4, heads=2 if arch == "transformer" else 4))
    assert network(torch.zeros(3, *IMAGE_SHAPE)).shape == (3, NUM_CLASSES)


def test_shapes_and_the_memory_model_import_without_torch() -> None:
    # The API sizes runs with them and never imports torch.
    code = "import sys; import graddiag.models.shapes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
