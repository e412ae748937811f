"""Op-graph rules for the laws beyond layer pairs: linear (zero-gradient) and approximate laws.

They run on the graph and the unit propagation of :mod:`torch_conslaw.structure.rules`, so they
see every implementation alike (a fused GPT-2 ``Conv1D`` read by ``torch.addmm``, separate
``nn.Linear`` projections, ``F.scaled_dot_product_attention``, a hand-written RMSNorm). One
rule per family (SCIENCE.md §8), each with its law and a truthful reason for every near miss:

* **key bias** (:func:`key_bias_rule`): the scores q·k_j with k_j = W_K x_j + b_K gain q·b_K,
  the same for every key j, and a softmax over the keys removes it, so every entry of b_K has
  zero gradient. Only for the key units whose sole use is the key factor of score products,
  reached through shape ops alone (views, head splits, transposes, ``repeat_kv``, casts,
  a number: the shift b_K must stay the same at every key position; a rotary embedding
  multiplies it by position-dependent factors, so it is refused), and each product's scores
  must reach a softmax over the key axis through ops that keep a per-query shift (a number
  or a factor constant across keys, an additive mask or position bias, ``where`` /
  ``masked_fill``, casts). SDPA applies that softmax itself.
* **LayerNorm centering** (:func:`centering_rule`): a linear layer whose output reaches nothing
  but ``F.layer_norm`` over its features, possibly through residual additions (post-norm
  BERT computes LN(x + dense(h))): LN removes c·1, so the column sums Σ_i W[i, :] and Σ_i b_i
  are linear laws, exact at any eps. The same holds for an embedding table whose lookups reach
  only a LayerNorm (BERT's word + position + type embeddings): every row sum is a law. A sum that also continues elsewhere (the residual stream
  of a pre-norm block) gets none. Dropout in train mode multiplies each feature by its own mask
  (c·1 is no longer removed): the law then holds only in eval mode or with p = 0, so it is
  refused while the dropout module is in train mode. A softmax over the features removes c·1
  too (softmax(z + c·1) = softmax(z)): a layer whose outputs reach only a softmax over them (an
  MoE router, also through ``topk`` / ``sort`` of its logits and ``argmax`` positions; a head
  that returns probabilities) keeps the same column and bias sums.
* **embedding translation** (:func:`embedding_translation_rule`): two embedding lookups that are
  only added together (GPT-2's token + position embeddings): adding c to every row of one table
  and subtracting it from every row of the other leaves the sum unchanged, so
  Σ_v E_a[v, :] − Σ_v E_b[v, :] (one law per feature) is linear, whatever reads the sum. Each
  table must be read by that lookup alone, with no ``padding_idx`` (its row gets no gradient),
  ``max_norm`` or ``scale_grad_by_freq``.
* **score bias table** (:func:`score_bias_rule`): an embedding table whose lookups are only
  rearranged and added into scores that reach a softmax over their last axis, with each
  column of the table constant along that axis (T5's relative position bias, one column per
  head): adding c_h to column h shifts every score of a softmax row alike, so the column sums
  Σ_v E[v, h] are linear laws.
* **parallel biases** (:func:`parallel_bias_rule`): two layers with a bias whose outputs are
  only added together, directly or through further additions of other terms, casts and
  inactive dropout, each value on the way read once (the attention and MLP outputs of a
  parallel block, x + attn(ln1(x)) + mlp(ln2(x)) in GPT-NeoX and Phi): both biases shift the
  sum alike, so they always get the same gradient and b_1 − b_2 (one law per unit) is linear.
* **centered inputs** (:func:`centered_input_rule`): a ``Linear`` reading the output of a
  LayerNorm without affine parameters (OLMo's non-parametric LayerNorm), whose features sum to
  zero at every position: W → W + a·1ᵀ changes nothing, so each row sum Σ_j W[i, j] is linear.
* **scale before a normalization** (:func:`norm_scale_rule`): a linear layer whose output
  reaches nothing but a normalization over its features (``F.layer_norm``, ``F.rms_norm``, or
  a hand-written RMSNorm: x · rsqrt(mean(x²) + eps), as in ``LlamaRMSNorm`` and
  ``T5LayerNorm``): ‖W‖² + ‖b‖² is conserved at eps = 0 only, so the law is **approximate**.
* **scale before a direction** (:func:`normalize_scale_rule`): a linear layer whose output
  reaches, through positively homogeneous ops (ReLU, x², shape ops), nothing but an op that
  keeps only its direction over the features: ``F.normalize``, ``x / x.norm(dim=-1,
  keepdim=True)`` (``torch.linalg.vector_norm``, a ``clamp_min(eps)`` of the norm) or one
  argument of ``F.cosine_similarity``. Scaling the whole layer changes nothing, so
  ‖W‖² + ‖b‖² is **exactly** conserved (where the norm exceeds the op's eps): CLIP's
  projections, cosine classifiers, contrastive heads.

The groups are :class:`~torch_conslaw.laws.groups.LinearLaws`,
:class:`~torch_conslaw.laws.groups.NormScaleLaws` and
:class:`~torch_conslaw.laws.groups.InvariantScaleLaws`; like every law, they are tracked only once
the numerical check (:mod:`torch_conslaw.laws.verify`) passes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw.structure.rules import analyse_graph
    >>> class Block(nn.Module):  # post-norm: LN(x + dense(x))
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.dense, self.ln = nn.Linear(4, 4), nn.LayerNorm(4)
    ...     def forward(self, x):
    ...         return self.ln(x + self.dense(x))
    >>> _, _, extra = analyse_graph(Block(), torch.randn(3, 4))
    >>> [(g.name, g.kind, g.count) for g in extra.groups]
    [('dense→ln centering', 'linear', 5)]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .finder import Skipped
from .graph import Op, OpGraph, Val
from .rules import _CONV as _CONV_OPS
from .rules import _ADD, _CAST, _DIV, _DROPOUT, _HOMOGENEOUS, _MUL, _Side, _SiteState, _arg, _lookup_option, _units

__all__ = ["GraphLawGroups", "find_law_groups", "key_bias_rule", "centering_rule", "norm_scale_rule", "normalize_scale_rule",
           "embedding_translation_rule", "score_bias_rule", "parallel_bias_rule",
           "centered_input_rule"]

Problem = Callable[[tuple[str, ...], str], "str | None"]
_SOFTMAX = {"softmax", "log_softmax", "_softmax"}
_LARGEST = {"topk", "sort"}  # values (unmoved order) and indices along an axis
_INDEX_OF = {"argmax", "argmin", "argsort"}  # only positions along an axis
_KEEP = _CAST | {"contiguous", "clone"}  # elementwise identities on the values
_RESHAPE = {"view", "reshape"}
_SWAP = {"transpose", "swapaxes", "swapdims"}
_ADD_IN_PLACE = {"add_", "__iadd__", "sub_", "__isub__"}  # x += y: the graph records the result as a new value


@dataclass
class GraphLawGroups:
    """Law groups the op-graph rules propose (``groups``: linear and approximate) and the near
    misses they refuse, each with its reason (``skipped``)."""

    groups: list[Any] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def find_law_groups(model: nn.Module, g: OpGraph, states: dict[int, _SiteState],
                    sides: dict[int, dict[str, list[tuple[int, _Side]]]], problem: Problem) -> GraphLawGroups:
    """Run every rule of this module on the propagated sites of one graph."""
    params = dict(model.named_parameters(remove_duplicate=False))
    from .shift_rules import vanishing_shift_rule
    from .translation_rules import added_translation_rule

    out = GraphLawGroups()
    # two biases whose outputs are only added are also two terms added at the same places: the
    # translation rule then finds the same laws b₁[c] − b₂[c] as the parallel-bias rule, kept once
    parallel: dict[frozenset[str], int] = {}
    kept: set[tuple] = set()  # (name, kind, parameters, count) of the groups kept
    parallel_rule, translation_rule = parallel_bias_rule(model, g, states), added_translation_rule(model, g)
    centering = centering_rule(model, g, states)
    tied: dict[str, list[tuple[Any, str, str]]] = defaultdict(list)  # a tied tensor's centering proposals
    for rule in (key_bias_rule(g, states, sides), centering, norm_scale_rule(g, states), normalize_scale_rule(g, states),
                 embedding_translation_rule(g), score_bias_rule(g), parallel_rule,
                 centered_input_rule(g), translation_rule, vanishing_shift_rule(model, g)):
        for item in rule:
            if isinstance(item, Skipped):
                out.skipped.append(item)
                continue
            build, names, what, where = item
            why = problem(names, what)
            if why is not None and rule is centering and len(set(names)) == 1 and params[names[0]].requires_grad:
                tied[names[0]].append((build, where, why))  # shared or read twice: see below
                continue
            if why is not None:
                out.skipped.append(Skipped(where, None, why))
                continue
            group = build(params)
            if rule is parallel_rule:
                parallel[frozenset(names)] = group.count
            elif rule is translation_rule and parallel.get(frozenset(names)) == group.count:
                continue
            same = (group.name, group.kind, frozenset(group.parameter_names), group.count)
            if same in kept:  # one rule reached the same site twice (two paths to one layer)
                continue
            kept.add(same)
            out.groups.append(group)
    uses = g.param_uses()
    for name, found in tied.items():
        listed = next((n for n, q in model.named_parameters() if q is params[name]), name)
        group = _tied_centering(name, listed, found, uses.get(name, 0), params)
        if group is not None:
            out.groups.append(group)
        else:
            out.skipped += [Skipped(where, None, why) for _, where, why in found]
    return out


def _tied_centering(name: str, listed: str, found: list[tuple[Any, str, str]], uses: int, params: dict[str, Any]) -> Any:
    """One centering group for a tensor that is tied (an encoder's and a decoder's lookups of
    one table) or read by several ops, when every op that reads it gave a centering proposal
    (``found``; a site reached along two paths gives its proposal twice, counted once) and they
    all read the same entries with the same
    coefficients (equal values on a random tensor): each use is centred alike, so the shared
    tensor keeps the law (Pegasus: the row sums of ``shared``), read under ``listed``, the name
    ``model.named_parameters()`` gives the tensor. Else None."""
    groups = list({g.name: g for g in (build(params) for build, _, _ in found)}.values())  # one per site
    if len(groups) < 2 or len(groups) != uses:
        return None
    probe = {name: torch.randn(tuple(params[name].shape), generator=torch.Generator().manual_seed(0),
                               dtype=torch.float64)}
    try:
        first = groups[0].values(probe)
        if not all(torch.equal(first, other.values(probe)) for other in groups[1:]):
            return None
    except Exception:  # noqa: BLE001 - readers that cannot be compared: no law
        return None
    group = groups[0]
    group.readers = tuple((listed if n == name else n, fn) for n, fn in group.readers)
    group.parameter_names = tuple(dict.fromkeys(n for n, _ in group.readers))
    group.tied_uses = uses  # the sharing is accounted for (families.proposals does not refuse it again)
    group.name = f"{_module(listed) or listed} (tied, {uses} lookups) centering"
    group.reason = (f"{group.reason}; {name} is tied or read {uses} times, and each of its {uses} uses gives this "
                    "same law (" + ", ".join(g.name for g in groups) + "), so it holds for the shared tensor")
    return group


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _linear_site(st: _SiteState, g: OpGraph) -> bool:
    """A linear producer (Linear, Conv1D / addmm, x @ W) with its units on the last axis."""
    site = st.site
    return site.mixing and site.kind == "unit" and site.axis % len(g.shapes[site.out]) == len(g.shapes[site.out]) - 1


def _where(op: Op) -> str:
    return f"{op.name}{f' in {op.module}' if op.module else ''} (op {op.index})"


# ---------------------------------------------------------------------------------------------
# key bias
# ---------------------------------------------------------------------------------------------


def _scores_reach_softmax(g: OpGraph, op: Op) -> str | None:
    """None when the scores of the product ``op`` (keys on the last axis) reach a softmax over
    the keys through ops that keep a per-query shift; else what breaks it."""
    if op.name == "scaled_dot_product_attention":
        return None  # softmax over the keys inside; the mask cannot carry the key units (rules)
    v = op.outputs[0]
    precision = _eps(g.dtypes[v])
    while True:
        users = g.users.get(v, [])
        if len(users) != 1:
            return f"its scores are read by {len(users)} ops, not by one softmax over the keys"
        nxt = g.ops[users[0]]
        low = [d for d in (g.dtypes[o] for o in nxt.outputs) if _eps(d) > precision]
        if low:  # e.g. softmax(..., dtype=torch.float32) in a float64 model
            return (f"{_where(nxt)} computes the scores in {low[0]}, below the precision of the keys: "
                    "q·b_K is removed only up to that rounding, so the law cannot be claimed exact")
        name, ndim = nxt.name, len(g.shapes[v])
        others = [a for a in nxt.args if not (isinstance(a, Val) and a.vid == v)]
        if name in _SOFTMAX:
            dim = _arg(nxt, 1, "dim")
            if isinstance(dim, int) and dim % ndim == ndim - 1 and isinstance(nxt.args[0], Val) and nxt.args[0].vid == v:
                return None
            return f"{_where(nxt)} normalizes the scores over another axis than the keys"
        if name in _RESHAPE | _SWAP | {"permute"} and _keeps_last_axis(g, nxt, v):  # rows of scores kept whole
            v = nxt.outputs[0]
            continue
        if name in ("max", "maximum", "clamp", "clamp_min") and _mask_floor(g, nxt, v):
            v = nxt.outputs[0]  # max(s, finfo.min) (XGLM): changes only scores already masked away
            continue
        if name in _KEEP or name in _ADD or name in ("where", "masked_fill"):
            if name in _ADD and len(others) == len(nxt.args):  # v reaches it only as a keyword
                return f"{_where(nxt)} uses the scores in an unexpected way"
            if name == "where" and _arg(nxt, 0, "condition") == Val(v):
                return f"{_where(nxt)} uses the scores as a condition"
            v = nxt.outputs[0]
            continue
        if name in _MUL or (name in _DIV and isinstance(nxt.args[0], Val) and nxt.args[0].vid == v):
            factor = others[0] if others else None
            if isinstance(factor, (int, float)) or (
                isinstance(factor, Val) and (len(g.shapes[factor.vid]) == 0 or g.shapes[factor.vid][-1] == 1)
            ):
                v = nxt.outputs[0]
                continue
            return f"{_where(nxt)} multiplies the scores by a factor that varies across the keys"
        return f"{_where(nxt)} acts on the scores before the softmax over the keys"


def _mask_floor(g: OpGraph, op: Op, v: int) -> bool:
    """``max(s, c)`` / ``clamp(s, min=c)`` of the scores ``v`` with c a constant at or below
    -1e30 (``torch.finfo(dtype).min``): it changes only scores that the mask has already sent
    there, whose softmax weight is 0, so a shift of a query's scores stays a shift."""
    if len(op.outputs) != 1 or not op.args or op.args[0] != Val(v) or g.shapes[op.outputs[0]] != g.shapes[v]:
        return False
    if op.name in ("clamp", "clamp_min"):
        c = _arg(op, 1, "min")
        if op.name == "clamp" and _arg(op, 2, "max") is not None:
            return False
    else:
        c = _arg(op, 1, "other")
    if isinstance(c, Val):
        c = g.scalars.get(c.vid)
    return isinstance(c, (int, float)) and c <= -1e30


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def key_bias_rule(g: OpGraph, states: dict[int, _SiteState], sides: dict[int, dict[str, list[tuple[int, _Side]]]]):
    """Key-bias laws (see the module docstring): yields proposals and refusals."""
    events: dict[int, dict[int, list[tuple[int, str, bool]]]] = defaultdict(lambda: defaultdict(list))
    for op_index, entry in sides.items():
        for which in ("A", "B"):
            for sid, side in entry.get(which, []):
                for u in _units(side.fibers):
                    events[sid][u].append((op_index, which, side.pure and u not in states[sid].impure))
    for sid in sorted(events):
        st = states[sid]
        site = st.site
        last = len(g.shapes[site.out]) - 1
        on_last_axis = site.kind == "unit" and site.axis % (last + 1) == last
        if not ((site.mixing or on_last_axis) and len(site.readers) == 2):
            # no bias: nothing to propose (a Linear, Conv1D, x @ W, a convolution's channels, or a
            # LayerNorm's β, which is added to every key alike)
            continue
        bias = site.readers[1][0]
        used = {u for use in st.uses for u in _units(use.fiber)}
        good: list[int] = []
        refused: dict[str, int] = defaultdict(int)
        products: set[int] = set()
        for u, evs in sorted(events[sid].items()):
            if all(w == "A" for _, w, _ in evs):
                continue  # a query unit: its bias has no law
            reason = None
            if any(w == "A" for _, w, _ in evs):
                reason = "the unit is also a query factor"
            elif u in st.kills:
                reason = f"the key is also used elsewhere ({st.kills[u]})"
            elif u in used:
                reason = "the key also reaches a layer (it is used beyond the score product, e.g. as the value)"
            elif not all(pure for _, _, pure in evs):
                reason = ("the keys are changed by ops other than reshapes before the score product (a rotary "
                          "embedding or another position-dependent factor): q·b_K then differs between keys")
            else:
                for op_index, _, _ in evs:
                    why = _scores_reach_softmax(g, g.ops[op_index])
                    if why is not None:
                        reason = f"score product op {op_index}: {why}"
                        break
            if reason is None:
                good.append(u)
                products.update(op for op, _, _ in evs)
            else:
                refused[reason] += 1
        for reason, n in refused.items():
            yield Skipped(site.name, None, f"no key-bias law for {n} key unit(s) of {site.name}: {reason}")
        if not good:
            continue
        idx = torch.tensor(good)
        consumer = g.ops[min(products)].module
        name = f"{site.name} key bias"
        reason = (f"the softmax over the keys in {consumer or 'the model'} removes q·b_K, the same for every key: "
                  f"{bias}[{good[0]}..{good[-1]}] ({len(good)} entries) has zero gradient, each entry a linear law")

        def build(params, name=name, bias=bias, idx=idx, site=site.name, consumer=consumer, reason=reason):
            from ..laws.groups import LinearLaws

            return LinearLaws(name, ((bias, lambda b, idx=idx: b[idx]),), params, producer=site, consumer=consumer,
                              reason=reason)

        yield build, (bias,), name, site.name


