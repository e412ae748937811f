"""Dot products of two layers over their units: ``(u * v).sum(-1)`` and ``einsum('bi,bi->b')``.

A matrix factorization ``U[i] · V[j]`` or a two-tower model ``tower_a(x) · tower_b(y)`` is
unchanged by U → U G, V → V G⁻ᵀ for any invertible G: the whole matrix law
[W b]ᵀ[W b] − [W' b']ᵀ[W' b'] of the two last layers is conserved (d(d + 1)/2 laws), not only
its diagonal ‖u_i‖² − ‖v_i‖² that the elementwise product alone gives. Checked by hand, with
torch.func and against the Lie-algebra count."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import torch_conslaw as tc
from tests.graph_helpers import law_residuals, quiet_monitor, seeded_model, sgd_first_order

F64 = torch.float64


class Factorization(nn.Module):
    """score(i, j) = U[i] · V[j], written as ``how``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.users, self.items = nn.Embedding(7, 3), nn.Embedding(6, 3)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        u, v = self.users(pairs[:, 0]), self.items(pairs[:, 1])
        if self.how == "mul_sum":
            return (u * v).sum(-1)
        if self.how == "mul_sum_keepdim":
            return torch.mul(u, v).sum(dim=1, keepdim=True)
        if self.how == "einsum":
            return torch.einsum("bi,bi->b", u, v)
        if self.how == "mean":
            return (v * u).mean(-1)
        raise ValueError(self.how)


class TwoTower(nn.Module):
    """tower_a(x) · tower_b(y), or a near miss (``how``)."""

    def __init__(self, how: str = "dot") -> None:
        super().__init__()
        self.how = how
        self.a1, self.a2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.b1, self.b2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        x, y = xy[:, :4], xy[:, 4:]
        u, v = self.a2(torch.relu(self.a1(x))), self.b2(torch.relu(self.b1(y)))
        if self.how == "dot":
            return (u * v).sum(-1)
        if self.how == "product_also_read":  # the product is not only summed
            p = u * v
            return p.sum(-1) + p[:, 0]
        if self.how == "sum_over_batch":  # not a sum over the units
            return (u * v).sum(0)
        if self.how == "with_input":  # one factor is no layer
            return (u * y[:, :3]).sum(-1) + v.sum(-1)
        raise ValueError(self.how)


def _pairs(n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randint(0, 7, (n,), generator=g), torch.randint(0, 6, (n,), generator=g)], 1)


def _tower_inputs(n: int = 30) -> torch.Tensor:
    """x (4 features) and y (5 features) side by side."""
    return torch.randn(n, 9, generator=torch.Generator().manual_seed(1), dtype=F64)


@pytest.mark.parametrize("how", ["mul_sum", "mul_sum_keepdim", "einsum", "mean"])
def test_a_factorization_keeps_its_whole_matrix_law(how):
    model, pairs = seeded_model(Factorization, how), _pairs()
    (group,) = quiet_monitor(model, pairs).groups
    assert (group.kind, group.count) == ("matrix", 6)
    params = {n: p.detach() for n, p in model.named_parameters()}
    u, v = params["users.weight"], params["items.weight"]
    gram = u.t() @ u - v.t() @ v  # the upper triangle of UᵀU − VᵀV
    by_hand = gram[tuple(torch.triu_indices(3, 3))]
    if how == "mean":  # (v * u): the items are the first factor, the law VᵀV − UᵀU
        by_hand = -by_hand
    torch.testing.assert_close(group.values(params).sort().values, by_hand.sort().values, rtol=1e-13, atol=1e-13)
    pick = (lambda out: out) if how != "mul_sum_keepdim" else (lambda out: out.flatten())
    assert law_residuals(model, pairs, [group], pick) < 1e-12
    assert sgd_first_order(model, pairs, [group], pick) < 1e-12


def test_the_factorization_count_agrees():
    """Pairs (user, item) index two tables of different sizes: the count draws each column in its range."""
    report = tc.analyze(seeded_model(Factorization, "mul_sum"), _pairs())
    assert report.complete is True and report.tracked_rank == report.lie_laws == 6, str(report)
    assert "each position's own range" in report.lie_note


def test_a_two_tower_model_is_complete():
    model, inputs = seeded_model(TwoTower), _tower_inputs()
    groups = quiet_monitor(model, inputs).groups
    assert sorted((g.kind, g.count) for g in groups) == [("matrix", 6), ("unit", 6), ("unit", 6)]
    assert law_residuals(model, inputs, groups, lambda out: out) < 1e-12
    report = tc.analyze(model, inputs)
    assert report.complete is True and report.tracked_rank == report.lie_laws == 18, str(report)


@pytest.mark.parametrize("how", ["product_also_read", "sum_over_batch", "with_input"])
def test_near_misses_get_no_matrix_law(how):
    model, inputs = seeded_model(TwoTower, how), _tower_inputs()
    groups = quiet_monitor(model, inputs).groups
    assert not [g for g in groups if g.kind == "matrix"]
    assert law_residuals(model, inputs, groups, lambda out: out) < 1e-12
