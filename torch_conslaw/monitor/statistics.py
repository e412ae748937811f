"""Per-group statistics as the monitor shows them: summary rows, history columns, the table.

Pure functions of the law groups, the :class:`~.store.DriftStatistics` and the stored
:class:`~.store.Record` objects; :class:`~torch_conslaw.ConservationMonitor` adds the rows of
its identity groups and which steps were recorded.

Example:
    >>> text = table_text([], has_groups=False, note="", skipped=["a→b: not homogeneous"])
    >>> text.splitlines()[2:]
    ['(no law tracked)', 'skipped: a→b: not homogeneous']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..lawgroups import LawGroup
from .store import DriftStatistics, Record

__all__ = ["group_rows", "group_columns", "table_text"]


def group_rows(
    groups: Sequence[LawGroup],
    stats: DriftStatistics,
    verification: Mapping[str, Any],
    split: bool,
    latest: Record | None,
) -> list[dict[str, Any]]:
    """One summary dict per law group (the keys of :meth:`ConservationMonitor.summary`
    before the recorded-steps keys)."""
    invalid = stats.invalid_counts()
    maxima = stats.maxima()
    out = []
    for g in groups:
        m = maxima[g.name]
        out.append(
            {
                "name": g.name,
                "kind": g.kind,
                "count": g.count,
                "max_abs_drift": m["max_abs_drift"],
                "max_rel_drift": m["max_rel_drift"],
                "max_rel_first_order": m["max_rel_first_order"] if split else None,
                "max_rel_second_order": m["max_rel_second_order"] if split else None,
                "expected_conserved": g.expected_conserved,
                "reason": g.reason,
                "invalid": invalid[g.name],
                "producer": g.producer,
                "consumer": g.consumer,
                "degree": g.degree,
                "approximate": g.approximate,
                "loss": g.loss,
                "verified": g.name in verification if g.expected_conserved or g.approximate else None,
                "verification_residual": (verification[g.name].residual if g.name in verification else None),
                "last_rel_drift": latest.rel_drift.get(g.name, math.nan) if latest else math.nan,
            }
        )
    return out


def group_columns(groups: Sequence[LawGroup], records: Sequence[Record], split: bool) -> dict[str, np.ndarray]:
    """``"step"`` and, per law group, its values, relative drift (and split) over ``records``."""
    out: dict[str, np.ndarray] = {"step": np.array([r.step for r in records], dtype=np.int64)}
    for g in groups:
        out[f"{g.name}/values"] = _stack([r.values[g.name] for r in records], g.count)
        out[f"{g.name}/rel_drift"] = np.array([r.rel_drift[g.name] for r in records])
        if split:
            for key in ("first_order", "second_order"):
                rows = [getattr(r, key)[g.name] for r in records]
                out[f"{g.name}/{key}"] = _stack(rows, g.count)
    return out


def table_text(rows: Sequence[Mapping[str, Any]], *, has_groups: bool, note: str, skipped: Sequence[Any]) -> str:
    """The summary ``rows`` as a fixed-width text table (one line per group), then the
    verification ``note`` and the ``skipped`` pairs."""
    head = f"{'group':<18} {'kind':<8} {'laws':>5} {'max rel drift':>14} {'max rel 1st':>12} {'max rel 2nd':>12}  expected"
    lines = [head, "-" * len(head)]
    for s in rows:
        first = "-" if s["max_rel_first_order"] is None else f"{s['max_rel_first_order']:.2e}"
        second = "-" if s["max_rel_second_order"] is None else f"{s['max_rel_second_order']:.2e}"
        lines.append(
            f"{s['name']:<18} {s['kind']:<8} {s['count']:>5} {s['max_rel_drift']:>14.2e} "
            f"{first:>12} {second:>12}  {_expected(s)}"
        )
    if not has_groups:
        lines.append("(no law tracked)")
    if note:
        lines.append(note)
    for s in skipped:
        lines.append(f"skipped: {s}")
    return "\n".join(lines)


def _expected(row: Mapping[str, Any]) -> str:
    """The table's last column: ``conserved`` / ``broken`` for a law group; for an identity
    group (velocity laws, recurrences: its drift columns are the identity's residual) ``identity``."""
    if "max_rel_residual" in row:
        return "identity"
    text = "approximate" if row.get("approximate") else ("conserved" if row["expected_conserved"] else "broken")
    return text + " (unverified)" if row.get("verified") is False else text


def _stack(rows: list[Tensor], count: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, count))
    return torch.stack(rows).numpy()