# ---------------------------------------------------------------------------------------------
# LayerNorm centering
# ---------------------------------------------------------------------------------------------


def _keeps_last_axis(g: OpGraph, op: Op, v: int) -> bool:
    """A cast, copy or view of ``v`` (its first argument) that keeps the last axis as it is,
    or a transpose / permutation of the other axes (``nn.MultiheadAttention`` with
    ``batch_first=True`` returns its ``out_proj`` output transposed)."""
    if not (op.args and isinstance(op.args[0], Val) and op.args[0].vid == v and len(op.outputs) == 1):
        return False
    if op.name in _KEEP:
        return True
    last = len(g.shapes[v]) - 1
    if op.name in _SWAP:
        dims = [_arg(op, 1, "dim0"), _arg(op, 2, "dim1")]
        return last > 0 and all(isinstance(d, int) and d % (last + 1) != last for d in dims)
    if op.name == "permute":
        dims = op.args[1] if len(op.args) == 2 and isinstance(op.args[1], (list, tuple)) else op.args[1:]
        dims = op.kwargs.get("dims", dims)
        return bool(dims) and isinstance(dims[-1], int) and dims[-1] % (last + 1) == last
    return op.name in _RESHAPE and g.shapes[op.outputs[0]][-1:] == g.shapes[v][-1:]


