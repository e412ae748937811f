"""Matrix-free complement of W_φ(θ): the null space of the Gram operator G = E_a[X_a X_a^T].

range G = W_φ(θ), so null G is the orthogonal complement of W_1(θ) — small for networks
with few laws, even when D is large. It is found without forming G:

1. Jacobi scaling: Ĝ = S G S with S = diag(G)^(-1/2) (exact diagonal from the family).
   For ReLU networks the nonzero spectrum of Ĝ lies in [1, L]; CG converges in a few dozen
   iterations. A family may also offer ``gram_preconditioner(θ, diag, scale)`` (modules:
   Kronecker-factored blocks per weight, :mod:`~torch_conslaw.lie.kronecker`) for
   preconditioned CG: the same solutions, fewer iterations.
2. For random R, solve Ĝ Y = Ĝ R by batched conjugate gradients (consistent, singular):
   R − Y lies in null Ĝ, and S (R − Y) in null G.
3. Draw batches until one adds fewer directions than its size; the rank of all the null
   vectors of Ĝ found (relative singular values, with the gap kept) is dim null G. The rank
   is decided on null Ĝ, before the scaling: S can span many decades (a parameter with tiny
   gradients), and its image would crush the other null directions below the threshold.

Example:
    >>> import torch
    >>> from torch_conslaw.lie.generators import MLPGenerators
    >>> fam = MLPGenerators([6, 4, 3], ["relu"])
    >>> theta = fam.random_point(torch.Generator().manual_seed(0))
    >>> basis, decision, info = gram_null_space(fam, theta)
    >>> basis.shape[1]
    4
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .generators import GeneratorFamily
from .numerics import DEFAULT_RTOL, RankDecision, decide_rank
from ..progress import ProgressBar

__all__ = ["gram_null_space", "NullSpaceInfo", "batched_cg"]


@dataclass
class NullSpaceInfo:
    """How the null space was found: CG iterations per batch and the worst final residual."""

    batches: list[int]
    cg_iterations: list[int]
    worst_relative_residual: float


def batched_cg(
    op: Callable[[Tensor], Tensor],
    rhs: Tensor,
    tol: float = 1e-14,
    max_iter: int = 1000,
    progress: ProgressBar | None = None,
    precondition: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, int, float]:
    """Solve op(X) = rhs row by row (op symmetric positive semi-definite, rhs in its range).

    Rows that have converged (residual ‖rhs − op(X)‖ below ``tol`` relative) are frozen.
    ``precondition`` (symmetric positive definite, row-wise) turns it into preconditioned CG:
    same solutions of the consistent system, fewer iterations when it is a good one.
    Returns (X, iterations, worst relative residual). ``progress`` gets a note every 10
    iterations (long counts at scale).
    """
    precondition = precondition or (lambda v: v)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = precondition(r)
    p = z.clone()
    norm = (r * r).sum(1).sqrt()
    rz = (r * z).sum(1)
    target = tol * norm
    active = norm > target
    it = 0
    for it in range(1, max_iter + 1):
        if not active.any():
            it -= 1
            break
        ap = op(p)
        curvature = (p * ap).sum(1)
        alpha = torch.where(active & (curvature > 0), rz / curvature.clamp_min(1e-300), torch.zeros_like(rz))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        norm = (r * r).sum(1).sqrt()
        active = active & (norm > target) & (curvature > 0)
        z = precondition(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(active, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_new
        if progress is not None and it % 10 == 0:
            worst_now = float((norm / (target / tol).clamp_min(1e-300)).max())
            progress.update(0, note=f"CG iteration {it}: {int(active.sum())} rows left, residual {worst_now:.1e}")
    worst = float((norm / (target / tol).clamp_min(1e-300)).max()) if rhs.numel() else 0.0
    return x, it, worst


def gram_null_space(
    family: GeneratorFamily,
    theta: Tensor,
    *,
    rtol: float = DEFAULT_RTOL,
    first_batch: int = 16,
    max_dim: int = 4096,
    chunk: int = 128,
    seed: int = 0,
    cg_tol: float = 1e-14,
    progress: ProgressBar | None = None,
) -> tuple[Tensor, RankDecision, NullSpaceInfo]:
    """Orthonormal basis (D × r) of null G = W_1(θ)^⊥, the rank decision behind r, and CG info.

    Raises ValueError when the complement exceeds ``max_dim`` (the matrix-free method is
    meant for factorizations with a small complement, e.g. ReLU networks).
    """
    D = family.D
    gen = torch.Generator().manual_seed(seed + 7919)
    diag = family.gram_diagonal(theta)
    scale = torch.where(diag > 0, diag.clamp_min(1e-300).rsqrt(), torch.ones_like(diag))
    matvec = family.gram_matvec(theta)
    op = lambda v: scale * matvec(scale * v)
    make_preconditioner = getattr(family, "gram_preconditioner", None)
    precondition = make_preconditioner(theta, diag, scale) if make_preconditioner is not None else None

    found = theta.new_zeros(0, D)
    info = NullSpaceInfo([], [], 0.0)
    batch = first_batch
    while True:
        vectors = []
        for start in range(0, batch, chunk):
            r = torch.randn(min(chunk, batch - start), D, dtype=theta.dtype, generator=gen)
            y, iters, worst = batched_cg(op, op(r), tol=cg_tol, progress=progress, precondition=precondition)
            info.cg_iterations.append(iters)
            info.worst_relative_residual = max(info.worst_relative_residual, worst)
            v = r - y  # in null Ĝ; the rank is decided there, where no coordinate dominates
            vectors.append(v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300))
        info.batches.append(batch)
        found = torch.cat([found, *vectors])
        u, s, _ = torch.linalg.svd(found.T, full_matrices=False)
        decision = decide_rank(s, rtol, found.shape[0])
        if progress is not None:
            progress.update(0, note=f"complement of W_1: {decision.rank} directions so far")
        if decision.rank < found.shape[0]:
            basis, _ = torch.linalg.qr(scale[:, None] * u[:, : decision.rank])  # null G = S null Ĝ
            return basis, decision, info
        if found.shape[0] >= max_dim:
            raise ValueError(
                f"the complement of W_1(θ) has at least {found.shape[0]} dimensions (D={D}), beyond "
                f"max_dim={max_dim}: the matrix-free method is meant for small complements (e.g. ReLU "
                "networks); use method='dense' for this size or raise max_dim"
            )
        batch = min(2 * batch, max_dim - found.shape[0])
