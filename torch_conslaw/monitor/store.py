"""What the monitor keeps: records, a bounded history, running maxima and invalid marks.

A record is one float64 *table* per recorded step, ``[1, laws]`` (h) or ``[3, laws]`` (h, the
first and the second order of the split), the columns laid out group after group
(:class:`LawLayout`). :class:`Record` shows it per group, computed when first read;
:class:`RecordStore` keeps at most ``max_records`` records, evenly thinned, with the latest
one always available; :class:`DriftStatistics` keeps θ₀, the natural scales, the running
maxima of every law (exact over every recorded step, whatever was thinned) and the laws marked
invalid (non-finite). Folding a record in costs one native call (or a few tensor operations
where the native kernel is not built: :class:`~torch_conslaw.native.RunningMax`) whatever
the number of groups; per-group numbers are formed only when read.

Example:
    >>> import torch
    >>> layout = LawLayout(["g"], [2])
    >>> stats = DriftStatistics(layout, {"g": torch.tensor([1.0, 2.0], dtype=torch.float64)},
    ...                         {"g": torch.tensor([1.0, 1.0], dtype=torch.float64)})
    >>> record = stats.record(1, torch.tensor([[1.5, 2.0]], dtype=torch.float64))
    >>> record.values["g"].tolist(), record.rel_drift
    ([1.5, 2.0], {'g': 0.5})
    >>> stats.maxima()["g"]["max_abs_drift"]
    0.5
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..native import RunningMax

__all__ = ["Record", "RecordStore", "DriftStatistics", "LawLayout"]

MAXIMA = ("max_abs_drift", "max_rel_drift", "max_rel_first_order", "max_rel_second_order")


class LawLayout:
    """The columns of each law group in a record's table: group ``names[i]`` owns
    ``counts[i]`` consecutive columns, in order.

    Example:
        >>> layout = LawLayout(["a", "b"], [2, 1])
        >>> {k: v.tolist() for k, v in layout.split(torch.arange(3.0)).items()}
        {'a': [0.0, 1.0], 'b': [2.0]}
    """

    def __init__(self, names: Sequence[str], counts: Sequence[int]) -> None:
        self.names = list(names)
        self.counts = [int(c) for c in counts]
        self.size = sum(self.counts)
        self._lengths = torch.tensor(self.counts, dtype=torch.long)  # the segments of group_max

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """Each group's columns of ``flat`` (``[laws]``), as views."""
        return dict(zip(self.names, flat.split(self.counts)))

    def flat(self, per_group: Mapping[str, Tensor]) -> Tensor:
        """The per-group vectors concatenated in group order."""
        if not self.names:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([per_group[k].reshape(-1) for k in self.names])

    def group_max(self, rows: Tensor, skip: Tensor | None = None) -> Tensor:
        """``[rows, groups]``: per group, the largest entry of each row of ``rows``
        (``[rows, laws]``) over its columns not in ``skip``; −inf where none is left."""
        if not self.names:
            return rows.new_zeros(rows.shape[0], 0)
        if skip is not None:
            rows = rows.masked_fill(skip, -math.inf)
        return torch.segment_reduce(rows.T, "max", lengths=self._lengths, axis=0).T


