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
    layer_count,
    parameter_count,
    stage_pixels,
    weight_count,
    weight_layer_parameter_count,
)
from graddiag.models.spec import Norm, Spec

# Depths 1-7 cover one, two and three stages and every remainder of the split; 100 is the cap.
GRID = [
    Spec(arch=arch, depth=depth, width=width, norm=norm, residual=residual)
    for arch, depth, width, norm, residual in itertools.product(
        ("mlp", "cnn"), (1, 2, 3, 4, 5, 7, 100), (2, 5, 16), get_args(Norm), (False, True)
    )
]


@pytest.mark.parametrize("spec", GRID, ids=lambda s: f"{s.arch}-d{s.depth}-w{s.width}-{s.norm}-r{int(s.residual)}")
def test_counts_match_the_built_network_exactly(spec: Spec) -> None:
    network = build_network(spec)
    params = list(network.parameters())
    assert parameter_count(spec) == sum(p.numel() for p in params)
    weight_layers = sum(layer.params for layer in network.layers if layer.kind != "norm")
    assert weight_layer_parameter_count(spec) == weight_layers
    assert weight_count(spec) == sum(layer.weight.numel() for layer in network.layers)
    assert layer_count(spec) == len(network.layers)


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


def test_the_network_maps_the_image_shape_to_the_classes() -> None:
    for arch in ("mlp", "cnn"):
        assert build_network(Spec(arch=arch, depth=2, width=4))(torch.zeros(3, *IMAGE_SHAPE)).shape == (3, NUM_CLASSES)


def test_shapes_and_the_memory_model_import_without_torch() -> None:
    # The API sizes runs with them and never imports torch.
    code = "import sys; import graddiag.models.shapes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
