"""The fused evaluations equal the float64 definition up to a stated rounding bound.

``evaluation="compiled"`` (TorchInductor) and ``evaluation="native"`` (the C kernel of
:mod:`torch_conslaw.native`) form the same float64 products as the reference definition
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
from torch_conslaw import accounting, native
from torch_conslaw.accounting import Accountant, evaluate, split_change
from torch_conslaw.evaluation import compiler_available
from torch_conslaw.lawgroups import UnitLaws, build_groups
from torch_conslaw.structure import find_structure

F64 = torch.float64
U = 2.0**-53

needs_compiler = pytest.mark.skipif(not compiler_available("cpu"), reason="no C++ compiler for TorchInductor")
needs_native = pytest.mark.skipif(not native.native_status()[0], reason="the native kernel did not build here")
# every fused evaluation; compiling with Inductor takes seconds, the native kernel is built once
FUSED = [pytest.param("compiled", marks=needs_compiler), pytest.param("native", marks=needs_native)]


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


@pytest.mark.parametrize(
    "evaluation, make, dtype",
    [
        pytest.param("compiled", mlp, torch.float32, marks=needs_compiler),
        pytest.param("compiled", cnn, torch.float32, marks=[needs_compiler, pytest.mark.slow]),  # seconds
        *[
            pytest.param("native", make, dtype, marks=needs_native)
            for make in (mlp, cnn)
            for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        ],
    ],
)
def test_fused_values_and_split_are_within_the_rounding_bound(evaluation, make, dtype):
    model = make(0).to(dtype)
    groups = build_groups(find_structure(model).pairs)
    assert groups and all(isinstance(g, UnitLaws) for g in groups)
    fused = Accountant(groups, evaluation=evaluation)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(7)
    after = {n: p + (0.05 * torch.randn(p.shape, generator=g)).to(dtype) for n, p in before.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the eager path
        values = fused.values(after)
        v, f, s = fused.split(before, after)
    assert fused.evaluation == evaluation
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


@pytest.mark.parametrize("evaluation", FUSED)
def test_fused_laws_of_non_finite_parameters_are_non_finite_and_the_others_exact(evaluation):
    model = mlp(1)
    groups = build_groups(find_structure(model).pairs)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params["0.weight"][3, 5] = float("nan")
    params["2.weight"][7, 1] = float("inf")
    values = Accountant(groups, evaluation=evaluation).values(params)
    reference = Accountant(groups).values(params)
    for name in values:
        assert torch.equal(torch.isfinite(values[name]), torch.isfinite(reference[name]))
    assert values["0→2"][3].isnan() and values["0→2"][1].isinf() and values["2→4"][7].isinf()
    p64 = {n: t.to(F64) for n, t in params.items()}
    for grp in groups:  # the finite laws within the rounding bound
        squares, n = abs_sums(grp, p64, p64)
        finite = torch.isfinite(values[grp.name])
        diff = (values[grp.name] - reference[grp.name])[finite].abs()
        assert torch.all(diff <= 2 * gamma(n + 2) * squares[finite])


def test_without_a_compiler_the_accountant_warns_and_evaluates_eagerly(monkeypatch):
    monkeypatch.setattr(accounting, "compiler_available", lambda device_type: False)
    model = mlp(2)
    groups = build_groups(find_structure(model).pairs)
    params = dict(model.named_parameters())
    with pytest.warns(RuntimeWarning, match="evaluation='compiled' is not available"):
        values = Accountant(groups, evaluation="compiled").values(params)
    eager = Accountant(groups).values(params)
    assert all(torch.equal(values[k], eager[k]) for k in eager)


def test_without_the_native_kernel_the_accountant_warns_and_evaluates_eagerly(monkeypatch):
    monkeypatch.setattr(accounting, "native_status", lambda: (False, "no C compiler found"))
    model = mlp(2)
    groups = build_groups(find_structure(model).pairs)
    params = dict(model.named_parameters())
    with pytest.warns(RuntimeWarning, match=r"evaluation='native' is not available \(no C compiler found\)"):
        values = Accountant(groups, evaluation="native").values(params)
    eager = Accountant(groups).values(params)
    assert all(torch.equal(values[k], eager[k]) for k in eager)


@needs_native
def test_native_reads_every_half_precision_value_exactly():
    """With one product per side (plans (1, U, 1)) a law is w_in² − w_out², exact in float64
    but for the one rounding of the difference: the native kernel must equal the float64
    definition bit for bit on every float16 and bfloat16 bit pattern (subnormals, infinities
    and NaN included), in both halves of its work split."""
    for dtype in (torch.float16, torch.bfloat16):
        w_in = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        w_out = w_in.flip(0).contiguous()
        spec = [([(0, (1, w_in.numel(), 1))], [(1, (1, w_in.numel(), 1))], 1.0)]
        values = native.NativeLaws(spec, 2, threads=2).values([w_in, w_out])
        a, b = w_in.to(F64), w_out.to(F64)
        reference = a * a - b * b
        assert torch.equal(values.isnan(), reference.isnan()), dtype
        assert torch.equal(values[~reference.isnan()], reference[~reference.isnan()]), dtype


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
def test_native_sums_a_tensor_for_every_reader_row_and_column_alike(threads):
    """One weight read by a row reader and by two column readers (plans (1, U, B) and
    (A, U, 1), in different groups): every reader's rows, values and split, within the
    rounding bound of the float64 definition, summed by hand from the reshaped tensors."""
    g = torch.Generator().manual_seed(3)
    theta = [torch.randn(shape, generator=g) for shape in ((24, 40), (40, 7), (5, 24))]  # w, v, z
    delta = [0.1 * torch.randn(t.shape, generator=g) for t in theta]
    spec = [
        ([(0, (1, 24, 40))], [(2, (5, 24, 1))], 1.0),  # rows of w against columns of z
        ([(0, (24, 40, 1))], [(1, (1, 40, 7))], 2.0),  # columns of w against rows of v
        ([(0, (24, 40, 1))], [(1, (1, 40, 7))], 0.5),  # columns of w again
    ]
    kernel = native.NativeLaws(spec, 3, threads=threads)

    def reference(x: list[torch.Tensor], y: list[torch.Tensor]) -> torch.Tensor:
        def sums(i: int, plan: tuple[int, int, int]) -> torch.Tensor:
            return (x[i].to(F64) * y[i].to(F64)).reshape(plan).sum((0, 2))

        return torch.cat([sum(sums(*r) for r in inc) - k * sum(sums(*r) for r in out) for inc, out, k in spec])

    after = [t + d for t, d in zip(theta, delta)]
    delta = [a.to(F64) - t.to(F64) for a, t in zip(after, theta)]  # Δ as the kernel forms it
    values = kernel.values(after)
    split = kernel.split(theta, after)
    expected = [reference(after, after), 2 * reference(theta, delta), reference(delta, delta)]
    bound = 1e-12 * (1 + sum(t.abs().sum() for t in expected).item())
    assert torch.allclose(values, expected[0], rtol=0, atol=bound)
    for row, exact in zip(split, expected):
        assert torch.allclose(row, exact, rtol=0, atol=bound)


def test_a_bad_evaluation_is_refused():
    with pytest.raises(ValueError, match="evaluation must be one of"):
        tc.ConservationMonitor(mlp(0), evaluation="fast", every=1, recording="sync")


def _train(recording: str, split: bool, evaluation: str = "compiled") -> dict:
    torch.manual_seed(3)
    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a worker without a free core
        monitor = tc.ConservationMonitor(model, evaluation=evaluation, recording=recording, split=split, every=1).attach(opt)
    assert monitor.evaluation == evaluation
    x, y = torch.randn(32, 37), torch.randint(0, 5, (32,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return monitor.history()


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize(
    "evaluation", [pytest.param("compiled", marks=[needs_compiler, pytest.mark.slow]), pytest.param("native", marks=needs_native)]
)
def test_fused_records_are_bitwise_the_same_for_every_recorder(evaluation, split):
    # default threads: the workers run with one torch thread of their own, the kernels not
    sync = _train("sync", split, evaluation)
    for recording in ("snapshot", "live"):
        other = _train(recording, split, evaluation)
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
    monkeypatch.setattr(accounting, "native_status", lambda: (False, "no C compiler found"))
    model = mlp(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        monitor = tc.ConservationMonitor(model, torch.randn(8, 37), every=1, recording="sync")
    assert monitor.evaluation == "eager" and "no compiler" in monitor.evaluation_reason


@pytest.mark.parametrize(
    "native_builds, expected",
    [pytest.param(True, "native", marks=needs_native), pytest.param(False, "compiled", marks=needs_compiler)],
)
def test_auto_fuses_large_per_unit_laws_when_the_monitor_is_built(monkeypatch, native_builds, expected):
    """Above the threshold (lowered here) ``auto`` picks the native kernel on the CPU, or
    Inductor where the native kernel does not build, when the monitor is built; its records
    stay within the rounding bound of the eager ones."""
    monkeypatch.setattr(accounting, "AUTO_COMPILE_ELEMENTS", 1)
    if not native_builds:
        monkeypatch.setattr(accounting, "native_status", lambda: (False, "no C compiler found"))
    histories = {}
    for evaluation in ("auto", "eager"):
        torch.manual_seed(6)
        model = mlp(6)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = tc.ConservationMonitor(model, torch.randn(8, 37), every=1, recording="sync", evaluation=evaluation)
        assert monitor.evaluation == (expected if evaluation == "auto" else "eager")
        if evaluation == "auto":
            assert ("native kernel" in monitor.evaluation_reason) and (
                "no C compiler found" in monitor.evaluation_reason) != native_builds
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


@pytest.mark.parametrize("evaluation", ["eager", *FUSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_split_that_advances_leaves_theta_after_in_before_and_the_same_table(evaluation, dtype):
    model = cnn(8).to(dtype)
    groups = build_groups(find_structure(model).pairs)
    accountant = Accountant(groups, evaluation=evaluation)
    g = torch.Generator().manual_seed(9)
    after = {n: p.detach() + (0.1 * torch.randn(p.shape, generator=g)).to(dtype) for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    table = accountant.split_table(before, after)
    advanced = accountant.split_table(before, after, advance=True)
    assert torch.equal(table, advanced)
    assert all(torch.equal(before[n], after[n]) and before[n].dtype == dtype for n in accountant.names)
    assert torch.all(accountant.split_table(before, after)[1:] == 0)  # θ⁺ against itself: Δ = 0


@pytest.mark.parametrize("invalid", [None, "some"])
def test_the_native_fold_of_running_maxima_equals_the_torch_one(monkeypatch, invalid):
    g = torch.Generator().manual_seed(4)
    table, base = torch.randn(3, 50, generator=g, dtype=F64), torch.randn(3, 50, generator=g, dtype=F64)
    mask = None if invalid is None else torch.rand(50, generator=g) < 0.3
    results = {}
    for kind in ("native", "torch"):
        if kind == "torch":
            monkeypatch.setattr(native, "_library", lambda: (None, "no C compiler found"))
        elif not native.native_status()[0]:
            continue
        running = torch.rand(3, 50, generator=torch.Generator().manual_seed(5), dtype=F64)
        fold = native.RunningMax(base, running)
        assert fold(table, mask)
        bad = table.clone()
        bad[1, 7] = float("nan")
        unchanged = running.clone()
        if mask is not None and mask[7]:
            assert fold(bad, mask)  # a marked law is left out
        else:
            assert not fold(bad, mask) and torch.equal(running, unchanged)
        results[kind] = running
    start = torch.rand(3, 50, generator=torch.Generator().manual_seed(5), dtype=F64)
    gap = (table - base).abs()
    expected = torch.maximum(start, gap if mask is None else gap.masked_fill(mask, 0.0))
    assert "torch" in results
    for running in results.values():
        assert torch.equal(running, expected)


@pytest.mark.parametrize(
    "env, reason",
    [({"TORCH_CONSLAW_NATIVE": "0"}, "turned off by TORCH_CONSLAW_NATIVE=0"), ({"CC": "", "PATH": ""}, "no C compiler found")],
)
def test_without_the_native_kernel_auto_says_why(monkeypatch, env, reason):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(accounting, "AUTO_COMPILE_ELEMENTS", 1)
    native._library.cache_clear()
    try:
        built, why = native.native_status()
        assert not built and reason in why
        monitor = tc.ConservationMonitor(mlp(7), torch.randn(8, 37), every=1, recording="sync")
        assert monitor.evaluation in ("compiled", "eager") and reason in monitor.evaluation_reason
    finally:
        native._library.cache_clear()


@needs_native
def test_native_reuses_its_checks_only_for_the_same_tensors_as_they_were():
    """A call on the tensors of the previous call skips the checks it made then; a tensor
    whose storage, shape or layout changed since is checked again: read right, or refused
    (``None``) when the kernel cannot read it as it is, never read with stale arguments."""
    g = torch.Generator().manual_seed(5)
    w, v = torch.randn(6, 4, generator=g), torch.randn(3, 6, generator=g)
    spec = [([(0, (1, 6, 4))], [(1, (3, 6, 1))], 1.0)]  # rows of w against columns of v
    kernel = native.NativeLaws(spec, 2, shapes=[w.shape, v.shape])

    def reference(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return w.to(F64).pow(2).sum(1) - v.to(F64).pow(2).sum(0)

    first = kernel.values([w, v])
    second = kernel.values([w, v])
    assert first is not second and torch.equal(first, second)  # a new table each call
    assert torch.allclose(first, reference(w, v), rtol=1e-15, atol=0)
    w.mul_(2.0)  # in place: the same storage, read again as it is now
    assert torch.allclose(kernel.values([w, v]), reference(w, v), rtol=1e-15, atol=0)
    assert torch.allclose(first, reference(w / 2, v), rtol=1e-15, atol=0)  # earlier tables kept
    w2 = w.clone().add_(1.0)  # new storage, other values
    assert torch.allclose(kernel.values([w2, v]), reference(w2, v), rtol=1e-15, atol=0)
    square = torch.randn(6, 6, generator=g)
    spec_sq = [([(0, (1, 6, 6))], [(1, (3, 6, 1))], 1.0)]
    kernel_sq = native.NativeLaws(spec_sq, 2, shapes=[square.shape, v.shape])
    assert torch.allclose(kernel_sq.values([square, v]), square.to(F64).pow(2).sum(1) - v.to(F64).pow(2).sum(0))
    transposed = square.t()  # the same storage and shape, another layout: refused
    assert transposed.data_ptr() == square.data_ptr() and kernel_sq.table(None, [transposed, v]) is None
    assert torch.allclose(kernel.values([w, v]), reference(w, v), rtol=1e-15, atol=0)
    assert kernel.table(None, [w.reshape(4, 6), v]) is None  # same storage and size, not the plan's shape
    half = w.flatten().view(torch.bfloat16)[:24].view(6, 4)  # same storage and shape, another dtype
    assert half.data_ptr() == w.data_ptr() and half.is_contiguous()
    assert torch.allclose(kernel.values([half, v]), reference(half, v), rtol=1e-15, atol=0, equal_nan=True)
    assert torch.allclose(kernel.values([w, v]), reference(w, v), rtol=1e-15, atol=0)  # and back


@needs_native
def test_a_monitor_records_right_after_a_parameter_changes_storage_or_layout():
    """``every=1`` synchronous records with the split (the native kernel, whose arguments are
    kept from step to step) equal the eager evaluation's when a parameter gets new storage
    or a transposed layout of the same shape between steps, and when it is modified in place."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    monitors = [
        tc.ConservationMonitor(m, every=1, split=True, recording="sync", evaluation=e).attach(o)
        for m, o, e in zip(models, opts, ("native", "eager"))
    ]
    assert monitors[0].evaluation == "native"
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    edits = {
        3: lambda m: setattr(m[2].weight, "data", m[2].weight.data.clone()),
        6: lambda m: setattr(m[2].weight, "data", m[2].weight.data.t().contiguous().t()),
        9: lambda m: m[0].weight.data.mul_(1.5),
    }
    for step in range(12):
        for m, o in zip(models, opts):
            if step in edits:
                edits[step](m)
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    assert not models[0][2].weight.is_contiguous()  # the layout edit holds (updates are in place)
    histories = [mon.history() for mon in monitors]
    assert list(histories[0]["step"]) == list(range(13))
    for key, column in histories[1].items():
        assert np.allclose(histories[0][key], column, rtol=1e-12, atol=1e-12, equal_nan=True), key
