"""Flows other than plain gradient flow: momentum in phase space, and mirror flows (SCIENCE.md §10).

A law of a flow is a function constant along every trajectory, for every data set. The
calculator counts laws as (dimension of the space) − dim Lie(fields)(point); this module
turns ANY generator family (:class:`~torch_conslaw.lie.generators.GeneratorFamily`, fields
X_a = ∇ψ_a on R^D) into the family of fields that drive the chosen flow:

* ``"heavy_ball"`` / ``"nesterov"`` — θ'' + τ(t) θ' = −∇E on the phase space z = (t, θ, v)
  of dimension 2D + 1: the drift F_0 = (1, v, −τ(t) v) plus the generators
  F_a = (0, 0, ∇ψ_a(θ)). Heavy ball has a constant friction τ (default 1) or a callable
  τ(t); Nesterov has τ(t) = 3/t. Keys are (c_0, a) and the field is c_0 F_0 + F_a, linear
  in (c_0, a), so the multilinear sampling of brackets carries over and brackets with the
  drift are included. Laws: 2D + 1 − dim Lie(F_0, F_a)(z).
* ``"mirror"`` — θ' = −∇²Φ(θ)^{-1} ∇E for a potential Φ: fields ∇²Φ(θ)^{-1} ∇ψ_a on
  Φ's domain. ``potential="entropy"`` is Φ(θ) = Σ θ log θ on θ > 0 (fields θ ⊙ ∇ψ_a: the
  multiplicative updates of NMF); a callable Φ uses its Hessian (torch.func). Laws:
  D − dim Lie.
* ``"gradient"`` — the family itself, unchanged.

Neither family is a gradient family, so they provide their fields directly
(``field_batch``); brackets are always ∂Y X − ∂X Y (:mod:`.brackets`).

Example:
    >>> import torch
    >>> from torch_conslaw.lie.generators import FunctionGenerators
    >>> base = FunctionGenerators(lambda t: t.prod().reshape(1), 2)
    >>> fam = with_flow(base, "heavy_ball")
    >>> fam.D, fam.key_dim
    (5, 2)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import hessian, jvp, vmap

from .generators import DTYPE, GeneratorFamily, fields

__all__ = ["FLOWS", "POTENTIALS", "PhaseSpaceGenerators", "MirrorGenerators", "with_flow", "flow_point"]

FLOWS = ("gradient", "heavy_ball", "nesterov", "mirror")
"""The flows the calculator knows, by name."""

POTENTIALS = ("entropy",)
"""Mirror potentials known by name (a callable Φ is accepted too)."""

Friction = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------
# Momentum: phase space (t, θ, v)


def _constant_friction(tau: float) -> Friction:
    return lambda t: torch.full_like(t, tau)


def _nesterov_friction(t: Tensor) -> Tensor:
    return 3.0 / t


def _check_friction(friction: Friction, probe: Tensor) -> None:
    """A callable τ must map the times (n,) to finite frictions (n,) and be torch.func-differentiable."""
    try:
        value = vmap(friction)(probe)
        jvp(vmap(friction), (probe,), (torch.ones_like(probe),))
    except Exception as err:
        raise ValueError(
            f"tau(t) failed on a float64 0-d time tensor ({type(err).__name__}: {err}); a callable tau must "
            "map a 0-d float64 tensor t to a 0-d tensor with out-of-place torch operations (torch.func-compatible)"
        ) from err
    if not isinstance(value, Tensor) or value.shape != probe.shape:
        raise ValueError(f"tau(t) must return a 0-d tensor for a 0-d time t, got shape {getattr(value, 'shape', None)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"tau(t) is not finite at t = {probe.tolist()}; give a friction that is finite for t in [1, 2]")


class PhaseSpaceGenerators:
    """The fields c_0 F_0 + F_a of a momentum flow on the phase space (t, θ, v), size 2D + 1.

    ``base`` is any gradient family on R^D; ``friction`` maps times (n,) to τ(t) (n,).
    Points are laid out flat as ``[t, θ (D), v (D)]``; keys as ``[c_0, a]``.

    Example:
        >>> import torch
        >>> from torch_conslaw.lie.generators import MLPGenerators
        >>> fam = PhaseSpaceGenerators(MLPGenerators([1, 3, 1], ["linear"]), lambda t: 3.0 / t, "nesterov")
        >>> z = fam.random_point(torch.Generator().manual_seed(0))
        >>> z.shape, bool(z[0] >= 1)
        (torch.Size([13]), True)
    """

    large_complement = True
    """The complement of W_1 has dimension ≥ D: the matrix-free (Gram) method cannot pay off."""

    def __init__(self, base: GeneratorFamily, friction: Friction, flow: str):
        self.base = base
        self.friction = friction
        self.flow = flow
        self.base_D = base.D
        self.D = 2 * base.D + 1
        self.key_dim = 1 + base.key_dim
        if hasattr(base, "d"):
            self.d = base.d + 1  # generators F_0, F_{e_1}, …, F_{e_d}

    def split(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rows (n, 2D + 1) → times (n,), θ (n, D), v (n, D)."""
        return points[:, 0], points[:, 1 : 1 + self.base_D], points[:, 1 + self.base_D :]

    def drift(self, points: Tensor) -> Tensor:
        """F_0 = (1, v, −τ(t) v) at every row, shape (n, 2D + 1)."""
        t, _, v = self.split(points)
        tau = vmap(self.friction)(t)
        return torch.cat([torch.ones_like(t)[:, None], v, -tau[:, None] * v], dim=1)

    def field_batch(self, points: Tensor, keys: Tensor) -> Tensor:
        """c_0 F_0(z) + F_a(z) for every row (keys[i] = [c_0, a])."""
        _, theta, _ = self.split(points)
        pushed = fields(self.base, theta, keys[:, 1:])
        zeros = torch.zeros_like(points[:, : 1 + self.base_D])
        return keys[:, :1] * self.drift(points) + torch.cat([zeros, pushed], dim=1)

    def sample_keys(self, n: int, generator: torch.Generator) -> Tensor:
        c0 = torch.randn(n, 1, dtype=DTYPE, generator=generator)
        return torch.cat([c0, self.base.sample_keys(n, generator)], dim=1)

    def random_point(self, generator: torch.Generator) -> Tensor:
        """t uniform in [1, 2] (inside the domain of τ(t) = 3/t), θ and v from the base family."""
        theta = self.base.random_point(generator)
        return self.lift_point(theta, generator)

    def lift_point(self, theta: Tensor, generator: torch.Generator) -> Tensor:
        """A phase-space point over a given θ: time uniform in [1, 2], velocity Gaussian at θ's
        root-mean-square size (drawn here, so that it is generic even when the base family's
        own point is deterministic, e.g. a model's current parameters)."""
        theta = theta.to(DTYPE)
        t = 1.0 + torch.rand(1, dtype=DTYPE, generator=generator)
        size = float(theta.square().mean().sqrt()) or 1.0
        v = size * torch.randn(self.base_D, dtype=DTYPE, generator=generator)
        return torch.cat([t, theta, v])

    def sample(self, point: Tensor, n: int, generator: torch.Generator) -> Tensor:
        keys = self.sample_keys(n, generator)
        return fields(self, point.expand(n, -1).contiguous(), keys)

    def gram_matvec(self, point: Tensor) -> Callable[[Tensor], Tensor]:
        """G = E[F F^T] = F_0 F_0^T + (0, 0, G_base) for c_0 ~ N(0, 1) independent of a."""
        drift = self.drift(point[None])[0]
        _, theta, _ = self.split(point[None])
        base_op = self.base.gram_matvec(theta[0])

        def op(w: Tensor) -> Tensor:
            pushed = base_op(w[:, 1 + self.base_D :])
            head = torch.zeros(w.shape[0], 1 + self.base_D, dtype=w.dtype)
            return (w @ drift)[:, None] * drift + torch.cat([head, pushed], dim=1)

        return op

    def gram_diagonal(self, point: Tensor) -> Tensor:
        drift = self.drift(point[None])[0]
        _, theta, _ = self.split(point[None])
        head = torch.zeros(1 + self.base_D, dtype=DTYPE)
        return drift * drift + torch.cat([head, self.base.gram_diagonal(theta[0])])


