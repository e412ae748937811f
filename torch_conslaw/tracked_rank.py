"""How many independent laws the monitor tracks: the rank of their gradients at θ, sparse.

Every tracked law reads a few rows of a few parameter tensors, so its gradient at θ is a
sparse row: the law-gradient matrix J (laws × parameters) of a CIFAR ResNet-18 has 1920 rows
and 6.3 million columns but only one nonzero per (law, entry read). J is built as a list of
nonzeros (never densely), split into *components* (laws linked through a shared parameter
entry: J is block-diagonal over them, so rank J is the sum of the block ranks), and each
block's rank is decided on its own:

* one law: rank 1 unless its gradient is zero;
* a small block: the singular values of the dense block (restricted to the entries it reads);
* a large block: the eigenvalues of its Gram matrix J_b J_bᵀ (a sparse product, law × law),
  decided on λ/λ_max, i.e. σ/σ_max against √rtol, since squaring halves the resolvable range.

Rows are normalized first (a law's scale says nothing about independence).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> from torch_conslaw.lawgroups import build_groups
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5))
    >>> groups = build_groups(find_structure(model).pairs)
    >>> tracked_rank(groups, dict(model.named_parameters())).rank
    4
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .lawgroups import LawGroup, MatrixLaws, UnitLaws
from .lie.numerics import DEFAULT_RTOL, RankDecision, decide_rank

__all__ = ["LawGradients", "TrackedRank", "law_gradients", "tracked_rank"]

F64 = torch.float64
DENSE_BLOCK_ENTRIES = 20_000_000
"""A block of J with at most this many (laws × entries read) is decided by a dense SVD."""


@dataclass
class LawGradients:
    """The gradients of the tracked laws at θ as nonzeros of J (laws × parameters).

    ``rows[k]`` is a law (in the order of the groups, then of ``labels``), ``cols[k]`` a flat
    parameter index in ``layout`` (name → (offset, numel)), ``values[k]`` ∂h/∂θ there.
    """

    rows: Tensor
    cols: Tensor
    values: Tensor
    n_laws: int
    layout: dict[str, tuple[int, int]]
    labels: list[str]

    @property
    def D(self) -> int:
        """Number of parameters in the layout."""
        return sum(n for _, n in self.layout.values())

    def dense(self) -> Tensor:
        """J as a dense D × n_laws matrix (one column per law); only for small models."""
        out = torch.zeros(self.D, self.n_laws, dtype=F64)
        out.index_put_((self.cols, self.rows), self.values, accumulate=True)
        return out


@dataclass
class TrackedRank:
    """Rank of the tracked laws and its evidence: ``decision`` sums the block ranks and keeps
    the worst case over blocks (largest rejected, smallest accepted relative value; Gram blocks
    contribute λ/λ_max); ``blocks`` counts the blocks, ``dense_blocks`` / ``gram_blocks`` those
    of more than one law decided by a dense SVD / by Gram eigenvalues."""

    rank: int
    n_laws: int
    decision: RankDecision
    blocks: int
    dense_blocks: int
    gram_blocks: int
    notes: list[str] = field(default_factory=list)


def _source_indices(reader, weight: Tensor) -> Tensor | None:
    """Flat index of the element of ``weight`` at each position of ``reader(weight)``, or None
    when the reader is not a pure rearrangement/selection of elements."""
    n = weight.numel()
    if n >= 2**52:
        return None
    probe = torch.arange(n, dtype=F64).reshape(weight.shape)
    try:
        idx = reader(probe)
    except Exception:  # a reader that needs the real tensor layout: not probed
        return None
    if not isinstance(idx, Tensor) or idx.dtype != F64 or not torch.equal(idx, idx.round()):
        return None
    if idx.numel() and (idx.min() < 0 or idx.max() >= n):
        return None
    idx = idx.long()
    w = weight.detach().to(F64)
    if not torch.equal(reader(w), w.reshape(-1)[idx]):
        return None
    return idx


def _unit_nonzeros(
    group: UnitLaws, params: Mapping[str, Tensor], layout: Mapping[str, tuple[int, int]], first: int
) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """∇(‖in_j‖² − k‖out_j‖²) per unit j: 2w on the entries of row j, times 1 or −k (w + c
    for a parameter the law reads shifted)."""
    out = []
    point = group.shifted(params)
    for sign, readers in ((1.0, group.pair.incoming), (-group.degree, group.pair.outgoing)):
        for name, fn in readers:
            w = point[name].detach().to(F64)
            idx = _source_indices(fn, w)
            if idx is None:
                return None
            idx = idx.reshape(idx.shape[0], -1)
            laws = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
            out.append(((laws + first).reshape(-1), (idx + layout[name][0]).reshape(-1),
                        (2.0 * sign * w.reshape(-1)[idx]).reshape(-1)))
    return out


def _matrix_nonzeros(
    group: MatrixLaws, params: Mapping[str, Tensor], layout: Mapping[str, tuple[int, int]], first: int
) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """∇(I_i·I_j − O_i·O_j) for i ≤ j: I_j on the entries of row i, I_i on those of row j."""
    n = group.pair.units
    ii, jj = torch.triu_indices(n, n)
    laws = torch.arange(ii.numel()) + first
    out = []
    for sign, readers in ((1.0, group.pair.incoming), (-1.0, group.pair.outgoing)):
        for name, fn in readers:
            w = params[name].detach().to(F64)
            idx = _source_indices(fn, w)
            if idx is None:
                return None
            idx = idx.reshape(n, -1) + layout[name][0]
            rows = w.reshape(-1)[idx - layout[name][0]]
            width = idx.shape[1]
            for a, b in ((ii, jj), (jj, ii)):  # entries of row a take the values of row b
                out.append((laws.unsqueeze(1).expand(-1, width).reshape(-1), idx[a].reshape(-1),
                            (sign * rows[b]).reshape(-1)))
    return out


def _jacobian_nonzeros(
    group: LawGroup, params: Mapping[str, Tensor], layout: Mapping[str, tuple[int, int]], first: int,
    max_entries: int,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Dense ``jacrev`` of one group over the tensors it reads (readers that are not plain
    rearrangements), kept as nonzeros."""
    names = list(group.parameter_names)
    width = sum(params[n].numel() for n in names)
    if group.count * width > max_entries:
        raise ValueError(
            f"the law group {group.name} reads its parameters through a reader that is not a plain "
            f"rearrangement, so its gradients need a dense {group.count} × {width} Jacobian (more than "
            f"max_jacobian_entries={max_entries}); raise max_jacobian_entries"
        )
    theta = {n: params[n].detach().to(F64) for n in names}
    jac = torch.func.jacrev(group.values)(theta)
    out = []
    for n in names:
        block = jac[n].reshape(group.count, -1)
        laws, entries = block.nonzero(as_tuple=True)
        out.append((laws + first, entries + layout[n][0], block[laws, entries]))
    return out


