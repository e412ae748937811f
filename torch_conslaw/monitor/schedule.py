"""When to record: every n optimizer steps, or on a log-spaced grid of steps.

A schedule is a pure function of the step number, so it needs no state and survives a resume.

Example:
    >>> [s for s in range(1, 40) if Schedule(log_spaced=True, per_decade=4).due(s)]
    [1, 2, 4, 6, 10, 18, 32]
    >>> [s for s in range(1, 10) if Schedule(every=3).due(s)]
    [3, 6, 9]
"""

from __future__ import annotations

import math

__all__ = ["Schedule"]


class Schedule:
    """Record at steps ``every, 2·every, …``, or, with ``log_spaced``, at the first step that
    reaches each point of the grid 10^(i/per_decade) (i = 0, 1, …); the two are exclusive.
    """

    def __init__(self, every: int = 1, log_spaced: bool = False, per_decade: int = 10) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Schedule: every must be a positive integer, got {every!r}")
        if isinstance(per_decade, bool) or not isinstance(per_decade, int) or per_decade < 1:
            raise ValueError(f"Schedule: per_decade must be a positive integer, got {per_decade!r}")
        if log_spaced and every != 1:
            raise ValueError(
                f"Schedule: log_spaced=True records on a log-spaced grid, so every={every} would be "
                "ignored; pass either every=n or log_spaced=True"
            )
        self.every = every
        self.log_spaced = log_spaced
        self.per_decade = per_decade

    def _grid_index(self, step: int) -> int:
        """Number of grid points 10^(i/per_decade) that are ≤ step (step ≥ 1)."""
        i = math.floor(self.per_decade * math.log10(step) + 1e-9)
        while 10 ** ((i + 1) / self.per_decade) <= step:  # guard against log rounding
            i += 1
        while i >= 0 and 10 ** (i / self.per_decade) > step:
            i -= 1
        return i

    def due(self, step: int) -> bool:
        """Whether optimizer step number ``step`` (1-based) is recorded."""
        if step < 1:
            return False
        if not self.log_spaced:
            return step % self.every == 0
        return step == 1 or self._grid_index(step) > self._grid_index(step - 1)

    def __repr__(self) -> str:
        if self.log_spaced:
            return f"Schedule(log_spaced=True, per_decade={self.per_decade})"
        return f"Schedule(every={self.every})"
