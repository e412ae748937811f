"""Translation between parameters added at the same places (an op-graph rule for linear laws).

Two parameter terms A and B reach one addition, each through ops that only move, copy or
select its entries (``expand``, ``cat`` with other values, views, transposes, indexing, eval
dropout, casts): at every element of the sum A contributes one entry A[r, k] (or nothing) and
B one entry B[r', k] (or nothing). A *term* is a parameter itself (ViT's ``cls_token`` and
``position_embeddings``), or the bias of a layer (``F.linear``, ``addmm``, a convolution:
its bias is added at every position of the layer's output). Adding c_k to feature k of a set
R_A of rows of A and subtracting it from a set R_B of rows of B leaves the sum unchanged when
every element that reads a row of R_A also reads a row of R_B with the same feature, and
conversely. The smallest such sets are the connected components of the rows linked by the
elements they share, kept when no element of theirs reads one side alone, and each gives
one linear law per feature:

    Σ_{r ∈ R_A} A[r, k] − Σ_{r ∈ R_B} B[r, k]

An embedding lookup whose ids do not depend on the input (CLIP's position embedding reads the
buffer ``position_ids`` as it is) is a term too, with the rows those ids pick; ids computed in
the forward (a slice ``position_ids[:, :L]``, an ``arange``) are not, nor is a selection of a
parameter's rows: both depend on the input's length, and a law over the rows one length reads
would break at another.

ViT / DeiT / DINOv2 / CLIP: ``cls_token[k] − pos[0, k]`` (the [CLS] token and position row 0 are both
added at position 0 only) and ``patch_bias[k] − Σ_{n ≥ 1} pos[n, k]`` (the patch convolution's
bias is added at every patch position, as are position rows 1..N). Every entry on the way must
have one reader (a value that also flows elsewhere would see the shift), and each parameter
must be read by one op. Like every law these are verified numerically before they are tracked.
Lookups whose rows the input chooses are not terms here: their translation is
:func:`~torch_conslaw.structure.group_rules.embedding_translation_rule`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .graph import Op, OpGraph, Val
from .rules import _CAST, _CONV, _CONV_T, _DROPOUT, _arg, _lookup_option

__all__ = ["added_translation_rule"]

# ops that only move, copy or select the entries of their first argument (replayed on a probe)
# (no selection: ``pos[:, :L]`` picks rows by the input's length, and a law over the rows one
# length reads would break on inputs of another length)
_MOVES = {"view", "reshape", "permute", "transpose", "swapaxes", "swapdims", "flatten", "unflatten", "expand",
          "unsqueeze", "squeeze", "movedim", "moveaxis", "repeat", "tile", "contiguous", "clone", "flip", "roll",
          "broadcast_to"} | _CAST
_CATS = {"cat", "concat", "concatenate"}
_PLUS = {"add", "__add__", "__radd__"}
Terms = dict[str, Tensor]  # parameter name → probe: at each element, the flat index of its entry (−1: none)


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _where(op: Op) -> str:
    return f"{op.name}{f' in {op.module}' if op.module else ''} (op {op.index})"


def _bias_probe(g: OpGraph, op: Op) -> tuple[str, Tensor] | None:
    """The bias term of a layer op: (bias name, probe over the op's output)."""
    if op.name == "linear":
        bias, axis = _arg(op, 2, "bias"), -1
    elif op.name == "addmm":
        bias, axis = _arg(op, 0, "input"), -1
    elif op.name in _CONV or op.name in _CONV_T:
        bias, axis = _arg(op, 2, "bias"), 1
    else:
        return None
    if not (isinstance(bias, Val) and bias.vid in g.params and len(g.shapes[bias.vid]) == 1 and len(op.outputs) == 1):
        return None
    out = g.shapes[op.outputs[0]]
    n = g.shapes[bias.vid][0]
    axis %= len(out)
    if out[axis] != n:
        return None
    probe = torch.arange(n).reshape((n,) + (1,) * (len(out) - axis - 1)).expand(out[axis:]).expand(out)
    return g.params[bias.vid], probe


def _fixed_lookup(g: OpGraph, op: Op) -> tuple[str, Tensor] | None:
    """An embedding lookup at a buffer of ids used as it is (CLIP's position embedding reads
    ``position_ids``): its table is a term, with the rows those ids pick."""
    if op.name != "embedding" or len(op.outputs) != 1:
        return None
    ids, weight = _arg(op, 0, "input"), _arg(op, 1, "weight")
    if not (isinstance(ids, Val) and isinstance(weight, Val) and weight.vid in g.params and ids.vid in g.consts):
        return None
    if _lookup_option(op) is not None:
        return None  # a padding row gets no gradient; max_norm renormalizes; scaled gradients
    if g.producer(ids.vid) is not None:
        # ids computed in the forward (BERT's position_ids[:, :L], BART's arange(L)) depend on the
        # input's length at least: a law over the rows one length reads breaks at another length
        return None
    shape = g.shapes[weight.vid]
    probe = torch.nn.functional.embedding(g.consts[ids.vid].to(torch.long), torch.arange(shape[0] * shape[1]).reshape(shape))
    return (g.params[weight.vid], probe) if tuple(probe.shape) == tuple(g.shapes[op.outputs[0]]) else None


def _replay(op: Op, probe: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    try:
        moved = probe if op.name in _CAST or op.name in ("contiguous", "clone") else op.func(probe, *op.args[1:], **op.kwargs)
    except Exception:  # noqa: BLE001 - a move that cannot be replayed ends the term
        return None
    if not isinstance(moved, Tensor) or tuple(moved.shape) != tuple(shape):
        return None
    return moved


def _carry(model: nn.Module, g: OpGraph, op: Op, terms: dict[int, Terms]) -> Terms:
    """The terms the output of ``op`` carries, from those of its inputs."""
    out = g.shapes[op.outputs[0]]
    if op.name in _MOVES or op.name in _DROPOUT:
        x = op.args[0] if op.args else None
        if not isinstance(x, Val) or x.vid not in terms or any(
                isinstance(a, Val) for a in list(op.args[1:]) + list(op.kwargs.values())):
            return {}
        if op.name in _DROPOUT:
            from .group_rules import _dropout_active

            return {} if _dropout_active(model, op) else dict(terms[x.vid])
        moved = {n: _replay(op, p, out) for n, p in terms[x.vid].items()}
        return {n: p for n, p in moved.items() if p is not None}
    if op.name in _CATS:
        parts, dim = (op.args[0] if op.args else op.kwargs.get("tensors")), _arg(op, 1, "dim", 0)
        if not (isinstance(parts, (list, tuple)) and all(isinstance(p, Val) for p in parts) and isinstance(dim, int)):
            return {}
        names = {n for p in parts for n in terms.get(p.vid, {})}
        found: Terms = {}
        for n in names:
            if sum(n in terms.get(p.vid, {}) for p in parts) != 1:
                continue  # the same parameter in two parts: not followed
            found[n] = torch.cat([terms[p.vid][n] if n in terms.get(p.vid, {}) else
                                  torch.full(g.shapes[p.vid], -1, dtype=torch.long) for p in parts], dim)
        return found
    if op.name in _PLUS and _arg(op, 2, "alpha", 1) == 1:
        found = {}
        seen: set[str] = set()
        for a in op.args[:2]:
            for n, p in (terms.get(a.vid, {}) if isinstance(a, Val) else {}).items():
                if n in seen:
                    found.pop(n, None)  # on both sides: not followed
                    continue
                seen.add(n)
                try:
                    found[n] = torch.broadcast_to(p, out)
                except RuntimeError:
                    pass
        return found
    return {}


def _components(pa: Tensor, pb: Tensor, fa: int, fb: int) -> list[tuple[list[int], list[int]]] | None:
    """Rows of A and of B linked by the elements that read both (each element: one feature,
    the same on both sides), kept when no element reads a row of theirs on one side alone."""
    pa, pb = pa.reshape(-1), pb.reshape(-1)
    both = (pa >= 0) & (pb >= 0)
    if not bool(both.any()) or bool(((pa[both] % fa) != (pb[both] % fb)).any()):
        return None
    ra, rb = pa // fa, pb // fb
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in set(zip(ra[both].tolist(), rb[both].tolist())):
        parent[find(("a", a))] = find(("b", b))
    bad = {find(("a", r)) for r in set(ra[(pa >= 0) & ~both].tolist())}
    bad |= {find(("b", r)) for r in set(rb[(pb >= 0) & ~both].tolist())}
    comps: dict[Any, tuple[list[int], list[int]]] = {}
    for node in list(parent):
        root = find(node)
        if root in bad:
            continue
        comps.setdefault(root, ([], []))[0 if node[0] == "a" else 1].append(node[1])
    return [(sorted(a), sorted(b)) for a, b in comps.values() if a and b]


def added_translation_rule(model: nn.Module, g: OpGraph):
    """Translation laws between parameter terms added at the same places (see the module
    docstring): yields proposals."""
    uses = g.param_uses()
    terms: dict[int, Terms] = {}
    carriers = _MOVES | _CATS | _PLUS | _DROPOUT
    for vid, name in g.params.items():  # a parameter read by a layer or a norm is no term: no probe for it
        if uses.get(name, 0) == 1 and g.ops[g.users[vid][0]].name in carriers:
            terms[vid] = {name: torch.arange(torch.Size(g.shapes[vid]).numel()).reshape(g.shapes[vid])}
    for op in g.ops:
        if op.index not in g.live or len(op.outputs) != 1:
            continue
        # an input carried on must be read by this op alone (else the other reader sees the shift)
        ins = {a.vid: terms[a.vid] for a in _vals(op) if a.vid in terms and len(g.users.get(a.vid, [])) == 1
               and a.vid not in g.outputs}
        if op.name in _PLUS and _arg(op, 2, "alpha", 1) == 1 and len(op.args) >= 2 and all(
                isinstance(a, Val) and a.vid in ins for a in op.args[:2]) and op.args[0] != op.args[1]:
            yield from _laws(g, op, ins[op.args[0].vid], ins[op.args[1].vid])
        carried = _carry(model, g, op, ins) if ins else {}
        table = _fixed_lookup(g, op)
        if table is not None and uses.get(table[0], 0) == 1:
            carried[table[0]] = table[1]
        bias = _bias_probe(g, op)
        if bias is not None and uses.get(bias[0], 0) == 1:
            carried[bias[0]] = bias[1]
        if carried:
            terms[op.outputs[0]] = carried


def _vals(op: Op) -> list[Val]:
    out = []
    for a in list(op.args) + list(op.kwargs.values()):
        if isinstance(a, Val):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, Val))
    return out


