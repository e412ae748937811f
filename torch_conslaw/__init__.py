"""torch_conslaw — conservation laws of gradient flows for PyTorch.

Three parts, each importable on its own:

* **Lie-algebra calculator** — :func:`trace_dimension` (any torch map φ),
  :func:`mlp_trace_dimension` (MLPs, without the path lifting), :func:`polynomial_laws`,
  :func:`polynomial_laws_of` (MLPs).
* **Conservation monitor** — :class:`ConservationMonitor` finds the laws of a live
  ``nn.Module``, tracks them through training and splits every change exactly into a
  symmetry-breaking (first-order) and a discretization (second-order) part;
  :func:`analyze` reports whether the tracked laws are complete; :func:`find_structure`
  shows the layer pairs it found.
* **Law formulas** — :mod:`torch_conslaw.laws`.

Names are imported lazily, so ``import torch_conslaw`` stays fast.

Example:
    >>> import torch_conslaw as tc
    >>> tc.mlp_trace_dimension([4, 3, 5], ["linear"]).n_laws
    6
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS: dict[str, str] = {
    # Lie-algebra calculator
    "trace_dimension": "torch_conslaw.lie",
    "mlp_trace_dimension": "torch_conslaw.lie",
    "LieResult": "torch_conslaw.lie",
    "count_laws": "torch_conslaw.lie.modules",
    "ModuleLieResult": "torch_conslaw.lie.modules",
    "CountBudgetError": "torch_conslaw.lie.modules",
    "RankGapWarning": "torch_conslaw.lie",
    "RankDecision": "torch_conslaw.lie.numerics",
    "with_flow": "torch_conslaw.lie.flows",  # flows with momentum / mirror flows
    "polynomial_laws": "torch_conslaw.polynomial",
    "polynomial_laws_of": "torch_conslaw.polynomial",
    # Conservation monitor
    "ConservationMonitor": "torch_conslaw.monitor",
    "find_structure": "torch_conslaw.structure",
    "find_graph_laws": "torch_conslaw.structure",
    "analyze": "torch_conslaw.completeness",
    "Analysis": "torch_conslaw.completeness",
    "register_activation": "torch_conslaw.catalogue",
    "register_layer": "torch_conslaw.catalogue",
    "register_internal_laws": "torch_conslaw.catalogue",
    "OverheadBudget": "torch_conslaw.monitor.budget",
    "DEFAULT_OVERHEAD_BUDGET": "torch_conslaw.monitor.monitor",
    "verify_laws": "torch_conslaw.laws.verify",
    "Verification": "torch_conslaw.laws.verify",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torch_conslaw' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .monitor.budget import OverheadBudget
    from .monitor.monitor import DEFAULT_OVERHEAD_BUDGET
    from .completeness import Analysis, analyze
    from .catalogue import register_activation, register_internal_laws, register_layer
    from .lie import LieResult, mlp_trace_dimension, trace_dimension
    from .monitor import ConservationMonitor
    from .lie.numerics import RankDecision
    from .lie.flows import with_flow
    from .lie import RankGapWarning
    from .lie.modules import CountBudgetError, ModuleLieResult, count_laws
    from .polynomial import polynomial_laws, polynomial_laws_of
    from .structure import find_graph_laws, find_structure
    from .laws.verify import Verification, verify_laws
