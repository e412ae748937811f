"""Polynomial conservation laws: every polynomial h of degree ≤ k with ∇h ⊥ W_φ (SCIENCE.md §4).

The unknowns are the coefficients c of h in the monomial basis of degree 1..k (constants
dropped). Each random pair (θ_s, a_s) gives one linear equation

    Σ_m c_m ⟨∇m(θ_s), X_a(θ_s)⟩ = 0,      X_a = ∂φ(θ)^T a,

so the laws are the null space of a tall random (2M + 20) × M matrix for M unknowns. Its QR
factor R gives the null space (full SVD for small M, block inverse iteration otherwise) with
a relative threshold and the singular-value gap as evidence; the laws are then reduced to
row-echelon form, rationalized, sparsified by exact row operations, and verified: exactly with sympy when φ is known as a
polynomial (evaluated on symbols, or an MLP's path factorization), otherwise at fresh random
points.

Monomials are stored as *slots*: a monomial of degree ≤ k is a sorted tuple of k variable
indices in 0..D, where index D stands for the constant 1. Values and directional
derivatives then cost O(k) per monomial, whatever D is.

Example:
    >>> laws = polynomial_laws(lambda t: t[0:1] * t[1:2] * t[2:3], 3, 2)
    >>> [str(h) for h in laws], laws.verified
    (['x1**2 - x3**2', 'x2**2 - x3**2'], ['symbolic', 'symbolic'])
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import sympy
import torch
from torch import Tensor

from .lie.numerics import torch_threads
from .progress import ProgressBar

__all__ = [
    "FieldSampler",
    "NonFiniteFields",
    "format_law",
    "MonomialBasis",
    "PolynomialLaws",
    "monomial_basis",
    "polynomial_laws",
    "polynomial_laws_of",
]

DTYPE = torch.float64
_SYMBOLIC_MAX_D = 200  # beyond this, φ is not evaluated on sympy symbols
_SYMBOLIC_MAX_WORK = 50_000  # outputs × D partial derivatives allowed for exact checks
_CHUNK_BYTES = 64 * 2**20  # temporaries of one block of equations
_VERIFY_POINTS = 6
_DENSE_SVD_MAX = 1000  # up to this many unknowns, the null space comes from a full SVD
_SINGLE_THREAD_MAX = 1500  # up to this many unknowns, one thread: LAPACK with busy threads
# on a loaded 2-core machine was measured 10-40x slower on these small matrices (as in lie/engine.py)


class FieldSampler(Protocol):
    """Anything that draws the vector fields X_a(θ) of a factorization (see lie/generators.py)."""

    D: int

    def sample(self, theta: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """``n`` fields X_a(θ) for random a, shape (n, D)."""


# --------------------------------------------------------------------------------------
# Monomial basis


@dataclass(frozen=True)
class MonomialBasis:
    """All monomials of degree 1..k in D variables, as slot indices (index D = constant 1).

    Ordered by degree, highest first, then lexicographically (x1² before x1·x2), so that a
    row-echelon form of the laws puts its pivots on the highest-degree terms.

    Example:
        >>> basis = monomial_basis(2, 2)
        >>> basis.exponents.tolist()
        [[2, 0], [1, 1], [0, 2], [1, 0], [0, 1]]
    """

    slots: Tensor  # (M, k) int64
    D: int

    @property
    def degree(self) -> int:
        """Largest degree k."""
        return self.slots.shape[1]

    @property
    def size(self) -> int:
        """Number of monomials M = C(D + k, k) − 1."""
        return self.slots.shape[0]

    @cached_property
    def exponents(self) -> np.ndarray:
        """Exponent vectors, shape (M, D)."""
        exps = np.zeros((self.size, self.D + 1), dtype=np.int64)
        rows = np.repeat(np.arange(self.size), self.slots.shape[1])
        np.add.at(exps, (rows, self.slots.numpy().reshape(-1)), 1)
        return exps[:, : self.D]

    @property
    def degrees(self) -> np.ndarray:
        """Total degree of each monomial, shape (M,)."""
        return (self.slots < self.D).sum(1).numpy()

    def _cofactors(self, points: Tensor) -> Tensor:
        """∂/∂(slot s) of each monomial: the product of its other slots, shape (P, M, k)."""
        ones = points.new_ones(points.shape[0], 1)
        vals = torch.cat([points, ones], 1)[:, self.slots]
        before = torch.cat([torch.ones_like(vals[..., :1]), vals[..., :-1].cumprod(-1)], -1)
        rev = vals.flip(-1)
        after = torch.cat([torch.ones_like(rev[..., :1]), rev[..., :-1].cumprod(-1)], -1).flip(-1)
        return before * after

    def directional(self, points: Tensor, fields: Tensor) -> Tensor:
        """⟨∇m(θ_p), X_pf⟩ for points (P, D) and fields (P, F, D); shape (P, F, M)."""
        padded = torch.cat([fields, fields.new_zeros(*fields.shape[:2], 1)], 2)
        return torch.einsum("pfmk,pmk->pfm", padded[:, :, self.slots], self._cofactors(points))

    def gradients(self, point: Tensor) -> Tensor:
        """Gradients of all monomials at one point (D,), shape (M, D)."""
        grads = point.new_zeros(self.size, self.D + 1)
        grads.scatter_add_(1, self.slots, self._cofactors(point[None])[0])
        return grads[:, : self.D]


def _slot_table(D: int, degree: int) -> np.ndarray:
    """Non-decreasing index tuples over 0..D of length ``degree``, in lexicographic order."""
    rows = np.arange(D + 1)[:, None]
    for _ in range(degree - 1):
        last = rows[:, -1]
        counts = D + 1 - last
        parent = np.repeat(np.arange(len(rows)), counts)
        offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = np.concatenate([rows[parent], (last[parent] + offset)[:, None]], 1)
    return rows[:-1]  # the last tuple (D, …, D) is the constant monomial


def monomial_basis(D: int, degree: int) -> MonomialBasis:
    """The monomials of degree 1..``degree`` in ``D`` variables (vectorized, no sympy).

    Example:
        >>> monomial_basis(3, 2).size
        9
    """
    slots = _slot_table(D, degree)
    order = np.argsort(-(slots < D).sum(1), kind="stable")
    return MonomialBasis(torch.from_numpy(np.ascontiguousarray(slots[order])), D)


def n_unknowns(D: int, degree: int) -> int:
    """C(D + k, k) − 1, the number of monomials of degree 1..k.

    Example:
        >>> n_unknowns(3, 2)
        9
    """
    return math.comb(D + degree, degree) - 1


# --------------------------------------------------------------------------------------
# Input checks and memory budget


def _check_degree(degree: Any) -> int:
    if not isinstance(degree, int) or isinstance(degree, bool):
        raise TypeError(f"degree must be an integer >= 1, got {type(degree).__name__} {degree!r}")
    if degree < 1:
        raise ValueError(f"degree must be >= 1 (constants are not laws), got {degree}")
    return degree


def _peak_bytes(M: int, degree: int) -> int:
    """Peak memory of the solver: the (2M + 20) × M equation matrix, the copy QR makes of it,
    R, plus the temporaries of one chunk of equations. Measured for M = 4059 (degree 3,
    D = 27): 0.66 GB; this gives 0.73 GB."""
    temporaries = min(_CHUNK_BYTES, 24 * degree * (2 * M + 20) * M)
    return 8 * (2 * (2 * M + 20) * M + M * M) + temporaries


def _check_memory(D: int, degree: int, memory_budget: float) -> None:
    M = n_unknowns(D, degree)
    need = _peak_bytes(M, degree)
    if need <= memory_budget:
        return
    fits = [k for k in range(1, degree) if _peak_bytes(n_unknowns(D, k), k) <= memory_budget]
    hint = f"use degree <= {fits[-1]}" if fits else "no degree fits: reduce D"
    rows = 2 * M + 20
    raise ValueError(
        f"degree {degree} in D = {D} variables gives {M} unknown coefficients (C(D+k, k) - 1) "
        f"and an equation matrix of {rows} x {M} ({8 * rows * M / 1e9:.3g} GB as float64); "
        f"the solver needs about {need / 1e9:.3g} GB, over memory_budget = "
        f"{memory_budget / 1e9:.3g} GB: {hint}, or raise memory_budget"
    )


# --------------------------------------------------------------------------------------
# Equations and their null space


@dataclass(frozen=True)
class NullSpace:
    """Null space of the equation matrix and the evidence behind its dimension."""

    coefficients: np.ndarray  # (K, M), one candidate law per row, original monomial scale
    n_equations: int
    smallest_accepted: float | None  # σ/σ_max of the last direction kept as an equation
    largest_rejected: float | None  # σ/σ_max of the largest direction called a law
    clear_gap: bool


def _random_point(sampler: FieldSampler, gen: torch.Generator) -> Tensor:
    draw = getattr(sampler, "random_point", None)
    return draw(gen) if callable(draw) else torch.randn(sampler.D, dtype=DTYPE, generator=gen)


def _fields_per_point(sampler: FieldSampler, gen: torch.Generator) -> int:
    """Generic rank of W_φ(θ): the number of independent equations one point can give."""
    fields = sampler.sample(_random_point(sampler, gen), sampler.D, gen)
    s = torch.linalg.svdvals(fields)
    return max(1, int((s > 1e-10 * s[0]).sum())) if s[0] > 0 else 1


def _sample_fields(sampler: FieldSampler, points: Tensor, per_point: int, gen: torch.Generator) -> Tensor:
    """Fields at each point, shape (P, per_point, D): one batched gradient when the sampler
    is a generator family (``psi_batch``, ``sample_keys``), else ``sample`` per point."""
    if callable(getattr(sampler, "psi_batch", None)) and callable(getattr(sampler, "sample_keys", None)):
        from .lie.generators import fields

        keys = sampler.sample_keys(points.shape[0] * per_point, gen)
        batch = fields(sampler, points.repeat_interleave(per_point, 0), keys)
        return batch.reshape(points.shape[0], per_point, sampler.D)
    return torch.stack([sampler.sample(p, per_point, gen) for p in points])


def _equation_block(
    sampler: FieldSampler, basis: MonomialBasis, n_points: int, per_point: int, gen: torch.Generator
) -> Tensor:
    """Rows ⟨∇m(θ), X_a(θ)⟩ at ``n_points`` fresh points, ``per_point`` fields each."""
    points = torch.stack([_random_point(sampler, gen) for _ in range(n_points)])
    return basis.directional(points, _sample_fields(sampler, points, per_point, gen)).reshape(-1, basis.size)


def _normalize_rows_(block: Tensor) -> Tensor:
    """Scale each nonzero row to unit norm, in place."""
    norms = block.norm(dim=1, keepdim=True)
    return block.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))


def _equation_matrix(
    sampler: FieldSampler, basis: MonomialBasis, per_point: int, n_points: int, gen: torch.Generator, bar: ProgressBar
) -> tuple[Tensor, Tensor]:
    """The (n_points · per_point) × M equations, filled in chunks whose temporaries stay
    under ``_CHUNK_BYTES``: columns divided by their norms in the first chunk, then rows
    scaled to unit norm. Returns the matrix and the column scales."""
    M = basis.size
    chunk_points = max(1, _CHUNK_BYTES // (24 * per_point * M * basis.slots.shape[1]))
    A = torch.empty(n_points * per_point, M, dtype=DTYPE)
    scale: Tensor | None = None
    for start in range(0, n_points, chunk_points):
        n = min(chunk_points, n_points - start)
        block = _equation_block(sampler, basis, n, per_point, gen)
        if scale is None:
            norms = block.norm(dim=0)
            scale = torch.where(norms > 0, norms, torch.ones_like(norms))
        A[start * per_point : (start + n) * per_point] = _normalize_rows_(block.div_(scale))
        bar.update(n)
    assert scale is not None
    return A, scale


class NonFiniteFields(ValueError):
    """The fields of the map are not finite at some of the random points a search samples."""


def _null_space(
    sampler: FieldSampler,
    basis: MonomialBasis,
    per_point: int,
    gen: torch.Generator,
    rtol: float,
    progress: bool | None,
) -> NullSpace:
    """≥ 2M + 20 equations (``per_point`` per random point), their QR factor R, and the
    smallest singular values of R split at ``rtol``."""
    M = basis.size
    n_points = math.ceil((2 * M + 20) / per_point)
    with ProgressBar(n_points, "equations", enabled=progress) as bar:
        bar.update(0, note=f"{M} unknowns")
        A, scale = _equation_matrix(sampler, basis, per_point, n_points, gen, bar)
        if not bool(torch.isfinite(A).all()):
            raise NonFiniteFields(
                "the gradient fields are not finite at some random parameter points (the map divides by "
                "a quantity that vanishes there, e.g. the norm of a ReLU layer's output, or overflows), so "
                "no polynomial law can be fitted to them"
            )
        bar.update(0, note="QR")
        R = torch.linalg.qr(A, mode="r").R
        del A
        bar.update(0, note="null space")
        rel, vectors = _smallest_singular(R, rtol, gen)
    return _split_spectrum(rel, vectors, scale, n_points * per_point, rtol)


def _largest_singular(R: Tensor, gen: torch.Generator, iterations: int = 30) -> float:
    """σ_max(R) by power iteration on R^T R (slight underestimate, enough for thresholds)."""
    v = torch.randn(R.shape[1], dtype=DTYPE, generator=gen)
    for _ in range(iterations):
        v = R.T @ (R @ v)
        norm = v.norm()
        if norm == 0:
            return 0.0
        v = v / norm
    return float((R @ v).norm())


def _inverse_iteration(R: Tensor, top: float, width: int, gen: torch.Generator, iterations: int = 3) -> tuple[Tensor, Tensor]:
    """The ``width`` smallest singular values of upper-triangular R (relative to ``top``,
    ascending) and their right singular vectors (rows), by block inverse iteration on R^T R
    followed by Rayleigh–Ritz. Zero pivots are lifted to ε·top, a perturbation below rounding."""
    floor = torch.finfo(DTYPE).eps * top
    diag = R.diagonal()
    lifted = R.clone()
    lifted.diagonal().copy_(torch.where(diag.abs() >= floor, diag, torch.where(diag < 0, -floor, floor)))
    X = torch.randn(R.shape[1], width, dtype=DTYPE, generator=gen)
    for _ in range(iterations):
        Y = torch.linalg.solve_triangular(lifted.T, X, upper=False)
        X = torch.linalg.qr(torch.linalg.solve_triangular(lifted, Y, upper=True)).Q
    _, s, vh = torch.linalg.svd(R @ X, full_matrices=False)
    return (s / top).flip(0), (vh @ X.T).flip(0)


def _smallest_singular(R: Tensor, rtol: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Smallest singular values of the M × M factor R relative to σ_max (ascending) and their
    right singular vectors (rows): every one of them when M ≤ ``_DENSE_SVD_MAX`` (full SVD), else
    a block wide enough to hold all those below ``rtol`` plus 8 more (widened on demand,
    and replaced by the full SVD when the block would exceed M/4 or the solves overflow)."""
    M = R.shape[1]
    top = _largest_singular(R, gen)
    if top == 0:
        return torch.zeros(M, dtype=DTYPE), torch.eye(M, dtype=DTYPE)
    width = 32
    while M > _DENSE_SVD_MAX and width <= M // 4:
        rel, vectors = _inverse_iteration(R, top, width, gen)
        if not bool(torch.isfinite(vectors).all()):
            break  # the triangular solves overflowed: use the full SVD
        if int((rel < rtol).sum()) <= width - 8:
            return rel, vectors
        width *= 2
    _, s, vh = torch.linalg.svd(R, full_matrices=False)
    return (s / s[0]).flip(0), vh.flip(0)


