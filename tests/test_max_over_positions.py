"""Max (or min) over positions, with its indices: ``h.max(dim=2)`` returns the values and the
positions of the maxima. Scaling a channel by λ > 0 scales its maximum by λ and moves no
position, so a max-over-time text CNN keeps ‖conv_c‖² + b_c² − ‖fc[:, c]‖². A max over units
(maxout, a max over the channels) ties the units it takes together: they share one λ. Checked
with torch.func, one SGD step and the Lie-algebra count."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torch_conslaw as tc
from tests.graph_helpers import law_residuals, seeded_randn, sgd_first_order, sync_monitor

F64 = torch.float64


class MaxOverTime(nn.Module):
    """conv1d → ReLU → max over time (``how``: values and indices, .values, torch.max, min) → fc."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv, self.fc = nn.Conv1d(3, 5, 3), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if self.how == "values_and_indices":
            v, idx = h.max(dim=2)
            return self.fc(v) + 0.0 * idx[:, :2]
        if self.how == "values":
            return self.fc(h.max(dim=-1).values)
        if self.how == "torch_max":
            return self.fc(torch.max(h, 2)[0])
        if self.how == "min_of_negated":
            return self.fc(-(-h).min(dim=2).values)
        return self.fc(h.max(dim=1).values.unsqueeze(1).expand(-1, 5, -1).mean(-1))  # over the channels


def _model(how: str) -> nn.Module:
    torch.manual_seed(0)
    return MaxOverTime(how).to(F64)


@pytest.mark.parametrize("how", ["values_and_indices", "values", "torch_max", "min_of_negated"])
def test_a_max_over_positions_keeps_the_channel_laws(how):
    model, x = _model(how), seeded_randn(4, 3, 9, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = [g for g in sync_monitor(model, x).groups if g.name == "conv→fc"]
    assert [g.count for g in groups] == [5]
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12
    assert sgd_first_order(model, x, groups, lambda out: out) < 1e-12


def test_the_count_agrees():
    model, x = _model("values_and_indices"), seeded_randn(4, 3, 9, seed=1)
    report = tc.analyze(model, x)
    assert report.complete is True and report.tracked_rank == report.lie_laws == 5, str(report)


def test_a_max_over_the_channels_ties_them_into_one_law():
    """max_c(λ h_c) = λ max_c h_c only when every channel gets the same λ: one law for the layer."""
    model, x = _model("over_channels"), seeded_randn(4, 3, 9, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = [g for g in sync_monitor(model, x).groups if g.name.startswith("conv→fc")]
    assert [g.count for g in groups] == [1]
    p = dict(model.named_parameters())
    by_hand = p["conv.weight"].square().sum() + p["conv.bias"].square().sum() - p["fc.weight"].square().sum()
    torch.testing.assert_close(groups[0].values(p), by_hand.reshape(1).detach(), rtol=0, atol=1e-13)
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12


class Maxout(nn.Module):
    """Maxout units (Goodfellow et al. 2013): the max over k pieces of a linear layer, pieces
    laid out per unit (``view(n, C, k)``) or per piece (``view(n, k, C)``)."""

    def __init__(self, k: int, per_piece: bool) -> None:
        super().__init__()
        self.k, self.per_piece = k, per_piece
        self.l, self.fc = nn.Linear(4, 5 * k), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l(x)
        if self.per_piece:
            return self.fc(h.view(x.shape[0], self.k, 5).amax(1))
        return self.fc(h.view(x.shape[0], 5, self.k).max(-1).values)


@pytest.mark.parametrize("per_piece", [False, True])
def test_maxout_units_keep_the_sum_over_their_pieces(per_piece):
    torch.manual_seed(0)
    model, x = Maxout(2, per_piece).to(F64), seeded_randn(16, 4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (group,) = [g for g in sync_monitor(model, x).groups if g.name.startswith("l→fc")]
    p = dict(model.named_parameters())
    rows = p["l.weight"].square().sum(1) + p["l.bias"].square()
    pieces = rows.view(2, 5).sum(0) if per_piece else rows.view(5, 2).sum(1)
    by_hand = pieces - p["fc.weight"].square().sum(0)
    torch.testing.assert_close(group.values(p), by_hand.detach(), rtol=0, atol=1e-13)
    assert law_residuals(model, x, [group], lambda out: out) < 1e-12
    assert sgd_first_order(model, x, [group], lambda out: out) < 1e-12
    report = tc.analyze(model, x)
    assert report.complete is True and report.tracked_rank == report.lie_laws == 5, str(report)


class ElementwiseMinMax(nn.Module):
    """torch.max(h, 0) written with two tensors (a ReLU by hand) on one branch; torch.min(g, c)
    of a constant c on another: an elementwise op, not a reduction."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)
        self.c, self.d = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        g = self.c(x)
        return self.b(torch.max(h, torch.zeros_like(h))) + self.d(torch.min(g, torch.full_like(g, 0.5)))


def test_an_elementwise_max_is_a_relu_and_an_elementwise_min_stops_only_its_units():
    torch.manual_seed(0)
    model, x = ElementwiseMinMax().to(F64), seeded_randn(8, 4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = sync_monitor(model, x)
    assert [(g.name, g.count) for g in monitor.groups if g.name.startswith(("a→", "c→"))] == [("a→b", 5)]
    assert any("elementwise minimum" in s.reason for s in monitor.skipped)
    assert law_residuals(model, x, [g for g in monitor.groups if g.name == "a→b"], lambda out: out) < 1e-12


class MaxOfProduct(nn.Module):
    """max over the units of a ⊙ b: each product a_u b_u is unchanged by a_u → λ a_u, b_u → b_u / λ,
    so the max is too; the max ties no unit there."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a(x) * self.b(x)).amax(-1)


def test_a_max_over_a_product_keeps_the_product_laws():
    torch.manual_seed(0)
    model, x = MaxOfProduct().to(F64), seeded_randn(8, 4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = [g for g in sync_monitor(model, x).groups if "⊙" in g.name]
    assert [g.count for g in groups] == [5]
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12