# --------------------------------------------------------------------------------------
# Mirror flows


class MirrorGenerators:
    """Fields ∇²Φ(θ)^{-1} ∇ψ_a of the mirror flow of a potential Φ (same space R^D as ``base``).

    ``potential`` is ``"entropy"`` (Φ = Σ θ log θ, θ > 0: fields θ ⊙ ∇ψ_a) or a callable Φ
    (flat float64 tensor → 0-d tensor, strictly convex where it is used).

    Example:
        >>> import torch
        >>> from torch_conslaw.lie.generators import FunctionGenerators
        >>> fam = MirrorGenerators(FunctionGenerators(lambda t: t.prod().reshape(1), 3), "entropy")
        >>> bool((fam.random_point(torch.Generator().manual_seed(0)) > 0).all())
        True
    """

    flow = "mirror"

    def __init__(self, base: GeneratorFamily, potential: str | Callable[[Tensor], Tensor]):
        self.base = base
        self.potential = potential
        self.D = base.D
        self.key_dim = base.key_dim
        if hasattr(base, "d"):
            self.d = base.d

    def _inverse_metric(self, thetas: Tensor, vectors: Tensor) -> Tensor:
        """∇²Φ(θ)^{-1} w, row by row."""
        if self.potential == "entropy":
            return thetas * vectors
        # Cholesky, not torch.linalg.solve: the second forward-mode derivative of
        # linalg.solve is wrong in torch 2.13 (depth-3 brackets came out full rank)
        metric = vmap(hessian(self.potential))(thetas)
        return torch.cholesky_solve(vectors[..., None], torch.linalg.cholesky(metric))[..., 0]

    def field_batch(self, thetas: Tensor, keys: Tensor) -> Tensor:
        return self._inverse_metric(thetas, fields(self.base, thetas, keys))

    def sample_keys(self, n: int, generator: torch.Generator) -> Tensor:
        return self.base.sample_keys(n, generator)

    def random_point(self, generator: torch.Generator) -> Tensor:
        """Entropy: θ = exp(z/2) with z standard Gaussian (inside θ > 0); a callable Φ: the base's point."""
        if self.potential == "entropy":
            theta = torch.exp(0.5 * torch.randn(self.D, dtype=DTYPE, generator=generator))
        else:
            theta = self.base.random_point(generator)
        self.check_point(theta)
        return theta

    def check_point(self, theta: Tensor) -> None:
        """Refuse a point outside the potential's domain (or where its Hessian is not positive definite)."""
        if self.potential == "entropy":
            if not bool((theta > 0).all()):
                bad = int((theta <= 0).sum())
                raise ValueError(
                    f"the entropy potential Σ θ log θ needs θ > 0, but {bad} of the {self.D} entries of theta are ≤ 0; "
                    "pass a positive theta (e.g. theta.abs() + 0.1) or leave theta=None for a random positive point"
                )
            return
        try:
            metric = hessian(self.potential)(theta)
        except Exception as err:
            raise ValueError(
                f"potential failed at theta ({type(err).__name__}: {err}); it must map a flat float64 tensor of "
                f"size D={self.D} to a 0-d tensor with torch.func-compatible operations"
            ) from err
        if metric.shape != (self.D, self.D) or not torch.isfinite(metric).all():
            raise ValueError(
                f"the potential's Hessian at theta has shape {tuple(metric.shape)} or non-finite entries; "
                f"the potential must map a flat tensor of size D={self.D} to a finite 0-d tensor"
            )
        if torch.linalg.cholesky_ex(metric).info != 0:
            raise ValueError(
                "the potential's Hessian is not positive definite at theta (a mirror flow needs a strictly convex "
                "potential); pass a theta inside the potential's domain of strict convexity"
            )

    def sample(self, theta: Tensor, n: int, generator: torch.Generator) -> Tensor:
        keys = self.sample_keys(n, generator)
        return fields(self, theta.expand(n, -1).contiguous(), keys)

    def gram_matvec(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        """G = M G_base M with M = ∇²Φ(θ)^{-1} (symmetric)."""
        base_op = self.base.gram_matvec(theta)
        rows = lambda w: self._inverse_metric(theta.expand(w.shape[0], -1), w)
        return lambda w: rows(base_op(rows(w)))

    def gram_diagonal(self, theta: Tensor) -> Tensor:
        if self.potential == "entropy":
            return theta * theta * self.base.gram_diagonal(theta)
        return torch.diagonal(self.gram_matvec(theta)(torch.eye(self.D, dtype=DTYPE)))


# --------------------------------------------------------------------------------------
# Choosing a flow by name


def with_flow(
    base: GeneratorFamily,
    flow: str = "gradient",
    *,
    tau: float | Friction | None = None,
    potential: str | Callable[[Tensor], Tensor] | None = None,
) -> GeneratorFamily:
    """The generator family of ``flow`` built on ``base`` (``base`` itself for ``"gradient"``).

    Args:
        base: a gradient family on R^D (ψ_a and their gradients).
        flow: "gradient", "heavy_ball", "nesterov" or "mirror".
        tau: heavy ball's friction: a constant ≥ 0 (default 1) or a callable t ↦ τ(t)
            (0-d float64 tensor → 0-d tensor). Fixed to 3/t for Nesterov; not used otherwise.
        potential: the mirror potential: "entropy" or a callable Φ. Required for "mirror"
            only.

    Example:
        >>> from torch_conslaw.lie.generators import FunctionGenerators
        >>> with_flow(FunctionGenerators(lambda t: t.prod().reshape(1), 3), "mirror", potential="entropy").D
        3
    """
    if not isinstance(flow, str) or flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; choose one of {', '.join(map(repr, FLOWS))}")
    if tau is not None and flow != "heavy_ball":
        hint = " (Nesterov's friction is fixed to 3/t; use flow='heavy_ball', tau=callable for another schedule)" if flow == "nesterov" else ""
        raise ValueError(f"tau is the friction of flow='heavy_ball' only; got tau={tau!r} with flow={flow!r}{hint}")
    if potential is not None and flow != "mirror":
        raise ValueError(f"potential is used by flow='mirror' only; got potential={potential!r} with flow={flow!r}")
    if flow == "gradient":
        return base
    if flow == "nesterov":
        return PhaseSpaceGenerators(base, _nesterov_friction, flow)
    if flow == "heavy_ball":
        return PhaseSpaceGenerators(base, _friction_from_tau(1.0 if tau is None else tau), flow)
    if potential is None:
        raise ValueError(
            "flow='mirror' needs a potential: potential='entropy' (Σ θ log θ on θ > 0, e.g. NMF's multiplicative "
            "updates) or a callable Φ (flat float64 tensor -> 0-d tensor, strictly convex)"
        )
    if isinstance(potential, str):
        if potential not in POTENTIALS:
            raise ValueError(f"unknown potential {potential!r}; choose one of {POTENTIALS} or pass a callable Φ")
    elif not callable(potential):
        raise TypeError(f"potential must be 'entropy' or a callable Φ, got {type(potential).__name__}")
    return MirrorGenerators(base, potential)


def _friction_from_tau(tau: float | Friction) -> Friction:
    if callable(tau):
        _check_friction(tau, torch.tensor([1.0, 1.5, 2.0], dtype=DTYPE))
        return tau
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a real number ≥ 0 or a callable t -> tau(t), got {type(tau).__name__}")
    if not math.isfinite(float(tau)) or float(tau) < 0:
        raise ValueError(f"tau must be a finite friction ≥ 0, got {tau!r}")
    return _constant_friction(float(tau))


def flow_point(family: GeneratorFamily, theta: Tensor | None, generator: torch.Generator) -> Tensor:
    """The point at which to count: a random one, or the given θ (lifted to phase space with a
    random time and velocity for momentum flows; a full phase point of size 2D + 1 is used as is).

    Example:
        >>> import torch
        >>> from torch_conslaw.lie.generators import FunctionGenerators
        >>> fam = with_flow(FunctionGenerators(lambda t: t.prod().reshape(1), 3), "nesterov")
        >>> flow_point(fam, torch.ones(3, dtype=torch.float64), torch.Generator().manual_seed(0)).shape
        torch.Size([7])
    """
    if theta is None:
        return family.random_point(generator)
    if isinstance(family, PhaseSpaceGenerators):
        if theta.numel() == family.D:
            point = theta.reshape(-1).to(DTYPE)
            if family.flow == "nesterov" and not bool(point[0] > 0):
                raise ValueError(f"Nesterov's friction 3/t needs a time t > 0; the phase point has t = {float(point[0])}")
            return point
        if theta.numel() != family.base_D:
            raise ValueError(
                f"theta has {theta.numel()} entries; a momentum flow takes θ (size D={family.base_D}) or a full "
                f"phase point (t, θ, v) of size 2D+1={family.D}"
            )
        return family.lift_point(theta.reshape(-1), generator)
    if isinstance(family, MirrorGenerators):
        family.check_point(theta)
    return theta
