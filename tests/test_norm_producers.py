"""Normalization layers as producers: the affine part (γ_c, β_c) of BatchNorm, GroupNorm,
LayerNorm and RMSNorm starts a per-unit law γ_c² + β_c² − k‖w_out,c‖² with the next layer;
as a consumer a normalization stays a barrier (it renormalizes the units)."""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_conslaw import ConservationMonitor, analyze, catalogue
from torch_conslaw.accounting import Accountant
from torch_conslaw.cli import main
from torch_conslaw.lawgroups import build_groups, rearrangement_plan
from torch_conslaw.structure import find_structure

from fsdp_helpers import history_lists, run_on_two_ranks, train_monitored, unsharded_reference

F64 = torch.float64
HAS_RMSNORM = hasattr(nn, "RMSNorm")
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm) + ((nn.RMSNorm,) if HAS_RMSNORM else ())


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch):
    """Registrations made by a test stay local to it."""
    for table in ("_LAYERS", "_ACT_MODULES", "_ACT_FUNCTIONS", "_ACT_METHODS"):
        monkeypatch.setattr(catalogue, table, dict(getattr(catalogue, table)))


def _randomize_affine(model: nn.Module) -> nn.Module:
    """γ away from 1 and β away from 0, so that every term of the law matters."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model


def _case(build: Callable[[], list[nn.Module]]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return _randomize_affine(nn.Sequential(*build()).double())

    return make


# name → (model factory, input shape, norm index, consumer index, kind, positions)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, int, str, int]] = {
    "conv-bn2d-relu-conv": (
        _case(lambda: [nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, eps=0.1), nn.ReLU(), nn.Conv2d(3, 4, 3)]),
        (8, 2, 6, 6), 1, 3, "channel", 1,
    ),
    "conv-bn2d-relu-pool-flatten-linear": (
        _case(lambda: [
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(3 * 3 * 3, 4),
        ]),
        (8, 2, 6, 6), 1, 5, "channel", 9,
    ),
    "linear-bn1d-relu-linear": (
        _case(lambda: [nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)]),
        (16, 4), 1, 3, "unit", 1,
    ),
    "conv1d-bn1d-relu-conv1d": (
        _case(lambda: [nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Conv1d(3, 2, 3)]),
        (8, 2, 9), 1, 3, "channel", 1,
    ),
    "linear-layernorm-relu-linear": (
        _case(lambda: [nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 3)]),
        (16, 4), 1, 3, "unit", 1,
    ),
    "linear-layernorm-linear": (  # no activation: per-unit laws, not the matrix law
        _case(lambda: [nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)]),
        (16, 4), 1, 2, "unit", 1,
    ),
    "conv-groupnorm-leakyrelu-conv": (
        _case(lambda: [nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.LeakyReLU(0.1), nn.Conv2d(4, 3, 3)]),
        (8, 2, 6, 6), 1, 3, "channel", 1,
    ),
    "conv-syncbn-relu-conv": (  # SyncBatchNorm runs as BatchNorm outside a process group
        _case(lambda: [nn.Conv2d(2, 3, 3, padding=1), nn.SyncBatchNorm(3), nn.ReLU(), nn.Conv2d(3, 4, 3)]),
        (8, 2, 6, 6), 1, 3, "channel", 1,
    ),
    "conv-instancenorm-relu-conv": (
        _case(lambda: [nn.Conv2d(2, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True), nn.ReLU(), nn.Conv2d(3, 4, 3)]),
        (8, 2, 6, 6), 1, 3, "channel", 1,
    ),
}
if HAS_RMSNORM:
    CASES["linear-rmsnorm-relu-linear"] = (
        _case(lambda: [nn.Linear(4, 5), nn.RMSNorm(5, eps=1e-3), nn.ReLU(), nn.Linear(5, 3)]),
        (16, 4), 1, 3, "unit", 1,
    )


def _data(model: nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed float64 batch and a target of the model's output shape."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen, dtype=F64)
    with torch.no_grad():
        out_shape = copy.deepcopy(model).eval()(x).shape
    return x, torch.randn(out_shape, generator=gen, dtype=F64)


def _consumer_block(consumer: nn.Module, c: int, positions: int) -> torch.Tensor:
    """Every weight of the consumer that reads unit / channel c (by hand)."""
    if isinstance(consumer, nn.Linear):
        return consumer.weight[:, c * positions : (c + 1) * positions]
    return consumer.weight[:, c]


def _law_by_hand(norm: nn.Module, consumer: nn.Module, positions: int, degree: float = 1.0) -> torch.Tensor:
    values = []
    for c in range(norm.weight.shape[0]):
        h = norm.weight[c] ** 2
        if getattr(norm, "bias", None) is not None:
            h = h + norm.bias[c] ** 2
        values.append(h - degree * _consumer_block(consumer, c, positions).square().sum())
    return torch.stack(values).detach()


@pytest.mark.parametrize("case", sorted(CASES))
def test_pair_found_and_law_equals_a_by_hand_loop(case):
    make, shape, ni, ci, kind, positions = CASES[case]
    model = make()
    s = find_structure(model)
    name = f"{ni}→{ci}"
    pair = next(p for p in s.pairs if p.name == name)
    assert (pair.kind, pair.units, pair.positions, pair.degree) == (kind, model[ni].weight.shape[0], positions, 1.0)
    expected_in = {f"{ni}.weight"} | ({f"{ni}.bias"} if getattr(model[ni], "bias", None) is not None else set())
    assert {n for n, _ in pair.incoming} == expected_in
    # the layer before the norm: skipped, the norm renormalizes its units
    before = [k for k in s.skipped if k.consumer == str(ni)]
    assert len(before) == 1 and "renormalizes the units" in before[0].reason
    assert before[0].reason.startswith(f"between 0 ({type(model[0]).__name__}) and {ni} ({type(model[ni]).__name__}): ")
    by_hand = _law_by_hand(model[ni], model[ci], positions)
    monitor = ConservationMonitor(model, every=1, recording="sync")
    torch.testing.assert_close(monitor.initial[name], by_hand, rtol=0, atol=1e-13)
    # the vectorized group and the Accountant's strided fast path agree with the loop
    params = dict(model.named_parameters())
    (group,) = [g for g in build_groups(s.pairs) if g.name == name]
    torch.testing.assert_close(group.values(params), by_hand, rtol=0, atol=1e-13)
    torch.testing.assert_close(Accountant([group]).values(params)[name], by_hand, rtol=0, atol=1e-13)
    for qualified, fn in pair.incoming + pair.outgoing:
        assert rearrangement_plan(fn, tuple(params[qualified].shape), pair.units) is not None, qualified


def _train(
    model: nn.Module, shape: tuple[int, ...], lr: float, steps: int, momentum: float = 0.0
) -> ConservationMonitor:
    x, y = _data(model, shape)
    model.train()  # batch statistics
    monitor = ConservationMonitor(model, every=1, recording="sync")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    monitor.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return monitor


@pytest.mark.parametrize("case", sorted(CASES))
def test_law_is_conserved_by_sgd_in_train_mode_and_drift_vanishes_with_the_step(case):
    make, shape, ni, ci, *_ = CASES[case]
    name = f"{ni}→{ci}"
    drift = {}
    for lr, steps in ((0.02, 20), (0.01, 40)):  # the same training time T = 0.4
        monitor = _train(make(), shape, lr, steps)
        (row,) = [r for r in monitor.summary() if r["name"] == name]
        assert row["expected_conserved"]
        assert row["max_rel_first_order"] <= 1e-12, row  # exact split: only rounding noise
        assert row["max_rel_second_order"] > 0
        drift[lr] = row["last_rel_drift"]
    assert drift[0.02] > 1e-9
    assert 1.6 < drift[0.02] / drift[0.01] < 2.5, drift  # O(η) at fixed T: halving η halves it
    # control: momentum breaks the law, and the split shows it at first order
    broken = _train(make(), shape, 0.02, 20, momentum=0.9)
    (row,) = [r for r in broken.summary() if r["name"] == name]
    assert not row["expected_conserved"] and row["max_rel_first_order"] > 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
def test_rescaling_gamma_beta_and_the_consumer_leaves_the_output_unchanged(case):
    make, shape, ni, ci, _, positions = CASES[case]
    model = make()
    x, _ = _data(model, shape)
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics for eval mode
            model.train()(x + torch.randn_like(x))
    lam = 0.3 + 2.7 * torch.rand(model[ni].weight.shape[0], generator=torch.Generator().manual_seed(9), dtype=F64)

    def rescaled(gamma_only: bool = False) -> nn.Module:
        m = copy.deepcopy(model)
        with torch.no_grad():
            norm, consumer = m[ni], m[ci]
            norm.weight.mul_(lam)
            if getattr(norm, "bias", None) is not None:
                norm.bias.mul_(lam)
            if gamma_only:
                return m
            for c in range(lam.numel()):
                _consumer_block(consumer, c, positions).div_(lam[c])
        return m

    for train in (True, False):
        with torch.no_grad():
            ref = copy.deepcopy(model).train(train)(x)
            out = rescaled().train(train)(x)
            wrong = rescaled(gamma_only=True).train(train)(x)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item())
        assert (wrong - ref).abs().max() > 1e-3 * ref.abs().max()  # the check can fail


def test_monitor_never_changes_training_bitwise_with_batchnorm():
    def train(with_monitor: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
            nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2),
        )
        x, y = torch.randn(8, 2, 5, 5), torch.randn(8, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if with_monitor:  # with example_input: the finder's quiet forward must leave no trace
            monitor = ConservationMonitor(model, x, split=True, every=1, recording="sync").attach(opt)
            pairs = {g.name for g in monitor.groups if g.kind in ("unit", "channel", "matrix")}
            assert pairs == {"1→5", "6→8"}  # + the verified linear / approximate families
        for _ in range(6):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        state = [t.detach().clone() for t in model.state_dict().values()]  # running stats included
        return state, torch.rand(3)

    (a, rng_a), (b, rng_b) = train(False), train(True)
    assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(rng_a, rng_b)


def _skipped_reasons(model: nn.Module, *args) -> list[str]:
    return [str(k) for k in find_structure(model, *args).skipped]


def test_norm_without_affine_parameters_is_skipped_with_a_reason():
    class Net(nn.Module):
        def __init__(self, norm: nn.Module, conv: bool) -> None:
            super().__init__()
            self.inp = nn.Conv2d(2, 4, 3) if conv else nn.Linear(3, 4)
            self.bn1 = norm
            self.out = nn.Conv2d(4, 2, 1) if conv else nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.relu(self.bn1(self.inp(x))))

    norms = [
        (nn.BatchNorm2d(4, affine=False), True, "BatchNorm2d", "affine"),
        (nn.GroupNorm(2, 4, affine=False), True, "GroupNorm", "affine"),
        (nn.InstanceNorm2d(4), True, "InstanceNorm2d", "affine"),  # affine=False by default
        (nn.BatchNorm1d(4, affine=False), False, "BatchNorm1d", "affine"),
        (nn.LayerNorm(4, elementwise_affine=False), False, "LayerNorm", "elementwise_affine"),
    ]
    if HAS_RMSNORM:
        norms.append((nn.RMSNorm(4, elementwise_affine=False), False, "RMSNorm", "elementwise_affine"))
    for norm, conv, kind, flag in norms:
        text = f"bn1 ({kind}) has no affine parameters ({flag}=False)"
        model = Net(norm, conv)
        s = find_structure(model)
        assert s.pairs == []
        reasons = [str(k) for k in s.skipped]
        assert any(r == f"{text}: no law goes through it" for r in reasons), reasons
        assert any("between inp and bn1: bn1" in r and "renormalizes the units" in r for r in reasons), reasons
        with pytest.warns(RuntimeWarning, match="no conservation law is tracked"):
            monitor = ConservationMonitor(model, every=1, recording="sync")
        assert monitor.groups == [] and len(monitor.skipped) == 2


def test_multi_axis_layernorm_is_skipped_with_a_reason():
    model = nn.Sequential(nn.Linear(5, 5), nn.LayerNorm((4, 5)), nn.ReLU(), nn.Flatten(), nn.Linear(20, 3))
    reasons = _skipped_reasons(model)
    assert any(
        r.startswith("1 (LayerNorm) normalizes over 2 axes (normalized_shape=(4, 5))") and "no law" in r
        for r in reasons
    ), reasons
    with pytest.warns(RuntimeWarning):
        ConservationMonitor(model, every=1, recording="sync")
    assert analyze(model, torch.randn(2, 4, 5)).tracked_laws == 0


def test_norm_as_consumer_stays_a_barrier():
    conv_bn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    assert _skipped_reasons(conv_bn) == [
        "between 0 (Conv2d) and 1 (BatchNorm2d): 1 (BatchNorm2d) renormalizes the units, so the "
        "rescaling law does not hold across it"
    ]
    relu_ln = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))
    s = find_structure(relu_ln)
    assert [p.name for p in s.pairs] == ["2→4"]
    assert [str(k) for k in s.skipped] == [
        "between 0 (Linear) and 2 (LayerNorm): 2 (LayerNorm) renormalizes the units, so the "
        "rescaling law does not hold across it"
    ]
    with pytest.raises(ValueError, match="LayerNorm renormalizes the units"):
        catalogue.layer_spec(nn.LayerNorm(4)).outgoing(nn.LayerNorm(4), 1)


def test_functional_normalizations_stay_barriers():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(3, 4)
            self.gamma = nn.Parameter(torch.ones(4))
            self.fc2 = nn.Linear(4, 4)
            self.fc3 = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(F.layer_norm(self.fc1(x), (4,), self.gamma))
            h = torch.relu(F.batch_norm(self.fc2(h), None, None, training=True))
            return self.fc3(h)

    s = find_structure(Net())
    assert s.pairs == []
    assert [str(k) for k in s.skipped] == [
        "between fc1 and fc2: layer_norm renormalizes the units, so the rescaling law does not hold across it",
        "between fc2 and fc3: batch_norm renormalizes the units, so the rescaling law does not hold across it",
    ]


class ReLU2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) ** 2


def test_relu_squared_after_batchnorm_gives_the_degree_two_law():
    catalogue.register_activation(ReLU2, degree=2)
    make = _case(lambda: [nn.Linear(4, 5), nn.BatchNorm1d(5), ReLU2(), nn.Linear(5, 3)])
    model = make()
    (pair,) = find_structure(model).pairs
    assert (pair.name, pair.degree, pair.kind) == ("1→3", 2.0, "unit")
    monitor = ConservationMonitor(model, every=1, recording="sync")
    by_hand = _law_by_hand(model[1], model[3], 1, degree=2.0)
    torch.testing.assert_close(monitor.initial["1→3"], by_hand, rtol=0, atol=1e-13)
    assert not torch.allclose(monitor.initial["1→3"], _law_by_hand(model[1], model[3], 1, degree=1.0))
    for degree, conserved in ((2, True), (1, False)):  # the k = 1 law is not conserved
        catalogue.register_activation(ReLU2, degree=degree)
        (row,) = _train(make(), (16, 4), 0.02, 10).summary()
        assert (row["max_rel_first_order"] <= 1e-12) is conserved, row


def test_batchnorm1d_units_follow_the_input_rank():
    """BatchNorm1d's units are on axis 1: the last axis of an (N, C) input, not of (N, C, L)."""
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    s = find_structure(model, torch.randn(2, 2, 4))  # the Linear reads L (= 4 = C by chance)
    # no law per channel; each column of the Linear reads every channel (one per position), so
    # only all the channels scaled together with the whole Linear weight are a symmetry
    assert [(p.name, p.units) for p in s.pairs] == [("1→3 (units tied in classes of 4)", 1)]
    params = dict(model.named_parameters())
    (law,) = [g for g in ConservationMonitor(model, torch.randn(2, 2, 4)).groups if g.name.startswith("1→3")]
    by_hand = params["1.weight"].square().sum() + params["1.bias"].square().sum() - params["3.weight"].square().sum()
    torch.testing.assert_close(law.values(params).float(), by_hand.reshape(1).detach(), rtol=1e-5, atol=1e-5)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    for example in (None, torch.randn(2, 3)):
        assert [(p.name, p.kind) for p in find_structure(mlp, example).pairs] == [("1→3", "unit")]
    to_conv1d = nn.Sequential(nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 1))
    for example in (None, torch.randn(2, 2, 4)):
        assert [(p.name, p.kind) for p in find_structure(to_conv1d, example).pairs] == [("1→3", "channel")]
    to_conv = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 1))
    # N = C = 4: the Conv1d runs on the (N, C) output as one unbatched (C_in, L) = (N, C) input
    assert any("(its input is 2-D)" in r for r in _skipped_reasons(to_conv, torch.randn(4, 3)))

    class Untraceable(nn.Module):  # the hooks fallback records the rank too
        def __init__(self) -> None:
            super().__init__()
            self.net = copy.deepcopy(model)

        def forward(self, x):
            if x.sum() > 1e9:
                return x
            return self.net(x)

    s = find_structure(Untraceable(), torch.randn(2, 2, 4))
    assert s.method == "hooks"
    assert [(p.name, p.units) for p in s.pairs] == [("net.1→net.3 (units tied in classes of 4)", 1)]


