"""Sixth sweep (experiments/adversarial_sweep.py): hand-written models written to fool the finder.

Each test goes through the public API and checks the laws independently with torch.func:
for random output cotangents u, ⟨∇h_l(θ), ∂_θf(θ, x)ᵀu⟩ must vanish for every law h_l.
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp

import torch_conslaw as tc

F64 = torch.float64


def _flat(o):
    if isinstance(o, torch.Tensor):
        return [o.reshape(-1)] if o.is_floating_point() else []
    if dataclasses.is_dataclass(o):
        return [t for f in dataclasses.fields(o) for t in _flat(getattr(o, f.name))]
    if isinstance(o, (tuple, list)):
        return [t for v in o for t in _flat(v)]
    return []


def _worst_residual(model, x, groups, n=3):
    """max over laws and cotangents of |⟨∇h, ∂fᵀu⟩| / (‖∇h‖ ‖(∂fᵀu)_S‖), by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out, pull = vjp(lambda p: torch.cat(_flat(functional_call(model, p, (x,)))), params)
    gen = torch.Generator().manual_seed(0)
    pulls = [pull(torch.randn(out.shape, generator=gen, dtype=out.dtype))[0] for _ in range(n)]
    worst = 0.0
    for g in groups:
        names = list(dict.fromkeys(g.parameter_names))
        P = {k: v.clone().requires_grad_(k in names) for k, v in params.items()}
        h = g.values(P)
        for l in range(h.numel()):
            gr = torch.autograd.grad(h[l], [P[k] for k in names], retain_graph=True, allow_unused=True)
            gh = torch.cat([(z if z is not None else torch.zeros_like(P[k])).reshape(-1) for z, k in zip(gr, names)])
            for q in pulls:
                gq = torch.cat([q[k].reshape(-1) for k in names])
                worst = max(worst, abs(float(gh @ gq)) / (float(gh.norm()) * float(gq.norm()) + 1e-300))
    return worst


class ChannelScale(nn.Module):
    """Conv → ReLU → a learned per-channel scale stored as [1, C, 1, 1] → conv → mean."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, dtype=F64)
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1, dtype=F64) + 0.5)
        self.c2 = nn.Conv2d(4, 3, 3, dtype=F64)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)) * self.scale).mean((2, 3))


class PositionChannelScale(nn.Module):
    """Linear → ReLU → a learned scale per (token, unit), stored [T, C] → linear."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 5, dtype=F64)
        self.scale = nn.Parameter(torch.rand(3, 5, dtype=F64) + 0.5)
        self.l2 = nn.Linear(5, 2, dtype=F64)

    def forward(self, x):  # (B, 3, 4)
        return self.l2(torch.relu(self.l1(x)) * self.scale)


@pytest.mark.parametrize("make, x", [
    (ChannelScale, lambda: torch.randn(2, 2, 7, 7, dtype=F64)),
    (PositionChannelScale, lambda: torch.randn(6, 3, 4, dtype=F64)),
])
def test_gate_not_laid_out_along_its_first_axis(make, x):
    """A gate γ whose entries are not along its first axis ([1, C, 1, 1], [T, C]) crashed the
    monitor (IndexError: its flat indices read along axis 0); now its laws are read flattened."""
    torch.manual_seed(0)
    model, x = make(), x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = tc.ConservationMonitor(model, x)
    gated = [g for g in mon.groups if "scale" in g.parameter_names]
    assert gated and sum(g.count for g in gated) >= 4
    assert _worst_residual(model, x, mon.groups) < 1e-10
    with torch.no_grad():  # and at another θ
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert _worst_residual(model, x, mon.groups) < 1e-10


