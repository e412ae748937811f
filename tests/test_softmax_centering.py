"""A linear layer whose outputs reach only a softmax over them (an MoE router, a head that
returns probabilities): softmax(z + c·1) = softmax(z), so the column sums of its weight and the
sum of its bias are conserved. Checked by hand with torch.func and by training."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp

import torch_conslaw as tc

F64 = torch.float64


class Probabilities(nn.Module):
    """A ReLU MLP whose forward returns softmax probabilities over its 3 outputs."""

    def __init__(self, over: int = -1) -> None:
        super().__init__()
        self.over = over
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.b(torch.relu(self.a(x))), dim=self.over)


class TopTwoRouter(nn.Module):
    """Top-2 of 3 ReLU experts, routed by softmax probabilities renormalized over the two
    chosen (as Mixtral / Qwen-MoE / OLMoE do), dispatched with torch.where."""

    def __init__(self, d: int = 4, experts: int = 3) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 5), nn.ReLU(), nn.Linear(5, d)) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=1, dtype=x.dtype)
        weights, chosen = torch.topk(probs, 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None])
        return out


def _monitor(model: nn.Module, x: torch.Tensor) -> tc.ConservationMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tc.ConservationMonitor(model, x)


def _centering(monitor: tc.ConservationMonitor, producer: str):
    return [g for g in monitor.groups if g.name.startswith(f"{producer}→") and g.name.endswith("centering")]


def _shift_residual(model: nn.Module, x: torch.Tensor, weight: str, bias: str | None) -> float:
    """|Σ_i ∂⟨u, f⟩/∂(W[i, :], b_i)| / ‖∂⟨u, f⟩/∂(W, b)‖ over 3 random cotangents u: the
    derivative of the output along the shift W → W + 1vᵀ, b → b + t·1 (torch.func, by hand)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out, pull = vjp(lambda p: functional_call(model, p, (x,)), params)
    worst = 0.0
    for seed in range(3):
        grads = pull(torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(seed)))[0]
        along = [grads[weight].sum(0)] + ([grads[bias].sum().reshape(1)] if bias else [])
        scale = torch.cat([grads[weight].reshape(-1)] + ([grads[bias]] if bias else [])).norm()
        worst = max(worst, float(torch.cat(along).norm() / scale))
    return worst


def test_a_head_returning_probabilities_keeps_its_column_and_bias_sums():
    torch.manual_seed(0)
    model = Probabilities().to(F64)
    x = torch.randn(32, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    groups = _centering(_monitor(model, x), "b")
    assert [g.count for g in groups] == [6 + 1]  # Σ_i W[i, :] (6 inputs) and Σ_i b_i
    assert "softmax" in groups[0].reason
    assert _shift_residual(model, x, "b.weight", "b.bias") < 1e-14


def test_a_softmax_over_another_axis_keeps_no_such_law():
    torch.manual_seed(0)
    model = Probabilities(over=0).to(F64)  # normalized over the batch: a shift per example is not removed
    x = torch.randn(32, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert _centering(_monitor(model, x), "b") == []
    assert _shift_residual(model, x, "b.weight", "b.bias") > 1e-3


def test_an_moe_router_keeps_the_column_sums_of_its_gate_through_training():
    torch.manual_seed(0)
    model = TopTwoRouter().to(F64)
    x = torch.randn(64, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    monitor = _monitor(model, x)
    groups = _centering(monitor, "gate")
    assert [g.count for g in groups] == [4]  # Σ_e W[e, :] over the 3 experts, per input feature
    assert _shift_residual(model, x, "gate.weight", None) < 1e-14
    # the law itself, by training: SGD on a loss of the routed output
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor.attach(opt)
    start = model.gate.weight.detach().sum(0).clone()
    target = torch.randn(64, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    for _ in range(20):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    assert float(model.gate.weight.grad.norm()) > 1e-6  # the gate did train
    assert float((model.gate.weight.detach().sum(0) - start).abs().max()) < 1e-14
    mine = [row for row in monitor.summary() if row["name"] == groups[0].name][0]
    assert mine["recorded_steps"] >= 1 and mine["max_rel_drift"] < 1e-12