class Record:
    """The laws at one recorded step.

    ``values``, ``first_order`` and ``second_order`` map each group name to a float64 vector
    (one entry per law); the split is ``None`` when the monitor runs with ``split=False``.
    ``rel_drift`` is, per group, max over its valid laws of |h − h(θ₀)| / scale(θ₀) (NaN when
    every law of the group is invalid). A record built by the monitor holds one table and forms
    these dicts when first read (:meth:`DriftStatistics.record`); ``Record(step, values,
    first_order, second_order, rel_drift)`` builds one from the dicts themselves.
    """

    def __init__(
        self,
        step: int,
        values: dict[str, Tensor],
        first_order: dict[str, Tensor] | None,
        second_order: dict[str, Tensor] | None,
        rel_drift: dict[str, float],
    ) -> None:
        self.step = step
        self._parts: list[dict[str, Tensor] | None] | None = [values, first_order, second_order]
        self._rel: dict[str, float] | None = rel_drift
        self._table: Tensor | None = None
        self._source: tuple | None = None  # (layout, θ₀ values, scales, invalid marks) of a table
        self._extra: tuple | None = None  # identity groups' entries (values, first, second, rel)

    @classmethod
    def of_table(cls, step: int, table: Tensor, source: tuple, extra: tuple | None = None) -> "Record":
        """A record of ``table`` (``[3, laws]`` with the split, ``[1, laws]`` without) laid
        out by ``source[0]``; ``extra``: more groups' ``(values, first, second, rel_drift)``."""
        record = cls.__new__(cls)
        record.step, record._table, record._source, record._extra = step, table, source, extra
        record._parts, record._rel = None, None
        return record

    def _part(self, i: int) -> dict[str, Tensor] | None:
        """Part ``i`` (values, first order, second order) per group, formed on first read."""
        if self._parts is None:
            assert self._table is not None and self._source is not None
            parts: list[dict[str, Tensor] | None] = [self._source[0].split(row) for row in self._table]
            parts += [None] * (3 - len(parts))  # values only: no split
            if self._extra is not None:
                for part, more in zip(parts, self._extra):
                    if part is not None and more is not None:
                        part.update(more)
            self._parts = parts
        return self._parts[i]

    @property
    def nbytes(self) -> int:
        """The bytes of this record's law values (and split)."""
        if self._table is not None:
            return self._table.numel() * self._table.element_size()
        return sum(t.numel() * t.element_size() for part in self._parts or [] if part for t in part.values())

    @property
    def values(self) -> dict[str, Tensor]:
        out = self._part(0)
        assert out is not None
        return out

    @property
    def first_order(self) -> dict[str, Tensor] | None:
        return self._part(1)

    @property
    def second_order(self) -> dict[str, Tensor] | None:
        return self._part(2)

    @property
    def rel_drift(self) -> dict[str, float]:
        if self._rel is None:
            layout, init, scale, invalid = self._source  # type: ignore[misc]
            drift = (self._table[0] - init).abs_().div_(scale)  # type: ignore[index]
            top = layout.group_max(drift.unsqueeze(0), invalid)[0].tolist()
            self._rel = {k: (math.nan if x == -math.inf else x) for k, x in zip(layout.names, top)}
            if self._extra is not None:
                self._rel.update(self._extra[3])
        return self._rel

    def as_dict(self) -> dict[str, Any]:
        """Plain data: ``step``, the three parts and ``rel_drift`` (dicts of tensors)."""
        return {
            "step": self.step, "values": self.values, "first_order": self.first_order,
            "second_order": self.second_order, "rel_drift": self.rel_drift,
        }

    def __repr__(self) -> str:
        return f"Record(step={self.step}, groups={list(self.values)})"


