"""Verify before claiming: the numerical check every proposed law passes before it is tracked.

A function h of the parameters is conserved by every gradient flow of ``f(θ, x)`` on the input
``x`` (for every loss) iff ∇h(θ) ⊥ ∂_θ f(θ, x)ᵀu for every output cotangent u (SCIENCE.md §8).
This module measures, in float64, for a few random cotangents u and every law l of a group::

    residual_l = |⟨∇h_l(θ), ∂_θ f(θ, x)ᵀu⟩| / (‖∇h_l(θ)‖ · max(‖(∂_θ f(θ, x)ᵀu)_S‖, 1e-3 ‖∂_θ f(θ, x)ᵀu‖))

(a cosine in the space of S, the parameters of the law's group: ∇h_l is zero on every other
parameter, so ⟨∇h_l, ∂fᵀu⟩ needs no other entry, and leaving the other entries out of the
norm only makes the residual larger, never smaller: a false law on parameters whose gradient
is tiny next to the rest, behind a gate of 1e-8, is not hidden by the rest. The floor, 1e-3 of
the norm over every parameter the checked laws read, keeps a law whose gradient on S is zero
in exact arithmetic from being judged on rounding against rounding; :func:`_own_norms`). For a
true law it is float64
rounding, ≈ 1e-17 … 1e-15; a registration error or a rule applied where its symmetry does not
hold gives 1e-4 … 1 (measured in the README section *Verify before claiming*). The default
threshold 1e-10 sits five orders of magnitude above the rounding level and six below the
smallest false residual we measured.

How it is computed (no loop over laws):

* one forward pass of float64 copies of the parameters and buffers through
  :func:`torch.func.functional_call` and one backward pass per cotangent
  (:func:`torch.autograd.backward` on the retained graph) give ``g = ∂fᵀu`` for the parameters
  the laws read (the others take part as constants, with no gradient);
* each parameter's gradient is used as soon as the backward pass has completed it, and freed:
  for the built-in quadratic kinds (unit, matrix and scale laws) whose readers select entries,
  ⟨∇h_l, g⟩ and ‖∇h_l‖ are sums of one term per (parameter, reader), read off the parameter in
  its own dtype (selecting entries commutes with the exact cast to float64), so nothing
  parameter-sized is kept; for any other group (linear laws, registrations whose readers
  compute), ⟨∇h_l, g⟩ is one :func:`torch.func.jvp` of its law values along ``g`` on float64
  copies of that group's parameters, and ‖∇h_l‖ has a closed form for every built-in kind
  (:func:`gradient_norms`) or is estimated from ``PROBES`` = 8 jvps along Gaussian directions z:
  E[(∇h_l · z)²] = ‖∇h_l‖², and the estimate is a χ²₈/8 multiple of the true value. It
  overestimates ‖∇h_l‖ (which would shrink a residual) by more than √10 with probability
  P(χ²₈ > 80) ≈ 1e-13 per law, and underestimates it by more than √10 (which only inflates a
  rounding-level residual from 1e-16 to ~1e-15) with probability ≈ 1e-3. The threshold sits
  five orders of magnitude from both sides, so this is enough, and it avoids one backward pass
  per law.

Cost: one float64 forward and ``cotangents`` float64 backward passes of the model on the
example input. Memory: the float64 copies of the parameters and buffers used by the forward
pass (2 bytes per float32 byte), its activations, and a float64 buffer of the largest
parameter read (plus, for groups outside the built-in kinds, float64 copies of their
parameters and their gradients); no float64 gradient of the whole model is held
(``experiments/bench_structure.py`` measures it on ~100M-parameter models).

Loss-specific laws (softmax cross-entropy translation, :attr:`loss` ``"cross_entropy"``) are
checked with cotangents projected on Σ_class u = 0 (the gradient of that loss with respect to
the logits always sums to zero over the classes). Approximate laws (``approximate`` True: scale
invariance before a normalization, exact only at eps = 0) are checked against
:data:`APPROXIMATE_THRESHOLD` instead, and their measured residual is reported.

The forward pass runs in the mode the model is in (``model.train()`` by default, so BatchNorm
uses batch statistics as in training; a model built in eval mode is checked as it will run,
so a law that holds in train mode only, like the bias before a BatchNorm, is refused there:
build the monitor after ``model.train()``), on float64 copies of the parameters and buffers
(running statistics are updated on the copies), with the global RNG state restored afterwards
and the train flags put back: the model and its training are untouched.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw.lawgroups import build_groups
    >>> from torch_conslaw.structure import find_structure
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> groups = build_groups(find_structure(model).pairs)
    >>> [v.passed for v in verify_groups(model, torch.randn(8, 4), groups)]
    [True]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..nested import leaves

__all__ = [
    "Verification", "verify_groups", "verify_laws", "gradient_norms", "THRESHOLD", "APPROXIMATE_THRESHOLD", "PROBES",
    "OWN_FLOOR",
]

F64 = torch.float64
THRESHOLD = 1e-10
"""Largest residual (a cosine) an exact law may have: float64 rounding is ≈ 1e-16."""
APPROXIMATE_THRESHOLD = 1e-3
"""Largest residual an approximate law (exact only at a normalization's eps = 0) may have."""
PROBES = 8
"""Gaussian directions used to estimate ‖∇h_l‖ for every law at once."""


@dataclass(frozen=True)
class Verification:
    """The check of one law group: ``residual`` is the largest cosine between the gradient of
    one of its laws and ∂fᵀu over the cotangents tried; ``passed`` is ``residual <= threshold``."""

    group: str
    residual: float
    threshold: float
    passed: bool
    cotangents: int

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{self.group}: max |cos(∇h, ∂fᵀu)| = {self.residual:.1e} over {self.cotangents} "
            f"random cotangents ({verdict}, threshold {self.threshold:.0e})"
        )