def _dropout_active(model: nn.Module, op: Op) -> bool:
    p = _arg(op, 1, "p", 0.5)
    try:
        training = model.get_submodule(op.module).training
    except AttributeError:
        training = model.training
    return training and not (isinstance(p, (int, float)) and p == 0)


def _scalar_factor(g: OpGraph, op: Op, v: int) -> bool:
    """``v * s``, ``s * v`` or ``v / s`` with s a number or a one-valued tensor that is no parameter
    (an embedding scale): a shift c·1 of ``v`` stays a shift, (s·c)·1."""
    if op.name not in _MUL | _DIV or len(op.args) != 2 or len(op.outputs) != 1 or op.kwargs:
        return False
    mine = [i for i, a in enumerate(op.args) if isinstance(a, Val) and a.vid == v]
    if len(mine) != 1 or (op.name in _DIV and mine[0] != 0):
        return False
    other = op.args[1 - mine[0]]
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return True
    return (isinstance(other, Val) and other.vid not in g.params and math.prod(g.shapes[other.vid]) == 1
            and g.shapes[op.outputs[0]] == g.shapes[v])


def _hand_centered(g: OpGraph, v: int, units: int) -> tuple[Op, set[int]] | None:
    """``(mean op, the ops it and v − mean are)`` when ``v`` is read by ``mean(v, -1, keepdim=True)``
    whose every use is ``v − mean`` (a hand-written LayerNorm, CohereLayerNorm: (x − μ) ·
    rsqrt(mean((x − μ)²) + eps)): those ops remove a shift c·1 of ``v`` exactly; None otherwise."""
    if not g.shapes[v] or g.shapes[v][-1] != units or units < 2:
        return None
    last = len(g.shapes[v]) - 1
    for u in g.users.get(v, []):
        mean = g.ops[u]
        if mean.name != "mean" or not mean.args or mean.args[0] != Val(v) or len(mean.outputs) != 1:
            continue
        dim = _arg(mean, 1, "dim")
        dims = [dim] if isinstance(dim, int) else list(dim or [])
        if [d % (last + 1) for d in dims] != [last] or not _arg(mean, 2, "keepdim", False):
            continue
        m = mean.outputs[0]
        subs = [g.ops[w] for w in g.users.get(m, [])]
        if subs and all(op.name in ("sub", "__sub__") and tuple(op.args[:2]) == (Val(v), Val(m)) and not op.kwargs
                        for op in subs):
            return mean, {mean.index} | {op.index for op in subs}
    return None


def _to_layer_norm(model: nn.Module, g: OpGraph, v: int, units: int, who: str) -> list[Op] | Skipped | None:
    """The ``F.layer_norm`` ops over the last axis (``units`` wide) that ``v`` reaches, when
    every path from ``v`` ends in one of them, through casts, views keeping the last axis,
    dropout and additions (a residual stream: a pre-norm model reads its stream only through
    LayerNorms, and a shift c·1 added anywhere in it stays c·1 up to each of them); a refusal
    when it reaches one but a shift c·1 would not stay removed; None when it reaches none."""
    norms: dict[int, Op] = {}
    other: Op | None = None
    output = dropout = None
    added = False
    seen: set[int] = set()
    stack = [v]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in g.outputs:
            output = v
        centered = _hand_centered(g, v, units)  # v − mean(v, -1): a hand-written LayerNorm (Cohere)
        if centered is not None:
            norms[centered[0].index] = centered[0]
        for u in g.users.get(v, []):
            op = g.ops[u]
            if centered is not None and op.index in centered[1]:
                continue
            if _keeps_last_axis(g, op, v):
                stack.append(op.outputs[0])
                continue
            if (op.args and op.args[0] == Val(v) and len(op.outputs) == 1 and _adds_axes(g, op, v)) or _cat_rows(g, op, v):
                stack.append(op.outputs[0])  # the same rows, broadcast or stacked with others: c·1 stays c·1
                continue
            if _scalar_factor(g, op, v):  # (s·c)·1 is still removed (XGLM scales its embeddings)
                stack.append(op.outputs[0])
                continue
            if op.name in _DROPOUT and op.args and op.args[0] == Val(v) and len(op.outputs) == 1:
                if _dropout_active(model, op):
                    dropout = op
                stack.append(op.outputs[0])
                continue
            if (op.name in _ADD | _ADD_IN_PLACE and len(op.outputs) == 1 and len(g.shapes[op.outputs[0]]) >= 1
                    and g.shapes[op.outputs[0]][-1:] == g.shapes[v][-1:]):
                added = True
                stack.append(op.outputs[0])
                continue
            if op.args and op.args[0] == Val(v) and Val(v) not in op.args[1:] and _along_last_axis(g, op, v):
                if op.name in _SOFTMAX:  # softmax(x + c·1) = softmax(x): an MoE router's logits
                    norms[op.index] = op
                    continue
                if op.name in _LARGEST:  # the k largest (or sorted) values move by c, their order does not
                    stack.append(op.outputs[0])
                    continue
                if op.name in _INDEX_OF:  # positions only: unmoved by a shift along the axis
                    continue
            shape = _arg(op, 1, "normalized_shape")
            if (op.name == "layer_norm" and op.args and op.args[0] == Val(v) and Val(v) not in op.args[1:]
                    and shape is not None and tuple(shape) == (units,) and g.shapes[v][-1] == units):
                norms[op.index] = op
                continue
            other = other or op
    if not norms:
        return None
    if other is not None or output is not None:
        if not added:
            return None
        where = (f"{_where(other)}, which is not a LayerNorm over its features" if other is not None
                 else "the model's output")
        return Skipped(who, None, (
            f"no LayerNorm centering law for {who}: its output is added to a residual stream that "
            f"reaches {len(norms)} LayerNorm(s) but also {where} (a shift c·1 of its output is not "
            "removed there)"))
    if dropout is not None:
        return Skipped(who, None, (
            f"no LayerNorm centering law for {who}: {_where(dropout)} is in train mode and "
            "multiplies each feature by its own mask, so the shift c·1 that the LayerNorm removes "
            "does not stay c·1 (the law holds in eval mode or with p = 0)"))
    return [norms[i] for i in sorted(norms)]


