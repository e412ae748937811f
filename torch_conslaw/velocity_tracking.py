"""Identity groups of SGD with momentum / weight decay: machinery around
:mod:`torch_conslaw.laws.families.velocity` for :class:`~torch_conslaw.ConservationMonitor`.

When the attached optimizer is ``torch.optim.SGD`` with momentum μ > 0 (dampening and coupled
weight decay allowed, not Nesterov), every law group of the monitor whose symmetry exists gets
companion *identity groups*, recorded at the monitor's recorded steps:

* ``"<group> velocity"`` (kind ``"velocity"``), for groups with a matrix symmetry (linear
  hidden layers, attention heads): the n(n − 1)/2 velocity laws L = ⟨v, Xθ⟩ of the rotations,
  checked through **L⁺ = μ L** at every recorded step;
* ``"<group> recurrence"`` (kind ``"recurrence"``), for every quadratic group: the state
  (h, q = B(θ, v)) (2 × count values, h first), checked through the exact momentum recurrence;
  without momentum but with weight decay λ: h alone, checked through
  h⁺ = (1 − ηλ)² h + η² B(g, g).

In each record an identity group holds ``values`` (the state after the step),
``first_order`` (the residual state⁺ − prediction: zero by symmetry, rounding in practice),
``second_order`` (prediction − state, so that consecutive records differ by first + second
order, as for the laws) and ``rel_drift`` (max |residual| / scale over the group: the
*relative residual*). Scales are Cauchy–Schwarz bounds of the identity's terms from the norms
of the group's rows: max(‖v‖‖θ‖, ‖v⁺‖‖θ⁺‖) for L, e.g. ‖θ⁺‖² + |1 − 2ηcλ|‖θ‖² + 2ημ‖θ‖‖v‖ +
η²‖v⁺‖² for h (times the homogeneity degree when it exceeds 1).

Semantics and refusals:

* momentum buffers are read, never written (``optimizer.state.get``: no entry is created);
  a buffer that does not exist yet is v = 0 (PyTorch creates it at the parameter's first step,
  as v⁺ = g + λθ: the step from rest). L then starts at 0 and stays 0;
* only ``torch.optim.SGD`` (or a subclass that does not override ``step``) with the state key
  ``momentum_buffer`` alone is read; other optimizers with momentum-like settings, subclasses
  with their own ``step``, Nesterov, parameters of one group in optimizer param groups with
  different settings, and FSDP2 sharded parameters give no identity group, with the reason
  (``monitor.skipped``) and a ``RuntimeWarning``;
* at a step where the settings differ from those at attach (momentum switched off, Nesterov
  switched on, ...), a parameter got no gradient (SGD skips it, so its velocity is not
  decayed), or the optimizer state has other keys, the group's entries are NaN, with one
  ``RuntimeWarning``;
* the identities need the optimizer's step: they are recorded through :meth:`attach` only
  (synchronous and asynchronous modes alike: the small identity states are evaluated on the
  training thread in the optimizer hooks, so every mode records the same numbers).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw import ConservationMonitor
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> monitor = ConservationMonitor(model).attach(opt)
    >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    >>> for _ in range(5):
    ...     opt.zero_grad(); nn.functional.mse_loss(model(x), y).backward(); opt.step()
    >>> row = [s for s in monitor.summary() if s["kind"] == "velocity"][0]
    >>> row["name"], row["count"], row["max_rel_residual"] < 1e-13
    ('0→1 velocity', 3, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .laws.families import velocity as vel
from .lawgroups import LawGroup
from .structure import Skipped

__all__ = ["IdentityGroup", "VelocityTracker", "SETTINGS"]

F64 = torch.float64
# the SGD settings an identity depends on (lr may change freely from step to step)
SETTINGS = ("momentum", "dampening", "weight_decay", "nesterov")
_NESTEROV = (
    "Nesterov momentum: θ⁺ = θ − η(g + λθ + μv⁺) gives L⁺ = μL − ημ⟨v, X(g + λθ)⟩, not μL "
    "(a 0.5 to 20 % relative miss per step in float64), so no velocity law is claimed"
)
_MAXIMA = ("max_abs_residual", "max_rel_residual", "max_rel_second_order", "invalid")


@dataclass
class IdentityGroup:
    """One identity group: ``name``, ``kind`` (``"velocity"`` or ``"recurrence"``),
    ``count`` (values per record), ``base`` (the law group it accompanies), ``regime``
    (``"momentum"`` or ``"decay"``), ``expected_conserved`` (True for the velocity laws:
    μ^{-k} L_k is the conserved quantity) and ``reason`` (the identity, in words)."""

    name: str
    kind: str
    count: int
    base: LawGroup
    regime: str
    expected_conserved: bool
    reason: str

    def labels(self) -> list[str]:
        """One readable label per value, e.g. ``fc1→fc2 velocity[0,2]`` or ``... q[3]``."""
        if self.kind == "velocity":
            i, j = torch.triu_indices(self.base.pair.units, self.base.pair.units, offset=1)
            return [f"{self.name}[{a},{b}]" for a, b in zip(i.tolist(), j.tolist())]
        base = self.base.labels()
        if self.regime == "momentum":
            return [f"{b} h" for b in base] + [f"{b} q" for b in base]
        return [f"{b} h" for b in base]


@dataclass
class _Site:
    """A law group whose identities are tracked: its readers, parameters and settings."""

    base: LawGroup
    groups: list[IdentityGroup]
    params: list[Tensor]
    param_groups: list[dict[str, Any]]
    settings: tuple
    before: tuple[int, vel.PhaseState, dict[str, float]] | None = None
    # the state after the last recorded step and the versions of what it was read from:
    # reused as the state before the next step when nothing changed in between
    last: tuple[tuple, vel.PhaseState] | None = None
    warned: set[str] = field(default_factory=set)


class VelocityTracker:
    """Reads an SGD optimizer's momentum buffers around each recorded step and computes the
    identity groups' records (see the module docstring). Owned by the monitor.

    Example:
        >>> VelocityTracker({}, []).groups
        []
    """

    def __init__(self, params: Mapping[str, Tensor], groups: Sequence[LawGroup]) -> None:
        self._params = params
        self._base = list(groups)
        self._sites: list[_Site] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[int, tuple[dict, dict, dict, dict, dict]] = {}
        self.groups: list[IdentityGroup] = []
        self.skipped: list[Skipped] = []
        # per identity-group name; survives re-attaching and is restored by load_state_dict
        self.maxima: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ attach / detach
    def configure(self, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, str]:
        """Build the identity groups for ``optimizer``; returns, per law group, a sentence to
        append to its reason (what the update does to that law; the same whether or not its
        identities can be tracked). Refusals go to :attr:`skipped`, with a ``RuntimeWarning``."""
        self._sites, self.groups, self.skipped, self._pending = [], [], [], {}
        self._optimizer = None
        where: dict[int, dict[str, Any]] = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        refusal = _optimizer_refusal(optimizer)
        if refusal is not None:
            if refusal:
                self._refuse(None, refusal)
            return {}
        notes: dict[str, str] = {}
        wanted = False  # an identity group would be built (refused as a whole under sharding)
        for g in self._base:
            if g.pair is None or not g.pair.conserved:
                continue  # no symmetry, or a linear/approximate law (its change is cᵀΔ itself)
            params = [self._params[n] for n in g.parameter_names]
            owners = [where.get(id(p)) for p in params]
            if any(o is None for o in owners):
                continue  # not updated by this optimizer: the monitor says so already
            settings = {tuple(_setting(o, k) for k in SETTINGS) for o in owners}  # type: ignore[arg-type]
            lrs = {float(o["lr"]) for o in owners}  # type: ignore[index]
            if len(settings) > 1 or len(lrs) > 1:
                self._refuse(g.name, (
                    f"the parameters of {g.name} ({', '.join(g.parameter_names)}) are in optimizer "
                    "param groups with different lr/momentum/dampening/weight_decay: the identities "
                    "need one update rule for the whole group, so none is tracked for it"
                ))
                continue
            mu, _, wd, nesterov = settings.pop()
            if nesterov:
                if g.kind == "matrix":
                    self._refuse(g.name, f"{g.name}: {_NESTEROV}")
                continue
            if mu:
                regime = "momentum"
            elif wd:
                regime = "decay"
            else:
                continue
            if getattr(g, "shifts", None):  # a law read at θ + c (a gain used as 1 + γ)
                notes[g.name] = _shifted_note(g, regime, mu, wd)
                continue
            notes[g.name] = _base_note(g, regime, mu, wd)
            wanted = True
            if sharded:
                continue
            site = _Site(g, [], params, owners, (mu, _setting(owners[0], "dampening"), wd, nesterov))  # type: ignore[arg-type]
            if regime == "momentum" and g.kind == "matrix" and g.pair.units >= 2:
                site.groups.append(IdentityGroup(
                    f"{g.name} velocity", "velocity", vel.velocity_count(g.pair.units), g, regime, True,
                    f"velocity laws of the rotations of {g.name}: L = antisym(W_in V_inᵀ − V_outᵀ "
                    "W_out) (biases appended) obeys L⁺ = μL exactly at every step (any η, "
                    "dampening, coupled weight decay), so μ^(-k) L_k is conserved; "
                    "first_order is the residual L⁺ − μL",
                ))
            site.groups.append(IdentityGroup(
                f"{g.name} recurrence", "recurrence", (2 if regime == "momentum" else 1) * g.count, g, regime, False,
                _recurrence_reason(g.name, regime),
            ))
            self._sites.append(site)
            self.groups.extend(site.groups)
        if sharded and wanted:
            self._refuse(None, (
                "identity groups (velocity laws, momentum/weight-decay recurrences) read whole "
                "parameters and momentum buffers; FSDP2 sharded parameters are not supported"
            ))
        for ig in self.groups:
            self.maxima.setdefault(ig.name, _fresh_maxima())
        self._optimizer = optimizer if self._sites else None
        return notes

    def release(self) -> None:
        """Stop reading the optimizer (the groups and their statistics stay)."""
        self._optimizer = None
        for site in self._sites:
            site.before = site.last = None

    def _refuse(self, name: str | None, reason: str) -> None:
        self.skipped.append(Skipped(name, name, reason))
        warnings.warn(f"ConservationMonitor.attach: {reason}", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ around a step
    def before_step(self, step: int) -> None:
        """θ_k and v_k of every site, before recorded step ``step`` (read-only)."""
        if self._optimizer is None:
            return
        with torch.no_grad():
            for site in self._sites:
                site.before = None
                problem = self._step_problem(site)
                if problem is not None:
                    self._warn(site, step, problem)
                    continue
                mu, damp, wd, _ = site.settings
                buffers = self._buffers(site)
                coupling = 1.0 if any(b is None for b in buffers) else 1.0 - damp
                if site.groups[0].regime == "momentum" and any(b is None for b in buffers) and not all(
                    b is None for b in buffers
                ):
                    self._warn(site, step, "some parameters of the group have a momentum buffer and others not yet")
                    continue
                hyper = {"lr": float(site.param_groups[0]["lr"]), "momentum": mu, "coupling": coupling, "weight_decay": wd}
                versions = _versions(site.params, buffers)
                if site.last is not None and site.last[0] == versions:
                    state = site.last[1]
                else:
                    state = self._state(site, buffers)
                site.before = (step, state, hyper)

    def after_step(self, step: int) -> None:
        """θ⁺, v⁺ of every site whose state before ``step`` was read: the records' entries."""
        if self._optimizer is None:
            return
        values: dict[str, Tensor] = {}
        first: dict[str, Tensor] = {}
        second: dict[str, Tensor] = {}
        rel: dict[str, float] = {}
        rel_second: dict[str, float] = {}
        with torch.no_grad():
            for site in self._sites:
                before, site.before = site.before, None
                site.last = None
                entries = None
                if before is not None and before[0] == step:
                    problem = self._step_problem(site) or self._gradient_problem(site)
                    if problem is None:
                        entries = self._entries(site, before[1], before[2])
                    else:
                        self._warn(site, step, problem)
                for ig in site.groups:
                    if entries is None:
                        nan = torch.full((ig.count,), math.nan, dtype=F64)
                        entry: tuple = (nan, nan, nan, math.nan, math.nan)
                    else:
                        entry = entries[ig.name]
                    values[ig.name], first[ig.name], second[ig.name], rel[ig.name], rel_second[ig.name] = entry
        self._pending[step] = (values, first, second, rel, rel_second)

    def complete(
        self,
        step: int,
        values: dict[str, Tensor],
        first: dict[str, Tensor] | None,
        second: dict[str, Tensor] | None,
        rel: dict[str, float],
    ) -> None:
        """Add the identity entries of ``step`` (if any) to a record's dicts and update the
        running maxima; entries of earlier steps that never became records are dropped."""
        for old in [s for s in self._pending if s < step]:
            del self._pending[old]
        pending = self._pending.pop(step, None)
        if pending is None:
            return
        v, f, s, r, r2 = pending
        values.update(v)
        rel.update(r)
        if first is not None and second is not None:
            first.update(f)
            second.update(s)
        for name, res in f.items():
            m = self.maxima.setdefault(name, _fresh_maxima())
            if not math.isfinite(r[name]):
                m["invalid"] = max(m["invalid"], float(res.numel()))
                continue
            m["max_abs_residual"] = max(m["max_abs_residual"], float(res.abs().max()) if res.numel() else 0.0)
            m["max_rel_residual"] = max(m["max_rel_residual"], r[name])
            m["max_rel_second_order"] = max(m["max_rel_second_order"], r2[name])

    # ------------------------------------------------------------------ results
    def summary_rows(self, split: bool, latest: Any) -> list[dict[str, Any]]:
        """One summary dict per identity group (the monitor's keys plus ``max_rel_residual``)."""
        rows = []
        for ig in self.groups:
            m = self.maxima.get(ig.name, _fresh_maxima())
            pair = ig.base.pair
            rows.append({
                "name": ig.name,
                "kind": ig.kind,
                "count": ig.count,
                "max_abs_drift": m["max_abs_residual"],
                "max_rel_drift": m["max_rel_residual"],
                "max_rel_first_order": m["max_rel_residual"] if split else None,
                "max_rel_second_order": m["max_rel_second_order"] if split else None,
                "expected_conserved": ig.expected_conserved,
                "reason": ig.reason,
                "invalid": int(m["invalid"]),
                "producer": pair.producer,
                "consumer": pair.consumer,
                "degree": pair.degree,
                "last_rel_drift": latest.rel_drift.get(ig.name, math.nan) if latest is not None else math.nan,
                "max_rel_residual": m["max_rel_residual"],
            })
        return rows

    def history_columns(self, records: Sequence[Any], split: bool) -> dict[str, np.ndarray]:
        """``<name>/values``, ``<name>/rel_drift`` (the relative residual) and, with the split,
        ``<name>/first_order`` (the residual) and ``<name>/second_order``; NaN rows for
        records taken before the group existed."""
        out: dict[str, np.ndarray] = {}
        for ig in self.groups:
            nan = torch.full((ig.count,), math.nan, dtype=F64)
            out[f"{ig.name}/values"] = _rows([r.values.get(ig.name, nan) for r in records], ig.count)
            out[f"{ig.name}/rel_drift"] = np.array([r.rel_drift.get(ig.name, math.nan) for r in records])
            if split:
                for key in ("first_order", "second_order"):
                    rows = [(getattr(r, key) or {}).get(ig.name, nan) for r in records]
                    out[f"{ig.name}/{key}"] = _rows(rows, ig.count)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Running maxima per identity-group name (plain data)."""
        return {"maxima": {k: dict(v) for k, v in self.maxima.items()}}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (``None``: a checkpoint without identity groups)."""
        self.maxima = {} if state is None else {k: dict(v) for k, v in state["maxima"].items()}
        for ig in self.groups:
            self.maxima.setdefault(ig.name, _fresh_maxima())
        self._pending = {}

    # ------------------------------------------------------------------ internals
    def _buffers(self, site: _Site) -> list[Tensor | None]:
        assert self._optimizer is not None
        state = self._optimizer.state
        out: list[Tensor | None] = []
        for p in site.params:
            entry = state.get(p)  # .get: reading a defaultdict must not create entries
            out.append(None if entry is None else entry.get("momentum_buffer"))
        return out

    def _step_problem(self, site: _Site) -> str | None:
        """Why the identities of ``site`` do not apply at this step, or ``None``."""
        now = {tuple(_setting(o, k) for k in SETTINGS) for o in site.param_groups}
        lrs = {float(o["lr"]) for o in site.param_groups}
        if now != {site.settings} or len(lrs) > 1:
            return (
                f"the optimizer settings changed since attach ({dict(zip(SETTINGS, site.settings))} → "
                f"{[dict(zip(SETTINGS, s)) for s in now]}, lr {sorted(lrs)}); attach again to track the "
                "new identities"
            )
        assert self._optimizer is not None
        for n, p in zip(site.base.parameter_names, site.params):
            entry = self._optimizer.state.get(p)
            if entry is not None and set(entry) - {"momentum_buffer"}:
                return (
                    f"the optimizer state of {n} has keys {sorted(entry)}, not only 'momentum_buffer': "
                    "its layout is unknown, so the velocity is not read"
                )
        return None

    def _gradient_problem(self, site: _Site) -> str | None:
        for n, p in zip(site.base.parameter_names, site.params):
            if p.grad is None:
                return (
                    f"{n} had no gradient at this step: SGD skips it, so its velocity is not "
                    "decayed by μ and the identities do not apply"
                )
        return None

    def _warn(self, site: _Site, step: int, problem: str) -> None:
        if problem in site.warned:
            return
        site.warned.add(problem)
        warnings.warn(
            f"ConservationMonitor: identity groups of {site.base.name} at step {step}: {problem}; "
            "their entries are NaN for this step",
            RuntimeWarning,
            stacklevel=5,
        )

    def _rows(self, site: _Site, tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Incoming and outgoing rows of ``tensors`` (laid out like the site's parameters)."""
        by_name = dict(zip(site.base.parameter_names, tensors))
        pair = site.base.pair
        inc = [fn(by_name[n].detach().to(F64)).flatten(1) for n, fn in pair.incoming]
        out = [fn(by_name[n].detach().to(F64)).flatten(1) for n, fn in pair.outgoing]
        return torch.cat(inc, 1), torch.cat(out, 1)

    def _state(self, site: _Site, buffers: list[Tensor | None]) -> vel.PhaseState:
        g = site.base
        i_t, o_t = self._rows(site, site.params)
        if site.groups[0].regime != "momentum":
            return vel.phase_state(g.kind, float(getattr(g, "degree", 1.0)), i_t, o_t)
        vs = [torch.zeros_like(p) if b is None else b for p, b in zip(site.params, buffers)]
        i_v, o_v = self._rows(site, vs)
        return vel.phase_state(g.kind, float(getattr(g, "degree", 1.0)), i_t, o_t, i_v, o_v)

    def _entries(self, site: _Site, before: vel.PhaseState, hyper: dict[str, float]) -> dict[str, tuple]:
        g = site.base
        k = max(1.0, float(getattr(g, "degree", 1.0)))
        lr, mu, c, wd = hyper["lr"], hyper["momentum"], hyper["coupling"], hyper["weight_decay"]
        regime = site.groups[0].regime
        buffers = self._buffers(site) if regime == "momentum" else []
        after = self._state(site, buffers)
        site.last = (_versions(site.params, buffers), after)
        nt, nt1 = before.norm_theta, after.norm_theta
        out: dict[str, tuple] = {}
        for ig in site.groups:
            if ig.kind == "velocity":
                assert before.L is not None and after.L is not None
                res = after.L - mu * before.L
                scale = max(before.norm_v * nt, after.norm_v * nt1)
                out[ig.name] = _entry(after.L, res, (mu - 1.0) * before.L, [scale], [ig.count])
            elif regime == "momentum":
                assert before.q is not None and after.q is not None and after.vv is not None
                nv, nv1 = before.norm_v, after.norm_v
                h_pred, q_pred = vel.momentum_recurrence(before.h, before.q, after.vv, lr, mu, c, wd)
                state = torch.cat([after.h, after.q])
                pred = torch.cat([h_pred, q_pred])
                scale_h = k * (nt1**2 + abs(1 - 2 * lr * c * wd) * nt**2 + 2 * lr * abs(mu) * nt * nv + lr**2 * nv1**2)
                scale_q = k * (nt1 * nv1 + abs(mu) * nt * nv + abs(c * wd) * nt**2 + lr * nv1**2)
                second = pred - torch.cat([before.h, before.q])
                out[ig.name] = _entry(state, state - pred, second, [scale_h, scale_q], [g.count, g.count])
            else:  # weight decay without momentum: h⁺ = (1 − ηλ)² h + η² B(g, g)
                grads = [p.grad for p in site.params]  # B(g, g) is even: maximize's sign drops out
                i_g, o_g = self._rows(site, grads)  # type: ignore[arg-type]
                gs = vel.phase_state(g.kind, float(getattr(g, "degree", 1.0)), i_g, o_g)
                pred = vel.decay_recurrence(before.h, gs.h, lr, wd)
                scale = k * (nt1**2 + (1 - lr * wd) ** 2 * nt**2 + lr**2 * gs.norm_theta**2)
                out[ig.name] = _entry(after.h, after.h - pred, pred - before.h, [scale], [g.count])
        return out


def _entry(values: Tensor, residual: Tensor, second: Tensor, scales: list[float], sizes: list[int]) -> tuple:
    """(values, residual, second, max relative residual, max relative second part), on the
    CPU; ``scales[i]`` is the scale of the next ``sizes[i]`` entries."""
    rel = rel_second = 0.0
    for res, sec, scale in zip(residual.split(sizes), second.split(sizes), scales):
        if res.numel():
            rel = max(rel, _ratio(float(res.abs().max()), scale))
            rel_second = max(rel_second, _ratio(float(sec.abs().max()), scale))
    return values.cpu(), residual.cpu(), second.cpu(), rel, rel_second


def _ratio(x: float, scale: float) -> float:
    """x / scale with 0/0 = 0 (a zero state predicts itself exactly); NaN stays NaN."""
    if scale > 0 or math.isnan(x):
        return x / scale if scale > 0 else x
    return 0.0 if x == 0 else math.inf


def _versions(params: Sequence[Tensor], buffers: Sequence[Tensor | None]) -> tuple:
    """Version counters of the parameters and buffers (they move with every in-place edit)."""
    return tuple((t._version, t.data_ptr()) if t is not None else None for t in (*params, *buffers))


def _setting(group: Mapping[str, Any], key: str) -> Any:
    value = group.get(key, False if key == "nesterov" else 0.0)
    return bool(value) if key == "nesterov" else float(value)


def _fresh_maxima() -> dict[str, float]:
    return dict.fromkeys(_MAXIMA, 0.0)


def _rows(rows: list[Tensor], count: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, count))
    return torch.stack(rows).numpy()


def _optimizer_refusal(optimizer: torch.optim.Optimizer) -> str | None:
    """``None`` when the optimizer's momentum state can be read; ``""`` when there is nothing
    to track (no momentum-like setting); else the reason no identity is claimed."""
    name = type(optimizer).__name__
    momentum = any(float(g.get("momentum", 0) or 0) != 0 for g in optimizer.param_groups)
    momentum_like = momentum or any(float(g.get("weight_decay", 0) or 0) != 0 for g in optimizer.param_groups)
    if isinstance(optimizer, torch.optim.SGD):
        if type(optimizer).step is not torch.optim.SGD.step:
            return (
                f"{name} overrides torch.optim.SGD.step: its update rule and state layout are "
                "unknown, so no velocity law or momentum recurrence is claimed"
            ) if momentum_like else ""
        return None
    buffers = any("momentum_buffer" in s for s in optimizer.state.values() if isinstance(s, Mapping))
    if momentum or buffers:
        return (
            f"{name} has momentum-like settings or state but is not torch.optim.SGD: its update "
            "rule and state layout are unknown, so no velocity law or momentum recurrence is claimed"
        )
    return ""


def _recurrence_reason(name: str, regime: str) -> str:
    if regime == "momentum":
        return (
            f"SGD with momentum: (h, q = θᵀAv) of {name} are not conserved but follow the exact "
            "recurrence h⁺ = (1 − 2ηcλ)h − 2ημq + η²v⁺ᵀAv⁺, q⁺ = μq + cλh − ηv⁺ᵀAv⁺ "
            "(c = 1 − dampening; values: h then q; first_order: the residual)"
        )
    return (
        f"SGD with weight decay λ, no momentum: h of {name} follows h⁺ = (1 − ηλ)²h + η²gᵀAg; "
        "first_order is the split's first order once the (1 − ηλ)² factor is removed "
        "(zero by symmetry), second_order = (1 − ηλ)²h + η²gᵀAg − h"
    )


def _shifted_note(g: LawGroup, regime: str, mu: float, wd: float) -> str:
    """What the update does to a law read at θ + c (appended to its reason); no identity is
    tracked for it."""
    shifted = ", ".join(f"{n} + {c:g}" for n, c in g.shifts.items())  # type: ignore[attr-defined]
    if regime == "decay":
        return (
            f"under weight_decay={wd:g} the law is broken at first order: decay pulls {shifted} toward "
            f"{', '.join(f'{c:g}' for c in g.shifts.values())}, not toward 0, which is not a rescaling "  # type: ignore[attr-defined]
            "of the units; no identity of the update is tracked for it"
        )
    return (
        f"under momentum={mu:g} the exact recurrences of (h, q) are derived for laws read at θ; this "
        f"one reads {shifted}, so no identity of the update is tracked for it"
    )


def _base_note(g: LawGroup, regime: str, mu: float, wd: float) -> str:
    """What the update does to the law group ``g`` (appended to its reason)."""
    if regime == "decay":
        return (
            f"under weight_decay={wd:g} h⁺ = (1 − ηλ)²h + η²gᵀAg exactly: once the (1 − ηλ)² "
            "factor is removed, the change has no first-order part"
        )
    if g.kind == "matrix":
        return (
            f"under momentum={mu:g} (h, q = θᵀAv) follow an exact recurrence, and the rotations "
            "of the group keep velocity laws L = antisym(W_in V_inᵀ − V_outᵀ W_out) with L⁺ = μL"
        )
    return (
        f"under momentum={mu:g} (h, q = θᵀAv) follow an exact recurrence, and no velocity law "
        "replaces h: a per-unit scaling is a symmetric generator, not a rotation, so ⟨v, Xθ⟩ "
        "does not obey L⁺ = μL (as in continuous time, momentum keeps no law of these units)"
    )