def _precision(model: nn.Module) -> torch.dtype | None:
    """The most precise floating dtype of the model's parameters (None: it has none)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return min(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else None


def verify_groups(
    model: nn.Module,
    example_input: Any,
    groups: Sequence[Any],
    *,
    cotangents: int = 3,
    threshold: float = THRESHOLD,
    approximate_threshold: float = APPROXIMATE_THRESHOLD,
    seed: int = 0,
) -> list[Verification]:
    """Check every law group numerically on ``example_input`` (see the module docstring).

    ``groups`` are law groups (anything with ``name``, ``count``, ``parameter_names`` and a
    differentiable ``values(params)``); optional attributes ``loss`` (``"cross_entropy"``:
    project the cotangents), ``class_axis`` (the logits' class axis, default last) and
    ``approximate``. ``example_input`` is what ``model(...)`` takes: a tensor, a tuple of
    positional arguments or a dict of keyword arguments (floating tensors are cast to
    float64). Returns one :class:`Verification` per group, in order.
    """
    if isinstance(cotangents, bool) or not isinstance(cotangents, int) or cotangents < 1:
        raise ValueError(f"verify: cotangents must be an integer ≥ 1, got {cotangents!r}")
    if example_input is None:
        raise ValueError(
            "verify: the check needs an example input (what model(...) takes: a tensor, a tuple "
            "of positional arguments or a dict of keyword arguments)"
        )
    groups = list(groups)
    if not groups:
        return []
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = sorted({n for g in groups for n in g.parameter_names})
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"verify: the laws read {missing[0]}, which is not a trainable parameter of "
            f"{type(model).__name__}; frozen or foreign parameters cannot carry a verified law"
        )
    gen = torch.Generator().manual_seed(seed)
    losses = sorted({_loss(g) for g in groups}, key=str)
    counts = [int(g.count) for g in groups]
    # built-in kinds whose readers select entries: closed forms read off the parameters in their
    # own dtype (selection commutes with the exact cast to float64), term by term; any other
    # group: the torch.func path on float64 copies of that group's parameters only
    fast = _FastGroups(groups, params)
    generic = [i for i in range(len(groups)) if i not in fast.members]
    norms: list[Tensor | None] = [None] * len(groups)
    for i, n in fast.norms(params).items():
        norms[i] = n
    if generic:
        theta = {n: params[n].detach().to(F64) for g in (groups[i] for i in generic) for n in g.parameter_names}
        for i in generic:
            norms[i] = gradient_norms(groups[i], theta)
        others = [groups[i] for i in generic if norms[i] is None]
        if others:
            probed = _probed_norms(others, theta, {n for g in others for n in g.parameter_names}, gen)
            for i in generic:
                if norms[i] is None:
                    norms[i] = probed[groups[i].name]
    grad_norm = torch.cat([n.reshape(-1).cpu() for n in norms])  # type: ignore[union-attr]
    residual = torch.zeros(sum(counts), dtype=F64)
    for loss in losses:
        axes = {getattr(g, "class_axis", -1) for g in groups if _loss(g) == loss}
        if len(axes) > 1:
            raise ValueError(f"verify: groups of loss {loss!r} disagree on the class axis ({sorted(axes)})")
        mine_idx = [i for i, g in enumerate(groups) if _loss(g) == loss]
        mine_fast = [i for i in mine_idx if i in fast.members]
        mine_generic = [i for i in mine_idx if i not in fast.members]
        keep = {n for i in mine_generic for n in groups[i].parameter_names}
        # one ∂fᵀu at a time, and within it one parameter at a time: each gradient is folded
        # into the fast groups' dot products as soon as it is complete, then freed; only the
        # parameters of the other groups keep theirs until the end of the pass
        chosen = set(mine_fast)

        def fold(name: str, grad: Tensor, chosen: set[int] = chosen) -> None:
            fast.accumulate(name, grad, params, chosen)

        for grads, norm_sq in _cotangent_gradients(
            model, example_input, cotangents, loss, axes.pop(), gen, names, fold, keep
        ):
            dots = fast.dots(mine_fast)
            norm = torch.repeat_interleave(_own_norms(groups, norm_sq), torch.tensor(counts, dtype=torch.long))
            if mine_generic:
                sub = [groups[i] for i in mine_generic]
                gnames = sorted({n for g in sub for n in g.parameter_names})
                theta = {n: params[n].detach().to(F64) for n in gnames}
                direction = {n: grads[n] if n in grads else torch.zeros_like(theta[n]) for n in gnames}

                def sub_values(p: dict[str, Tensor], sub: list[Any] = sub) -> Tensor:
                    return torch.cat([g.values(p).reshape(-1) for g in sub])

                d_generic = _directional(sub_values, theta, direction).cpu()
                for i, d in zip(mine_generic, d_generic.split([counts[i] for i in mine_generic])):
                    dots[i] = d
            del grads
            d = torch.cat([dots[i].reshape(-1).cpu() if i in dots else torch.zeros(counts[i], dtype=F64)
                           for i in range(len(groups))]).abs()
            denom = grad_norm * norm
            r = torch.where(denom > 0, d / denom.clamp_min(1e-300), torch.where(d > 0, math.inf, 0.0))
            # a NaN / inf output or gradient (NaN > 0 is False) must not read as a zero residual
            r = torch.where(torch.isfinite(d) & torch.isfinite(denom), r, math.inf)
            mine = torch.repeat_interleave(
                torch.tensor([_loss(g) == loss for g in groups]), torch.tensor(counts, dtype=torch.long)
            )
            residual = torch.where(mine, torch.maximum(residual, r), residual)
    fast.release()
    out = []
    for g, r in zip(groups, residual.split(counts)):
        worst = float(r.max()) if r.numel() else 0.0
        limit = approximate_threshold if getattr(g, "approximate", False) else threshold
        out.append(Verification(g.name, worst, limit, bool(worst <= limit), cotangents))
    return out


OWN_FLOOR = 1e-3
"""The share of ‖∂fᵀu‖ (over every parameter the checked laws read) below which a group's own
part ‖(∂fᵀu)_S‖ is not used alone in its residual (see :func:`_own_norms`)."""


def _own_norms(groups: Sequence[Any], norm_sq: Mapping[str, float]) -> Tensor:
    """Per group: max(‖(∂fᵀu)_S‖, OWN_FLOOR · ‖∂fᵀu‖), S its parameters. A law's gradient is zero
    off S, so ⟨∇h, ∂fᵀu⟩ only sees (∂fᵀu)_S: against the whole ‖∂fᵀu‖ a false law on parameters
    whose gradient is tiny next to the rest (behind a LayerScale gate of 1e-8) would pass. The
    floor keeps laws whose gradient on S is zero in exact arithmetic (a bias before a BatchNorm,
    a key bias) from being judged on rounding against rounding: their residual is rounding
    (≈ 1e-16 of ‖∂fᵀu‖) over 1e-3 of it, ≈ 1e-13, three orders below :data:`THRESHOLD`;
    behind a gate of 1e-6 a false law still reads its own cosine × 1e-3."""
    total = math.sqrt(sum(norm_sq.values()))
    return torch.tensor(
        [max(math.sqrt(sum(norm_sq.get(n, 0.0) for n in set(g.parameter_names))), OWN_FLOOR * total) for g in groups],
        dtype=F64,
    )


def verify_laws(
    model: nn.Module,
    example_input: Any,
    groups: Any = None,
    *,
    cotangents: int = 3,
    threshold: float = THRESHOLD,
    seed: int = 0,
    loss: str | None = None,
) -> list[Verification]:
    """Public check: are these laws conserved by every gradient flow of ``model`` on
    ``example_input``? ``groups`` is a list of law groups, a
    :class:`~torch_conslaw.ConservationMonitor` (its tracked groups), or ``None`` (every law the
    monitor would propose for ``model``, including the families beyond layer pairs; ``loss``
    as for the monitor). As in the monitor, a group that passes at the model's θ is checked
    again with its 1-D parameters moved off their values (then put back bit for bit), and
    its result keeps the larger residual.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_conslaw as tc
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> print(tc.verify_laws(model, torch.randn(8, 4))[0].passed)
        True
    """
    from ..monitor import ConservationMonitor
    from ..structure import unwrap_model

    model = unwrap_model(model)
    if isinstance(groups, ConservationMonitor):
        candidates = list(groups.groups)
    elif groups is None:
        from ..lawgroups import build_groups
        from ..structure import find_structure
        from .families.proposals import propose_laws

        structure = find_structure(model, example_input)
        candidates = build_groups(structure.pairs) + propose_laws(model, structure, loss=loss)[0]
    else:
        candidates = list(groups)
    options = {"cotangents": cotangents, "threshold": threshold, "seed": seed}
    checks = verify_groups(model, example_input, candidates, **options)
    return _again_off_special_points(model, example_input, candidates, checks, **options)


# ---------------------------------------------------------------------------------------------


def gradient_norms(group: Any, theta: Mapping[str, Tensor]) -> Tensor | None:
    """‖∇h_l(θ)‖ for every law of a built-in group in closed form, or ``None`` (then they are
    probed). Valid when the readers of a quadratic group select entries and read each entry
    once (probed on index tensors; true for the built-in rules; otherwise ``None``):

    * unit law ‖in_j‖² − k‖out_j‖²: ∇ = 2(in_j, −k·out_j), norm 2·sqrt(‖in_j‖² + k²‖out_j‖²);
    * matrix law Q_ij = ⟨I_i, I_j⟩ − ⟨O_i, O_j⟩: sqrt(‖I_i‖² + ‖I_j‖² + ‖O_i‖² + ‖O_j‖²) off
      the diagonal, 2·sqrt(‖I_i‖² + ‖O_i‖²) on it;
    * linear law cᵀθ (coefficients +1, one reader per law): sqrt(reader(ones));
    * scale law Σ‖row_u‖²: 2·sqrt(h_u).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_conslaw.lawgroups import build_groups
        >>> from torch_conslaw.structure import find_structure
        >>> model = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1)).double()
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(1.0), model[0].bias.fill_(0.0), model[2].weight.fill_(2.0)
        >>> theta = dict(model.named_parameters())
        >>> gradient_norms(build_groups(find_structure(model).pairs)[0], theta).tolist()  # 2·sqrt(1 + 1 + 4)
        [4.898979485566356]
    """
    from ..lawgroups import MatrixLaws, UnitLaws
    from .groups import LinearLaws, NormScaleLaws

    with torch.no_grad():
        if isinstance(group, (UnitLaws, MatrixLaws)):
            if not _reads_each_entry_once(group.pair.incoming + group.pair.outgoing, theta):
                return None
            if isinstance(group, UnitLaws):
                point = group.shifted(theta)  # ∇ of a law read at θ + c is 2(θ + c) on its entries
                a, b = group._sides(point, point)
                return 2.0 * (a + group.degree**2 * b).clamp_min(0).sqrt()
            rows_in, rows_out = group._rows(theta)
            sq = rows_in.square().sum(1) + rows_out.square().sum(1)
            i, j = group._rows_idx, group._cols_idx
            off = (sq[i] + sq[j]).sqrt()
            return torch.where(i == j, 2.0 * sq[i].sqrt(), off)
        if isinstance(group, LinearLaws):
            return torch.cat([fn(torch.ones_like(theta[n], dtype=F64)).reshape(-1) for n, fn in group.readers]).sqrt()
        if isinstance(group, NormScaleLaws):
            return 2.0 * group.values(theta).clamp_min(0).sqrt()
    return None


class _FastGroups:
    """The built-in quadratic kinds (:class:`~torch_conslaw.lawgroups.UnitLaws`,
    :class:`~torch_conslaw.lawgroups.MatrixLaws`, :class:`~torch_conslaw.laws.groups.NormScaleLaws`)
    whose readers all select entries (a ``Rows`` / ``Columns`` reader, or a reader that returns
    a non-overlapping view of its input) and read no entry twice: their ‖∇h_l‖ and
    ⟨∇h_l, g⟩ are sums of one term per (parameter, reader), computed from that parameter
    alone, in its own dtype (a selection commutes with the exact cast to float64). Nothing
    parameter-sized is copied, and a gradient is folded in as soon as it is complete.

    With reader rows r(·) (one row per law, or per unit of a matrix law) and coefficient c
    (+1 incoming, −k outgoing for a unit law; +1 / −1 for a matrix law; +1 for a scale law):
    a unit or scale law h_l = Σ c ‖r_l(θ)‖² has ∇h_l · g = 2 Σ c ⟨r_l(θ), r_l(g)⟩ and
    ‖∇h_l‖ = 2 sqrt(Σ c² ‖r_l(θ)‖²); a matrix law Q_ij = Σ c ⟨r_i(θ), r_j(θ)⟩ has
    ∇Q_ij · g = (M + Mᵀ)_ij with M = Σ c r(θ) r(g)ᵀ, and the norms of :func:`gradient_norms`.
    """

    def __init__(self, groups: Sequence[Any], params: Mapping[str, Tensor]) -> None:
        self.groups = list(groups)
        self.terms: dict[str, list[tuple[int, Any, float]]] = defaultdict(list)
        self.members: set[int] = set()
        self._acc: dict[int, Tensor] = {}
        self._scratch: Tensor | None = None  # float64, as large as the largest parameter read
        for i, g in enumerate(self.groups):
            terms = _selection_terms(g, params)
            if terms is None:
                continue
            self.members.add(i)
            for name, fn, c in terms:
                self.terms[name].append((i, fn, c))

    def _float64(self, w: Tensor) -> Tensor:
        """``w`` in float64 in a reused buffer (no fresh parameter-sized allocation per call)."""
        if self._scratch is None or self._scratch.numel() < w.numel() or self._scratch.device != w.device:
            self._scratch = torch.empty(w.numel(), dtype=F64, device=w.device)
        return self._scratch[: w.numel()].view(w.shape).copy_(w)

    def release(self) -> None:
        self._scratch = None

    def _is_matrix(self, i: int) -> bool:
        from ..lawgroups import MatrixLaws

        return type(self.groups[i]) is MatrixLaws

    def norms(self, params: Mapping[str, Tensor]) -> dict[int, Tensor]:
        """‖∇h_l‖ of every law of every fast group, by group index."""
        sq: dict[int, Tensor] = {}
        with torch.no_grad():
            for name, terms in self.terms.items():
                squares = self._float64(params[name].detach()).square_()  # one parameter at a time
                for i, fn, c in terms:
                    term = _row_sums(fn(squares)).mul_(c * c)
                    sq[i] = term if i not in sq else sq[i] + term
        out = {}
        for i, s in sq.items():
            if self._is_matrix(i):
                g = self.groups[i]
                a, b = g._rows_idx.to(s.device), g._cols_idx.to(s.device)
                out[i] = torch.where(a == b, 2.0 * s[a].sqrt(), (s[a] + s[b]).sqrt())
            else:
                out[i] = 2.0 * s.clamp_min(0).sqrt()
        return out

    def accumulate(self, name: str, grad: Tensor, params: Mapping[str, Tensor], chosen: set[int]) -> None:
        """Fold the gradient of one parameter into the dot products of the ``chosen`` groups."""
        with torch.no_grad():
            w = params[name].detach()
            products: Tensor | None = None  # θ ∘ g in float64, shared by the per-row terms
            for i, fn, c in self.terms.get(name, ()):
                if i not in chosen:
                    continue
                if self._is_matrix(i):
                    term = torch.mm(_rows_of(fn(w).to(F64)), _rows_of(fn(grad).to(F64)).T).mul_(c)
                else:
                    if products is None:
                        products = self._float64(w).mul_(grad)
                    term = _row_sums(fn(products)).mul_(2.0 * c)
                if i in self._acc:
                    self._acc[i].add_(term)
                else:
                    self._acc[i] = term

    def dots(self, chosen: Sequence[int]) -> dict[int, Tensor]:
        """⟨∇h_l, g⟩ of the ``chosen`` groups for the gradients folded in since the last call."""
        out = {}
        for i in chosen:
            g = self.groups[i]
            acc = self._acc.pop(i, None)
            if acc is None:
                out[i] = torch.zeros(int(g.count), dtype=F64)
            elif self._is_matrix(i):
                out[i] = (acc + acc.T)[g._rows_idx.to(acc.device), g._cols_idx.to(acc.device)]
            else:
                out[i] = acc
        self._acc.clear()
        return out


def _rows_of(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _row_sums(x: Tensor) -> Tensor:
    """Sum over every axis but the first (any strides, no copy)."""
    return x.sum(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x.clone()


def _selection_terms(group: Any, params: Mapping[str, Tensor]) -> list[tuple[str, Any, float]] | None:
    """``(parameter, reader, coefficient)`` of a fast group (see :class:`_FastGroups`), or ``None``."""
    from ..lawgroups import MatrixLaws, UnitLaws
    from .groups import NormScaleLaws

    if type(group) is UnitLaws and not group.shifts:  # a shifted law's gradient reads θ + c: generic path
        terms = [(n, fn, 1.0) for n, fn in group.pair.incoming]
        terms += [(n, fn, -float(group.degree)) for n, fn in group.pair.outgoing]
    elif type(group) is MatrixLaws:
        terms = [(n, fn, 1.0) for n, fn in group.pair.incoming] + [(n, fn, -1.0) for n, fn in group.pair.outgoing]
    elif type(group) is NormScaleLaws:
        terms = [(n, fn, 1.0) for n, fn in group.readers]
    else:
        return None
    by_name: dict[str, list[Any]] = defaultdict(list)
    for name, fn, _ in terms:
        if name not in params or not _selects(fn, tuple(params[name].shape)):
            return None
        by_name[name].append(fn)
    for name, fns in by_name.items():
        if len(fns) > 1 and not _disjoint(fns):
            return None
    return [(name, _without_gather(fn, tuple(params[name].shape)), c) for name, fn, c in terms]


def _without_gather(fn: Any, shape: tuple[int, ...]) -> Any:
    """A ``Rows`` / ``Columns`` reader of every row / column in order is a view: use it."""
    from ..accounting import _as_view

    idx = getattr(fn, "idx", None)
    view = _as_view(fn, shape, int(idx.shape[0])) if isinstance(idx, Tensor) and idx.dim() else None
    return fn if view is None else view


def _selects(fn: Any, shape: tuple[int, ...]) -> bool:
    """True when ``fn`` only selects entries of its input, each at most once: a ``Rows`` /
    ``Columns`` reader with distinct indices, or a reader that returns its input or a view of
    it (same dtype, no entry twice), tried on a ``meta`` tensor (no data)."""
    from .families.rescaling import Columns, Rows

    if isinstance(fn, (Rows, Columns)):
        return int(fn.idx.numel()) == int(torch.unique(fn.idx).numel())
    w = torch.empty(shape, device="meta")
    version = w._version
    try:
        out = fn(w)
    except Exception:  # not runnable on meta tensors: the generic path decides
        return False
    if not isinstance(out, Tensor) or out.dtype != w.dtype or w._version != version:
        return False
    if not (out is w or (out._is_view() and out._base is w)):
        return False
    return int(torch._debug_has_internal_overlap(out)) == 0


def _disjoint(fns: list[Any]) -> bool:
    """Several readers of one parameter in one group read disjoint entries (all ``Rows`` or
    all ``Columns``, with distinct indices over all of them); anything else: not known."""
    from .families.rescaling import Columns, Rows

    for kind in (Rows, Columns):
        if all(type(fn) is kind for fn in fns):
            idx = torch.cat([fn.idx.reshape(-1) for fn in fns])
            return int(idx.numel()) == int(torch.unique(idx).numel())
    return False


def _reads_each_entry_once(readers: Any, theta: Mapping[str, Tensor]) -> bool:
    """True when every reader only selects entries (probed: shifting the input by one shifts
    the output by one) and no entry of a parameter is read twice across all the readers."""
    seen: dict[str, list[Tensor]] = {}
    for name, fn in readers:
        shape = theta[name].shape
        idx = torch.arange(theta[name].numel(), dtype=F64).reshape(shape)
        try:
            out = fn(idx)
            if not torch.equal(fn(idx + 1), out + 1):
                return False
        except Exception:  # a reader that cannot run on a probe: use the probes instead
            return False
        seen.setdefault(name, []).append(out.reshape(-1))
    for name, outs in seen.items():  # count the reads of each entry (O(n), no sort)
        hits = torch.zeros(theta[name].numel(), dtype=torch.int32)
        for out in outs:
            hits.index_add_(0, out.long(), torch.ones(out.numel(), dtype=torch.int32))
        if int(hits.max()) > 1:
            return False
    return True


def _probed_norms(groups: list[Any], theta: dict[str, Tensor], names: set[str], gen: torch.Generator) -> dict[str, Tensor]:
    """‖∇h_l‖ estimated from :data:`PROBES` jvps along Gaussian directions (see the module docstring)."""
    sub = {n: theta[n] for n in sorted(names)}

    def values(p: dict[str, Tensor]) -> Tensor:
        return torch.cat([g.values(p).reshape(-1) for g in groups])

    counts = [int(g.count) for g in groups]
    sq = torch.zeros(sum(counts), dtype=F64)
    device = next(iter(sub.values())).device
    for _ in range(PROBES):
        z = {n: torch.randn(t.shape, generator=gen, dtype=F64).to(device) for n, t in sub.items()}
        sq += _directional(values, sub, z).cpu().square()
    return {g.name: n for g, n in zip(groups, (sq / PROBES).sqrt().split(counts))}


def _loss(group: Any) -> str | None:
    return getattr(group, "loss", None)


def _directional(fn: Any, theta: dict[str, Tensor], direction: dict[str, Tensor]) -> Tensor:
    """J_fn(θ) · direction (forward mode, all laws at once)."""
    with torch.enable_grad():
        return torch.func.jvp(fn, (theta,), (direction,))[1].detach()


def _to_float64(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to(F64) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_float64(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float64(v) for v in obj)
    return obj


def _tensors(obj: Any) -> Iterator[Tensor]:
    """Floating tensors of a model output (tensor, tuple/list, dict or ``ModelOutput``)."""
    return (t for t in leaves(obj) if isinstance(t, Tensor) and t.is_floating_point())


def _cotangent_gradients(
    model: nn.Module,
    example_input: Any,
    k: int,
    loss: str | None,
    class_axis: int,
    gen: torch.Generator,
    names: Sequence[str],
    on_gradient: Callable[[str, Tensor], None],
    keep: set[str],
) -> Iterator[tuple[dict[str, Tensor], dict[str, float]]]:
    """``∂fᵀu`` for ``k`` random cotangents u (projected for a loss), float64, one after the
    other (the forward graph is kept between them; the model's train flags and the default
    dtype are restored when the generator is exhausted or closed).

    Gradients are taken with respect to the parameters ``names`` only (those the laws read:
    ∇h is zero elsewhere, so ⟨∇h, ∂fᵀu⟩ needs no other entry; the other parameters still
    take part in the float64 forward and backward passes, as constants). Each parameter's
    gradient is handed to ``on_gradient(name, grad)`` as soon as the backward pass has
    completed it, and then freed, except for the parameters in ``keep``, whose gradients are
    yielded with ‖∂fᵀu‖² of each parameter of ``names`` that the backward pass reached.
    """
    from ..lie.elementary import Float64Ops
    from ..structure.finder import _split_input  # one definition of how an example input is called

    args, kwargs = _split_input(_to_float64(example_input))
    wanted = set(names)
    params = {n: p.detach().to(F64).requires_grad_() for n, p in model.named_parameters() if n in wanted}
    fixed = {n: p.detach().to(F64) for n, p in model.named_parameters() if n not in wanted}
    fixed.update(
        {n: (b.detach().to(F64) if b.is_floating_point() else b.detach().clone()) for n, b in model.named_buffers()}
    )
    kept: dict[str, Tensor] = {}
    norm_sq: dict[str, float] = {}

    def on_accumulated(name: str) -> Callable[[Tensor], None]:
        def hook(leaf: Tensor) -> None:
            grad, leaf.grad = leaf.grad, None
            assert grad is not None
            norm_sq[name] = norm_sq.get(name, 0.0) + float(torch.linalg.vector_norm(grad)) ** 2
            on_gradient(name, grad)
            if name in keep:
                kept[name] = grad

        return hook

    def f(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
        out = torch.func.functional_call(model, {**p, **fixed}, args, kwargs)
        return tuple(_tensors(out))

    training = {m: m.training for m in model.modules()}
    default = torch.get_default_dtype()
    handles = [p.register_post_accumulate_grad_hook(on_accumulated(n)) for n, p in params.items()]
    try:
        torch.set_default_dtype(F64)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            # plain reverse mode (torch.autograd.backward) rather than torch.func.vjp: BatchNorm's
            # in-place running-statistics update on the buffer copies is fine here
            # fused kernels without a float64 version (grouped_mm of MoE experts); casts that are no-ops in the
            # model's own precision (x.float() in a float32 model) stay float64 instead of rounding the check
            with Float64Ops(floor=_precision(model)):
                outs = f(params)
            if not outs:
                raise ValueError(f"verify: {type(model).__name__} returned no floating tensor on the example input")
            for _ in range(k):
                us = []
                for o in outs:
                    u = torch.randn(o.shape, generator=gen, dtype=F64).to(o.device)
                    if loss == "cross_entropy":
                        u = u - u.mean(dim=class_axis, keepdim=True)
                    us.append(u)
                reached = [(o, u) for o, u in zip(outs, us) if o.requires_grad]
                kept.clear()
                norm_sq.clear()
                if reached and params:
                    torch.autograd.backward(
                        [o for o, _ in reached], [u for _, u in reached], retain_graph=True,
                        inputs=list(params.values()),
                    )
                yield dict(kept), dict(norm_sq)
                kept.clear()
    finally:
        for handle in handles:
            handle.remove()
        torch.set_default_dtype(default)
        for m, flag in training.items():
            m.train(flag)


ROUNDING_RESIDUAL = 1e-5
"""A failed check at most this large, on a model whose forward rounds to a lower precision
inside (a cast below the precision of its parameters), is said to be of that rounding's size."""


