"""Which recorder reads θ: ``recording="auto" | "sync" | "snapshot" | "live"``.

* ``"sync"`` — the training thread evaluates the laws in its optimizer hooks;
* ``"snapshot"`` — the training thread copies θ (its own dtype) into a ring buffer, a worker
  thread evaluates (on CUDA: the copy and the evaluation are queued on streams, and the
  training thread never waits for the device);
* ``"live"`` — the worker reads θ itself during the next forward/backward pass (CPU, with
  :meth:`~torch_conslaw.ConservationMonitor.attach`).

``"auto"`` picks the cheapest one the setup allows: sharded (FSDP2) parameters → ``sync``
(their laws need a collective per record); CUDA parameters → ``snapshot``; CPU parameters
with a core left free by torch → ``live``; otherwise (every core used by torch's threads, so a
worker only competes with training) → ``sync``. The legacy ``asynchronous=`` argument maps
to the same names (``False`` → sync, ``True`` → snapshot, ``"live"``) with a
``DeprecationWarning``.

Example:
    >>> import torch
    >>> choose_recording("sync", [torch.zeros(2)], sharded=False)
    ('sync', 'asked for')
    >>> choose_recording("auto", [torch.zeros(2)], sharded=True)[0]
    'sync'
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["RECORDINGS", "choose_recording", "recording_from_legacy", "free_cores", "warn_without_a_free_core"]

RECORDINGS = ("auto", "sync", "snapshot", "live")


def free_cores() -> int:
    """Cores this process may use that torch's intra-op threads leave free."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(cores - torch.get_num_threads(), 0)


def recording_from_legacy(asynchronous: Any, stacklevel: int = 3) -> str:
    """The ``recording`` name of a legacy ``asynchronous=`` value, with a ``DeprecationWarning``."""
    legacy = {False: "sync", True: "snapshot", "snapshot": "snapshot", "live": "live"}
    if not (isinstance(asynchronous, (bool, str)) and asynchronous in legacy):
        raise ValueError(
            f"ConservationMonitor: asynchronous must be False, True (= 'snapshot') or 'live', got "
            f"{asynchronous!r}; better, use recording='auto' | 'sync' | 'snapshot' | 'live'"
        )
    name = legacy[asynchronous]
    warnings.warn(
        f"ConservationMonitor: asynchronous={asynchronous!r} is deprecated; use recording={name!r}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return name


def choose_recording(recording: str, tensors: Sequence[Tensor], *, sharded: bool) -> tuple[str, str]:
    """``(recorder, why)``: the recorder ``recording`` resolves to for these tracked tensors."""
    if recording not in RECORDINGS:
        raise ValueError(
            f"ConservationMonitor: recording must be one of {', '.join(map(repr, RECORDINGS))}, got {recording!r}"
        )
    if recording != "auto":
        return recording, "asked for"
    if sharded:
        return "sync", "sharded parameters: one collective per record on the training thread"
    if any(t.device.type == "cuda" for t in tensors):
        return "snapshot", "CUDA parameters: copy on the device, evaluate off the training thread"
    if any(t.device.type != "cpu" for t in tensors):
        return "sync", "parameters on a device without a stream-ordered snapshot path"
    if free_cores() >= 1:
        return "live", f"a free core ({torch.get_num_threads()} torch thread(s))"
    return "sync", f"torch uses every core ({torch.get_num_threads()} thread(s)): a worker would compete with training"


def warn_without_a_free_core(recording: str, tensors: Sequence[Tensor]) -> None:
    """A worker recorder needs a core that CPU training leaves free; say so when torch uses
    them all (the warning points at the caller's caller: the monitor's constructor)."""
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch.get_num_threads()
    if threads >= cores:
        warnings.warn(
            f"ConservationMonitor: recording={recording!r} evaluates the laws on a worker "
            f"thread, but torch already uses {threads} threads on {cores} core(s), so the worker "
            "competes with training and recording costs more than in the synchronous mode; call "
            f"torch.set_num_threads({max(cores - 1, 1)}) to leave it a core, or use "
            "recording='sync'",
            RuntimeWarning,
            stacklevel=3,
        )