def test_analyze_and_inspect_handle_norm_producers(tmp_path, capsys):
    make, shape, *_ = CASES["conv-bn2d-relu-pool-flatten-linear"]
    report = analyze(make(), torch.randn(shape, dtype=F64), lie=False)  # the count: test_analyze_any_model.py
    # 3 channel laws across the BatchNorm, and the 3 verified bias laws of the conv before it
    assert report.tracked_laws == report.tracked_rank == 3 + 3
    assert sorted(g.kind for g in report.groups) == ["channel", "linear"]
    assert report.lie_laws is None and report.complete is None and report.lie_note
    path = tmp_path / "bnnet.py"
    path.write_text(textwrap.dedent(
        """
        from torch import nn

        def make_model():
            return nn.Sequential(
                nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 2),
            )
        """
    ))
    assert main(["inspect", f"{path}:make_model", "--input-shape", "1,3,8,8", "--analyze", "--max-lie-parameters", "0"]) == 0
    out = capsys.readouterr().out
    assert "1→4: 4 channel group(s) through [2 (ReLU), 3 (Flatten)], degree 1, 36 columns per channel" in out
    assert "5→7: 5 unit group(s)" in out and "law groups: 2 (9 laws)" in out
    assert "1 (BatchNorm2d) renormalizes the units" in out and "(BatchNorm2d) (BatchNorm2d)" not in out
    # analyze adds the verified linear families: the conv bias before BatchNorm2d (4) and the
    # centering before the LayerNorm (4·6·6 column sums and Σ b: 145)
    assert "tracked: 4 law group(s), 158 law function(s), 158 independent" in out
    assert "4→5 centering        linear     145 laws" in out


