"""Counting: how many conservation laws exist (SCIENCE.md §3).

* :mod:`.engine` — the level loop W_1, W_2, … with its evidence (:func:`trace_dimension`,
  :func:`mlp_trace_dimension`);
* :mod:`.generators` — families of fields (explicit φ, MLP gated surrogates);
* :mod:`.flows` — the fields of other flows on any family (heavy ball, Nesterov, mirror);
* :mod:`.brackets` — bracket values by nested jvp;
* :mod:`.gram` — the matrix-free complement of W_1(θ);
* :mod:`.numerics` — rank decisions and thresholds;
* :mod:`.known` — known-law bounds for certification.

Example:
    >>> from torch_conslaw.lie import mlp_trace_dimension
    >>> mlp_trace_dimension([3, 4, 5], ["relu"]).n_laws
    4
"""

from .engine import LieResult, RankGapWarning, lie_trace, mlp_trace_dimension, trace_dimension
from .flows import with_flow
from .numerics import RankDecision

__all__ = [
    "LieResult", "RankDecision", "RankGapWarning", "lie_trace", "mlp_trace_dimension", "trace_dimension", "with_flow"
]
