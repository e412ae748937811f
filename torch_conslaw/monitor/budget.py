"""Overhead budget → recording schedule: record as often as a fraction of the step time allows.

The monitor times its own work on the training thread (its optimizer hooks, including any
wait for a worker) and the whole training step, both with one clock. After each recorded
step, the next one is ``k`` steps later, with ``k`` the smallest interval that keeps the
monitor's time under ``fraction`` of the plain step time::

    k = ceil(cost of one record / (fraction × plain step time)),   1 ≤ k ≤ max_every

where the cost of one record is the monitor's time over the last recording cycle (all hooks
between two records) plus what the record costs the training step after it (its caches were
refilled with θ and the law tables: the step after a record takes longer than the other steps
of the cycle; the excess over their median is charged to the record), and the plain step time
is the step time without the monitor's hooks. Both are medians over the last few cycles, so
one slow step (a garbage collection, a checkpoint) does not change the schedule. The first two steps are always recorded (they measure). Every recorded
step keeps the exact split: θ before a recorded step is known to be needed before the step.

The clock is injectable, so the schedule is deterministic in tests.

Example:
    >>> t = [0.0]
    >>> budget = OverheadBudget(0.05, clock=lambda: t[0])
    >>> recorded = []
    >>> for step in range(1, 200):
    ...     t[0] += 1.0                      # the training step: 1 s
    ...     budget.step_ended(step)           # start of the post-step hook
    ...     if budget.due(step):
    ...         recorded.append(step)
    ...         with budget.timing():
    ...             t[0] += 0.5              # a record costs 0.5 s
    >>> recorded[:4], recorded[4] - recorded[3]  # 0.5 / (0.05 × 1) = 10 steps apart
    ([1, 2, 12, 22], 10)
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["OverheadBudget"]

_WINDOW = 5  # cycles in the medians


class OverheadBudget:
    """A recording schedule that keeps the monitor's measured time ≤ ``fraction`` of the
    training step time (see the module doc).

    Args:
        fraction: the overhead allowed, e.g. ``0.03`` for 3 % (in (0, 1]).
        max_every: the longest interval between two records (steps).
        clock: a monotonic clock in seconds (``time.perf_counter``; inject one in tests).
    """

    def __init__(self, fraction: float = 0.03, *, max_every: int = 1000, clock: Callable[[], float] = time.perf_counter) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"OverheadBudget: fraction must be a number in (0, 1], e.g. 0.03, got {fraction!r}")
        if isinstance(max_every, bool) or not isinstance(max_every, int) or max_every < 1:
            raise ValueError(f"OverheadBudget: max_every must be a positive integer, got {max_every!r}")
        self.fraction = float(fraction)
        self.max_every = max_every
        self.clock = clock
        self.interval = 1  # the current k
        self._current = 0  # the recorded step whose post hook runs now
        self._next = 1  # the next step to record
        self._last_end: float | None = None  # clock at the previous step_ended
        self._spent = 0.0  # monitor time since the last step_ended
        self._cycle_monitor = 0.0  # monitor time over the current recording cycle
        self._cycle_plains: list[float] = []  # plain training time of each step of the cycle
        self._costs: deque[float] = deque(maxlen=_WINDOW)
        self._plain: deque[float] = deque(maxlen=_WINDOW)

    # ------------------------------------------------------------------ measurements
    @contextmanager
    def timing(self) -> Iterator[None]:
        """Count the time of the enclosed monitor work (a hook body) as overhead."""
        t0 = self.clock()
        try:
            yield
        finally:
            self._spent += self.clock() - t0

    def step_ended(self, step: int) -> None:
        """Optimizer step ``step`` has just finished (call first thing in the post-step hook);
        at a recorded step, set the next one."""
        now = self.clock()
        if self._last_end is not None:
            total = now - self._last_end
            plain = max(total - self._spent, 0.0)
            self._cycle_monitor += self._spent
            self._cycle_plains.append(plain)
        self._last_end, self._spent = now, 0.0
        if step < self._next:
            return
        if self._cycle_plains:
            self._costs.append(self._cycle_monitor + _after_record_excess(self._cycle_plains))
            self._plain.append(sum(self._cycle_plains) / len(self._cycle_plains))
        self._cycle_monitor = 0.0
        self._cycle_plains = []
        self._current = step
        if len(self._costs) < 1:
            self.interval = 1  # the first two steps are recorded: they measure
        else:
            cost, plain = statistics.median(self._costs), statistics.median(self._plain)
            wanted = cost / (self.fraction * plain) if plain > 0 else math.inf
            self.interval = int(min(self.max_every, max(1, math.ceil(wanted - 1e-9))))
        self._next = step + self.interval

    # ------------------------------------------------------------------ schedule
    def due(self, step: int) -> bool:
        """Whether step ``step`` is recorded (stable for the step being finished and the
        next one: the pre-step hook asks before the step whether θ must be kept)."""
        return step == self._current or step >= self._next

    def __repr__(self) -> str:
        return f"OverheadBudget({self.fraction:g}, interval={self.interval})"


def _after_record_excess(plains: list[float]) -> float:
    """How much longer the first step after a record took than the median of the cycle's
    other steps (0 when there are none to compare with: every step is recorded)."""
    if len(plains) < 2:
        return 0.0
    return max(plains[0] - statistics.median(plains[1:]), 0.0)
