"""Structure finder: pairs found through fx and hooks, and every skipped pair with its reason."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_conslaw.structure import find_structure, unwrap_model


class MLP(nn.Module):
    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.act = act if act is not None else nn.ReLU()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FunctionalCNN(nn.Module):
    """F.relu, torch.relu, x.relu(), pooling, view-flatten and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5 * 4, 7)
        self.out = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = self.c2(x).relu()
        x = torch.relu(self.c3(self.bn(x)))
        x = F.adaptive_avg_pool2d(x, 2)
        x = x.view(x.size(0), -1)
        h = self.fc(x)
        return self.out(F.relu(h) + h)


class Untraceable(FunctionalCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return super().forward(x)


def summary(structure):
    return sorted((p.name, p.kind, p.units, p.positions, p.degree) for p in structure.pairs)


def test_sequential_relu_mlp_has_one_unit_group_per_hidden_layer():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.LeakyReLU(0.1), nn.Linear(6, 2))
    s = find_structure(model)
    assert s.method == "fx"
    assert summary(s) == [("0→2", "unit", 5, 1, 1.0), ("2→4", "unit", 6, 1, 1.0)]
    assert s.skipped == []


def test_linear_hidden_layer_gives_the_matrix_law_and_dropout_a_unit_law():
    model = nn.Sequential(nn.Linear(4, 5), nn.Identity(), nn.Linear(5, 3), nn.Dropout(0.2), nn.Linear(3, 2))
    s = find_structure(model)
    assert summary(s) == [("0→2", "matrix", 5, 1, 1.0), ("2→4", "unit", 3, 1, 1.0)]


def test_functional_cnn_channels_flatten_mapping_and_skip_reasons():
    s = find_structure(FunctionalCNN())
    # the BatchNorm ends the laws of c2 but its affine part (γ, β) starts a channel law with c3
    assert summary(s) == [
        ("bn→c3", "channel", 6, 1, 1.0),
        ("c1→c2", "channel", 4, 1, 1.0),
        ("c3→fc", "channel", 5, 4, 1.0),
    ]
    reasons = [str(k) for k in s.skipped]
    assert any("bn (BatchNorm2d) renormalizes" in r and "between c2 and bn" in r for r in reasons)
    assert any("output of fc is used by 2 ops" in r for r in reasons)
    assert len(reasons) == 2


def test_hooks_fallback_finds_the_same_pairs_without_side_effects():
    model = Untraceable()
    x = torch.randn(2, 3, 10, 10)
    rng = torch.get_rng_state()
    running = model.bn.running_mean.clone()
    s = find_structure(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert s.method == "hooks"
    # with an example input the op graph also sees that relu(h) + h is positively
    # 1-homogeneous in the units of fc, so fc → out keeps a unit law
    assert summary(s) == sorted(summary(find_structure(FunctionalCNN())) + [("fc→out", "unit", 7, 1, 1.0)])
    assert sorted(k.reason.split(":")[0] for k in s.skipped) == ["between c2 and bn"]
    assert torch.equal(model.bn.running_mean, running) and model.training


def test_untraceable_without_example_input_explains_what_to_do():
    s = find_structure(Untraceable())
    assert s.pairs == [] and s.method == "none"
    assert "pass example_input" in str(s.skipped[0])


def test_gelu_pair_is_skipped_with_a_readable_reason_and_a_candidate():
    s = find_structure(MLP(nn.GELU()))
    assert s.pairs == []
    assert str(s.skipped[0]) == "GELU between fc1 and fc2 is not positively homogeneous"
    assert s.skipped[0].candidate is not None and not s.skipped[0].candidate.conserved


def test_functional_tanh_is_reported():
    class M(MLP):
        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    assert str(find_structure(M()).skipped[0]) == "tanh between fc1 and fc2 is not positively homogeneous"


def test_residual_block_keeps_laws_inside_and_none_across_the_skip():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            h = F.relu(self.inp(x))
            h = h + self.b(F.relu(self.a(h)))
            return self.head(F.relu(h))

    s = find_structure(Block())
    assert summary(s) == [("a→b", "unit", 6, 1, 1.0)]
    reasons = " | ".join(map(str, s.skipped))
    assert "output of inp (after relu) is used by 2 ops" in reasons
    assert "between b and head: add is an addition" in reasons


def test_frozen_shared_and_reused_parameters_are_excluded_with_reasons():
    frozen = MLP()
    frozen.fc1.bias.requires_grad_(False)
    assert find_structure(frozen).pairs == []
    assert "fc1.bias is frozen (requires_grad=False)" in str(find_structure(frozen).skipped[0])

    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    tied[2].weight = tied[0].weight
    s = find_structure(tied)
    assert s.pairs == []
    assert all("is shared with" in str(k) for k in s.skipped) and len(s.skipped) == 2

    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            return self.out(F.relu(self.fc(F.relu(self.fc(x)))))

    s = find_structure(Reused())
    assert s.pairs == [] and all("called 2 times" in str(k) for k in s.skipped)


def test_model_without_usable_pair_explains_why():
    s = find_structure(nn.Sequential(nn.Flatten(), nn.Linear(8, 2)))
    assert s.pairs == [] and len(s.skipped) == 1
    assert "no two registered layers" in str(s.skipped[0])


def test_unsupported_layouts_are_reported():
    s = find_structure(nn.Sequential(nn.Linear(4, 6), nn.Flatten(), nn.Linear(6, 2)))
    assert "flattens the output of a Linear layer" in str(s.skipped[0])
    s = find_structure(nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Linear(5, 2)))
    assert "reads axis 'last'" in str(s.skipped[0])
    s = find_structure(nn.Sequential(nn.Linear(4, 6), nn.MaxPool1d(2), nn.Linear(3, 2)))
    assert "pools over the units" in str(s.skipped[0])
    # a grouped convolution as consumer is supported (each input channel is read by the out
    # channels of its group; checked in test_sweep_models.py)
    s = find_structure(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1, groups=2)))
    assert [(p.producer, p.consumer) for p in s.pairs] == [("0", "2")] and not s.skipped


def test_unwrap_model_strips_module_wrappers():
    inner = MLP()

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = inner

    assert unwrap_model(Wrapper()) is inner
    compiled = torch.compile(inner)  # lazy: nothing is compiled until it is called
    assert unwrap_model(compiled) is inner
    assert summary(find_structure(Wrapper())) == [("fc1→fc2", "unit", 5, 1, 1.0)]