def _along_last_axis(g: OpGraph, op: Op, v: int) -> bool:
    """The op works along the last axis of ``v`` (its ``dim``; ``topk`` and ``sort`` default to it)."""
    default = -1 if op.name in _LARGEST else None
    dim = _arg(op, 2 if op.name == "topk" else 1, "dim", default)
    ndim = len(g.shapes[v])
    return isinstance(dim, int) and not isinstance(dim, bool) and ndim > 0 and dim % ndim == ndim - 1


_MOVE = {"flatten", "transpose", "swapaxes", "swapdims", "permute", "view", "reshape", "contiguous", "clone"} | _CAST


def _channels_to_layer_norm(model: nn.Module, g: OpGraph, site) -> list[Op] | Skipped | None:
    """The LayerNorms a convolution's output reaches once its channels are moved to the last
    axis (ViT's patch embedding: flatten(2).transpose(1, 2)): replays the moves on a probe of
    channel indices until every row of the last axis holds each channel once, then follows the
    stream as :func:`_to_layer_norm` does."""
    v = site.out
    shape = g.shapes[v]
    axis = site.axis % len(shape)
    probe = torch.arange(site.units, dtype=torch.float64).reshape((-1,) + (1,) * (len(shape) - axis - 1)).expand(shape[axis:])
    probe = probe.expand(shape)
    want = torch.arange(site.units, dtype=torch.float64)
    for _ in range(8):
        users = g.users.get(v, [])
        if len(users) != 1 or v in g.outputs:
            return None
        op = g.ops[users[0]]
        if not (op.name in _MOVE and op.args and op.args[0] == Val(v) and len(op.outputs) == 1
                and not any(isinstance(a, Val) for a in list(op.args[1:]) + list(op.kwargs.values()))):
            return None
        try:
            probe = probe if op.name in _CAST else op.func(probe, *op.args[1:], **op.kwargs)
        except Exception:  # noqa: BLE001 - a move that cannot be replayed ends the search
            return None
        v = op.outputs[0]
        if not isinstance(probe, torch.Tensor) or tuple(probe.shape) != tuple(g.shapes[v]):
            return None
        if probe.shape[-1] == site.units and bool((probe.sort(-1).values == want).all()):
            return _to_layer_norm(model, g, v, site.units, site.name)
    return None


def _cat_rows(g: OpGraph, op: Op, v: int) -> bool:
    """``torch.cat`` of whole rows (along an axis other than the last): ViT's [CLS] token."""
    if op.name not in ("cat", "concat", "concatenate") or len(op.outputs) != 1:
        return False
    parts = op.args[0] if op.args else op.kwargs.get("tensors")
    dim = _arg(op, 1, "dim", 0)
    out = g.shapes[op.outputs[0]]
    return (isinstance(parts, (list, tuple)) and Val(v) in parts and isinstance(dim, int)
            and dim % len(out) != len(out) - 1 and out[-1:] == g.shapes[v][-1:])


def centering_rule(model: nn.Module, g: OpGraph, states: dict[int, _SiteState]):
    """LayerNorm centering laws (see the module docstring): yields proposals and refusals."""
    for st in states.values():
        site = st.site
        if _linear_site(st, g):
            found = _to_layer_norm(model, g, site.out, site.units, site.name)
        elif site.mixing and site.kind == "channel":  # a convolution whose channels become the features
            found = _channels_to_layer_norm(model, g, site)
        elif g.ops[site.op].name == "layer_norm" and len(site.readers) == 2:
            # a LayerNorm's β writing a stream that only LayerNorms read (Swin's and SegFormer's
            # patch-embedding norm): β + t·1 shifts every row by t·1, which they remove
            found = _to_layer_norm(model, g, site.out, site.units, site.name)
            if found is not None and not isinstance(found, Skipped):
                yield _norm_bias_centering(site.readers[1][0], site.name, found)
                continue
        else:
            continue
        if isinstance(found, Skipped):
            yield found
        elif found is not None:
            # a grouped convolution (depthwise: ConvNeXt, SegFormer's Mix-FFN) gives each output
            # channel its own inputs: a shift of W[:, j] moves the channels by different amounts
            grouped = g.ops[site.op].name in _CONV_OPS and _arg(g.ops[site.op], 6, "groups", 1) != 1
            yield _centering(site, found, columns=not grouped)
    for op in g.ops:  # nn.MultiheadAttention: its output is that of out_proj (one op here)
        if op.name == "multi_head_attention_forward" and op.index in g.live:
            found = _mha_out_proj(model, g, op)
            if found is not None:
                yield found
    yield from _parameter_centering(model, g)
    for op in g.ops:  # embeddings: a shift t_v·1 of row v moves every token v by t_v·1
        weight = _arg(op, 1, "weight")
        if op.name != "embedding" or op.index not in g.live or not isinstance(weight, Val) or weight.vid not in g.params:
            continue
        if _arg(op, 3, "max_norm") is not None:
            continue  # the lookup renormalizes the rows it reads (in place): no shift symmetry
        rows, width = g.shapes[weight.vid]
        name = g.params[weight.vid]
        found = _to_layer_norm(model, g, op.outputs[0], width, _module(name))
        if isinstance(found, Skipped):
            yield found
        elif found is not None:
            yield _embedding_centering(name, rows, _arg(op, 2, "padding_idx"), found)


def _parameter_centering(model: nn.Module, g: OpGraph):
    """A parameter added into a stream that only LayerNorms read (ViT's [CLS] token and position
    embeddings, a learned bias added by hand): each of its rows (last axis) summed is a law."""
    for vid, name in g.params.items():
        shape = g.shapes[vid]
        users = [g.ops[u] for u in g.users.get(vid, [])]
        if len(shape) == 0 or shape[-1] < 2 or not users:
            continue
        if not any(op.name in _ADD | _ADD_IN_PLACE | {"cat", "concat", "concatenate", "expand", "expand_as", "unsqueeze",
                                                      "__getitem__", "broadcast_to"} or op.name in _KEEP for op in users):
            continue  # read by a layer or a norm as its weight: the layer rules cover it
        found = _to_layer_norm(model, g, vid, shape[-1], _module(name) or name)
        if found is None or isinstance(found, Skipped):
            if isinstance(found, Skipped):
                yield found
            continue
        consumer, suffix, said = _norms_said(found)
        law = f"{name}→{suffix} centering"
        verb = "" if len(found) > 1 else " removes"
        reason = (f"{said}{verb} a shift c·1 of the features of {name}, which is only added into what it normalizes: "
                  "adding t·1 to a row changes nothing, so every row sum (over the last axis) is a linear law, "
                  "exact at any eps")

        def build(params, name=name, law=law, consumer=consumer, reason=reason):
            from ..laws.groups import LinearLaws

            return LinearLaws(law, ((name, lambda p: p.sum(-1).reshape(-1)),), params, producer=_module(name),
                              consumer=consumer, reason=reason)

        yield build, (name,), law, _module(name)