def _laws(g: OpGraph, op: Op, left: Terms, right: Terms):
    out = g.shapes[op.outputs[0]]
    shapes = {v: g.shapes[v] for v, n in g.params.items()}
    by_name = {n: v for v, n in g.params.items()}
    for a, pa in left.items():
        for b, pb in right.items():
            if a == b:
                continue
            fa, fb = shapes[by_name[a]][-1], shapes[by_name[b]][-1]
            if fa != fb:
                continue
            try:
                comps = _components(torch.broadcast_to(pa, out), torch.broadcast_to(pb, out), fa, fb)
            except RuntimeError:
                continue
            for rows_a, rows_b in comps or []:
                yield _proposal(a, b, rows_a, rows_b, fa, op, shapes[by_name[a]], shapes[by_name[b]])


def _rows(rows: list[int], total: int) -> str:
    if len(rows) == total:
        return "" if total == 1 else "[all rows]"
    return f"[{rows[0]}]" if len(rows) == 1 else (f"[{rows[0]}..{rows[-1]}]" if rows == list(range(rows[0], rows[-1] + 1))
                                                    else f"[{len(rows)} rows]")


def _proposal(a: str, b: str, rows_a: list[int], rows_b: list[int], width: int, op: Op, sa, sb):
    ia, ib = torch.tensor(rows_a), torch.tensor(rows_b)
    na, nb = torch.Size(sa).numel() // width, torch.Size(sb).numel() // width
    name = f"{a}{_rows(rows_a, na)}−{b}{_rows(rows_b, nb)} translation"
    reason = (f"{a} (rows {rows_a[:6]}{'…' if len(rows_a) > 6 else ''}) and {b} (rows {rows_b[:6]}"
              f"{'…' if len(rows_b) > 6 else ''}) are added at the same elements ({_where(op)}), each reached only "
              "through moves of its entries: adding c to those rows of the first and subtracting it from those of "
              "the second changes nothing, so Σ A[rows, k] − Σ B[rows, k] (one per feature k) are linear laws")

    def build(params):
        from ..laws.groups import DifferenceLaws

        return DifferenceLaws(name, (a, lambda w: w.reshape(-1, width)[ia].sum(0)),
                              (b, lambda w: w.reshape(-1, width)[ib].sum(0)), params, producer=_module(a),
                              consumer=op.module, reason=reason)

    return build, (a, b), name, _module(a)
