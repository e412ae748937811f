"""Rank decisions with evidence: how many new directions a batch of vectors brings.

Every decision is taken on *relative* residuals — a vector's component outside the span
found so far, divided by the size of the terms it was computed from — so that exact
cancellations (a bracket [X, X] = 0) are recognised as zero rather than normalized
rounding noise. Each decision keeps the largest rejected and smallest accepted singular
value, so a user can see the gap, and flags decisions without a clear gap.

Example:
    >>> import torch
    >>> d = decide_rank(torch.tensor([1.0, 0.3, 1e-15]))
    >>> d.rank, d.clear
    (2, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RankDecision", "decide_rank", "new_directions", "project_out", "torch_threads", "DEFAULT_RTOL"]

DEFAULT_RTOL = 1e-8
"""Relative singular values above this count as new directions (float64 noise is ~1e-13)."""

GAP_DECADES = 3.0
"""A decision is 'clear' when no relative singular value lies within this many decades of the threshold."""


@dataclass(frozen=True)
class RankDecision:
    """The outcome of one rank decision and the numbers behind it.

    ``largest_rejected``/``smallest_accepted`` are relative singular values (nan when there
    is none); ``clear`` is False when a value lies within :data:`GAP_DECADES` of ``rtol``.
    """

    rank: int
    candidates: int
    largest_rejected: float
    smallest_accepted: float
    rtol: float

    @property
    def clear(self) -> bool:
        lo, hi = self.rtol * 10**-GAP_DECADES, self.rtol * 10**GAP_DECADES
        rejected_ok = math.isnan(self.largest_rejected) or self.largest_rejected < lo
        accepted_ok = math.isnan(self.smallest_accepted) or self.smallest_accepted > hi
        return rejected_ok and accepted_ok

    @property
    def gap(self) -> float:
        """smallest accepted / largest rejected (inf when one side is empty)."""
        if math.isnan(self.largest_rejected) or self.largest_rejected == 0.0:
            return math.inf
        if math.isnan(self.smallest_accepted):
            return math.inf
        return self.smallest_accepted / self.largest_rejected

    def describe(self) -> str:
        return (
            f"rank {self.rank} of {self.candidates} (smallest accepted {self.smallest_accepted:.2e}, "
            f"largest rejected {self.largest_rejected:.2e}, threshold {self.rtol:.0e})"
        )


def decide_rank(singular_values: Tensor, rtol: float = DEFAULT_RTOL, candidates: int | None = None) -> RankDecision:
    """Split relative singular values at ``rtol`` and keep the evidence.

    Example:
        >>> import torch
        >>> decide_rank(torch.tensor([2.0, 1e-14]), candidates=2).describe()[:13]
        'rank 1 of 2 ('
    """
    s = singular_values.detach().double().flatten()
    accepted = s[s > rtol]
    rejected = s[s <= rtol]
    return RankDecision(
        rank=int(accepted.numel()),
        candidates=int(candidates if candidates is not None else s.numel()),
        largest_rejected=float(rejected.max()) if rejected.numel() else math.nan,
        smallest_accepted=float(accepted.min()) if accepted.numel() else math.nan,
        rtol=rtol,
    )


def project_out(basis: Tensor | None, vectors: Tensor) -> Tensor:
    """Remove from the columns of ``vectors`` their components in span(``basis``) (twice).

    ``basis`` has orthonormal columns (D × r) or is None.
    """
    if basis is None or basis.shape[1] == 0:
        return vectors
    for _ in range(2):
        vectors = vectors - basis @ (basis.T @ vectors)
    return vectors


def new_directions(residuals: Tensor, scales: Tensor, rtol: float = DEFAULT_RTOL) -> tuple[Tensor, RankDecision]:
    """Orthonormal new directions spanned by the columns of ``residuals`` (D × m).

    Column i is first divided by ``scales[i]`` (the size of the terms it came from); the
    singular values of the scaled matrix decide the rank. Columns whose scale is zero are
    exact zeros and are dropped.

    Example:
        >>> import torch
        >>> r = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
        >>> q, d = new_directions(r, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> q.shape, d.rank
        (torch.Size([2, 1]), 1)
    """
    m = residuals.shape[1]
    keep = scales > 0
    scaled = residuals[:, keep] / scales[keep]
    if scaled.shape[1] == 0:
        return residuals.new_zeros(residuals.shape[0], 0), decide_rank(residuals.new_zeros(0), rtol, m)
    if scaled.shape[0] > 2 * scaled.shape[1]:  # tall: QR first, then the SVD of the small factor
        q, r = torch.linalg.qr(scaled)
        u_small, s, _ = torch.linalg.svd(r)
        u = q @ u_small
    else:
        u, s, _ = torch.linalg.svd(scaled, full_matrices=False)
    decision = decide_rank(s, rtol, m)
    return u[:, : decision.rank], decision


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: leave as is), restoring the count after.

    Small linear algebra runs faster on one thread, and LAPACK with several threads can be
    100× slower on a loaded machine. The setting is process-wide: do not use it while other
    threads of the process run torch code.

    Example:
        >>> import torch
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
