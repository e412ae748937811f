"""Pads that copy elements of the value: reflect, replicate and circular (``nn.ReflectionPad2d``,
``F.pad(h, p, mode="circular")``). Each padded element is a copy of an element of the same
channel, so scaling a channel by λ scales its padding by λ too, and the channel keeps its law
‖W_c‖² + b_c² − ‖W_next[:, c]‖² across the pad. A pad with a constant other than zero does not
scale and stays a barrier. Checked with torch.func, one SGD step and the Lie-algebra count."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import torch_conslaw as tc
from tests.graph_helpers import law_residuals, quiet_monitor, seeded_randn, sgd_first_order

F64 = torch.float64


class PaddedConvs(nn.Module):
    """conv → ReLU → F.pad(mode) → conv, and again through a pad module."""

    def __init__(self, mode: str, value: float = 0.0) -> None:
        super().__init__()
        self.mode, self.value = mode, value
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3), nn.Conv2d(5, 2, 3)
        self.reflect = nn.ReflectionPad2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        if self.mode == "constant":
            h = nn.functional.pad(h, (1, 1, 1, 1), value=self.value)
        else:
            h = nn.functional.pad(h, (1, 2, 2, 1), mode=self.mode)
        return self.c3(self.reflect(torch.relu(self.c2(h))))


class PaddedFeatures(nn.Module):
    """A replicate pad along the units themselves: the next layer reads the first and last
    units twice (two columns each)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).unsqueeze(1)
        return self.b(nn.functional.pad(h, (1, 1), mode="replicate").squeeze(1))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "constant"])
def test_a_pad_that_copies_keeps_the_channel_laws(mode):
    torch.manual_seed(0)
    model, x = PaddedConvs(mode).to(F64), seeded_randn(2, 3, 8, 8, seed=1)
    groups = quiet_monitor(model, x).groups
    assert {g.name: g.count for g in groups} == {"c1→c2": 4, "c2→c3": 5}
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12
    assert sgd_first_order(model, x, groups, lambda out: out) < 1e-12


def test_a_pad_along_the_units_reads_them_twice():
    torch.manual_seed(0)
    model, x = PaddedFeatures().to(F64), seeded_randn(5, 3, seed=1)
    groups = quiet_monitor(model, x).groups  # units read by two columns and by one: two groups
    assert sum(g.count for g in groups) == 4
    params = {n: p.detach() for n, p in model.named_parameters()}
    w = params["b.weight"]
    outgoing = torch.stack([w[:, cols].square().sum() for cols in ([0, 1], [2], [3], [4, 5])])  # u0 u0 u1 u2 u3 u3
    incoming = params["a.weight"].square().sum(1) + params["a.bias"].square()
    found = torch.cat([g.values(params) for g in groups]).sort().values
    torch.testing.assert_close(found, (incoming - outgoing).sort().values, rtol=1e-13, atol=1e-13)
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12


def test_a_constant_other_than_zero_is_a_barrier():
    torch.manual_seed(0)
    model, x = PaddedConvs("constant", value=1.0).to(F64), seeded_randn(2, 3, 8, 8, seed=1)
    monitor = quiet_monitor(model, x)
    assert "c1→c2" not in {g.name for g in monitor.groups}
    assert any("the constant 1.0 does not scale" in s.reason for s in monitor.skipped)


def test_the_count_agrees():
    torch.manual_seed(0)
    model, x = PaddedConvs("reflect").to(F64), seeded_randn(6, 3, 8, 8, seed=3)
    report = tc.analyze(model, x)
    assert report.complete is True and report.tracked_rank == report.lie_laws == 9, str(report)
