"""Findings of the fifth sweep of tiny Hugging Face architectures (experiments/hf_sweep.py,
the section "added by the fifth sweep"; table in results/hf_sweep_fifth.md), checked on
hand-written models through the public API:

* a model whose output on the example input is NaN (CANINE built tiny gives NaN hidden states)
  had every proposed law "verified" with residual 0.0 (NaN > 0 is False in the residual), so
  the monitor tracked 214 laws of a NaN function; a NaN / inf output or gradient now fails the
  check (residual inf), and the refusal and the monitor's note say why and what to do.

Every claim is checked independently (torch.func on the model itself).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, vjp

import torch_conslaw as tc

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(F64)


class _LogOfInput(nn.Module):
    """Finite input, NaN inside: log of a negative entry (as a badly configured model does)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x):
        return self.net(torch.log(x))


def _pullback(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """∂fᵀu for one random u, by torch.func (independent of the library's check)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out, pull = vjp(lambda p: functional_call(model, p, (x,)), params)
    grads = pull(torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(1)))[0]
    return torch.cat([g.reshape(-1) for g in grads.values()])


def _unit_laws_hold(model: nn.Module, x: torch.Tensor) -> float:
    """Worst |⟨∇h_i, ∂fᵀu⟩| / (‖∇h_i‖ ‖∂fᵀu‖) of h_i = ‖W1[i]‖² + b1_i² − ‖W2[:, i]‖² (by hand)."""
    lin1, lin2 = [m for m in model.modules() if isinstance(m, nn.Linear)]
    g = _pullback(model, x)
    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    parts = dict(zip(names, g.split(sizes)))
    prefix = names[0].rsplit(".", 2)[0] + "." if names[0].count(".") > 1 else ""
    w1, b1 = lin1.weight.detach(), lin1.bias.detach()
    w2 = lin2.weight.detach()
    worst = 0.0
    for i in range(w1.shape[0]):
        gh = {f"{prefix}0.weight": torch.zeros_like(w1), f"{prefix}0.bias": torch.zeros_like(b1),
              f"{prefix}2.weight": torch.zeros_like(w2), f"{prefix}2.bias": torch.zeros_like(lin2.bias)}
        gh[f"{prefix}0.weight"][i] = 2 * w1[i]
        gh[f"{prefix}0.bias"][i] = 2 * b1[i]
        gh[f"{prefix}2.weight"][:, i] = -2 * w2[:, i]
        a = torch.cat([gh[n].reshape(-1) for n in names])
        worst = max(worst, float((a @ g).abs() / (a.norm() * g.norm())))
    return worst


@pytest.mark.parametrize("where", ["input", "inside"])
def test_a_nan_output_verifies_no_law(where):
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    model = _mlp() if where == "input" else _LogOfInput()
    good = x.abs() + 0.5 if where == "inside" else x
    # control: on a finite example the 4 unit laws are tracked, and hold by hand
    control = tc.ConservationMonitor(model, good)
    assert sum(g.count for g in control.groups) == 4
    assert _unit_laws_hold(model, good) < 1e-12
    bad = good.clone()
    if where == "input":
        bad[0, 0] = math.nan
    else:
        bad[0, 0] = -1.0  # log(-1) = NaN inside the forward
    # independent: the model's gradient on that example is NaN, so no law can be checked there
    assert torch.isnan(_pullback(model, bad)).any()
    mon = tc.ConservationMonitor(model, bad)
    assert not mon.groups  # before the fix: the 4 unit laws and more, "verified" at residual 0.0
    assert "not finite" in mon.verification_note
    refused = [s for s in mon.skipped if "fails the numerical check" in s.reason]
    assert refused and all("not finite (NaN or inf)" in s.reason for s in refused)
    checks = tc.verify_laws(model, bad)
    assert checks and not any(c.passed for c in checks)
    assert all(math.isinf(c.residual) for c in checks)


def test_analyze_of_a_nan_output_tracks_nothing_and_says_why():
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = math.nan
    model = _mlp()
    assert torch.isnan(_pullback(model, x)).any()  # independent: nothing can be checked there
    r = tc.analyze(model, x, max_seconds=20)
    assert r.tracked_rank == 0  # before the fix: the 4 unit laws, "verified"
    assert r.lie_laws == 4 and not r.complete  # the MLP's laws exist; none is tracked on this input
    assert "not finite (NaN or inf)" in str(r)


class _Doubler(torch.autograd.Function):
    """A custom op without setup_context: torch.func (the count's jvp / vmap) refuses it."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class _CustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(_Doubler.apply(self.fc1(x)))  # the line the count's note names


def test_a_count_refused_by_torch_func_names_the_models_line():
    torch.manual_seed(0)
    model = _CustomOp().to(F64)
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="setup_context"):  # independent: torch.func refuses the op
        params = dict(model.named_parameters())
        torch.func.jvp(lambda p: functional_call(model, p, (x,)), (params,), ({k: torch.ones_like(v) for k, v in params.items()},))
    r = tc.analyze(model, x, max_seconds=20)
    assert r.lie_laws is None
    # before: "an op of _CustomOp does not support it (...)", with no place named
    assert "test_sweep_fifth.py:" in r.lie_note and "_Doubler.apply(self.fc1(x))" in r.lie_note
