"""Export a monitor's history to CSV and JSON Lines, and reduce records to scalars.

* :func:`export_csv` — one row per (recorded step, law group, law): columns ``step``,
  ``group``, ``law`` (flat index of the law inside its group), ``value``, ``first_order``,
  ``second_order`` (empty when the monitor does not split changes; ``nan`` for invalid laws).
* :func:`export_jsonl` — one JSON object per recorded step:
  ``{"step": 3, "values": {"<group>": [...]}, "first_order": {...}, "second_order": {...},
  "rel_drift": {"<group>": 1e-5}}``, each list the group's laws; non-finite numbers are
  written as ``null``.

Both start with the θ₀ row (step 0) and hold what :meth:`ConservationMonitor.history`
holds: every record, or an evenly thinned subset once ``max_records`` is reached.
* :func:`record_scalars` and :func:`scalar_tag` — the per-group summary numbers of one
  record and their metric names, shared by the TensorBoard and Lightning loggers.

Only the main process (rank 0) writes files.

Example:
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from torch_conslaw import ConservationMonitor
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> monitor = ConservationMonitor(model).attach(opt)
    >>> model(torch.randn(8, 4)).square().mean().backward(); opt.step()
    >>> folder = tempfile.mkdtemp()
    >>> export_csv(monitor, os.path.join(folder, "history.csv"))  # 2 rows (θ₀, step 1) x 8 laws
    16
    >>> export_jsonl(monitor, os.path.join(folder, "history.jsonl"))
    2
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..distributed import is_main_process

if TYPE_CHECKING:  # pragma: no cover
    from ..monitor import ConservationMonitor, Record

__all__ = ["export_csv", "export_jsonl", "record_scalars", "scalar_tag", "PARTS", "QUANTITIES"]

PARTS: tuple[str, ...] = ("values", "first_order", "second_order")
QUANTITIES: tuple[str, ...] = (
    "max_rel_drift",
    "max_abs_drift",
    "max_abs_first_order",
    "max_abs_second_order",
    "max_rel_residual",
)


def scalar_tag(group: str, quantity: str, prefix: str = "conslaw") -> str:
    """``<prefix>/<group>/<quantity>``, the metric name shared by every logger; a ``/`` inside
    the group name becomes ``_`` so that each group stays one level of the hierarchy.

    Example:
        >>> scalar_tag("net.0→net.2", "max_rel_drift")
        'conslaw/net.0→net.2/max_rel_drift'
    """
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose one of {QUANTITIES}")
    return f"{prefix}/{group.replace('/', '_')}/{quantity}"


def record_scalars(monitor: ConservationMonitor, record: Record) -> dict[tuple[str, str], float]:
    """``{(group, quantity): value}`` for one record; quantities are :data:`QUANTITIES`.

    ``max_rel_drift`` is the record's ``rel_drift``; ``max_abs_drift`` is
    max |h(θ_t) − h(θ_0)|; the two ``max_abs_*_order`` are present when the record
    carries the first/second-order split. Maxima run over the finite (valid) laws only.
    An identity group of the monitor (velocity laws, momentum / weight-decay recurrences:
    :attr:`~torch_conslaw.ConservationMonitor.identity_groups`) gives ``max_rel_residual``
    (the record's ``rel_drift``: its identity's relative residual) and the two
    ``max_abs_*_order`` (its residual and its predicted change) instead of the drifts.

    Example:
        >>> record_scalars(monitor, record)[("fc1", "max_rel_drift")]  # doctest: +SKIP
        3.1e-05
    """
    out: dict[tuple[str, str], float] = {}
    identities = {g.name for g in monitor.identity_groups}
    for group, value in record.values.items():
        if group in identities:
            out[group, "max_rel_residual"] = float(record.rel_drift[group])
        else:
            out[group, "max_rel_drift"] = float(record.rel_drift[group])
            out[group, "max_abs_drift"] = _max_abs(value.double() - monitor.initial[group].double())
        if record.first_order is not None:
            out[group, "max_abs_first_order"] = _max_abs(record.first_order[group])
        if record.second_order is not None:
            out[group, "max_abs_second_order"] = _max_abs(record.second_order[group])
    return out


def export_csv(monitor: ConservationMonitor, path: str | os.PathLike[str]) -> int:
    """Write the monitor's full history to ``path`` as CSV; returns the number of rows.

    Example:
        >>> export_csv(monitor, "history.csv")  # doctest: +SKIP
        1200
    """
    if not is_main_process():
        return 0
    rows = 0
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "group", "law", *PARTS])
        for step, groups in _steps(monitor):
            for group, parts in groups.items():
                columns = [parts[p] for p in PARTS]
                for law in range(len(columns[0])):
                    writer.writerow(
                        [step, group, law, *("" if c is None else repr(c[law]) for c in columns)]
                    )
                    rows += 1
    return rows


def export_jsonl(monitor: ConservationMonitor, path: str | os.PathLike[str]) -> int:
    """Write the monitor's full history to ``path`` as JSON Lines; returns the number of lines.

    Example:
        >>> export_jsonl(monitor, "history.jsonl")  # doctest: +SKIP
        100
    """
    if not is_main_process():
        return 0
    lines = 0
    with open(path, "w") as handle:
        for step, groups in _steps(monitor):
            entry: dict[str, Any] = {"step": step}
            for part in PARTS:
                if any(parts[part] is not None for parts in groups.values()):
                    entry[part] = {g: _finite_or_none(parts[part]) for g, parts in groups.items()}
            entry["rel_drift"] = {g: _finite_or_none([p["rel_drift"]])[0] for g, p in groups.items()}
            handle.write(json.dumps(entry, allow_nan=False) + "\n")
            lines += 1
    return lines


def _steps(monitor: ConservationMonitor) -> Iterator[tuple[int, dict[str, dict[str, Any]]]]:
    """Per stored record: ``(step, {group: {part: flat float list or None, "rel_drift": float}})``."""
    history = monitor.history()
    names = [g.name for g in monitor.groups] + [g.name for g in monitor.identity_groups]
    for i, step in enumerate(np.asarray(history["step"]).tolist()):
        groups: dict[str, dict[str, Any]] = {}
        for name in names:
            parts: dict[str, Any] = {}
            for part in PARTS:
                column = history.get(f"{name}/{part}")
                parts[part] = None if column is None else np.asarray(column[i]).ravel().tolist()
            parts["rel_drift"] = float(history[f"{name}/rel_drift"][i])
            groups[name] = parts
        yield int(step), groups


def _finite_or_none(values: list[float] | None) -> list[float | None] | None:
    if values is None:
        return None
    return [v if math.isfinite(v) else None for v in values]


def _max_abs(tensor: torch.Tensor) -> float:
    """Largest |entry| over the finite entries (invalid laws are left out, as in the monitor's
    ``rel_drift``); NaN when no entry is finite."""
    finite = tensor[torch.isfinite(tensor)]
    if finite.numel():
        return float(finite.abs().max())
    return math.nan if tensor.numel() else 0.0
