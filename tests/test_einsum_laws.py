"""Attention written with torch.einsum gets the same head laws as with matmul, verified, and
equal to a by-hand count; other einsum equations are refused with a reason naming them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import torch_conslaw as tc

F64 = torch.float64


class Attention(nn.Module):
    """Multi-head self-attention in plain torch; the score and value products are written
    with ``torch.einsum`` (``einsum=True``) or with ``@``."""

    def __init__(self, d: int = 8, heads: int = 2, einsum: bool = True) -> None:
        super().__init__()
        self.heads, self.einsum = heads, einsum
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def split(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # b h t d

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scale = 1.0 / math.sqrt(q.shape[-1])
        if self.einsum:
            p = (torch.einsum("bhqd,bhkd->bhqk", q, k) * scale).softmax(-1)
            y = torch.einsum("bhqk,bhkd->bhqd", p, v)
        else:
            p = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)
            y = p @ v
        b, h, t, dh = y.shape
        return self.o(y.transpose(1, 2).reshape(b, t, h * dh))


def build(einsum: bool) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = Attention(einsum=einsum).double()
    return model, torch.randn(3, 5, 8, dtype=F64, generator=torch.Generator().manual_seed(1))


def test_einsum_attention_gets_the_head_laws_of_matmul_attention_verified_and_counted_by_hand():
    model, x = build(einsum=True)
    monitor = tc.ConservationMonitor(model, x, every=1, recording="sync")
    reference = tc.ConservationMonitor(*build(einsum=False), every=1, recording="sync")
    found = sorted((g.kind, g.count) for g in monitor.groups)
    assert found == sorted((g.kind, g.count) for g in reference.groups)
    # by hand: per head, the q·k matrix law and the V/O matrix law, on d_h + 1 rows ([W b]);
    # and the key bias (softmax over the keys removes q·b_K): one linear law per entry
    heads, d_head = 2, 4
    assert sum(g.count for g in monitor.groups if g.kind != "linear") == heads * 2 * (d_head * (d_head + 1) // 2)
    assert sum(g.count for g in monitor.groups if g.kind == "linear") == heads * d_head
    assert all(v.passed and v.residual < 1e-14 for v in monitor.verification.values())
    assert len(monitor.verification) == len(monitor.groups)


class Summed(nn.Module):
    def __init__(self, equation: str) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
        self.equation = equation

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum(self.equation, self.q(x), self.k(x))


@pytest.mark.parametrize("equation", ["btd,bsd->bt", "btd,btd->b", "bii,bjd->bjd"])
def test_other_einsum_equations_are_refused_naming_the_equation(equation):
    torch.manual_seed(0)
    model = Summed(equation).double()
    x = torch.randn(2, 4, 4, dtype=F64)
    structure = tc.find_structure(model, x)
    assert not [p for p in structure.pairs if p.producer in ("q", "k")]
    reasons = " ".join(str(s) for s in structure.skipped)
    assert f"einsum '{equation}'" in reasons, reasons


def test_a_dot_product_per_position_pairs_the_two_layers():
    """'btd,btd->bt': q_t · k_t at each position, unchanged by q → G q, k → G⁻ᵀ k: the matrix
    law of [W_q b_q] and [W_k b_k] (d(d + 1)/2 = 10 laws), checked by the monitor and by hand."""
    torch.manual_seed(0)
    model = Summed("btd,btd->bt").double()
    x = torch.randn(2, 4, 4, dtype=F64)
    monitor = tc.ConservationMonitor(model, x, every=1, recording="sync")
    (group,) = monitor.groups
    assert (group.kind, group.count) == ("matrix", 10)
    p = {n: t.detach() for n, t in model.named_parameters()}
    wq, wk = (torch.cat([p[f"{n}.weight"], p[f"{n}.bias"][:, None]], 1) for n in ("q", "k"))
    by_hand = (wq @ wq.t() - wk @ wk.t())[tuple(torch.triu_indices(4, 4))]
    torch.testing.assert_close(group.values(p).sort().values, by_hand.sort().values, rtol=1e-13, atol=1e-13)


class EinsumConsumer(nn.Module):
    """fc1 → ReLU → a weight matrix applied with einsum (``[out, in]`` or ``[in, out]``)."""

    def __init__(self, equation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.equation = equation
        shape = (2, 5) if equation.endswith("oi->bto") else (5, 2)
        self.w2 = nn.Parameter(torch.randn(shape))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        if self.equation.startswith("bti"):
            return torch.einsum(self.equation, h, self.w2)
        return torch.einsum(self.equation, self.w2, h)


@pytest.mark.parametrize("equation", ["bti,oi->bto", "bti,io->bto", "io,bti->bto"])
def test_a_weight_applied_with_einsum_consumes_the_units(equation):
    torch.manual_seed(0)
    model = EinsumConsumer(equation).double()
    monitor = tc.ConservationMonitor(model, torch.randn(2, 4, 3, dtype=F64), every=1, recording="sync")
    (group,) = monitor.groups
    assert (group.kind, group.count, group.parameter_names) == ("unit", 5, ("fc1.weight", "fc1.bias", "w2"))
    assert monitor.verification[group.name].residual < 1e-14