def law_gradients(
    groups: list[LawGroup],
    params: Mapping[str, Tensor],
    layout: Mapping[str, tuple[int, int]],
    *,
    max_jacobian_entries: int = 50_000_000,
) -> LawGradients:
    """The nonzeros of the tracked laws' gradients at ``params`` (float64).

    ``layout`` maps each parameter name to (offset, numel) in the flat θ.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_conslaw.structure import find_structure
        >>> from torch_conslaw.lawgroups import build_groups
        >>> m = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
        >>> lay = {"0.weight": (0, 4), "2.weight": (4, 2)}
        >>> law_gradients(build_groups(find_structure(m).pairs), dict(m.named_parameters()), lay).dense().shape
        torch.Size([6, 2])
    """
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    labels: list[str] = []
    first = 0
    for group in groups:
        missing = [n for n in group.parameter_names if n not in layout]
        if missing:
            raise ValueError(f"the law group {group.name} reads {missing}, which are not trainable parameters")
        found = None
        if type(group) is UnitLaws:
            found = _unit_nonzeros(group, params, layout, first)
        elif type(group) is MatrixLaws:
            found = _matrix_nonzeros(group, params, layout, first)
        if found is None:
            found = _jacobian_nonzeros(group, params, layout, first, max_jacobian_entries)
        parts += found
        labels += group.labels()
        first += group.count
    if parts:
        rows, cols, values = (torch.cat(p) for p in zip(*parts))
        rows, cols, values = _sum_duplicates(rows, cols, values, sum(n for _, n in layout.values()))
    else:
        rows = cols = torch.zeros(0, dtype=torch.long)
        values = torch.zeros(0, dtype=F64)
    return LawGradients(rows, cols, values, first, dict(layout), labels)


