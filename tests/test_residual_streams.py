"""Residual streams (ICML 2025): where a layer's output is added to another layer's output, unit
c of both at every position, scaling both by λ scales channel c of the sum by λ; the layers that
read the stream (before and after the sum) take 1/λ. One law per stream channel:
‖W_writer,c‖² + b_c² summed over every writer − ‖W_reader[:, c]‖² summed over every reader.
Merges chain along the stream; a stream that reaches the output or a normalization has none."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc
from torch_conslaw import ConservationMonitor

from graph_helpers import law_residuals, sgd_first_order

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


class ConvStream(nn.Module):
    """stem → x + c2(relu(c1(x))) → ReLU → 1×1 head (the README's case)."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.c2, self.out = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.out(F.relu(h + self.c2(F.relu(self.c1(h)))))


def test_a_residual_stream_written_by_two_layers_gives_one_law_per_channel():
    torch.manual_seed(0)
    model = ConvStream().double()
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    groups = {g.name: g for g in ConservationMonitor(model, x, every=1).groups}
    assert {n: g.count for n, g in groups.items()} == {"c1→c2": 3, "stem+c2→c1+out": 3}
    assert law_residuals(model, x, list(groups.values()), lambda y: y) <= 1e-10
    assert sgd_first_order(model, x, list(groups.values()), lambda y: y) <= 1e-12
    p = dict(model.named_parameters())  # independent: the law by hand
    sq = lambda t, dim: t.square().sum(dim)  # noqa: E731
    by_hand = (sq(p["stem.weight"], (1, 2, 3)) + p["stem.bias"].square() + sq(p["c2.weight"], (1, 2, 3))
               + p["c2.bias"].square() - sq(p["c1.weight"], (0, 2, 3)) - sq(p["out.weight"], (0, 2, 3)))
    torch.testing.assert_close(groups["stem+c2→c1+out"].values(p), by_hand, rtol=1e-13, atol=1e-13)
    report = tc.analyze(model, x, theta="random")
    assert report.complete is True and report.tracked_rank == report.lie_laws == 6


class Blocks(nn.Module):
    """stem → two residual MLP blocks → head; ``end``: what reads the stream at the end."""

    def __init__(self, end: str = "head"):
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.f1, self.g1, self.f2, self.g2 = nn.Linear(4, 5), nn.Linear(5, 4), nn.Linear(4, 5), nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4) if end == "norm" else None
        self.head = nn.Linear(4, 2) if end != "output" else None

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + self.g1(F.relu(self.f1(h)))
        h = h + self.g2(F.relu(self.f2(h)))
        if self.norm is not None:
            h = self.norm(h)
        return h if self.head is None else self.head(h)


def test_merges_chain_along_the_stream():
    torch.manual_seed(0)
    model = Blocks().double()
    x = torch.randn(16, 3, dtype=F64)
    groups = {g.name: g for g in ConservationMonitor(model, x, every=1).groups}
    assert groups["stem+g1+g2→f1+f2+head"].count == 4
    assert {n: g.count for n, g in groups.items() if "+" not in n} == {"f1→g1": 5, "f2→g2": 5}
    assert law_residuals(model, x, list(groups.values()), lambda y: y) <= 1e-10
    assert sgd_first_order(model, x, list(groups.values()), lambda y: y) <= 1e-12
    p = dict(model.named_parameters())  # independent: the stream's law by hand
    rows = lambda n: p[f"{n}.weight"].square().sum(1) + p[f"{n}.bias"].square()  # noqa: E731
    cols = lambda n: p[f"{n}.weight"].square().sum(0)  # noqa: E731
    by_hand = rows("stem") + rows("g1") + rows("g2") - cols("f1") - cols("f2") - cols("head")
    torch.testing.assert_close(groups["stem+g1+g2→f1+f2+head"].values(p), by_hand, rtol=1e-13, atol=1e-13)
    # the count on these inputs also has laws of ReLU units that are dead or always active on
    # every input (analyze's note names them); all 14 tracked are among its laws
    report = tc.analyze(model, x, theta="random")
    assert report.tracked_rank == 14 and report.lie_laws >= 14


@pytest.mark.parametrize("end", ["output", "norm"])
def test_a_stream_that_reaches_the_output_or_a_norm_has_no_law(end):
    torch.manual_seed(0)
    model = Blocks(end).double()
    monitor = ConservationMonitor(model, torch.randn(16, 3, dtype=F64), every=1)
    assert not [g for g in monitor.groups if "+" in g.name and g.kind == "unit"]
    assert {g.name for g in monitor.groups if g.kind == "unit"} - {"norm→head"} == {"f1→g1", "f2→g2"}
