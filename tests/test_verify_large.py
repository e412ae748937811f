"""The check of every claimed law, computed term by term (one parameter at a time, in the
parameters' own dtype), equals an independent torch.func computation, for true and false laws."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from torch_conslaw import find_structure
from torch_conslaw.demo import make_llama_block
from torch_conslaw.lawgroups import build_groups
from torch_conslaw.laws.families.proposals import propose_laws
from torch_conslaw.laws.verify import OWN_FLOOR, THRESHOLD, verify_groups

F64 = torch.float64


def reference_residuals(model: nn.Module, x: torch.Tensor, groups: list, cotangents: int = 3, seed: int = 0) -> list[float]:
    """max over cotangents and laws of |⟨∇h_l, ∂fᵀu⟩| / (‖∇h_l‖ max(‖(∂fᵀu)_S‖, OWN_FLOOR ‖∂fᵀu‖)),
    S the parameters of the law's group, ‖∂fᵀu‖ over the parameters the laws read; ∇h_l from
    torch.func.jacrev of the law values, ∂fᵀu from torch.func.vjp, the cotangents drawn as the
    check draws them (same generator, same order)."""
    names = sorted({n for g in groups for n in g.parameter_names})
    params = {n: p.detach().to(F64) for n, p in model.named_parameters()}
    theta = {n: params[n] for n in names}
    rest = {n: p for n, p in params.items() if n not in theta}

    def f(p: dict) -> torch.Tensor:
        return torch.func.functional_call(model, {**p, **rest}, (x.to(F64),))

    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        out, vjp = torch.func.vjp(f, theta)
    finally:
        torch.set_default_dtype(default)
    jacobians = [torch.func.jacrev(lambda p, g=g: g.values(p))(theta) for g in groups]
    gen = torch.Generator().manual_seed(seed)
    worst = [0.0] * len(groups)
    for _ in range(cotangents):
        (grad,) = vjp(torch.randn(out.shape, generator=gen, dtype=F64))
        gnorm = math.sqrt(sum(float(t.square().sum()) for t in grad.values()))
        for i, jac in enumerate(jacobians):
            dot = sum((jac[n].flatten(1) * grad[n].reshape(1, -1)).sum(1) for n in jac)
            norm = sum(jac[n].flatten(1).square().sum(1) for n in jac).sqrt()
            own = math.sqrt(sum(float(grad[n].square().sum()) for n in set(groups[i].parameter_names)))
            worst[i] = max(worst[i], float((dot.abs() / (norm * max(own, OWN_FLOOR * gnorm))).max()))
    return worst


def with_wrong_degree(group_list: list) -> list:
    """The same unit laws with degree 2 instead of 1: false laws of the same reader kinds."""
    pairs = [dataclasses.replace(g.pair, degree=2.0, label=f"{g.pair.label} (wrong degree)") for g in group_list
             if g.kind in ("unit", "channel")]
    return build_groups(pairs)


def test_term_by_term_check_equals_torch_func_on_attention_unit_and_matrix_laws():
    model = make_llama_block(d_in=6, d=16, heads=4, kv_heads=2, hidden=12, d_out=3, dtype=torch.float32)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    groups = build_groups(list(find_structure(model, x).pairs))
    wrong = with_wrong_degree(groups)
    assert {g.kind for g in groups} >= {"unit", "matrix"} and wrong
    checked = groups + wrong
    got = verify_groups(model, x, checked)
    want = reference_residuals(model, x, checked)
    for check, ref, g in zip(got, want, checked):
        assert check.group == g.name
        if ref > 1e-8:  # a false law: the same residual (same cotangents), to rounding
            assert math.isclose(check.residual, ref, rel_tol=1e-9), (g.name, check.residual, ref)
            assert not check.passed
        else:  # a true law: both at float64 rounding
            assert check.residual < 1e-14 and check.passed, (g.name, check.residual)
    assert sum(not c.passed for c in got) == len(wrong)


def test_term_by_term_check_equals_torch_func_on_approximate_scale_laws():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    structure = find_structure(model, x)
    scale = [g for g in propose_laws(model, structure)[0] if g.approximate]
    assert scale
    got = verify_groups(model, x, scale)
    want = reference_residuals(model, x, scale)
    for check, ref in zip(got, want):
        assert THRESHOLD < ref  # the eps term, measured
        assert math.isclose(check.residual, ref, rel_tol=1e-9), (check.residual, ref)


class TinyGate(nn.Module):
    """A ReLU pair behind a fixed gate of 1e-10 (LayerScale at a tiny init), beside a skip layer:
    the pair's parameters get gradients 1e-10 times the skip layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.skip = nn.Linear(3, 5), nn.Linear(5, 3), nn.Linear(3, 3)
        self.register_buffer("gate", torch.tensor(1e-10))

    def forward(self, x):
        return self.gate * self.b(torch.relu(self.a(x))) + self.skip(x)


def test_a_false_law_behind_a_tiny_gate_is_refused_and_the_true_one_kept():
    torch.manual_seed(0)
    model, x = TinyGate().double(), torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    groups = [g for g in build_groups(list(find_structure(model, x).pairs)) if g.kind == "unit"]
    wrong = with_wrong_degree(groups)
    assert groups and wrong
    true_check, false_check = verify_groups(model, x, groups + wrong)
    assert true_check.passed and true_check.residual < 1e-12
    assert not false_check.passed and false_check.residual > 10 * THRESHOLD, false_check.residual
    # independently: measured against all of ∂fᵀu, the false law would read below the threshold
    params = {n: p.detach() for n, p in model.named_parameters()}
    u = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    grads = torch.func.grad(lambda p: (torch.func.functional_call(model, p, (x,)) * u).sum())(params)
    jac = torch.func.jacrev(lambda p: wrong[0].values(p))(params)
    dot = sum((jac[n].flatten(1) * grads[n].reshape(1, -1)).sum(1) for n in jac)
    norm = sum(jac[n].flatten(1).square().sum(1) for n in jac).sqrt()
    whole = math.sqrt(sum(float(t.square().sum()) for t in grads.values()))
    assert float((dot.abs() / (norm * whole)).max()) < THRESHOLD
