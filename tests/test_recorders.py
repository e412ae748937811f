"""Recorder selection (``recording=``) and the overhead budget, through the public API.

Every recorder gives bitwise the records of the synchronous one (compared through
``history()``); ``"auto"`` picks by the setup; ``asynchronous=`` is a deprecated alias; the
budget schedule is driven by an injected clock, so its behaviour is deterministic here.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torch_conslaw as tc
from torch_conslaw import ConservationMonitor
from torch_conslaw.native import native_status
from monitor_defaults import every_step

RECORDERS = ["sync", "snapshot", "live"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 2))


def _train(monitor_kwargs: dict, steps: int = 12, clock=None, step_seconds: float = 1.0, record_seconds: float = 0.0):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    mon = ConservationMonitor(model, **every_step(monitor_kwargs)).attach(opt)
    if clock is not None:  # the fake cost of each record, spent inside the monitor's hook
        mon.add_listener(lambda record: clock.advance(record_seconds))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
        if clock is not None:
            clock.advance(step_seconds)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, mon


def _same_history(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


NATIVE = pytest.param(
    "native", marks=pytest.mark.skipif(not native_status()[0], reason="the native kernel did not build here")
)


@pytest.mark.parametrize("evaluation", ["auto", NATIVE])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("recording", RECORDERS)
def test_every_recorder_gives_the_synchronous_records_bitwise(recording, split, evaluation, one_torch_thread):
    m_sync, sync = _train({"recording": "sync", "split": split, "evaluation": evaluation})
    m_rec, rec = _train({"recording": recording, "split": split, "evaluation": evaluation})
    assert rec.recording == recording
    _same_history(sync.history(), rec.history())
    for p, q in zip(m_sync.parameters(), m_rec.parameters()):
        assert torch.equal(p, q)  # training unchanged
    rows = rec.summary()  # the law groups, then the identity groups of SGD with momentum
    assert len(rows) == len(rec.groups) + len(rec.identity_groups)
    assert [r["recorded_steps"] for r in rows] == [12] * len(rows)


@pytest.mark.parametrize("evaluation", ["auto", NATIVE])
@pytest.mark.parametrize("recording", RECORDERS)
@pytest.mark.parametrize("change", ["in place", "new storage", "none"])
def test_the_split_of_a_step_is_taken_against_theta_just_before_it(recording, evaluation, change, one_torch_thread):
    """θ after a recorded step serves as θ before the next one only while no parameter changed
    in between: a change made between two steps (in place under ``no_grad``, or a new tensor
    assigned to ``.data``) is not part of the next step's split. Checked against θ copied by
    hand right before each step: h(θ⁺) − h(θ) = first + second order, to float64 rounding."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = ConservationMonitor(model, recording=recording, evaluation=evaluation, every=1, split=True).attach(opt)
    g = torch.Generator().manual_seed(2)
    before = []
    for i in range(6):
        if i == 3 and change == "in place":
            with torch.no_grad():
                model[0].weight.mul_(0.5)
        elif i == 3 and change == "new storage":
            model[2].weight.data = model[2].weight.data * 2.0
        before.append({n: p.detach().to(torch.float64) for n, p in model.named_parameters()})
        opt.zero_grad()
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    history = mon.history()
    assert history["step"].tolist() == list(range(7))
    for group in mon.groups:
        for step in range(1, 7):
            h_before = group.values(before[step - 1]).numpy()
            values, first, second = (history[f"{group.name}/{k}"][step] for k in ("values", "first_order", "second_order"))
            scale = np.abs(values).max() + np.abs(h_before).max()
            assert np.allclose(values - h_before, first + second, rtol=0, atol=1e-13 * scale), (group.name, step)


def test_auto_picks_live_with_a_free_core_and_sync_without():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        assert ConservationMonitor(_mlp(), recording="auto", every=1).recording == "sync"
        if cores > 1:
            torch.set_num_threads(cores - 1)
            model = _mlp()
            mon = ConservationMonitor(model, recording="auto", every=1)
            assert mon.recording == "sync" and "free core" in mon.recording_reason
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            assert mon.attach(opt).recording == "live"  # live reading needs the optimizer hooks
            mon.detach()
            assert mon.recording == "sync"
            opt.step()
            mon.step()  # a manual loop works: synchronous
            assert mon.history()["step"].tolist() == [0, 1]
    finally:
        torch.set_num_threads(threads)


def test_auto_records_like_sync(one_torch_thread):
    _, sync = _train({"recording": "sync"})
    _, auto = _train({"recording": "auto"})
    _same_history(sync.history(), auto.history())


@pytest.mark.parametrize(("legacy", "name"), [(False, "sync"), (True, "snapshot"), ("live", "live")])
def test_asynchronous_is_a_deprecated_alias(legacy, name, one_torch_thread):
    with pytest.warns(DeprecationWarning, match=f"recording={name!r}"):
        mon = ConservationMonitor(_mlp(), asynchronous=legacy, every=1)
    assert mon.recording == name
    with pytest.raises(ValueError, match="not both"):
        ConservationMonitor(_mlp(), asynchronous=legacy, recording="auto", every=1)


