"""The synchronous recorder (``recording="sync"``): the training thread reads θ and evaluates
the laws in the optimizer's hooks.

With the split, θ before a recorded step is copied in its own dtype (exact; the evaluator
converts chunk by chunk) into buffers reused from step to step. When the next step is
recorded too, the evaluation of a split leaves θ⁺ in those buffers (the native kernel writes
each chunk while it is in cache), and they serve as θ before the next step unless a parameter
was modified in between (its version counter or storage changed; then θ is copied before the
step, as the snapshot recorder does). In a manual loop the split of a recorded change is
taken against θ at the previous record.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw import ConservationMonitor
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> monitor = ConservationMonitor(model, recording="sync").attach(opt)
    >>> model(torch.randn(2, 3)).sum().backward()
    >>> opt.step()
    >>> [int(s) for s in monitor.history()["step"]]
    [0, 1]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .base import RecordingContext

__all__ = ["SyncRecorder"]


class SyncRecorder:
    """Reads θ and evaluates the laws on the training thread (see the module doc)."""

    name = "sync"
    manual_step_error = None

    def __init__(self, ctx: RecordingContext) -> None:
        self._ctx = ctx
        self._before: dict[str, Tensor] | None = None  # θ before the step being taken
        self._spare: dict[str, Tensor] | None = None  # reused buffers for the pre-step snapshot
        self._last: dict[str, Tensor] | None = None  # θ at the last record (manual loops)
        # θ after the last step, left by its split, and the parameters' versions then
        self._reuse: tuple[dict[str, Tensor], list[tuple[int, int]]] | None = None

    def start(self, next_step: int) -> None:
        self._last = None

    def stop(self) -> None:
        self._before = self._reuse = None
        self.detached()

    def detached(self) -> None:
        if self._ctx.split:
            self._last = self._snapshot()

    def forget(self, attached: bool) -> None:
        self._before = self._reuse = None
        if not attached:
            self.detached()

    def defer_to_closure(self) -> bool:
        return False

    def before_step(self, step: int) -> None:
        due = self._ctx.due(step)
        if due:  # the model is checked before every step that reads it
            self._ctx.guard()
        reuse, self._reuse = self._reuse, None
        if self._ctx.split and due:
            if reuse is not None and reuse[1] == self._versions():
                self._before = reuse[0]  # θ after the last step, unchanged since
            else:
                self._before = self._snapshot(reuse[0] if reuse is not None else self._spare)
        elif reuse is not None:
            self._spare = reuse[0]

    def after_step(self, count: Callable[[], int], attached: bool) -> None:
        step = count()
        ctx = self._ctx
        if ctx.due(step):
            before, self._before = self._before, None
            if before is not None and attached and ctx.local is None and ctx.due(step + 1):
                self._record(step, before, advance=True)  # before now holds θ⁺
                self._reuse = (before, self._versions())
                return
            self._record(step, before if before is not None else self._last)
            if before is not None:
                self._spare = before

    def manual_step(self, count: Callable[[], int]) -> None:
        self._ctx.guard()
        step = count()
        if self._ctx.due(step):
            last = self._last
            if self._ctx.split and last is not None and self._ctx.local is None:
                self._record(step, last, advance=True)  # last now holds θ at this record
                return
            self._record(step, last)
            if self._ctx.split:
                self._last = self._snapshot(last)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _snapshot(self, into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Copy of the tracked parameters (this rank's shards) in their own dtype, reusing the
        tensors of ``into`` when given."""
        ctx = self._ctx
        params = ctx.params if ctx.local is None else ctx.local(ctx.params)
        with torch.no_grad():
            if into is None:
                into = {
                    n: torch.empty(p.shape, dtype=p.dtype, device=p.device)
                    for n, p in ((n, params[n]) for n in ctx.names)
                }
            for n in ctx.names:
                into[n].copy_(params[n].detach())
            return into

    def _versions(self) -> list[tuple[int, int]]:
        """The tracked parameters' version counters and storages (any in-place change or new
        storage changes them)."""
        params = self._ctx.params
        return [(params[n]._version, params[n].data_ptr()) for n in self._ctx.names]

    def _record(self, step: int, before: dict[str, Tensor] | None, advance: bool = False) -> None:
        ctx = self._ctx
        if ctx.split and before is not None:
            table = ctx.evaluator.split(before, ctx.params, advance=True) if advance else ctx.evaluator.split(before, ctx.params)
        else:
            table = ctx.evaluator.values(ctx.params)
        ctx.deliver(step, table if table.is_cpu else table.cpu())  # the history lives on the CPU
