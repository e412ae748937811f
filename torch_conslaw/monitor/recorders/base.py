"""The Recorder protocol: where and when θ is read, and what a recorder is given.

A recorder owns every parameter snapshot (θ before a recorded step, θ at the last record)
and decides on which thread the laws are evaluated. The monitor calls it at fixed points:

* :meth:`Recorder.before_step` / :meth:`Recorder.after_step` from the optimizer's pre/post
  step hooks, :meth:`Recorder.manual_step` from :meth:`~torch_conslaw.ConservationMonitor.step`
  (both are given ``count()``, which counts the step and returns its number: a recorder
  first delivers what finished and checks the model, then counts);
* :meth:`Recorder.start` / :meth:`Recorder.stop` at ``attach`` / ``detach``,
  :meth:`Recorder.detached` whenever the monitor is (again) driven by hand, :meth:`Recorder.forget`
  after ``load_state_dict``;
* :meth:`Recorder.flush` before results are read.

Every recorder hands each evaluated record to ``deliver(step, table)`` on the training thread
(the evaluator's float64 table: ``[1, laws]``, or ``[3, laws]`` with the split), so records
are bitwise the same whichever one runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

__all__ = ["Recorder", "RecordingContext"]


@dataclass
class RecordingContext:
    """What every recorder is given by the monitor.

    ``params``: name → parameter (the live tensors); ``names``: the tracked ones;
    ``evaluator``: ``values(params)`` (``[1, laws]``) and ``split(before, after)``
    (``[3, laws]``) of the laws, float64 (:class:`~..evaluator.LawTable`);
    ``local``: the tensors this rank holds (sharded parameters) or ``None``; ``split``: record
    the first/second-order split; ``due(step)``: whether a step is recorded; ``guard()``:
    raises when the model's structure changed; ``deliver(step, table)``: hands a record to the
    monitor (on the training thread).
    """

    params: Mapping[str, Tensor]
    names: Sequence[str]
    evaluator: Any
    local: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None
    split: bool
    due: Callable[[int], bool]
    guard: Callable[[], None]
    deliver: Callable[[int, Tensor], None]


class Recorder(Protocol):
    """Where and when θ is read (see the module doc)."""

    name: str
    #: why :meth:`~torch_conslaw.ConservationMonitor.step` cannot drive it, or ``None``
    manual_step_error: str | None

    def start(self, next_step: int) -> None:
        """The optimizer hooks were installed; ``next_step`` is the next step's number."""

    def stop(self) -> None:
        """The optimizer hooks were removed: finish every pending record."""

    def detached(self) -> None:
        """The monitor is driven by hand from now on: keep θ now for the next split."""

    def forget(self, attached: bool) -> None:
        """The step counter moved (``load_state_dict``): θ kept for a split is stale."""

    def defer_to_closure(self) -> bool:
        """Whether the pre-step work must run after a step's closure (see :mod:`..hooks`)."""

    def before_step(self, step: int) -> None:
        """Optimizer step ``step`` is about to change θ."""

    def after_step(self, count: Callable[[], int], attached: bool) -> None:
        """An optimizer step has changed θ; ``count()`` counts it and returns its number."""

    def manual_step(self, count: Callable[[], int]) -> None:
        """A step was taken in a manual loop; ``count()`` counts it and returns its number."""

    def flush(self) -> None:
        """Wait for every pending record and deliver it."""

    def close(self) -> None:
        """Stop any worker thread."""
