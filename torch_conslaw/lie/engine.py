"""Exact number of conservation laws: dim Lie(W_φ)(θ) by random multilinear sampling of brackets.

W_1 = W_φ, W_{k+1} = W_k + [W_1, W_k]; once a level adds nothing, Lie(W_φ)(θ) = W_k(θ) and
there are exactly D − dim W_k(θ) independent laws near θ (SCIENCE.md §3). Right-nested
brackets of random generators are drawn level by level in batches; a level is exhausted as
soon as a batch brings fewer new directions than its size (a draw fell inside the span).
Nothing about the expected answer is used to stop.

Two methods, chosen by size (``method="auto"``):

* ``"dense"`` — an explicit orthonormal basis of W_k(θ) in R^D (D up to a few thousand);
* ``"complement"`` — the complement of W_1(θ) from the matrix-free Gram operator
  (:mod:`torch_conslaw.lie.gram`), then brackets projected onto that (small) complement.
  Reaches networks with 10^5 parameters and more when the complement is small (ReLU nets).

Example:
    >>> import torch
    >>> res = trace_dimension(lambda t: t.prod().reshape(1), 6)
    >>> res.levels, res.n_laws
    ([1, 1], 5)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .brackets import bracket_values
from .flows import flow_point, with_flow
from .generators import DTYPE, FunctionGenerators, GeneratorFamily, MLPGenerators
from .gram import NullSpaceInfo, gram_null_space
from .known import known_law_rank
from .numerics import DEFAULT_RTOL, RankDecision, new_directions, project_out, torch_threads
from ..progress import ProgressBar

__all__ = ["LieResult", "RankGapWarning", "trace_dimension", "mlp_trace_dimension", "lie_trace"]

DENSE_LIMIT = 2000
"""``method="auto"`` uses the dense method up to this many parameters, the complement above."""

DENSE_MAX = 20000
"""Largest D for which ``method="auto"`` falls back to the dense method (a D × D basis,
3.2 GB in float64) when the complement of W_1(θ) is too large for the matrix-free method."""

SINGLE_THREAD_LIMIT = 1500
"""Below this many parameters the computation runs on one thread: the matrices are too small
to gain from threads, and LAPACK with busy threads can be 100× slower on a loaded machine."""


class RankGapWarning(UserWarning):
    """A rank decision had no clear gap between accepted and rejected directions."""


@dataclass
class LieResult:
    """Outcome of a trace-dimension computation.

    Attributes:
        D: dimension of the space the fields live in: the number of parameters, or 2D + 1
            (time, parameters, velocities) for a momentum flow.
        dim: dim Lie(W_φ)(θ).
        n_laws: D − dim, the number of independent conservation laws near θ.
        levels: dim W_1(θ), W_2(θ), … up to the first level that adds nothing.
        decisions: the rank decision of every batch, per level (relative singular values
            of the new components: largest rejected, smallest accepted).
        method: "dense" or "complement".
        known_laws: rank of the known laws' gradients at θ (None when not available).
        known_laws_total: how many known law functions there are (None when not available).
        certified: True when the sampled count meets the known-law bound (None without one).
        warnings: rank decisions without a clear gap, and other caveats.
        seconds: wall-clock time.
        flow: the flow whose laws were counted ("gradient", "heavy_ball", "nesterov", "mirror").
    """

    D: int
    dim: int
    levels: list[int]
    decisions: list[list[RankDecision]]
    method: str
    seconds: float
    known_laws: int | None = None
    known_laws_total: int | None = None
    certified: bool | None = None
    warnings: list[str] = field(default_factory=list)
    null_space: NullSpaceInfo | None = None
    flow: str = "gradient"
    law_basis: Tensor | None = None
    """Orthonormal basis (D × n_laws, float64) of Lie(W)(θ)^⊥ = the span of the law gradients
    at θ; only when ``lie_trace(..., law_basis_max_bytes=...)`` allowed it (else None)."""

    @property
    def n_laws(self) -> int:
        return self.D - self.dim

    @property
    def evidence(self) -> dict[str, float]:
        """Worst case over all decisions: largest rejected and smallest accepted relative value."""
        rejected = [d.largest_rejected for ds in self.decisions for d in ds if d.largest_rejected == d.largest_rejected]
        accepted = [d.smallest_accepted for ds in self.decisions for d in ds if d.smallest_accepted == d.smallest_accepted]
        return {
            "largest_rejected": max(rejected) if rejected else float("nan"),
            "smallest_accepted": min(accepted) if accepted else float("nan"),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the keys of ``conslaw count --json``)."""
        return {
            "D": self.D,
            "flow": self.flow,
            "lie_dim": self.dim,
            "n_laws": self.n_laws,
            "levels": list(self.levels),
            "known_laws": self.known_laws,
            "certified": self.certified,
            "method": self.method,
            "evidence": {k: (None if math.isnan(v) else v) for k, v in self.evidence.items()},
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 4),
        }

    def __str__(self) -> str:
        lines = [] if self.flow == "gradient" else [f"flow                  : {self.flow} (D counts its whole space)"]
        lines += [
            f"parameters D          : {self.D}",
            f"levels dim W_k(θ)     : {', '.join(map(str, self.levels))}",
            f"dim Lie(W_φ)(θ)       : {self.dim}",
            f"conservation laws     : {self.n_laws}",
        ]
        if self.known_laws is not None:
            lines.append(f"known laws (rank)     : {self.known_laws} of {self.known_laws_total}")
            lines.append(f"certified             : {'yes' if self.certified else 'no'}")
        ev = self.evidence
        lines.append(
            f"evidence              : smallest accepted {ev['smallest_accepted']:.2e}, "
            f"largest rejected {ev['largest_rejected']:.2e}"
        )
        lines.append(f"method                : {self.method} ({self.seconds:.2f} s)")
        lines += [f"warning               : {w}" for w in self.warnings]
        return "\n".join(lines)


