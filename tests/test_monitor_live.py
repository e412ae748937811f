"""ConservationMonitor(recording="live"): the worker reads the live parameters during the
next forward/backward pass; the optimizer waits for it. Behaviour that differs from the
snapshot recorder (edits between steps, re-reads, hooks, refusals) is tested here; what both
worker recorders share is in test_monitor_async.py. Through the public API only (history(),
summary(), listeners, ``monitor.evaluator``, torch's hook and function-mode APIs)."""

from __future__ import annotations

import copy
import os
import io
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from torch_conslaw import ConservationMonitor
from torch_conslaw.accounting import Accountant

from test_monitor_async import _assert_same_monitors, _mlp, _same, _same_parameters, _train
from monitor_defaults import every_step

# the asynchronous modes want a free core for their worker (otherwise they warn)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _loop(model, opt, steps, *, before_step=None, after_step=None, forwards=1, x=None, y=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g) if x is None else x
    y = torch.randn(16, 3, generator=g) if y is None else y
    for i in range(steps):
        opt.zero_grad()
        for _ in range(forwards):
            nn.functional.mse_loss(model(x), y).backward()
        if before_step is not None:
            before_step(model, i)
        opt.step()
        if after_step is not None:
            after_step(model, i)


def _fresh(split=True, opt="adam", **kw):
    torch.manual_seed(0)
    model = _mlp()
    optimizer = (
        torch.optim.Adam(model.parameters(), lr=1e-2) if opt == "adam" else torch.optim.SGD(model.parameters(), lr=0.05)
    )
    mon = ConservationMonitor(model, split=split, **every_step(kw)).attach(optimizer)
    return model, optimizer, mon


class _ParameterCopies(TorchFunctionMode):
    """Counts, on the thread that enters it (torch function modes are per thread), the
    ``Tensor.copy_`` calls whose source shares storage with one of ``params``."""

    def __init__(self, params) -> None:
        super().__init__()
        self._storages = {p.untyped_storage().data_ptr() for p in params}
        self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        source = args[1] if func is torch.Tensor.copy_ and len(args) > 1 else None
        if isinstance(source, torch.Tensor) and source.untyped_storage().data_ptr() in self._storages:
            self.copies += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recording", ["sync", "snapshot", "live"])
def test_the_training_thread_copies_nothing(recording):
    """Live reading takes no snapshot on the training thread; the other recorders do (so the
    probe sees copies when there are some)."""
    model, opt, mon = _fresh(recording=recording)
    with _ParameterCopies(list(model.parameters())) as probe:
        _loop(model, opt, 6)
    assert [int(s) for s in mon.history()["step"]] == list(range(7))
    assert (probe.copies == 0) == (recording == "live")


def _forward_pre_hook_counter(layer: nn.Module):
    """A function that says how many forward pre-hooks were registered on ``layer`` (through
    ``register_forward_pre_hook``) from now on."""
    registered = []
    register = layer.register_forward_pre_hook

    def counting(*args, **kwargs):
        registered.append(args)
        return register(*args, **kwargs)

    layer.register_forward_pre_hook = counting
    return lambda: len(registered)


def _hold_evaluations(monkeypatch, mon, before_each):
    """Wrap ``mon.evaluator`` (the documented hook): ``before_each(k)`` runs first in the k-th
    evaluation; returns the list of the threads that evaluated."""
    threads: list[int] = []
    values, split = mon.evaluator.values, mon.evaluator.split

    def enter():
        threads.append(threading.get_ident())
        before_each(len(threads))

    def held_values(params):
        enter()
        return values(params)

    def held_split(before, after):
        enter()
        return split(before, after)

    monkeypatch.setattr(mon.evaluator, "values", held_values)
    monkeypatch.setattr(mon.evaluator, "split", held_split)
    return threads


@pytest.mark.parametrize("split", [False, True])
def test_the_optimizer_waits_for_a_slow_read(monkeypatch, split):
    """Each read is held until the training thread has reached the optimizer's pre-step hook
    of the next step (registered before the monitor's): if that hook did not wait for the read,
    Adam would change θ while the worker reads."""
    _, sync = _train("mlp", "adam", steps=6, split=split)
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    reached = [threading.Event() for _ in range(8)]
    calls = [0]

    def pre(optimizer, args, kwargs):
        calls[0] += 1
        reached[calls[0]].set()

    opt.register_step_pre_hook(pre)
    mon = ConservationMonitor(model, split=split, recording="live", every=1).attach(opt)
    # read k (of step k) starts at the forward pass after step k; hold it until step k + 1
    threads = _hold_evaluations(monkeypatch, mon, lambda k: k < 6 and reached[k + 1].wait(60))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    _loop(model, opt, 6, x=x, y=y)
    _assert_same_monitors(sync, mon)
    assert len(threads) == 6 and threading.get_ident() not in threads