def test_a_bad_recording_is_refused():
    with pytest.raises(ValueError, match="recording must be one of 'auto', 'sync'"):
        ConservationMonitor(_mlp(), recording="fast", every=1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("recording", ["sync", "snapshot"])
def test_the_budget_spaces_records_by_cost_over_step_time(recording, one_torch_thread):
    """A record costs 0.2 s, a step 1 s, the budget is 5 %: one record every 4 steps after
    the two measuring ones; each recorded step keeps its exact split."""
    clock = FakeClock()
    budget = tc.OverheadBudget(0.05, clock=clock)
    _, mon = _train({"overhead_budget": budget, "recording": recording}, steps=30, clock=clock, record_seconds=0.2)
    h = mon.history()
    steps = h["step"].tolist()
    if recording == "sync":
        assert steps == [0, 1, 2, 6, 10, 14, 18, 22, 26, 30]
    else:  # the listener runs when the worker's record is collected, a step or two later
        assert steps[:3] == [0, 1, 2] and len(steps) <= 14
    assert mon.summary()[0]["recorded_steps"] == len(steps) - 1
    assert mon.summary()[0]["last_recorded_step"] == steps[-1]
    for g in mon.groups:
        first, second = h[f"{g.name}/first_order"][1:], h[f"{g.name}/second_order"][1:]
        assert np.isfinite(first).all() and np.isfinite(second).all()
    # the split of each recorded step is that step's change alone: compare with every=1
    _, full = _train({"every": 1, "recording": "sync"}, steps=30)
    f = full.history()
    rows = [f["step"].tolist().index(s) for s in steps]
    for g in mon.groups:
        for key in ("values", "first_order", "second_order"):
            assert h[f"{g.name}/{key}"].tobytes() == f[f"{g.name}/{key}"][rows].tobytes()


def test_a_cheap_record_is_taken_at_every_step():
    clock = FakeClock()
    _, mon = _train({"overhead_budget": tc.OverheadBudget(0.05, clock=clock)}, steps=10, clock=clock, record_seconds=0.01)
    assert mon.history()["step"].tolist() == list(range(11))


def test_the_interval_is_capped_and_every_wins_when_asked_for():
    clock = FakeClock()
    budget = tc.OverheadBudget(0.01, max_every=3, clock=clock)
    _, mon = _train({"overhead_budget": budget}, steps=12, clock=clock, record_seconds=5.0)
    assert mon.history()["step"].tolist() == [0, 1, 2, 5, 8, 11]
    with pytest.raises(ValueError, match="not both"):
        ConservationMonitor(_mlp(), every=1, overhead_budget=0.03, recording="sync")
    _, every = _train({"every": 1})
    assert every.history()["step"].tolist() == list(range(13))
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
        tc.OverheadBudget(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_snapshot_recording_on_cuda_gives_the_synchronous_records():
    def run(recording):
        torch.manual_seed(0)
        model = _mlp().cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = ConservationMonitor(model, recording=recording, every=1).attach(opt)
        x, y = torch.randn(16, 6, device="cuda"), torch.randn(16, 2, device="cuda")
        for _ in range(8):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return mon

    auto = run("auto")
    assert auto.recording == "snapshot"
    _same_history(run("sync").history(), auto.history())


def test_the_monitor_is_bounded_by_default():
    """No schedule given: the default overhead budget decides, with recording='auto'; every=1
    records every step."""
    default = ConservationMonitor(_mlp())
    assert isinstance(default.schedule, tc.OverheadBudget)
    assert default.schedule.fraction == tc.DEFAULT_OVERHEAD_BUDGET == 0.03
    assert "OverheadBudget" in default.summary()[0]["schedule"]
    assert default.recording in ("sync", "snapshot", "live") and default.recording_reason
    _, every = _train({"every": 1})
    assert every.history()["step"].tolist() == list(range(13))
    assert not isinstance(every.schedule, tc.OverheadBudget)


@pytest.mark.parametrize("slower_after_record, gap", [(0.0, 2), (0.4, 10)])
def test_the_budget_charges_what_a_record_costs_the_next_step(slower_after_record, gap):
    """A record's hooks take 0.1 s and a step 1 s (budget 5 %: a record every 2 steps); when
    the step after a record is also 0.4 s slower (caches refilled), that counts as the record's
    cost and records come about 10 steps apart."""
    t = [0.0]
    budget = tc.OverheadBudget(0.05, clock=lambda: t[0])
    recorded: list[int] = []
    for step in range(1, 120):
        t[0] += 1.0 + (slower_after_record if recorded and recorded[-1] == step - 1 else 0.0)
        budget.step_ended(step)
        if budget.due(step):
            recorded.append(step)
            with budget.timing():
                t[0] += 0.1
    gaps = np.diff(recorded[-5:])
    assert set(gaps.tolist()) == {gap}
