"""Verify before claiming: the numerical check every proposed law passes before it is tracked.

A function h of the parameters is conserved by every gradient flow of ``f(θ, x)`` on the input
``x`` (for every loss) iff ∇h(θ) ⊥ ∂_θ f(θ, x)ᵀu for every output cotangent u (SCIENCE.md §8).
This module measures, in float64, for a few random cotangents u and every law l of a group::

    residual_l = |⟨∇h_l(θ), ∂_θ f(θ, x)ᵀu⟩| / (‖∇h_l(θ)‖ · ‖∂_θ f(θ, x)ᵀu‖)

(a cosine in the space of all trainable parameters) and reports the largest over laws and
cotangents. For a true law it is float64 rounding, ≈ 1e-17 … 1e-15; a registration error or a
rule applied where its symmetry does not hold gives 1e-4 … 1 (measured in the README section
*Verify before claiming*). The default threshold 1e-10 sits five orders of magnitude above the
rounding level and six below the smallest false residual we measured (a unit law spread over a
100M-parameter gradient would still be ≈ 1e-3).

How it is computed (vectorized, no loop over laws):

* one forward pass of a float64 copy of the parameters through :func:`torch.func.functional_call`
  and one vector-Jacobian product per cotangent (reverse mode, :func:`torch.autograd.grad` on
  the retained graph) give ``g = ∂fᵀu`` for all parameters at once;
* ⟨∇h_l, g⟩ for every law of every group is ONE :func:`torch.func.jvp` of the concatenated law
  values along ``g``;
* ‖∇h_l‖ has a closed form for every built-in kind (:func:`gradient_norms`); for any other
  group it is estimated from ``PROBES`` = 8 jvps along Gaussian directions z:
  E[(∇h_l · z)²] = ‖∇h_l‖², and the estimate is a χ²₈/8 multiple of the true value. It
  overestimates ‖∇h_l‖ (which would shrink a residual) by more than √10 with probability
  P(χ²₈ > 80) ≈ 1e-13 per law, and underestimates it by more than √10 (which only inflates a
  rounding-level residual from 1e-16 to ~1e-15) with probability ≈ 1e-3. The threshold sits
  five orders of magnitude from both sides, so this is enough, and it avoids one backward pass
  per law.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Verification", "verify_groups", "verify_laws", "gradient_norms", "THRESHOLD", "APPROXIMATE_THRESHOLD", "PROBES",
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
    theta = {n: params[n].detach().to(F64) for n in names}
    # ⟨∇h_l, g⟩ for every law of every group: one jvp of all the law values per direction
    counts = [int(g.count) for g in groups]

    def all_values(p: dict[str, Tensor]) -> Tensor:
        return torch.cat([g.values(p).reshape(-1) for g in groups])

    # ‖∇h_l‖: closed form for the built-in kinds, Gaussian probes for any other group
    norms = [gradient_norms(g, theta) for g in groups]
    others = [g for g, n in zip(groups, norms) if n is None]
    if others:
        probed = _probed_norms(others, theta, {n for g in others for n in g.parameter_names}, gen)
        for i, g in enumerate(groups):
            if norms[i] is None:
                norms[i] = probed[g.name]
    grad_norm = torch.cat([n.reshape(-1).cpu() for n in norms])
    residual = torch.zeros(sum(counts), dtype=F64)
    for loss in losses:
        axes = {getattr(g, "class_axis", -1) for g in groups if _loss(g) == loss}
        if len(axes) > 1:
            raise ValueError(f"verify: groups of loss {loss!r} disagree on the class axis ({sorted(axes)})")
        # one ∂fᵀu at a time (a generator): memory holds one gradient, not ``cotangents``
        for g_full in _cotangent_gradients(model, example_input, cotangents, loss, axes.pop(), gen):
            norm = math.sqrt(sum(float(t.square().sum()) for t in g_full.values()))
            d = _directional(all_values, theta, {n: g_full[n] for n in names}).cpu().abs()
            denom = grad_norm * norm
            r = torch.where(denom > 0, d / denom.clamp_min(1e-300), torch.where(d > 0, math.inf, 0.0))
            mine = torch.tensor([_loss(g) == loss for g in groups for _ in range(int(g.count))])
            residual = torch.where(mine, torch.maximum(residual, r), residual)
    out = []
    for g, r in zip(groups, residual.split(counts)):
        worst = float(r.max()) if r.numel() else 0.0
        limit = approximate_threshold if getattr(g, "approximate", False) else threshold
        out.append(Verification(g.name, worst, limit, bool(worst <= limit), cotangents))
    return out


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
    as for the monitor).

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
    return verify_groups(
        model, example_input, candidates, cotangents=cotangents, threshold=threshold, seed=seed
    )


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
                a, b = group._sides(theta, theta)
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
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


def _cotangent_gradients(
    model: nn.Module, example_input: Any, k: int, loss: str | None, class_axis: int, gen: torch.Generator
) -> Iterator[dict[str, Tensor]]:
    """``∂fᵀu`` for ``k`` random cotangents u (projected for a loss), float64, by parameter,
    one after the other (the forward graph is kept between them; the model's train flags and
    the default dtype are restored when the generator is exhausted or closed)."""
    from ..structure.finder import _split_input  # one definition of how an example input is called

    args, kwargs = _split_input(_to_float64(example_input))
    params = {n: p.detach().to(F64).requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach().to(F64) for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(
        {n: (b.detach().to(F64) if b.is_floating_point() else b.detach().clone()) for n, b in model.named_buffers()}
    )

    def f(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
        out = torch.func.functional_call(model, {**p, **fixed}, args, kwargs)
        return tuple(_tensors(out))

    training = {m: m.training for m in model.modules()}
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(F64)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            # plain reverse mode (torch.autograd.grad) rather than torch.func.vjp: BatchNorm's
            # in-place running-statistics update on the buffer copies is fine here
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
                grads = torch.autograd.grad(outs, list(params.values()), us, retain_graph=True, allow_unused=True)
                yield {n: torch.zeros_like(p) if t is None else t.detach() for (n, p), t in zip(params.items(), grads)}
    finally:
        torch.set_default_dtype(default)
        for m, flag in training.items():
            m.train(flag)


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


def propose_and_check(
    model: nn.Module,
    structure: Any,
    example_input: Any,
    groups: list[Any],
    skipped: list[Any],
    *,
    loss: str | None = None,
    sharded: bool = False,
) -> Checked:
    """The monitor's construction step: add the families beyond layer pairs
    (:mod:`torch_conslaw.laws.families`) and verify every group that is claimed (expected to be
    conserved, or approximate) on ``example_input``; a group that fails goes to ``skipped``.

    Without ``example_input`` nothing can be verified: the layer-pair groups are tracked,
    marked unverified (``note`` says why), and no family law is proposed, since each family
    law is tracked only once verified. Under sharding (FSDP2) the same holds: verify the
    unsharded model with :func:`verify_laws`.
    """
    from ..structure import Skipped
    from .families.proposals import LOSSES, propose_laws

    if loss not in LOSSES:
        raise ValueError(f"ConservationMonitor: loss must be one of {LOSSES}, got {loss!r}")
    if example_input is None or sharded:
        if loss is not None:
            raise ValueError(
                f"ConservationMonitor: loss={loss!r} adds laws of that loss, which are tracked only "
                "once verified on an example input: pass example_input"
                + (" (and build the monitor on the unsharded model)" if sharded else "")
            )
        why = "no example_input was given" if example_input is None else "the parameters are sharded (FSDP2)"
        return Checked(list(groups), list(skipped), {}, (
            f"laws not verified: {why}; pass example_input to check every law numerically before "
            "it is tracked (and to add the linear and approximate families)"
        ))
    extra, refused = propose_laws(model, structure, loss=loss)
    candidates = list(groups) + extra
    claimed = [g for g in candidates if g.expected_conserved or getattr(g, "approximate", False)]
    try:
        checks = verify_groups(model, example_input, claimed)
    except Exception as err:  # the model cannot run in float64 / under torch.func
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        import warnings

        warnings.warn(
            f"ConservationMonitor: the numerical check of the laws failed to run ({message}); the "
            "layer-pair laws are tracked unverified and no other family is added",
            RuntimeWarning,
            stacklevel=3,
        )
        return Checked(list(groups), list(skipped) + refused, {}, f"laws not verified: the check failed to run ({message})")
    verdict = {c.group: c for c in checks}
    kept, dropped = [], list(skipped) + refused
    for g in candidates:
        check = verdict.get(g.name)
        if check is None or check.passed:
            kept.append(g)
            continue
        dropped.append(Skipped(g.producer, g.consumer, (
            f"{g.name} fails the numerical check, so it is not tracked: max |cos(∇h, ∂fᵀu)| = "
            f"{check.residual:.1e} on the example input (threshold {check.threshold:.0e}); the "
            f"rule that proposed it said: {g.reason}"
        )))
    return Checked(kept, dropped, verdict, "")
