"""Independent checks for the laws the op-graph rules claim (tests only).

``law_residuals``: for every law h of every group, the largest relative residual
|⟨∇h(θ), ∂_θ⟨u, f(θ, x)⟩⟩| / (‖∇h‖ ‖∂_θ⟨u, f⟩‖) over random output cotangents u, in float64,
with ``torch.func`` (``jacrev`` of the group values, ``vjp`` of the model).
``sgd_first_order``: the largest relative first-order part 2B(θ, Δ) / scale(θ) of one SGD
step Δ = −η ∇L on a random quadratic loss. ``seeded_randn``, ``seeded_model``, ``sync_monitor``
and ``quiet_monitor``: the inputs, models and monitors the tests build their checks on;
``sgd_mse``: a few SGD steps on a squared error, monitored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp

from torch_conslaw import ConservationMonitor
from torch_conslaw.lawgroups import LawGroup


def seeded_randn(*shape: int, seed: int = 0) -> Tensor:
    """A float64 standard normal tensor from its own generator (``seed``)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sync_monitor(model: nn.Module, x: Any) -> ConservationMonitor:
    """A monitor recording every step synchronously, its laws checked on ``x``."""
    return ConservationMonitor(model, x, every=1, recording="sync")


def quiet_monitor(model: nn.Module, x: Any) -> ConservationMonitor:
    """:func:`sync_monitor` without its warnings (a near miss warns that it has no law)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sync_monitor(model, x)


def sgd_mse(model: nn.Module, x: Any, target: Tensor, lr: float, steps: int,
            monitor: ConservationMonitor | None = None) -> None:
    """``steps`` SGD steps (``lr``) on the mean squared error of ``model(x)`` to ``target``,
    with ``monitor`` attached to the optimizer when given."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if monitor is not None:
        monitor.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        opt.step()


def seeded_model(cls: Callable[..., nn.Module], *args: Any) -> nn.Module:
    """``cls(*args)`` initialized from seed 0, in float64."""
    torch.manual_seed(0)
    return cls(*args).to(torch.float64)


def _output(model: nn.Module, params: dict[str, Tensor], example: Any, pick: Callable[[Any], Tensor]) -> Tensor:
    if isinstance(example, dict):
        return pick(functional_call(model, params, (), example))
    return pick(functional_call(model, params, (example,)))


def law_residuals(model: nn.Module, example: Any, groups: list[LawGroup], pick: Callable[[Any], Tensor],
                  draws: int = 3, seed: int = 0) -> float:
    """The worst relative residual over every law of ``groups`` (see the module docstring)."""
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(draws):
        out, pull = vjp(lambda p: _output(model, p, example, pick), params)
        u = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        grads.append(pull(u)[0])
    worst = 0.0
    for group in groups:
        names = sorted(set(group.parameter_names))
        sub = {n: params[n] for n in names}
        jac = jacrev(lambda s: group.values({**params, **s}))(sub)  # [count, *shape] per name
        rows = {n: jac[n].reshape(group.count, -1) for n in names}  # a 0-d parameter too
        for g in grads:
            dot = sum((rows[n] * g[n].flatten()).sum(1) for n in names)
            nh = torch.sqrt(sum(rows[n].square().sum(1) for n in names))
            ng = torch.sqrt(sum(g[n].square().sum() for n in g))
            rel = dot.abs() / (nh * ng).clamp_min(1e-300)
            assert bool((nh > 0).all()), f"{group.name}: a law with zero gradient"
            worst = max(worst, float(rel.max()))
    return worst


def sgd_first_order(model: nn.Module, example: Any, groups: list[LawGroup], pick: Callable[[Any], Tensor],
                    lr: float = 1e-2, seed: int = 1) -> float:
    """The largest |2B(θ, Δ)| / scale(θ) over every law for one SGD step on a random loss."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = _output(model, params, example, pick)
    target = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    loss_grad = torch.func.grad(lambda p: (_output(model, p, example, pick) - target).square().sum())(params)
    delta = {n: -lr * g for n, g in loss_grad.items()}
    worst = 0.0
    for group in groups:
        first = group.first_order(params, delta)  # 2B(θ, Δ); cᵀΔ for a linear law
        worst = max(worst, float((first.abs() / group.scale(params)).max()))
    return worst
