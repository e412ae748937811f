"""Unit and channel rescaling: the law of a hidden unit, a channel, a gated product, a norm's affine.

Symmetry: scale the incoming weights of unit u (its row of the producing layer, its bias, or
the (γ_u, β_u) of a normalization's affine part) by λ > 0 and every weight that reads it by
λ^(−k), where k is the positive homogeneity degree of the ops in between (1 for linear ops,
ReLU, pooling, a product u ⊙ σ(g) with a factor σ(g) that does not depend on u — SwiGLU and
GeGLU up rows, whatever σ is). Law (SCIENCE.md §5, §8):

    ‖w_in,u‖² + b_u² − k Σ_consumers ‖w_out,u‖²

Units that the model ties together (a rotation pairs coordinates i and i + d/2, an addition of
two arms that read different units at the same position) must share λ: their laws are summed
over the tie class. With only linear ops in between (no activation, no elementwise product,
no normalization) any invertible mixing M of a block of units is a symmetry, and the matrix
law [W b][W b]ᵀ − W_nextᵀ W_next holds (:func:`torch_conslaw.laws.matrix_balance`).

The readers below say which entries of a parameter a law reads, one row per unit (or per tie
class): ``Rows(idx)`` reads ``w[idx]`` (a ``Linear`` weight's output rows, a bias, γ, β, a
convolution's output channels), ``Columns(idx)`` reads ``w[:, idx]`` with the unit axis moved
first (a ``Linear`` weight's input columns, a ``Conv1D`` weight [in, out]'s output columns).
``idx`` has one row per law: a unit index, or a [classes, members, positions] block.
``Whole()`` reads a whole tensor as the one member of one class (a scalar gate α that
multiplies every unit of a layer: one law ‖W‖² + ‖b‖² − k α² for the layer). ``Sliced(e,
reader)`` reads ``reader(w[e])``: the weight of one expert stored in a 3-D parameter.

Example:
    >>> import torch
    >>> w = torch.arange(6.0).reshape(2, 3)
    >>> Rows(torch.tensor([1]))(w).tolist(), Columns(torch.tensor([[0, 2]]))(w).shape
    ([[3.0, 4.0, 5.0]], torch.Size([1, 2, 2]))
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Rows", "Columns", "GroupedColumns", "Whole", "Sliced", "Flat"]


class Rows:
    """Read ``w[idx]`` (a 1-D ``w`` gets a trailing axis, so a bias is one column per unit)."""

    def __init__(self, idx: Tensor) -> None:
        self.idx = idx.to(torch.long)

    def __call__(self, w: Tensor) -> Tensor:
        idx = self.idx.to(w.device)  # index_select: the same gather as w[idx], several times faster
        out = w.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *w.shape[1:])
        return out.unsqueeze(-1) if w.dim() == 1 else out

    def __repr__(self) -> str:
        return f"Rows({tuple(self.idx.shape)})"


class Columns:
    """Read ``w[:, idx]`` with the unit axes first (``[*idx.shape, w.shape[0], *w.shape[2:]]``)."""

    def __init__(self, idx: Tensor) -> None:
        self.idx = idx.to(torch.long)

    def __call__(self, w: Tensor) -> Tensor:
        idx = self.idx.to(w.device)  # index_select: the same gather as w[:, idx], several times faster
        out = w.index_select(1, idx.reshape(-1)).reshape(w.shape[0], *idx.shape, *w.shape[2:])
        return out.movedim(0, self.idx.dim())

    def __repr__(self) -> str:
        return f"Columns({tuple(self.idx.shape)})"


class GroupedColumns:
    """Read the weights of a grouped convolution (weight ``[out, in / groups, *kernel]``) that
    read input channel i: ``w[g·m:(g+1)·m, i − g·n]`` with n = in / groups, m = out / groups,
    g = i // n (a depthwise convolution: ``w[i·m:(i+1)·m, 0]``), unit axes first
    (``[*idx.shape, m, *w.shape[2:]]``).

    Example:
        >>> w = torch.arange(8.0).reshape(4, 2)  # 2 groups of 2 inputs and 2 outputs
        >>> GroupedColumns(torch.tensor([3]), 2)(w).tolist()
        [[5.0, 7.0]]
    """

    def __init__(self, idx: Tensor, groups: int) -> None:
        self.idx, self.groups = idx.to(torch.long), int(groups)

    def __call__(self, w: Tensor) -> Tensor:
        n, m = w.shape[1], w.shape[0] // self.groups
        i = self.idx.to(w.device).reshape(-1)
        g = i // n
        rows = g[:, None] * m + torch.arange(m, device=w.device)
        out = w[rows, (i - g * n)[:, None].expand_as(rows)]
        return out.reshape(*self.idx.shape, m, *w.shape[2:])

    def __repr__(self) -> str:
        return f"GroupedColumns({tuple(self.idx.shape)}, groups={self.groups})"


class Whole:
    """Read all of ``w`` as one member of one class (``[1, 1, w.numel()]``): a scalar gate."""

    def __call__(self, w: Tensor) -> Tensor:
        return w.reshape(1, 1, -1)

    def __repr__(self) -> str:
        return "Whole()"


class Sliced:
    """Read ``reader(w[index])``: a layer whose weight is one slice of a larger parameter (the
    experts of a mixture stored as one ``[experts, out, in]`` tensor, ``F.linear(x, W[e])``).

    Example:
        >>> w = torch.arange(12.0).reshape(2, 3, 2)
        >>> Sliced(1, Rows(torch.tensor([0])))(w).tolist()
        [[6.0, 7.0]]
    """

    def __init__(self, index: int, reader: Rows | Columns) -> None:
        self.index, self.reader = int(index), reader

    def __call__(self, w: Tensor) -> Tensor:
        return self.reader(w.select(0, self.index))

    def __repr__(self) -> str:
        return f"Sliced({self.index}, {self.reader!r})"


class Flat:
    """Read ``reader(w.reshape(-1))``: a gate γ whose entries are not laid out along its first
    axis (a per-channel scale stored as ``[1, C, 1, 1]``, a per-(token, channel) scale ``[T, C]``);
    the unit indices of ``reader`` are γ's flat indices.

    Example:
        >>> w = torch.arange(4.0).reshape(1, 4, 1, 1)
        >>> Flat(Rows(torch.tensor([[2]])))(w).tolist()
        [[[2.0]]]
    """

    def __init__(self, reader: Rows) -> None:
        self.reader = reader

    def __call__(self, w: Tensor) -> Tensor:
        return self.reader(w.reshape(-1))

    def __repr__(self) -> str:
        return f"Flat({self.reader!r})"
