"""Generator families: the scalar functions ψ_a(θ) = ⟨a, φ(θ)⟩ whose gradients span W_φ(θ).

A family knows how to draw random coefficient keys ``a`` and how to evaluate ψ_a(θ) as a
pure function of (θ, key), so that gradients, Lie brackets and batches come from
``torch.func`` transforms. Two families exist:

* :class:`FunctionGenerators` — any torch map φ : R^D → R^d; key a ∈ R^d, ψ_a = ⟨a, φ(θ)⟩.
* :class:`MLPGenerators` — fully connected networks, without materializing the path
  lifting: ψ_a is the output of a *gated surrogate* network (SCIENCE.md §2) whose hidden
  activations are replaced by multiplication with a random gate (ReLU) or by 1 (linear).

Both also provide the Gram operator G = E_a[X_a X_a^T] (range G = W_φ(θ)) used by the
matrix-free method for large D (:mod:`torch_conslaw.lie.gram`).

Example:
    >>> import torch
    >>> fam = MLPGenerators([3, 2, 2], ["relu"])
    >>> theta = fam.random_point(torch.Generator().manual_seed(0))
    >>> fam.sample(theta, 4, torch.Generator().manual_seed(1)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

__all__ = [
    "ActivationKind",
    "ACTIVATION_KINDS",
    "register_activation_kind",
    "GeneratorFamily",
    "FunctionGenerators",
    "MLPGenerators",
]

DTYPE = torch.float64


class GeneratorFamily(Protocol):
    """What the Lie calculator needs from a factorization."""

    D: int
    key_dim: int

    def psi_batch(self, thetas: Tensor, keys: Tensor) -> Tensor:
        """ψ_{keys[i]}(thetas[i]) for every row i, shape (n,) (pure torch, differentiable).

        A family of fields that are not gradients defines ``field_batch(thetas, keys)``
        (rows X_{keys[i]}(thetas[i]), shape (n, D)) instead; see :func:`fields`.
        """

    def sample_keys(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` random keys, shape (n, key_dim)."""

    def random_point(self, generator: torch.Generator) -> Tensor:
        """A random θ at which the generic ranks are reached."""

    def sample(self, theta: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """Vector fields X_a(θ) = ∇ψ_a(θ) for ``n`` random keys, shape (n, D)."""

    def gram_matvec(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        """v ↦ G v for G = E_a[X_a X_a^T], batched over the rows of v (shape (m, D))."""

    def gram_diagonal(self, theta: Tensor) -> Tensor:
        """The diagonal of G (a Jacobi preconditioner)."""


def fields(family: GeneratorFamily, thetas: Tensor, keys: Tensor) -> Tensor:
    """Rows X_{keys[i]}(thetas[i]) = ∇ψ_{keys[i]}(thetas[i]), shape (n, D).

    Row i of Σ_j ψ_{keys[j]}(thetas[j]) depends on thetas[i] only, so one gradient of the
    sum gives every field at once — no per-sample loop or vmap. A family whose fields are
    not gradients (momentum and mirror flows, :mod:`.flows`) gives them itself through
    ``field_batch(thetas, keys)`` instead of ``psi_batch``.
    """
    field_batch = getattr(family, "field_batch", None)
    if field_batch is not None:
        return field_batch(thetas, keys)
    return grad(lambda t: family.psi_batch(t, keys).sum())(thetas)


def _sample_fields(family: GeneratorFamily, theta: Tensor, keys: Tensor) -> Tensor:
    return fields(family, theta.expand(keys.shape[0], -1).contiguous(), keys)


# --------------------------------------------------------------------------------------
# Generic maps


class FunctionGenerators:
    """Generators of an arbitrary torch map ``phi`` from R^D to R^d.

    ``phi`` takes a flat float64 tensor of size ``D`` and returns a flat tensor; it is
    checked once (flat, finite, float64) at a reference point.

    Example:
        >>> import torch
        >>> fam = FunctionGenerators(lambda t: t.prod().reshape(1), 3)
        >>> fam.d
        1
    """

    def __init__(self, phi: Callable[[Tensor], Tensor], D: int, theta: Tensor | None = None):
        if not callable(phi):
            raise TypeError(f"phi must be callable (flat tensor of size D -> flat tensor), got {type(phi).__name__}")
        if not isinstance(D, int) or isinstance(D, bool) or D < 1:
            raise ValueError(f"D must be a positive integer (the size of phi's input), got {D!r}")
        self.phi = phi
        self.D = D
        probe = theta if theta is not None else torch.randn(D, dtype=DTYPE, generator=torch.Generator().manual_seed(12345))
        self.d = self._check_output(probe)
        self.key_dim = self.d
        self._check_composable(probe)

    def _check_output(self, theta: Tensor) -> int:
        try:
            out = self.phi(theta)
        except Exception as err:  # re-raised with the likely cause
            raise ValueError(
                f"phi raised {type(err).__name__}: {err} when called with a flat float64 tensor "
                f"of size D={self.D}; check that D matches what phi expects"
            ) from err
        if not isinstance(out, Tensor):
            raise TypeError(f"phi must return a torch.Tensor, got {type(out).__name__}")
        if out.dim() != 1:
            raise ValueError(
                f"phi must return a flat (1-D) tensor, got shape {tuple(out.shape)}; "
                "return phi(theta).reshape(-1)"
            )
        if out.dtype != DTYPE:
            raise ValueError(
                f"phi returned dtype {out.dtype} for a float64 input; compute in theta's dtype "
                "(float64) so that rank decisions are reliable"
            )
        if not torch.isfinite(out).all():
            raise ValueError("phi returned non-finite values (nan/inf) at a random point; make phi finite on R^D")
        if out.numel() == 0:
            raise ValueError(f"phi returned an empty tensor for an input of size D={self.D}; check D (phi needs at least one output)")
        return out.numel()

    def _check_composable(self, theta: Tensor) -> None:
        try:
            jvp(lambda t: fields(self, t, torch.ones(2, self.d, dtype=DTYPE)), (theta.expand(2, -1).contiguous(),), (torch.ones(2, self.D, dtype=DTYPE),))
        except Exception as err:
            raise ValueError(
                f"phi cannot be differentiated with torch.func ({type(err).__name__}: {err}); write phi "
                "with out-of-place torch operations only (build outputs with torch.stack/torch.cat, not by item assignment), "
                "no .item()/.numpy()/.tolist(), no data-dependent Python control flow"
            ) from err

    def psi_batch(self, thetas: Tensor, keys: Tensor) -> Tensor:
        return torch.einsum("bi,bi->b", vmap(self.phi)(thetas), keys)

    def sample_keys(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, self.d, dtype=DTYPE, generator=generator)

    def random_point(self, generator: torch.Generator) -> Tensor:
        return torch.randn(self.D, dtype=DTYPE, generator=generator)

    def sample(self, theta: Tensor, n: int, generator: torch.Generator) -> Tensor:
        return _sample_fields(self, theta, self.sample_keys(n, generator))

    def gram_matvec(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        _, pullback = vjp(self.phi, theta)

        def one(v: Tensor) -> Tensor:
            jv = jvp(self.phi, (theta,), (v,))[1]
            return pullback(jv)[0]

        return vmap(one)

    def gram_diagonal(self, theta: Tensor) -> Tensor:
        _, pullback = vjp(self.phi, theta)
        diag = torch.zeros(self.D, dtype=DTYPE)
        eye = torch.eye(self.d, dtype=DTYPE)
        for start in range(0, self.d, 256):
            rows = vmap(lambda e: pullback(e)[0])(eye[start : start + 256])
            diag += (rows * rows).sum(0)
        return diag


# --------------------------------------------------------------------------------------
# Fully connected networks through gated surrogates


@dataclass(frozen=True)
class ActivationKind:
    """How a hidden activation enters the gated surrogate and the Gram recursion.

    ``gated``: True when the activation is replaced by a random Gaussian gate c, so that
    E[c c^T] = I keeps only the diagonal of the second moment (positively homogeneous,
    piecewise-linear activations: ReLU, leaky ReLU, |z|); False when it is the identity
    (a linear hidden layer), which passes the whole second moment on.
    """

    name: str
    gated: bool

    def propagate(self, w_a: Tensor, sigma: Tensor, w_b: Tensor) -> Tensor:
        """W_a E[h h'^T] W_b^T given Σ = E[z z'^T] of the layer below."""
        if self.gated:
            return (w_a * torch.diagonal(sigma)) @ w_b.T
        return w_a @ sigma @ w_b.T

    def moment_diagonal(self, sigma: Tensor) -> Tensor:
        """The diagonal of E[h h'^T]: equal to diag Σ for both gated and linear kinds."""
        return torch.diagonal(sigma)


ACTIVATION_KINDS: dict[str, ActivationKind] = {
    "linear": ActivationKind("linear", gated=False),
    "relu": ActivationKind("relu", gated=True),
    "leaky_relu": ActivationKind("leaky_relu", gated=True),
    "abs": ActivationKind("abs", gated=True),
}


def register_activation_kind(kind: ActivationKind) -> None:
    """Make a new hidden-activation kind available to :class:`MLPGenerators` by name.

    Example:
        >>> register_activation_kind(ActivationKind("my_relu", gated=True))
    """
    ACTIVATION_KINDS[kind.name] = kind


class MLPGenerators:
    """Generators of a fully connected network's path lifting, via gated surrogates.

    Parameters are laid out flat as ``W1, b1, W2, b2, …`` (``W_k`` of shape
    (n_k, n_{k-1}), row-major; ``b_k`` only with ``bias=True``). ``activations`` has one
    entry per hidden layer, each a name in :data:`ACTIVATION_KINDS`.

    Example:
        >>> MLPGenerators([4, 3, 5], ["linear"]).D
        27
    """

    def __init__(
        self,
        widths: Sequence[int],
        activations: Sequence[str] | str,
        bias: bool = False,
        output_bias: bool | None = None,
    ):
        widths = [int(w) for w in widths]
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise ValueError(
                f"widths must list at least an input and an output width, all >= 1 (got {widths})"
            )
        n_hidden = len(widths) - 2
        if isinstance(activations, str):
            activations = [activations] * n_hidden
        activations = [str(a).lower() for a in activations]
        if len(activations) != n_hidden:
            raise ValueError(
                f"activations needs one entry per hidden layer: widths {widths} have {n_hidden} "
                f"hidden layers, got {len(activations)} ({activations})"
            )
        for a in activations:
            if a not in ACTIVATION_KINDS:
                raise ValueError(
                    f"unsupported activation {a!r}; choose one of {sorted(ACTIVATION_KINDS)} "
                    "or register a new kind with register_activation_kind"
                )
        self.widths = widths
        self.activations = activations
        self.kinds = [ACTIVATION_KINDS[a] for a in activations]
        self.bias = bool(bias)
        self._n_layers = len(widths) - 1
        last_bias = self.bias if output_bias is None else bool(output_bias)
        self.layer_bias = [self.bias] * (self._n_layers - 1) + [last_bias]
        self.shapes: list[tuple[int, ...]] = []
        for k in range(1, len(widths)):
            self.shapes.append((widths[k], widths[k - 1]))
            if self.layer_bias[k - 1]:
                self.shapes.append((widths[k],))
        self.sizes = [math.prod(s) for s in self.shapes]
        self.D = sum(self.sizes)
        # key layout: x (n0) | gates of gated hidden layers | y (nL) | one scalar per bias
        self._gate_sizes = [w if kind.gated else 0 for w, kind in zip(widths[1:-1], self.kinds)]
        self._n_betas = sum(self.layer_bias)
        self.key_dim = widths[0] + sum(self._gate_sizes) + widths[-1] + self._n_betas

    # ---- layout helpers -------------------------------------------------------------
    def unflatten(self, theta: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """Split flat θ into [(W_1, b_1), (W_2, b_2), …] (b_k is None for a layer without bias)."""
        parts = iter(torch.split(theta, self.sizes))
        layers = []
        for k in range(self._n_layers):
            w = next(parts).reshape(self.widths[k + 1], self.widths[k])
            b = next(parts) if self.layer_bias[k] else None
            layers.append((w, b))
        return layers

    def parameter_names(self) -> list[str]:
        """Readable names of the D coordinates, e.g. ``W1[0,2]``, ``b1[0]``."""
        names = []
        for k in range(1, len(self.widths)):
            names += [f"W{k}[{i},{j}]" for i in range(self.widths[k]) for j in range(self.widths[k - 1])]
            if self.layer_bias[k - 1]:
                names += [f"b{k}[{i}]" for i in range(self.widths[k])]
        return names

    def _split_keys(self, keys: Tensor) -> tuple[Tensor, list[Tensor | None], Tensor, list[Tensor | None]]:
        """Rows of keys → inputs x, gates per hidden layer (None if linear), read-outs y, bias scalars."""
        sizes = [self.widths[0], *self._gate_sizes, self.widths[-1], self._n_betas]
        parts = torch.split(keys, sizes, dim=1)
        x, gates, y, beta_cols = parts[0], list(parts[1:-2]), parts[-2], parts[-1]
        betas: list[Tensor | None] = []
        j = 0
        for has_bias in self.layer_bias:
            betas.append(beta_cols[:, j : j + 1] if has_bias else None)
            j += int(has_bias)
        return x, [g if kind.gated else None for g, kind in zip(gates, self.kinds)], y, betas

    # ---- the family -----------------------------------------------------------------
    def psi_batch(self, thetas: Tensor, keys: Tensor) -> Tensor:
        """Gated surrogate outputs y^T z_L, one network per row of ``thetas``/``keys``.

        Written with contractions only (gates as diagonal matrices, biases as an extra input
        column): elementwise products of a constant with a differentiated tensor fall back to
        slow Python decompositions under nested ``jvp``/``grad``.
        """
        n = thetas.shape[0]
        x, gates, y, betas = self._split_keys(keys)
        parts = iter(torch.split(thetas, self.sizes, dim=1))
        h = x
        for k in range(self._n_layers):
            w = next(parts).reshape(n, self.widths[k + 1], self.widths[k])
            if self.layer_bias[k]:
                w = torch.cat([w, next(parts).unsqueeze(-1)], dim=2)
                h = torch.cat([h, betas[k]], dim=1)
            h = torch.einsum("bij,bj->bi", w, h)
            if k < len(gates) and gates[k] is not None:
                h = torch.einsum("bij,bj->bi", torch.diag_embed(gates[k]), h)
        return torch.einsum("bi,bi->b", y, h)

    def sample_keys(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, self.key_dim, dtype=DTYPE, generator=generator)

    def random_point(self, generator: torch.Generator) -> Tensor:
        chunks = []
        for shape in self.shapes:  # He-like scales keep every layer's contribution O(1)
            scale = 1.0 / math.sqrt(shape[1]) if len(shape) == 2 else 0.5
            chunks.append(torch.randn(math.prod(shape), dtype=DTYPE, generator=generator) * scale)
        return torch.cat(chunks)

    def sample(self, theta: Tensor, n: int, generator: torch.Generator) -> Tensor:
        return _sample_fields(self, theta, self.sample_keys(n, generator))

    # ---- Gram operator (Gaussian second moments, SCIENCE.md §2) -----------------------
    def _gram_kernel(self, theta_a: Tensor, theta_b: Tensor, probes: Sequence[Tensor] | None = None) -> Tensor:
        """K(θ, θ') = E_a[ψ_a(θ) ψ_a(θ')], propagating Σ_k = E[z_k z_k'^T] layer by layer.

        With Gaussian keys: Σ_1 = W_1 W_1'^T + b_1 b_1'^T (E[x x^T] = I),
        Σ_{k+1} = W_{k+1} E[h_k h_k'^T] W_{k+1}'^T + b_{k+1} b_{k+1}'^T, K = tr Σ_L.
        ``probes`` (one n_k × n_k matrix per layer, added to Σ_k) expose ∂K/∂Σ_k.
        """
        layers_a, layers_b = self.unflatten(theta_a), self.unflatten(theta_b)
        sigma = theta_a.new_zeros(())
        for k, ((wa, ba), (wb, bb)) in enumerate(zip(layers_a, layers_b)):
            sigma = wa @ wb.T if k == 0 else self.kinds[k - 1].propagate(wa, sigma, wb)
            if ba is not None:
                sigma = sigma + torch.outer(ba, bb)
            if probes is not None:
                sigma = sigma + probes[k]
        return torch.trace(sigma)

    def gram_matvec(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        def one(v: Tensor) -> Tensor:
            directional = lambda t: jvp(lambda u: self._gram_kernel(t, u), (theta,), (v,))[1]
            return grad(directional)(theta)

        return vmap(one)

    def gram_diagonal(self, theta: Tensor) -> Tensor:
        """Exact diag(G): for W_k[i, j] it is A_k[i, i] · H_{k-1}[j, j], for b_k[i] it is A_k[i, i],
        with A_k = ∂K/∂Σ_k (the downstream adjoint) and H_{k-1} = E[h h^T] of the layer below."""
        probes = [torch.zeros(w, w, dtype=DTYPE, requires_grad=True) for w in self.widths[1:]]
        upstream: list[Tensor] = [torch.ones(self.widths[0], dtype=DTYPE)]
        sigma = None
        with torch.no_grad():
            for k, (w, b) in enumerate(self.unflatten(theta)[:-1]):
                sigma = w @ w.T if k == 0 else self.kinds[k - 1].propagate(w, sigma, w)
                if b is not None:
                    sigma = sigma + torch.outer(b, b)
                upstream.append(self.kinds[k].moment_diagonal(sigma).clone())
        kernel = self._gram_kernel(theta, theta, probes)
        adjoints = torch.autograd.grad(kernel, probes)
        diag = []
        for a, m, has_bias in zip(adjoints, upstream, self.layer_bias):
            a_diag = torch.diagonal(a)
            diag.append(torch.outer(a_diag, m).reshape(-1))
            if has_bias:
                diag.append(a_diag.clone())
        return torch.cat(diag)