class RecordStore:
    """At most ``max_records`` records, evenly thinned: when full, every other stored record is
    dropped (the first one always stays) and later records are kept at twice the stride.
    ``max_bytes``: also at most that many bytes of records (their float64 tables), at least
    two records. The latest record is always available as :attr:`latest`.

    Example:
        >>> store = RecordStore(max_records=4)
        >>> for s in range(10):
        ...     store.add(Record(s, {}, None, None, {}))
        >>> [r.step for r in store.records()]
        [0, 4, 8, 9]
    """

    def __init__(self, max_records: int, max_bytes: int | None = None) -> None:
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 2:
            raise ValueError(f"max_records must be an integer ≥ 2, got {max_records!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_history_bytes must be a positive integer (bytes), got {max_bytes!r}")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._cap: int | None = None  # records kept: max_records, or fewer for large records
        self._stored: list[Record] = []
        self._stride = 1
        self._seen = 0
        self.latest: Record | None = None

    def add(self, record: Record) -> None:
        """Add a record; it is stored if it falls on the current stride."""
        if self._cap is None:
            self._cap = self.max_records
            if self.max_bytes is not None and record.nbytes:
                self._cap = max(2, min(self.max_records, self.max_bytes // record.nbytes))
        if self._seen % self._stride == 0:
            if len(self._stored) >= self._cap:
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
            "stored": [r.as_dict() for r in self._stored],
            "latest": None if self.latest is None else self.latest.as_dict(),
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
    """θ₀ law values, natural scales, invalid marks and the running maxima of every law, in
    the columns of ``layout``.

    :meth:`record` folds one record's table into the running maxima (per law: max |h − h₀|,
    max |first order|, max |second order|) in one native call, and returns the
    :class:`Record`; a law that becomes non-finite is marked invalid (with a
    ``RuntimeWarning``) and left out of every statistic from then on. Per-group maxima are
    formed when read (:meth:`maxima`): max over steps and laws commute, and dividing by a
    positive scale keeps the order of float64 numbers, so they equal the maxima of every
    record's per-group statistics bit for bit. The tensors :attr:`init_flat`,
    :attr:`scale_flat` and :attr:`invalid` are replaced, never modified in place: a record
    keeps the ones of its step.
    """

    def __init__(
        self, layout: LawLayout, initial: Mapping[str, Tensor], scales: Mapping[str, Tensor], split: bool = False
    ) -> None:
        self.layout = layout
        self.split = split
        rows = 3 if split else 1
        self.base = torch.zeros(rows, layout.size, dtype=torch.float64)  # [θ₀ values; 0; 0]
        self.base[0] = layout.flat(initial)
        self.init_flat: Tensor = self.base[0]
        self.scale_flat: Tensor = layout.flat({k: floor_scale(scales[k]).cpu() for k in layout.names})
        self.invalid = torch.zeros(layout.size, dtype=torch.bool)
        self.running = torch.zeros(rows, layout.size, dtype=torch.float64)
        self._invalid_bytes: Tensor | None = None  # ``invalid`` as bytes once a law is marked
        self._bind_folds()
        # per-group maxima restored from a checkpoint of an earlier format (without per-law maxima)
        self._floor: dict[str, dict[str, float]] = {}
        self._mark_invalid(0, self.init_flat.unsqueeze(0))

    def _bind_folds(self) -> None:
        """The running-maxima folds of a table of 1, 2 or 3 rows (views of base and running)."""
        self._folds = [RunningMax(self.base[:r], self.running[:r]) for r in range(1, self.base.shape[0] + 1)]

    def source(self) -> tuple:
        """What a record of the current state needs to form its relative drift."""
        return (self.layout, self.init_flat, self.scale_flat, self.invalid)

    def fold(self, table: Tensor) -> bool:
        """Fold a finite ``table`` into the running maxima; False, changing nothing, when an
        entry of a valid law is not finite (then :meth:`record` marks it)."""
        return not self.layout.size or self._folds[table.shape[0] - 1](table, self._invalid_bytes)

    def record(self, step: int, table: Tensor, extra: tuple | None = None, folded: bool = False) -> Record:
        """Fold ``table`` (``[1, laws]`` values, or ``[3, laws]`` with the split) of ``step``
        into the running maxima (unless :meth:`fold` did) and return its :class:`Record` (NaN
        split rows when a split monitor had no θ to split against); ``extra``: identity
        groups' entries."""
        if self.layout.size and not folded:
            fold = self._folds[table.shape[0] - 1]
            if not fold(table, self._invalid_bytes):
                self._mark_invalid(step, table)  # non-finite laws: marked, then left out
                fold(table, self._invalid_bytes)
        if self.split and table.shape[0] == 1:  # no snapshot to split against (post_step alone)
            table = torch.cat([table, torch.full((2, table.shape[1]), math.nan, dtype=table.dtype)])
        return Record.of_table(step, table, self.source(), extra)

    def _mark_invalid(self, step: int, table: Tensor) -> None:
        """Mark the laws that are non-finite in any row of ``table`` invalid, with a warning."""
        bad = ~torch.isfinite(table).all(0)
        new = bad & ~self.invalid
        if not bool(new.any()):
            return
        self.invalid = self.invalid | bad  # a new tensor: earlier records keep theirs
        self._invalid_bytes = self.invalid.to(torch.uint8)
        for name, count in zip(self.layout.names, new.split(self.layout.counts)):
            n = int(count.sum())
            if n:
                warnings.warn(
                    f"ConservationMonitor: {n} law(s) of group {name} became non-finite at "
                    f"step {step} (NaN/Inf in its parameters); they are marked invalid and left "
                    "out of the drift statistics",
                    RuntimeWarning,
                    stacklevel=5,
                )

    def invalid_counts(self) -> dict[str, int]:
        """How many laws of each group are marked invalid."""
        return {k: int(c.sum()) for k, c in zip(self.layout.names, self.invalid.split(self.layout.counts))}

    def maxima(self) -> dict[str, dict[str, float]]:
        """Per group: max |h − h₀|, max relative drift and, with the split, max relative first
        and second order, over every recorded step (0.0 before any)."""
        if not self.layout.size:
            return {}
        running = self.running
        rows = torch.cat([running[:1], running / self.scale_flat])
        keys = MAXIMA[: rows.shape[0]]
        table = self.layout.group_max(rows).clamp_min_(0.0).tolist()
        out = {}
        for i, name in enumerate(self.layout.names):
            group = dict.fromkeys(MAXIMA, 0.0) | {k: table[j][i] for j, k in enumerate(keys)}
            for k, x in self._floor.get(name, {}).items():
                group[k] = max(group[k], x)
            out[name] = group
        return out

    def state_dict(self) -> dict[str, Any]:
        """Scales, invalid marks, the per-law running maxima and the per-group maxima (θ₀ is
        saved by the monitor)."""
        return {
            "scale": self.scale_flat.clone(),
            "invalid": self.invalid.clone(),
            "running": self.running.clone(),
            "maxima": self.maxima(),
        }

    def load_state_dict(self, initial: Mapping[str, Tensor], state: Mapping[str, Any]) -> None:
        """Restore θ₀ and what :meth:`state_dict` returned (a state without per-law maxima
        keeps its per-group maxima as a floor)."""
        self.base = self.base.clone()
        self.base[0] = self.layout.flat(initial)
        self.init_flat = self.base[0]
        self.scale_flat = state["scale"].clone()
        self.invalid = state["invalid"].clone()
        self._invalid_bytes = self.invalid.to(torch.uint8) if bool(self.invalid.any()) else None
        if "running" in state and state["running"].shape == self.running.shape:
            self.running = state["running"].clone()
            self._floor = {}
        else:
            self.running = torch.zeros_like(self.running)
            self._floor = {k: dict(v) for k, v in state["maxima"].items()}
        self._bind_folds()


#: a law's natural scale at θ₀ is floored at this fraction of its group's median scale
SCALE_FLOOR = 1e-3


def floor_scale(scale: Tensor) -> Tensor:
    """Natural scales at θ₀, floored at :data:`SCALE_FLOOR` × the group's median positive
    scale (torch's median: the lower middle value; 1 when the group has none): a law whose
    terms all start at zero (the sum of a zero-initialized bias before a LayerNorm, a dead
    unit) would otherwise divide its float32-rounding drift by ~0 and show a relative drift
    of 1e3–1e4 while it holds.

    Example:
        >>> floor_scale(torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64)).tolist()
        [2.0, 4.0, 0.002]
    """
    positive = scale[torch.isfinite(scale) & (scale > 0)]
    if not positive.numel():
        return scale.clamp_min(1.0)
    return scale.clamp_min(SCALE_FLOOR * float(positive.median()))
