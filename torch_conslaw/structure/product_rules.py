"""Laws of products: two layers multiplied elementwise, and two parameters multiplied.

* :func:`product_laws`: a ⊙ b of two sites' units (or of two disjoint sets of one site's units)
  that meet element by element. Where unit u of a meets unit w of b, scaling u by λ and w by
  λ^(−k_a/k_b) (k: the homogeneity degrees of the factors) leaves the product unchanged, so
  Σ‖w_in,u‖² − (k_a/k_b) Σ‖w_in,w‖² per connected set of units that meet is conserved, whatever
  reads the product — when the product is the only way of those units to the output
  (:attr:`~torch_conslaw.structure.rules._SiteState.through`, recorded by the propagation of
  :mod:`torch_conslaw.structure.rules`).
* :func:`parameter_product_laws`: p ⊙ q of two trainable parameters read nowhere else:
  Σ p_i² − Σ q_j² per set of entries that meet, or p pᵀ − q qᵀ when only their dot product
  reads them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw.structure.rules import find_graph_laws
    >>> class Bilinear(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
    ...     def forward(self, x):
    ...         return torch.tanh(self.a(x) * self.b(x))
    >>> pairs, _ = find_graph_laws(Bilinear(), torch.randn(5, 4))
    >>> [(p.label, p.units, p.degree) for p in pairs]
    [('a⊙b', 3, 1.0)]
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from ..laws.families.rescaling import Flat, Rows
from .finder import Pair
from .graph import OpGraph, value_ids
from .rules import (
    _MERGED,
    _MUL,
    _SHAPE,
    _arg,
    _Factor,
    _find,
    _incoming,
    _module_of,
    _param_behind,
    _param_entries,
    _shift_said,
    _SiteState,
    _union,
)

__all__ = ["product_laws", "parameter_product_laws", "meeting_sets"]


def product_laws(products: dict[int, list[_Factor]], states: dict[int, _SiteState]) -> tuple[list[Pair], set[tuple[int, int]]]:
    """Laws of two sites multiplied elementwise, a ⊙ b. Where unit u of one meets unit w of the
    other, scaling u by λ and w by λ^(−k) with k = k_a/k_b (the homogeneity degrees of the two
    factors) leaves the product unchanged; units that meet share their λ, so each connected set
    of units that meet (one pair for a ⊙ b, every unit for an outer product) has one law,
    Σ‖w_in,u‖² − k Σ‖w_in,w‖², whatever reads the product (BitNet's relu(gate)² ⊙ up before a
    norm: ‖gate_j‖² − 2‖up_j‖²). It needs each of these units to meet units of the other factor
    at every element it reaches, the product to be the only way of all of them to the output
    (:attr:`_SiteState.through`), and units with no law of their own (else it is the difference
    of theirs). Returns the laws and the (site, unit) pairs they cover."""
    pairs: list[Pair] = []
    covered: set[tuple[int, int]] = set()
    for op_index, factors in sorted(products.items()):
        sides = [sorted((f for f in factors if f.operand == i), key=lambda f: f.sid) for i in (0, 1)]
        if not sides[0] or not sides[1]:
            continue  # a factor of no site (a gate σ(g))
        # a factor that is itself a product of sites (a ⊙ b ⊙ c) pairs through its first site only:
        # the products of a chain then tie its sites in a tree, one law each, none dependent
        fa, fb = sides[0][0], sides[1][0]
        if fa.degree <= 0 or fb.degree <= 0:
            continue
        a, b = states[fa.sid], states[fb.sid]
        pa, pb = fa.probe.reshape(-1), fb.probe.reshape(-1)
        # a unit that meets a value of no unit somewhere (a constant, a gate) is scaled there alone
        alone = {("a", u) for u in pa[(pa >= 0) & (pb < 0)].unique().tolist()}
        alone |= {("b", w) for w in pb[(pb >= 0) & (pa < 0)].unique().tolist()}
        kept: list[tuple[list[int], list[int]]] = []
        for us, ws in meeting_sets(pa, pb, a.site.units, b.site.units):
            if fa.sid == fb.sid:  # disjoint units of one site (see _Propagation._times): b's go on tied to a's,
                # so they end where a's do; joined to no other value of the site (before or after: (a + b) ⊙ b,
                # a ⊙ b ⊙ b), and with no way of their own but the product
                group = set(us) | set(ws)
                if (all(a.joined.get(x, 0) == 1 and set(a.members(x)) <= group and ("a", x) not in alone
                        and ("b", x) not in alone for x in group)
                        and all(op_index in a.through.get(u, ()) and a.kills.get(u, _MERGED) != _MERGED for u in us)
                        and all(op_index in a.through.get(w, (op_index,)) for w in ws)):
                    kept.append((us, ws))
            elif all(op_index in st.through.get(x, ()) and st.kills.get(x, _MERGED) != _MERGED
                     and len(st.members(x)) == 1 and (side, x) not in alone
                     for side, st, xs in (("a", a, us), ("b", b, ws)) for x in xs):
                kept.append((us, ws))
        k = fa.degree / fb.degree
        shifts = {**a.site.shifts, **b.site.shifts}
        for (na, nb), found, us, ws in _by_size(kept):
            each = "unit pair" if na == nb == 1 else f"set of {na} + {nb} units that meet"
            pairs.append(Pair(
                producer=a.site.name, consumer=b.site.name, ops=(), kind=a.site.kind, degree=k, units=len(found),
                positions=1, incoming=tuple(_incoming(a.site, us)), outgoing=tuple(_incoming(b.site, ws)),
                consumers=(b.site.name,), consumer_positions=(1,),
                label=f"{a.site.name}⊙{b.site.name}" + ("" if na == nb == 1 else f" ({na}+{nb})"),
                reason=_shift_said(shifts, (
                    f"elementwise product of {a.site.name} (positively {fa.degree:g}-homogeneous) and "
                    f"{b.site.name} ({fb.degree:g}-homogeneous), their only way to the output: "
                    f"‖w_{a.site.name}‖² − {k:g} ‖w_{b.site.name}‖² per {each}")),
                shifts=tuple(shifts.items())))
            covered.update((a.site.sid, u) for p in found for u in p[0])
            covered.update((b.site.sid, w) for p in found for w in p[1])
    return pairs, covered


def meeting_sets(pa: Tensor, pb: Tensor, na: int, nb: int) -> list[tuple[list[int], list[int]]]:
    """The connected sets of units of two factors that meet: (a's units, b's units), from the
    unit of each factor at every element of their product (``pa``, ``pb``, flat; −1 for none)."""
    met = torch.stack([pa, pb], 1)[(pa >= 0) & (pb >= 0)].unique(dim=0).tolist()
    parent = list(range(na + nb))  # a's units, then b's
    for u, w in met:
        _union(parent, u, na + w)
    parts: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for u in sorted({u for u, _ in met}):
        parts[_find(parent, u)][0].append(u)
    for w in sorted({w for _, w in met}):
        parts[_find(parent, na + w)][1].append(w)
    return list(parts.values())


def _by_size(sets: list[tuple[list[int], list[int]]]) -> list[tuple[tuple[int, int], list, Tensor, Tensor]]:
    """Sets of units that meet, grouped by their sizes (one law group each): the sizes, the
    sets, and their units of a and of b as [sets, members] index tensors."""
    groups: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = defaultdict(list)
    for us, ws in sets:
        groups[(len(us), len(ws))].append((us, ws))
    return [(size, found, torch.tensor([f[0] for f in found]), torch.tensor([f[1] for f in found]))
            for size, found in sorted(groups.items())]


def parameter_product_laws(g: OpGraph, trainable: frozenset[str]) -> list[Pair]:
    """Two trainable parameters multiplied elementwise, p ⊙ q, each reached through shape ops
    alone and read there only (DiffLlama's λ_q1 ⊙ λ_k1, a learned scale times a learned gain):
    entries that meet share a scale, p_i → c p_i and q_j → q_j / c, so Σ p_i² − Σ q_j² is
    conserved per connected set of entries that meet, whatever reads the product."""
    uses = g.param_uses()
    pairs: list[Pair] = []
    for op in g.ops:
        if op.index not in g.live or op.name not in _MUL or len(op.outputs) != 1 or len(op.args) + len(op.kwargs) != 2:
            continue
        shape = g.shapes[op.outputs[0]]
        factors: list[tuple[str, Tensor]] = []
        for x in (_arg(op, 0, "input"), _arg(op, 1, "other")):
            behind = _param_behind(g, x, _SHAPE)
            if behind is None:
                break
            v, chain = behind
            name = g.params[v]
            if (name not in trainable or uses.get(name) != 1 or any(len(g.users.get(o.outputs[0], [])) != 1 for o in chain)
                    or any(value_ids((o.args[1:], o.kwargs)) for o in chain)):
                break
            index = _param_entries(g, v, chain, shape)
            if index is None:
                break
            factors.append((name, index.reshape(-1)))
        if len(factors) != 2 or factors[0][0] == factors[1][0]:
            continue
        (p, ip), (q, iq) = factors
        sets = meeting_sets(ip, iq, int(ip.max()) + 1, int(iq.max()) + 1)
        readers = g.users.get(op.outputs[0], [])
        if (len(readers) == 1 and g.ops[readers[0]].name == "sum" and math.prod(g.shapes[g.ops[readers[0]].outputs[0]]) == 1
                and len(sets) > 1 and all(len(us) == len(ws) == 1 for us, ws in sets)):
            # Σ_i p_i q_i alone reads the product: p → M p, q → M^(−T) q keeps it for any invertible M
            us, ws = torch.tensor([f[0][0] for f in sets]), torch.tensor([f[1][0] for f in sets])
            pairs.append(_parameter_pair(p, q, "matrix", us, ws, f"{p}·{q}", (
                f"the parameters {p} and {q} are read only by their dot product: p → Mp, q → M⁻ᵀq keeps it, "
                f"so {p} {p}ᵀ − {q} {q}ᵀ is conserved (upper triangle)")))
            continue
        for (na, nb), _, us, ws in _by_size(sets):
            each = "pair of entries" if na == nb == 1 else f"set of {na} + {nb} entries that meet"
            pairs.append(_parameter_pair(p, q, "unit", us, ws, f"{p}⊙{q}", (
                f"the parameters {p} and {q} are multiplied elementwise and read nowhere else: "
                f"Σ {p}_i² − Σ {q}_j² per {each}")))
    return pairs


def _parameter_pair(p: str, q: str, kind: str, us: Tensor, ws: Tensor, label: str, reason: str) -> Pair:
    """The law group of parameters p and q on the entries ``us`` of p and ``ws`` of q (one row per law)."""
    return Pair(
        producer=_module_of(p), consumer=_module_of(q), ops=(), kind=kind, degree=1.0, units=len(us), positions=1,
        incoming=((p, Flat(Rows(us))),), outgoing=((q, Flat(Rows(ws))),), consumers=(_module_of(q),),
        consumer_positions=(1,), label=label, reason=reason)
