"""The fused (compiled) evaluation equals the float64 definition up to a stated rounding bound.

``evaluation="compiled"`` forms the same float64 products as the reference definition
(:func:`~torch_conslaw.accounting.evaluate`, :func:`~torch_conslaw.accounting.split_change`)
and only sums them in another order. For a law made of ``n`` products ``p_i`` both sums lie
within ``γ_n Σ|p_i|`` of the exact sum (``γ_n = n u / (1 − n u)``, ``u = 2⁻⁵³``), so they differ
by at most ``2 γ_n Σ|p_i|``; the tests check that bound law by law on random models, with
``Σ|p_i|`` and ``n`` computed by hand from the readers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torch_conslaw as tc
from torch_conslaw import accounting
from torch_conslaw.accounting import Accountant, evaluate, split_change
from torch_conslaw.evaluation import compiler_available
from torch_conslaw.lawgroups import UnitLaws, build_groups
from torch_conslaw.structure import find_structure

F64 = torch.float64
U = 2.0**-53

needs_compiler = pytest.mark.skipif(not compiler_available("cpu"), reason="no C++ compiler for TorchInductor")


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(37, 64), nn.ReLU(), nn.Linear(64, 48), nn.LeakyReLU(), nn.Linear(48, 5))


def cnn(seed: int) -> nn.Module:  # channel readers with plans (A, U, B), A > 1 and B > 1
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)
    )


def abs_sums(group: UnitLaws, x: dict, y: dict) -> tuple[torch.Tensor, int]:
    """Per law Σ|products| of B(x, y) = Σ_in x∘y − k Σ_out x∘y, and the number of products."""
    total, n = 0, 0
    for readers, weight in ((group.pair.incoming, 1.0), (group.pair.outgoing, group.degree)):
        for name, fn in readers:
            rows = (fn(x[name].abs()) * fn(y[name].abs())).flatten(1)
            total = total + weight * rows.sum(1)
            n += rows.shape[1]
    return total, n


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


@needs_compiler
@pytest.mark.parametrize("make", [mlp, pytest.param(cnn, marks=pytest.mark.slow)])  # compiling takes seconds
def test_compiled_values_and_split_are_within_the_rounding_bound(make):
    model = make(0)
    groups = build_groups(find_structure(model).pairs)
    assert groups and all(isinstance(g, UnitLaws) for g in groups)
    compiled = Accountant(groups, evaluation="compiled")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(7)
    after = {n: p + 0.05 * torch.randn(p.shape, generator=g) for n, p in before.items()}
    values = compiled.values(after)
    v, f, s = compiled.split(before, after)
    reference = evaluate(groups, {n: p.to(F64) for n, p in after.items()})
    rv, rf, rs = split_change(groups, before, after)
    a64 = {n: t.to(F64) for n, t in after.items()}
    b64 = {n: t.to(F64) for n, t in before.items()}
    d64 = {n: a64[n] - b64[n] for n in a64}
    for grp in groups:
        squares, n = abs_sums(grp, a64, a64)
        crosses, _ = abs_sums(grp, b64, d64)
        deltas, _ = abs_sums(grp, d64, d64)
        bound = 2 * gamma(n + 2)  # + 2: the incoming − k · outgoing combination
        assert values[grp.name].dtype == f[grp.name].dtype == F64
        assert torch.all((values[grp.name] - reference[grp.name]).abs() <= bound * squares)
        assert torch.all((v[grp.name] - rv[grp.name]).abs() <= bound * squares)
        assert torch.all((f[grp.name] - rf[grp.name]).abs() <= 2 * bound * crosses)  # 2 B(θ, Δ)
        assert torch.all((s[grp.name] - rs[grp.name]).abs() <= bound * deltas)
        assert not torch.equal(v[grp.name], torch.zeros_like(v[grp.name]))


@needs_compiler
def test_compiled_laws_of_non_finite_parameters_are_non_finite_and_the_others_exact():
    model = mlp(1)
    groups = build_groups(find_structure(model).pairs)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params["0.weight"][3, 5] = float("nan")
    params["2.weight"][7, 1] = float("inf")
    values = Accountant(groups, evaluation="compiled").values(params)
    reference = Accountant(groups).values(params)
    for name in values:
        assert torch.equal(torch.isfinite(values[name]), torch.isfinite(reference[name]))
    assert values["0→2"][3].isnan() and values["0→2"][1].isinf() and values["2→4"][7].isinf()
    finite = torch.isfinite(values["0→2"])
    assert torch.allclose(values["0→2"][finite], reference["0→2"][finite], rtol=1e-14, atol=0)


def test_without_a_compiler_the_accountant_warns_and_evaluates_eagerly(monkeypatch):
    monkeypatch.setattr(accounting, "compiler_available", lambda device_type: False)
    model = mlp(2)
    groups = build_groups(find_structure(model).pairs)
    params = dict(model.named_parameters())
    with pytest.warns(RuntimeWarning, match="evaluation='compiled' is not available"):
        values = Accountant(groups, evaluation="compiled").values(params)
    eager = Accountant(groups).values(params)
    assert all(torch.equal(values[k], eager[k]) for k in eager)


def test_a_bad_evaluation_is_refused():
    with pytest.raises(ValueError, match="evaluation must be one of"):
        tc.ConservationMonitor(mlp(0), evaluation="fast", every=1, recording="sync")


def _train(recording: str, split: bool) -> dict:
    torch.manual_seed(3)
    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a worker without a free core
        monitor = tc.ConservationMonitor(model, evaluation="compiled", recording=recording, split=split, every=1).attach(opt)
    x, y = torch.randn(32, 37), torch.randint(0, 5, (32,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return monitor.history()


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("split", [True, False])
def test_compiled_records_are_bitwise_the_same_for_every_recorder(split):
    # default threads: the workers run with one torch thread of their own, the kernels not
    sync = _train("sync", split)
    for recording in ("snapshot", "live"):
        other = _train(recording, split)
        assert sync.keys() == other.keys()
        for key in sync:
            assert np.array_equal(sync[key], other[key], equal_nan=True), (recording, key)


def test_auto_stays_eager_on_small_models_and_says_why():
    model = mlp(4)
    monitor = tc.ConservationMonitor(model, torch.randn(8, 37), every=1, recording="sync")
    assert monitor.evaluation == "eager"
    assert "tracked elements <" in monitor.evaluation_reason


def test_auto_without_a_compiler_stays_eager_without_a_warning(monkeypatch):
    monkeypatch.setattr(accounting, "AUTO_COMPILE_ELEMENTS", 1)
    monkeypatch.setattr(accounting, "compiler_available", lambda device_type: False)
    model = mlp(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        monitor = tc.ConservationMonitor(model, torch.randn(8, 37), every=1, recording="sync")
    assert monitor.evaluation == "eager" and "no compiler" in monitor.evaluation_reason


@needs_compiler
def test_auto_compiles_large_per_unit_laws_when_the_monitor_is_built(monkeypatch):
    """Above the threshold (lowered here: compiling takes seconds) ``auto`` compiles at
    construction, and its records stay within the rounding bound of the eager ones."""
    monkeypatch.setattr(accounting, "AUTO_COMPILE_ELEMENTS", 1)
    histories = {}
    for evaluation in ("auto", "eager"):
        torch.manual_seed(6)
        model = mlp(6)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = tc.ConservationMonitor(model, torch.randn(8, 37), every=1, recording="sync", evaluation=evaluation)
        assert monitor.evaluation == ("compiled" if evaluation == "auto" else "eager")
        monitor.attach(opt)
        x, y = torch.randn(16, 37), torch.randn(16, 5)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        histories[evaluation] = monitor.history()
    for key, auto in histories["auto"].items():
        eager = histories["eager"][key]
        if key == "step":
            assert np.array_equal(auto, eager)
        else:
            assert np.allclose(auto, eager, rtol=1e-12, atol=1e-15)
