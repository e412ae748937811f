"""Which optimizer breaks which law, and why (SCIENCE.md §6).

Plain SGD (no momentum, no weight decay) conserves every law up to the O(η²)-per-step
discretization drift. Momentum, weight decay and every other optimizer (Adam, RMSprop, ...)
give the update a nonzero first-order part, so the laws of the parameters they update are not
expected to be conserved; nor are the laws of a parameter the optimizer does not update.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> optimizer_breaking_reasons(torch.optim.SGD([p], lr=0.1))
    {}
    >>> list(optimizer_breaking_reasons(torch.optim.SGD([p], lr=0.1, momentum=0.9)).values())[0][:22]
    'SGD with momentum=0.9:'
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..lawgroups import LawGroup

__all__ = ["optimizer_breaking_reasons", "set_expectations"]


def optimizer_breaking_reasons(optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Map ``id(parameter)`` → why this optimizer's update breaks the laws (SCIENCE.md §6).

    Plain SGD (no momentum, no weight decay) keeps every law up to the O(η²)-per-step
    discretization drift, so its parameters are absent from the result.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> list(optimizer_breaking_reasons(torch.optim.Adam([p])).values())[0][:4]
        'Adam'
    """
    reasons: dict[int, str] = {}
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.SGD):
            parts = []
            if group.get("momentum", 0):
                parts.append(
                    f"momentum={group['momentum']:g}: the laws follow an exact recurrence, "
                    "not a conservation"
                )
            if group.get("weight_decay", 0):
                parts.append(
                    f"weight_decay={group['weight_decay']:g}: each law shrinks by (1 − ηλ)² per step"
                )
            if not parts:
                continue
            reason = f"{name} with " + "; ".join(parts)
        else:
            reason = (
                f"{name} is not plain SGD: its preconditioned or accumulated update has a "
                "nonzero first-order part, so the laws are not conserved"
            )
        for p in group["params"]:
            reasons[id(p)] = reason
    return reasons


def set_expectations(
    groups: Sequence[LawGroup],
    params: Mapping[str, Tensor],
    base: Mapping[str, tuple[bool, str]],
    optimizer: torch.optim.Optimizer,
    owned: set[int],
) -> None:
    """Set ``expected_conserved`` and ``reason`` of every group for ``optimizer``, starting
    from ``base`` (name → the expectation without an optimizer); ``owned``: the ids of the
    parameters it updates. Warns when it leaves a parameter of a conserved group out."""
    breaking = optimizer_breaking_reasons(optimizer)
    missing: list[str] = []
    for g in groups:
        g.expected_conserved, g.reason = base[g.name]
        if not g.expected_conserved:
            continue
        for n in g.parameter_names:
            p = params[n]
            if id(p) not in owned:
                g.expected_conserved = False
                g.reason = f"{n} is not updated by the optimizer, so {g.name} is not conserved"
                missing.append(n)
                break
            if id(p) in breaking:
                g.expected_conserved = False
                g.reason = breaking[id(p)]
                break
    if missing:
        warnings.warn(
            f"ConservationMonitor.attach: the optimizer does not update {', '.join(dict.fromkeys(missing))}; "
            "the laws of the affected groups are not expected to be conserved",
            RuntimeWarning,
            stacklevel=3,
        )
