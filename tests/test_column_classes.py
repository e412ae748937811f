"""A consumer that reads different units at different positions through one column.

``pixel_shuffle(h, r)`` puts the r² channels c·r² + k of a layer at the r × r positions of
channel c, and the next convolution reads channel c through one column of its weight at every
position. Scaling the r² channels by one λ, and that column by 1/λ, keeps the output, so the
law is Σ_k (‖W[c·r² + k]‖² + b²) − ‖W_next[:, c]‖² per channel c: one law per class of units
read through one column (and through columns that share a unit). Checked with torch.func, one
SGD step and the Lie-algebra count."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import torch_conslaw as tc
from tests.graph_helpers import law_residuals, quiet_monitor, seeded_model, seeded_randn, sgd_first_order



class SuperResolution(nn.Module):
    """conv → ReLU → PixelShuffle(2) → conv → ReLU → PixelShuffle(2) → conv (an ESPCN-like upsampler)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.shuffle(torch.relu(self.c2(self.shuffle(torch.relu(self.c1(x)))))))


class ShuffleThenDepthwise(nn.Module):
    """conv → ReLU → pixel_shuffle → depthwise conv → ReLU → 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.dw, self.pw = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.Conv2d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(torch.relu(self.dw(nn.functional.pixel_shuffle(torch.relu(self.c1(x)), 2))))


class FeaturesToPositions(nn.Module):
    """The 8 units of a layer reshaped into 2 positions of 4 features: column j of the next
    layer reads unit j at one position and unit 4 + j at the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).reshape(x.shape[0], 2, 4))


class RolledCopy(nn.Module):
    """Column j reads unit j at one position and unit j − 1 at the other: the columns chain
    every unit into one class (one law)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(torch.stack([h, h.roll(1, -1)], 1))


class ShuffleBesideInput(nn.Module):
    """The shuffled units beside the input image on the width axis: one column reads units at
    some positions and the image at others (no symmetry)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(2, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = nn.functional.pixel_shuffle(torch.relu(self.c1(x)), 2)
        return self.c2(torch.cat([up, nn.functional.interpolate(x, scale_factor=2.0)], dim=-1))


@pytest.mark.parametrize(
    ("cls", "shape", "counts"),
    [
        (SuperResolution, (2, 3, 4, 4), {"c1→c2": 4, "c2→c3": 2}),
        (ShuffleThenDepthwise, (2, 3, 4, 4), {"c1→dw": 2, "dw→pw": 2}),
        (FeaturesToPositions, (3, 5), {"a→b": 4}),
        (RolledCopy, (3, 5), {"a→b": 1}),
    ],
)
def test_units_read_through_one_column_share_a_law(cls, shape, counts):
    model, x = seeded_model(cls), seeded_randn(*shape, seed=1)
    groups = quiet_monitor(model, x).groups
    assert {g.name.split(" ")[0]: g.count for g in groups} == counts
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12
    assert sgd_first_order(model, x, groups, lambda out: out) < 1e-12


def test_the_law_is_the_sum_over_the_shuffled_channels():
    """Σ_k (‖c1.weight[4c + k]‖² + c1.bias[4c + k]²) − ‖c2.weight[:, c]‖², written out by hand."""
    model, x = seeded_model(SuperResolution), seeded_randn(2, 3, 4, 4, seed=1)
    (group,) = [g for g in quiet_monitor(model, x).groups if g.name.startswith("c1→c2")]
    params = {n: p.detach() for n, p in model.named_parameters()}
    w1, b1, w2 = params["c1.weight"], params["c1.bias"], params["c2.weight"]
    incoming = (w1.flatten(1).square().sum(1) + b1.square()).reshape(4, 4).sum(1)
    outgoing = w2.transpose(0, 1).flatten(1).square().sum(1)
    torch.testing.assert_close(group.values(params), incoming - outgoing, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(("cls", "laws"), [(SuperResolution, 6), (ShuffleThenDepthwise, 4)])
def test_the_count_agrees(cls, laws):
    """Every law there is: the Lie-algebra count on enough inputs equals the laws tracked."""
    model, x = seeded_model(cls), seeded_randn(24, 3, 4, 4, seed=3)
    report = tc.analyze(model, x)
    assert report.complete is True and report.tracked_rank == report.lie_laws == laws, str(report)


def test_a_column_reading_units_and_other_values_is_a_barrier():
    model, x = seeded_model(ShuffleBesideInput), seeded_randn(2, 2, 3, 3, seed=1)
    monitor = quiet_monitor(model, x)
    assert not [g for g in monitor.groups if g.name.startswith("c1")]
    assert any("values that carry none" in s.reason for s in monitor.skipped)


class LinearUpsampler(nn.Module):
    """conv → ReLU → conv → PixelShuffle(2) → conv with no activation after the shuffle (the
    upsampler of EDSR / Swin2SR): the shuffled channels' classes keep a whole matrix law."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 12, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(nn.functional.pixel_shuffle(self.c1(torch.relu(self.c0(x))), 2))


def test_a_linear_shuffle_keeps_the_matrix_law_of_its_channel_classes():
    """Σ_k [W_k b_k][W_k b_k]ᵀ − W_nextᵀ W_next over the 3 classes (rows 4c + k of c1), by hand."""
    model, x = seeded_model(LinearUpsampler), seeded_randn(2, 3, 5, 5, seed=1)
    groups = quiet_monitor(model, x).groups
    (matrix,) = [g for g in groups if g.kind == "matrix"]
    assert matrix.count == 6
    p = {n: t.detach() for n, t in model.named_parameters()}
    rows = torch.cat([p["c1.weight"].flatten(1), p["c1.bias"][:, None]], 1).reshape(3, 4, -1)  # [class, k, in]
    incoming = torch.einsum("cki,dki->cd", rows, rows)
    w2 = p["c2.weight"].transpose(0, 1).flatten(1)  # [class, out · kernel]
    by_hand = (incoming - w2 @ w2.t())[tuple(torch.triu_indices(3, 3))]
    torch.testing.assert_close(matrix.values(p).sort().values, by_hand.sort().values, rtol=1e-13, atol=1e-13)
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12
    report = tc.analyze(model, seeded_randn(12, 3, 5, 5, seed=3))
    assert report.complete is True and report.tracked_rank == report.lie_laws == 10, str(report)
