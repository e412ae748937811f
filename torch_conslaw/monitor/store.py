"""The record store: what the monitor keeps of each recorded step.

:class:`Record` holds the law values (and the first/second-order split) of one recorded step;
:class:`RecordStore` keeps at most ``max_records`` of them, evenly thinned, with the latest one
always available.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["Record", "RecordStore"]


@dataclass
class Record:
    """The laws at one recorded step.

    ``values``, ``first_order`` and ``second_order`` map each group name to a float64 vector
    (one entry per law); the split is ``None`` when the monitor runs with ``split=False``.
    ``rel_drift`` is, per group, max over its valid laws of |h − h(θ₀)| / scale(θ₀).
    """

    step: int
    values: dict[str, Tensor]
    first_order: dict[str, Tensor] | None
    second_order: dict[str, Tensor] | None
    rel_drift: dict[str, float]


class RecordStore:
    """At most ``max_records`` records, evenly thinned: when full, every other stored record is
    dropped (the first one always stays) and later records are kept at twice the stride.
    The latest record is always available as :attr:`latest`.

    Example:
        >>> store = RecordStore(max_records=4)
        >>> for s in range(10):
        ...     store.add(Record(s, {}, None, None, {}))
        >>> [r.step for r in store.records()]
        [0, 4, 8, 9]
    """

    def __init__(self, max_records: int) -> None:
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 2:
            raise ValueError(f"max_records must be an integer ≥ 2, got {max_records!r}")
        self.max_records = max_records
        self._stored: list[Record] = []
        self._stride = 1
        self._seen = 0
        self.latest: Record | None = None

    def add(self, record: Record) -> None:
        """Add a record; it is stored if it falls on the current stride."""
        if self._seen % self._stride == 0:
            if len(self._stored) >= self.max_records:
                self._stored = self._stored[::2]
                self._stride *= 2
            if self._seen % self._stride == 0:
                self._stored.append(record)
        self._seen += 1
        self.latest = record

    @property
    def seen(self) -> int:
        """How many records were added (stored or thinned out)."""
        return self._seen

    def records(self) -> list[Record]:
        """Stored records in order, with the latest one appended if it was not stored."""
        out = list(self._stored)
        if self.latest is not None and (not out or out[-1] is not self.latest):
            out.append(self.latest)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (records as dicts of tensors)."""
        return {
            "stored": [vars(r).copy() for r in self._stored],
            "latest": None if self.latest is None else vars(self.latest).copy(),
            "stride": self._stride,
            "seen": self._seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._stored = [Record(**r) for r in state["stored"]]
        self.latest = None if state["latest"] is None else Record(**state["latest"])
        if self._stored and self.latest is not None and self._stored[-1].step == self.latest.step:
            self.latest = self._stored[-1]
        self._stride = int(state["stride"])
        self._seen = int(state["seen"])
