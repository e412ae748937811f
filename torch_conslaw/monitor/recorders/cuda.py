"""CUDA side of the snapshot recorder: the worker evaluates on a side stream.

On CUDA the training thread only enqueues work: the snapshot copy runs on its current stream
and an event is recorded after it (:meth:`~torch_conslaw.monitor.recorders.worker.AsyncRecorder.submit`).
The worker thread makes a side stream wait for that event (a device-side wait, the host
does not block) and queues the law evaluation there, so it overlaps with the next training
kernels; only the worker blocks, on the small result vectors it copies to the host. The
training thread never synchronizes with the device, except for back-pressure when every
snapshot buffer is still in use.

Unmeasured so far: no session had a device when this was written (the tests that need one
skip without CUDA).

Example:
    >>> import contextlib
    >>> streams = SideStreams()
    >>> isinstance(streams.after(None, {}), contextlib.nullcontext)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["SideStreams"]


class SideStreams:
    """One side stream per CUDA device, created on first use by the worker thread."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}

    def after(self, event: Any, tensors: Mapping[str, Tensor]) -> contextlib.AbstractContextManager:
        """A context in which the worker's kernels run after ``event`` (the snapshot copy),
        on the side stream of the tensors' device; a no-op without an event (CPU)."""
        if event is None or not tensors:
            return contextlib.nullcontext()
        device = next(iter(tensors.values())).device
        if device.type != "cuda":
            return contextlib.nullcontext()
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        stream.wait_event(event)
        return torch.cuda.stream(stream)