def _mha_out_proj(model: nn.Module, g: OpGraph, op: Op):
    """The centering laws of the ``out_proj`` of ``F.multi_head_attention_forward`` (the whole
    ``nn.MultiheadAttention`` is one op of the graph): its output is attn · W_oᵀ + b_o, the
    features last; a proposal, a refusal, or None when it reaches no LayerNorm alone."""
    weight, bias = _arg(op, 11, "out_proj_weight"), _arg(op, 12, "out_proj_bias")
    if not (isinstance(weight, Val) and weight.vid in g.params and op.outputs):
        return None
    names = [g.params[weight.vid]] + ([g.params[bias.vid]] if isinstance(bias, Val) and bias.vid in g.params else [])
    units = g.shapes[weight.vid][0]
    site = SimpleNamespace(name=_module(names[0]), readers=[(names[0], "rows")] + [(n, "bias") for n in names[1:]])
    found = _to_layer_norm(model, g, op.outputs[0], units, site.name)
    if found is None or isinstance(found, Skipped):
        return found
    return _centering(site, found)


def _norms_said(norms: list[Op]) -> tuple[str, str, str]:
    """(consumer module, name suffix, the LayerNorms in words) of the LayerNorms a shift reaches."""
    consumer = norms[0].module
    if len(norms) == 1:
        kind = "softmax" if norms[0].name in _SOFTMAX else "LayerNorm"
        return consumer, consumer or kind, f"the {kind} of {consumer or 'the model'} (op {norms[0].index})"
    shown = ", ".join(f"{n.module or 'the model'} (op {n.index}{', a softmax' if n.name in _SOFTMAX else ''})"
                      for n in norms[:4])
    more = f" and {len(norms) - 4} more" if len(norms) > 4 else ""
    return (consumer, f"{consumer} +{len(norms) - 1} LayerNorms",
            f"the {len(norms)} LayerNorms or softmaxes that read the stream it writes ({shown}{more}; nothing "
            "else reads that stream) each remove")


def _embedding_centering(weight: str, rows: int, padding: Any, norms: list[Op]):
    """Row sums of an embedding table whose lookups reach only LayerNorms (the padding row
    is a law entry by entry already: its sum would repeat it)."""
    keep = [r for r in range(rows) if not (isinstance(padding, int) and r == padding % rows)]
    idx = torch.tensor(keep)
    consumer, suffix, said = _norms_said(norms)
    producer = _module(weight)
    name = f"{producer}→{suffix} centering"
    verb = "" if len(norms) > 1 else " removes"
    reason = (f"{said}{verb} a shift c·1 of the features "
              f"of the lookups of {weight}, and they reach nothing else: adding t_v·1 to row v changes nothing, "
              "so every row sum Σ_i E[v, i] is a linear law, exact at any eps"
              + (f" (the padding row {padding} is tracked entry by entry already)" if len(keep) < rows else ""))

    def build(params):
        from ..laws.groups import LinearLaws

        return LinearLaws(name, ((weight, lambda w: w.sum(1)[idx]),), params, producer=producer, consumer=consumer,
                          reason=reason)

    return build, (weight,), name, producer


def _norm_bias_centering(bias: str, who: str, norms: list[Op]):
    consumer, suffix, said = _norms_said(norms)
    name = f"{who}.bias→{suffix} centering"
    verb = "" if len(norms) > 1 else " removes"
    reason = (f"{said}{verb} a shift c·1 of the features of the output of {who}, and it reaches nothing else: "
              f"Σ_i β_i of {bias} is a linear law, exact at any eps (its weight γ scales a centered value: no law)")

    def build(params):
        from ..laws.groups import LinearLaws

        return LinearLaws(name, ((bias, lambda b: b.sum().reshape(1)),), params, producer=who, consumer=consumer,
                          reason=reason)

    return build, (bias,), name, who


def _centering(site, norms: list[Op], columns: bool = True):
    """Column sums (``columns``; not for a grouped convolution, whose output channels read
    different inputs) and the bias sum of a layer whose output only LayerNorms read."""
    weight, layout = site.readers[0]
    bias = site.readers[1][0] if len(site.readers) == 2 else None
    if not columns and not bias:
        return Skipped(site.name, None, f"no centering law for {site.name}: a grouped convolution without a bias "
                       "(its output channels read different inputs, so its column sums are not laws)")
    axis = 0 if layout == "rows" else 1  # rows: W[out, in] (Linear); cols: W[in, out] (Conv1D, x @ W)
    consumer, suffix, said = _norms_said(norms)
    name = f"{site.name}→{suffix} centering"
    verb = "" if len(norms) > 1 else " removes"
    if columns:
        reason = (f"{said}{verb} a shift c·1 of the features "
                  f"of {site.name}, and its output reaches nothing else: the column sums Σ_i W[i, :]"
                  + (" and Σ_i b_i" if bias else "") + " are linear laws, exact at any eps")
    else:
        reason = (f"{said}{verb} a shift c·1 of the features of {site.name}, and its output reaches nothing else: "
                  "Σ_i b_i is a linear law, exact at any eps (a grouped convolution: each output channel reads its "
                  "own inputs, so the column sums are not laws)")
    names = ((weight,) if columns else ()) + ((bias,) if bias else ())

    def build(params):
        from ..laws.groups import LinearLaws

        readers = [(weight, lambda w, axis=axis: w.sum(axis))] if columns else []
        if bias:
            readers.append((bias, lambda b: b.sum().reshape(1)))
        return LinearLaws(name, tuple(readers), params, producer=site.name, consumer=consumer, reason=reason)

    return build, names, name, site.name


# ---------------------------------------------------------------------------------------------
# embedding translation
# ---------------------------------------------------------------------------------------------

_PLUS = {"add", "__add__", "__radd__"}
_PLUS_IN_PLACE = {"add_", "__iadd__"}


def _plus(g: OpGraph, op: Op) -> bool:
    """``a + b`` (alpha 1) of two values, or ``a += b`` on an ``a`` that nothing else reads and
    that is no view of another value (MegatronBERT's ``embeddings += position_embeddings``):
    the graph records its result as a new value, so it is the same sum."""
    if not (op.name in _PLUS | _PLUS_IN_PLACE and _arg(op, 2, "alpha", 1) == 1 and len(op.outputs) == 1
            and len(op.args) >= 2 and all(isinstance(a, Val) for a in op.args[:2])):
        return False
    if op.name in _PLUS:
        return True
    from .rules import _SHAPE

    x = op.args[0]
    made = g.producer(x.vid)
    return (x.vid not in g.params and g.users.get(x.vid, []) == [op.index] and made is not None
            and made.name not in _SHAPE and made.name not in ("contiguous", "clone"))


def _lookups(g: OpGraph, v: int) -> list[Op] | None:
    """The embedding lookups whose sum ``v`` is (through casts and additions, each value read
    once), or None when ``v`` is anything else."""
    op = g.producer(v)  # live: v has a user
    if len(g.users.get(v, [])) != 1 or op is None:
        return None
    if op.args and isinstance(op.args[0], Val) and len(op.outputs) == 1 and (
            _keeps_last_axis(g, op, op.args[0].vid) or _adds_axes(g, op, op.args[0].vid)):
        return _lookups(g, op.args[0].vid)
    if op.name == "embedding" and isinstance(_arg(op, 1, "weight"), Val):
        return [op]
    if _plus(g, op):
        a, b = (_lookups(g, x.vid) for x in op.args[:2])
        return None if a is None or b is None else a + b
    return None


def _adds_axes(g: OpGraph, op: Op, v: int) -> bool:
    """``x[None]``, ``x[:, 0]``, ``x.unsqueeze(d)``, ``x.expand(...)``: whole rows (some of them,
    or broadcast), the features last and untouched."""
    if g.shapes[op.outputs[0]][-1:] != g.shapes[v][-1:]:
        return False
    if op.name in ("expand", "expand_as", "broadcast_to"):
        return True
    if op.name == "unsqueeze":
        d = _arg(op, 1, "dim")
        return isinstance(d, int) and d % len(g.shapes[op.outputs[0]]) != len(g.shapes[op.outputs[0]]) - 1
    if op.name == "__getitem__":  # whole rows: ints and slices on the leading axes only
        key = op.args[1] if len(op.args) > 1 else None
        key = key if isinstance(key, tuple) else (key,)
        if g.shapes[v][-1] < 2 or not all(k is None or k is Ellipsis or isinstance(k, (int, slice)) for k in key):
            return False
        if any(isinstance(k, slice) and any(isinstance(e, Val) for e in (k.start, k.stop, k.step)) for k in key):
            return False
        if Ellipsis in key:
            return all(k is None for k in key[key.index(Ellipsis) + 1:])
        return sum(k is not None for k in key) < len(g.shapes[v])
    return False