def rounding_casts(model: nn.Module, example_input: Any) -> list[str]:
    """The ops of one float64 forward (as the check runs it) that round float64 values to a
    float dtype below the precision of the model's own parameters (``x.float()`` in a float64
    model, ``softmax(..., dtype=torch.float32)``): the check keeps that rounding, as the model
    does. Casts that change nothing at the model's precision (a float32 model) are not listed,
    the check skips them. An empty list when the forward cannot be replayed."""
    from torch.overrides import TorchFunctionMode

    from ..lie.elementary import _LOW_FLOATS, _without_casts
    from ..structure.finder import _split_input

    floor = _precision(model)
    if floor is None or not floor.is_floating_point:
        return []
    eps = torch.finfo(floor).eps
    seen: set[str] = set()

    class _Probe(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            _without_casts(func, args, kwargs or {}, lambda d: d in _LOW_FLOATS and torch.finfo(d).eps > eps, seen)
            return func(*args, **(kwargs or {}))

    args, kwargs = _split_input(_to_float64(example_input))
    values = {n: p.detach().to(F64) for n, p in model.named_parameters()}
    values.update({n: (b.detach().to(F64) if b.is_floating_point() else b.detach().clone())
                   for n, b in model.named_buffers()})
    training = {m: m.training for m in model.modules()}
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(F64)
        with torch.no_grad(), torch.random.fork_rng(devices=[]), _Probe():
            torch.func.functional_call(model, values, args, kwargs)
    except Exception:  # noqa: BLE001 - the hint is optional
        return []
    finally:
        torch.set_default_dtype(default)
        for m, flag in training.items():
            m.train(flag)
    return sorted(seen)


NOT_FINITE = (
    "; the model's output or its gradient on the example input is not finite (NaN or inf), so no law "
    "can be checked there: run the model on that input and fix what gives NaN / inf (the model, "
    "its configuration or the example input)"
)
"""Added to the reason of a group whose check read a NaN / inf output or gradient."""

VECTOR_JITTER = 0.1
"""Relative size of the perturbation of the model's 1-D parameters for the second check."""


def _again_off_special_points(
    model: nn.Module, example_input: Any, groups: Sequence[Any], checks: list[Verification], **options: Any
) -> list[Verification]:
    """Check the groups that passed once more with every trainable 1-D parameter (norm gains and
    shifts, biases) moved off its value by a seeded ``VECTOR_JITTER`` relative perturbation,
    then put back bit for bit. A freshly built model sits at special points (γ = 1, β = 0,
    zero biases) where a function that is not a law can pass: a shift that a LayerNorm removes
    from the logits only while its γ is uniform and its β zero. A law is a law at every θ, so a
    group must pass at both points; the result keeps the larger residual. ``options`` go to
    :func:`verify_groups` (the same cotangents, threshold and seed as the first check)."""
    passed = [i for i, c in enumerate(checks) if c.passed]
    vectors = [p for p in model.parameters() if p.requires_grad and p.is_floating_point() and p.dim() == 1
               and type(p) in (Tensor, nn.Parameter)]
    if not passed or not vectors:
        return checks
    gen = torch.Generator().manual_seed(7)
    saved = [p.detach().clone() for p in vectors]
    try:
        with torch.no_grad():
            for p in vectors:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
                p.add_(VECTOR_JITTER * (1.0 + p.abs()) * noise)
        again = verify_groups(model, example_input, [groups[i] for i in passed], **options)
    finally:
        with torch.no_grad():
            for p, value in zip(vectors, saved):
                p.copy_(value)
    out = list(checks)
    for i, second in zip(passed, again):
        if second.residual > out[i].residual:
            out[i] = second
    return out


# --------------------------------------------------------------------------- for the monitor


@dataclass
class Checked:
    """What :func:`propose_and_check` decided: the groups to track, the refused ones (with the
    reason and, for a failed check, the measured residual), the check of each tracked group
    by name, and ``note``: why nothing was verified, when so."""

    groups: list[Any]
    skipped: list[Any]
    verification: dict[str, Verification]
    note: str


def _fallbacks_checked(model: nn.Module, example_input: Any, structure: Any, claimed: list[Any],
                       verdict: dict[str, Verification]) -> dict[str, list[tuple[Any, Verification]]]:
    """For each failed module-level group whose incoming parameters no passing group reads,
    the op graph's pairs on those parameters (:attr:`~torch_conslaw.structure.Structure.fallbacks`)
    that pass the same check, as groups."""
    from ..lawgroups import build_groups

    def reads(g: Any) -> frozenset[str] | None:
        return g.pair.incoming_names if getattr(g, "pair", None) is not None else None

    held = {reads(g) for g in claimed if verdict[g.name].passed}
    failed = {g.name: reads(g) for g in claimed if not verdict[g.name].passed and reads(g) not in held | {None}}
    options = [(name, p) for name, names in failed.items() for p in getattr(structure, "fallbacks", [])
               if p.incoming_names == names]
    if not options:
        return {}
    groups = build_groups([p for _, p in options])
    checks = _again_off_special_points(model, example_input, groups, verify_groups(model, example_input, groups))
    out: dict[str, list[tuple[Any, Verification]]] = {}
    for (name, _), group, check in zip(options, groups, checks):
        if check.passed:
            out.setdefault(name, []).append((group, check))
    return out


def propose_and_check(
    model: nn.Module,
    structure: Any,
    example_input: Any,
    groups: list[Any],
    skipped: list[Any],
    *,
    loss: str | None = None,
    sharded: bool = False,
    caller: str = "ConservationMonitor",
) -> Checked:
    """The monitor's construction step: add the families beyond layer pairs
    (:mod:`torch_conslaw.laws.families`) and verify every group that is claimed (expected to be
    conserved, or approximate) on ``example_input``; a group that fails goes to ``skipped``.

    Without ``example_input`` nothing can be verified: the layer-pair groups are tracked,
    marked unverified (``note`` says why), and no family law is proposed, since each family
    law is tracked only once verified. Under sharding (FSDP2) the same holds: verify the
    unsharded model with :func:`verify_laws`. ``caller`` names the API in warnings and errors.
    """
    from ..structure import Skipped
    from ..structure.finder import call_hint
    from .families.proposals import LOSSES, propose_laws

    if loss not in LOSSES:
        raise ValueError(f"{caller}: loss must be one of {LOSSES}, got {loss!r}")
    if example_input is None or sharded:
        if loss is not None:
            raise ValueError(
                f"{caller}: loss={loss!r} adds laws of that loss, which are tracked only "
                "once verified on an example input: pass example_input"
                + (" (and build the monitor on the unsharded model)" if sharded else "")
            )
        if sharded:
            note = (
                "laws not verified: the parameters are sharded (FSDP2), and a forward outside "
                "training does not run through fully_shard's hooks, so the example input is not "
                "used; check the laws on the model before fully_shard (tc.verify_laws, tc.analyze, "
                "or a monitor built there with example_input)"
            )
        else:
            note = (
                "laws not verified: no example_input was given; pass example_input to check every "
                "law numerically before it is tracked (and to add the linear and approximate families)"
            )
        return Checked(list(groups), list(skipped), {}, note)
    extra, refused = propose_laws(model, structure, loss=loss)
    candidates = list(groups) + extra
    claimed = [g for g in candidates if g.expected_conserved or getattr(g, "approximate", False)]
    try:
        checks = verify_groups(model, example_input, claimed)
        checks = _again_off_special_points(model, example_input, claimed, checks)
    except Exception as err:  # the model cannot run in float64 / under torch.func
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{call_hint(example_input, err)}"
        import warnings

        warnings.warn(
            f"{caller}: the numerical check of the laws failed to run ({message}); the "
            "layer-pair laws are tracked unverified and no other family is added",
            RuntimeWarning,
            stacklevel=3,
        )
        return Checked(list(groups), list(skipped) + refused, {}, f"laws not verified: the check failed to run ({message})")
    verdict = {c.group: c for c in checks}
    instead = _fallbacks_checked(model, example_input, structure, claimed, verdict)
    kept, dropped = [], list(skipped) + refused
    rounding: list[str] | None = None  # looked for once, when a check fails by a rounding-sized residual
    for g in candidates:
        check = verdict.get(g.name)
        if check is None or check.passed:
            kept.append(g)
            continue
        hint = ""
        if not math.isfinite(check.residual):
            hint = NOT_FINITE
        elif check.residual <= ROUNDING_RESIDUAL:
            rounding = rounding_casts(model, example_input) if rounding is None else rounding
            if rounding:
                hint = (
                    f"; the forward rounds values below the precision of the parameters (at {', '.join(rounding[:4])}: "
                    f"part of it runs in float32 or lower inside this {str(_precision(model)).replace('torch.', '')} "
                    "model), and a residual "
                    "this small is the size of that rounding: this may be a law of the function in exact "
                    "arithmetic, refused at the model's precision (in a model of that lower precision the cast "
                    "changes nothing and the check skips it)"
                )
        tracked_instead = "".join(
            f"; the op graph's law on the same parameters, {other.name} ({other.count} laws), passes and is tracked instead"
            for other, _ in instead.get(g.name, []))
        dropped.append(Skipped(g.producer, g.consumer, (
            f"{g.name} fails the numerical check, so it is not tracked: max |cos(∇h, ∂fᵀu)| = "
            f"{check.residual:.1e} on the example input (threshold {check.threshold:.0e}){hint}; the "
            f"rule that proposed it said: {g.reason}{tracked_instead}"
        )))
    for found in instead.values():
        for other, check in found:
            kept.append(other)
            verdict[other.name] = check
    note = ""
    if any(not math.isfinite(c.residual) for c in checks):
        note = "laws not verified where the check read NaN / inf" + NOT_FINITE
    return Checked(kept, dropped, verdict, note)
