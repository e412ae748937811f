"""Asynchronous recording for :class:`~torch_conslaw.ConservationMonitor` (``asynchronous=True``).

The training thread only copies the tracked parameters, in their own dtype, into one buffer of
a small ring (a plain ``copy_``: no float64 conversion, no law evaluation) and enqueues the
step. One daemon worker thread evaluates the laws (and the first/second-order split between
two snapshots) with the monitor's :class:`~torch_conslaw.accounting.Accountant`, in float64,
exactly as the synchronous path does; the float32 → float64 conversion is exact, so the
records are bitwise those of the synchronous mode.

Finished evaluations wait in a queue until the training thread collects them
(:meth:`AsyncRecorder.collect`): record store, running maxima, warnings and listeners only ever
run on the training thread. Buffers are reference counted, on the training thread only; when
every buffer is in use, :meth:`AsyncRecorder.snapshot` waits for the worker (back-pressure):
memory stays bounded and no record is dropped. An exception raised on the worker is re-raised
on the training thread by the next :meth:`AsyncRecorder.collect`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw.accounting import Accountant
    >>> from torch_conslaw.lawgroups import build_groups
    >>> from torch_conslaw.structure import find_structure
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> params = dict(model.named_parameters())
    >>> acc = Accountant(build_groups(find_structure(model).pairs))
    >>> out = []
    >>> rec = AsyncRecorder(params, acc.names, acc, ring_size=2, deliver=lambda *r: out.append(r))
    >>> after = rec.snapshot()
    >>> rec.submit(1, None, after)
    >>> rec.release(after)
    >>> rec.drain()
    >>> out[0][0], out[0][1]["0→2"].dtype, out[0][2] is None
    (1, torch.float64, True)
    >>> rec.close()
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .accounting import Accountant

__all__ = ["AsyncRecorder"]

Deliver = Callable[..., None]


def _worker(jobs: "queue.SimpleQueue[Any]", results: "queue.SimpleQueue[Any]", accountant: Accountant) -> None:
    """The worker loop: evaluate each job, in order, until the ``None`` sentinel.

    Holds no reference to the monitor or the recorder, so both can be garbage collected.
    """
    torch.set_num_threads(1)  # this thread's own intra-op setting: do not fan out over cores
    while True:
        job = jobs.get()
        if job is None:
            return
        step, before, after, event, post = job
        try:
            if event is not None:
                event.wait()  # the snapshot copy issued on the training thread's stream
            if before is not None:
                values, first, second = accountant.split(before, after)
            else:
                values, first, second = accountant.values(after), None, None
            values = {k: v.cpu() for k, v in values.items()}
            if first is not None and second is not None:
                first = {k: v.cpu() for k, v in first.items()}
                second = {k: v.cpu() for k, v in second.items()}
            extra = post(values, first, second) if post is not None else None
            results.put((step, values, first, second, extra, None))
        except BaseException as exc:  # re-raised on the training thread
            results.put((step, None, None, None, None, exc))


def _stop(jobs: "queue.SimpleQueue[Any]", threads: list[threading.Thread]) -> None:
    """Stop the worker and wait for it (also at interpreter exit: a worker thread must not be
    inside torch while the process tears down)."""
    if threads:
        jobs.put(None)
        thread = threads.pop()
        if thread is not threading.current_thread():
            thread.join()


class AsyncRecorder:
    """A ring of ``ring_size`` parameter snapshots and one worker thread (see the module doc).

    Every method is called from the training thread. Snapshots are named by their index in
    the ring; :meth:`snapshot` returns one with one reference, :meth:`retain` /
    :meth:`release` count references, :meth:`submit` holds its snapshots until the result
    is collected. ``deliver(step, values, first, second, extra)`` is called by :meth:`collect` /
    :meth:`drain` for each finished job, in submission order.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        names: Sequence[str],
        accountant: Accountant,
        ring_size: int,
        deliver: Deliver,
    ) -> None:
        if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < 2:
            raise ValueError(f"async_buffers must be an integer ≥ 2, got {ring_size!r}")
        self._params = params
        self._names = list(names)
        self._accountant = accountant
        self._deliver = deliver
        # allocated on first use: a worker that keeps up needs only 2 (values) or 3 (split)
        self._ring: list[dict[str, Tensor] | None] = [None] * ring_size
        self._refs = [0] * ring_size
        self._free = list(range(ring_size - 1, -1, -1))
        self._pending: deque[tuple[int, int | None, int]] = deque()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []  # the live worker, shared with the finalizer
        self._cuda = any(params[n].device.type == "cuda" for n in self._names)
        self._finalizer = weakref.finalize(self, _stop, self._jobs, self._threads)

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> int:
        """Copy the tracked parameters into a free buffer (waiting for the worker when none is
        free); returns its index, holding one reference."""
        while not self._free:
            if not self._pending:
                raise RuntimeError("AsyncRecorder: every snapshot buffer is held and no job is pending")
            self.collect(block=True)
        i = self._free.pop()
        with torch.no_grad():
            bufs = self._ring[i]
            if bufs is None:
                bufs = self._ring[i] = {n: torch.empty_like(self._params[n].detach()) for n in self._names}
            for n, buf in bufs.items():
                buf.copy_(self._params[n].detach())
        self._refs[i] = 1
        return i

    def versions(self) -> tuple[tuple[int, int], ...]:
        """(version counter, data pointer) of every tracked parameter: changes when a parameter
        is modified in place through itself (optimizer, ``torch.no_grad()`` edits,
        ``load_state_dict``) or its ``.data`` is replaced. In-place edits through ``.data``
        do not show (``.data`` has its own version counter)."""
        return tuple((self._params[n]._version, self._params[n].data_ptr()) for n in self._names)

    def retain(self, i: int) -> None:
        self._refs[i] += 1

    def release(self, i: int | None) -> None:
        if i is None:
            return
        self._refs[i] -= 1
        if self._refs[i] == 0:
            self._free.append(i)

    # ------------------------------------------------------------------ jobs
    def submit(
        self,
        step: int,
        before: int | None,
        after: int,
        post: Callable[..., Any] | None = None,
    ) -> None:
        """Queue the evaluation of step ``step`` (``before`` given: with the split);
        ``post(values, first, second)``, if given, also runs on the worker and its result is
        passed to ``deliver`` as a fifth argument."""
        if not self._threads:
            thread = threading.Thread(
                target=_worker,
                args=(self._jobs, self._results, self._accountant),
                name="torch_conslaw-monitor",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        self.retain(after)
        if before is not None:
            self.retain(before)
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((step, before, after))
        self._jobs.put(
            (step, None if before is None else self._ring[before], self._ring[after], event, post)
        )

    def collect(self, block: bool = False) -> None:
        """Deliver finished jobs: every one ready now (``block=False``) or the next one,
        waiting for it (``block=True``). Re-raises a worker exception."""
        while self._pending:
            try:
                item = self._results.get(block=block)
            except queue.Empty:
                return
            step, values, first, second, extra, exc = item
            _, before, after = self._pending.popleft()
            self.release(before)
            self.release(after)
            if exc is not None:
                exc.add_note(
                    f"(raised on the ConservationMonitor worker thread while evaluating step {step})"
                )
                raise exc
            self._deliver(step, values, first, second, extra)
            if block:
                return

    def drain(self) -> None:
        """Wait for every submitted job and deliver it."""
        while self._pending:
            self.collect(block=True)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Stop the worker and wait for it (pending jobs are finished first, their results
        are dropped); a later :meth:`submit` starts a new one."""
        _stop(self._jobs, self._threads)
