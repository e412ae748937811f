"""Two layers multiplied elementwise, a ⊙ b, before anything that would stop their laws (a
norm, tanh, the output): scaling unit u of a by λ and the unit w of b it meets by λ^(−k_a/k_b)
leaves the product unchanged, so ‖a_u‖² − (k_a/k_b)‖b_w‖² is conserved (BitNet's
relu(gate)² ⊙ up before its ffn_sub_norm: ‖gate_j‖² − 2‖up_j‖²). Checked against the Lie-algebra
count (``tc.analyze``), by hand with torch.func, and by training; near misses get no law."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc
from tests.graph_helpers import law_residuals

F64 = torch.float64


class ReluSquaredGate(nn.Module):
    """BitNet's MLP: down(norm(relu(gate x)² ⊙ up x))."""

    def __init__(self, d: int = 6, h: int = 5) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.norm, self.down = nn.RMSNorm(h, eps=1e-6), nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(F.relu(self.gate(x)) ** 2 * self.up(x)))


class Bilinear(nn.Module):
    """out(LayerNorm(a x ⊙ b x)), with biases."""

    def __init__(self, d: int = 6, h: int = 5) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, h), nn.Linear(d, h)
        self.ln, self.out = nn.LayerNorm(h), nn.Linear(h, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(self.a(x) * self.b(x)))


class Flipped(nn.Module):
    """tanh(a x ⊙ flip(b x)): unit u of a meets unit h − 1 − u of b."""

    def __init__(self, d: int = 6, h: int = 4) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, h), nn.Linear(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x) * self.b(x).flip(-1))


class Outer(nn.Module):
    """tanh of the outer product of a x and b x: every unit meets every unit, one law in all."""

    def __init__(self, d: int = 6, h: int = 3) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, h), nn.Linear(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh((self.a(x)[:, :, None] * self.b(x)[:, None, :]).flatten(1))


class ThreeFactors(nn.Module):
    """out(LayerNorm(a x ⊙ b x ⊙ c x)): two laws per unit (a with b, a with c)."""

    def __init__(self, d: int = 6, h: int = 4) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, h)
        self.ln, self.out = nn.LayerNorm(h, elementwise_affine=False), nn.Linear(h, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(self.a(x) * self.b(x) * self.c(x)))


class AlsoElsewhere(nn.Module):
    """a x also reaches the output through tanh alone: no law pairs a with b."""

    def __init__(self, d: int = 6, h: int = 4) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, h), nn.Linear(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return torch.tanh(y * self.b(x)) + torch.tanh(y)


class PartlyConstant(nn.Module):
    """a x (4 units) times [b x (2 units), 1.5, 1.5]: a's units 0, 1 pair with b's; 2, 3 meet a
    constant, so they alone would scale the product: no law for them."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, 4), nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = torch.cat([self.b(x), torch.full((x.shape[0], 2), 1.5, dtype=x.dtype)], -1)
        return torch.tanh(self.a(x) * other)


def _input(seed: int = 1, n: int = 16, d: int = 6) -> torch.Tensor:
    return torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _output(out: torch.Tensor) -> torch.Tensor:
    return out


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().to(F64)


def _monitor(model: nn.Module, x: torch.Tensor) -> tc.ConservationMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tc.ConservationMonitor(model, x)


def _products(monitor: tc.ConservationMonitor) -> list:
    return [g for g in monitor.groups if "⊙" in g.name]


def test_relu_squared_gate_times_up_keeps_gate_minus_twice_up():
    model, x = _model(ReluSquaredGate), _input()
    groups = _products(_monitor(model, x))
    assert [(g.count, g.degree) for g in groups] == [(5, 2.0)]
    params = dict(model.named_parameters())
    by_hand = params["gate.weight"].square().sum(1) - 2 * params["up.weight"].square().sum(1)
    torch.testing.assert_close(groups[0].values(params), by_hand.detach(), rtol=0, atol=1e-14)
    assert law_residuals(model, x, [groups[0]], _output) < 1e-12


def test_every_sgd_step_changes_the_law_at_second_order_only():
    """h(θ⁺) − h(θ) = 2B(θ, Δ) + B(Δ, Δ): the first-order part is −lr ⟨∇h, ∇L⟩ = 0 for a law,
    so it stays at rounding while the units themselves move at first order."""
    model, x = _model(ReluSquaredGate), _input()
    group = _products(_monitor(model, x))[0]
    target = torch.randn(16, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    params = dict(model.named_parameters())
    for _ in range(10):
        before = {k: v.detach().clone() for k, v in params.items()}
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
        with torch.no_grad():
            delta = {k: params[k] - before[k] for k in params}
            first, second = group.first_order(before, delta), group.second_order(delta)
            gate_first = 2 * (before["gate.weight"] * delta["gate.weight"]).sum(1)  # of ‖gate_j‖² alone
        assert first.abs().max() < 1e-12 * gate_first.abs().max()
        assert gate_first.abs().max() > 10 * second.abs().max()  # the units moved at first order


@pytest.mark.parametrize("cls, counts", [
    (Bilinear, [5]),  # a_u with b_u, biases included
    (Flipped, [4]),  # a_u with b_(3−u)
    (Outer, [1]),  # every unit with every unit: one law, Σ‖a‖² − Σ‖b‖²
    (ThreeFactors, [4, 4]),  # a with b, a with c
    (PartlyConstant, [2]),  # a_0, a_1 with b_0, b_1; a_2, a_3 meet a constant
])
def test_product_laws_are_verified_and_complete(cls, counts):
    model, x = _model(cls), _input()
    groups = _products(_monitor(model, x))
    assert [g.count for g in groups] == counts
    for group in groups:
        assert law_residuals(model, x, [group], _output) < 1e-12


def test_flipped_product_pairs_unit_u_with_the_unit_it_meets():
    model, x = _model(Flipped), _input()
    group = _products(_monitor(model, x))[0]
    p = dict(model.named_parameters())
    rows = lambda name: p[f"{name}.weight"].square().sum(1) + p[f"{name}.bias"].square()  # noqa: E731
    torch.testing.assert_close(group.values(p), (rows("a") - rows("b").flip(0)).detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", [AlsoElsewhere])
def test_no_product_law_when_a_factor_reaches_the_output_another_way(cls):
    model, x = _model(cls), _input()
    assert _products(_monitor(model, x)) == []
    report = tc.analyze(model, x)
    assert report.lie_laws == 0  # the count agrees: nothing is conserved


def test_analyze_finds_the_product_laws_complete():
    model, x = _model(ReluSquaredGate), _input()
    report = tc.analyze(model, x)
    assert report.complete is True and report.tracked_rank == report.lie_laws == 10, str(report)


def test_rms_norm_with_its_default_eps_does_not_count_its_scale_law_as_exact():
    """``nn.RMSNorm(h)`` (eps=None) adds the machine epsilon: scaling every unit before it is a
    law only up to that eps, as with any eps, so the count takes it at a larger eps."""
    torch.manual_seed(0)
    model, x = ReluSquaredGate().to(F64), _input()
    model.norm = nn.RMSNorm(5).to(F64)
    assert model.norm.eps is None
    report = tc.analyze(model, x)
    assert report.lie_laws == report.tracked_rank == 10 and report.complete is True, str(report)
