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
3. Draw batches until one adds fewer directions than its size (after a full batch, the
   next has half as many rows as found so far, at least 8: each row costs a whole CG solve);
   the rank of all the null vectors of Ĝ found (relative singular values, with the gap
   kept) is dim null G. The rank is decided on null Ĝ, before the scaling: S can span many decades (a parameter with tiny
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

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .generators import GeneratorFamily
from .numerics import DEFAULT_RTOL, RankDecision, decide_rank
from ..progress import ProgressBar

__all__ = ["gram_null_space", "schur_null_space", "NullSpaceInfo", "ExactBlock", "batched_cg"]


@dataclass
class NullSpaceInfo:
    """How the null space was found: CG iterations per batch and the worst final residual, or
    (``eliminated`` set) the parameter block eliminated exactly and the size of the dense Schur
    complement left (:func:`schur_null_space`: no CG); ``not_eliminated`` says why no block was
    eliminated on the CG route ("" when the family offers none); ``schur_route`` is "factored"
    (through the block's input) or "streamed" (one Gram product per column)."""

    batches: list[int]
    cg_iterations: list[int]
    worst_relative_residual: float
    eliminated: str | None = None
    schur_size: int = 0
    not_eliminated: str = ""
    schur_route: str = ""


@dataclass(frozen=True)
class ExactBlock:
    """A parameter block on which the Gram operator is exactly ``I_out ⊗ PᵀP`` (checked):
    ``θ[index]`` viewed row-major as a matrix W (out × K), P the ``rows × K`` matrix of its
    layer's input patches. This holds for a ``Linear`` or ``Conv2d`` layer whose outputs are the
    model's outputs: output o at position p is ⟨W_o, a_p⟩, so ∂f/∂W is a on row o and 0
    elsewhere. With a bias, W is [weight | bias] and every patch ends with a 1.

    Optionally, the layer's input a(θ) as a map, for :func:`schur_null_space`'s factored route:
    ``input_tangents`` takes rows v (c × D, zero on the block) to the tangents of a (c × |a|, one
    jvp each), ``unfold`` takes such tangents to their patches (c × rows × K, the bias column 0)
    and ``fold`` is its adjoint (c × rows × K → c × |a|)."""

    name: str
    index: Tensor
    out: int
    patches: Tensor
    input_tangents: Callable[[Tensor], Tensor] | None = None
    unfold: Callable[[Tensor], Tensor] | None = None
    fold: Callable[[Tensor], Tensor] | None = None

    @property
    def numel(self) -> int:
        return self.index.numel()


def _jacobi_scale(diag: Tensor) -> Tensor:
    """S = diag^(-1/2) where the diagonal is positive, 1 where it is zero (an exactly zero gradient)."""
    return torch.where(diag > 0, diag.clamp_min(1e-300).rsqrt(), torch.ones_like(diag))


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
    exact_block = getattr(family, "gram_exact_block", None)
    block, not_eliminated = exact_block(theta) if exact_block is not None else (None, "")
    if block is not None:
        return schur_null_space(family, theta, block, rtol=rtol, max_dim=max_dim, progress=progress)
    if progress is not None and not_eliminated:
        progress.update(0, note=f"no layer eliminated ({not_eliminated}): CG")
    D = family.D
    gen = torch.Generator().manual_seed(seed + 7919)
    diag = family.gram_diagonal(theta)
    scale = _jacobi_scale(diag)
    matvec = family.gram_matvec(theta)
    op = lambda v: scale * matvec(scale * v)
    make_preconditioner = getattr(family, "gram_preconditioner", None)
    precondition = make_preconditioner(theta, diag, scale) if make_preconditioner is not None else None

    found = theta.new_zeros(0, D)
    info = NullSpaceInfo([], [], 0.0, not_eliminated=not_eliminated)
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
        # the next batch only has to show whether directions remain: half of those found
        # (≥ 8) keeps the total at ≤ 1.5 × dim null G + 8 rows (doubling costs up to 3 ×)
        batch = min(max(8, found.shape[0] // 2), max_dim - found.shape[0])


CANDIDATE_SIGMA = 1e-4
"""Schur eigenvalues whose square root (relative) is below this are rechecked unsquared."""


def schur_null_space(
    family: GeneratorFamily,
    theta: Tensor,
    block: ExactBlock,
    *,
    rtol: float = DEFAULT_RTOL,
    max_dim: int = 4096,
    progress: ProgressBar | None = None,
) -> tuple[Tensor, RankDecision, NullSpaceInfo]:
    """null G = W_1(θ)^⊥ by eliminating an exact block H (G_HH = I ⊗ PᵀP) and solving the rest densely.

    With B the other coordinates (n_B of them), G v = 0 iff v_H = −G_HH⁺ G_HB v_B (plus the
    null space of G_HH: null P on every row of W) and S v_B = 0, where
    S = G_BB − G_BH G_HH⁺ G_HB = J_Bᵀ (I − P_H) J_B is n_B × n_B: one symmetric
    eigendecomposition instead of a CG solve of hundreds of iterations per null vector, the way
    to count a model whose parameters sit mostly in its output layer. G_BB and S come from one
    of two routes, each giving the same matrices:

    * factored (when the block carries its layer's input map): n_B jvps through the layers
      before the block only, then dense products (:func:`_factored_schur`); checked against two
      Gram products G v (to 1e-10) and else dropped for
    * streamed: n_B Gram products G e_j, j in B (:func:`_streamed_schur`).

    The family must offer ``gram_matvec(θ)`` and ``jacobian_matvec(θ)`` (v ↦ J v).

    The rank is decided on relative singular values (SCIENCE.md §9): for S, σ_i =
    sqrt(λ_i / λ_max), λ eigenvalues of the Jacobi-scaled S and λ_max of the scaled G_BB; S
    squares the rounding noise (~1e-8 after the square root), so every σ_i below
    :data:`CANDIDATE_SIGMA` is recomputed unsquared as ‖J v_i‖ / sqrt(λ_max) from its full
    null-vector candidate v_i (one jvp each). For P, its singular values relative to the largest.
    """
    D = family.D
    head_index = block.index
    out, K = block.out, block.patches.shape[1]
    in_body = torch.ones(D, dtype=torch.bool)
    in_body[head_index] = False
    body = in_body.nonzero().flatten()
    n_body = body.numel()
    patches = block.patches
    if patches.shape[0] < K:  # fewer patches than columns: pad, so that vh spans all of R^K
        patches = torch.cat([patches, patches.new_zeros(K - patches.shape[0], K)])
    u_p, sv_p, vh_p = torch.linalg.svd(patches, full_matrices=False)
    patch_sigma = sv_p / sv_p[0].clamp_min(1e-300)
    patch = decide_rank(patch_sigma, rtol, K)
    w = vh_p[: patch.rank].T / sv_p[: patch.rank]  # G_HH⁺ = I_out ⊗ w wᵀ
    u = u_p[: block.patches.shape[0], : patch.rank]  # P w = u (orthonormal columns: range P)
    step = int(getattr(family, "matvec_chunk", 64))
    matvec = family.gram_matvec(theta)
    route = "streamed"
    if block.input_tangents is not None:
        g_bb, schur, head_part = _factored_schur(block, theta, body, w, u, matvec, step, progress)
        if _agrees_with_gram(theta, body, head_index, w, g_bb, head_part, matvec):
            route = "factored"
    if route == "streamed":
        g_bb, schur, head_part = _streamed_schur(block, theta, body, w, matvec, step, progress)
    d = torch.diagonal(g_bb).clone()
    d[d < 1e-20 * float(d.max())] = 0.0  # rounding noise of an exactly zero gradient: not scaled up
    scale = _jacobi_scale(d)
    scaled = scale[:, None] * schur * scale[None, :]
    del schur
    lam_max = float(torch.linalg.eigvalsh(scale[:, None] * g_bb * scale[None, :])[-1]) if n_body else 1.0
    lam, vecs = torch.linalg.eigh((scaled + scaled.T) / 2)
    sigma = (lam.clamp_min(0.0) / max(lam_max, 1e-300)).sqrt()
    candidates = (sigma < CANDIDATE_SIGMA).nonzero().flatten()
    v_body = scale[:, None] * vecs[:, candidates]  # n_B × c
    v_head = -head_part(v_body) @ w.T  # −G_HH⁺ G_HB v_B = −(G_HB v_B) w wᵀ
    full = theta.new_zeros(candidates.numel(), D)
    full[:, body] = v_body.T
    full[:, head_index] = v_head.reshape(candidates.numel(), out * K)
    if candidates.numel():
        push = family.jacobian_matvec(theta)
        residual = torch.cat([push(chunk).norm(dim=1) for chunk in full.split(step)])
        sigma[candidates] = residual / math.sqrt(max(lam_max, 1e-300))
    schur_decision = decide_rank(sigma, rtol, n_body)
    null_body = full[sigma[candidates] <= rtol]
    per_row = K - patch.rank  # W rows along null P leave every output unchanged
    n_null = null_body.shape[0] + out * per_row
    if n_null > max_dim:
        raise ValueError(
            f"the complement of W_1(θ) has {n_null} dimensions (D={D}), beyond max_dim={max_dim}: "
            "the matrix-free method is meant for small complements (e.g. ReLU networks); use "
            "method='dense' for this size or raise max_dim"
        )
    null_head = theta.new_zeros(out * per_row, D)
    if per_row:
        rows = torch.arange(out)
        head = theta.new_zeros(out, per_row, out, K)
        head[rows, :, rows, :] = vh_p[patch.rank :]
        null_head[:, head_index] = head.reshape(out * per_row, out * K)
    null = torch.cat([null_body, null_head])
    basis, _ = torch.linalg.qr(null.T) if null.shape[0] else (theta.new_zeros(D, 0), None)
    rejected = [x for x in (schur_decision.largest_rejected, patch.largest_rejected) if not math.isnan(x)]
    accepted = [x for x in (schur_decision.smallest_accepted, patch.smallest_accepted) if not math.isnan(x)]
    decision = RankDecision(
        rank=D - null.shape[0],
        candidates=D,
        largest_rejected=max(rejected) if rejected else math.nan,
        smallest_accepted=min(accepted) if accepted else math.nan,
        rtol=rtol,
    )
    if progress is not None:
        progress.update(0, note=f"complement of W_1: {null.shape[0]} directions (Schur, {n_body} × {n_body})")
    return basis, decision, NullSpaceInfo(
        [], [], 0.0, eliminated=block.name, schur_size=n_body, schur_route=route
    )


HeadPart = Callable[[Tensor], Tensor]
"""v_B (n_B × c) ↦ (G_HB v_B) w (c × out × rank P), G_HB v_B viewed out × K per column: G_HH⁺ G_HB v_B = that · wᵀ."""


def _streamed_schur(
    block: ExactBlock, theta: Tensor, body: Tensor, w: Tensor, matvec: Callable[[Tensor], Tensor],
    step: int, progress: ProgressBar | None,
) -> tuple[Tensor, Tensor, HeadPart]:
    """G_BB and S from the Gram columns G e_j (j in B), one Gram product each, streamed: only
    G_BB and T = G_BH (I ⊗ w) are kept (n_B × (n_B + out · rank P) numbers); S = G_BB − T Tᵀ."""
    n_body = body.numel()
    g_bb = theta.new_empty(n_body, n_body)
    t = theta.new_empty(n_body, block.out, w.shape[1])
    for start in range(0, n_body, step):
        idx = body[start : start + step]
        columns = matvec(_unit_rows(theta, idx))
        g_bb[start : start + idx.numel()] = columns[:, body]
        t[start : start + idx.numel()] = columns[:, block.index].reshape(idx.numel(), block.out, -1) @ w
        del columns
        if progress is not None:
            progress.update(0, note=f"Schur complement: {start + idx.numel()}/{n_body} Gram columns")
    flat_t = t.reshape(n_body, -1)
    return g_bb, g_bb - flat_t @ flat_t.T, lambda v: torch.einsum("jor,jc->cor", t, v)


def _unit_rows(theta: Tensor, idx: Tensor) -> Tensor:
    """The unit vectors e_j (rows, length D) of the coordinates ``idx``."""
    unit = theta.new_zeros(idx.numel(), theta.numel())
    unit[torch.arange(idx.numel()), idx] = 1.0
    return unit


def _factored_schur(
    block: ExactBlock, theta: Tensor, body: Tensor, w: Tensor, u: Tensor, matvec: Callable[[Tensor], Tensor],
    step: int, progress: ProgressBar | None,
) -> tuple[Tensor, Tensor, HeadPart]:
    """G_BB and S through the eliminated layer's input a: J_B v = unfold(J_a v) Wᵀ, so with
    G_W = WᵀW and Π = u uᵀ the projector on range P,

        G_BB = J_aᵀ fold(unfold(J_a) G_W),   S = J_aᵀ fold((I − Π) unfold(J_a) G_W),

    from the n_B tangents of a (jvps through the layers before the block only) and dense
    products of rows × K × K: no jvp or vjp through the block, whose outputs are most of the cost."""
    n_body = body.numel()
    weight = theta[block.index].view(block.out, -1)
    g_w = weight.T @ weight
    tangents = []
    for start in range(0, n_body, step):
        idx = body[start : start + step]
        tangents.append(block.input_tangents(_unit_rows(theta, idx)))
        if progress is not None:
            progress.update(0, note=f"Schur complement: {start + idx.numel()}/{n_body} input tangents")
    jac = torch.cat(tangents)  # n_B × |a|
    del tangents
    g_bb = theta.new_empty(n_body, n_body)
    proj = theta.new_empty(n_body, n_body)
    rows, K = block.patches.shape
    chunk = max(1, int(step * max(1, jac.shape[1]) // max(1, rows * K)))
    for start in range(0, n_body, chunk):
        e = block.unfold(jac[start : start + chunk]) @ g_w  # c × rows × K
        g_bb[start : start + e.shape[0]] = block.fold(e) @ jac.T
        e = u @ (u.T @ e)
        proj[start : start + e.shape[0]] = block.fold(e) @ jac.T
        del e
        if progress is not None:
            progress.update(0, note=f"Schur complement: {min(start + chunk, n_body)}/{n_body} rows (factored)")

    def head_part(v: Tensor) -> Tensor:
        patches = block.unfold(v.T @ jac)  # c × rows × K: the tangent of P along v
        return weight @ (patches.transpose(1, 2) @ u)  # G_HB v = W dPᵀ P, and P w = u

    return g_bb, g_bb - proj, head_part


def _agrees_with_gram(
    theta: Tensor, body: Tensor, head: Tensor, w: Tensor, g_bb: Tensor, head_part: HeadPart,
    matvec: Callable[[Tensor], Tensor], tol: float = 1e-10,
) -> bool:
    """G_BB and G_HB of a route against two Gram products G v (v random on B, zero on H)."""
    gen = torch.Generator().manual_seed(4245)
    v_body = torch.randn(body.numel(), 2, dtype=theta.dtype, generator=gen)
    probe = theta.new_zeros(2, theta.numel())
    probe[:, body] = v_body.T
    gram = matvec(probe)
    got_b, want_b = (g_bb @ v_body).T, gram[:, body]
    got_h = head_part(v_body).reshape(2, -1)
    want_h = (gram[:, head].reshape(2, -1, w.shape[0]) @ w).reshape(2, -1)
    close = lambda a, b: bool(((a - b).norm(dim=1) <= tol * b.norm(dim=1).clamp_min(1e-300)).all())
    return close(got_b, want_b) and close(got_h, want_h)