def test_an_edit_between_step_and_forward_belongs_to_that_record():
    model, opt, mon = _fresh(opt="sgd", recording="live")
    reference = Accountant(mon.groups)
    expected = {}

    def edit(model, i):
        if i % 3 == 1:
            with torch.no_grad():
                model[3].weight.mul_(1.5)
        expected[i + 1] = reference.values({n: p.detach().clone() for n, p in model.named_parameters()})

    _loop(model, opt, 9, after_step=edit)
    hist = mon.history()
    for row, step in enumerate(hist["step"][1:], start=1):
        for g in mon.groups:
            assert _same(torch.from_numpy(hist[f"{g.name}/values"][row]), expected[int(step)][g.name])
    # every change between consecutive records is exactly first + second order (the edit
    # included): the split is taken against the state read for the previous record
    for g in mon.groups:
        v, f, s = (hist[f"{g.name}/{k}"] for k in ("values", "first_order", "second_order"))
        scale = abs(v).max()
        assert abs((v[1:] - v[:-1]) - (f[1:] + s[1:])).max() <= 1e-12 * scale
        edited = abs(f[2]).max() / scale  # the record of step 2 holds the edit: first order
        assert edited > 1e-3  # not rounding: scaling a layer breaks the law at first order


def test_an_in_place_edit_during_the_read_is_read_again(monkeypatch):
    """A no_grad edit while the worker reads moves the version counter: the worker reads again
    and the record holds the edited parameters, not a mix."""
    model, opt, mon = _fresh(split=False, opt="sgd", recording="live")
    acc = mon.evaluator
    values = acc.values
    reads: list[int] = []
    started, edited = threading.Event(), threading.Event()
    edited.set()  # only the read of step 3 waits for the edit

    def slow_values(params):
        result = values(params)
        reads.append(1)
        started.set()
        edited.wait(5)  # the training thread edits now, before this read ends
        return result

    monkeypatch.setattr(acc, "values", slow_values)
    reference = Accountant(mon.groups)
    expected = {}

    def edit_during_read(model, i):
        if i == 3:  # the read of step 3 runs now (started by this step's forward pass)
            assert started.wait(5)
            with torch.no_grad():
                model[0].weight.mul_(2.0)
            edited.set()
        expected[i] = reference.values({n: p.detach().clone() for n, p in model.named_parameters()})

    def arm_the_gate(model, i):
        if i == 2:  # the read of step 2 is over (the optimizer waited for it)
            started.clear()
            edited.clear()

    _loop(model, opt, 6, before_step=edit_during_read, after_step=arm_the_gate)
    hist = mon.history()
    for g in mon.groups:
        assert _same(torch.from_numpy(hist[f"{g.name}/values"][3]), expected[3][g.name])
    assert len(reads) >= 6 + 1  # one extra read for step 3


def test_a_replaced_layer_raises_at_the_next_step():
    model, opt, mon = _fresh(recording="live")
    _loop(model, opt, 2)
    model[3] = nn.Linear(12, 10)
    with pytest.raises(RuntimeError, match=r"parameter 3\.(weight|bias) was replaced"):
        _loop(model, opt, 2)


class _Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 12), nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_a_loop_that_calls_submodules_directly_still_reads_during_the_forward_pass():
    layer_hooks = {}

    def run(recording):
        torch.manual_seed(0)
        model = _Stacked()
        layer_hooks[recording] = _forward_pre_hook_counter(model.fc2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        mon = ConservationMonitor(model, recording=recording, every=1).attach(opt)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        for _ in range(8):
            opt.zero_grad()
            out = model.fc3(torch.relu(model.fc2(torch.relu(model.fc1(x)))))  # not model(x)
            nn.functional.mse_loss(out, y).backward()
            opt.step()
        return mon

    sync, live = run("sync"), run("live")
    _assert_same_monitors(sync, live)
    assert layer_hooks["live"]() == 1  # the first step found no forward of the model: layer hooks


def test_steps_without_a_forward_pass_in_between_are_read_by_the_optimizer_hook():
    def run(recording):
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        mon = ConservationMonitor(model, recording=recording, every=1).attach(opt)
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for _ in range(4):  # momentum keeps moving θ with the same gradient
            opt.step()
        return mon

    _assert_same_monitors(run("sync"), run("live"))


def test_gradient_accumulation_reads_once_per_step(monkeypatch):
    plain_model, plain_opt = _mlp(), None
    torch.manual_seed(0)
    plain_model = _mlp()
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-2)
    sync = ConservationMonitor(plain_model, every=1, recording="sync").attach(plain_opt)
    _loop(plain_model, plain_opt, 5, forwards=3)
    model, opt, mon = _fresh(recording="live")
    threads = _hold_evaluations(monkeypatch, mon, lambda k: None)
    _loop(model, opt, 5, forwards=3)
    _assert_same_monitors(sync, mon)
    assert _same_parameters(plain_model, model)
    assert len(threads) == 5  # one evaluation per step, not one per forward pass


