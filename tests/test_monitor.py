"""ConservationMonitor against independent by-hand computations (float64)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from torch_conslaw.monitor import ConservationMonitor
from monitor_defaults import every_step

F64 = torch.float64


def mlp(seed: int = 0, dtype: torch.dtype = F64) -> nn.Sequential:
    torch.manual_seed(seed)
    # ReLU hidden layer (unit laws), then a linear hidden layer (matrix law)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Linear(5, 2)).to(dtype)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(3, 4, 2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.c1(x)))
        return self.fc(self.flat(torch.relu(self.c2(x))))


def data(n: int = 16, d: int = 4, out: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, out, generator=g, dtype=F64)


def sgd_steps(model, opt, x, y, steps):
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    return grads


def unit_law_by_hand(w_in, b_in, w_out, k=1.0):
    return torch.stack(
        [w_in[j].square().sum() + b_in[j] ** 2 - k * w_out[:, j].square().sum() for j in range(w_in.shape[0])]
    )


def matrix_law_by_hand(w_in, b_in, w_out):
    inc = torch.cat([w_in, b_in[:, None]], 1)
    q = inc @ inc.T - w_out.T @ w_out
    n = q.shape[0]
    return torch.stack([q[i, j] for i in range(n) for j in range(i, n)])


def test_initial_values_equal_a_by_hand_loop_on_an_mlp():
    model = mlp()
    mon = ConservationMonitor(model, every=1, recording="sync")
    assert [(g.name, g.kind, g.count) for g in mon.groups] == [("0→2", "unit", 6), ("2→3", "matrix", 15)]
    w = [model[i].weight.detach() for i in (0, 2, 3)]
    b = [model[i].bias.detach() for i in (0, 2, 3)]
    torch.testing.assert_close(mon.initial["0→2"], unit_law_by_hand(w[0], b[0], w[1]), rtol=0, atol=1e-14)
    torch.testing.assert_close(mon.initial["2→3"], matrix_law_by_hand(w[1], b[1], w[2]), rtol=0, atol=1e-14)


def test_conv_and_flatten_mappings_equal_a_by_hand_loop():
    torch.manual_seed(0)
    model = ConvNet().double()
    mon = ConservationMonitor(model, every=1, recording="sync")
    assert [(g.name, g.count) for g in mon.groups] == [("c1→c2", 3), ("c2→fc", 4)]
    c1w, c1b, c2w, c2b = (t.detach() for t in (model.c1.weight, model.c1.bias, model.c2.weight, model.c2.bias))
    fcw = model.fc.weight.detach()
    h1 = [c1w[c].square().sum() + c1b[c] ** 2 - sum(c2w[o, c].square().sum() for o in range(4)) for c in range(3)]
    positions = 2 * 2  # channel c owns columns c*4 .. c*4+3 after Flatten
    h2 = [
        c2w[c].square().sum() + c2b[c] ** 2
        - sum(fcw[o, c * positions + q] ** 2 for o in range(3) for q in range(positions))
        for c in range(4)
    ]
    torch.testing.assert_close(mon.initial["c1→c2"], torch.stack(h1), rtol=0, atol=1e-13)
    torch.testing.assert_close(mon.initial["c2→fc"], torch.stack(h2), rtol=0, atol=1e-13)


def test_sgd_change_of_every_law_is_eta_squared_gAg():
    model, eta = mlp(), 0.05
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    mon = ConservationMonitor(model, every=1, recording="sync").attach(opt)
    grads = sgd_steps(model, opt, *data(), steps=4)
    hist = mon.history()
    for t, g in enumerate(grads):
        unit = eta**2 * unit_law_by_hand(g["0.weight"], g["0.bias"], g["2.weight"])
        matrix = eta**2 * matrix_law_by_hand(g["2.weight"], g["2.bias"], g["3.weight"])
        for name, predicted in (("0→2", unit), ("2→3", matrix)):
            measured = hist[f"{name}/values"][t + 1] - hist[f"{name}/values"][t]
            scale = np.abs(hist[f"{name}/values"][t]).max() + 1
            np.testing.assert_allclose(measured, predicted.numpy(), rtol=0, atol=1e-14 * scale)
            np.testing.assert_allclose(hist[f"{name}/second_order"][t + 1], predicted.numpy(), rtol=0, atol=1e-15 * scale)
    for s in mon.summary():
        assert s["max_rel_first_order"] <= 1e-12 and s["expected_conserved"]
        assert s["max_rel_drift"] > 0


def test_conv_sgd_change_matches_eta_squared_gAg_and_first_order_vanishes():
    torch.manual_seed(0)
    model, eta = ConvNet().double(), 0.1
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    mon = ConservationMonitor(model, every=1, recording="sync").attach(opt)
    x = torch.randn(8, 2, 8, 8, dtype=F64)
    y = torch.randn(8, 3, dtype=F64)
    grads = sgd_steps(model, opt, x, y, steps=3)
    g = grads[-1]
    predicted = eta**2 * torch.stack(
        [
            g["c1.weight"][c].square().sum() + g["c1.bias"][c] ** 2 - g["c2.weight"][:, c].square().sum()
            for c in range(3)
        ]
    )
    hist = mon.history()
    measured = hist["c1→c2/values"][-1] - hist["c1→c2/values"][-2]
    np.testing.assert_allclose(measured, predicted.numpy(), rtol=0, atol=1e-13)
    assert max(s["max_rel_first_order"] for s in mon.summary()) <= 1e-12


def test_split_is_exact_and_first_order_reveals_adam():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = ConservationMonitor(model, every=1, recording="sync").attach(opt)
    sgd_steps(model, opt, *data(), steps=3)
    hist = mon.history()
    for g in mon.groups:
        change = np.diff(hist[f"{g.name}/values"], axis=0)
        split = hist[f"{g.name}/first_order"][1:] + hist[f"{g.name}/second_order"][1:]
        np.testing.assert_allclose(change, split, rtol=0, atol=1e-13)
    summary = mon.summary()
    assert all(s["max_rel_first_order"] > 1e-4 for s in summary)
    assert all(not s["expected_conserved"] and "Adam" in s["reason"] for s in summary)


def test_weight_decay_follows_the_exact_shrink_formula():
    model, eta, lam = mlp(), 0.05, 0.1
    opt = torch.optim.SGD(model.parameters(), lr=eta, weight_decay=lam)
    mon = ConservationMonitor(model, every=1, recording="sync").attach(opt)
    grads = sgd_steps(model, opt, *data(), steps=2)
    g = grads[-1]  # grads hold ∇E only; the decay term λθ is added inside the optimizer
    hist = mon.history()
    before = hist["0→2/values"][-2]
    predicted = (1 - eta * lam) ** 2 * before + eta**2 * unit_law_by_hand(g["0.weight"], g["0.bias"], g["2.weight"]).numpy()
    np.testing.assert_allclose(hist["0→2/values"][-1], predicted, rtol=0, atol=1e-13)
    assert "weight_decay=0.1" in mon.summary()[0]["reason"]


def test_monitoring_never_changes_training_bitwise():
    def train(with_monitor: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if with_monitor:
            ConservationMonitor(model, split=True, every=1, recording="sync").attach(opt)
        x, y = torch.randn(16, 4), torch.randn(16, 2)
        for _ in range(10):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()] + [torch.rand(3)]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)


def test_float32_parameters_are_evaluated_in_float64():
    model = mlp(dtype=torch.float32)
    mon = ConservationMonitor(model, every=1, recording="sync")
    assert all(v.dtype == F64 for v in mon.initial.values())
    w1, b1, w2 = (t.detach().double() for t in (model[0].weight, model[0].bias, model[2].weight))
    torch.testing.assert_close(mon.initial["0→2"], unit_law_by_hand(w1, b1, w2), rtol=0, atol=1e-14)


def test_non_finite_parameter_marks_only_the_affected_laws_invalid():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = ConservationMonitor(model, every=1, recording="sync")
    x, y = data()
    sgd_steps(model, opt, x, y, steps=1)
    mon.step()
    with torch.no_grad():
        model[0].weight[1, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="1 law\\(s\\) of group 0→2 became non-finite at step 2"):
        mon.step()
    summary = {s["name"]: s for s in mon.summary()}
    assert summary["0→2"]["invalid"] == 1 and summary["2→3"]["invalid"] == 0
    assert np.isfinite(summary["0→2"]["max_rel_drift"]) and summary["0→2"]["max_rel_drift"] > 0


def test_training_into_nan_is_unaffected_by_the_monitor():
    def train(with_monitor: bool) -> list[torch.Tensor]:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        if with_monitor:
            ConservationMonitor(model, every=1, recording="sync").attach(opt)
        x, y = data()
        sgd_steps(model, opt, x, y, steps=1)
        with torch.no_grad():
            model[0].weight[1, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if with_monitor else "error")
            sgd_steps(model, opt, x, y, steps=2)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_frozen_parameters_exclude_the_group_with_the_reason():
    model = mlp()
    model[2].bias.requires_grad_(False)  # incoming side of 2→3; the consumer bias of 0→2 is no part of it
    mon = ConservationMonitor(model, every=1, recording="sync")
    assert [g.name for g in mon.groups] == ["0→2"]
    assert [str(s) for s in mon.skipped] == ["2.bias is frozen (requires_grad=False): the 2→3 law does not hold"]


def test_no_usable_pair_gives_zero_laws_and_an_explanation():
    with pytest.warns(RuntimeWarning, match="no conservation law is tracked"):
        mon = ConservationMonitor(nn.Linear(3, 2), every=1, recording="sync")
    assert mon.groups == [] and mon.summary() == []
    assert "no two registered layers" in str(mon.skipped[0])
    opt = torch.optim.SGD(mon.model.parameters(), lr=0.1)
    mon.attach(opt)
    opt.step()
    assert list(mon.history()) == ["step"] and mon.num_steps == 1


def test_attach_rejects_a_foreign_optimizer_and_warns_on_a_partial_one():
    model = mlp()
    other = torch.optim.SGD(mlp(1).parameters(), lr=0.1)
    mon = ConservationMonitor(model, every=1, recording="sync")
    with pytest.raises(ValueError, match="owns none of the parameters of Sequential"):
        mon.attach(other)
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer"):
        mon.attach(model)
    partial = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="does not update 2.weight"):
        mon.attach(partial)
    assert not mon.groups[0].expected_conserved


def test_manual_step_uses_the_last_record_and_refuses_when_attached():
    model, eta = mlp(), 0.05
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    mon = ConservationMonitor(model, every=2, recording="sync")
    seen = []
    mon.add_listener(lambda r: seen.append(r.step))
    x, y = data()
    for _ in range(4):
        sgd_steps(model, opt, x, y, steps=1)
        mon.step()
    assert seen == [2, 4] and list(mon.history()["step"]) == [0, 2, 4]
    hist = mon.history()
    for g in mon.groups:  # the split covers the two steps since the last record, exactly
        change = np.diff(hist[f"{g.name}/values"], axis=0)
        np.testing.assert_allclose(change, hist[f"{g.name}/first_order"][1:] + hist[f"{g.name}/second_order"][1:], atol=1e-14)
    mon.attach(opt)
    with pytest.raises(RuntimeError, match="attached to an optimizer"):
        mon.step()
    mon.detach()
    mon.step()
    assert mon.num_steps == 5


def test_log_spaced_schedule_and_bounded_history_keep_exact_maxima():
    def run(**kw):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        mon = ConservationMonitor(model, **every_step(kw)).attach(opt)
        sgd_steps(model, opt, *data(), steps=40)
        return mon

    full, small = run(), run(max_records=5)
    steps = small.history()["step"]
    assert len(steps) <= 6 and steps[0] == 0 and steps[-1] == 40
    assert np.all(np.diff(steps) > 0)
    for a, b in zip(full.summary(), small.summary()):
        assert a["max_rel_drift"] == b["max_rel_drift"] and a["max_rel_first_order"] == b["max_rel_first_order"]
    grid = sorted({int(np.ceil(10 ** (i / 10) - 1e-12)) for i in range(17)})  # first step reaching 10^(i/10)
    assert list(run(log_spaced=True).history()["step"]) == [0, *grid]


@pytest.mark.parametrize("split", [False, True])
def test_the_history_is_bounded_in_bytes_too(split):
    """``max_history_bytes`` caps the stored records at that many bytes of float64 law values
    (and split): a model with many laws cannot grow a history larger than asked for."""
    def run(**kw):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        mon = ConservationMonitor(model, split=split, **every_step(kw)).attach(opt)
        sgd_steps(model, opt, *data(), steps=40)
        return mon

    full = run()
    laws = sum(g.count for g in full.groups)
    record_bytes = 8 * laws * (3 if split else 1)
    small = run(max_history_bytes=4 * record_bytes + 1)
    steps = small.history()["step"]
    assert 2 <= len(steps) <= 5 and steps[0] == 0 and steps[-1] == 40  # 4 stored + the latest
    assert np.all(np.diff(steps) > 0)
    for a, b in zip(full.summary(), small.summary()):
        assert a["max_rel_drift"] == b["max_rel_drift"]
    assert len(run(max_history_bytes=1).history()["step"]) <= 3  # at least two records stay
    with pytest.raises(ValueError, match="max_history_bytes must be a positive integer"):
        ConservationMonitor(mlp(), max_history_bytes=0)


def test_state_dict_resume_measures_drift_against_the_original_theta0():
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    straight = ConservationMonitor(model, every=1, recording="sync").attach(opt)
    sgd_steps(model, opt, x, y, steps=6)

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = ConservationMonitor(model, every=1, recording="sync").attach(opt)
    sgd_steps(model, opt, x, y, steps=3)
    state = first.state_dict()
    resumed_model = mlp(seed=5)
    resumed_model.load_state_dict(model.state_dict())
    opt2 = torch.optim.SGD(resumed_model.parameters(), lr=0.1)
    resumed = ConservationMonitor(resumed_model, every=1, recording="sync")
    resumed.load_state_dict(state)
    resumed.attach(opt2)
    sgd_steps(resumed_model, opt2, x, y, steps=3)
    assert resumed.num_steps == 6
    for k in straight.initial:
        torch.testing.assert_close(resumed.initial[k], straight.initial[k], rtol=0, atol=0)
    a, b = straight.history(), resumed.history()
    assert list(a["step"]) == list(b["step"])
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="tracks groups"):
        ConservationMonitor(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), every=1, recording="sync").load_state_dict(state)


def test_split_false_records_values_only():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = ConservationMonitor(model, split=False, every=1, recording="sync").attach(opt)
    sgd_steps(model, opt, *data(), steps=2)
    hist = mon.history()
    assert "0→2/first_order" not in hist and hist["0→2/values"].shape == (3, 6)
    assert mon.summary()[0]["max_rel_first_order"] is None


def test_track_broken_follows_a_gelu_pair_and_shows_the_breaking():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = ConservationMonitor(model, track_broken=True, every=1, recording="sync").attach(opt)
    assert mon.skipped == [] and not mon.groups[0].expected_conserved
    sgd_steps(model, opt, *data(), steps=3)
    (s,) = mon.summary()
    assert "GELU" in s["reason"] and s["max_rel_first_order"] > 1e-6


def test_linear_conv_block_keeps_its_matrix_law_through_pooling_and_flatten():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.AvgPool2d(2), nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)
    ).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = ConservationMonitor(model, every=1, recording="sync").attach(opt)
    assert [(g.name, g.kind, g.count) for g in mon.groups] == [("0→2", "matrix", 6), ("2→4", "matrix", 10)]
    x, y = torch.randn(8, 2, 8, 8, dtype=F64), torch.randn(8, 2, dtype=F64)
    sgd_steps(model, opt, x, y, steps=3)
    # channel mixing is a symmetry of these linear blocks: no first-order part under SGD
    assert max(s["max_rel_first_order"] for s in mon.summary()) <= 1e-12
    assert min(s["max_rel_second_order"] for s in mon.summary()) > 1e-10


@pytest.mark.parametrize("recording", ["sync", "snapshot", "live"])
def test_an_optimizer_subclass_calling_super_step_is_one_step(recording, one_torch_thread):
    """torch hooks both MySGD.step and SGD.step, so the hooks run twice per step."""
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # SGD.step is hooked from now on

    class MySGD(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    def run(optimizer_class):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        opt = optimizer_class(model.parameters(), lr=0.1)
        mon = ConservationMonitor(model, recording=recording, every=1).attach(opt)
        x, y = torch.randn(8, 3), torch.randn(8, 1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return mon

    plain, sub = run(torch.optim.SGD), run(MySGD)
    assert sub.num_steps == 3 and sub.history()["step"].tolist() == [0, 1, 2, 3]
    for key, value in plain.history().items():
        assert np.array_equal(value, sub.history()[key], equal_nan=True), key


def test_a_step_that_raises_does_not_stop_the_recording():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = ConservationMonitor(model, every=1, recording="sync").attach(opt)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def failing_closure():
        raise ValueError("data loader broke")

    with pytest.raises(ValueError, match="data loader broke"):
        opt.step(failing_closure)  # the pre-step hook ran, the post-step hook never will
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert mon.num_steps == 2 and mon.history()["step"].tolist() == [0, 1, 2]


def test_a_law_that_starts_at_zero_is_not_a_false_alarm():
    """The centering law of a Linear layer before a LayerNorm includes the sum of its bias; a
    zero-initialized bias makes that law's natural scale 0 at θ₀. Its drift under SGD is
    float32 rounding (~1e-7 here), and its relative drift must say so (it read ~2e4 when the
    scale was floored at 1e-12 × the group's largest)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2))
    nn.init.zeros_(model[0].bias)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = ConservationMonitor(model, x, every=1, recording="sync").attach(opt)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    centering = [r for r in mon.summary() if r["kind"] == "linear"]
    assert centering and all(r["expected_conserved"] for r in centering)
    for row in centering:
        assert row["max_abs_drift"] < 1e-5
        assert row["max_rel_drift"] < 1e-3, row


@pytest.mark.parametrize("split", [False, True])
def test_records_are_the_same_whether_read_every_step_or_once(split):
    """Without listeners the monitor folds each record at once and forms and stores the
    records in batches; a monitor with a listener delivers each one at its step. Histories,
    summaries and the records the listener saw are bitwise the same, read at any point."""
    histories, summaries, heard = [], [], []
    for reads_every_step in (False, True):
        model = mlp(seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = ConservationMonitor(model, every=1, split=split, recording="sync", max_records=100).attach(opt)
        if reads_every_step:
            mon.add_listener(lambda r: heard.append(r.step))
        x, y = data()
        for step in range(1, 41):
            sgd_steps(model, opt, x, y, steps=1)
            if step == 7:  # a read in the middle of a batch sees every record so far
                assert list(mon.history()["step"]) == list(range(8))
        histories.append(mon.history())
        summaries.append(mon.summary())
    assert heard == list(range(1, 41))
    assert histories[0].keys() == histories[1].keys()
    for key in histories[0]:
        np.testing.assert_array_equal(histories[0][key], histories[1][key], err_msg=key)
    assert summaries[0] == summaries[1]
