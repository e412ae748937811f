"""Recorders: where and when θ is read (``recording="auto" | "sync" | "snapshot" | "live"``).

* :class:`~.sync.SyncRecorder` — the training thread evaluates in the optimizer's hooks;
* :class:`~.snapshot.SnapshotRecorder` — the training thread copies θ, a worker evaluates
  (on CUDA on a side stream, :mod:`.cuda`);
* :class:`~.live.LiveRecorder` — the worker reads θ itself during the next forward pass.

All follow :class:`~.base.Recorder`; :func:`make_recorder` builds one, :func:`choose_recording`
(:mod:`.choice`) resolves ``"auto"``.

Example:
    >>> import torch
    >>> from torch_conslaw.accounting import Accountant
    >>> from torch_conslaw.monitor.evaluator import LawTable
    >>> params = {"w": torch.ones(2, 2)}
    >>> ctx = RecordingContext(params, ["w"], LawTable(Accountant([])), None, True, lambda s: True,
    ...                        lambda: None, lambda step, table: None)
    >>> make_recorder("sync", ctx).name
    'sync'
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import Recorder, RecordingContext
from .choice import RECORDINGS, choose_recording, free_cores, recording_from_legacy, warn_without_a_free_core
from .live import LiveRecorder
from .snapshot import SnapshotRecorder
from .sync import SyncRecorder
from .worker import AsyncRecorder

__all__ = [
    "RECORDINGS", "Recorder", "RecordingContext", "LiveRecorder", "SnapshotRecorder", "SyncRecorder",
    "choose_recording", "free_cores", "make_recorder", "recording_from_legacy", "warn_without_a_free_core",
]


def make_recorder(
    name: str,
    ctx: RecordingContext,
    *,
    buffers: int = 4,
    root: nn.Module | None = None,
    modules: Sequence[nn.Module] = (),
) -> Recorder:
    """The recorder ``name`` (``"sync"``, ``"snapshot"`` or ``"live"``): ``buffers`` snapshot
    buffers for the worker; ``root`` (the model) and ``modules`` (the tracked layers) are the
    forward passes live reading starts its reads at."""
    if name == "sync":
        return SyncRecorder(ctx)
    worker = AsyncRecorder(ctx.params, ctx.names, ctx.evaluator, buffers, ctx.deliver)
    if name == "snapshot":
        return SnapshotRecorder(ctx, worker)
    assert name == "live" and root is not None
    return LiveRecorder(ctx, worker, root, modules)