class RunningBuffer(nn.Module):
    """A running mean buffer updated in forward (not a norm layer: eval mode does not stop it)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6, dtype=F64), nn.Linear(6, 3, dtype=F64)
        self.register_buffer("run", torch.zeros(6, dtype=F64))

    def forward(self, x):
        h = self.l1(x)
        with torch.no_grad():
            self.run.mul_(0.9).add_(0.1 * h.mean(0))
        return self.l2(torch.relu(h - self.run))


def _train(with_monitor):
    torch.manual_seed(0)
    model, x = RunningBuffer(), torch.randn(7, 4, dtype=F64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    if with_monitor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mon = tc.ConservationMonitor(model, x, every=1, recording="sync")
        mon.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def test_monitor_keeps_buffers_written_in_forward():
    """The monitor's example forwards (fx trace, hooks, op capture) updated a buffer that the
    model's forward writes, so training with the monitor differed from training without it."""
    a, b = _train(False), _train(True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    aux: torch.Tensor


class DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6, dtype=F64)
        self.l2, self.l3 = nn.Linear(6, 3, dtype=F64), nn.Linear(6, 2, bias=False, dtype=F64)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        return Out(self.l2(h), self.l3(h))


def test_dataclass_output_is_verified_and_counted():
    """A forward returning a dataclass: the numerical check saw no output ('failed to run', the
    laws tracked unverified) and analyze raised 'returned no floating-point output'."""
    torch.manual_seed(0)
    model, x = DataclassOut(), torch.randn(7, 4, dtype=F64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mon = tc.ConservationMonitor(model, x)
    assert not any("failed to run" in str(m.message) for m in w)
    assert mon.verification and all(v.passed for v in mon.verification.values())
    assert sum(g.count for g in mon.groups) == 6
    assert _worst_residual(model, x, mon.groups) < 1e-10
    r = tc.analyze(model, x, theta="random", max_seconds=30)
    assert r.lie_laws == 6 and r.complete


class ClampsInForward(nn.Module):
    """forward clips its own weight in place (a WGAN critic's weight clipping)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(6, 4, dtype=F64)), nn.Parameter(torch.randn(3, 6, dtype=F64))

    def forward(self, x):
        with torch.no_grad():
            self.w1.clamp_(-0.8, 0.8)
        return F.linear(torch.relu(F.linear(x, self.w1)), self.w2)


def test_analyze_in_place_parameter_write_is_a_note():
    """analyze raised torch's 'Output 0 of View ... modified inplace' from its polynomial search;
    now it says the forward writes a tensor in place and names the model's line."""
    torch.manual_seed(0)
    model, x = ClampsInForward(), torch.randn(7, 4, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = tc.analyze(model, x, theta="random", max_seconds=30)
    notes = " ".join([str(r.lie_note), str(r.polynomial_note)] + list(r.notes))
    assert "in place" in notes and "clamp_" in notes
    assert r.tracked_rank == 0  # a clipped weight keeps no rescaling law: none is claimed


class GroupsFirst(nn.Module):
    """Input [groups, N, in]: its first axis is not a batch axis (a bias [groups, 1, out])."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(3, 4, 5, dtype=F64)), nn.Parameter(torch.randn(3, 1, 5, dtype=F64))

    def forward(self, x):
        return torch.baddbmm(self.b, x, self.w)


def test_analyze_first_axis_not_batch_is_a_note():
    """analyze raised 'pass inputs the model accepts' on the example the model accepts (the
    count stacks inputs along its first axis); now a note says why there is no count."""
    torch.manual_seed(0)
    model, x = GroupsFirst(), torch.randn(3, 6, 4, dtype=F64)
    model(x)  # the example itself runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = tc.analyze(model, x, theta="random", max_seconds=30)
    assert r.lie_laws is None and "first axis" in r.lie_note and "baddbmm" in r.lie_note


class WriteThroughView(nn.Module):
    """The first layer's output changed in place through a slice view, then ReLU and a layer:
    h[:, :3] ← 1 − 2 h[:, :3] adds a constant to units 0–2, so l1→l2 is no law for them."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6, dtype=F64), nn.Linear(6, 3, dtype=F64)

    def forward(self, x):
        h = self.l1(x)
        h[:, :3].mul_(-2.0).add_(1.0)
        return self.l2(torch.relu(h))


class ViewThenAdd(nn.Module):
    """A view taken before an in-place add to its base is what the next layer reads."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6, dtype=F64), nn.Linear(6, 3, dtype=F64)
        self.c = nn.Parameter(torch.randn(6, dtype=F64))

    def forward(self, x):
        h = self.l1(x)
        a = h.view_as(h)
        h.add_(self.c)
        return self.l2(torch.relu(a))


@pytest.mark.parametrize("make", [WriteThroughView, ViewThenAdd])
def test_in_place_write_read_through_another_view_proposes_no_law(make):
    """The structure finders recorded the value before an in-place write that the model reads
    through another view, and proposed l1→l2 (refused only by the numerical check); now no
    rule proposes a law for such a model and the reason names the write."""
    from torch_conslaw.structure import find_structure

    torch.manual_seed(0)
    model, x = make(), torch.randn(7, 4, dtype=F64)
    s = find_structure(model, x)
    assert not s.pairs
    assert any("wrote in place" in str(k) for k in s.skipped)
    # independent: the l1→l2 rescaling law of a unit the write touches is indeed false here
    # (‖W1[u]‖² + b1[u]² − ‖W2[:, u]‖², u = 0, its gradient against ∂fᵀv by torch.func)
    params = {k: v.detach() for k, v in model.named_parameters()}
    out, pull = vjp(lambda p: functional_call(model, p, (x,)), params)
    q = pull(torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=F64))[0]
    law = (2 * params["l1.weight"][0] @ q["l1.weight"][0] + 2 * params["l1.bias"][0] * q["l1.bias"][0]
           - 2 * params["l2.weight"][:, 0] @ q["l2.weight"][:, 0])
    assert abs(float(law)) > 1e-3


class InPlaceAct(nn.Module):
    """F.linear with raw parameters (the op-graph rules decide, not the module-level finder)."""

    def __init__(self, act):
        super().__init__()
        self.act = act
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 4, dtype=F64)), nn.Parameter(torch.randn(6, dtype=F64))
        self.w2 = nn.Parameter(torch.randn(3, 6, dtype=F64))

    def forward(self, x):
        return F.linear(self.act(F.linear(x, self.w1, self.b1)), self.w2)


@pytest.mark.parametrize("act", [
    lambda h: h.relu_(), lambda h: h.clamp_(min=0), lambda h: F.relu(h, inplace=True),
    lambda h: F.threshold(h, 0.0, 0.0), lambda h: F.threshold(h, 0.0, 0.0, inplace=True), lambda h: h.clamp_min(0.0),
], ids=["relu_", "clamp_", "relu_inplace", "threshold", "threshold_inplace", "clamp_min"])
def test_in_place_relu_forms_keep_the_unit_laws(act):
    """relu_ / clamp_(min=0) / F.threshold(x, 0, 0) / clamp_min(0) on a fresh tensor were
    barriers ('an in-place op on the units', '_threshold is not known'); they are ReLU."""
    torch.manual_seed(0)
    model, x = InPlaceAct(act), torch.randn(7, 4, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = tc.ConservationMonitor(model, x)
    assert sum(g.count for g in mon.groups) == 6
    assert _worst_residual(model, x, mon.groups) < 1e-10


@pytest.mark.parametrize("act", [lambda h: F.threshold(h, 0.5, 0.0), lambda h: F.threshold(h, 0.0, 0.3),
                                 lambda h: h.clamp_(min=0.1)], ids=["threshold_0.5", "value_0.3", "clamp_0.1"])
def test_thresholds_that_are_not_relu_give_no_law(act):
    torch.manual_seed(0)
    model, x = InPlaceAct(act), torch.randn(7, 4, dtype=F64)
    from torch_conslaw.structure import find_structure

    assert not find_structure(model, x).pairs
