"""The fast accounting path (flat float64 buffer, strided sums) keeps every exactness promise.

:class:`~torch_conslaw.accounting.Accountant` evaluates per-unit groups whose readers only
rearrange elements from one flat float64 buffer with in-place products; everything else takes
the generic :class:`~torch_conslaw.lawgroups.LawGroup` path. These tests pin that the fast path
is exact (float32 squares formed in float64, the split identity, SGD's vanishing first order),
agrees with the reference :func:`split_change` / :func:`evaluate`, never aliases results between
calls, falls back correctly, and leaves training bitwise unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from torch_conslaw import ConservationMonitor, accounting
from torch_conslaw.accounting import Accountant, evaluate, split_change
from torch_conslaw.lawgroups import UnitLaws, build_groups, rearrangement_plan
from torch_conslaw.structure import find_structure

F64 = torch.float64


def bench_mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    ).to(dtype)


def small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 7), nn.Linear(7, 3),
    )


def mixed_mlp() -> nn.Module:  # unit laws and a matrix law (generic path) side by side
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.Linear(4, 3))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def scale_of(groups, params) -> dict[str, torch.Tensor]:
    p64 = {n: p.to(F64) for n, p in params.items()}
    return {g.name: g.scale(p64) for g in groups}


def perturbed(params, size: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: p + size * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


@pytest.mark.parametrize("chunk", [None, 24])  # default chunks, and many tiny ones
@pytest.mark.parametrize("make", [bench_mlp, small_cnn, mixed_mlp])
def test_fast_values_and_split_agree_with_the_reference_path(make, chunk, monkeypatch):
    if chunk is not None:  # chunks are rounded up to whole reader blocks (rows, U × B blocks)
        monkeypatch.setattr(accounting, "_CHUNK", chunk)
    model = make()
    groups = build_groups(find_structure(model).pairs)
    acc = Accountant(groups)
    before = params_of(model)
    after = perturbed(before, 1e-2, seed=3)
    scale = scale_of(groups, after)
    values = acc.values(after)
    reference = evaluate(groups, {n: p.to(F64) for n, p in after.items()})
    v, f, s = acc.split({n: p.to(F64) for n, p in before.items()}, after)
    rv, rf, rs = split_change(groups, before, after)
    assert list(values) == list(reference) == list(v) == [g.name for g in groups]
    for g in groups:
        tol = 1e-14 * scale[g.name]  # float64 summation order only
        assert values[g.name].dtype == v[g.name].dtype == F64
        assert torch.all((values[g.name] - reference[g.name]).abs() <= tol)
        assert torch.all((v[g.name] - rv[g.name]).abs() <= tol)
        assert torch.all((f[g.name] - rf[g.name]).abs() <= tol)
        assert torch.all((s[g.name] - rs[g.name]).abs() <= tol)
    assert acc.paths is not None
    if make is mixed_mlp:  # both paths were exercised
        assert acc.paths["generic"] and acc.paths["fast"]
    if chunk is not None and make is not mixed_mlp:
        assert acc.paths["chunks"] > 1


def test_float32_squares_are_formed_in_float64():
    # one unit: h = w_in² + b² − w_out², with w_in = 1 + 2⁻²⁰ whose float32 square rounds
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1 + 2**-20)
        model[0].bias.fill_(2**-12 + 2**-30)
        model[2].weight.fill_(3 * 2**-14)
    acc = Accountant(build_groups(find_structure(model).pairs))
    value = float(acc.values(dict(model.named_parameters()))["0→2"][0])
    exact = math.fsum([(1 + 2**-20) ** 2, (2**-12 + 2**-30) ** 2, -((3 * 2**-14) ** 2)])
    assert value == exact
    assert torch.tensor(1 + 2**-20, dtype=torch.float32).square().item() != (1 + 2**-20) ** 2


def test_values_equal_an_exact_by_hand_sum():
    model = bench_mlp()
    acc = Accountant(build_groups(find_structure(model).pairs))
    values = acc.values(dict(model.named_parameters()))
    w0, b0, w2 = (p.detach().double() for p in (model[0].weight, model[0].bias, model[2].weight))
    for j in (0, 17, 511):
        terms = [x * x for x in w0[j].tolist()] + [b0[j].item() ** 2] + [-x * x for x in w2[:, j].tolist()]
        exact = math.fsum(terms)
        bound = 1e-15 * math.fsum(abs(t) for t in terms)
        assert abs(values["0→2"][j].item() - exact) <= bound


@pytest.mark.parametrize("make", [bench_mlp, small_cnn])
def test_split_identity_holds_to_float64_rounding(make):
    model = make()
    groups = build_groups(find_structure(model).pairs)
    acc = Accountant(groups)
    before = params_of(model)
    after = perturbed(before, 0.3, seed=5)  # a large, arbitrary step
    h_before = acc.values(before)
    h_before = {k: v.clone() for k, v in h_before.items()}
    values, first, second = acc.split({n: p.to(F64) for n, p in before.items()}, after)
    scale = scale_of(groups, after)
    for g in groups:
        residual = values[g.name] - h_before[g.name] - first[g.name] - second[g.name]
        assert torch.all(residual.abs() <= 1e-14 * scale[g.name])


def test_sgd_first_order_part_vanishes_on_the_benchmark_model():
    # float64 training: with float32 parameters the rounding of the float32 update itself is a
    # real first-order change (~1e-8 relative), which the exact accounting rightly reports
    model = bench_mlp(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = ConservationMonitor(model, split=True, every=1, recording="sync").attach(opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 784, generator=g, dtype=F64), torch.randint(0, 10, (128,), generator=g)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for row in monitor.summary():
        assert row["max_rel_first_order"] <= 1e-12, row
        assert row["max_rel_second_order"] > 1e-12, row  # the step is not trivially zero


def test_results_of_consecutive_calls_are_independent_tensors():
    model = bench_mlp()
    acc = Accountant(build_groups(find_structure(model).pairs))
    p1 = params_of(model)
    p2 = perturbed(p1, 0.1, seed=7)
    v1 = acc.values(p1)
    kept = {k: v.clone() for k, v in v1.items()}
    acc.values(p2)
    split1 = acc.split({n: p.to(F64) for n, p in p1.items()}, p2)
    kept_split = [{k: v.clone() for k, v in part.items()} for part in split1]
    acc.split({n: p.to(F64) for n, p in p2.items()}, p1)
    for k in kept:
        assert torch.equal(v1[k], kept[k])
        for part, saved in zip(split1, kept_split):
            assert torch.equal(part[k], saved[k])


def test_inputs_are_not_modified_and_float32_before_works():
    model = mixed_mlp()
    groups = build_groups(find_structure(model).pairs)
    acc = Accountant(groups)
    before = params_of(model)
    after = perturbed(before, 1e-2, seed=9)
    copies = [{n: p.clone() for n, p in d.items()} for d in (before, after)]
    v, f, s = acc.split(before, after)  # float32 before: mixed-dtype path
    rv, rf, rs = split_change(groups, before, after)
    for d, c in zip((before, after), copies):
        assert all(torch.equal(d[n], c[n]) for n in d)
    for g in groups:
        torch.testing.assert_close(f[g.name], rf[g.name], rtol=0, atol=1e-15)
        torch.testing.assert_close(s[g.name], rs[g.name], rtol=0, atol=1e-15)
        torch.testing.assert_close(v[g.name], rv[g.name], rtol=1e-14, atol=1e-15)


def test_a_reader_that_is_not_a_rearrangement_takes_the_generic_path():
    model = mixed_mlp()
    groups = build_groups(find_structure(model).pairs)
    unit = next(g for g in groups if isinstance(g, UnitLaws))
    (name, _), *rest = unit.pair.incoming
    odd = UnitLaws(dataclasses.replace(unit.pair, incoming=((name, lambda w: 2 * w), *rest)))
    acc = Accountant([odd])
    before = params_of(model)
    after = perturbed(before, 1e-2, seed=4)
    v, f, s = acc.split({n: p.to(F64) for n, p in before.items()}, after)
    rv, rf, rs = split_change([odd], before, after)
    assert acc.paths == {"fast": [], "generic": [odd.name], "chunks": acc.paths["chunks"]}
    torch.testing.assert_close(v[odd.name], rv[odd.name], rtol=0, atol=0)
    torch.testing.assert_close(f[odd.name], rf[odd.name], rtol=0, atol=0)


def test_rearrangement_plans_of_the_built_in_readers():
    assert rearrangement_plan(lambda w: w, (3, 4), 3) == (1, 3, 4)  # Linear incoming
    assert rearrangement_plan(lambda w: w.T, (3, 4), 4) == (3, 4, 1)  # Linear outgoing
    assert rearrangement_plan(lambda b: b.unsqueeze(1), (5,), 5) == (1, 5, 1)  # bias
    assert rearrangement_plan(lambda w: w.flatten(1), (5, 3, 2, 2), 5) == (1, 5, 12)
    assert rearrangement_plan(lambda w: w.transpose(0, 1).flatten(1), (5, 3, 2, 2), 3) == (5, 3, 4)
    flat = lambda w: w.reshape(w.shape[0], -1, 4).transpose(0, 1).reshape(-1, w.shape[0] * 4)  # noqa: E731
    assert rearrangement_plan(flat, (7, 12), 3) == (7, 3, 4)  # Linear after Flatten
    for not_a_rearrangement in (
        lambda w: 2 * w, lambda w: -w, lambda w: w.abs(), lambda w: w[:, :2],
        lambda w: w[:, [0, 0, 1, 2]], lambda w: w.double(), lambda w: w.flip(0),
    ):
        assert rearrangement_plan(not_a_rearrangement, (3, 4), 3) is None


def test_training_is_bitwise_identical_with_the_fast_monitor():
    def train(mode: str | None) -> list[torch.Tensor]:
        model = bench_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        if mode is not None:
            ConservationMonitor(model, split=mode == "split", every=1, recording="sync").attach(opt)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 784, generator=g), torch.randint(0, 10, (32,), generator=g)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    plain = train(None)
    for mode in ("values", "split"):
        assert all(torch.equal(a, b) for a, b in zip(plain, train(mode)))


# ---------------------------------------------------------------- memory: no float64 copy of θ
@pytest.mark.parametrize("make", [bench_mlp, small_cnn, mixed_mlp])
def test_view_plans_read_off_strides_agree_with_the_probe(make):
    """Every built-in reader that returns a view gets its plan from strides alone (no probe
    tensor of the parameter's size), equal to the probe's plan."""
    model = make()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    seen = 0
    for g in build_groups(find_structure(model).pairs):
        for name, fn in g.pair.incoming + g.pair.outgoing:
            plan = accounting.view_plan(fn, shapes[name], g.count)
            if plan is not None:
                seen += 1
                assert plan == rearrangement_plan(fn, shapes[name], g.count)
    assert seen > 0


@pytest.mark.parametrize(
    "reader",
    [lambda w: 2 * w, lambda w: w.mul_(1), lambda w: w[:, :2], lambda w: w.flip(0), lambda w: w.T.flatten()],
)
def test_view_plan_refuses_anything_but_a_dense_view(reader):
    assert accounting.view_plan(reader, (6, 4), 6) is None


def test_split_against_a_native_snapshot_is_bitwise_the_float64_one():
    """θ before the step in its own dtype converts exactly: the split is bitwise the same as
    against a float64 copy (the monitor keeps only the native one)."""
    model = mixed_mlp()
    acc = Accountant(build_groups(find_structure(model).pairs))
    before = params_of(model)
    after = perturbed(before, 1e-2, 5)
    native = acc.split(before, after)
    wide = acc.split({n: p.to(F64) for n, p in before.items()}, after)
    for a, b in zip(native, wide):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_initial_values_and_scales_equal_the_group_definitions():
    model = small_cnn()
    groups = build_groups(find_structure(model).pairs)
    params = params_of(model)
    values, scales = Accountant(groups).initial(params)
    ref = evaluate(groups, {n: p.to(F64) for n, p in params.items()})
    ref_scale = scale_of(groups, params)
    for g in groups:
        torch.testing.assert_close(values[g.name], ref[g.name], rtol=1e-14, atol=1e-14 * float(ref_scale[g.name].max()))
        torch.testing.assert_close(scales[g.name], ref_scale[g.name], rtol=1e-14, atol=0)
