"""What the monitor keeps: records, a bounded history, running maxima and invalid marks.

:class:`Record` holds the law values (and the first/second-order split) of one recorded step;
:class:`RecordStore` keeps at most ``max_records`` of them, evenly thinned, with the latest one
always available; :class:`DriftStatistics` keeps θ₀, the natural scales, the running maxima of
every group (exact over every recorded step, whatever was thinned) and the laws marked invalid
(non-finite).

Example:
    >>> import torch
    >>> stats = DriftStatistics(["g"], [2], {"g": torch.tensor([1.0, 2.0], dtype=torch.float64)},
    ...                         {"g": torch.tensor([1.0, 1.0], dtype=torch.float64)})
    >>> stats.update({"g": torch.tensor([1.5, 2.0], dtype=torch.float64)}, None, None, step=1)
    {'g': 0.5}
    >>> stats.maxima["g"]["max_abs_drift"]
    0.5
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Record", "RecordStore", "DriftStatistics"]

MAXIMA = ("max_abs_drift", "max_rel_drift", "max_rel_first_order", "max_rel_second_order")


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


class DriftStatistics:
    """θ₀ law values, natural scales, invalid marks and running maxima of the law groups
    ``names`` (with ``counts`` laws each), flattened into one float64 vector in group order.

    :meth:`update` folds the values (and split) of one record into the running maxima and
    returns the record's relative drift per group; a law that becomes non-finite is marked
    invalid (with a ``RuntimeWarning``) and left out of every statistic from then on. The
    tensors :attr:`init_flat`, :attr:`scale_flat` and :attr:`invalid` are replaced, never
    modified in place, so a worker thread may read them while the training thread updates.
    """

    def __init__(
        self, names: Sequence[str], counts: Sequence[int], initial: Mapping[str, Tensor], scales: Mapping[str, Tensor]
    ) -> None:
        self.names = list(names)
        self.counts = list(counts)
        self.group_index = torch.repeat_interleave(
            torch.arange(len(self.names)), torch.tensor(self.counts, dtype=torch.long)
        ).unsqueeze(0)
        self.init_flat: Tensor = self.flat(initial)  # type: ignore[assignment]
        self.scale_flat: Tensor = self.flat({k: floor_scale(scales[k]).cpu() for k in self.names})  # type: ignore[assignment]
        self.invalid = torch.zeros(sum(self.counts), dtype=torch.bool)
        self.maxima: dict[str, dict[str, float]] = {k: dict.fromkeys(MAXIMA, 0.0) for k in self.names}
        self._job: tuple[tuple[Tensor, ...], Callable[..., Any]] | None = None
        self.mark_invalid(0, self.init_flat, None, None)

    def flat(self, per_group: Mapping[str, Tensor] | None) -> Tensor | None:
        """The per-group vectors concatenated in group order (``None`` stays ``None``)."""
        if per_group is None:
            return None
        if not self.names:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([per_group[k] for k in self.names])

    def invalid_counts(self) -> dict[str, int]:
        """How many laws of each group are marked invalid."""
        return {k: int(c.sum()) for k, c in zip(self.names, self.invalid.split(self.counts))}

    def _table(self, v: Tensor, f: Tensor | None, s: Tensor | None) -> list[list[float]]:
        return maxima_table(v, f, s, self.init_flat, self.scale_flat, self.invalid, self.group_index, len(self.names))

    def job(self) -> Callable[..., Any] | None:
        """For a worker thread: ``(values, first, second) →`` the flat vectors and the maxima
        table under the current θ₀ values, scales and invalid marks (tensors that are replaced,
        never modified in place, so the worker may read them). :meth:`update` uses the table
        only if these three are still the current ones."""
        if not self.names:
            return None
        cached = self._job
        if cached is not None:  # once per record on the training thread: no generator here
            init, scale, invalid = cached[0]
            if init is self.init_flat and scale is self.scale_flat and invalid is self.invalid:
                return cached[1]
        key = (self.init_flat, self.scale_flat, self.invalid)
        names = list(self.names)
        index, n = self.group_index, len(self.names)

        def run(values: dict[str, Tensor], first: dict[str, Tensor] | None, second: dict[str, Tensor] | None) -> Any:
            v = torch.cat([values[k] for k in names])
            f = None if first is None else torch.cat([first[k] for k in names])
            s = None if second is None else torch.cat([second[k] for k in names])
            return key, v, f, s, maxima_table(v, f, s, *key, index, n)

        self._job = (key, run)
        return run

    def update(
        self,
        values: dict[str, Tensor],
        first: dict[str, Tensor] | None,
        second: dict[str, Tensor] | None,
        step: int,
        precomputed: Any = None,
    ) -> dict[str, float]:
        """Fold one record into the running maxima; returns its relative drift per group
        (NaN for a group whose laws are all invalid). ``precomputed``: what :meth:`job`
        returned on a worker for these values."""
        if not self.names:
            return {}
        key = precomputed[0] if precomputed is not None else None
        if key is not None and key[0] is self.init_flat and key[1] is self.scale_flat and key[2] is self.invalid:
            _, v, f, s, table = precomputed  # computed by the worker
        else:
            v, f, s = self.flat(values), self.flat(first), self.flat(second)
            assert v is not None
            table = self._table(v, f, s)
        if any(math.isnan(x) or x == math.inf for row in table for x in row):
            self.mark_invalid(step, v, f, s)
            table = self._table(v, f, s)
        rel: dict[str, float] = {}
        for i, name in enumerate(self.names):
            column = [row[i] for row in table]
            if column[0] == -math.inf:  # every law of the group is invalid
                rel[name] = math.nan
                continue
            m = self.maxima[name]
            for k, x in zip(MAXIMA, column):
                m[k] = max(m[k], x)
            rel[name] = column[1]
        return rel

    def mark_invalid(self, step: int, v: Tensor, f: Tensor | None, s: Tensor | None) -> None:
        """Mark the laws that are non-finite in ``v`` (or the split) invalid, with a warning."""
        bad = ~torch.isfinite(v)
        if f is not None and s is not None:
            bad |= ~torch.isfinite(f) | ~torch.isfinite(s)
        new = bad & ~self.invalid
        if not bool(new.any()):
            return
        self.invalid = self.invalid | bad  # a new tensor: a worker may read the old one
        for name, count in zip(self.names, new.split(self.counts)):
            n = int(count.sum())
            if n:
                warnings.warn(
                    f"ConservationMonitor: {n} law(s) of group {name} became non-finite at "
                    f"step {step} (NaN/Inf in its parameters); they are marked invalid and left "
                    "out of the drift statistics",
                    RuntimeWarning,
                    stacklevel=5,
                )

    def state_dict(self) -> dict[str, Any]:
        """Scales, invalid marks and running maxima (θ₀ is saved by the monitor)."""
        return {
            "scale": self.scale_flat.clone(),
            "invalid": self.invalid.clone(),
            "maxima": {k: dict(v) for k, v in self.maxima.items()},
        }

    def load_state_dict(self, initial: Mapping[str, Tensor], state: Mapping[str, Any]) -> None:
        """Restore θ₀ and what :meth:`state_dict` returned."""
        self.init_flat = self.flat(initial)  # type: ignore[assignment]
        self.scale_flat = state["scale"].clone()
        self.invalid = state["invalid"].clone()
        self.maxima = {k: dict(v) for k, v in state["maxima"].items()}


def maxima_table(
    v: Tensor,
    f: Tensor | None,
    s: Tensor | None,
    init_flat: Tensor,
    scale_flat: Tensor,
    invalid: Tensor,
    group_index: Tensor,
    n_groups: int,
) -> list[list[float]]:
    """Per group: max |h − h₀|, max rel. drift (+ max rel. first/second order), valid laws only."""
    drift = (v - init_flat).abs_()
    rows = [drift, drift / scale_flat]
    if f is not None and s is not None:
        rows += [f.abs() / scale_flat, s.abs() / scale_flat]
    table = torch.stack(rows).masked_fill_(invalid, -math.inf)
    out = torch.full((len(rows), n_groups), -math.inf, dtype=torch.float64)
    out.scatter_reduce_(1, group_index.expand(len(rows), -1), table, "amax")
    return out.tolist()


def floor_scale(scale: Tensor) -> Tensor:
    """Natural scales, floored so that laws of all-zero units do not divide by zero."""
    finite = scale[torch.isfinite(scale)]
    ref = float(finite.max()) if finite.numel() else 0.0
    return scale.clamp_min(ref * 1e-12 if ref > 0 else 1.0)
