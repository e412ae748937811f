"""The known conservation laws of a fully connected network, on the flat layout of
:class:`~torch_conslaw.lie.generators.MLPGenerators` (SCIENCE.md §5).

Per hidden layer: one law per unit for a positively homogeneous (gated) activation, the
matrix law [W_k b_k][W_k b_k]^T − W_{k+1}^T W_{k+1} (upper triangle) for a linear one.
Their gradients are orthogonal to W_φ(θ), which gives the calculator an independent upper
bound on dim Lie(W_φ)(θ).

Example:
    >>> import torch
    >>> from torch_conslaw.lie.generators import MLPGenerators
    >>> fam = MLPGenerators([4, 3, 5], ["linear"])
    >>> known_law_values(fam, torch.randn(fam.D, dtype=torch.float64)).shape
    torch.Size([6])
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jacrev

from .generators import MLPGenerators
from ..laws import matrix_balance, unit_balance
from .numerics import DEFAULT_RTOL, RankDecision, decide_rank

__all__ = ["known_law_values", "known_law_rank"]


def known_law_values(family: MLPGenerators, theta: Tensor) -> Tensor:
    """All known law values at θ, concatenated (per-unit laws, matrix-law upper triangles)."""
    layers = family.unflatten(theta)
    values = []
    for k, kind in enumerate(family.kinds):
        w_in, b_in = layers[k]
        w_out = layers[k + 1][0]
        incoming = w_in if b_in is None else torch.cat([w_in, b_in[:, None]], dim=1)
        outgoing = w_out.T
        if kind.gated:
            values.append(unit_balance(incoming, outgoing))
        else:
            q = matrix_balance(incoming, outgoing)
            rows, cols = torch.triu_indices(q.shape[0], q.shape[1])
            values.append(q[rows, cols])
    return torch.cat(values) if values else theta.new_zeros(0)


def known_law_rank(
    family: MLPGenerators, theta: Tensor, rtol: float = DEFAULT_RTOL, max_bytes: float = 2e9
) -> tuple[RankDecision, int] | None:
    """Rank of the known laws' gradients at θ (rows normalized) and how many laws there are.

    Returns None when the gradient matrix would exceed ``max_bytes``.
    """
    n_laws = known_law_values(family, theta).numel()
    if n_laws == 0:
        return decide_rank(theta.new_zeros(0), rtol, 0), 0
    if n_laws * family.D * 8 > max_bytes:
        return None
    jac = jacrev(lambda t: known_law_values(family, t))(theta)
    norms = torch.linalg.vector_norm(jac, dim=1, keepdim=True)
    jac = jac[norms.squeeze(1) > 0] / norms[norms.squeeze(1) > 0]
    s = torch.linalg.svdvals(jac) if jac.numel() else jac.new_zeros(0)
    return decide_rank(s, rtol, n_laws), n_laws
