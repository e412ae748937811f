"""The monitor's evaluator: every law of a record in one float64 table.

:class:`LawTable` is what every recorder calls (``monitor.evaluator``): ``values(params)``
returns ``[1, laws]`` and ``split(before, after)`` returns ``[3, laws]`` (h(θ⁺), the first
order 2 B(θ, Δ) and the second order B(Δ, Δ)), the columns of the groups in order. It wraps an
:class:`~torch_conslaw.accounting.Accountant` (one process) or a
:class:`~.sharded.ShardedLaws` (FSDP2 shards, one all-reduce per record); wrapping its methods
observes each evaluation on the thread that runs it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw.accounting import Accountant
    >>> from torch_conslaw.lawgroups import build_groups
    >>> from torch_conslaw.structure import find_structure
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> table = LawTable(Accountant(build_groups(find_structure(model).pairs)))
    >>> table.values(dict(model.named_parameters())).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["LawTable"]


class LawTable:
    """``values`` / ``split`` of every law as one table (see the module doc); ``inner`` is
    the :class:`~torch_conslaw.accounting.Accountant` or sharded evaluator it wraps."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def values(self, params: Mapping[str, Tensor]) -> Tensor:
        """``[1, laws]``: h(θ), float64."""
        return self.inner.values_table(params)

    def split(self, before: Mapping[str, Tensor], after: Mapping[str, Tensor], advance: bool = False) -> Tensor:
        """``[3, laws]``: h(θ⁺), 2 B(θ, Δ) and B(Δ, Δ), float64. ``advance`` (one process
        only): also copy θ⁺ into ``before`` (the caller's buffers, then θ before the next step)."""
        if advance:
            return self.inner.split_table(before, after, advance=True)
        return self.inner.split_table(before, after)

    def initial(self, params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """θ₀: the law values and natural scales of every group (dicts)."""
        return self.inner.initial(params)

    def __repr__(self) -> str:
        return f"LawTable({self.inner!r})"