class _DenseSpan:
    """W_k(θ) as an explicit orthonormal basis Q (D × dim)."""

    def __init__(self, D: int):
        self.basis = torch.zeros(D, 0, dtype=DTYPE)
        self.D = D

    @property
    def dim(self) -> int:
        return self.basis.shape[1]

    @property
    def room(self) -> int:
        return self.D - self.dim

    def add(self, vectors: Tensor, scales: Tensor, rtol: float) -> RankDecision:
        new, decision = new_directions(project_out(self.basis, vectors.T), scales, rtol)
        new, _ = torch.linalg.qr(project_out(self.basis, new))
        self.basis = torch.cat([self.basis, new], dim=1)
        return decision


class _ComplementSpan:
    """W_k(θ) through an orthonormal basis N of its complement (D × (D − dim))."""

    def __init__(self, complement: Tensor):
        self.complement = complement
        self.D = complement.shape[0]

    @property
    def dim(self) -> int:
        return self.D - self.complement.shape[1]

    @property
    def room(self) -> int:
        return self.complement.shape[1]

    def add(self, vectors: Tensor, scales: Tensor, rtol: float) -> RankDecision:
        coords = self.complement.T @ vectors.T  # components outside W_k(θ), in N's frame
        new, decision = new_directions(coords, scales, rtol)
        if decision.rank:
            full, _, _ = torch.linalg.svd(new, full_matrices=True)
            self.complement = self.complement @ full[:, decision.rank :]
        return decision


