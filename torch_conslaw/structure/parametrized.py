"""Layers whose weight is computed by a ``torch.nn.utils.parametrize`` parametrization.

``weight_norm`` (W = g · v / ‖v‖ per row), ``spectral_norm`` (W = V / σ(V)) and any other
parametrization make ``module.weight`` a computed tensor: the trainable tensors are the
*originals* (``parametrizations.weight.original0``, ``original1``, or ``original``). Two facts
about the map originals → W decide which laws exist, and both are checked numerically here on
the module's own originals (never assumed from the class name):

* **row-linear** original: scaling its slice j (along axis 0) by c_j scales row j of W by c_j
  and nothing else (``weight_norm``'s g). A producer's unit j is then rescaled through that
  original instead of W, so the rescaling law of unit j reads g_j (with b_j) instead of W[j];
* **scale-invariant** original: scaling it (each slice j along axis 0 by its own c_j > 0, or
  the whole tensor by c > 0) leaves W unchanged (``weight_norm``'s v per row,
  ``spectral_norm``'s V as a whole). The loss then never changes along the original itself,
  so ‖slice_j‖² (or ‖V‖²) is an exact law, whatever else the model does
  (:mod:`torch_conslaw.laws.families.parametrization`).

The parametrizations are evaluated with :func:`torch.func.functional_call` in eval mode
(``spectral_norm`` updates its power-iteration vectors in train mode; eval reads them), on
copies: the module is not changed.

Example:
    >>> from torch import nn
    >>> lin = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4))
    >>> [(name, kind) for name, kind in original_kinds(lin, "weight")]
    [('original0', 'row-linear'), ('original1', 'row-invariant')]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

__all__ = ["is_parametrized", "originals", "original_kinds", "parametrized_incoming", "parametrization_names", "unread_entries"]


def is_parametrized(module: nn.Module, attr: str | None = None) -> bool:
    return parametrize.is_parametrized(module, attr) if attr is not None else parametrize.is_parametrized(module)


def parametrization_names(module: nn.Module, attr: str) -> str:
    """``_WeightNorm`` / ``_SpectralNorm, Custom``: the parametrizations of ``attr``."""
    return ", ".join(type(p).__name__ for p in module.parametrizations[attr])


def originals(module: nn.Module, attr: str) -> list[tuple[str, Tensor]]:
    """The trainable originals of a parametrized tensor, in order (``original`` or
    ``original0``, ``original1``, ...)."""
    plist = module.parametrizations[attr]
    return [(n, p) for n, p in plist.named_parameters(recurse=False) if n.startswith("original")]


def _value(module: nn.Module, attr: str, replaced: dict[str, Tensor]) -> Tensor:
    plist = module.parametrizations[attr]
    modes = [(m, m.training) for m in plist.modules()]
    try:
        for m, _ in modes:
            m.training = False
        with torch.no_grad():
            return functional_call(plist, replaced, ()).detach()
    finally:
        for m, mode in modes:
            m.training = mode


def _close(a: Tensor, b: Tensor) -> bool:
    tol = 1e3 * torch.finfo(a.dtype).eps if a.is_floating_point() else 0.0
    return a.shape == b.shape and bool((a - b).norm() <= tol * max(float(a.norm()), 1e-300))


def original_kinds(module: nn.Module, attr: str) -> list[tuple[str, str]]:
    """For each original of ``module.<attr>``: ``"row-linear"``, ``"row-invariant"``,
    ``"invariant"`` (whole-tensor scale only) or ``"other"`` (see the module docstring).

    Measured at the module's originals and at a random point (an original that is zero at
    initialization, like ``orthogonal``'s with its trivialization, is trivially "invariant"
    there); a kind must hold at both."""
    actual = {n: p.detach() for n, p in originals(module, attr)}
    gen = torch.Generator().manual_seed(0)
    drawn = {}
    for n, p in actual.items():
        if not p.is_floating_point():
            return [(m, "other") for m in actual]
        size = float(p.norm()) / max(p.numel(), 1) ** 0.5
        drawn[n] = p + (size if size > 0 else 1.0) * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    kinds = []
    for base in (actual, drawn):
        try:
            kinds.append(_kinds_at(module, attr, base))
        except Exception:  # the parametrization refuses the random point: claim nothing
            return [(m, "other") for m in actual]
    return [(n, a if a == b else "other") for (n, a), (_, b) in zip(*kinds)]


def _kinds_at(module: nn.Module, attr: str, base: dict[str, Tensor]) -> list[tuple[str, str]]:
    value = _value(module, attr, base)
    if not bool(torch.isfinite(value).all()):
        return [(n, "other") for n in base]
    gen = torch.Generator().manual_seed(1)
    out = []
    for name, orig in base.items():
        kind = "other"
        if orig.dim() >= 1 and orig.is_floating_point() and value.dim() >= 1 and orig.shape[0] == value.shape[0]:
            c = (0.5 + 1.5 * torch.rand(orig.shape[0], generator=gen, dtype=torch.float64)).to(orig.dtype)
            shape = (-1,) + (1,) * (orig.dim() - 1)
            scaled = _value(module, attr, {**base, name: orig * c.view(shape)})
            if _close(value, scaled):
                kind = "row-invariant" if orig.shape[0] > 1 else "invariant"
            elif _close(value * c.view((-1,) + (1,) * (value.dim() - 1)).to(value.dtype), scaled):
                kind = "row-linear"
        if kind == "other" and orig.is_floating_point() and _close(value, _value(module, attr, {**base, name: 1.7 * orig})):
            kind = "invariant"
        out.append((name, kind))
    return out


def unread_entries(module: nn.Module, attr: str) -> dict[str, Tensor]:
    """For each original of ``module.<attr>``, the flat indices of the entries the
    parametrization never reads (its value does not depend on them: ``orthogonal``'s map reads
    only the strict lower triangle of its original), measured as entries with an exactly zero
    gradient of ⟨r, value⟩ for two random r at the module's originals and at a random point.
    Only originals with such entries are returned."""
    actual = {n: p.detach() for n, p in originals(module, attr)}
    if not all(p.is_floating_point() for p in actual.values()):
        return {}
    gen = torch.Generator().manual_seed(2)
    drawn = {n: p + torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for n, p in actual.items()}
    unread = {n: torch.ones(p.numel(), dtype=torch.bool) for n, p in actual.items()}
    plist = module.parametrizations[attr]
    modes = [(m, m.training) for m in plist.modules()]
    try:
        for m, _ in modes:
            m.training = False
        for base in (actual, drawn):
            leaves = {n: p.clone().requires_grad_(True) for n, p in base.items()}
            value = functional_call(plist, leaves, ())
            for _ in range(2):
                r = torch.randn(value.shape, generator=gen, dtype=torch.float64).to(value.dtype)
                grads = torch.autograd.grad((value * r).sum(), list(leaves.values()), retain_graph=True, allow_unused=True)
                for (n, _), gr in zip(leaves.items(), grads):
                    if gr is not None:
                        unread[n] &= gr.reshape(-1) == 0
    except Exception:
        return {}
    finally:
        for m, mode in modes:
            m.training = mode
    return {n: mask.nonzero().flatten() for n, mask in unread.items() if bool(mask.any())}


def _reads_rows(fn: Callable[[Tensor], Tensor], shape: tuple[int, ...]) -> bool:
    """True when reader ``fn`` gives one row per slice of axis 0 holding exactly that slice
    (``w``, ``w.flatten(1)``), checked on an index probe."""
    if not shape:
        return False
    probe = torch.arange(int(torch.Size(shape).numel()), dtype=torch.float64).reshape(shape)
    try:
        rows = fn(probe)
    except Exception:
        return False
    if rows.dim() < 1 or rows.shape[0] != shape[0]:
        return False
    return all(
        torch.equal(rows[j].reshape(-1).sort().values, probe[j].reshape(-1)) for j in range(shape[0])
    )


def parametrized_incoming(
    module: nn.Module, readers: list[tuple[str, Callable[[Tensor], Tensor]]]
) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    """The incoming readers of a producer whose read tensors may be parametrized: a tensor
    computed by a parametrization with a row-linear original is read through that original
    (``parametrizations.<attr>.<original>``, one row per unit). Raises ``ValueError`` with the
    reason when a parametrized tensor has no such original (``spectral_norm``) or the layer
    does not read it by rows along axis 0."""
    out = []
    for attr, fn in readers:
        if not is_parametrized(module, attr):
            out.append((attr, fn))
            continue
        kinds = original_kinds(module, attr)
        linear = [n for n, k in kinds if k == "row-linear"]
        what = f"computes its {attr} with a parametrization ({parametrization_names(module, attr)})"
        if not linear:
            raise ValueError(
                f"{what} in which no original scales one unit's row alone (scaling a row of the "
                "original changes every row, as σ(W) of spectral_norm does), so no rescaling law "
                "starts at it; its scale-invariant originals keep their own laws"
            )
        shape = tuple(getattr(module, attr).shape)
        if not _reads_rows(fn, shape):
            raise ValueError(
                f"{what}, whose row-linear original scales the slices of axis 0, but the layer's "
                "units are not those slices: no rescaling law starts at it"
            )
        out.append((f"parametrizations.{attr}.{linear[0]}", lambda t: t.reshape(t.shape[0], -1)))
    return out