# ------------------------------------------------------------------------------------------
# FSDP2: γ and β sharded along dim 0 are read like biases (rows of the unit axis)
# ------------------------------------------------------------------------------------------

def _fsdp_model() -> nn.Module:
    torch.manual_seed(4)
    return _randomize_affine(nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(),
        nn.Linear(5 * 4 * 4, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 3),
    ))


def _fsdp_train(mesh=None) -> ConservationMonitor:
    return train_monitored(
        _fsdp_model(), mesh, lambda gen: (torch.randn(8, 2, 4, 4, generator=gen), torch.randn(8, 3, generator=gen))
    )


def _fsdp_summary(monitor: ConservationMonitor) -> dict:
    return {
        "groups": [g.name for g in monitor.groups],
        "skipped": [str(s) for s in monitor.skipped],
        "history": history_lists(monitor),
    }


def test_fsdp2_sharded_gamma_beta_laws_equal_an_unsharded_run(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 not in this torch")
    status = run_on_two_ranks(str(tmp_path), "norm", _fsdp_train, _fsdp_summary)
    assert status[0] == status[1]  # every rank gets the same all-reduced values
    ref = unsharded_reference(_fsdp_train)
    assert status[0]["groups"] == [g.name for g in ref.groups] == ["1→4", "5→7"]
    # fully_shard renames the classes (FSDPBatchNorm2d): compare the reasons without the prefix
    # (the sharded run also refuses the identity groups of SGD with momentum: left out here)
    sharded_skipped = [r for r in status[0]["skipped"] if not r.startswith("identity groups")]
    assert [r.replace("FSDP", "") for r in sharded_skipped] == [str(s) for s in ref.skipped]
    assert all("renormalizes the units" in str(s) for s in ref.skipped) and len(ref.skipped) == 2
    expected = history_lists(ref)
    got = status[0]["history"]
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if key == "step":
            assert got[key] == value
            continue
        scale = np.abs(np.asarray(expected[key.split("|")[0] + "|values"])).max()
        np.testing.assert_allclose(got[key], value, rtol=1e-9, atol=1e-12 * scale, err_msg=key)
        if key.endswith("first_order"):  # momentum: a real first-order part, compared too
            assert np.abs(np.asarray(value)[1:]).max() > 1e-8 * scale