def test_non_finite_parameters_are_reported_on_the_training_thread():
    def poison(model, i):
        if i == 4:  # after step 5: live reading reads it into the record of step 5
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, mon = _train("mlp", "sgd", steps=8, between=poison, recording="live")
        mon.flush()
    messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert messages and "step 5" in messages[0]  # later steps spread the NaN to other laws
    assert mon.summary()[0]["invalid"] > 0
    plain, _ = _train("mlp", "sgd", steps=8, between=poison, monitor=False)
    assert _same_parameters(plain, model)  # training unaffected (NaN included)


def test_hooks_are_removed_on_detach_and_inert_in_copies():
    model, opt, mon = _fresh(recording="live")
    assert len(model._forward_pre_hooks) == 1
    twin = copy.deepcopy(model)  # e.g. an EMA copy made while training
    (trigger,), (copied,) = model._forward_pre_hooks.values(), twin._forward_pre_hooks.values()
    assert type(copied) is not type(trigger)  # the copy keeps an inert hook, not the read trigger
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 6)
    for m in (model, twin, loaded):
        m.eval()  # no dropout
    assert torch.equal(loaded(x), model(x)) and torch.equal(twin(x), model(x))
    model.train()
    _loop(model, opt, 3)
    mon.detach()
    assert len(model._forward_pre_hooks) == 0
    assert [int(s) for s in mon.history()["step"]] == [0, 1, 2, 3]


def test_attach_detach_cycles_give_the_same_records():
    def run(recording):
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = ConservationMonitor(model, recording=recording, every=2)
        for cycle in range(3):
            mon.attach(opt)
            _loop(model, opt, 3)
            mon.detach()
            if cycle == 1:
                _loop(model, opt, 1)  # a step the monitor does not see
        return mon

    _assert_same_monitors(run("sync"), run("live"))


def test_a_manual_loop_is_refused_with_a_clear_error():
    mon = ConservationMonitor(_mlp(), recording="live", every=1)
    with pytest.raises(RuntimeError, match=r"recording='live'.*attach\(optimizer\).*recording='snapshot'"):
        mon.step()


@pytest.mark.parametrize("bad", ["yes", 1])
def test_a_bad_asynchronous_value_is_refused(bad):
    with pytest.raises(ValueError, match="asynchronous must be False, True .* or 'live'"):
        ConservationMonitor(_mlp(), asynchronous=bad, every=1)


@pytest.mark.parametrize("as_keyword", [False, True])
def test_a_closure_step_reads_during_its_forward_pass(as_keyword):
    """step(closure) runs forward and backward inside step(), after the pre-step hook: the
    monitor waits for the read after the closure (Lightning's automatic optimization)."""

    layer_hooks = {}

    def run(recording):
        torch.manual_seed(0)
        model = _Stacked()
        layer_hooks[recording] = _forward_pre_hook_counter(model.fc2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        mon = ConservationMonitor(model, recording=recording, every=1).attach(opt)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        losses = []

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(6):
            losses.append(opt.step(closure=closure) if as_keyword else opt.step(closure))
        return model, mon, losses

    m_sync, sync, l_sync = run("sync")
    m_live, live, l_live = run("live")
    _assert_same_monitors(sync, live)
    assert _same_parameters(m_sync, m_live) and all(torch.equal(a, b) for a, b in zip(l_sync, l_live))
    assert layer_hooks["live"]() == 0  # every read started at the model's forward pass


def test_lbfgs_which_moves_theta_between_closure_calls_gives_the_synchronous_records():
    def run(recording):
        torch.manual_seed(0)
        model = _mlp().eval()  # no dropout: L-BFGS needs a deterministic closure
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
        mon = ConservationMonitor(model, recording=recording, every=1).attach(opt)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        return model, mon

    m_sync, sync = run("sync")
    m_live, live = run("live")
    _assert_same_monitors(sync, live)
    assert _same_parameters(m_sync, m_live)


@pytest.mark.parametrize("mode", ["snapshot", "live"])
def test_a_missing_free_core_is_reported(mode):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        with pytest.warns(RuntimeWarning, match=r"torch\.set_num_threads\(.*recording='sync'"):
            ConservationMonitor(_mlp(), recording=mode, every=1)
        if cores > 1:
            torch.set_num_threads(cores - 1)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ConservationMonitor(_mlp(), recording=mode, every=1)
    finally:
        torch.set_num_threads(threads)


def test_a_closure_the_optimizer_never_evaluates_is_reported_not_silently_dropped():
    class IgnoresClosure(torch.optim.Optimizer):
        """Plain SGD that takes a closure and never evaluates it."""

        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])

    torch.manual_seed(0)
    model = _mlp()
    opt = IgnoresClosure(model.parameters(), lr=0.05)
    mon = ConservationMonitor(model, recording="live", every=1).attach(opt)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step(lambda: None)  # the forward pass above started the read of θ before step 1
    with pytest.warns(RuntimeWarning, match="record of step 1 is missing"):
        opt.step(lambda: None)  # no forward pass since step 1, and the closure is ignored
    assert 1 not in mon.history()["step"].tolist()
