"""Exact accounting of a step: law values, the first/second-order split, bounded history.

For a quadratic law h(θ) = B(θ, θ) and a step Δ = θ⁺ − θ (SCIENCE.md §6)::

    h(θ⁺) − h(θ) = 2 B(θ, Δ)  +  B(Δ, Δ)
                   first order   second order

Under plain SGD the first-order part vanishes (up to float64 rounding); a nonzero first-order
part shows that the training setup breaks the law.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw.lawgroups import build_groups
    >>> from torch_conslaw.structure import find_structure
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> groups = build_groups(find_structure(model).pairs)
    >>> before = {n: p.detach().clone() for n, p in model.named_parameters()}
    >>> after = {n: p + 0.1 for n, p in before.items()}
    >>> values, first, second = split_change(groups, before, after)
    >>> bool(torch.allclose(values["0→2"] - groups[0].values(before), first["0→2"] + second["0→2"]))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .lawgroups import LawGroup

__all__ = ["Accountant", "Record", "RecordStore", "split_change", "evaluate", "as_float64"]

F64 = torch.float64


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


def as_float64(params: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """Detached float64 copies of the named tensors (each converted once, whatever its dtype)."""
    return {n: params[n].detach().to(F64) for n in names}


def evaluate(groups: Sequence[LawGroup], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """h(θ) of every group, float64.

    Example:
        >>> evaluate([], {})
        {}
    """
    with torch.no_grad():
        return {g.name: g.values(params) for g in groups}


def split_change(
    groups: Sequence[LawGroup], before: Mapping[str, Tensor], after: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """h(after), first order 2B(before, Δ) and second order B(Δ, Δ) of every group, float64."""
    names = sorted({n for g in groups for n in g.parameter_names})
    with torch.no_grad():
        b64 = as_float64(before, names)
        a64 = as_float64(after, names)
        delta = {n: a64[n] - b64[n] for n in names}
        values = {g.name: g.values(a64) for g in groups}
        first = {g.name: 2.0 * g.bilinear(b64, delta) for g in groups}
        second = {g.name: g.bilinear(delta, delta) for g in groups}
    return values, first, second


class _Buffers:
    """Persistent float64 buffers, refreshed in place (no large allocation per step)."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, like: Tensor) -> Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.shape != like.shape:
            buf = self._bufs[name] = torch.empty(like.shape, dtype=F64, device=like.device)
        return buf

    def load(self, params: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
        out = {}
        for n in names:
            p = params[n].detach()
            out[n] = p if p.dtype == F64 else self.get(n, p).copy_(p)
        return out


class Accountant:
    """:func:`evaluate` and :func:`split_change` for a fixed set of groups, without allocating
    parameter-sized temporaries at each call (the monitor's hot path).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_conslaw.lawgroups import build_groups
        >>> from torch_conslaw.structure import find_structure
        >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> acc = Accountant(build_groups(find_structure(model).pairs))
        >>> acc.values(dict(model.named_parameters()))["0→2"].dtype
        torch.float64
    """

    def __init__(self, groups: Sequence[LawGroup]) -> None:
        self.groups = list(groups)
        self.names = sorted({n for g in self.groups for n in g.parameter_names})
        self._before, self._after, self._delta = _Buffers(), _Buffers(), _Buffers()

    def values(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """h(θ) of every group, float64."""
        with torch.no_grad():
            p64 = self._after.load(params, self.names)
            return {g.name: g.values(p64) for g in self.groups}

    def split(
        self, before: Mapping[str, Tensor], after: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Same result as :func:`split_change`."""
        with torch.no_grad():
            b64 = self._before.load(before, self.names)
            a64 = self._after.load(after, self.names)
            delta = {n: torch.sub(a64[n], b64[n], out=self._delta.get(n, a64[n])) for n in self.names}
            values = {g.name: g.values(a64) for g in self.groups}
            first = {g.name: 2.0 * g.bilinear(b64, delta) for g in self.groups}
            second = {g.name: g.bilinear(delta, delta) for g in self.groups}
        return values, first, second


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
