"""Exact per-step identities of SGD with momentum and weight decay (SCIENCE.md §6, §10).

Pure math on the rows of one law group: no hooks, no optimizer, no buffers. ``incoming`` and
``outgoing`` are the rows of a group in the layout of :mod:`torch_conslaw.laws.forms` (one row
per hidden unit); ``v_in`` / ``v_out`` are the same rows read from the momentum buffers (the
velocity v, laid out exactly like θ).

PyTorch's SGD with momentum μ, dampening d and coupled weight decay λ takes
``v⁺ = μ v + c (g + λ θ)`` and ``θ⁺ = θ − η v⁺`` with ``c = 1 − d`` (``c = 1`` at the step
that creates the buffer, from ``v = 0``).

**Velocity laws** (:func:`velocity_law`). A linear hidden layer (or an attention head) keeps
I → A I, O → A^{-T} O for every invertible A; the rotations A = exp(εS), S = −Sᵀ, act on the
stacked rows Θ = [I | O] as Θ → exp(εS) Θ, an antisymmetric generator X of the loss's
symmetry. For the plane (i, j), ``L_ij = ⟨v, X_ij θ⟩ = (Θ Vᵀ − V Θᵀ)_ij``, i.e.
``2 · antisym(W_in V_inᵀ − V_outᵀ W_out)`` with biases appended. Because ⟨g, Xθ⟩ = 0,
⟨θ, Xθ⟩ = 0 and ⟨v⁺, Xv⁺⟩ = 0, every step gives **L⁺ = μ L exactly**, at any η, d, λ.

**Quadratic laws under momentum** (:func:`momentum_recurrence`). For h = B(θ, θ) with Aθ ⊥ g
and q = B(θ, v)::

    h⁺ = (1 − 2ηcλ) h − 2ημ q + η² B(v⁺, v⁺)
    q⁺ = μ q + cλ h − η B(v⁺, v⁺)

(expand θ⁺ = θ − ηv⁺ and use B(θ, g) = 0; with d = λ = 0 this is SCIENCE.md §6).

**Weight decay without momentum** (:func:`decay_recurrence`): θ⁺ = (1 − ηλ)θ − ηg, so
h⁺ = (1 − ηλ)² h + η² B(g, g): once the (1 − ηλ)² factor is removed, the change has no first
order part.

Each identity is checked by its residual, state⁺ − prediction, relative to a Cauchy–Schwarz
bound of its terms (the monitor's :mod:`torch_conslaw.velocity_tracking`).

Example:
    >>> import torch
    >>> w1, w2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    >>> v1, v2 = torch.randn_like(w1), torch.randn_like(w2)
    >>> L = velocity_law(w1, w2.T, v1, v2.T)
    >>> L.shape  # one law per plane (i, j), i < j
    torch.Size([3])
    >>> S = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    >>> theta_dot = (S.T @ w1, (S.T @ w2.T).T)  # X_01 θ: rotate units 0 and 1
    >>> by_hand = (v1 * theta_dot[0]).sum() + (v2 * theta_dot[1]).sum()
    >>> bool(torch.isclose(L[0], by_hand))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..forms import matrix_balance_bilinear, unit_balance_bilinear

__all__ = [
    "PhaseState",
    "phase_state",
    "velocity_law",
    "velocity_count",
    "quadratic_bilinear",
    "momentum_recurrence",
    "decay_recurrence",
]


def velocity_count(units: int) -> int:
    """Number of velocity laws of a group of ``units`` rows: n(n − 1)/2 rotation planes.

    Example:
        >>> velocity_count(4)
        6
    """
    return units * (units - 1) // 2


def velocity_law(incoming: Tensor, outgoing: Tensor, v_in: Tensor, v_out: Tensor) -> Tensor:
    """``L_ij = (Θ Vᵀ − V Θᵀ)_ij`` for i < j (row-major), Θ = [incoming | outgoing] and
    V = [v_in | v_out] (rows per unit); ``L_ij = ⟨v, X_ij θ⟩`` for the rotation X_ij of units
    i and j.

    Example:
        >>> import torch
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> velocity_law(x, x, x.flip(0), x.flip(0)).tolist()
        [0.0]
    """
    theta = torch.cat([incoming.flatten(1), outgoing.flatten(1)], 1)
    vel = torch.cat([v_in.flatten(1), v_out.flatten(1)], 1)
    m = theta @ vel.T
    i, j = _triu(m.shape[0], 1, m.device)
    return m[i, j] - m[j, i]


def quadratic_bilinear(
    kind: str, degree: float, in_a: Tensor, out_a: Tensor, in_b: Tensor, out_b: Tensor
) -> Tensor:
    """B(a, b) of a group's quadratic laws (the order of its law vector): per unit
    ⟨in_a, in_b⟩ − k⟨out_a, out_b⟩, or the upper triangle (diagonal included, row-major) of
    the symmetrized matrix law for ``kind == "matrix"``.

    Example:
        >>> import torch
        >>> a = torch.ones(2, 3, dtype=torch.float64)
        >>> quadratic_bilinear("matrix", 1.0, a, a[:, :1], a, a[:, :1]).tolist()
        [2.0, 2.0, 2.0]
    """
    if kind == "matrix":
        q = matrix_balance_bilinear(in_a, out_a, in_b, out_b)
        i, j = _triu(q.shape[0], 0, q.device)
        return q[i, j]
    return unit_balance_bilinear(in_a.flatten(1), out_a.flatten(1), in_b.flatten(1), out_b.flatten(1), degree)


def momentum_recurrence(
    h: Tensor, q: Tensor, vv_next: Tensor, lr: float, momentum: float, coupling: float, weight_decay: float
) -> tuple[Tensor, Tensor]:
    """The (h⁺, q⁺) the momentum recurrence predicts from h, q = B(θ, v) and B(v⁺, v⁺);
    ``coupling`` is c (1 − dampening, or 1 at the step that creates the buffer).

    Example:
        >>> import torch
        >>> one = torch.ones(1, dtype=torch.float64)
        >>> [t.item() for t in momentum_recurrence(one, one, one, 0.1, 0.9, 1.0, 0.0)]
        [0.83, 0.8]
    """
    h_next = (1.0 - 2.0 * lr * coupling * weight_decay) * h - 2.0 * lr * momentum * q + lr * lr * vv_next
    q_next = momentum * q + coupling * weight_decay * h - lr * vv_next
    return h_next, q_next


def decay_recurrence(h: Tensor, gg: Tensor, lr: float, weight_decay: float) -> Tensor:
    """h⁺ = (1 − ηλ)² h + η² B(g, g), SGD with coupled weight decay λ and no momentum.

    Example:
        >>> import torch
        >>> decay_recurrence(torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), 0.1, 1.0).item()
        0.81
    """
    return (1.0 - lr * weight_decay) ** 2 * h + lr * lr * gg


@dataclass
class PhaseState:
    """The quantities of one group at one (θ, v): the laws h = B(θ, θ), q = B(θ, v),
    vv = B(v, v), the velocity laws L (matrix groups) and the norms ‖θ‖, ‖v‖ of its rows.
    Without a velocity, ``q``, ``vv`` and ``L`` are ``None`` and ``norm_v`` is 0."""

    h: Tensor
    norm_theta: float
    q: Tensor | None = None
    vv: Tensor | None = None
    L: Tensor | None = None
    norm_v: float = 0.0


def phase_state(
    kind: str,
    degree: float,
    incoming: Tensor,
    outgoing: Tensor,
    v_in: Tensor | None = None,
    v_out: Tensor | None = None,
) -> PhaseState:
    """h, q, vv, L and the norms of a group in one pass: for a matrix group, one Gram matrix
    of the stacked rows [θ; v] per side gives all of them (same values as
    :func:`quadratic_bilinear` and :func:`velocity_law`, up to float64 summation order).

    Example:
        >>> import torch
        >>> w1, w2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        >>> v1, v2 = torch.randn_like(w1), torch.randn_like(w2)
        >>> s = phase_state("matrix", 1.0, w1, w2.T, v1, v2.T)
        >>> bool(torch.allclose(s.L, velocity_law(w1, w2.T, v1, v2.T)))
        True
        >>> bool(torch.allclose(s.q, quadratic_bilinear("matrix", 1.0, w1, w2.T, v1, v2.T)))
        True
    """
    i_t, o_t = incoming.flatten(1), outgoing.flatten(1)
    with_v = v_in is not None and v_out is not None
    if kind != "matrix":
        sq_i, sq_o = i_t.square().sum(1), o_t.square().sum(1)
        state = PhaseState(h=sq_i - degree * sq_o, norm_theta=float(sq_i.sum() + sq_o.sum()) ** 0.5)
        if with_v:
            i_v, o_v = v_in.flatten(1), v_out.flatten(1)  # type: ignore[union-attr]
            vi, vo = i_v.square().sum(1), o_v.square().sum(1)
            state.q = (i_t * i_v).sum(1) - degree * (o_t * o_v).sum(1)
            state.vv = vi - degree * vo
            state.norm_v = float(vi.sum() + vo.sum()) ** 0.5
        return state
    n = i_t.shape[0]
    if with_v:
        i_t = torch.cat([i_t, v_in.flatten(1)])  # type: ignore[union-attr]
        o_t = torch.cat([o_t, v_out.flatten(1)])  # type: ignore[union-attr]
    gi, go = i_t @ i_t.T, o_t @ o_t.T
    d = gi - go  # blocks: θθ, θv / vθ, vv
    s = gi + go
    a, b = _triu(n, 0, d.device)
    diag = s.diagonal()
    state = PhaseState(h=d[a, b], norm_theta=float(diag[:n].sum()) ** 0.5)
    if with_v:
        cross = d[:n, n:]
        state.q = 0.5 * (cross[a, b] + cross[b, a])
        state.vv = d[n:, n:][a, b]
        i, j = _triu(n, 1, d.device)
        m = s[:n, n:]  # Θ Vᵀ with Θ = [I | O]
        state.L = m[i, j] - m[j, i]
        state.norm_v = float(diag[n:].sum()) ** 0.5
    return state


@lru_cache(maxsize=256)
def _triu(n: int, offset: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row-major upper-triangle indices (cached: a law group asks for the same ones each step)."""
    i, j = torch.triu_indices(n, n, offset=offset, device=device)
    return i, j