def _sum_duplicates(rows: Tensor, cols: Tensor, values: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """One nonzero per (law, entry): an entry read twice by a law gets the sum. Only entries
    read more than once (by any law) are sorted."""
    shared = torch.bincount(cols, minlength=width)[cols] > 1
    if not shared.any():
        return rows, cols, values
    keys, inverse = torch.unique(rows[shared] * width + cols[shared], return_inverse=True)
    summed = torch.zeros(keys.numel(), dtype=F64).index_add_(0, inverse, values[shared])
    single = ~shared
    return (torch.cat([rows[single], keys // width]), torch.cat([cols[single], keys % width]),
            torch.cat([values[single], summed]))


def _components(rows: Tensor, cols: Tensor, n_laws: int) -> Tensor:
    """Component label of each law: laws are linked when they read a common entry."""
    labels = torch.arange(n_laws)
    if rows.numel() == 0:
        return labels
    shared = torch.bincount(cols)[cols] > 1  # entries read by one law link nothing
    rows, cols = rows[shared], cols[shared]
    if rows.numel() == 0:
        return labels
    _, col_ids = torch.unique(cols, return_inverse=True)
    n_cols = int(col_ids.max()) + 1
    while True:
        per_col = torch.full((n_cols,), n_laws, dtype=torch.long).scatter_reduce(0, col_ids, labels[rows], "amin")
        new = labels.clone().scatter_reduce(0, rows, per_col[col_ids], "amin")
        new = new[new]  # pointer jumping
        if torch.equal(new, labels):
            return labels
        labels = new


def _block_values(rows: Tensor, cols: Tensor, values: Tensor, n: int, dense_entries: int) -> tuple[Tensor, str]:
    """Relative singular values of one block (dense SVD), or relative Gram eigenvalues.

    The Gram matrix is the smaller of J Jᵀ (laws × laws) and Jᵀ J (entries × entries): both have
    the same nonzero eigenvalues, and a wide matrix law (a 256-unit linear hidden layer has
    32,896 laws on 9,216 entries) would otherwise need a laws × laws eigendecomposition.
    As for the dense SVD, min(laws, entries) values are returned."""
    ucols, col_ids = torch.unique(cols, return_inverse=True)
    if n * ucols.numel() <= dense_entries:
        block = torch.zeros(n, ucols.numel(), dtype=F64)
        block.index_put_((rows, col_ids), values, accumulate=True)
        s = torch.linalg.svdvals(block)
        return (s / s[0] if s[0] > 0 else s), "dense"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "sparse support is in beta" notes
        j = torch.sparse_coo_tensor(torch.stack([rows, col_ids]), values, (n, ucols.numel())).coalesce()
        jt = j.t().coalesce()
        gram = (torch.sparse.mm(jt, j) if ucols.numel() < n else torch.sparse.mm(j, jt)).to_dense()
    lam = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    return (lam / lam[0] if lam[0] > 0 else lam), "gram"


def tracked_rank(
    groups: list[LawGroup],
    params: Mapping[str, Tensor],
    *,
    rtol: float = DEFAULT_RTOL,
    max_jacobian_entries: int = 50_000_000,
    gradients: LawGradients | None = None,
    dense_block_entries: int = DENSE_BLOCK_ENTRIES,
) -> TrackedRank:
    """Number of independent tracked laws at ``params``: rank of their gradients, block by block.

    Blocks of at most ``dense_block_entries`` (laws × entries read) are decided on their
    singular values, σ/σ_max > ``rtol``; larger ones on their Gram eigenvalues, λ/λ_max > ``rtol``.
    Pass ``gradients`` when they were already built (same groups and params).
    """
    if gradients is None:
        names = list(dict.fromkeys(n for g in groups for n in g.parameter_names))
        layout, offset = {}, 0
        for n in names:
            layout[n] = (offset, params[n].numel())
            offset += params[n].numel()
        gradients = law_gradients(groups, params, layout, max_jacobian_entries=max_jacobian_entries)
    n_laws = gradients.n_laws
    rows, cols, values = gradients.rows, gradients.cols, gradients.values
    norms = torch.zeros(n_laws, dtype=F64).index_add_(0, rows, values * values)
    nonzero = norms > 0
    values = values / norms.sqrt().clamp_min(torch.finfo(F64).tiny)[rows]
    comp = _components(rows, cols, n_laws)
    labels, counts = torch.unique(comp, return_counts=True)
    in_block = (torch.bincount(comp, minlength=n_laws) > 1)[comp[rows]]  # nonzeros of blocks of ≥ 2 laws
    rows, cols, values = rows[in_block], cols[in_block], values[in_block]
    comp_of_nnz = comp[rows]
    order = torch.argsort(comp_of_nnz, stable=True)
    rows, cols, values, comp_of_nnz = rows[order], cols[order], values[order], comp_of_nnz[order]
    rank = 0
    dense = gram = 0
    accepted: list[float] = []
    rejected: list[float] = []
    notes: list[str] = []
    singletons = labels[counts == 1]
    rank += int(nonzero[torch.isin(comp, singletons)].sum())
    big = labels[counts > 1]
    starts = torch.searchsorted(comp_of_nnz, big)
    ends = torch.searchsorted(comp_of_nnz, big, right=True)
    for label, a, b in zip(big.tolist(), starts.tolist(), ends.tolist()):
        members = (comp == label).nonzero().squeeze(1)
        local = torch.full((n_laws,), -1, dtype=torch.long)
        local[members] = torch.arange(members.numel())
        rel, how = _block_values(local[rows[a:b]], cols[a:b], values[a:b], members.numel(), dense_block_entries)
        d = decide_rank(rel, rtol, members.numel())
        rank += d.rank
        dense += how == "dense"
        gram += how == "gram"
        if not math.isnan(d.smallest_accepted):
            accepted.append(d.smallest_accepted)
        if not math.isnan(d.largest_rejected):
            rejected.append(d.largest_rejected)
        if how == "gram":
            notes.append(f"a block of {members.numel()} laws was decided on its Gram eigenvalues λ/λ_max")
    decision = RankDecision(
        rank=rank,
        candidates=n_laws,
        largest_rejected=max(rejected) if rejected else math.nan,
        smallest_accepted=min(accepted) if accepted else math.nan,
        rtol=rtol,
    )
    return TrackedRank(rank, n_laws, decision, int(labels.numel()), dense, gram, notes)
