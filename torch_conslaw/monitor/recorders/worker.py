"""The worker of the snapshot and live recorders (:mod:`.snapshot`, :mod:`.live`).

The training thread only copies the tracked parameters, in their own dtype, into one buffer of
a small ring (a plain ``copy_``: no float64 conversion, no law evaluation) and enqueues the
step. One daemon worker thread evaluates the laws (and the first/second-order split between
two snapshots) with the monitor's evaluator (:class:`~..evaluator.LawTable`), in float64,
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
    >>> from torch_conslaw.monitor.evaluator import LawTable
    >>> from torch_conslaw.structure import find_structure
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> params = dict(model.named_parameters())
    >>> acc = Accountant(build_groups(find_structure(model).pairs))
    >>> out = []
    >>> rec = AsyncRecorder(params, acc.names, LawTable(acc), ring_size=2, deliver=lambda *r: out.append(r))
    >>> after = rec.snapshot()
    >>> rec.submit(1, None, after)
    >>> rec.release(after)
    >>> rec.drain()
    >>> out[0][0], out[0][1].shape, out[0][1].dtype
    (1, torch.Size([1, 4]), torch.float64)
    >>> rec.close()
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .cuda import SideStreams

__all__ = ["AsyncRecorder"]

Deliver = Callable[..., None]


@dataclass(slots=True, eq=False)
class _Job:
    """One evaluation for the worker, and its entry in the training thread's pending queue.

    ``after`` is a snapshot of the ring or, for live reading, the parameters themselves;
    ``before`` (split) likewise a snapshot or a live-reading buffer. ``capture``: copy
    ``after`` into these buffers once evaluated (live reading: θ before the next step).
    ``step`` is ``None`` for a capture without a record. Live reading also gives ``check``
    (raises if the model's structure changed), ``versions`` (the parameters' version
    counters: the read is repeated until they did not move while it ran) and ``read_done``,
    a lock held by the training thread and released when the job is over (also on error,
    then ``failed`` is set first). ``ring`` (snapshot indices) belongs to the training thread.
    """

    step: int | None
    before: Mapping[str, Tensor] | None
    after: Mapping[str, Tensor]
    event: Any = None  # CUDA event of the snapshot copy
    capture: Mapping[str, Tensor] | None = None
    read_done: threading.Lock | None = None
    check: Callable[[], None] | None = None
    versions: Callable[[], Any] | None = None
    failed: bool = False
    ring: tuple[int | None, int | None] = (None, None)


def _read(job: _Job, evaluator: Any) -> Tensor | None:
    """Evaluate the job's step (if any) and capture ``after`` (if asked)."""
    table = None
    if job.step is not None and job.before is not None:
        table = evaluator.split(job.before, job.after)
    elif job.step is not None:
        table = evaluator.values(job.after)
    if job.capture is not None:
        with torch.no_grad():
            for n, buf in job.capture.items():
                buf.copy_(job.after[n].detach())
    return table


def _worker(jobs: "queue.SimpleQueue[Any]", results: "queue.SimpleQueue[Any]", evaluator: Any) -> None:
    """The worker loop: evaluate each job, in order, until the ``None`` sentinel.

    Holds no reference to the monitor or the recorder, so both can be garbage collected.
    """
    torch.set_num_threads(1)  # this thread's own intra-op setting: do not fan out over cores
    streams = SideStreams()  # CUDA: evaluate on a side stream, after the snapshot's event
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            if job.check is not None:
                job.check()
            # CUDA: a side stream waits for the snapshot copy (device side); .cpu() below
            # blocks this worker only, on that stream
            with streams.after(job.event, job.after):
                if job.versions is None:
                    table = _read(job, evaluator)
                else:  # live parameters: read again if one was modified in place meanwhile
                    while True:
                        seen = job.versions()
                        table = _read(job, evaluator)
                        if job.versions() == seen:
                            break
                if table is not None:
                    table = table.cpu()
            results.put((job.step, table, None))
        except BaseException as exc:  # re-raised on the training thread
            job.failed = True
            results.put((job.step, None, exc))
        finally:
            if job.read_done is not None:
                # after the whole job: the worker is idle while the optimizer and the
                # training thread's hooks run (no contention for the interpreter lock there)
                job.read_done.release()


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
    is collected. ``deliver(step, table)`` is called by :meth:`collect` /
    :meth:`drain` for each finished job, in submission order.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        names: Sequence[str],
        evaluator: Any,
        ring_size: int,
        deliver: Deliver,
    ) -> None:
        if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < 2:
            raise ValueError(f"async_buffers must be an integer ≥ 2, got {ring_size!r}")
        self._params = params
        self._names = list(names)
        self._tensors = [params[n] for n in self._names]
        self._evaluator = evaluator
        self._deliver = deliver
        # allocated on first use: a worker that keeps up needs only 2 (values) or 3 (split)
        self._ring: list[dict[str, Tensor] | None] = [None] * ring_size
        self._refs = [0] * ring_size
        self._free = list(range(ring_size - 1, -1, -1))
        self._pending: deque[_Job] = deque()
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
        return tuple((t._version, t.data_ptr()) for t in self._tensors)

    def retain(self, i: int) -> None:
        self._refs[i] += 1

    def release(self, i: int | None) -> None:
        if i is None:
            return
        self._refs[i] -= 1
        if self._refs[i] == 0:
            self._free.append(i)

    # ------------------------------------------------------------------ jobs
    def _start(self) -> None:
        if not self._threads:
            thread = threading.Thread(
                target=_worker,
                args=(self._jobs, self._results, self._evaluator),
                name="torch_conslaw-monitor",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def submit(
        self,
        step: int,
        before: int | None,
        after: int,
    ) -> None:
        """Queue the evaluation of step ``step`` from ring snapshots (``before`` given: with
        the split)."""
        self._start()
        self.retain(after)
        if before is not None:
            self.retain(before)
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        job = _Job(step, None if before is None else self._ring[before], self._ring[after], event)
        job.ring = (before, after)
        self._pending.append(job)
        self._jobs.put(job)

    def submit_live(
        self,
        step: int | None,
        before: Mapping[str, Tensor] | None,
        capture: Mapping[str, Tensor] | None,
        read_done: threading.Lock,
        check: Callable[[], None],
    ) -> _Job:
        """Queue a job that reads the parameters themselves (live reading, CPU only): first
        ``check()``, then the record of ``step`` (``None``: no record), split against
        ``before`` when given, and a copy of the parameters into ``capture``, read again
        until :meth:`versions` did not change meanwhile. ``read_done``, acquired by the caller,
        is released once the job is over; until then the optimizer must not change the
        parameters."""
        if not self._threads:
            self._start()
        job = _Job(step, before, self._params, None, capture, read_done, check, self.versions)
        self._pending.append(job)
        self._jobs.put(job)
        return job

    def collect(self, block: bool = False, min_ready: int = 1) -> None:
        """Deliver finished jobs: every one ready now (``block=False``; nothing unless at
        least ``min_ready`` are) or the next one, waiting for it (``block=True``). Re-raises a
        worker exception."""
        if not block and min_ready > 1 and self._results.qsize() < min_ready:
            return
        while self._pending:
            try:
                item = self._results.get(block=block)
            except queue.Empty:
                return
            step, table, exc = item
            done = self._pending.popleft()
            self.release(done.ring[0])
            self.release(done.ring[1])
            if exc is not None:
                what = "a parameter capture" if step is None else f"step {step}"
                exc.add_note(f"(raised on the ConservationMonitor worker thread while evaluating {what})")
                raise exc
            if step is not None:
                self._deliver(step, table)
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
