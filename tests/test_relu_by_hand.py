"""ReLU written by hand — ``x * (x > 0)``, ``torch.where(x > 0, x, 0)``, ``torch.maximum(x, 0)``,
a leaky ReLU as ``torch.where(x > 0, x, a * x)`` — is positively homogeneous like ``F.relu``: the
mask ``x > 0`` does not change when a unit is rescaled by λ > 0. The laws are those of the same
network with ``F.relu``, checked by hand with torch.func. A test against another threshold or a
floor other than 0 is not read as ReLU."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp

import torch_conslaw as tc

F64 = torch.float64

ACTIVATIONS = {
    "relu": F.relu,
    "mask_mul": lambda h: h * (h > 0),
    "mask_float": lambda h: h * (h > 0).to(h.dtype),
    "reversed_test": lambda h: h * (0 < h),
    "where_zero": lambda h: torch.where(h > 0, h, 0.0),
    "where_zeros_like": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
    "maximum_zero": lambda h: torch.maximum(h, torch.zeros_like(h)),
    "leaky_where": lambda h: torch.where(h >= 0, h, 0.1 * h),
}


class Net(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.act = act
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


X = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(1))


def _laws(act) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = Net(act).to(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, tc.ConservationMonitor(model, X).groups


def _residual(model: nn.Module, group) -> float:
    """max over 3 cotangents u and the group's laws of |⟨∇h, ∂fᵀu⟩| / (‖∇h‖ ‖∂fᵀu‖), by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out, pull = vjp(lambda p: functional_call(model, p, (X,)), params)
    jac = torch.func.jacrev(lambda p: group.values(p))(params)
    worst = 0.0
    for seed in range(3):
        g = pull(torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(seed)))[0]
        for row in range(group.count):
            dot = sum((jac[n][row] * g[n]).sum() for n in jac)
            norm = torch.sqrt(sum((jac[n][row] ** 2).sum() for n in jac) * sum((g[n] ** 2).sum() for n in jac))
            worst = max(worst, float(dot.abs() / norm))
    return worst


@pytest.mark.parametrize("name", [n for n in ACTIVATIONS if n != "relu"])
def test_a_relu_written_by_hand_keeps_the_laws_of_f_relu(name):
    reference, expected = _laws(F.relu)
    model, groups = _laws(ACTIVATIONS[name])
    assert [(g.name, g.count) for g in groups] == [(g.name, g.count) for g in expected] == [("a→b", 5)]
    params = dict(model.named_parameters())
    torch.testing.assert_close(groups[0].values(params), expected[0].values(dict(reference.named_parameters())),
                               rtol=0, atol=0)
    assert _residual(model, groups[0]) < 1e-13


@pytest.mark.parametrize("act", [lambda h: h * (h > 1), lambda h: torch.where(h > 0.5, h, 0.0)])
def test_a_test_against_another_threshold_is_not_read_as_relu(act):
    # h · 1[h > t] is no rescaling symmetry for t ≠ 0; away from the crossings it is locally
    # homogeneous, so the law holds there (the count finds it), but no rule claims it
    assert _laws(act)[1] == []


@pytest.mark.parametrize("act", [lambda h: torch.maximum(h, torch.ones_like(h)), lambda h: torch.where(h > 0, h, 1.0)])
def test_a_floor_other_than_zero_keeps_no_law(act):
    model, groups = _laws(act)
    assert groups == []
    _, relu_groups = _laws(F.relu)  # the would-be law is not orthogonal to the gradients here
    assert _residual(model, relu_groups[0]) > 1e-6


class DtypeDonor(nn.Module):
    """The hidden units lend their dtype to a constant (``torch.ones(5).type_as(h)``, as
    GraniteMoE's router casts with ``type_as``): none of their values flows there."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        ones = torch.ones(5).type_as(h) if self.how == "type_as" else torch.ones(5).to(h)
        return self.b(h * ones)


@pytest.mark.parametrize("how", ["type_as", "to"])
def test_units_that_only_lend_their_dtype_keep_their_laws(how):
    torch.manual_seed(0)
    model = DtypeDonor(how).to(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = tc.ConservationMonitor(model, X).groups
    assert [(g.name, g.count) for g in groups] == [("a→b", 5)]
    assert _residual(model, groups[0]) < 1e-13