def _sample_level(
    family: GeneratorFamily,
    theta: Tensor,
    span: _DenseSpan | _ComplementSpan,
    depth: int,
    gen: torch.Generator,
    first_batch: int,
    rtol: float,
    max_vectors_bytes: float,
) -> list[RankDecision]:
    """Draw depth-``depth`` brackets in growing batches until a batch is not fully new."""
    decisions = []
    batch = first_batch
    while span.room > 0:
        batch = min(batch, span.room + 4, max(1, int(max_vectors_bytes // (8 * family.D))))
        keys = family.sample_keys(batch * depth, gen).reshape(batch, depth, -1)
        values, scales = bracket_values(family, theta, keys, chunk=getattr(family, "bracket_chunk", 256))
        if not torch.isfinite(values).all():
            raise ValueError(
                f"non-finite bracket values at level {depth}: phi overflows near θ; rescale phi or pass a theta"
            )
        decision = span.add(values, scales, rtol)
        decisions.append(decision)
        if decision.rank < batch:
            break
        batch *= 2
    return decisions


def lie_trace(
    family: GeneratorFamily,
    theta: Tensor,
    *,
    method: str = "auto",
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
    max_level: int = 32,
    max_vectors_bytes: float = 1e9,
    progress: bool | None = False,
    law_basis_max_bytes: float = 0.0,
) -> LieResult:
    """dim Lie(W_φ)(θ) for any generator family (the engine behind the public functions).

    With ``law_basis_max_bytes`` > 0, the result also holds ``law_basis``, an orthonormal
    basis of the complement of Lie(W_φ)(θ), when its D × n_laws float64 entries fit.
    """
    start = time.perf_counter()
    D = family.D
    if method not in ("auto", "dense", "complement"):
        raise ValueError(f"method must be 'auto', 'dense' or 'complement', got {method!r}")
    if method == "auto" and getattr(family, "large_complement", False):
        method = "dense"  # flows.py: the complement of W_1 is at least half the space
    gen = torch.Generator().manual_seed(seed + 1)
    levels: list[int] = []
    decisions: list[list[RankDecision]] = []
    null_info = None
    small = 1 if D <= SINGLE_THREAD_LIMIT else None
    with torch_threads(small), ProgressBar(None, "Lie algebra: levels", enabled=progress) as bar:
        span: _DenseSpan | _ComplementSpan | None = None
        if method == "complement" or (method == "auto" and D > DENSE_LIMIT):
            # auto: the matrix-free method pays off only while the complement stays small
            max_dim = 4096 if method == "complement" else max(64, D // 4)
            try:
                complement, decision, null_info = gram_null_space(
                    family, theta, rtol=rtol, seed=seed, max_dim=max_dim, progress=bar
                )
            except ValueError as err:
                if method == "complement":
                    raise
                if D > DENSE_MAX:
                    raise ValueError(
                        f"{err}. The dense method would need a {D} × {D} basis (D > DENSE_MAX = "
                        f"{DENSE_MAX}): this factorization is out of reach of both methods"
                    ) from None
            else:
                span = _ComplementSpan(complement)
                decisions.append([decision])
                method = "complement"
        if span is None:
            method = "dense"
            span = _DenseSpan(D)
            first = min(D, getattr(family, "d", D)) + 4
            decisions.append(_sample_level(family, theta, span, 1, gen, first, rtol, max_vectors_bytes))
        levels.append(span.dim)
        bar.update(note=f"level 1: dim {span.dim}")
        depth = 1
        while span.room > 0 and depth < max_level:
            depth += 1
            decisions.append(_sample_level(family, theta, span, depth, gen, 8, rtol, max_vectors_bytes))
            levels.append(span.dim)
            bar.update(note=f"level {depth}: dim {span.dim}")
            if levels[-1] == levels[-2]:
                break
    notes = [
        f"level {k}: no clear gap: {d.describe()}"
        for k, ds in enumerate(decisions, start=1)
        for d in ds
        if not d.clear
    ]
    if depth >= max_level and levels[-1] != levels[-2]:
        notes.append(f"stopped at max_level={max_level} before the levels stabilized; the count is an upper bound")
    for note in notes:
        warnings.warn(note, RankGapWarning, stacklevel=3)
    law_basis = None
    if 0 < 8 * D * span.room <= law_basis_max_bytes:
        law_basis = _complement_basis(span, gen)
    return LieResult(
        D=D,
        dim=span.dim,
        levels=levels,
        decisions=decisions,
        method=method,
        seconds=time.perf_counter() - start,
        warnings=notes,
        null_space=null_info,
        flow=getattr(family, "flow", "gradient"),
        law_basis=law_basis,
    )


def _complement_basis(span: _DenseSpan | _ComplementSpan, gen: torch.Generator) -> Tensor:
    """Orthonormal basis (D × room) of the orthogonal complement of the span found."""
    if isinstance(span, _ComplementSpan):
        return span.complement.clone()
    draw = torch.randn(span.D, span.room, dtype=DTYPE, generator=gen)
    basis, _ = torch.linalg.qr(project_out(span.basis, draw))
    return basis


def trace_dimension(
    phi: Callable[[Tensor], Tensor],
    D: int,
    *,
    theta: Tensor | None = None,
    seed: int = 0,
    method: str = "auto",
    rtol: float = DEFAULT_RTOL,
    progress: bool | None = False,
    flow: str = "gradient",
    tau: float | Callable[[Tensor], Tensor] | None = None,
    potential: str | Callable[[Tensor], Tensor] | None = None,
) -> LieResult:
    """dim Lie(W_φ)(θ) and the number of independent conservation laws of a torch map φ.

    Args:
        phi: maps a flat float64 tensor of size ``D`` to a flat tensor (torch.func-compatible).
        D: number of parameters.
        theta: the point θ (float64, size D); default a standard Gaussian draw from ``seed``.
        seed: seeds θ and every random draw.
        method: "auto", "dense" or "complement" (matrix-free, for large D).
        rtol: relative singular values above this count as new directions.
        progress: show a progress bar (None: only on a terminal).
        flow: whose laws to count (SCIENCE.md §10, :mod:`torch_conslaw.lie.flows`):
            "gradient" (θ' = −∇E), "heavy_ball" (θ'' + τθ' = −∇E), "nesterov" (τ(t) = 3/t)
            or "mirror" (θ' = −∇²Φ(θ)^{-1}∇E). Momentum flows count on the phase space
            (t, θ, v) of size 2D + 1 (``result.D``), where ``theta`` may be θ (size D) or a
            whole phase point.
        tau: heavy ball's friction, a constant ≥ 0 (default 1) or a callable t ↦ τ(t).
        potential: the mirror potential, "entropy" (Σ θ log θ on θ > 0) or a callable Φ.

    Example:
        >>> trace_dimension(lambda t: (t.reshape(5, 2) @ t.reshape(5, 2).T).reshape(-1), 10).n_laws
        0
        >>> trace_dimension(lambda t: t.prod().reshape(1), 3, flow="mirror", potential="entropy").n_laws
        2
    """
    phase_size = 2 * D + 1 if flow in ("heavy_ball", "nesterov") else D
    if theta is not None:
        if not isinstance(theta, Tensor):
            raise TypeError(f"theta must be a torch.Tensor of size D={D}, got {type(theta).__name__}")
        if theta.numel() not in (D, phase_size):
            also = f" or a phase point (t, θ, v) of size 2D+1={phase_size}" if phase_size != D else ""
            raise ValueError(f"theta has {theta.numel()} entries but D={D}; pass a flat tensor of size D{also}")
        theta = theta.detach().reshape(-1).to(DTYPE)
        if not torch.isfinite(theta).all():
            raise ValueError("theta has non-finite entries; pass a finite point")
    probe = theta if theta is not None and theta.numel() == D else None
    base = FunctionGenerators(phi, D, probe)
    family = with_flow(base, flow, tau=tau, potential=potential)
    point = flow_point(family, theta, torch.Generator().manual_seed(seed))
    return lie_trace(family, point, method=method, rtol=rtol, seed=seed, progress=progress)


def mlp_trace_dimension(
    widths: Sequence[int],
    activations: Sequence[str] | str,
    bias: bool = False,
    seed: int = 0,
    *,
    output_bias: bool | None = None,
    method: str = "auto",
    rtol: float = DEFAULT_RTOL,
    known_laws: bool | None = None,
    progress: bool | None = False,
    flow: str = "gradient",
    tau: float | Callable[[Tensor], Tensor] | None = None,
    potential: str | Callable[[Tensor], Tensor] | None = None,
) -> LieResult:
    """Number of conservation laws of a fully connected network, without the path lifting.

    ``activations`` has one entry per hidden layer ("linear", "relu", "leaky_relu", "abs",
    or a kind registered with :func:`torch_conslaw.lie.generators.register_activation_kind`).
    ``bias`` puts a bias on every layer; ``output_bias=False`` leaves it off the last one
    (the convention of the authors' sweep).
    With ``known_laws=True`` (the default for gradient flow) the rank of the catalogue's laws
    is reported and the count is certified when both bounds meet.
    ``flow``, ``tau`` and ``potential`` choose the flow as in :func:`trace_dimension`; the
    catalogue's laws are gradient-flow laws, so other flows are not certified.

    Example:
        >>> mlp_trace_dimension([3, 4, 5], ["relu"], bias=True).n_laws
        4
        >>> mlp_trace_dimension([2, 3, 2], ["linear"], flow="heavy_ball").n_laws
        3
    """
    if known_laws is None:
        known_laws = flow == "gradient"
    elif known_laws and flow != "gradient":
        raise ValueError(
            f"known_laws=True certifies against gradient-flow laws; it does not apply to flow={flow!r} "
            "(leave known_laws unset or pass known_laws=False)"
        )
    base = MLPGenerators(widths, activations, bias, output_bias)
    family = with_flow(base, flow, tau=tau, potential=potential)
    theta = family.random_point(torch.Generator().manual_seed(seed))
    result = lie_trace(family, theta, method=method, rtol=rtol, seed=seed, progress=progress)
    if known_laws:
        with torch_threads(1 if family.D <= SINGLE_THREAD_LIMIT else None):
            known = known_law_rank(base, theta, rtol)
        if known is None:
            result.warnings.append("known-law rank not computed: its gradient matrix is too large")
        else:
            decision, total = known
            result.known_laws, result.known_laws_total = decision.rank, total
            result.certified = result.n_laws == decision.rank
            if not decision.clear:
                result.warnings.append(f"known laws: no clear gap: {decision.describe()}")
    return result