def _translatable(g: OpGraph, op: Op, uses: dict[str, int]) -> str | None:
    """Why the table of a lookup cannot be translated (None: it can)."""
    weight = _arg(op, 1, "weight")
    if weight.vid not in g.params:
        return "its table is not a parameter"
    name = g.params[weight.vid]
    if uses.get(name, 0) != 1:
        return f"{name} is read by {uses.get(name, 0)} ops (tied or shared), not by this lookup alone"
    why = _lookup_option(op)
    return None if why is None else f"{name} {why}"


def embedding_translation_rule(g: OpGraph):
    """Translation laws between embedding tables that are only added together (see the module
    docstring): yields proposals and refusals."""
    uses = g.param_uses()
    for op in g.ops:
        if not (op.index in g.live and _plus(g, op)):
            continue
        sides = [_lookups(g, a.vid) for a in op.args[:2]]
        if any(side is None for side in sides):
            continue
        why = {id(e): _translatable(g, e, uses) for side in sides for e in side}
        picked = [next((e for e in side if why[id(e)] is None), None) for side in sides]
        if any(e is None for e in picked):
            reasons = "; ".join(dict.fromkeys(w for w in why.values() if w))
            yield Skipped(op.module or None, None, (
                f"no embedding translation law at {_where(op)}, which adds embedding lookups: {reasons}"))
            continue
        a, b = (g.params[_arg(e, 1, "weight").vid] for e in picked)
        if a == b or g.shapes[_arg(picked[0], 1, "weight").vid][-1] != g.shapes[_arg(picked[1], 1, "weight").vid][-1]:
            continue
        yield _translation(a, b, op)


def _translation(a: str, b: str, add: Op):
    ma, mb = _module(a), _module(b)
    name = f"{ma}−{mb} translation"
    reason = (f"{a} and {b} are looked up and only added together ({_where(add)}): adding c to every row of the "
              "first and subtracting it from every row of the second changes nothing, so the column sums "
              "Σ_v E_a[v, :] − Σ_v E_b[v, :] (one per feature) are linear laws")

    def build(params):
        from ..laws.groups import DifferenceLaws

        return DifferenceLaws(name, (a, lambda w: w.sum(0)), (b, lambda w: w.sum(0)), params, producer=ma,
                              consumer=add.module, reason=reason)

    return build, (a, b), name, ma


# ---------------------------------------------------------------------------------------------
# score bias table
# ---------------------------------------------------------------------------------------------

_REPLAY = {"permute", "unsqueeze", "transpose", "swapaxes", "swapdims", "view", "reshape", "expand", "contiguous",
           "clone", "__getitem__"} | _CAST


def _bias_reaches_softmax(g: OpGraph, v: int, probe: torch.Tensor) -> str | None:
    """None when every use of ``v`` (holding, entry by entry, the table column it came from:
    ``probe``) is rearranged and added into values that reach a softmax over their last axis
    with each column constant along it; else why not."""
    for u in g.users.get(v, []):
        op = g.ops[u]
        if v in g.outputs:
            return "the lookups are an output of the model"
        if op.name == "scaled_dot_product_attention" and _arg(op, 3, "attn_mask") == Val(v) and Val(v) not in op.args[:3]:
            # an additive float mask on the scores, softmax over the keys (the last axis) inside
            key = _arg(op, 1, "key")
            if not isinstance(key, Val) or g.dtypes.get(v) == torch.bool:
                return f"{_where(op)} reads the lookups in a way that is not followed"
            scores = tuple(g.shapes[op.outputs[0]][:-1]) + (g.shapes[key.vid][-2],)
            try:
                moved = torch.broadcast_to(probe, scores)
            except RuntimeError:
                return f"{_where(op)} broadcasts the lookups in a way that is not followed"
            if not bool((moved == moved[..., :1]).all()):
                return f"the softmax of {_where(op)} runs along an axis that holds different table columns"
            continue
        if op.name in _ADD | _ADD_IN_PLACE and len(op.outputs) == 1 and op.name not in ("sub", "__sub__", "subtract") or (
                op.name in ("sub", "__sub__", "subtract") and op.args and op.args[0] == Val(v)):
            out = g.shapes[op.outputs[0]]
            try:
                moved = torch.broadcast_to(probe, out)
            except RuntimeError:
                return f"{_where(op)} broadcasts the lookups in a way that is not followed"
            if _scores_reach_softmax(g, op) is None:
                if not bool((moved == moved[..., :1]).all()):
                    return f"the softmax after {_where(op)} runs along an axis that holds different table columns"
                continue
            why = _bias_reaches_softmax(g, op.outputs[0], moved)
            if why is not None:
                return why
            continue
        if op.name in _REPLAY and op.args and op.args[0] == Val(v) and len(op.outputs) == 1 and not any(
                isinstance(a, Val) for a in list(op.args[1:]) + list(op.kwargs.values())):
            try:
                moved = op.func(probe, *op.args[1:], **op.kwargs) if op.name not in _CAST else probe
            except Exception as err:  # noqa: BLE001 - a replay that fails is a refusal
                return f"{_where(op)} could not be replayed ({type(err).__name__})"
            if not isinstance(moved, torch.Tensor) or tuple(moved.shape) != tuple(g.shapes[op.outputs[0]]):
                return f"{_where(op)} could not be replayed"
            why = _bias_reaches_softmax(g, op.outputs[0], moved)
            if why is not None:
                return why
            continue
        return f"{_where(op)} uses the lookups otherwise than adding them into softmax scores"
    return None


def _gathered_rows(g: OpGraph, op: Op) -> Val | None:
    """The 2-D parameter that ``op`` gathers rows of with an integer index tensor
    (``table[index]``), or None."""
    if op.name != "__getitem__" or len(op.args) != 2 or len(op.outputs) != 1:
        return None
    table, index = op.args
    if not (isinstance(table, Val) and table.vid in g.params and isinstance(index, Val)):
        return None
    if g.dtypes.get(index.vid) not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return None
    shape = g.shapes[table.vid]
    return table if len(shape) == 2 and g.shapes[op.outputs[0]] == tuple(g.shapes[index.vid]) + (shape[1],) else None


def score_bias_rule(g: OpGraph):
    """Column sums of an embedding table added into softmax scores (see the module docstring)."""
    uses = g.param_uses()
    for op in g.ops:
        gathered = _gathered_rows(g, op)  # table[index] (Swin's relative position bias) is a lookup too
        weight = gathered if gathered is not None else _arg(op, 1, "weight")
        if (op.name != "embedding" and gathered is None) or op.index not in g.live or not isinstance(weight, Val) \
                or weight.vid not in g.params or len(g.shapes[weight.vid]) != 2:
            continue
        name = g.params[weight.vid]
        rows, cols = g.shapes[weight.vid]
        out = op.outputs[0]
        probe = torch.arange(cols, dtype=torch.float64).expand(g.shapes[out])
        if not g.users.get(out) or _bias_reaches_softmax(g, out, probe) is not None:
            continue  # an ordinary embedding (or one this rule cannot follow): nothing to say
        problem = (None if uses.get(name, 0) == 1 else f"{name} is read by {uses.get(name, 0)} ops (tied or shared), "
                   "not by this lookup alone") if gathered is not None else _translatable(g, op, uses)
        if problem is not None:
            yield Skipped(_module(name), None, f"no score-bias law for {name}: {problem}")
            continue
        law = f"{_module(name) or name} score bias"
        reason = (f"the lookups of {name} are added into scores that a softmax normalizes along an axis on which "
                  "each column of the table is constant: adding c_j to column j shifts every softmax row alike, "
                  "so the column sums Σ_v E[v, j] are linear laws")

        def build(params, name=name, law=law, reason=reason, consumer=op.module):
            from ..laws.groups import LinearLaws

            return LinearLaws(law, ((name, lambda w: w.sum(0)),), params, producer=_module(name), consumer=consumer,
                              reason=reason)

        yield build, (name,), law, _module(name)


# ---------------------------------------------------------------------------------------------
# approximate scale laws
# ---------------------------------------------------------------------------------------------


