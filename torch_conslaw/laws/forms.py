"""Closed-form conservation laws of linear and positively homogeneous layers.

Every law here is a quadratic form h(θ) = B(θ, θ) of a symmetric bilinear form B.
Each function therefore comes in two flavours: the law itself and its bilinear form,
so that the exact change over a step Δ splits as
``h(θ + Δ) − h(θ) = 2 B(θ, Δ) + B(Δ, Δ)`` (SCIENCE.md §6).

Layout convention, shared by the Lie calculator and the monitor:

* ``incoming``: one row per hidden unit (or channel), holding every weight that *feeds*
  the unit, its bias appended as a last column when there is one;
* ``outgoing``: one row per hidden unit, holding every weight that *reads* the unit
  (for a ``Linear`` consumer: ``W_next.T``; for a convolution or a flatten, every tap).

Example:
    >>> import torch
    >>> w1, w2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    >>> unit_balance(w1, w2.T).shape
    torch.Size([3])
"""

from __future__ import annotations

from torch import Tensor

__all__ = [
    "unit_balance",
    "unit_balance_bilinear",
    "matrix_balance",
    "matrix_balance_bilinear",
]


def unit_balance_bilinear(
    incoming_a: Tensor,
    outgoing_a: Tensor,
    incoming_b: Tensor,
    outgoing_b: Tensor,
    degree: float = 1.0,
) -> Tensor:
    """Bilinear form of :func:`unit_balance`: ⟨in_a, in_b⟩ − k ⟨out_a, out_b⟩ per unit.

    Example:
        >>> import torch
        >>> a, b = torch.ones(2, 3), torch.ones(2, 1)
        >>> unit_balance_bilinear(a, b, a, b).tolist()
        [2.0, 2.0]
    """
    inc = (incoming_a * incoming_b).flatten(1).sum(1)
    out = (outgoing_a * outgoing_b).flatten(1).sum(1)
    return inc - degree * out


def unit_balance(incoming: Tensor, outgoing: Tensor, degree: float = 1.0) -> Tensor:
    """Per-unit law ‖w_in‖² (+ b²) − k ‖w_out‖² of a positively k-homogeneous activation.

    ``degree`` is the homogeneity k of σ (σ(cz) = c^k σ(z) for c > 0): 1 for ReLU,
    LeakyReLU, PReLU and identity, 2 for ReLU².

    Example:
        >>> import torch
        >>> unit_balance(torch.tensor([[3.0, 4.0]]), torch.tensor([[5.0]])).item()
        0.0
    """
    return unit_balance_bilinear(incoming, outgoing, incoming, outgoing, degree)


def matrix_balance_bilinear(
    incoming_a: Tensor, outgoing_a: Tensor, incoming_b: Tensor, outgoing_b: Tensor
) -> Tensor:
    """Symmetric bilinear form of :func:`matrix_balance` (an n × n matrix).

    Example:
        >>> import torch
        >>> x = torch.eye(2)
        >>> matrix_balance_bilinear(x, x, x, x).abs().sum().item()
        0.0
    """
    inc = incoming_a.flatten(1) @ incoming_b.flatten(1).T
    out = outgoing_a.flatten(1) @ outgoing_b.flatten(1).T
    diff = inc - out
    return 0.5 * (diff + diff.T)


def matrix_balance(incoming: Tensor, outgoing: Tensor) -> Tensor:
    """Matrix law [W_k b_k][W_k b_k]^T − W_{k+1}^T W_{k+1} of a linear hidden layer.

    Example:
        >>> import torch
        >>> w1, w2 = torch.randn(3, 4), torch.randn(5, 3)
        >>> matrix_balance(w1, w2.T).shape
        torch.Size([3, 3])
    """
    return matrix_balance_bilinear(incoming, outgoing, incoming, outgoing)
