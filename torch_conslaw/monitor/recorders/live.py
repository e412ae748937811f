"""Live reading for :class:`~torch_conslaw.ConservationMonitor` (``recording="live"``).

θ does not change between two optimizer steps, so the worker thread can read the parameters
themselves while the next forward and backward passes run: the training thread copies
nothing. The read of a recorded step starts at the next forward pass after the step (a
forward pre-hook on the model; once a step passes without it, e.g. because the training code
calls submodules directly, on every tracked layer as well), so edits made between
``optimizer.step()`` and the next forward pass belong to that record. It must end before the
optimizer changes θ again, so the optimizer's pre-step hook waits for it
(:meth:`LiveReader.before_step`). A read that no forward pass started (the model was not
called between two steps) starts there, and the training thread waits for all of it.

For the first/second-order split the worker keeps θ before the next recorded step in one of
two buffers of its own (the parameters' dtype), written after the evaluation that needed the
other one: a recorded change is always split between two states the worker read itself.

The worker first checks that no tracked layer or parameter was replaced (the error is raised
on the training thread by the next pre-step hook), and it reads again whenever a parameter's
version counter moved while it read (an in-place edit through the parameter itself:
``torch.no_grad()`` edits, ``load_state_dict``), until a read ran undisturbed; the pre-step
hook only waits. In-place edits through ``.data`` after the forward pass has started cannot
be seen (``.data`` has its own version counter): do not edit parameters through ``.data`` in
the middle of a training step with this mode, or use ``recording="snapshot"``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw import ConservationMonitor
    >>> threads = torch.get_num_threads()
    >>> torch.set_num_threads(max(threads - 1, 1))  # leave the worker a core
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> monitor = ConservationMonitor(model, recording="live", every=1).attach(opt)
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     nn.functional.mse_loss(model(x), y).backward()
    ...     opt.step()
    >>> [int(s) for s in monitor.history()["step"]]
    [0, 1, 2, 3]
    >>> torch.set_num_threads(threads)
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import RecordingContext
from .worker import AsyncRecorder, _Job

__all__ = ["LiveReader", "LiveRecorder"]

# finished records reach the history and the listeners in batches of this many (one pass
# over warm code instead of one cold pass per training step)
_DELIVERY_BATCH = 16


class _InertHook:
    """What a copied or pickled model keeps of a read trigger: a hook that does nothing."""

    def __call__(self, module: nn.Module, args: Any) -> None:
        return None


class _ReadTrigger:
    """Forward pre-hook of a tracked layer: starts the read that is due, if any."""

    __slots__ = ("_reader",)

    def __init__(self, reader: "LiveReader") -> None:
        self._reader = weakref.ref(reader)

    def __call__(self, module: nn.Module, args: Any) -> None:
        reader = self._reader()
        if reader is not None and reader.due:
            reader.trigger()

    def __reduce__(self) -> tuple[type, tuple]:
        # ``copy.deepcopy(model)`` (an EMA copy) or ``torch.save(model)`` keep a harmless hook
        return (_InertHook, ())


class LiveReader:
    """Schedules the worker's reads of the live parameters (see the module doc).

    Called from the training thread only: :meth:`after_step` by the optimizer's post-step
    hook, :meth:`before_step` by its pre-step hook, :meth:`settle` before results are read.
    ``check()`` raises when the model's structure changed.
    """

    def __init__(
        self,
        recorder: AsyncRecorder,
        params: Mapping[str, Tensor],
        names: Sequence[str],
        root: nn.Module,
        modules: Sequence[nn.Module],
        check: Callable[[], None],
    ) -> None:
        self._rec = recorder
        self._params = params
        self._names = list(names)
        # held from the submission of a job until the worker has finished it
        self._busy = threading.Lock()
        self._root = root
        self._modules = list({id(m): m for m in modules if m is not root}.values())
        self._on_layers = False  # hooks on the tracked layers too (see the module doc)
        self._check = check
        self._buffers: list[dict[str, Tensor] | None] = [None, None]
        self._prev: tuple[int, int] | None = None  # (buffer, s): the buffer holds θ before step s
        self._due: tuple[int | None, int | None] | None = None  # (step to record, step to capture for)
        self._job: _Job | None = None  # in flight
        self._hooks: list[Any] = []

    @property
    def due(self) -> bool:
        """Whether a read waits for the next forward pass."""
        return self._due is not None

    # ------------------------------------------------------------------ hooks
    def start(self, capture_for: int | None) -> None:
        """Install the forward pre-hook; ``capture_for``: keep θ before that step (split)."""
        self._hooks = [self._root.register_forward_pre_hook(_ReadTrigger(self))]
        if self._on_layers:
            self._hook_layers()
        self._schedule(None, capture_for)

    def _hook_layers(self) -> None:
        self._on_layers = True
        trigger = _ReadTrigger(self)
        self._hooks += [m.register_forward_pre_hook(trigger) for m in self._modules]

    def stop(self) -> None:
        """Remove the forward pre-hooks (start any due read first)."""
        self.settle()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ optimizer steps
    def after_step(self, record: int | None, capture_for: int | None) -> None:
        """Step ``record`` (or ``None``) is to be recorded and/or θ kept as the state before
        step ``capture_for``: both are read at the next forward pass."""
        if self._due is not None:  # only when step(closure) never evaluated its closure
            missed = self._due[0]
            warnings.warn(
                "ConservationMonitor(recording='live'): optimizer.step(closure) changed the "
                "parameters without evaluating its closure, so θ after the previous step was "
                f"never read{'' if missed is None else f' and the record of step {missed} is missing'}; "
                "use recording='snapshot' with this optimizer",
                RuntimeWarning,
                stacklevel=4,
            )
        self._schedule(record, capture_for)

    def before_step(self, step: int, need_before: bool) -> None:
        """The optimizer is about to change θ: every read must be over. ``need_before``:
        step ``step`` is recorded with the split, so θ now must be kept if it is not yet."""
        if self._due is not None:
            if self._hooks and not self._on_layers:
                self._hook_layers()  # no forward pass of the model started this step's read
            self.trigger()
        self.wait_in_flight()
        if need_before and (self._prev is None or self._prev[1] != step):
            self._schedule(None, step)  # e.g. after load_state_dict moved the step counter
            self.trigger()
            self.wait_in_flight()

    def settle(self) -> None:
        """Start any due read and wait for every job (nothing runs concurrently now)."""
        self.trigger()
        self.wait_in_flight()
        self._rec.drain()

    # ------------------------------------------------------------------ reads
    def _schedule(self, record: int | None, capture_for: int | None) -> None:
        self._due = None if record is None and capture_for is None else (record, capture_for)

    def trigger(self) -> None:
        """Submit the due read to the worker (the training thread's hot path: kept lean)."""
        due, self._due = self._due, None
        if due is None:
            return
        record, capture_for = due
        prev = self._prev
        before = None
        if prev is not None and prev[1] == record:
            before = self._buffer(prev[0])
        capture = None
        if capture_for is not None:
            i = 0 if prev is None else 1 - prev[0]  # never the buffer being split against
            capture = self._buffer(i)
            self._prev = (i, capture_for)
        self._busy.acquire()  # free: the previous job was waited for
        self._job = self._rec.submit_live(
            record,
            before,
            capture,
            self._busy,
            self._check,
        )

    def wait_in_flight(self) -> None:
        """Wait for the job already submitted, if any (without starting a due read); re-raise
        its error here (e.g. a replaced layer)."""
        job, self._job = self._job, None
        if job is None:
            return
        self._busy.acquire()
        self._busy.release()
        if job.failed:
            self._rec.drain()  # delivers what came before, then raises the worker's exception

    def _buffer(self, i: int) -> dict[str, Tensor]:
        bufs = self._buffers[i]
        if bufs is None:
            bufs = self._buffers[i] = {
                n: torch.empty_like(self._params[n], memory_format=torch.contiguous_format).detach()
                for n in self._names
            }
        return bufs


class LiveRecorder:
    """``recording="live"``: the worker reads θ during the next forward pass (see the module
    doc); the :class:`LiveReader` schedules the reads around the optimizer's hooks."""

    name = "live"
    manual_step_error = (
        "ConservationMonitor.step: recording='live' reads the parameters during the "
        "next forward pass and needs the optimizer's pre-step hook to know when the read "
        "must end; call attach(optimizer), or build the monitor with recording='snapshot' "
        "for a manual loop"
    )

    def __init__(self, ctx: RecordingContext, worker: AsyncRecorder, root: nn.Module, modules: Sequence[nn.Module]) -> None:
        devices = sorted({str(ctx.params[n].device) for n in ctx.names if ctx.params[n].device.type != "cpu"})
        if devices:
            raise ValueError(
                f"ConservationMonitor: recording='live' reads CPU parameters during the "
                f"forward pass; the tracked parameters live on {', '.join(devices)}. Use "
                "recording='snapshot' (or 'auto') there"
            )
        self._ctx = ctx
        self._rec = worker
        self._reader = LiveReader(worker, ctx.params, ctx.names, root, modules, ctx.guard)

    def _capture_for(self, step: int) -> int | None:
        """``step`` if θ before it must be kept for its split."""
        return step if self._ctx.split and self._ctx.due(step) else None

    def start(self, next_step: int) -> None:
        self._reader.start(self._capture_for(next_step))

    def stop(self) -> None:
        self._reader.stop()

    def detached(self) -> None:
        return None  # the reads need the optimizer's hooks: nothing to keep by hand

    def forget(self, attached: bool) -> None:
        return None  # the pre-step hook reads θ again when the step counter moved

    def defer_to_closure(self) -> bool:
        self._reader.wait_in_flight()  # a read a forward pass before step() started
        return True

    def before_step(self, step: int) -> None:
        self._rec.collect(min_ready=_DELIVERY_BATCH)
        # the structure check runs on the worker, with each read
        self._reader.before_step(step, self._capture_for(step) is not None)

    def after_step(self, count: Callable[[], int], attached: bool) -> None:
        step = count()
        self._reader.after_step(step if self._ctx.due(step) else None, self._capture_for(step + 1))

    def manual_step(self, count: Callable[[], int]) -> None:
        raise RuntimeError(self.manual_step_error)

    def flush(self) -> None:
        self._reader.settle()

    def close(self) -> None:
        self._rec.close()
