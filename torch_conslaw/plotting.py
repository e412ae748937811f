"""Figures of monitored laws (matplotlib, Agg canvas; no pyplot state is touched).

Every function takes the dict returned by :meth:`ConservationMonitor.history` (or the same
arrays loaded from an export) and returns a ``matplotlib.figure.Figure``; :func:`save`
writes it as a PNG.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw import ConservationMonitor
    >>> monitor = ConservationMonitor(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
    >>> fig = plot_relative_drift(monitor.history())
    >>> fig.axes[0].get_yscale()
    'log'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "group_names",
    "plot_laws",
    "plot_relative_drift",
    "plot_split",
    "plot_drift_vs_step_size",
    "fit_loglog_slope",
    "save",
]

_TINY = 1e-300  # floor for log axes: exact zeros are drawn at the bottom instead of vanishing


def group_names(history: Mapping[str, np.ndarray]) -> list[str]:
    """Law-group names present in a history dict, in order."""
    return [key[: -len("/values")] for key in history if key.endswith("/values")]


def _check_history(history: Mapping[str, np.ndarray], what: str) -> list[str]:
    if "step" not in history:
        raise ValueError(f"{what}: expected the dict of ConservationMonitor.history() (no 'step' key)")
    names = group_names(history)
    if not names:
        raise ValueError(f"{what}: the history holds no law group (the monitor tracked no law)")
    return names


def plot_laws(history: Mapping[str, np.ndarray], max_laws: int = 12) -> Figure:
    """h_t − h_0 for up to ``max_laws`` laws of each group against the step (one panel per group).

    Example:
        >>> import numpy as np
        >>> h = {"step": np.arange(3), "a→b/values": np.zeros((3, 2))}
        >>> len(plot_laws(h).axes)
        1
    """
    names = _check_history(history, "plot_laws")
    steps = history["step"]
    fig = Figure(figsize=(5.5, 2.6 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        values = history[f"{name}/values"]
        for j in range(min(values.shape[1], max_laws)):
            ax.plot(steps, values[:, j] - values[0, j], lw=1)
        ax.set_title(f"{name}: h(θ_t) − h(θ_0), {min(values.shape[1], max_laws)} of {values.shape[1]} laws", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.axhline(0, color="k", lw=0.5)
    return fig


def plot_relative_drift(history: Mapping[str, np.ndarray]) -> Figure:
    """Max relative drift |h_t − h_0| / scale_0 of each group against the step (log scale)."""
    names = _check_history(history, "plot_relative_drift")
    steps = history["step"]
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    for name in names:
        drift = np.asarray(history[f"{name}/rel_drift"], dtype=float)
        keep = steps > 0
        ax.plot(steps[keep], np.maximum(drift[keep], _TINY), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max relative drift")
    ax.set_title("relative drift of the conservation laws", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_split(history: Mapping[str, np.ndarray]) -> Figure:
    """Per step and group: max |first-order| and max |second-order| part of the law changes."""
    names = _check_history(history, "plot_split")
    if f"{names[0]}/first_order" not in history:
        raise ValueError("plot_split: the history has no first/second-order split (monitor built with split=False)")
    steps = history["step"][1:]
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    for i, name in enumerate(names):
        color = f"C{i}"
        first = np.abs(history[f"{name}/first_order"][1:]).max(axis=1, initial=0.0)
        second = np.abs(history[f"{name}/second_order"][1:]).max(axis=1, initial=0.0)
        ax.plot(steps, np.maximum(first, _TINY), color=color, ls="-", label=f"{name} first order 2B(θ,Δ)")
        ax.plot(steps, np.maximum(second, _TINY), color=color, ls=":", label=f"{name} second order B(Δ,Δ)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max |part| over the group")
    ax.set_title("exact split of each change: symmetry breaking vs discretization", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def fit_loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (positive, finite points only).

    Example:
        >>> round(fit_loglog_slope([1, 10, 100], [2, 20, 200]), 6)
        1.0
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = (xs > 0) & (ys > 0) & np.isfinite(xs) & np.isfinite(ys)
    if ok.sum() < 2:
        raise ValueError("fit_loglog_slope: need at least two positive, finite points")
    return float(np.polyfit(np.log(xs[ok]), np.log(ys[ok]), 1)[0])


def plot_drift_vs_step_size(
    step_sizes: Sequence[float], drifts: Mapping[str, Sequence[float]], title: str = ""
) -> tuple[Figure, dict[str, float]]:
    """Log-log plot of each series of ``drifts`` against ``step_sizes``, with fitted slopes.

    Returns the figure and ``{label: slope}``.

    Example:
        >>> fig, slopes = plot_drift_vs_step_size([1e-3, 1e-2], {"law": [1e-5, 1e-4]})
        >>> round(slopes["law"], 6)
        1.0
    """
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    slopes: dict[str, float] = {}
    for i, (label, ys) in enumerate(drifts.items()):
        if len(ys) != len(step_sizes):
            raise ValueError(
                f"plot_drift_vs_step_size: series {label!r} has {len(ys)} points for {len(step_sizes)} step sizes"
            )
        try:
            slopes[label] = fit_loglog_slope(step_sizes, ys)
            text = f"{label} (slope {slopes[label]:.2f})"
        except ValueError:
            slopes[label] = math.nan
            text = label
        ax.plot(step_sizes, np.maximum(np.asarray(ys, dtype=float), _TINY), "o-", color=f"C{i}", label=text)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step size η (fixed training time T = η · steps)")
    ax.set_ylabel("max relative change over training")
    ax.set_title(title or "drift against step size", fontsize=10)
    ax.legend(fontsize=8)
    return fig, slopes


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
