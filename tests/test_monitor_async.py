"""ConservationMonitor(recording="snapshot" / "live"): the same records as the synchronous
recorder, bitwise, with the law evaluation on a worker thread and everything user-visible on
the training thread. Tests that hold for both worker recorders are parametrized over
``MODES``; the snapshot ring (back-pressure, manual loops) and live reading have tests of their
own (see also test_monitor_live.py). Everything goes through the public API: ``history()``,
``summary()``, ``state_dict()``, listeners, and ``monitor.evaluator`` (wrapped to observe or hold
evaluations, with events, never sleeps)."""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from torch_conslaw import ConservationMonitor
from torch_conslaw.monitor import Record
from monitor_defaults import every_step


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.1), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3),
    )


MODES = ["snapshot", "live"]  # snapshot ring, live reading

# the asynchronous modes want a free core for their worker (otherwise they warn)
pytestmark = pytest.mark.usefixtures("one_torch_thread")
_INPUT = {"mlp": (16, 6), "cnn": (8, 2, 8, 8)}
_MODELS = {"mlp": _mlp, "cnn": _cnn}
_OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}


def _train(kind="mlp", opt="sgd", steps=12, monitor=True, between=None, **kw):
    """Train from a fixed seed; returns (model, monitor or None)."""
    torch.manual_seed(0)
    model = _MODELS[kind]()
    optimizer = _OPTIMIZERS[opt](model.parameters())
    mon = ConservationMonitor(model, **every_step(kw)).attach(optimizer) if monitor else None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*_INPUT[kind], generator=g)
    y = torch.randn(_INPUT[kind][0], 3, generator=g)
    for i in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if between is not None:
            between(model, i)
    return model, mon


def _same(a, b) -> bool:
    """Bitwise equality of nested results (tensors, arrays, floats with NaN, records)."""
    if isinstance(a, Record):
        return isinstance(b, Record) and _same(a.as_dict(), b.as_dict())
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            and a.numpy().tobytes() == b.numpy().tobytes()
        )
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or np.float64(a).tobytes() == np.float64(b).tobytes()
    return a == b


def _assert_same_monitors(sync: ConservationMonitor, asyn: ConservationMonitor) -> None:
    assert sync.num_steps == asyn.num_steps
    assert _same(sync.history(), asyn.history())
    assert _same(sync.summary(), asyn.summary())
    assert _same(sync.state_dict(), asyn.state_dict())  # every stored record, the maxima, θ₀
    assert sync.table() == asyn.table()