def _hand_rms(g: OpGraph, v: int) -> tuple[Op, float | None] | None:
    """``(the op that divides by the root mean square, eps)`` when ``v`` is normalized by a
    hand-written RMSNorm over its last axis: v · rsqrt(mean(v², -1) + eps) or
    v / sqrt(mean(v², -1) + eps), the statistic possibly computed after a cast."""
    users = [g.ops[u] for u in g.users.get(v, [])]
    if len(users) != 2:
        return None
    ndim = len(g.shapes[v])
    for stat, scale in (users, users[::-1]):
        if scale.name not in _MUL | _DIV or Val(v) not in scale.args:
            continue
        cur, op = v, stat
        squared = averaged = False
        root, eps = None, None
        while True:
            if op is scale:
                break
            name = op.name
            if name in _KEEP and op.args and op.args[0] == Val(cur):
                pass
            elif name in ("pow", "square", "__pow__") and not squared and (name == "square" or _arg(op, 1, "exponent") == 2):
                squared = True
            elif name == "mean" and squared and not averaged:
                dim = _arg(op, 1, "dim")
                dims = [dim] if isinstance(dim, int) else list(dim or [])
                if [d % ndim for d in dims] != [ndim - 1] or not _arg(op, 2, "keepdim", False):
                    return None
                averaged = True
            elif name in _ADD and averaged and root is None and any(isinstance(a, (int, float)) for a in op.args):
                eps = next(float(a) for a in op.args if isinstance(a, (int, float)))
            elif name in ("rsqrt", "sqrt") and averaged and root is None:
                root = name
            else:
                return None
            users_next = g.users.get(op.outputs[0], []) if len(op.outputs) == 1 else []
            if len(users_next) != 1:
                return None
            cur, op = op.outputs[0], g.ops[users_next[0]]
        if not (squared and averaged) or Val(cur) not in scale.args:
            return None
        if (scale.name in _MUL and root == "rsqrt") or (scale.name in _DIV and root == "sqrt" and scale.args[0] == Val(v)):
            return scale, eps
        return None
    return None


def norm_scale_rule(g: OpGraph, states: dict[int, _SiteState]):
    """Approximate scale laws (see the module docstring): yields proposals."""
    for st in states.values():
        site = st.site
        if not _linear_site(st, g):
            continue
        units, v = site.units, site.out
        while True:
            users = g.users.get(v, [])
            op = g.ops[users[0]] if len(users) == 1 else None
            if op is not None and (_keeps_last_axis(g, op, v) or (op.name in _DROPOUT and op.args and op.args[0] == Val(v))):
                v = op.outputs[0]  # dropout scales with its input: D(cv) = c·D(v)
                continue
            break
        if g.shapes[v][-1] != units:
            continue
        if op is not None and op.name in ("layer_norm", "rms_norm") and op.args and op.args[0] == Val(v):
            shape = _arg(op, 1, "normalized_shape")
            if shape is None or tuple(shape) != (units,):
                continue
            eps = _arg(op, 4 if op.name == "layer_norm" else 3, "eps")
            yield _scale(site, op, eps, op.name)
            continue
        found = _hand_rms(g, v)
        if found is not None:
            yield _scale(site, found[0], found[1], "x·rsqrt(mean(x²) + eps)")


def _scale(site, norm: Op, eps: Any, what: str):
    consumer = norm.module
    name = f"{site.name}→{consumer} scale"
    names = tuple(n for n, _ in site.readers)
    eps_text = f"{eps:g}" if isinstance(eps, (int, float)) else "its default"
    reason = (f"approximate: {what} in {consumer or 'the model'} (op {norm.index}) normalizes the outputs of "
              f"{site.name} over their features, so ‖W‖² + ‖b‖² of the whole layer would be conserved at "
              f"eps = 0; eps = {eps_text} breaks it at first order (∝ eps), so it is never reported as exactly "
              "conserved")

    def build(params):
        from ..laws.groups import NormScaleLaws

        readers = tuple((n, lambda t: t.reshape(1, -1)) for n in names)
        return NormScaleLaws(name, readers, params, producer=site.name, consumer=consumer, reason=reason)

    return build, names, name, site.name


def _positive_norm_order(op: Op) -> bool:
    """The norm ``op`` (``Tensor.norm`` / ``torch.linalg.vector_norm``) is a p-norm, p > 0:
    positively homogeneous of degree 1."""
    order = _arg(op, 1, "ord" if op.name == "linalg_vector_norm" else "p", 2)
    return order in (None, "fro") or (isinstance(order, (int, float)) and order > 0)


def _over_axis(g: OpGraph, v: int, dim: Any, axis: int, keepdim: bool = True) -> bool:
    """``dim`` (of a reduction of ``v``, its result kept as a dimension) is ``axis`` alone."""
    ndim = len(g.shapes[v])
    dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else None
    return keepdim and dims is not None and [d % ndim for d in dims] == [axis]


def _direction_of(g: OpGraph, v: int, axis: int) -> tuple[Op, str] | None:
    """``(op, what)`` when every use of ``v`` only takes its direction over ``axis``:
    ``F.normalize(v, dim=axis)``, one argument of ``F.cosine_similarity(·, ·, dim=axis)``, or
    ``v / n`` with ``n`` a p-norm of ``v`` over that axis (keepdim; maybe ``clamp_min(eps)``)."""
    users = [g.ops[u] for u in g.users.get(v, [])]
    if len(users) == 1:
        op = users[0]
        if op.name == "normalize" and op.args and op.args[0] == Val(v) and _over_axis(g, v, _arg(op, 2, "dim", 1), axis):
            p = _arg(op, 1, "p", 2.0)
            return (op, "F.normalize") if isinstance(p, (int, float)) and p > 0 else None
        if (op.name == "cosine_similarity" and sum(a == Val(v) for a in op.args[:2]) == 1
                and _over_axis(g, v, _arg(op, 2, "dim", 1), axis)):
            return op, "F.cosine_similarity"
        return None
    if len(users) != 2:
        return None
    for norm, divide in (users, users[::-1]):
        n = _norm_of(g, v, norm, axis)
        if n is None:
            continue
        while True:  # a clamp from below of the norm: exact wherever the norm exceeds it
            after = g.users.get(n, [])
            if len(after) != 1:
                return None
            op = g.ops[after[0]]
            if not ((op.name == "clamp_min" or (op.name == "clamp" and _arg(op, 2, "max", None) is None))
                    and op.args[0] == Val(n)):
                break
            n = op.outputs[0]
        if op is divide and op.name in _DIV and len(op.args) == 2 and op.args[0] == Val(v) and op.args[1] == Val(n):
            return op, "x / ‖x‖"
        return None
    return None


def _norm_of(g: OpGraph, v: int, op: Op, axis: int) -> int | None:
    """The value holding a p-norm of ``v`` over ``axis`` (keepdim) that ``op`` starts:
    ``v.norm(...)``, ``torch.linalg.vector_norm(v, ...)``, or by hand, sqrt(Σ v²) (``pow(v, 2)``
    or ``v * v``, ``sum(axis, keepdim=True)``, ``pow(·, 0.5)`` or ``sqrt``, as CLIP writes it)."""
    if not (op.args and op.args[0] == Val(v) and len(op.outputs) == 1):
        return None
    if op.name in ("norm", "linalg_vector_norm"):
        fine = _positive_norm_order(op) and _over_axis(g, v, _arg(op, 2, "dim", None), axis, bool(_arg(op, 3, "keepdim", False)))
        return op.outputs[0] if fine else None
    squared = (op.name in ("pow", "__pow__") and _arg(op, 1, "exponent") == 2) or op.name == "square" or (
        op.name in _MUL and len(op.args) == 2 and op.args[1] == Val(v))
    if not squared:
        return None
    cur = op.outputs[0]
    for step in ("sum", "root"):
        after = g.users.get(cur, [])
        if len(after) != 1:
            return None
        nxt = g.ops[after[0]]
        if not (nxt.args and nxt.args[0] == Val(cur) and len(nxt.outputs) == 1):
            return None
        if step == "sum" and not (nxt.name == "sum" and _over_axis(g, cur, _arg(nxt, 1, "dim", None), axis, bool(_arg(nxt, 2, "keepdim", False)))):
            return None
        if step == "root" and not (nxt.name == "sqrt" or (nxt.name in ("pow", "__pow__") and _arg(nxt, 1, "exponent") == 0.5)):
            return None
        cur = nxt.outputs[0]
    return cur


