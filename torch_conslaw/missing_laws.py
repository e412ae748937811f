"""Where the laws the monitor does not track live, and what they are.

Given an orthonormal basis N (D × n) of the law-gradient space Lie(W)(θ)^⊥ (from
:func:`torch_conslaw.count_laws`) and the tracked laws' gradients T (D × L):

* the tracked laws that are not exact laws at θ (their gradient leaves span N: laws that
  hold only up to a normalization eps, or only for other inputs);
* the *missing* space: the part of span N orthogonal to the projection of T, of dimension
  n − rank(Nᵀ T), and its share in each parameter tensor (squared norm of an orthonormal
  basis of it restricted to the tensor's entries, over the dimension: shares sum to 1 and do
  not depend on the basis chosen);
* on the tensors that hold the missing space, when they are small, the polynomial laws that
  depend on those tensors only (:func:`torch_conslaw.polynomial.polynomial_laws_of` on the
  fields of the model restricted to them, with the other parameters drawn at random for each
  field, so that what is found holds for the whole model).

Example:
    >>> import torch
    >>> basis = torch.eye(3, dtype=torch.float64)[:, :2]    # laws along e1, e2
    >>> tracked = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    >>> gap = missing_space(basis, tracked, {"a": (0, 1), "b": (1, 2)})
    >>> gap.dimension, gap.shares
    (1, {'b': 1.0})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp

from .lie.numerics import DEFAULT_RTOL, RankDecision, decide_rank
from .nested import leaves

__all__ = ["MissingSpace", "missing_space", "SubmapFields"]

F64 = torch.float64
ROUNDING = 1e-13
"""Field entries below this fraction of the field's largest entry are rounding noise."""
INEXACT_TOL = 1e-6
"""A tracked law whose unit gradient leaves the law space by more than this is not exact at θ."""


@dataclass
class MissingSpace:
    """What :func:`missing_space` found (see the module docstring).

    ``shares`` maps parameter names to their share of the missing space (largest first, shares
    below 1e-12 dropped); ``inexact`` lists (tracked law index, relative distance to the law
    space) for tracked laws that are not exact laws at θ; ``basis`` is an orthonormal basis
    (D × dimension) of the missing space.
    """

    dimension: int
    tracked_in_space: int
    decision: RankDecision | None
    shares: dict[str, float]
    inexact: list[tuple[int, float]]
    basis: Tensor = field(repr=False, default_factory=lambda: torch.zeros(0, 0, dtype=F64))


def missing_space(
    law_basis: Tensor,
    tracked: Tensor,
    layout: Mapping[str, tuple[int, int]],
    *,
    rtol: float = DEFAULT_RTOL,
) -> MissingSpace:
    """The untracked part of the law-gradient space and where it lives.

    ``law_basis``: orthonormal D × n; ``tracked``: D × L gradients of the tracked laws (any
    scale); ``layout``: parameter name → (offset, numel) in the flat θ.
    """
    D, n = law_basis.shape
    if tracked.shape[0] != D:
        raise ValueError(f"tracked gradients have {tracked.shape[0]} rows, the law basis {D}")
    norms = tracked.norm(dim=0)
    live = norms > 0
    unit = tracked[:, live] / norms[live]
    coords = law_basis.T @ unit  # n × L'
    outside = (unit - law_basis @ coords).norm(dim=0)
    live_index = live.nonzero().squeeze(1).tolist()
    inexact = [(live_index[k], float(r)) for k, r in enumerate(outside.tolist()) if r > INEXACT_TOL]
    exact_cols = coords[:, outside <= INEXACT_TOL]
    decision = None
    rank = 0
    if exact_cols.shape[1] and n:
        u, s, _ = torch.linalg.svd(exact_cols, full_matrices=True)
        decision = decide_rank(s / s[0], rtol, exact_cols.shape[1])
        rank = decision.rank
        rest = u[:, rank:]
    else:
        rest = torch.eye(n, dtype=F64)
    basis = law_basis @ rest
    dim = n - rank
    shares: dict[str, float] = {}
    if dim:
        for name, (offset, numel) in layout.items():
            share = float(basis[offset : offset + numel].square().sum()) / dim
            if share > 1e-12:
                shares[name] = share
        shares = dict(sorted(shares.items(), key=lambda kv: -kv[1]))
    return MissingSpace(dim, rank, decision, shares, inexact, basis)


class SubmapFields:
    """The fields ∂_S⟨u, f(θ, x)⟩ of a model restricted to the parameter tensors ``names``
    (a :class:`~torch_conslaw.polynomial.FieldSampler` over their entries).

    Each call of :meth:`sample` draws the other parameters at random (a well-conditioned
    point, :func:`torch_conslaw.lie.modules.random_theta`), so a polynomial law of the
    entries of S orthogonal to every field is a law of the whole model.

    ``model`` is a float64 module, ``slots`` its :class:`ParameterSlot` layout, ``args`` /
    ``kwargs`` the inputs (a batch).
    """

    def __init__(self, model: nn.Module, slots: Sequence[Any], names: Sequence[str], args: tuple, kwargs: dict):
        from .lie.modules import random_theta

        self._random_theta = random_theta
        self.model = model
        self.slots = list(slots)
        by_name = {s.name: s for s in self.slots}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"{unknown} are not trainable parameters of the model")
        self.selected = [by_name[n] for n in names]
        self.args, self.kwargs = args, kwargs
        self.D = sum(s.numel for s in self.selected)

    def parameter_names(self) -> list[str]:
        """One label per variable: ``name[i,j]``."""
        labels = []
        for s in self.selected:
            for flat in range(s.numel):
                index = torch.unravel_index(torch.tensor(flat), s.shape) if s.shape else ()
                labels.append(f"{s.name}[{','.join(str(int(i)) for i in index)}]" if s.shape else s.name)
        return labels

    def _split(self, full: Tensor) -> Tensor:
        return torch.cat([full[s.offset : s.offset + s.numel] for s in self.selected])

    def random_point(self, generator: torch.Generator) -> Tensor:
        """Random entries of the selected tensors (the well-conditioned draw)."""
        return self._split(self._random_theta(self.model, self.slots, generator))

    def sample(self, theta: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """``n`` fields at ``theta`` (entries of S), the rest of θ drawn at random."""
        from .lie.elementary import ElementaryOps
        from .lie.modules import map_rows

        full = self._random_theta(self.model, self.slots, generator)
        rest = {s.name: full[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots}
        sizes = [s.numel for s in self.selected]

        def outputs(sub: Tensor) -> Tensor:
            params = dict(rest)
            for s, part in zip(self.selected, torch.split(sub, sizes)):
                params[s.name] = part.view(s.shape)
            with ElementaryOps():
                out = functional_call(self.model, params, self.args, self.kwargs, strict=False)
            return _flat_outputs(out)

        values, pull = vjp(outputs, theta.to(F64))
        keys = torch.randn(n, values.numel(), dtype=F64, generator=generator)
        out = map_rows(lambda u: pull(u)[0], keys)  # one row at a time where vmap cannot batch the model
        # entries at rounding level (a parameter the outputs do not depend on, like a key bias)
        # become exact zeros: the polynomial solver scales its columns by their norms, which
        # would blow rounding noise up to unit size
        noise = ROUNDING * out.abs().amax(dim=1, keepdim=True)
        return torch.where(out.abs() <= noise, torch.zeros_like(out), out)


def _flat_outputs(out: Any) -> Tensor:
    parts = [t.reshape(-1) if t.is_floating_point() else t.new_zeros(0, dtype=F64)
             for t in leaves(out) if isinstance(t, Tensor)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=F64)