def _same_parameters(m1: nn.Module, m2: nn.Module) -> bool:
    return all(_same(p.detach(), q.detach()) for p, q in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_records_equal_the_synchronous_mode_bitwise(kind, opt, split, mode):
    plain, _ = _train(kind, opt, monitor=False)
    m_sync, sync = _train(kind, opt, split=split)
    m_async, asyn = _train(kind, opt, split=split, recording=mode)
    _assert_same_monitors(sync, asyn)
    assert asyn.num_steps == 12 and asyn.history()["step"][-1] == 12
    assert _same_parameters(plain, m_sync) and _same_parameters(plain, m_async)  # training unchanged
    if split and opt == "sgd":
        assert all(s["max_rel_first_order"] < 1e-6 for s in asyn.summary())  # float32 rounding


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("schedule", [{"every": 3}, {"log_spaced": True}])
@pytest.mark.parametrize("split", [False, True])
def test_schedules_give_the_same_records(schedule, split, mode):
    _, sync = _train("mlp", "adam", steps=25, split=split, **schedule)
    _, asyn = _train("mlp", "adam", steps=25, split=split, recording=mode, **schedule)
    _assert_same_monitors(sync, asyn)
    steps = list(asyn.history()["step"])
    assert steps == list(sync.history()["step"]) and len(steps) > 3


@pytest.mark.parametrize("mode", MODES)
def test_bounded_history_gives_the_same_records_and_maxima(mode):
    _, sync = _train("cnn", "adam", steps=30, max_records=4)
    _, asyn = _train("cnn", "adam", steps=30, max_records=4, recording=mode)
    _assert_same_monitors(sync, asyn)


@pytest.mark.parametrize("mode", MODES)
def test_listeners_run_on_the_training_thread(mode):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = ConservationMonitor(model, recording=mode, every=1).attach(opt)
    seen: list[tuple[int, int]] = []
    mon.add_listener(lambda r: seen.append((r.step, threading.get_ident())))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    mon.summary()  # drains
    assert [s for s, _ in seen] == list(range(1, 11))
    assert {t for _, t in seen} == {threading.get_ident()}
    assert any(t.name == "torch_conslaw-monitor" for t in threading.enumerate())


def _observe_evaluations(monkeypatch, mon: ConservationMonitor, before_each=None) -> list[int]:
    """Wrap ``mon.evaluator`` (the documented hook): returns the list of thread ids that ran
    each evaluation; ``before_each(k)`` runs first in the k-th evaluation (k = 1, 2, ...)."""
    threads: list[int] = []
    values, split = mon.evaluator.values, mon.evaluator.split

    def enter():
        threads.append(threading.get_ident())
        if before_each is not None:
            before_each(len(threads))

    def observed_values(params):
        enter()
        return values(params)

    def observed_split(before, after):
        enter()
        return split(before, after)

    monkeypatch.setattr(mon.evaluator, "values", observed_values)
    monkeypatch.setattr(mon.evaluator, "split", observed_split)
    return threads


class _StepGates:
    """Events set by an optimizer post-step hook (register it before attaching the monitor, so
    that it runs before the monitor's): ``entered(s)``
    is set once the training thread has finished step s and entered its post-step hooks
    (where the monitor takes the snapshot, or waits for a free buffer); ``returned`` counts the
    ``optimizer.step()`` calls that returned."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        self._entered = [threading.Event() for _ in range(steps + 2)]
        self.returned = 0
        self._step = 0
        optimizer.register_step_post_hook(self._post)

    def _post(self, optimizer, args, kwargs) -> None:
        self._step += 1
        self._entered[self._step].set()

    def entered(self, step: int) -> threading.Event:
        return self._entered[step]


def _train_with_back_pressure(monkeypatch, model, opt, mon, steps, ring, x, y):
    """Attach ``mon`` and train ``steps`` steps while the worker holds the k-th evaluation until
    the training thread has entered the post-step hook of step k + ring, where a full ring makes
    it wait for that evaluation. Returns, per evaluation, how many steps had returned when it ran."""
    gates = _StepGates(opt, steps)
    mon.attach(opt)
    returned_at: list[int] = []

    def hold(k):
        if k + ring <= steps:
            assert gates.entered(k + ring).wait(60), "the training thread never reached the full ring"
        returned_at.append(gates.returned)

    threads = _observe_evaluations(monkeypatch, mon, hold)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        gates.returned += 1
    mon.flush()
    assert threads and threading.get_ident() not in threads
    return returned_at


def test_back_pressure_with_a_tiny_ring_drops_nothing(monkeypatch):
    """Values only: each record holds one snapshot until the worker has evaluated it. With a
    ring of 2 the training thread enters the post-step hook of step k + 2 and waits there for
    evaluation k: exactly k + 1 steps have returned when evaluation k runs, never more."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = ConservationMonitor(model, split=False, recording="snapshot", async_buffers=2, every=1)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    returned_at = _train_with_back_pressure(monkeypatch, model, opt, mon, 15, 2, x, y)
    assert returned_at[:13] == [k + 1 for k in range(1, 14)]  # the training thread waited
    assert list(mon.history()["step"]) == list(range(16))  # every step recorded, in order


def test_back_pressure_with_the_split_drops_nothing_and_equals_the_synchronous_records(monkeypatch):
    """With the split a record holds two snapshots (before, after) of a ring of 2, so the
    training thread waits in the post-step hook of step k + 1 for evaluation k: exactly k steps
    have returned when evaluation k runs, and the records are the synchronous ones."""
    _, sync = _train("cnn", "adam", steps=10)
    torch.manual_seed(0)
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = ConservationMonitor(model, recording="snapshot", async_buffers=2, every=1)
    gates = _StepGates(opt, 10)
    mon.attach(opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(*_INPUT["cnn"], generator=g), torch.randn(8, 3, generator=g)
    returned_at: list[int] = []

    def hold(k):
        if k < 10:
            assert gates.entered(k + 1).wait(60)  # the next step is done: the ring is full now
        returned_at.append(gates.returned)

    _observe_evaluations(monkeypatch, mon, hold)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        gates.returned += 1
    assert returned_at[:9] == list(range(1, 10))  # the training thread waited for each one
    _assert_same_monitors(sync, mon)


def test_non_finite_warning_is_emitted_on_the_training_thread(monkeypatch):
    def poison(model, i):
        if i == 4:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")

    with warnings.catch_warnings(record=True) as caught_sync:
        warnings.simplefilter("always")
        m_sync, sync = _train("mlp", "sgd", steps=8, between=poison)
    threads: list[int] = []
    warn = warnings.warn

    def recording_warn(message, *args, **kwargs):
        if "non-finite" in str(message):
            threads.append(threading.get_ident())
        return warn(message, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", recording_warn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m_async, asyn = _train("mlp", "sgd", steps=8, between=poison, recording="snapshot")
        asyn.flush()
    messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert messages and messages == [str(w.message) for w in caught_sync if "non-finite" in str(w.message)]
    assert "step 6" in messages[0]  # poisoned after step 5
    assert threads and set(threads) == {threading.get_ident()}
    _assert_same_monitors(sync, asyn)
    assert asyn.summary()[0]["invalid"] > 0
    assert _same_parameters(m_sync, m_async)


@pytest.mark.parametrize("mode", MODES)
def test_worker_exception_surfaces_on_the_training_thread(monkeypatch, mode):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = ConservationMonitor(model, split=False, recording=mode, every=1).attach(opt)

    def boom(params):
        raise ValueError("boom in the worker")

    monkeypatch.setattr(mon.evaluator, "values", boom)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    with pytest.raises(ValueError, match="boom in the worker") as info:
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        mon.flush()
    assert any("worker thread" in note for note in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_after_async_training_equals_the_synchronous_one(mode):
    _, sync = _train("cnn", "adam", steps=9, every=2)
    _, asyn = _train("cnn", "adam", steps=9, every=2, recording=mode)
    assert _same(sync.state_dict(), asyn.state_dict())
    # and resuming an asynchronous monitor from it continues identically
    torch.manual_seed(0)
    fresh = ConservationMonitor(_cnn(), recording=mode, every=1)
    fresh.load_state_dict(asyn.state_dict())
    assert _same(fresh.state_dict(), sync.state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_detach_drains_the_worker(monkeypatch, mode):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = ConservationMonitor(model, recording=mode, every=1).attach(opt)
    seen = []
    mon.add_listener(lambda r: seen.append(r.step))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    # records reach the listeners at a later hook: step 4's is pending (snapshot: submitted
    # after the hook's delivery; live: its read waits for the next forward pass)
    assert 4 not in seen
    mon.detach()
    assert seen == [1, 2, 3, 4]
    assert mon.summary()[0]["last_recorded_step"] == 4


def test_parameters_edited_between_steps_take_a_fresh_before_snapshot():
    def edit(model, i):
        if i % 3 == 1:
            with torch.no_grad():
                model[3].weight.mul_(1.5)

    _, sync = _train("mlp", "sgd", steps=10, between=edit)
    _, asyn = _train("mlp", "sgd", steps=10, between=edit, recording="snapshot")
    _assert_same_monitors(sync, asyn)
    # the edit is not a step: under SGD the first-order part stays at rounding level
    assert all(s["max_rel_first_order"] < 1e-6 for s in asyn.summary())  # float32 rounding


@pytest.mark.parametrize("split", [False, True])
def test_manual_step_loop_gives_the_same_records(split):
    def run(recording):
        torch.manual_seed(0)
        model = _cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        mon = ConservationMonitor(model, split=split, every=2, recording=recording)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(*_INPUT["cnn"], generator=g), torch.randn(8, 3, generator=g)
        for _ in range(9):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            mon.step()
        return mon

    _assert_same_monitors(run("sync"), run("snapshot"))


def test_attach_detach_cycles_give_the_same_records():
    def run(recording):
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = ConservationMonitor(model, recording=recording, every=1)
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        for cycle in range(3):
            if cycle != 1:
                mon.attach(opt)
            for _ in range(4):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                if cycle == 1:
                    mon.step()
            if cycle != 1:
                mon.detach()
        return mon

    _assert_same_monitors(run("sync"), run("snapshot"))


def test_bad_ring_size_is_rejected():
    with pytest.raises(ValueError, match="async_buffers"):
        ConservationMonitor(_mlp(), recording="snapshot", async_buffers=1, every=1)


def test_synchronous_mode_starts_no_thread():
    before = {t.ident for t in threading.enumerate()}
    _, mon = _train("mlp", "sgd", steps=3)
    assert mon.recording == "sync"
    assert not any(t.name == "torch_conslaw-monitor" and t.ident not in before for t in threading.enumerate())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_low_and_double_precision_parameters_give_the_same_records(dtype, mode):
    def run(recording):
        torch.manual_seed(0)
        model = _mlp().to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = ConservationMonitor(model, recording=recording, every=1).attach(opt)
        x, y = torch.randn(16, 6, dtype=dtype), torch.randn(16, 3, dtype=dtype)
        for _ in range(6):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return mon

    _assert_same_monitors(run("sync"), run(mode))


@pytest.mark.parametrize("mode", MODES)
def test_skipped_optimizer_steps_keep_the_before_snapshot_valid(mode):
    """As under a GradScaler that skips a step: no hooks run, the parameters do not change."""

    def run(recording):
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        mon = ConservationMonitor(model, recording=recording, every=1).attach(opt)
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        for i in range(12):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if i % 4 != 2:
                opt.step()
        return mon

    sync, asyn = run("sync"), run(mode)
    _assert_same_monitors(sync, asyn)
    assert asyn.num_steps == 9
