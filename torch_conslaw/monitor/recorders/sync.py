"""The synchronous recorder (``recording="sync"``): the training thread reads θ and evaluates
the laws in the optimizer's hooks.

With the split, θ before a recorded step is copied in its own dtype (exact; the evaluator
converts chunk by chunk) into buffers reused from step to step; in a manual loop the split of
a recorded change is taken against θ at the previous record.

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

    def start(self, next_step: int) -> None:
        self._last = None

    def stop(self) -> None:
        self._before = None
        self.detached()

    def detached(self) -> None:
        if self._ctx.split:
            self._last = self._snapshot()

    def forget(self, attached: bool) -> None:
        self._before = None
        if not attached:
            self.detached()

    def defer_to_closure(self) -> bool:
        return False

    def before_step(self, step: int) -> None:
        self._ctx.guard()
        if self._ctx.split and self._ctx.due(step):
            self._before = self._snapshot(self._spare)

    def after_step(self, count: Callable[[], int], attached: bool) -> None:
        step = count()
        if self._ctx.due(step):
            before, self._before = self._before, None
            self._record(step, before if before is not None else self._last)
            if before is not None:
                self._spare = before

    def manual_step(self, count: Callable[[], int]) -> None:
        self._ctx.guard()
        step = count()
        if self._ctx.due(step):
            self._record(step, self._last)
            if self._ctx.split:
                self._last = self._snapshot(self._last)

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

    def _record(self, step: int, before: dict[str, Tensor] | None) -> None:
        ctx = self._ctx
        if ctx.split and before is not None:
            table = ctx.evaluator.split(before, ctx.params)
        else:
            table = ctx.evaluator.values(ctx.params)
        ctx.deliver(step, table.cpu())  # a small table; the history lives on the CPU
