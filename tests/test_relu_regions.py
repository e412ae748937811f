"""experiments/relu_regions.py: the activation regions of a ReLU MLP, against closed forms and samples,
and count_laws on inputs inside every region against the path lifting at exactly those patterns."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from relu_regions import enumerate_regions, pattern_outputs, patterns_of, region_inputs, relu_layers  # noqa: E402

import torch_conslaw as tc  # noqa: E402


def net(widths, bias, seed):
    torch.manual_seed(seed)
    layers = []
    for k in range(len(widths) - 1):
        last = k == len(widths) - 2
        layers.append(torch.nn.Linear(widths[k], widths[k + 1], bias=bias and not last))
        if not last:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).double()


@pytest.mark.parametrize("n0,h", [(2, 5), (3, 6), (4, 4)])
def test_one_hidden_layer_regions_match_hyperplane_arrangements(n0, h):
    # H generic hyperplanes through 0 in R^n0: 2 Σ_{k<n0} C(H-1, k) cones; generic affine ones: Σ_{k≤n0} C(H, k)
    cones = enumerate_regions(relu_layers(net([n0, h, 1], False, 0)))
    assert cones.certified and len(cones.patterns) == 2 * sum(math.comb(h - 1, k) for k in range(n0))
    affine = enumerate_regions(relu_layers(net([n0, h, 1], True, 1)))
    assert affine.certified and len(affine.patterns) == sum(math.comb(h, k) for k in range(n0 + 1))


def test_deep_net_regions_contain_every_sampled_pattern_and_their_inputs_lie_inside():
    layers = relu_layers(net([2, 4, 5, 3], True, 2))
    regions = enumerate_regions(layers)
    assert regions.certified
    found = {p.tobytes() for p in regions.patterns}
    x = np.random.default_rng(0).standard_normal((20_000, 2)) * np.exp(np.random.default_rng(1).uniform(-3, 5, (20_000, 1)))
    sampled = {p.tobytes() for p in patterns_of(layers, x)[0]}
    assert sampled <= found
    inputs = region_inputs(layers, regions)
    bits, _ = patterns_of(layers, inputs)
    assert np.array_equal(bits, np.tile(regions.patterns, (3, 1)))  # n0 + 1 = 3 points per region, each inside it


def test_count_on_region_inputs_is_the_path_lifting_count_at_the_realizable_patterns():
    model = net([2, 3, 4, 2], False, 4)  # 10 regions, no unit dead on R^2
    layers = relu_layers(model)
    regions = enumerate_regions(layers)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    data = tc.count_laws(model, torch.from_numpy(region_inputs(layers, regions)), theta=theta)
    lifted = tc.trace_dimension(pattern_outputs([2, 3, 4, 2], False, regions.patterns), data.D, theta=theta)
    assert data.n_laws == lifted.n_laws
    assert data.n_laws >= tc.mlp_trace_dimension([2, 3, 4, 2], "relu").n_laws