def _split_spectrum(rel: Tensor, vectors: Tensor, scale: Tensor, n_equations: int, rtol: float) -> NullSpace:
    """Directions with σ/σ_max < ``rtol`` are laws; ``rel`` ascending, ``vectors`` its rows."""
    values = rel.tolist()
    K = sum(r < rtol for r in values)
    rejected = values[K - 1] if K > 0 else None
    accepted = values[K] if K < len(values) else None
    clear = (accepted is None or accepted > 1e3 * rtol) and (rejected is None or rejected < 1e-3 * rtol)
    return NullSpace((vectors[:K] / scale).numpy(), n_equations, accepted, rejected, clear)


# --------------------------------------------------------------------------------------
# Reduced basis with rational coefficients


def _rref(rows: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """Reduced row-echelon form with partial pivoting: a column whose candidates are all below
    ``tol``·max|rows| gets no pivot; afterwards entries below ``tol`` (pivots are 1) become 0."""
    A = rows.copy()
    K = A.shape[0]
    cutoff = tol * (np.abs(A).max() if A.size else 0.0)
    r = 0
    for j in range(A.shape[1]):
        if r == K:
            break
        i = r + int(np.argmax(np.abs(A[r:, j])))
        if abs(A[i, j]) <= cutoff:
            continue
        A[[r, i]] = A[[i, r]]
        A[r] /= A[r, j]
        others = np.arange(K) != r
        A[others] -= np.outer(A[others, j], A[r])
        r += 1
    A[np.abs(A) < tol] = 0.0
    return A[:r]


def _rationalize(row: np.ndarray, max_denominator: int, tol: float) -> list[Fraction] | None:
    """Small fractions equal to ``row`` within ``tol`` (relative), or None."""
    out = []
    for x in row.tolist():
        if x == 0.0:
            out.append(Fraction(0))
            continue
        q = Fraction(x).limit_denominator(max_denominator)
        if abs(x - float(q)) > tol * max(1.0, abs(x)):
            return None
        out.append(q)
    return out


def _sparsify(rows: list[list[Any]], degrees: list[int]) -> list[list[Any]]:
    """Exact row operations row_i −= c·row_j (deg row_j ≤ deg row_i, c cancelling a shared
    term) while they shorten row_i: a row-echelon basis often mixes laws that are sparse on
    their own (a unit's law plus those of the next layer). Rows with float entries are kept."""
    if not all(isinstance(c, Fraction) for row in rows for c in row):
        return rows
    sparse = [{m: c for m, c in enumerate(row) if c} for row in rows]
    improved = True
    while improved:
        improved = False
        for i, j in ((i, j) for i in range(len(sparse)) for j in range(len(sparse)) if i != j and degrees[j] <= degrees[i]):
            for m in sparse[i].keys() & sparse[j].keys():
                candidate = _axpy(sparse[i], -sparse[i][m] / sparse[j][m], sparse[j])
                if len(candidate) < len(sparse[i]):
                    sparse[i], improved = candidate, True
                    break
    size = len(rows[0]) if rows else 0
    dense = [[row.get(m, Fraction(0)) for m in range(size)] for row in sparse]
    return [r if next(c for c in r if c) > 0 else [-c for c in r] for r in dense]


def _axpy(x: dict[int, Fraction], a: Fraction, y: dict[int, Fraction]) -> dict[int, Fraction]:
    """x + a·y for sparse rows, zeros dropped."""
    out = dict(x)
    for m, c in y.items():
        out[m] = out.get(m, Fraction(0)) + a * c
        if not out[m]:
            del out[m]
    return out


def _law_expression(coefficients: Sequence[Any], basis: MonomialBasis, symbols: Sequence[sympy.Symbol]) -> sympy.Expr:
    """Σ c_m m(x) as a sympy expression (exact rationals, or floats when not rationalized)."""
    exps = basis.exponents
    terms = {tuple(int(e) for e in exps[m]): c for m, c in enumerate(coefficients) if c != 0}
    domain = "QQ" if all(isinstance(c, Fraction) for c in terms.values()) else "RR"
    coeffs = {k: (sympy.Rational(c.numerator, c.denominator) if domain == "QQ" else sympy.Float(c)) for k, c in terms.items()}
    # a sum of terms, not sympy.Poly: Poly's dense representation recurses once per variable and
    # raised RecursionError on a degree-1 search over ~1,000 entries (a tiny MobileBERT)
    return sympy.Add(*(c * sympy.Mul(*(symbols[i] ** e for i, e in enumerate(k) if e)) for k, c in coeffs.items()))


def _independent(coefficients: np.ndarray, basis: MonomialBasis, point: Tensor, tol: float = 1e-8) -> list[int]:
    """Greedy choice, in the given order, of laws whose gradients at ``point`` are independent."""
    grads = torch.from_numpy(coefficients) @ basis.gradients(point)
    chosen: list[int] = []
    q = torch.zeros(0, basis.D, dtype=DTYPE)
    for i, g in enumerate(grads):
        r = g.clone()
        for _ in range(2):
            r = r - q.T @ (q @ r)
        if r.norm() > tol * g.norm():
            chosen.append(i)
            q = torch.cat([q, (r / r.norm())[None]])
    return chosen


def format_law(law: sympy.Expr, symbols: Sequence[sympy.Symbol]) -> str:
    """The law as text: terms by descending degree, variables in the order of ``symbols``.

    sympy's own printer sorts names as strings (x10 before x2); this keeps x1, x2, …, x10.

    Example:
        >>> x = sympy.symbols("x1:11")
        >>> format_law(x[1] ** 2 - x[9] ** 2 + x[0] / 2, x)
        'x2**2 - x10**2 + 1/2*x1'
    """
    domain = sympy.RR if law.has(sympy.Float) else sympy.QQ
    ring = sympy.ring(list(symbols), domain)[0]
    text = ""
    for monom, coeff in ring.from_expr(law).terms(order="grlex"):
        factors = "*".join(str(s) if e == 1 else f"{s}**{e}" for s, e in zip(symbols, monom) if e)
        magnitude = domain.to_sympy(abs(coeff))
        shown = f"{float(magnitude):.12g}" if domain == sympy.RR else str(magnitude)
        body = factors if float(magnitude) == 1.0 else f"{shown}*{factors}"
        sign = ("-" if coeff < 0 else "") if not text else (" - " if coeff < 0 else " + ")
        text += sign + body
    return text


# --------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class SymbolicMap:
    """φ as exact sparse polynomials over QQ, with their partial derivatives."""

    ring: Any  # sympy PolyRing over QQ in the law symbols
    partials: list[list[Any]]  # partials[i][j] = ∂φ_i/∂x_j


def _exact_map(outputs: Sequence[Any], symbols: Sequence[sympy.Symbol]) -> SymbolicMap | None:
    """The outputs φ_i (sympy values) as exact polynomials with their partials, or None when
    they are too many for exact checks or are not polynomials with rational coefficients."""
    exprs = [sympy.sympify(v) for v in outputs]
    if not exprs or len(exprs) * len(symbols) > _SYMBOLIC_MAX_WORK or any(e.has(sympy.Float) for e in exprs):
        return None
    ring, *gens = sympy.ring(list(symbols), sympy.QQ)
    try:
        polys = [ring.from_expr(e) for e in exprs]
    except ValueError:  # not a polynomial (e.g. Max from a ReLU)
        return None
    return SymbolicMap(ring, [[p.diff(g) for g in gens] for p in polys])


def _symbolic_map(phi: Callable[..., Any], symbols: Sequence[sympy.Symbol]) -> SymbolicMap | None:
    """φ evaluated on a numpy object array of sympy symbols, or None where that fails, is not
    a rational polynomial, or disagrees with φ on tensors."""
    if len(symbols) > _SYMBOLIC_MAX_D:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = np.asarray(phi(np.array(symbols, dtype=object)), dtype=object).reshape(-1)
            exact = _exact_map(out, symbols)
            return exact if exact is not None and _agrees_with_torch(phi, len(out), len(symbols)) else None
    except Exception:  # φ written for tensors only: fall back to numerical checks
        return None


def _mlp_outputs(family: Any, symbols: Sequence[sympy.Symbol]) -> list[Any]:
    """φ of an MLP family on symbols (SCIENCE.md §2): from every start (the input, or a
    layer's bias) to the output, the product of the weights along each path, summed over the
    units of linear hidden layers and kept apart across gated (ReLU-like) ones."""
    params = iter(np.split(np.array(symbols, dtype=object), np.cumsum(family.sizes)[:-1]))
    weights, starts = [], []
    for k in range(len(family.widths) - 1):
        weights.append(next(params).reshape(family.widths[k + 1], family.widths[k]))
        if family.layer_bias[k]:
            starts.append((k, next(params)))
    outputs: list[Any] = []
    for first, T in [(0, weights[0]), *starts]:  # T's first axis: the units of layer first + 1
        for j in range(first + 1, len(weights)):
            if family.kinds[j - 1].gated:
                T = weights[j].reshape(weights[j].shape + (1,) * (T.ndim - 1)) * T[None]
            else:
                T = np.tensordot(weights[j], T, axes=(1, 0))
        outputs.extend(T.reshape(-1))
    return outputs


def _family_symbolic_map(sampler: FieldSampler, symbols: Sequence[sympy.Symbol]) -> SymbolicMap | None:
    """Exact φ of an :class:`~torch_conslaw.lie.generators.MLPGenerators`; None for other samplers."""
    from .lie.generators import MLPGenerators

    if not isinstance(sampler, MLPGenerators) or len(symbols) > _SYMBOLIC_MAX_D:
        return None
    return _exact_map(_mlp_outputs(sampler, symbols), symbols)


def _agrees_with_torch(phi: Callable[..., Any], n_outputs: int, D: int) -> bool:
    """Whether φ gives the same values on a numpy object array as on a tensor (integer point)."""
    values = torch.randint(-3, 4, (D,), generator=torch.Generator().manual_seed(7)).tolist()
    numeric = phi(torch.tensor(values, dtype=DTYPE)).reshape(-1)
    exact = np.asarray(phi(np.array(values, dtype=object)), dtype=object).reshape(-1)
    exact_t = torch.tensor([float(v) for v in exact], dtype=DTYPE)
    return exact_t.numel() == n_outputs == numeric.numel() and bool(torch.allclose(numeric, exact_t, rtol=1e-9, atol=1e-9))


def _symbolic_check(coefficients: Sequence[Any], basis: MonomialBasis, exact: SymbolicMap) -> bool | None:
    """Exact test ⟨∇h, ∇φ_i⟩ ≡ 0 for every output φ_i; None when h has float coefficients."""
    if not all(isinstance(c, Fraction) for c in coefficients):
        return None
    exps = basis.exponents
    h = exact.ring.from_dict(
        {tuple(int(e) for e in exps[m]): sympy.QQ(c.numerator, c.denominator) for m, c in enumerate(coefficients) if c}
    )
    dh = [(j, p) for j, p in enumerate(h.diff(g) for g in exact.ring.gens) if p]
    return all(not sum((p * partial[j] for j, p in dh), exact.ring.zero) for partial in exact.partials)


def _numeric_residuals(
    sampler: FieldSampler, basis: MonomialBasis, coefficients: np.ndarray, gen: torch.Generator, per_point: int
) -> np.ndarray:
    """Largest |⟨∇h, X⟩| / Σ|terms| of each law over fresh random points and fields."""
    rows = _equation_block(sampler, basis, _VERIFY_POINTS, per_point, gen)
    c = torch.from_numpy(coefficients)
    size = rows.abs() @ c.abs().T
    residual = (rows @ c.T).abs() / torch.where(size > 0, size, torch.ones_like(size))
    return residual.max(0).values.numpy()


# --------------------------------------------------------------------------------------
# Result and drivers


class PolynomialLaws(list):
    """The laws (sympy expressions) plus how they were found and verified.

    Attributes: ``verified`` (``"symbolic"`` or ``"numeric"`` per law), ``symbols``, ``D``,
    ``degree``, ``independent`` (whether only independent laws were kept), ``n_unknowns``,
    ``n_equations``, ``linear_dim`` (dimension of the vector space of polynomial laws of
    degree ≤ k, constants excluded), ``gap`` (smallest accepted σ/σ_max, largest rejected
    σ/σ_max; None where there is none), ``warnings``, ``seconds``.

    Example:
        >>> laws = polynomial_laws(lambda t: t[0:1] + t[1:2], 2, 2)
        >>> list(laws), laws.linear_dim
        ([x1 - x2], 2)
    """

    def __init__(self, laws: Sequence[sympy.Expr], **info: Any) -> None:
        super().__init__(laws)
        self.verified: list[str] = info["verified"]
        self.symbols: list[sympy.Symbol] = info["symbols"]
        self.D: int = info["D"]
        self.degree: int = info["degree"]
        self.independent: bool = info["independent"]
        self.n_unknowns: int = info["n_unknowns"]
        self.n_equations: int = info["n_equations"]
        self.linear_dim: int = info["linear_dim"]
        self.gap: tuple[float | None, float | None] = info["gap"]
        self.warnings: list[str] = info["warnings"]
        self.seconds: float = info["seconds"]


def _symbols_for(sampler: FieldSampler) -> list[sympy.Symbol]:
    """Symbols named after ``sampler.parameter_names()`` when it exists, else x1..xD."""
    names = getattr(sampler, "parameter_names", None)
    labels = names() if callable(names) else [f"x{i + 1}" for i in range(sampler.D)]
    return [sympy.Symbol(label) for label in labels]


def _warn(notes: list[str], message: str) -> None:
    notes.append(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def _present(
    null: NullSpace, basis: MonomialBasis, max_denominator: int, notes: list[str]
) -> tuple[np.ndarray, list[list[Any]]]:
    """Reduced basis ordered by ascending degree (row-echelon form, rationalized, then
    sparsified): float rows and exact (or float) coefficients."""
    reduced = _rref(null.coefficients)
    top_degree = [int(basis.degrees[np.flatnonzero(r)[0]]) for r in reduced]
    reduced = reduced[np.argsort(top_degree, kind="stable")]
    exact: list[list[Any]] = []
    for row in reduced:
        q = _rationalize(row, max_denominator, 1e-8)
        exact.append(q if q is not None else row.tolist())
    n_float = sum(not isinstance(row[0], Fraction) for row in exact)
    if n_float:
        _warn(notes, f"{n_float} of {len(exact)} candidate laws have coefficients that are not small fractions "
              f"(denominator <= {max_denominator}); they are kept as floats")
    exact = _sparsify(exact, sorted(top_degree))
    floats = np.array([[float(c) for c in row] for row in exact]).reshape(len(exact), basis.size)
    return floats, exact


def _verify(
    sampler: FieldSampler,
    basis: MonomialBasis,
    floats: np.ndarray,
    coefficients: list[list[Any]],
    exact: SymbolicMap | None,
    per_point: int,
    gen: torch.Generator,
) -> list[tuple[bool, str]]:
    """(passed, how) per law: 'symbolic' or 'numeric' when it passed, else why it failed.

    The exact check decides whenever it applies; otherwise the largest relative residual
    at fresh random points must be ≤ 1e-10."""
    if not coefficients:
        return []
    residuals = _numeric_residuals(sampler, basis, floats, gen, per_point)
    verdicts = []
    for c, res in zip(coefficients, residuals.tolist()):
        exactly = _symbolic_check(c, basis, exact) if exact is not None else None
        if exactly is not None:
            verdicts.append((exactly, "symbolic" if exactly else "the exact sympy check fails"))
        else:
            verdicts.append((res <= 1e-10, "numeric" if res <= 1e-10 else f"relative residual {res:.2e} at fresh random points"))
    return verdicts


@dataclass(frozen=True)
class _Options:
    seed: int
    independent: bool
    rtol: float
    max_denominator: int
    memory_budget: float
    progress: bool | None


def _find_laws(sampler: FieldSampler, degree: int, opts: _Options, exact: SymbolicMap | None) -> PolynomialLaws:
    """Build the basis and run the pipeline with the right thread count (budget checked)."""
    start = time.perf_counter()
    basis = monomial_basis(sampler.D, degree)
    with torch_threads(1 if basis.size <= _SINGLE_THREAD_MAX else None):
        return _laws_in_basis(sampler, basis, opts, exact, start)


def _laws_in_basis(
    sampler: FieldSampler, basis: MonomialBasis, opts: _Options, exact: SymbolicMap | None, start: float
) -> PolynomialLaws:
    """Equations, null space, reduced basis, selection of independent laws, verification;
    ``start`` is the perf_counter time the whole computation began."""
    gen = torch.Generator().manual_seed(opts.seed)
    symbols = _symbols_for(sampler)
    notes: list[str] = []
    per_point = _fields_per_point(sampler, gen)
    null = _null_space(sampler, basis, per_point, gen, opts.rtol, opts.progress)
    if not null.clear_gap:
        _warn(
            notes,
            f"no clear singular-value gap at rtol = {opts.rtol:g}: smallest accepted sigma/sigma_max = "
            f"{null.smallest_accepted}, largest rejected = {null.largest_rejected}; "
            "the number of laws is uncertain (try a lower degree)",
        )
    floats, coefficients = _present(null, basis, opts.max_denominator, notes)
    linear_dim = len(coefficients)
    if opts.independent and linear_dim:
        keep = _independent(floats, basis, _random_point(sampler, gen))
        floats, coefficients = floats[keep], [coefficients[i] for i in keep]
    laws = [_law_expression(c, basis, symbols) for c in coefficients]
    verdicts = _verify(sampler, basis, floats, coefficients, exact, per_point, gen)
    failures = [how for passed, how in verdicts if not passed]
    if failures:
        _warn(notes, f"dropped {len(failures)} of {len(verdicts)} candidate laws that fail verification "
              f"(first: {failures[0]}); the null space is unreliable, see the singular-value gap")
    kept = [i for i, (passed, _) in enumerate(verdicts) if passed]
    return PolynomialLaws(
        [laws[i] for i in kept],
        verified=[verdicts[i][1] for i in kept],
        symbols=symbols,
        D=sampler.D,
        degree=basis.degree,
        independent=opts.independent,
        n_unknowns=basis.size,
        n_equations=null.n_equations,
        linear_dim=linear_dim,
        gap=(null.smallest_accepted, null.largest_rejected),
        warnings=notes,
        seconds=time.perf_counter() - start,
    )


def polynomial_laws_of(
    sampler: FieldSampler,
    degree: int,
    *,
    seed: int = 0,
    independent: bool = True,
    rtol: float = 1e-9,
    max_denominator: int = 1000,
    memory_budget: float = 4e9,
    symbolic: bool = True,
    progress: bool | None = False,
) -> PolynomialLaws:
    """Polynomial laws of degree ≤ ``degree`` of any field sampler (``.D``, ``.sample``).

    ``sampler.sample(theta, n, generator)`` returns n fields X_a(θ), shape (n, D); an
    :class:`~torch_conslaw.lie.generators.MLPGenerators` works, so MLPs never build the path
    lifting. Symbols are named after ``sampler.parameter_names()`` when it exists, else
    x1..xD. ``independent=True`` keeps only laws whose gradients are independent (products
    and other functions of earlier laws are dropped); ``False`` returns a basis of the whole
    vector space of laws. ``rtol`` is the relative singular-value threshold of the null
    space; ``memory_budget`` (bytes) bounds the solver. With ``symbolic=True`` the laws of
    an MLPGenerators are verified exactly against its path factorization φ (built with sympy,
    SCIENCE.md §2) when that is small enough; otherwise, and for other samplers, at fresh
    random points (relative residual ≤ 1e-10). A candidate that fails is dropped with a
    warning.

    Example:
        >>> from torch_conslaw.lie.generators import MLPGenerators
        >>> [str(h) for h in polynomial_laws_of(MLPGenerators([1, 1, 1], ["relu"]), 2)]
        ['W1[0,0]**2 - W2[0,0]**2']
    """
    opts = _Options(seed, independent, rtol, max_denominator, memory_budget, progress)
    degree = _check_degree(degree)
    _check_memory(sampler.D, degree, memory_budget)
    exact = _family_symbolic_map(sampler, _symbols_for(sampler)) if symbolic else None
    return _find_laws(sampler, degree, opts, exact)


def polynomial_laws(
    phi: Callable[[Tensor], Tensor],
    D: int,
    degree: int,
    *,
    seed: int = 0,
    independent: bool = True,
    rtol: float = 1e-9,
    max_denominator: int = 1000,
    memory_budget: float = 4e9,
    symbolic: bool = True,
    progress: bool | None = False,
) -> PolynomialLaws:
    """Independent polynomial conservation laws of degree ≤ ``degree`` of a torch map φ.

    ``phi`` maps a flat float64 tensor of size ``D`` to a flat tensor. The laws come back
    as sympy expressions in x1..xD, in a reduced basis with small rational coefficients.
    With ``symbolic=True`` φ is also called on a numpy object array of sympy symbols; when
    that works (numpy-style code: slicing, ``*``, ``@``, ``reshape``) and gives rational
    polynomials, every law is verified exactly, otherwise numerically. The other options
    are those of :func:`polynomial_laws_of`.

    Example:
        >>> polynomial_laws(lambda t: t[0:1] * t[1:2] * t[2:3], 3, 2)
        [x1**2 - x3**2, x2**2 - x3**2]
    """
    from .lie.generators import FunctionGenerators

    degree = _check_degree(degree)
    if isinstance(D, int) and not isinstance(D, bool) and D >= 1:
        _check_memory(D, degree, memory_budget)  # before φ is ever called
    sampler = FunctionGenerators(phi, D)
    exact = _symbolic_map(phi, _symbols_for(sampler)) if symbolic else None
    opts = _Options(seed, independent, rtol, max_denominator, memory_budget, progress)
    return _find_laws(sampler, degree, opts, exact)
