"""The snapshot recorder (``recording="snapshot"``): the training thread copies θ, a worker
thread evaluates.

At a recorded step the training thread only copies the tracked parameters, in their own
dtype, into one buffer of the worker's ring (:mod:`.worker`); the worker evaluates the laws
and the split from these snapshots with the same float64 code, so the records are bitwise
those of the synchronous recorder. With the split, the snapshot after step t serves as θ before
step t + 1 unless a parameter was modified in between (its version counter or storage
changed; then a fresh snapshot is taken before the step). When every buffer is in flight the
training thread waits for the worker (back-pressure; nothing is dropped).

Example:
    >>> import warnings
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw import ConservationMonitor
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with warnings.catch_warnings():  # on a machine without a free core it says so
    ...     warnings.simplefilter("ignore")
    ...     monitor = ConservationMonitor(model, recording="snapshot", async_buffers=2, every=1).attach(opt)
    >>> for _ in range(3):
    ...     model(torch.randn(2, 3)).sum().backward()
    ...     opt.step()
    >>> [int(s) for s in monitor.history()["step"]]  # history() waits for the worker
    [0, 1, 2, 3]
    >>> monitor.detach()
"""

from __future__ import annotations

from collections.abc import Callable

from .base import RecordingContext
from .worker import AsyncRecorder

__all__ = ["SnapshotRecorder"]


class SnapshotRecorder:
    """Copies θ into a ring of snapshots evaluated by a worker thread (see the module doc)."""

    name = "snapshot"
    manual_step_error = None

    def __init__(self, ctx: RecordingContext, worker: AsyncRecorder) -> None:
        self._ctx = ctx
        self._rec = worker
        self._before: int | None = None  # snapshot of θ before the step being taken
        self._last: int | None = None  # snapshot of θ at the last record (manual loops)
        self._reuse: tuple[int, tuple[tuple[int, int], ...]] | None = None  # θ after the last step

    def start(self, next_step: int) -> None:
        self._drop_last()

    def stop(self) -> None:
        self._release_before()
        reuse, self._reuse = self._reuse, None
        if reuse is not None:
            self._rec.release(reuse[0])
        self._rec.drain()
        self.detached()

    def detached(self) -> None:
        if self._ctx.split:
            self._drop_last()
            self._last = self._rec.snapshot()

    def forget(self, attached: bool) -> None:
        self._release_before()
        if not attached:
            self.detached()

    def defer_to_closure(self) -> bool:
        return False

    def before_step(self, step: int) -> None:
        rec = self._rec
        rec.collect()
        self._ctx.guard()
        reuse, self._reuse = self._reuse, None
        if self._ctx.split and self._ctx.due(step):
            self._release_before()
            if reuse is not None and reuse[1] == rec.versions():
                self._before = reuse[0]  # θ after the last step, unchanged since
                return
            rec.release(reuse[0] if reuse is not None else None)
            self._before = rec.snapshot()
        elif reuse is not None:
            rec.release(reuse[0])

    def after_step(self, count: Callable[[], int], attached: bool) -> None:
        rec, ctx = self._rec, self._ctx
        rec.collect()
        step = count()
        if not ctx.due(step):
            return
        before, self._before = self._before, None
        if before is None:
            before = self._last
            if before is not None:
                rec.retain(before)
        after = rec.snapshot()
        rec.submit(step, before, after)
        rec.release(before)
        if ctx.split and attached and ctx.due(step + 1):
            old, self._reuse = self._reuse, (after, rec.versions())
            if old is not None:
                rec.release(old[0])
        else:
            rec.release(after)

    def manual_step(self, count: Callable[[], int]) -> None:
        rec, ctx = self._rec, self._ctx
        rec.collect()
        ctx.guard()
        step = count()
        if ctx.due(step):
            after = rec.snapshot()
            rec.submit(step, self._last, after)
            if ctx.split:
                self._drop_last()
                self._last = after
            else:
                rec.release(after)

    def flush(self) -> None:
        self._rec.drain()

    def close(self) -> None:
        self._rec.close()

    def _release_before(self) -> None:
        before, self._before = self._before, None
        self._rec.release(before)

    def _drop_last(self) -> None:
        last, self._last = self._last, None
        self._rec.release(last)