def normalize_scale_rule(g: OpGraph, states: dict[int, _SiteState]):
    """Exact scale laws before an op that keeps only the direction (see the module docstring):
    yields proposals."""
    for st in states.values():
        site = st.site
        if site.shifts or site.slices:  # the law would not read the whole tensors
            continue
        v, ndim = site.out, len(g.shapes[site.out])
        axis = site.axis % ndim
        last = axis == ndim - 1  # a Linear's units: shape ops that keep the last axis may come between
        while True:
            users = g.users.get(v, [])
            op = g.ops[users[0]] if len(users) == 1 else None
            if op is None or len(op.outputs) != 1 or not (op.args and op.args[0] == Val(v)):
                break
            same = g.shapes[op.outputs[0]] == g.shapes[v]
            if not ((op.name in _HOMOGENEOUS and same) or op.name in _DROPOUT or (op.name in _KEEP and same)
                    or (last and _keeps_last_axis(g, op, v))):
                break
            v = op.outputs[0]  # f(λv) = λᵏ f(v), λ > 0: the direction is unchanged
        if last:
            axis = len(g.shapes[v]) - 1
        if g.shapes[v][axis] != site.units:
            continue
        found = _direction_of(g, v, axis)
        if found is None:
            continue
        op, what = found
        consumer = op.module
        names = tuple(n for n, _ in site.readers)
        reason = (f"exact: {what} in {consumer or 'the model'} (op {op.index}) keeps only the direction of the "
                  f"outputs of {site.name} over their features (through positively homogeneous ops), so scaling "
                  f"the whole layer by λ > 0 changes nothing, the gradient is orthogonal to it, and ‖W‖² + ‖b‖² "
                  "is conserved (where the norm exceeds the op's eps)")
        name = f"{site.name}→{consumer} scale" if consumer else f"{site.name} scale"

        def build(params, name=name, names=names, reason=reason, consumer=consumer or site.name, producer=site.name):
            from ..laws.groups import InvariantScaleLaws

            readers = tuple((n, lambda t: t.reshape(1, -1)) for n in names)
            return InvariantScaleLaws(name, readers, params, producer=producer, consumer=consumer, reason=reason)

        yield build, names, name, site.name
    for vid, pname in g.params.items():  # a weight read only as F.normalize(w, dim=d): per slice
        users = [g.ops[u] for u in g.users.get(vid, [])]
        if len(users) != 1 or users[0].name != "normalize" or not users[0].args or users[0].args[0] != Val(vid):
            continue
        op, shape = users[0], g.shapes[vid]
        dim, p = _arg(op, 2, "dim", 1), _arg(op, 1, "p", 2.0)
        if not (isinstance(dim, int) and -len(shape) <= dim < len(shape) and isinstance(p, (int, float)) and p > 0):
            continue
        dim %= len(shape)
        reason = (f"exact: {pname} is read only through F.normalize over its axis {dim} in {op.module or 'the model'} "
                  f"(op {op.index}): scaling one of its slices along that axis by λ > 0 changes nothing, so the "
                  "gradient is orthogonal to it and its ‖slice‖² is conserved")
        name = f"{pname} scale"

        def build_slices(params, name=name, pname=pname, dim=dim, reason=reason, where=op.module or pname):
            from ..laws.groups import InvariantScaleLaws

            reader = (pname, lambda t, d=dim: t.movedim(d, -1).reshape(-1, t.shape[d]))
            return InvariantScaleLaws(name, (reader,), params, producer=pname, consumer=where, reason=reason)

        yield build_slices, (pname,), name, pname


# ---------------------------------------------------------------------------------------------
# parallel biases
# ---------------------------------------------------------------------------------------------


def _shift_path(model: nn.Module, g: OpGraph, v: int) -> list[int]:
    """The values a shift added to ``v`` reaches unchanged: ``v``, then while the value is read
    by one op alone, through casts, copies, inactive dropout and additions of another term that
    keep its shape (the value is not broadcast); the last one is where the path ends."""
    path = [v]
    while True:
        users = g.users.get(v, [])
        if len(users) != 1:
            return path
        op = g.ops[users[0]]
        if len(op.outputs) != 1 or g.shapes[op.outputs[0]] != g.shapes[v]:
            return path
        first = bool(op.args) and isinstance(op.args[0], Val) and op.args[0].vid == v
        if op.name in _PLUS:
            mine = [a for a in op.args[:2] if isinstance(a, Val) and a.vid == v]
            if len(op.args) < 2 or len(mine) != 1 or _arg(op, 2, "alpha", 1) != 1 or any(
                    isinstance(x, Val) and x.vid == v for x in op.kwargs.values()):
                return path
        elif not ((op.name in _KEEP and first) or (op.name in _DROPOUT and first and not _dropout_active(model, op))):
            return path
        v = op.outputs[0]
        path.append(v)


def parallel_bias_rule(model: nn.Module, g: OpGraph, states: dict[int, _SiteState]):
    """Difference laws of the biases of layers whose outputs are only added together (see the
    module docstring): yields proposals."""
    ends: dict[tuple, list[tuple[_SiteState, str]]] = defaultdict(list)
    for st in states.values():
        site = st.site
        if len(site.readers) != 2 or site.readers[1][1] != "rows":
            continue
        bias = site.readers[1][0]
        shape = g.shapes[site.out]
        bias_vid = next((v for v, n in g.params.items() if n == bias), None)
        if bias_vid is None or g.shapes[bias_vid] != (site.units,) or not shape:
            continue
        end = _shift_path(model, g, site.out)[-1]
        ends[(end, shape, site.axis % len(shape), site.units)].append((st, bias))
    for (end, _, _, _), found in ends.items():
        if len(found) < 2:
            continue
        found.sort(key=lambda e: e[0].site.op)
        (first, a), rest = found[0], found[1:]
        for st, b in rest:
            if b == a:
                continue
            yield _parallel(a, b, first.site.name, st.site.name, g.ops[g.producer(end).index] if g.producer(end) else None)


def _parallel(a: str, b: str, pa: str, pb: str, meet: Op | None):
    name = f"{pa}−{pb} bias difference"
    where = _where(meet) if meet is not None else "the model input"
    reason = (f"the outputs of {pa} and {pb} are only added together (up to {where}): their biases shift the sum "
              f"alike and always get the same gradient, so {a} − {b} (one per unit) are linear laws")

    def build(params):
        from ..laws.groups import DifferenceLaws

        return DifferenceLaws(name, (a, lambda t: t), (b, lambda t: t), params, producer=pa, consumer=pb, reason=reason)

    return build, (a, b), name, pa


# ---------------------------------------------------------------------------------------------
# centered inputs
# ---------------------------------------------------------------------------------------------


def centered_input_rule(g: OpGraph):
    """Row-sum laws of the linear layers that read a LayerNorm's output without affine parameters
    (see the module docstring): yields proposals."""
    for op in g.ops:
        if op.name != "layer_norm" or op.index not in g.live or len(op.outputs) != 1:
            continue
        shape = _arg(op, 1, "normalized_shape")
        if shape is None or len(tuple(shape)) != 1 or _arg(op, 2, "weight") is not None or _arg(op, 3, "bias") is not None:
            continue
        stack, seen = [op.outputs[0]], set()
        while stack:  # the normalized values, through casts and views that keep the features last
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            for u in g.users.get(v, []):
                user = g.ops[u]
                if _keeps_last_axis(g, user, v):
                    stack.append(user.outputs[0])
                    continue
                w = _arg(user, 1, "weight")
                if (user.name == "linear" and user.args and user.args[0] == Val(v) and isinstance(w, Val)
                        and w.vid in g.params and len(g.shapes[w.vid]) == 2 and w != Val(v)):
                    yield _centered_input(g.params[w.vid], op, user)


def _centered_input(weight: str, norm: Op, user: Op):
    name = f"{norm.module or 'layer_norm'}→{_module(weight)} centered input"
    reason = (f"{_where(norm)} normalizes without affine parameters, so the features {_module(weight)} reads sum "
              f"to zero at every position: W → W + a·1ᵀ changes nothing, and the row sums Σ_j {weight}[i, j] "
              "are linear laws")

    def build(params):
        from ..laws.groups import LinearLaws

        return LinearLaws(name, ((weight, lambda w: w.sum(1)),), params, producer=norm.module or "",
                          consumer=_module(weight), reason=reason)

    return build, (weight,), name, _module(weight)
