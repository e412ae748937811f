"""Symmetry rules over a captured op graph → law sites, with a reason for every refusal.

A *site* is the set of units one op produces with trainable weights: the rows of ``F.linear``,
the columns of a ``Conv1D`` weight read by ``torch.addmm`` / ``x @ W``, the output channels of
a convolution, the (γ, β) of a normalization's affine part (``F.layer_norm``,
``F.batch_norm``, ``F.group_norm``, ``F.rms_norm``, or a hand-written RMSNorm: ``weight * x``
with a 1-D parameter). Every site is followed forward through the graph with a *probe*: an
integer tensor shaped like the value, holding at every element the unit it carries (−1 for
none). Shape ops (view, reshape, transpose, permute, flatten, split, chunk, cat, indexing,
head splits and merges, ``repeat_kv``, channel and pixel shuffles) are replayed on the probe, so the feature axis is
followed through any of them. Each op either keeps the symmetry (the probe moves on), ends it
in a consumer, or breaks it (a barrier, whose reason is kept):

* **rescaling** (:mod:`torch_conslaw.laws.families.rescaling`): elementwise positively
  homogeneous ops (ReLU, |x|, x², LeakyReLU) multiply the degree; a product with a factor
  that does not carry the site (a gate σ(g), cos/sin, a mask) keeps per-unit rescaling; an
  addition of two arms carrying the same units keeps it, tying units that meet at one
  position (RoPE's ``q·cos + rotate_half(q)·sin`` ties i with i + d_h/2); reductions,
  pooling and resampling (``interpolate``) over axes that carry no unit keep it, and so do
  pads that copy elements (reflect, replicate, circular) or add zeros; ``glu``
  keeps the units of its first half (the second is its sigmoid gate). A trainable per-feature
  gate γ ⊙ h (LayerScale) consumes the units. Only linear ops keep the mixing of the matrix
  law; an op that acts differently on different slices (``P @ V`` per head) splits its blocks.
* **products of two sites** (:func:`~torch_conslaw.structure.product_rules.product_laws`): where a ⊙ b multiplies units of two sites
  element by element and is the only way of those units to the output, scaling a unit u of
  one by λ and the units w it meets by λ^(−k_a/k_b) is a symmetry whatever reads the product
  (BitNet's relu(gate)² ⊙ up before a norm): ‖w_u‖² − (k_a/k_b)‖w_w‖² per set of units that meet;
* **consumers**: ``F.linear`` / ``addmm`` / ``x @ W`` / a convolution with a trainable weight
  reading the unit axis (its columns become the outgoing rows; the rows of a transposed
  convolution's weight, which is also a site through its columns). A column that reads
  different units at different positions (``pixel_shuffle`` puts r² channels at the r × r
  positions of one) ties them: they share one λ and one law (:func:`_column_classes`);
* **attention** (:mod:`torch_conslaw.laws.families.attention`): a product of two site values
  over their unit axes (``q @ k.transpose``, ``F.scaled_dot_product_attention``, with
  ``enable_gqa``, a dot product ``(u * v).sum(-1)`` or ``einsum('bi,bi->b')`` of two
  layers) pairs query units with key units position by position; the value operand
  of ``P @ V`` / SDPA passes through with one block per head.
* **barriers**: anything else that reads a site value (a non-homogeneous activation, a
  normalization, a residual addition, softmax over the units, ``detach``, the model output).

Laws are then assembled from the events of every unit (:func:`find_graph_laws`); a parameter
read by more than one op (tied embeddings), frozen or shared skips its laws with a reason.

Example:
    >>> import torch
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> pairs, skipped = find_graph_laws(m, torch.randn(5, 4))
    >>> [(p.kind, p.units, p.degree) for p in pairs]
    [('unit', 3, 1.0)]
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from ..catalogue import RowReader
from ..laws.families.rescaling import Columns, Flat, GroupedColumns, Rows, Sliced, Whole
from .finder import Pair, Skipped
from .graph import Op, OpGraph, Val, value_ids, capture

if TYPE_CHECKING:
    from .group_rules import GraphLawGroups

__all__ = ["find_graph_laws", "analyse_graph"]

# ---------------------------------------------------------------------------------------------
# op tables
# ---------------------------------------------------------------------------------------------

_SHAPE = {
    "view", "reshape", "permute", "transpose", "t", "flatten", "unflatten", "expand", "expand_as",
    "view_as", "reshape_as", "__getitem__", "select", "narrow", "split", "chunk", "unbind",
    "squeeze", "unsqueeze", "movedim", "moveaxis", "swapaxes", "swapdims", "repeat",
    "repeat_interleave", "cat", "concat", "concatenate", "stack", "index_select", "get_T",
    "get_mT", "tile", "split_with_sizes", "tensor_split", "flip", "roll", "contiguous", "clone",
    "channel_shuffle", "native_channel_shuffle", "pixel_shuffle", "pixel_unshuffle",
}
_CAST = {"to", "type", "float", "double", "half", "bfloat16", "type_as", "identity"}
_DROPOUT = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}
_HOMOGENEOUS = {"relu": 1.0, "leaky_relu": 1.0, "abs": 1.0, "square": 2.0, "prelu": 1.0, "rrelu": 1.0,
                # in place (F.relu(inplace=True), x.relu_(), x.abs_()): the write is a new value in the
                # graph, and a view of the old one read afterwards refuses the model (graph.stale_reads)
                "relu_": 1.0, "leaky_relu_": 1.0, "abs_": 1.0, "square_": 2.0, "rrelu_": 1.0}
_CLAMPS = {"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_", "threshold", "threshold_", "_threshold"}
_LINEAR_UNARY = {"neg", "negative", "__neg__", "positive", "__pos__"}
# x > 0 and the like: a mask unchanged by a positive rescaling of x (degree 0)
_SIGN_TESTS = {"gt", "ge", "lt", "le", "__gt__", "__ge__", "__lt__", "__le__", "greater", "greater_equal",
               "less", "less_equal"}
_ZERO_MAKERS = {"zeros_like", "zeros", "new_zeros"}
_MUL = {"mul", "__mul__", "__rmul__", "multiply"}
_DIV = {"div", "__truediv__", "true_divide", "divide"}
_ADD = {"add", "__add__", "__radd__", "sub", "__sub__", "subtract"}
_ADD_IN_PLACE = {"add_", "__iadd__", "sub_", "__isub__"}
_MUL_IN_PLACE = {"mul_", "__imul__"}  # y *= x: as y * x on a y that nothing else reads (see _Propagation._fresh)
_SUM = {"sum": True, "mean": True, "amax": False, "max": False, "amin": False, "min": False}
_POOL = {
    "avg_pool1d": True, "avg_pool2d": True, "avg_pool3d": True, "adaptive_avg_pool1d": True,
    "adaptive_avg_pool2d": True, "adaptive_avg_pool3d": True, "max_pool1d": False,
    "max_pool2d": False, "max_pool3d": False, "adaptive_max_pool1d": False,
    "adaptive_max_pool2d": False, "adaptive_max_pool3d": False, "max_pool1d_with_indices": False,
    "max_pool2d_with_indices": False, "max_pool3d_with_indices": False,
    # resampling acts on every channel alike, linearly (nearest, (bi/tri)linear, bicubic, area)
    "interpolate": True, "upsample": True, "upsample_nearest": True, "upsample_bilinear": True,
}
_MATMUL = {"matmul", "__matmul__", "mm", "bmm", "__rmatmul__"}
_NORMS = {"layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "normalize",
          "softmax", "log_softmax", "local_response_norm"}
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones",
               "new_empty", "new_full", "rand_like", "randn_like", "randint_like"}
_CONV = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONV_T = {"conv_transpose1d": 1, "conv_transpose2d": 2, "conv_transpose3d": 3}  # weight [in, out / groups, ...]


def _arg(op: Op, pos: int, name: str, default: Any = None) -> Any:
    if len(op.args) > pos:
        return op.args[pos]
    return op.kwargs.get(name, default)


def _matmul_form(eq: str, operands: int) -> tuple[list[int], list[int], str, str] | str:
    """An einsum equation of two operands read as a batched matrix product ``A @ B``: the axis
    orders that bring A to (batch…, row, k) and B to (batch…, k, column), the output's letters
    and the canonical output letters (batch…, row, column); or why it is not one (a string).
    A dot product (``bi,bi->b``: no free index) is the product of a 1 × k row by a k × 1
    column: its orders bring A and B to (batch…, k) and its canonical letters are the batch's."""
    if operands != 2:
        return f"has {operands} operand(s), not 2"
    if "->" not in eq or "." in eq:
        return "has no explicit output or uses an ellipsis"
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2 or not all(p.isalpha() for p in parts) or not (out.isalpha() or out == ""):
        return "is not of the form ab,cd->ef"
    la, lb = parts
    if any(len(set(x)) != len(x) for x in (la, lb, out)):
        return "repeats an index within one operand (a diagonal or a trace)"
    if set(out) - set(la) - set(lb):
        return "has an output index that no operand has"
    summed = [ch for ch in (la + lb) if ch not in out]
    contracted = [ch for ch in la if ch in lb and ch not in out]
    if set(summed) != set(contracted) or len(contracted) != 1:
        return "does not contract exactly one index shared by both operands (sums or contracts others)"
    k = contracted[0]
    batch = [ch for ch in out if ch in la and ch in lb]
    rows = [ch for ch in out if ch in la and ch not in lb]
    cols = [ch for ch in out if ch in lb and ch not in la]
    if len(rows) > 1 or len(cols) > 1:
        return "keeps several free indices of one operand (not a matrix product)"
    if not rows and not cols:  # a dot product per batch entry
        return [la.index(ch) for ch in batch + [k]], [lb.index(ch) for ch in batch + [k]], out, "".join(batch)
    if not rows or not cols:
        return "is a matrix-vector product (one operand has no free index)"
    order_a, order_b = batch + [rows[0], k], batch + [k, cols[0]]
    canon = "".join(batch + [rows[0], cols[0]])
    return [la.index(ch) for ch in order_a], [lb.index(ch) for ch in order_b], out, canon


def _linear_form(eq: str, param: int) -> tuple[int, str] | str:
    """An einsum of units x and a parameter matrix W (operand ``param``) that is the linear map
    ``x @ W`` or ``x @ Wᵀ`` along one axis of x (``bti,io->bto``, ``bti,oi->bto``): the
    contracted axis of x and the layout of W (``rows``: W is [in, out], ``cols``: [out, in]);
    or why it is not one (a string)."""
    if "->" not in eq or "." in eq or eq.count(",") != 1:
        return "is not of the form ab,cd->ef"
    ins, out = eq.split("->")
    parts = ins.split(",")
    lw, lx = parts[param], parts[1 - param]
    if any(len(set(t)) != len(t) for t in (lx, lw, out)) or len(lw) != 2:
        return "does not read the units with a parameter matrix"
    shared = [ch for ch in lw if ch in lx]
    if len(shared) != 1 or shared[0] in out:
        return "does not contract the units with exactly one axis of the parameter"
    k = shared[0]
    o = lw.replace(k, "")
    if o in lx or sorted(out) != sorted(lx.replace(k, "") + o):
        return "is not a linear map of the units along one axis"
    return lx.index(k), "rows" if lw.index(k) == 0 else "cols"


# ---------------------------------------------------------------------------------------------
# sites, carries, events
# ---------------------------------------------------------------------------------------------


@dataclass
class _Site:
    """Units produced by one op: ``readers`` are (parameter, 'rows' | 'cols') read per unit."""

    sid: int
    op: int
    out: int
    name: str
    units: int
    axis: int
    readers: list[tuple[str, str]]
    mixing: bool  # the producer is a linear map (a matrix law may hold)
    kind: Literal["unit", "channel"]
    shifts: dict[str, float] = field(default_factory=dict)  # a gain read as γ + c: its laws read γ + c
    slices: dict[str, int] = field(default_factory=dict)  # a weight read as W[e] (one expert): its laws read W[e]


@dataclass
class _Carry:
    probe: Tensor
    matrix: bool
    degree: float
    pure: bool = False  # only shape ops, casts, negation or numbers since the site: v ↦ v + b moves alike
    via: frozenset[int] = frozenset()  # the products with another value (a ⊙ b) this carry came through


@dataclass
class _Use:
    """A consumer with a trainable weight reading the units of one site."""

    op: int
    param: str
    layout: str  # 'cols' (Linear / conv weight), 'rows' (Conv1D / x @ W weight) or 'flat' (a gate, flat indices)
    fiber: Tensor  # unit carried at each input position of the contraction
    matrix: bool
    degree: float
    groups: int = 1  # a grouped convolution (layout 'cols'): its weights of input channel i
    slice: int | None = None  # the weight is param[slice] (one expert of a 3-D parameter)


@dataclass
class _Side:
    fibers: Tensor  # [batch, K]: unit of this side at each contraction position, per slice
    matrix: bool
    degree: float
    pure: bool = False  # the factor is the site's output moved by shape ops only (see _Carry)


@dataclass
class _Factor:
    """One factor of an elementwise product a ⊙ b that carries a site's units."""

    sid: int
    operand: int  # 0 for a, 1 for b
    probe: Tensor  # the unit at every element of the product (−1 for none)
    degree: float


@dataclass
class _SiteState:
    site: _Site
    ties: list[int]
    blocks: list[tuple]
    kills: dict[int, str] = field(default_factory=dict)
    uses: list[_Use] = field(default_factory=list)
    gates: list[tuple[int, str, float, int]] = field(default_factory=list)  # scalar gates: op, α, degree, units
    merges: list[tuple[int, Tensor, float, str]] = field(default_factory=list)  # additions to another layer
    reasons: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))  # every barrier of a unit
    # units joined (cat / stack) with units that kept a property they lost: the joined value keeps the
    # property, these units do not (partial rotary: the rotated coordinates of a head, cat with the others)
    unmixed: set[int] = field(default_factory=set)  # lost the mixing of a matrix law
    impure: set[int] = field(default_factory=set)  # moved by more than shape ops (see _Carry.pure)
    # unit → the products a ⊙ b that every route of the unit (each barrier, consumer, score
    # product it reaches) comes through: a product whose other factor is another site's is then
    # the unit's only way to the output (see product_rules.product_laws)
    through: dict[int, frozenset[int]] = field(default_factory=dict)
    # units whose values a reduction over the units (maxout's max over the pieces of a unit)
    # merged into the value of the tie class they joined there: they go on as that class
    absorbed: set[int] = field(default_factory=set)
    # units with a route that is no residual-stream merge (a consumer, a barrier, the output...):
    # after a merge (see _merge_streams) the stream's units still end there too
    elsewhere: set[int] = field(default_factory=set)
    # unit → how many sums or products of two values carrying this site's units it entered (past
    # them the second value's units go on as the first's, tied to them: see _add and _times)
    joined: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # classes of units read through one column at aligned positions (see _column_classes): member
    # k of one class sits where member k of every other sits, so a mixing of the classes is kept
    aligned: set[frozenset[int]] = field(default_factory=set)
    _roots: list[int] | None = None
    _members: dict[int, list[int]] | None = None

    def root(self, u: int) -> int:
        """The tie class of unit ``u`` (ties are final once the propagation has run)."""
        if self._roots is None:
            self._roots = [_find(self.ties, v) for v in range(self.site.units)]
        return self._roots[u]

    def members(self, u: int) -> list[int]:
        """Every unit tied to ``u`` (itself included)."""
        if self._members is None:
            self._members = defaultdict(list)
            for v in range(self.site.units):
                self._members[self.root(v)].append(v)
        return self._members[self.root(u)]


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union(parent: list[int], i: int, j: int) -> None:
    a, b = _find(parent, i), _find(parent, j)
    if a != b:
        parent[max(a, b)] = min(a, b)


def _module_of(param: str) -> str:
    """The module that holds ``param``; the parameter's own name for one of the root module
    (a bare ``nn.Parameter`` gate)."""
    return param.rsplit(".", 1)[0] if "." in param else param


def _find_sites(g: OpGraph, trainable: set[str]) -> tuple[list[_Site], list[Skipped]]:
    sites: list[_Site] = []
    skipped: list[Skipped] = []

    def param(x: Any) -> str | None:
        return g.params.get(x.vid) if isinstance(x, Val) else None

    def add(op: Op, out: int, units: int, axis: int, readers: list[tuple[str, str]], mixing: bool,
            kind: Literal["unit", "channel"], bias: Any = None, shifts: dict[str, float] | None = None,
            slices: dict[str, int] | None = None) -> None:
        slices = dict(slices or {})
        if bias is not None and isinstance(bias, Val) and param(bias) is None and g.slice_of(bias) is None:
            skipped.append(Skipped(_module_of(readers[0][0]), None, (
                f"{readers[0][0]} is used by {op.name} with a bias that is not a parameter: its "
                "units cannot be rescaled")))
            return
        if bias is not None and param(bias) is not None:
            readers = readers + [(param(bias), "rows")]
        elif bias is not None and (part := g.slice_of(bias)) is not None:  # b[e]: the expert's bias
            readers = readers + [(part[0], "rows")]
            slices[part[0]] = part[1]
        first = readers[0][0]  # one expert of a 3-D weight is named by its slice
        name = f"{first}[{slices[first]}]" if first in slices else _module_of(first)
        sites.append(_Site(len(sites), op.index, out, name, units, axis, readers, mixing, kind, dict(shifts or {}), slices))

    for op in g.ops:
        if op.index in g.live and op.name == "multi_head_attention_forward" and op.outputs:
            # its first output is out_proj(heads): unit j is row j of out_proj_weight (+ bias), a
            # linear layer's rows like F.linear's (the head laws inside are the module's own)
            w = param(_arg(op, 11, "out_proj_weight"))
            if w is not None and len(g.shapes[g_vid(op, 11, "out_proj_weight")]) == 2:
                add(op, op.outputs[0], g.shapes[g_vid(op, 11, "out_proj_weight")][0], -1, [(w, "rows")], True,
                    "unit", _arg(op, 12, "out_proj_bias"))
            continue
        if op.index not in g.live or len(op.outputs) != 1:
            continue
        out = op.outputs[0]
        if op.name == "linear":
            w, part = param(_arg(op, 1, "weight")), g.slice_of(_arg(op, 1, "weight"))
            if (w is not None or part is not None) and len(g.shapes[g_vid(op, 1, "weight")]) == 2:
                # W[e]: one expert of a mixture stored as a 3-D parameter, its rows read in W[e]
                name = w if w is not None else part[0]
                add(op, out, g.shapes[g_vid(op, 1, "weight")][0], -1, [(name, "rows")], True, "unit", _arg(op, 2, "bias"),
                    slices=None if w is not None else {name: part[1]})
        elif op.name == "addmm":
            w = param(_arg(op, 2, "mat2"))
            if w is not None and param(_arg(op, 1, "mat1")) is None:
                add(op, out, g.shapes[g_vid(op, 2, "mat2")][1], -1, [(w, "cols")], True, "unit", _arg(op, 0, "input"))
        elif op.name in ("matmul", "__matmul__", "mm"):
            a, b = _arg(op, 0, "input"), _arg(op, 1, "other")
            w = param(b)
            if w is not None and param(a) is None and len(g.shapes[b.vid]) == 2:
                add(op, out, g.shapes[b.vid][1], -1, [(w, "cols")], True, "unit")
            elif param(a) is None and (wt := transposed_param(g, b)) is not None:  # h @ W.T
                units = g.shapes[b.vid][1]
                bias, site_out = None, out  # a following ``+ b`` with a 1-D parameter of the units is its bias
                term = _added_term(g, out)
                if term is not None and param(term[0]) is not None and g.shapes[term[0].vid] == (units,):
                    bias, site_out = term
                add(op, site_out, units, -1, [(wt, "rows")], True, "unit", bias)
        elif op.name in ("embedding", "embedding_bag"):
            # E[ids], or a sum / mean (linear in E) or max (homogeneous) of E's rows per bag:
            # unit j is column j of the table
            w = param(_arg(op, 1, "weight"))
            if w is not None and len(g.shapes[g_vid(op, 1, "weight")]) == 2:
                why = _lookup_option(op)
                if why is not None:
                    skipped.append(Skipped(_module_of(w), None, f"{w} {why}, so no rescaling law starts at it"))
                    continue
                linear = op.name == "embedding" or _arg(op, 6, "mode", "mean") != "max"
                add(op, out, g.shapes[g_vid(op, 1, "weight")][1], -1, [(w, "cols")], linear, "unit")
        elif op.name in _CONV:
            w = param(_arg(op, 1, "weight"))
            if w is not None:
                add(op, out, g.shapes[g_vid(op, 1, "weight")][0], 1, [(w, "rows")], True, "channel", _arg(op, 2, "bias"))
        elif op.name in _CONV_T:  # output channel j: the columns w[:, j] (one group)
            w = param(_arg(op, 1, "weight"))
            if w is not None and _arg(op, 6, "groups", 1) == 1:
                add(op, out, g.shapes[g_vid(op, 1, "weight")][1], 1, [(w, "cols")], True, "channel", _arg(op, 2, "bias"))
        elif op.name in ("layer_norm", "rms_norm"):
            shape = _arg(op, 1, "normalized_shape")
            w, shift = param(_arg(op, 2, "weight")), None
            if w is None and (moved := _shifted(g, _arg(op, 2, "weight"))) is not None:  # γ + 1 (LayerNorm1P)
                w, shift = param(moved[0]), moved[1]
            if w is not None and len(tuple(shape)) == 1:
                bias = _arg(op, 3, "bias") if op.name == "layer_norm" else None
                add(op, out, int(tuple(shape)[0]), -1, [(w, "rows")], False, "unit", bias,
                    {w: shift} if shift is not None else None)
        elif op.name in ("batch_norm", "instance_norm"):
            w = param(_arg(op, 3, "weight"))
            if w is not None:
                add(op, out, g.shapes[g_vid(op, 3, "weight")][0], 1, [(w, "rows")], False, "channel", _arg(op, 4, "bias"))
        elif op.name == "group_norm":
            w = param(_arg(op, 2, "weight"))
            if w is not None:
                add(op, out, g.shapes[g_vid(op, 2, "weight")][0], 1, [(w, "rows")], False, "channel", _arg(op, 3, "bias"))
        elif (op.name in _MUL or op.name in _MUL_IN_PLACE) and len(op.args) == 2:  # γ ⊙ x (x *= γ), γ a 1-D parameter (or a view of one), or (c + γ) ⊙ x
            a, b = op.args
            ga, gb = _gain(g, a, g.shapes[out]), _gain(g, b, g.shapes[out])
            if (ga is None) == (gb is None):
                continue
            gamma, axis, shift = ga if ga is not None else gb
            other_factor = b if ga is not None else a
            if isinstance(other_factor, Val) and other_factor.vid in g.params:
                continue
            n = g.shapes[gamma.vid][0]
            # a following ``+ β`` with a 1-D parameter of the same size, on the same axis, is the affine bias
            beta, site_out = None, out
            term = _added_term(g, out)
            found = _vector_param(g, term[0], g.shapes[out]) if term is not None else None
            if found is not None and found[1] == axis and g.shapes[found[0].vid][0] == n:
                beta, site_out = found[0], term[1]
            add(op, site_out, n, axis - len(g.shapes[out]), [(param(gamma), "rows")], False, "unit", beta,
                {param(gamma): shift} if shift is not None else None)
    return [s for s in sites if all(r[0] in trainable for r in s.readers)], skipped


def _shifted(g: OpGraph, x: Any) -> tuple[Val, float] | None:
    """(v, c) when ``x`` is ``v + c``, ``c + v`` or ``v − c`` for a number c, computed for this
    use alone (its one user is the op reading ``x``): a gain stored as γ and used as 1 + γ
    (Gemma's RMSNorm, Nemotron's ``LayerNorm1P``). ``None`` otherwise."""
    if not isinstance(x, Val) or len(g.users.get(x.vid, [])) != 1:
        return None
    op = g.producer(x.vid)
    if op is None or op.kwargs or len(op.args) != 2 or len(op.outputs) != 1:
        return None
    numbers = [v for v in op.args if isinstance(v, (int, float)) and not isinstance(v, bool)]
    values = [v for v in op.args if isinstance(v, Val)]
    if len(numbers) != 1 or len(values) != 1 or not math.isfinite(numbers[0]):
        return None
    if op.name in ("add", "__add__", "__radd__"):
        return values[0], float(numbers[0])
    if op.name in ("sub", "__sub__", "subtract") and isinstance(op.args[0], Val):
        return values[0], -float(numbers[0])
    return None


def _gain(g: OpGraph, x: Any, out: tuple[int, ...]) -> tuple[Val, int, float | None] | None:
    """A per-feature gain of ``out``: (the 1-D parameter, its axis, None) for γ or a view of it
    (:func:`_vector_param`), (…, c) for γ + c; ``None`` otherwise."""
    found = _vector_param(g, x, out)
    if found is not None:
        return found[0], found[1], None
    moved = _shifted(g, x)
    if moved is None or g.shapes[moved[0].vid] != g.shapes[x.vid]:
        return None
    found = _vector_param(g, moved[0], out)
    return None if found is None else (found[0], found[1], moved[1])


def _lookup_option(op: Op) -> str | None:
    """Why the gradient of a lookup (``embedding``: E[ids]; ``embedding_bag``: a sum, mean or
    max of E's rows per bag) is not that of its forward (``padding_idx``, ``max_norm``,
    ``scale_grad_by_freq``, per-sample weights of a max), or None."""
    bag = op.name == "embedding_bag"
    if _arg(op, 10 if bag else 2, "padding_idx") is not None:
        return "has a padding_idx: its padding row gets no gradient although the forward reads it"
    if _arg(op, 3, "max_norm") is not None:
        return "has a max_norm: the forward renormalizes the rows it reads, in place"
    if _arg(op, 5, "scale_grad_by_freq", False):
        return "has scale_grad_by_freq: its gradient is rescaled per token"
    if bag and _arg(op, 8, "per_sample_weights") is not None and _arg(op, 6, "mode", "mean") == "max":
        return "has per-sample weights in max mode"
    return None


def _added_term(g: OpGraph, out: int) -> tuple[Any, int] | None:
    """(the other term, the sum) when the one use of ``out`` is an addition of two terms: a
    bias added after a layer; ``None`` otherwise."""
    users = g.users.get(out, [])
    if len(users) != 1 or g.ops[users[0]].name not in ("add", "__add__", "__radd__") or len(g.ops[users[0]].args) != 2:
        return None
    other = [x for x in g.ops[users[0]].args if not (isinstance(x, Val) and x.vid == out)]
    return (other[0], g.ops[users[0]].outputs[0]) if other else None


def _param_behind(g: OpGraph, x: Any, ops: set[str]) -> tuple[int, list[Op]] | None:
    """The parameter (its value id) that ``x`` is, or that it reaches back through the ops
    ``ops`` alone, each of one output reading it as its first argument, with those ops (the
    last first); ``None`` otherwise."""
    if not isinstance(x, Val):
        return None
    chain, v = [], x.vid
    while v not in g.params:
        op = g.producer(v)
        if op is None or op.name not in ops or not op.args or not isinstance(op.args[0], Val) or len(op.outputs) != 1:
            return None
        chain.append(op)
        v = op.args[0].vid
    return v, chain


def _vector_param(g: OpGraph, x: Any, out: tuple[int, ...]) -> tuple[Val, int] | None:
    """A 1-D parameter of n entries that ``x`` is, or a view of it (``view`` / ``reshape`` /
    ``unsqueeze``) of ones but n on one axis, broadcast along the axis of ``out`` of size n:
    (the parameter, that axis of ``out``); ``None`` otherwise."""
    behind = _param_behind(g, x, {"view", "reshape", "unsqueeze"} | _CAST)  # γ.to(float32) (Cohere's norm)
    if behind is None:
        return None
    v = behind[0]
    shape, seen = g.shapes[v], g.shapes[x.vid]
    if len(shape) != 1 or shape[0] < 1 or len(seen) > len(out):
        return None
    wide = [d for d, k in enumerate(seen) if k != 1]
    if len(wide) != 1 and not (shape[0] == 1):
        return None
    axis = len(out) - len(seen) + (wide[0] if wide else len(seen) - 1)
    if seen and seen[axis - len(out) + len(seen)] != shape[0] or out[axis] != shape[0]:
        return None
    return Val(v), axis


def _param_entries(g: OpGraph, v: int, chain: list[Op], shape: tuple[int, ...], sub: Any = lambda a: a) -> Tensor | None:
    """At every element of a value of ``shape``, the flat index of the entry of parameter ``v``
    it reads through the shape ops ``chain`` (last first, as :func:`_param_behind` returns
    them), replayed on the parameter's indices (``sub`` maps the ops' other arguments); None
    when a shape op cannot be replayed on indices."""
    index = torch.arange(math.prod(g.shapes[v])).view(g.shapes[v])
    try:
        for op in reversed(chain):
            index = op.func(index, *sub(op.args[1:]), **sub(op.kwargs))
        return torch.broadcast_to(index, shape)
    except Exception:  # a shape op that cannot be replayed on indices
        return None


def g_vid(op: Op, pos: int, name: str) -> int:
    x = _arg(op, pos, name)
    assert isinstance(x, Val)
    return x.vid


def transposed_param(g: OpGraph, x: Any) -> str | None:
    """The 2-D parameter W when ``x`` is Wᵀ (``W.T``, ``W.t()``, ``W.mT``, ``W.transpose(0, 1)``)
    read by one op only: ``h @ W.T`` is then a Linear layer (Falcon's ``FalconLinear``)."""
    if not isinstance(x, Val) or len(g.users.get(x.vid, [])) != 1:
        return None
    op = g.producer(x.vid)  # live: its one user is
    if op is None or len(op.outputs) != 1 or not op.args or not isinstance(op.args[0], Val):
        return None
    w = op.args[0].vid
    if w not in g.params or len(g.shapes[w]) != 2:
        return None
    if op.name in ("get_T", "t", "get_mT", "numpy_T"):
        return g.params[w]
    if op.name in ("transpose", "swapaxes", "swapdims"):
        dims = {_arg(op, 1, "dim0"), _arg(op, 2, "dim1")}
        return g.params[w] if dims in ({0, 1}, {-1, -2}, {0, -1}, {-2, 1}) else None
    return None


# ---------------------------------------------------------------------------------------------
# propagation of one site
# ---------------------------------------------------------------------------------------------


_OUTPUT = "the units reach the model output"  # the last layer: no law, and nothing to report


class _Barrier(Exception):
    pass


class _Merge(_Barrier):
    """An addition of the units to the output of another layer (a residual stream): a barrier
    for this site alone; two such sites meeting there may be merged (:func:`_merge_streams`)."""

    def __init__(self, message: str, op: int, probe: Tensor, degree: float) -> None:
        super().__init__(message)
        self.op, self.probe, self.degree = op, probe, degree


_MERGED = "merged into a residual stream"  # the units live on in a merged site: nothing to report


def _varying_axes(p: Tensor) -> list[int]:
    """Axes along which the probe changes (the axes that carry units)."""
    axes = []
    for d in range(p.dim()):
        if p.shape[d] > 1 and not bool((p == p.narrow(d, 0, 1)).all()):
            axes.append(d)
    return axes


def _units(p: Tensor) -> list[int]:
    return torch.unique(p[p >= 0]).tolist()


class _Propagation:
    """Follows one site through the graph (see the module docstring)."""

    def __init__(self, g: OpGraph, site: _Site, sides: dict[int, dict[str, list[tuple[int, _Side]]]],
                 trainable: frozenset[str] = frozenset(), products: dict[int, list[_Factor]] | None = None) -> None:
        self.g = g
        self.trainable = trainable  # parameters that can take part in a rescaling (a gate)
        self.st = _SiteState(site, list(range(site.units)), [()] * site.units)
        self.sides = sides  # op index → {'A' | 'B': side}, shared by all propagations
        self.products = {} if products is None else products  # op index → factors of a ⊙ b, shared too
        self.state: dict[int, _Carry] = {}
        self._via: frozenset[int] = frozenset()  # the products every input of the current op came through

    def run(self) -> _SiteState:
        site, g = self.st.site, self.g
        shape = g.shapes[site.out]
        axis = site.axis % len(shape)
        view = [1] * len(shape)
        view[axis] = site.units
        probe = torch.arange(site.units).view(view).expand(shape).contiguous()
        self.state[site.out] = _Carry(probe, site.mixing, 1.0, True)
        start = g.producers[site.out] + 1
        for op in g.ops[start:]:
            if op.index not in g.live:
                continue
            carried = [v for v in op.inputs if v in self.state]
            if not carried:
                continue
            try:
                self.step(op, carried)
            except _Barrier as err:
                reason = f"{self._op_text(op)}: {err}"
                if isinstance(err, _Merge):
                    self.st.merges.append((err.op, err.probe, err.degree, reason))
                for v in carried:
                    self.kill(self.state[v].probe, reason, self.state[v].via, isinstance(err, _Merge))
            except Exception as err:  # a rule that cannot read this op's arguments: the units stop here, no other law is lost
                reason = f"{self._op_text(op)}: could not follow the units through it ({type(err).__name__}: {err})"
                for v in carried:
                    self.kill(self.state[v].probe, reason, self.state[v].via)
        for v in g.outputs:
            if v in self.state:
                self.kill(self.state[v].probe, _OUTPUT, self.state[v].via)
        return self.st

    def kill(self, probe: Tensor, reason: str, via: frozenset[int], merge: bool = False) -> None:
        for u in self.route(probe, via, merge):
            self.st.kills.setdefault(u, reason)
            self.st.reasons[u].add(reason)

    def route(self, probe: Tensor, via: frozenset[int], merge: bool = False) -> list[int]:
        """Note that the units of ``probe`` end here (a barrier, a consumer, a score product,
        an add that may merge residual streams), having come through the products ``via``;
        returns those units."""
        units = _units(probe)
        for u in units:
            self.st.through[u] = self.st.through[u] & via if u in self.st.through else via
        if not merge:
            self.st.elsewhere.update(units)
        return units

    def _op_text(self, op: Op) -> str:
        where = f" in {op.module}" if op.module else ""
        return f"{op.name}{where} (op {op.index})"

    def refine(self, probe: Tensor, batch_dims: int) -> None:
        """Split the mixing blocks by the slices of the leading ``batch_dims`` axes."""
        flat = probe.reshape(-1, *probe.shape[batch_dims:]).reshape(probe.shape[:batch_dims].numel(), -1)
        member: dict[int, list[int]] = defaultdict(list)
        for s in range(flat.shape[0]):
            for u in _units(flat[s]):
                member[u].append(s)
        for u, slices in member.items():
            self.st.blocks[u] = self.st.blocks[u] + (tuple(slices),)

    def sub(self, obj: Any) -> Any:
        """Arguments with carried values replaced by probes, others by −1 probes / constants."""
        if isinstance(obj, Val):
            c = self.state.get(obj.vid)
            if c is not None:
                return c.probe
            if obj.vid in self.g.consts:
                return self.g.consts[obj.vid]
            return torch.full(self.g.shapes[obj.vid], -1, dtype=torch.long)
        if isinstance(obj, tuple):
            return tuple(self.sub(o) for o in obj)
        if isinstance(obj, list):
            return [self.sub(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self.sub(v) for k, v in obj.items()}
        return obj

    def emit(self, op: Op, out: Any, matrix: bool, degree: float, pure: bool = False,
             via: frozenset[int] | None = None) -> None:
        """Carry the probes of ``out`` (matching the op's outputs) onward."""
        via = self._via if via is None else via
        probes = [out] if isinstance(out, Tensor) else [o for o in _flat(out) if isinstance(o, Tensor)]
        if len(probes) != len(op.outputs):
            raise _Barrier("could not follow the units through it")
        for v, p in zip(op.outputs, probes):
            if tuple(p.shape) != self.g.shapes[v]:
                raise _Barrier("could not follow the units through it (shape mismatch)")
            if bool((p >= 0).any()):
                self.state[v] = _Carry(p.contiguous(), matrix, degree, pure, via)

    def _fresh(self, op: Op) -> bool:
        """The tensor ``op`` modifies in place is read by ``op`` alone and is no view of
        another value (so no other reader sees the change)."""
        x = op.args[0] if op.args else None
        if not isinstance(x, Val) or x.vid in self.g.params or self.g.users.get(x.vid, []) != [op.index]:
            return False
        made = self.g.producer(x.vid)
        return made is not None and made.name not in _SHAPE and made.name not in ("contiguous", "clone")

    def step(self, op: Op, carried: list[int]) -> None:
        name = op.name
        if (name in _ADD_IN_PLACE or name in _MUL_IN_PLACE or name in _HOMOGENEOUS or name in _CLAMPS) and self._fresh(op):
            pass  # y += x, y *= x, y.relu_() on a y that nothing else reads or aliases: as out of place (HF ResNet's residual)
        elif name.endswith("_") and not name.endswith("__") or name in _ADD_IN_PLACE:
            raise _Barrier("an in-place op on the units")
        cs = [self.state[v] for v in carried]
        self._via = frozenset.intersection(*(c.via for c in cs))
        matrix = all(c.matrix for c in cs)
        degree = cs[0].degree
        pure = all(c.pure for c in cs)
        if name in _SHAPE_ONLY:
            return
        if name == "detach":
            raise _Barrier("detach stops the gradient")
        if name in _SHAPE or name in _CAST or name in _DROPOUT:
            if any(c.degree != degree for c in cs):
                raise _Barrier("joins units of different homogeneity degrees")
            if len(cs) > 1 and name in _SHAPE:  # cat / stack: each part keeps its own properties, per unit
                if not matrix and any(c.matrix for c in cs):
                    for c in cs:
                        if not c.matrix:
                            self.st.unmixed.update(_units(c.probe))
                    matrix = True
                if not pure and any(c.pure for c in cs):
                    for c in cs:
                        if not c.pure:
                            self.st.impure.update(_units(c.probe))
                    pure = True
            if name in _CAST or name in _DROPOUT:
                first = self.state[carried[0]].probe
                if len(carried) != 1 or not (isinstance(op.args[0], Val) and op.args[0].vid == carried[0]):
                    if name in ("type_as", "to") and not (isinstance(op.args[0], Val) and op.args[0].vid in self.state):
                        return  # x.type_as(units), x.to(units): the units lend their dtype only, none of their values
                    raise _Barrier("the units are not its main input")
                # dropout in training multiplies each element by its own mask: per-unit only
                self.emit(op, first, matrix and name not in _DROPOUT, degree, pure and name not in _DROPOUT)
                return
            try:
                out = op.func(*self.sub(op.args), **self.sub(op.kwargs))
            except Exception as err:  # a replay that fails is a refusal, not a crash
                raise _Barrier(f"could not replay it on the unit probe ({type(err).__name__})") from err
            self.emit(op, out, matrix, degree, pure)
            return
        if name in _LINEAR_UNARY:
            self.emit(op, cs[0].probe, matrix, degree, pure)
            return
        if name in _HOMOGENEOUS or name in _CLAMPS or name == "pow":
            k = self._homogeneous_degree(op)
            self.emit(op, cs[0].probe, False, degree * k)
            return
        if name in _MUL or name in _DIV or name in _MUL_IN_PLACE:
            self._mul(op, carried, name in _DIV)
            return
        if name == "glu":
            self._glu(op, carried)
            return
        if name in _ADD or name in _ADD_IN_PLACE:  # x += y is recorded as a new value (graph.py)
            self._add(op, carried)
            return
        if name in _SUM:
            self._reduce(op, carried, _SUM[name])
            return
        if name in _POOL:
            self._pool(op, carried, _POOL[name])
            return
        if name == "pad":
            self._pad(op, carried)
            return
        if name in _NORMS:
            raise _Barrier(f"{name} renormalizes the units (their rescaling is only approximately a symmetry)")
        if name in ("linear", "addmm") or name in _CONV or name in _CONV_T:
            self._consume(op, carried)
            return
        if name in _MATMUL:
            self._matmul(op, carried)
            return
        if name == "einsum":
            self._einsum(op)
            return
        if name == "scaled_dot_product_attention":
            self._sdpa(op, carried)
            return
        if name in _SIGN_TESTS:  # x > 0: ReLU written as x * (x > 0) or torch.where(x > 0, x, 0)
            self._sign_test(op)
            return
        if name == "where":
            self._where(op)
            return
        if name in ("maximum", "fmax", "max") and len(op.args) + len(op.kwargs) == 2:  # torch.maximum(x, 0)
            self._max_with_zero(op)
            return
        if name == "__setitem__":  # x[i] = v, x[i].copy_(v), recorded out of place (graph.filled)
            self._setitem(op)
            return
        raise _Barrier(f"{name} is not known to keep the rescaling of the units")

    def _setitem(self, op: Op) -> None:
        """base′ = base with base[index] = src: each operand's units stay where they are kept or
        written (a key assembled in a fresh buffer from two layers' parts); the positions
        overwritten by a value of no unit carry none."""
        base, index, src = op.args
        for v in value_ids(index):
            if v in self.state:
                raise _Barrier("the units index the write")
            if v not in self.g.consts:
                raise _Barrier("writes at positions the graph did not keep")
        cs = [self.state[x.vid] for x in (base, src) if isinstance(x, Val) and x.vid in self.state]
        if len({c.degree for c in cs}) > 1:
            raise _Barrier("joins units of different homogeneity degrees")
        shape = self.g.shapes[op.outputs[0]]
        out = self.state[base.vid].probe.clone() if base.vid in self.state else torch.full(shape, -1, dtype=torch.long)
        written = self.state[src.vid].probe if isinstance(src, Val) and src.vid in self.state else torch.tensor(-1)
        try:
            out[self.sub(index)] = written
        except Exception as err:  # a replay that fails is a refusal, not a crash
            raise _Barrier(f"could not replay it on the unit probe ({type(err).__name__})") from err
        self.emit(op, out, all(c.matrix for c in cs), cs[0].degree)

    # -- ReLU written by hand -----------------------------------------------------------------

    def _is_zero(self, obj: Any) -> bool:
        """A literal 0, a one-element constant 0, or a tensor of zeros made as such."""
        if isinstance(obj, (int, float)) and not isinstance(obj, bool):
            return obj == 0
        if not isinstance(obj, Val) or obj.vid in self.state or obj.vid in self.g.params:
            return False
        if self.g.scalars.get(obj.vid) == 0.0:
            return True
        const = self.g.consts.get(obj.vid)
        if const is not None:
            return bool((const == 0).all())
        made = self.g.producer(obj.vid)
        return made is not None and made.name in _ZERO_MAKERS and not made.kwargs.get("fill_value")

    def _against_zero(self, op: Op) -> _Carry | None:
        """The units of a two-operand op whose other operand is 0 (either order), or None."""
        a, b = _arg(op, 0, "input"), _arg(op, 1, "other")
        units, other = (a, b) if isinstance(a, Val) and a.vid in self.state else (b, a)
        if isinstance(units, Val) and units.vid in self.state and self._is_zero(other):
            return self.state[units.vid]
        return None

    def _sign_test(self, op: Op) -> None:
        """``x > 0`` (or ``0 < x``, ≥, <, ≤): a mask that a positive rescaling of x leaves
        unchanged, carried with degree 0; a comparison with anything else is a barrier."""
        carry = self._against_zero(op)
        if carry is None:
            raise _Barrier("compares the units with a value other than 0 (not kept by their rescaling)")
        self.emit(op, carry.probe.expand(self.g.shapes[op.outputs[0]]), False, 0.0)

    def _where(self, op: Op) -> None:
        """``torch.where(m, x, y)`` with m a degree-0 mask (``x > 0``) and x, y the units of one
        degree or zeros: the result scales like the units it takes (ReLU, leaky ReLU by hand)."""
        cond, x, y = _arg(op, 0, "condition"), _arg(op, 1, "input"), _arg(op, 2, "other")
        shape = self.g.shapes[op.outputs[0]]
        mask = self.state.get(cond.vid) if isinstance(cond, Val) else None
        if mask is None or mask.degree != 0.0:
            raise _Barrier("selects by a condition that is not a sign test of the units")
        branches = [b for b in (x, y) if not self._is_zero(b)]
        carries = [self.state.get(b.vid) if isinstance(b, Val) else None for b in branches]
        if not branches or any(c is None for c in carries) or len({c.degree for c in carries}) != 1:
            raise _Barrier("selects between values that do not scale alike with the units")
        probes = [c.probe.expand(shape) for c in carries]
        if len(probes) == 2 and not torch.equal(probes[0], probes[1]):
            raise _Barrier("selects between values of different units")
        if not torch.equal((probes[0] >= 0), (mask.probe.expand(shape) >= 0)):
            raise _Barrier("selects by a condition on other positions than the units")
        self.emit(op, probes[0], False, carries[0].degree)

    def _max_with_zero(self, op: Op) -> None:
        """``torch.maximum(x, 0)`` (or ``max`` / ``fmax``): ReLU."""
        carry = self._against_zero(op)
        if carry is None:
            raise _Barrier(f"{op.name} with anything but 0 is not positively homogeneous")
        self.emit(op, carry.probe.expand(self.g.shapes[op.outputs[0]]), False, carry.degree)

    # -- elementwise ------------------------------------------------------------------------

    def _homogeneous_degree(self, op: Op) -> float:
        if op.name == "pow":
            p = _arg(op, 1, "exponent")
            if isinstance(p, (int, float)) and p > 0 and float(p).is_integer():
                return float(p)
            raise _Barrier("a power that is not a positive integer is not positively homogeneous")
        if op.name in ("clamp", "clamp_", "clip", "clip_"):
            lo, hi = _arg(op, 1, "min"), _arg(op, 2, "max")
            if lo == 0 and hi is None:
                return 1.0
            raise _Barrier(f"{op.name} with bounds other than min=0 is not positively homogeneous")
        if op.name in ("clamp_min", "clamp_min_"):
            if _arg(op, 1, "min") == 0:
                return 1.0
            raise _Barrier(f"{op.name} with a bound other than 0 is not positively homogeneous")
        if op.name in ("threshold", "threshold_", "_threshold"):  # F.threshold(x, t, v): x where x > t, else v
            if _arg(op, 1, "threshold") == 0 and _arg(op, 2, "value") == 0:
                return 1.0
            raise _Barrier(f"{op.name} with a threshold or value other than 0 is not positively homogeneous")
        if op.name == "leaky_relu" or op.name == "prelu" or op.name == "rrelu":
            if op.name == "prelu" and not isinstance(_arg(op, 1, "weight"), Val):
                raise _Barrier("prelu without a weight tensor")
        return _HOMOGENEOUS[op.name]

    def _operands(self, op: Op) -> tuple[Any, Any]:
        a, b = _arg(op, 0, "input"), _arg(op, 1, "other")
        if op.name in ("__rmul__", "__radd__"):
            a, b = b, a
        return a, b

    def _probe_of(self, x: Any, shape: tuple[int, ...]) -> Tensor | None:
        if isinstance(x, Val) and x.vid in self.state:
            return self.state[x.vid].probe.expand(shape)
        return None

    def _mul(self, op: Op, carried: list[int], divide: bool) -> None:
        a, b = self._operands(op)
        shape = self.g.shapes[op.outputs[0]]
        if not divide and self._dot_product(op, a, b, shape):
            return
        self._times(op, a, b, self._probe_of(a, shape), self._probe_of(b, shape), shape, divide)

    def _dot_product(self, op: Op, a: Any, b: Any, shape: tuple[int, ...]) -> bool:
        """``(a * b).sum(-1)`` (or ``.mean(-1)``), the product read by nothing else: a dot product
        over the last axis of two values of one shape, one of them carrying this site's units and
        the other none of them (and no parameter). Registered as one side of a score product, as
        ``einsum('bi,bi->b', a, b)`` is (the sum's op keys it), so two layers multiplied this way
        get the matrix law of their GL symmetry (a two-tower model, a matrix factorization
        U[i] · V[j]), not only its diagonal. True when taken."""
        g = self.g
        users = g.users.get(op.outputs[0], [])
        if op.name not in _MUL or len(users) != 1 or not (isinstance(a, Val) and isinstance(b, Val)):
            return False
        total = g.ops[users[0]]
        dim = _arg(total, 1, "dim")
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else []
        if (total.name not in ("sum", "mean") or not total.args or total.args[0] != Val(op.outputs[0]) or len(shape) < 2
                or [d % len(shape) for d in dims] != [len(shape) - 1] or _arg(total, 3, "dtype") is not None):
            return False
        if g.shapes[a.vid] != shape or g.shapes[b.vid] != shape or (a.vid in self.state) == (b.vid in self.state):
            return False
        mine, other = (a, b) if a.vid in self.state else (b, a)
        if _param_behind(g, other, _SHAPE) is not None:
            return False
        c = self.state[mine.vid]
        self._side(total, "A" if mine is a else "B", c, c.probe.expand(shape), tuple(shape[:-1]))
        return True

    def _times(self, op: Op, a: Any, b: Any, pa: Tensor | None, pb: Tensor | None, shape: tuple[int, ...],
               divide: bool, aligned: dict[int, tuple[int, ...]] | None = None) -> None:
        """``a * b`` (``a / b``) with the probes ``pa``, ``pb`` of the operands at every element of
        the product (None: the operand carries no unit); ``aligned``: value id → its shape with the
        axes of the product (size 1 where it has none), when not broadcast from the right (einsum)."""
        if divide and pb is not None:
            raise _Barrier("divides by the units")
        if pa is not None and pb is not None:
            ca, cb = self.state[a.vid], self.state[b.vid]
            if bool(((pa >= 0) != (pb >= 0)).any()):
                raise _Barrier("multiplies units by values that do not carry them")
            for u, w in torch.stack([pa[pa >= 0], pb[pb >= 0]], 1).unique(dim=0).tolist():
                _union(self.st.ties, u, w)
            units_a, units_b = set(_units(pa)), set(_units(pb))
            for x in units_a | units_b:
                self.st.joined[x] += 1
            via = None
            if not units_a & units_b:
                # two disjoint sets of units of this site multiplied (W x .chunk(2) → a ⊙ b): a
                # product of two factors (see product_rules.product_laws); the units of b go on tied to a's
                sid = self.st.site.sid
                self.products.setdefault(op.index, []).extend([_Factor(sid, 0, pa, ca.degree), _Factor(sid, 1, pb, cb.degree)])
                via = self._via | {op.index}
            self.emit(op, pa, False, ca.degree + cb.degree, via=via)
            return
        carry = self.state[a.vid] if pa is not None else self.state[b.vid]
        other = b if pa is not None else a
        probe = pa if pa is not None else pb
        gate = None if divide else self._gate_entries(other, probe)
        if gate is not None and math.prod(self.g.shapes[gate[2]]) > 1:  # γ ⊙ h: γ_j → γ_j / λ undoes h_u → λ h_u
            fiber = _gate_fiber(gate[1], probe)
            if fiber is not None:
                # γ's entries are its flat indices: read along axis 0 only when that is the same
                # (a [C] or [C, 1, 1] γ); a [1, C, 1, 1] or [T, C] γ is read flattened
                gshape = self.g.shapes[gate[2]]
                layout = "rows" if math.prod(gshape[1:]) == 1 else "flat"
                self.route(probe, carry.via)
                self.st.uses.append(_Use(op.index, gate[0], layout, fiber, False, carry.degree))
                return
        elif gate is not None:  # α · h: a constant factor per unit, and one more law
            self.st.gates.append((op.index, gate[0], carry.degree, len(self.route(probe, carry.via))))
        matrix = carry.matrix
        if isinstance(other, Val):
            oshape = (aligned or {}).get(other.vid, self.g.shapes[other.vid])
            if len(oshape) > 0:
                padded = (1,) * (len(shape) - len(oshape)) + tuple(oshape)
                if any(padded[d] > 1 for d in _varying_axes(probe)):
                    matrix = False  # a factor that varies across the units: per-unit only
        elif not isinstance(other, (int, float)):
            raise _Barrier(f"multiplies the units by {type(other).__name__}")
        # a number, or a tensor holding one value (DeBERTa's ``k / scale`` with a 0-d scale), scales a
        # shift of the units alike at every position (a tensor of several values may not)
        single = isinstance(other, (int, float)) or (isinstance(other, Val) and math.prod(self.g.shapes[other.vid]) == 1)
        via = None
        if gate is None and not divide and isinstance(other, Val) and other.vid not in self.g.params:
            # a ⊙ b: b may carry another site's units (see product_rules.product_laws)
            self.products.setdefault(op.index, []).append(_Factor(self.st.site.sid, 0 if pa is not None else 1, probe, carry.degree))
            via = carry.via | {op.index}
        self.emit(op, probe.contiguous(), matrix, carry.degree, carry.pure and single, via)

    def _glu(self, op: Op, carried: list[int]) -> None:
        """``F.glu(x, dim)`` = a ⊙ σ(b) for the halves a, b of x: the units of a go on (a product
        with a gate); those of b end (σ is not positively homogeneous)."""
        if len(carried) != 1 or not (isinstance(op.args[0], Val) and op.args[0].vid == carried[0]):
            raise _Barrier("the units are not its input")
        c = self.state[carried[0]]
        dim = _arg(op, 1, "dim", -1) % c.probe.dim()
        kept, gate = c.probe.chunk(2, dim)
        self.kill(gate, f"{self._op_text(op)}: the gate half of glu passes through a sigmoid, which is not "
                        "positively homogeneous", c.via)
        self.emit(op, kept.contiguous(), False, c.degree)

    def _gate_entries(self, other: Any, probe: Tensor) -> tuple[str, Tensor, int] | None:
        """A trainable parameter γ that ``other`` is, or reaches through shape ops only (a
        per-channel gate ``γ.view(1, -1, 1, 1)``, LayerScale's γ, a scalar α), and at every
        element of the product the index of the γ entry that multiplies it (replayed on γ's
        indices), and γ's value id; ``None`` otherwise."""
        behind = _param_behind(self.g, other, _SHAPE)
        if behind is None:
            return None
        v, chain = behind
        name = self.g.params[v]
        if name not in self.trainable:
            return None
        index = _param_entries(self.g, v, chain, tuple(probe.shape), self.sub)
        return None if index is None else (name, index, v)

    def _add(self, op: Op, carried: list[int]) -> None:
        a, b = self._operands(op)
        shape = self.g.shapes[op.outputs[0]]
        pa, pb = self._probe_of(a, shape), self._probe_of(b, shape)
        if pa is None or pb is None:
            message = ("adds a term that does not scale with the units (a residual or skip connection, "
                       "a bias or a constant): no law crosses it")
            mine, other = (a, b) if pa is not None else (b, a)
            probe = pa if pa is not None else pb
            if (op.name in ("add", "__add__", "__radd__", "add_", "__iadd__") and isinstance(other, Val) and probe is not None
                    and tuple(self.g.shapes[other.vid]) == tuple(shape) == tuple(self.g.shapes[mine.vid])):
                raise _Merge(message, op.index, probe, self.state[mine.vid].degree)
            raise _Barrier(message)
        ca, cb = self.state[a.vid], self.state[b.vid]
        if ca.degree != cb.degree:
            raise _Barrier("adds units of different homogeneity degrees")
        if bool(((pa >= 0) != (pb >= 0)).any()):
            raise _Barrier("adds units to values that do not carry them")
        same = bool((pa == pb).all())
        for x in set(_units(pa)) | set(_units(pb)):
            self.st.joined[x] += 1
        if not same:
            for u, w in torch.stack([pa[pa >= 0], pb[pb >= 0]], 1).unique(dim=0).tolist():
                _union(self.st.ties, u, w)
        self.emit(op, pa.contiguous(), ca.matrix and cb.matrix and same, ca.degree)

    def _reduce(self, op: Op, carried: list[int], linear: bool) -> None:
        if len(carried) != 1 or not (isinstance(op.args[0], Val) and op.args[0].vid == carried[0]):
            raise _Barrier("the units are not its main input")
        c = self.state[carried[0]]
        dim = _arg(op, 1, "dim")
        if op.name in ("max", "min") and isinstance(dim, (Val, float)):  # torch.max(x, y): elementwise, not a reduction
            if op.name == "max":
                self._max_with_zero(op)
                return
            raise _Barrier("an elementwise minimum with another value")
        if dim is None or isinstance(dim, torch.dtype):
            raise _Barrier("reduces over every axis, including the units")
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = [d % c.probe.dim() for d in dims]
        keep = bool(_arg(op, 2, "keepdim", False))
        if set(dims) & set(_varying_axes(c.probe)):
            # a sum or mean is mostly a norm's statistics: the barrier names the reduction; past a
            # product with another value (a ⊙ b).amax(-1), the product's own laws hold unit by unit,
            # and a tie here would only take them away
            if op.name in ("sum", "mean") or c.via:
                raise _Barrier("reduces over the axis that carries the units (it mixes them)")
            self._reduce_units(op, c, dims, keep)
            return
        out = c.probe
        for d in sorted(dims, reverse=True):
            out = out.narrow(d, 0, 1)
            if not keep:
                out = out.squeeze(d)
        self._emit_reduced(op, out, c.matrix and linear, c.degree)

    def _emit_reduced(self, op: Op, probe: Tensor, matrix: bool, degree: float) -> None:
        """Carry a reduction's result on; with its indices too (x.max(dim)), which carry no unit:
        the positions of the maxima do not move when a unit is scaled by λ > 0."""
        if len(op.outputs) == 2:
            self.emit(op, (probe, torch.full(probe.shape, -1, dtype=torch.long)), False, degree)
        else:
            self.emit(op, probe, matrix, degree)

    def _reduce_units(self, op: Op, c: _Carry, dims: list[int], keep: bool) -> None:
        """A max or min over an axis that carries units (maxout: h.view(n, C, k).max(-1)):
        scaling every unit it reduces together by the same λ > 0 scales the result by λ, so those
        units are tied, and the result carries their tie class (as its smallest unit)."""
        others = [d for d in range(c.probe.dim()) if d not in dims]
        groups = c.probe.permute(*others, *dims).reshape(math.prod(c.probe.shape[d] for d in others), -1)
        if bool((groups < 0).any()):
            raise _Barrier("reduces units together with values that carry none")
        for row in groups.unique(dim=0).tolist():
            for u in row[1:]:
                _union(self.st.ties, row[0], u)
        rep = groups.min(1).values.reshape([c.probe.shape[d] for d in others])
        for d in sorted(dims) if keep else []:
            rep = rep.unsqueeze(d)
        self.st.absorbed.update(set(groups.unique().tolist()) - set(rep.unique().tolist()))
        self._emit_reduced(op, rep.contiguous(), False, c.degree)

    def _pool(self, op: Op, carried: list[int], linear: bool) -> None:
        if len(carried) != 1 or not (isinstance(op.args[0], Val) and op.args[0].vid == carried[0]):
            raise _Barrier("the units are not its main input")
        c = self.state[carried[0]]
        if any(d >= 2 for d in _varying_axes(c.probe)) or c.probe.dim() < 3:
            raise _Barrier("pools over the axis that carries the units")
        out_shape = self.g.shapes[op.outputs[0]]
        base = c.probe[(slice(None), slice(None)) + (slice(0, 1),) * (c.probe.dim() - 2)]
        probes = [base.expand(out_shape)]
        if len(op.outputs) == 2:
            raise _Barrier("pooling with indices")
        self.emit(op, probes[0], c.matrix and linear, c.degree)

    def _pad(self, op: Op, carried: list[int]) -> None:
        """``F.pad``. With zeros, along axes that carry no unit (Swin pads its windows): a zero
        is any unit times 0, so each padded slice takes the units of its axis' first slice.
        Reflecting, replicating or wrapping around (``nn.ReflectionPad2d``, ``mode="circular"``)
        copies elements of the value, so each padded element carries the unit of the element it
        copies: the pad is replayed on the probe (a mixing of the units is kept only when they
        do not vary along the padded axes). A constant other than zero does not scale."""
        pad, mode, value = _arg(op, 1, "pad"), _arg(op, 2, "mode", "constant"), _arg(op, 3, "value", None)
        if len(carried) != 1 or not (isinstance(op.args[0], Val) and op.args[0].vid == carried[0]):
            raise _Barrier("the units are not its main input")
        if not isinstance(pad, (list, tuple)):
            raise _Barrier("a pad whose sizes are not numbers")
        c = self.state[carried[0]]
        probe = c.probe
        axes = [probe.dim() - 1 - i for i in range(len(pad) // 2) if pad[2 * i] != 0 or pad[2 * i + 1] != 0]
        if mode in ("reflect", "replicate", "circular"):
            copied = nn.functional.pad(probe.to(torch.float64), tuple(pad), mode=mode).round().to(probe.dtype)
            varying = any(d in _varying_axes(probe) for d in axes)
            self.emit(op, copied, c.matrix and not varying, c.degree)
            return
        if mode != "constant" or value not in (None, 0, 0.0):
            raise _Barrier(f"a pad with {'the constant ' + repr(value) if mode == 'constant' else repr(mode)} does not scale with the units")
        for axis in axes:
            first = probe.narrow(axis, 0, 1)
            if not bool((probe == first).all()):
                raise _Barrier("pads an axis along which the units vary")
            probe = first.expand(*probe.shape[:axis], self.g.shapes[op.outputs[0]][axis], *probe.shape[axis + 1:])
        self.emit(op, probe, c.matrix, c.degree)

    # -- consumers ------------------------------------------------------------------------------

    def _consume(self, op: Op, carried: list[int]) -> None:
        name = op.name
        if name == "addmm":
            x, w = _arg(op, 1, "mat1"), _arg(op, 2, "mat2")
            layout, axis = "rows", -1
            if any(k in op.kwargs and op.kwargs[k] != 1 for k in ("beta",)):
                raise _Barrier("addmm with beta != 1")
        else:  # a transposed convolution reads input channel i through the rows w[i]
            x, w = _arg(op, 0, "input"), _arg(op, 1, "weight")
            layout, axis = ("rows" if name in _CONV_T else "cols"), (-1 if name == "linear" else 1)
            groups = _arg(op, 6, "groups", 1) if name in _CONV or name in _CONV_T else 1
            if name in _CONV_T and groups != 1:
                raise _Barrier("a grouped transposed convolution reads only some channels per output")
        if not (isinstance(x, Val) and x.vid in self.state) or len(carried) != 1:
            raise _Barrier("the units are not its input")
        part = self.g.slice_of(w) if name == "linear" else None
        if part is not None:  # F.linear(h, W[e]): one expert of a 3-D parameter reads the units
            self._use(op, self.state[x.vid], part[0], layout, axis, slice=part[1])
            return
        if not isinstance(w, Val) or w.vid not in self.g.params:
            raise _Barrier("its weight is not a parameter")
        if name != "addmm" and groups != 1:
            # a grouped (depthwise) convolution: input channel i is read by the weights of its
            # group, w[g·m:(g+1)·m, i − g·n]; they rescale with it, but no mixing of channels
            # across groups is a symmetry (no matrix law)
            if not isinstance(groups, int):
                raise _Barrier("a grouped convolution whose groups are not a number")
            self._use(op, self.state[x.vid], self.g.params[w.vid], layout, axis, groups)
            return
        self._use(op, self.state[x.vid], self.g.params[w.vid], layout, axis)

    def _use(self, op: Op, c: _Carry, param: str, layout: str, axis: int, groups: int = 1, slice: int | None = None) -> None:
        p = c.probe.movedim(axis, -1)
        flat = p.reshape(-1, p.shape[-1])
        fiber = flat[0]
        matrix = c.matrix and groups == 1
        reached = fiber
        if not bool((flat == fiber).all()):
            fiber, classes = _column_classes(flat)
            for units in classes:  # a column's weight undoes one λ only: its units scale together
                for u in units[1:]:
                    _union(self.st.ties, units[0], u)
                self.st.absorbed.update(units[1:])
            reached = flat
            if matrix and _aligned(flat, fiber, classes):
                self.st.aligned.update(frozenset(units) for units in classes)
            else:
                matrix = False
        self.route(reached, c.via)
        self.st.uses.append(_Use(op.index, param, layout, fiber.clone(), matrix, c.degree, groups, slice))

    def _matmul(self, op: Op, carried: list[int]) -> None:
        a, b = self._operands(op)
        if op.name == "__rmatmul__":
            a, b = b, a
        g = self.g
        if isinstance(b, Val) and b.vid in g.params and isinstance(a, Val) and a.vid in self.state:
            if len(g.shapes[b.vid]) != 2:
                raise _Barrier("a product with a parameter that is not a matrix")
            self._use(op, self.state[a.vid], g.params[b.vid], "rows", -1)
            return
        wt = transposed_param(g, b)
        if wt is not None and isinstance(a, Val) and a.vid in self.state:  # h @ W.T reads the columns of W
            self._use(op, self.state[a.vid], wt, "cols", -1)
            return
        if isinstance(a, Val) and a.vid in g.params:
            raise _Barrier("a parameter multiplies the units from the left")
        sa = self.state.get(a.vid) if isinstance(a, Val) else None
        sb = self.state.get(b.vid) if isinstance(b, Val) else None
        emitted = self._product(op, sa, sb, g.shapes[op.outputs[0]])
        if emitted is not None:
            self.emit(op, emitted[0], emitted[1], emitted[2])

    def _product(
        self, op: Op, sa: _Carry | None, sb: _Carry | None, out_shape: tuple[int, ...]
    ) -> tuple[Tensor, bool, float] | None:
        """``A @ B`` (batch axes first) for the carried factors: passing units, or one side of a
        pairing; returns what the product emits (probe, matrix, degree), if anything."""
        if (sa is not None and sa.probe.dim() < 2) or (sb is not None and sb.probe.dim() < 2):
            raise _Barrier("a vector product")
        batch = out_shape[:-2]
        emitted = None
        if sa is not None:
            va = _varying_axes(sa.probe)
            if sa.probe.dim() - 1 not in va:  # units on rows / batch: they pass
                emitted = self._pass_through(sa, sa.probe[..., :1], out_shape, len(batch))
            elif sa.probe.dim() - 2 not in va:  # units along the contraction: one side of a pairing
                self._side(op, "A", sa, sa.probe[..., 0, :], batch)
            else:
                raise _Barrier("the units lie on both axes of a matrix product")
        if sb is not None:
            vb = _varying_axes(sb.probe)
            if sb.probe.dim() - 2 not in vb:  # units on columns: they pass (P @ V)
                if emitted is not None:
                    raise _Barrier("both factors carry passing units")
                emitted = self._pass_through(sb, sb.probe[..., :1, :], out_shape, len(batch))
            elif sb.probe.dim() - 1 not in vb:
                self._side(op, "B", sb, sb.probe[..., :, 0], batch)
            else:
                raise _Barrier("the units lie on both axes of a matrix product")
        if emitted is not None and op.index in self.sides:
            raise _Barrier("a product of passing units with paired units")
        return emitted

    # -- einsum (a matrix product written as an equation) --------------------------------------

    def _einsum(self, op: Op) -> None:
        """``torch.einsum`` of two operands that is a (batched) matrix product: one contracted
        index, every other index kept; followed as ``A @ B`` with the operands' axes moved to
        (batch, row, contraction) / (batch, contraction, column), so ``bhqd,bhkd->bhqk`` and
        ``bhqk,bhkd->bhqd`` give the same pairings and blocks as ``q @ kᵀ`` and ``P @ V``. A
        parameter operand is a consumer (``bti,io->bto``). One that sums over nothing
        (``ni,ni->ni``, ``ni,nj->nij``) is an elementwise (outer) product, followed as ``a * b``.
        Anything else is refused, naming the equation."""
        eq = op.args[0] if op.args else op.kwargs.get("equation")
        operands = list(op.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        if not isinstance(eq, str):
            raise _Barrier("einsum without an equation string")
        eq = eq.replace(" ", "")
        g = self.g
        if len(operands) == 2:
            for x, w, which in ((operands[0], operands[1], 1), (operands[1], operands[0], 0)):
                if isinstance(w, Val) and w.vid in g.params and isinstance(x, Val) and x.vid in self.state:
                    form = _linear_form(eq, which)
                    if isinstance(form, str):
                        raise _Barrier(f"einsum '{eq}' {form}")
                    self._use(op, self.state[x.vid], g.params[w.vid], form[1], form[0])
                    return
        if (len(operands) == 2 and all(isinstance(x, Val) and _param_behind(g, x, _SHAPE) is None for x in operands)
                and (form := _elementwise_form(eq))):
            # 'ni,ni->ni', 'ni,nj->nij': an elementwise (outer) product of two values that are no
            # parameters (a gate is read broadcast from the right), followed as a * b
            out_letters, out_shape = form[2], g.shapes[op.outputs[0]]
            aligned, probes = {}, []
            for x, letters in zip(operands, form[:2]):
                sx = g.shapes[x.vid]
                aligned[x.vid] = tuple(sx[letters.index(ch)] if ch in letters else 1 for ch in out_letters)
                perm = [letters.index(ch) for ch in out_letters if ch in letters]
                probes.append(self.state[x.vid].probe.expand(sx).permute(perm).reshape(aligned[x.vid]).expand(out_shape)
                              if x.vid in self.state else None)
            self._times(op, operands[0], operands[1], probes[0], probes[1], out_shape, False, aligned)
            return
        spec = _matmul_form(eq, len(operands))
        if isinstance(spec, str):
            raise _Barrier(f"einsum '{eq}' {spec}")
        perm_a, perm_b, out_letters, canon = spec
        a, b = operands
        sa = self.state.get(a.vid) if isinstance(a, Val) else None
        sb = self.state.get(b.vid) if isinstance(b, Val) else None
        shape_a = g.shapes[a.vid] if isinstance(a, Val) else None
        shape_b = g.shapes[b.vid] if isinstance(b, Val) else None
        if shape_a is None or shape_b is None:
            raise _Barrier(f"einsum '{eq}' with an operand that is not a tensor")
        dot = len(canon) == len(perm_a) - 1  # bi,bi->b: A is a row (…, 1, k), B a column (…, k, 1)
        ca = None if sa is None else _Carry(sa.probe.expand(shape_a).permute(perm_a), sa.matrix, sa.degree, sa.pure, sa.via)
        cb = None if sb is None else _Carry(sb.probe.expand(shape_b).permute(perm_b), sb.matrix, sb.degree, sb.pure, sb.via)
        if dot:
            ca = None if ca is None else _Carry(ca.probe.unsqueeze(-2), ca.matrix, ca.degree, ca.pure, ca.via)
            cb = None if cb is None else _Carry(cb.probe.unsqueeze(-1), cb.matrix, cb.degree, cb.pure, cb.via)
        out_shape = g.shapes[op.outputs[0]]
        canon_shape = tuple(out_shape[out_letters.index(ch)] for ch in canon) + ((1, 1) if dot else ())
        emitted = self._product(op, ca, cb, canon_shape)
        if emitted is not None and dot:
            raise _Barrier(f"einsum '{eq}' is a dot product that carries units on its other indices")
        if emitted is not None:
            back = [canon.index(ch) for ch in out_letters]
            self.emit(op, emitted[0].permute(back), emitted[1], emitted[2])

    def _pass_through(self, c: _Carry, base: Tensor, out_shape: tuple[int, ...], nbatch: int) -> tuple[Tensor, bool, float]:
        probe = base.expand(out_shape)
        self.refine(probe, nbatch)
        return probe, c.matrix, c.degree

    def _side(self, op: Op, which: str, c: _Carry, fibers: Tensor, batch: tuple[int, ...]) -> None:
        fibers = fibers.expand(*batch, fibers.shape[-1]).reshape(-1, fibers.shape[-1])
        self.route(fibers, c.via)
        self.sides.setdefault(op.index, {}).setdefault(which, []).append((self.st.site.sid, _Side(fibers, c.matrix, c.degree, c.pure)))

    def _sdpa(self, op: Op, carried: list[int]) -> None:
        q, k, v = _arg(op, 0, "query"), _arg(op, 1, "key"), _arg(op, 2, "value")
        mask = _arg(op, 3, "attn_mask")
        if isinstance(mask, Val) and mask.vid in self.state:
            raise _Barrier("the units enter the attention mask")
        gqa = bool(op.kwargs.get("enable_gqa", False))
        g = self.g
        qs, ks = g.shapes[q.vid], g.shapes[k.vid]
        reps = qs[-3] // ks[-3] if gqa and len(qs) >= 3 and len(ks) >= 3 else 1
        out_shape = g.shapes[op.outputs[0]]

        def heads(p: Tensor) -> Tensor:
            return p.repeat_interleave(reps, dim=-3) if reps > 1 else p

        emitted = None
        for which, x in (("A", q), ("B", k)):
            if isinstance(x, Val) and x.vid in self.state:
                c = self.state[x.vid]
                if c.probe.dim() - 2 in _varying_axes(c.probe):
                    raise _Barrier("the units vary across tokens")
                fib = c.probe[..., 0, :]
                if which == "B":
                    fib = heads(fib.unsqueeze(-2)).squeeze(-2) if reps > 1 else fib
                self._side(op, which, c, fib, tuple(out_shape[:-2]))
        if isinstance(v, Val) and v.vid in self.state:
            c = self.state[v.vid]
            if c.probe.dim() - 2 in _varying_axes(c.probe):
                raise _Barrier("the value units vary across tokens")
            base = heads(c.probe[..., :1, :])
            emitted = self._pass_through(c, base, out_shape, len(out_shape) - 2)
        if emitted is not None:
            self.emit(op, *emitted)


def _flat(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flat(o)
    else:
        yield obj


# ---------------------------------------------------------------------------------------------
# law assembly
# ---------------------------------------------------------------------------------------------


def _incoming(site: _Site, idx: Tensor) -> list[RowReader]:
    out: list[RowReader] = []
    for name, how in site.readers:
        reader = Rows(idx) if how == "rows" else Columns(idx)
        out.append((name, Sliced(site.slices[name], reader) if name in site.slices else reader))
    return out


def _outgoing(use: _Use, idx: Tensor) -> RowReader:
    if use.groups != 1:
        return (use.param, GroupedColumns(idx, use.groups))
    if use.layout == "flat":  # a gate read by its flat indices
        return (use.param, Flat(Rows(idx)))
    reader = Columns(idx) if use.layout == "cols" else Rows(idx)
    return (use.param, reader if use.slice is None else Sliced(use.slice, reader))


def _column_classes(flat: Tensor) -> tuple[Tensor, list[list[int]]]:
    """A consumer whose input column j carries different units at different positions
    (``[positions, columns]`` probe ``flat``: ``pixel_shuffle`` puts r² channels of a layer at
    the r × r positions of one channel): scaling every unit a column reads by one λ, and the
    column of its weight by 1/λ, keeps the output, so the units read through one column, and
    through columns that share a unit, scale together. Returns the fiber (column → the smallest
    unit of its class, −1 where it reads none) and the classes of more than one unit (sorted);
    refused when a column reads units at some positions and values carrying none at others.

    Example:
        >>> _column_classes(torch.tensor([[0, 2, 4, -1], [1, 3, 5, -1], [0, 1, 5, -1]]))
        (tensor([ 0,  0,  4, -1]), [[0, 1, 2, 3], [4, 5]])
    """
    carrying = flat >= 0
    if bool((carrying.any(0) & ~carrying.all(0)).any()):
        raise _Barrier("reads units at some positions and values that carry none at others through one column")
    columns = torch.arange(flat.shape[1]).expand_as(flat)
    parent: dict[int, int] = {}

    def find(u: int) -> int:
        while parent.setdefault(u, u) != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    first: dict[int, int] = {}  # column → a unit it reads
    for column, unit in torch.stack([columns[carrying], flat[carrying]], 1).unique(dim=0).tolist():
        a, b = find(first.setdefault(column, unit)), find(unit)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root of a class is its smallest unit
    classes: dict[int, list[int]] = defaultdict(list)
    for u in sorted(parent):
        classes[find(u)].append(u)
    fiber = torch.tensor([find(first[j]) if j in first else -1 for j in range(flat.shape[1])], dtype=flat.dtype)
    return fiber, [members for members in classes.values() if len(members) > 1]


def _aligned(flat: Tensor, fiber: Tensor, classes: list[list[int]]) -> bool:
    """Whether the classes of :func:`_column_classes` are aligned: of equal size, one column
    each, and at every position the columns read members of the same rank in their sorted
    classes (``pixel_shuffle``: channel c·r² + k at sub-position k of every c). Then a mixing
    G of the classes, applied to the members of each rank alike, is undone by G⁻¹ on the
    columns: a matrix law over the classes."""
    if not classes or len({len(c) for c in classes}) != 1:
        return False
    columns = fiber[fiber >= 0]
    if len(set(columns.tolist())) != len(columns) or len(columns) != len(classes):
        return False
    rank = {u: k for c in classes for k, u in enumerate(c)}
    read = flat[:, fiber >= 0]
    pattern = torch.tensor([[rank[u] for u in row] for row in read.tolist()])
    return bool((pattern == pattern[:, :1]).all())


def _cols(fiber: Tensor, units: list[int]) -> Tensor | None:
    """[units, positions] input positions of each unit (in increasing order); None when
    their counts differ."""
    u = torch.tensor(units, dtype=fiber.dtype)
    counts = torch.bincount(fiber[fiber >= 0], minlength=int(u.max()) + 1)[u]
    if counts.numel() == 0 or bool((counts != counts[0]).any()):
        return None
    order = torch.argsort(fiber, stable=True)
    start = torch.searchsorted(fiber[order], u)
    return order[start.unsqueeze(1) + torch.arange(int(counts[0]))]


def _linear_laws(st: _SiteState, alive: list[int]) -> tuple[list[Pair], list[str]]:
    """Laws of the units of one site read by linear consumers only."""
    site = st.site
    by_unit: dict[int, list[_Use]] = defaultdict(list)
    counts: dict[int, list[int]] = {}  # op → columns per unit
    for use in st.uses:
        counts[use.op] = torch.bincount(use.fiber[use.fiber >= 0], minlength=site.units).tolist()
        for u in _units(use.fiber):
            by_unit[u].append(use)
    pairs: list[Pair] = []
    problems: list[str] = []
    # group units that can share one law: same consumers, same degree, same mixing block / tie class
    classes: dict[tuple, list[int]] = defaultdict(list)
    for u in alive:
        uses = by_unit.get(u)
        if not uses:
            continue
        degrees = {x.degree for x in uses}
        if len(degrees) > 1:
            problems.append(f"unit {u} reaches consumers with different homogeneity degrees")
            continue
        sig = tuple((x.op, counts[x.op][u]) for x in uses)
        matrix = all(x.matrix for x in uses) and site.mixing and degrees == {1.0} and u not in st.unmixed
        classes[(sig, matrix, degrees.pop(), st.blocks[u] if matrix else st.root(u))].append(u)
    # a tie class must be whole and uniform, else drop it
    groups: dict[tuple, list[list[int]]] = defaultdict(list)
    for (sig, matrix, degree, key), units in classes.items():
        if matrix:
            sizes = {len(st.members(u)) for u in units}
            if sizes == {1} or (len(sizes) == 1 and all(frozenset(st.members(u)) in st.aligned for u in units)):
                groups[(sig, True, degree, key, 0)].append(sorted(units))  # units, or aligned classes (their smallest)
                continue
            matrix = False
        if not matrix:
            present = set(units)
            for u in units:
                whole = st.members(u)
                if u != min(x for x in whole if x in present):
                    continue
                if any(x not in present and not (x in st.absorbed and x not in by_unit) for x in whole):
                    problems.append(f"units {whole} are tied but reach different consumers")
                    continue
                # a unit absorbed by a reduction reaches the consumers as its class: its rows count, no columns
                groups[(sig, False, degree, len(whole), sum(x in present for x in whole))].append(sorted(whole))
    for (sig, matrix, degree, *_), blocks in groups.items():
        uses = [next(x for x in st.uses if x.op == op_index) for op_index, _ in sig]
        if matrix:
            for units in blocks:
                # an aligned class reads its members' rows side by side: the Gram sums member by member
                idx = torch.tensor(units) if len(st.members(units[0])) == 1 else torch.tensor([st.members(u) for u in units])
                out: list[RowReader] = []
                for use in uses:
                    cols = _cols(use.fiber, units)
                    assert cols is not None
                    out.append(_outgoing(use, cols))
                pairs.append(_pair(site, uses, "matrix", degree, len(units), _incoming(site, idx), out,
                                   f"{site.name}→{_names(uses)}[{units[0]}..{units[-1]}]",
                                   "only linear ops in between (e.g. value → output of one head): "
                                   "matrix law [W b][W b]ᵀ − W_nextᵀ W_next of the block (upper triangle)"))
        else:
            idx = torch.tensor(blocks)  # [classes, members]
            reaching = [[u for u in b if u not in st.absorbed or u in by_unit] for b in blocks]
            out = []
            for use in uses:
                flat = _cols(use.fiber, [u for b in reaching for u in b])
                assert flat is not None  # the units of one signature read equally many columns
                cols = flat.reshape(len(blocks), len(reaching[0]), -1)
                out.append(_outgoing(use, cols))
            tied = f" (units tied in classes of {idx.shape[1]})" if idx.shape[1] > 1 else ""
            pairs.append(_pair(site, uses, site.kind, degree, len(blocks), _incoming(site, idx), out,
                               f"{site.name}→{_names(uses)}{tied}",
                               f"positively {degree:g}-homogeneous ops between {site.name} and "
                               f"{_names(uses)}: one law per {'unit' if idx.shape[1] == 1 else 'tie class'}"))
    return pairs, problems


def _merge_streams(g: OpGraph, states: dict[int, _SiteState], sides: dict, gates: frozenset[str],
                   products: dict[int, list[_Factor]]) -> None:
    """Residual streams (ICML 2025): where two sites are added together, unit c of one to unit c
    of the other at every position (a stem or a previous block, and a block's last layer),
    scaling both units c by λ keeps the sum's channel c scaled by λ, so the two sites make one
    site of the stream, followed on from the sum. Its law per channel reads the rows of every
    layer that writes the stream and the columns of every layer that reads it, before the sum
    and after. Merges chain along the stream; a unit stopped anywhere else is not merged."""
    events: dict[int, list[tuple[_SiteState, Tensor, float, str]]] = defaultdict(list)
    for st in states.values():
        for op_index, probe, degree, reason in st.merges:
            events[op_index].append((st, probe, degree, reason))
    pending = sorted(events)  # a heap of op indices; a merge only adds later ones
    while pending:
        op_index = heapq.heappop(pending)
        found = events[op_index]
        if len(found) != 2:
            continue
        (a, pa, da, ra), (b, pb, db, rb) = sorted(found, key=lambda e: e[0].site.op)  # the stream's order
        units = a.site.units
        if a is b or da != 1.0 or db != 1.0 or b.site.units != units or not torch.equal(pa, pb):
            continue
        axis = _unit_axis(pa, units)
        clean = all(a.reasons.get(u) == {ra} and b.reasons.get(u) == {rb} for u in range(units))
        untied = all(len(a.members(u)) == 1 and len(b.members(u)) == 1 for u in range(units))
        if axis is None or not clean or not untied:
            continue
        out = g.ops[op_index].outputs[0]
        site = _Site(max(states) + 1, op_index, out, f"{a.site.name}+{b.site.name}", units, axis - pa.dim(),
                     a.site.readers + b.site.readers, False, a.site.kind, {**a.site.shifts, **b.site.shifts},
                     {**a.site.slices, **b.site.slices})
        merged = _Propagation(g, site, sides, gates, products).run()
        merged.uses = a.uses + b.uses + merged.uses
        # a unit of the stream that also ends elsewhere before the sum (h = W1 x read by W2 in
        # h + W2 relu(h)) has more ways to the output than those the merged site follows: a
        # product after the sum is not its only way (product_rules.product_laws)
        merged.elsewhere |= a.elsewhere | b.elsewhere
        for u in a.elsewhere | b.elsewhere:
            merged.through[u] = frozenset()
        states[site.sid] = merged
        for st in (a, b):
            st.kills.update(dict.fromkeys(range(units), _MERGED))
        for later, probe, degree, reason in merged.merges:
            if later not in events:
                heapq.heappush(pending, later)
            events[later].append((merged, probe, degree, reason))


def _elementwise_form(eq: str) -> tuple[str, str, str] | None:
    """The index letters of both operands and of the output of an einsum of two operands that
    sums over nothing (each index once per operand and once in the output: ``ni,ni->ni``,
    ``ni,nj->nij``); None for any other equation."""
    if eq.count("->") != 1 or "." in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if (len(ins) != 2 or len(set(out)) != len(out) or set(out) != set(ins[0]) | set(ins[1])
            or any(len(set(x)) != len(x) for x in ins)):
        return None
    return ins[0], ins[1], out


def _unit_axis(probe: Tensor, units: int) -> int | None:
    """The axis along which ``probe`` holds unit c at index c, the same at every other position."""
    for axis in range(probe.dim()):
        if probe.shape[axis] != units:
            continue
        view = [1] * probe.dim()
        view[axis] = units
        if torch.equal(probe, torch.arange(units).view(view).expand(probe.shape)):
            return axis
    return None


def _gate_fiber(entries: Tensor, probe: Tensor) -> Tensor | None:
    """The unit each entry of a gate γ multiplies (``entries``: the γ entry at every element of
    the product), when γ multiplies units only and each of its entries one unit; else None."""
    if not bool((probe >= 0).all()):
        return None
    pairs = torch.stack([entries.reshape(-1), probe.reshape(-1)], 1).unique(dim=0)
    if pairs.shape[0] != int(entries.max()) + 1 or bool((pairs[:, 0] != torch.arange(pairs.shape[0])).any()):
        return None  # an entry multiplies several units, or none
    return pairs[:, 1].clone()


def _scalar_gate_law(g: OpGraph, st: _SiteState, op_index: int, alpha: str, degree: float, units: int) -> Pair | str:
    """The law of a scalar gate α that multiplies every unit of a site: scaling all of them by
    λ and α by λ^(−k) changes nothing, so Σ_u (‖w_u‖² + b_u²) − k α² is conserved. It needs
    the site's output to reach the gate alone (each value on the way used once; the ops on the
    way keep every unit, as the propagation checked), else a unit could be rescaled without α."""
    site = st.site
    if units != site.units:
        return f"{site.name}: the scalar gate {alpha} multiplies only some of its units: no law with it"
    v = site.out
    while True:
        users = g.users.get(v, [])
        if len(users) != 1:
            return (f"{site.name}: its output is used by {len(users)} ops before the scalar gate {alpha}: "
                    "scaling every unit by λ is not undone by α alone")
        op = g.ops[users[0]]
        if op.index == op_index:
            break
        if len(op.outputs) != 1:
            return f"{site.name}: an op with several outputs lies before the scalar gate {alpha}"
        v = op.outputs[0]
    idx = torch.arange(site.units).unsqueeze(0)  # one class: every unit
    use = _Use(op_index, alpha, "rows", torch.zeros(1, dtype=torch.long), False, degree)
    return _pair(site, [use], site.kind, degree, 1, _incoming(site, idx), [(alpha, Whole())],
                 f"{site.name}→{_module_of(alpha)} (scalar gate)",
                 f"the scalar {alpha} multiplies every unit of {site.name} (positively {degree:g}-homogeneous ops "
                 "between): one law for the layer, ‖W‖² + ‖b‖² − k α²")


def _names(uses: list[_Use]) -> str:
    return "+".join(dict.fromkeys(_consumer_name(u) for u in uses))


def _consumer_name(use: _Use) -> str:
    """The module of a consumer's weight, or ``param[e]`` for one expert's slice of it."""
    return _module_of(use.param) if use.slice is None else f"{use.param}[{use.slice}]"


def _pair(site: _Site, uses: list[_Use], kind: Any, degree: float, units: int,
          incoming: list[RowReader], outgoing: list[RowReader], label: str, reason: str) -> Pair:
    consumers = tuple(dict.fromkeys(_consumer_name(u) for u in uses))
    return Pair(
        producer=site.name, consumer="+".join(consumers), ops=(), kind=kind, degree=degree, reason=_shift_said(site.shifts, reason),
        units=units, positions=1, incoming=tuple(incoming), outgoing=tuple(outgoing),
        op_kinds=(), consumers=consumers, consumer_positions=tuple(1 for _ in consumers), label=label,
        shifts=tuple(site.shifts.items()),
    )


def _shift_said(shifts: dict[str, float], reason: str) -> str:
    """``reason``, and for a gain read as γ + c that the law reads it so."""
    if not shifts:
        return reason
    said = ", ".join(f"{n} + {c:g}" for n, c in shifts.items())
    return f"{reason}; the model reads the gain as {said}, so the law does too ((γ + c)² in place of γ²)"


def _live_sides(entry: dict[str, list[tuple[int, _Side]]], states: dict[int, _SiteState]) -> dict[str, list[tuple[int, _Side]]]:
    """The factors of a score product whose units may still have a law there: next to a site
    whose units are alive, a site all of whose units reaching the product were stopped on the
    way (q_proj's units, killed by the mean of a per-head RMSNorm whose normalized output
    reaches the product too) takes no part in it, so the norm's gain pairs alone (Qwen3's
    q_norm · k_norm). A factor with no live site keeps its sites (their refusal names why)."""
    out = {}
    for which, found in entry.items():
        live = [(sid, side) for sid, side in found if not all(u in states[sid].kills for u in _units(side.fibers))]
        out[which] = live or found
    return out


def _pairing_laws(
    op_index: int, entry: dict[str, list[tuple[int, _Side]]], states: dict[int, _SiteState]
) -> tuple[list[Pair], list[tuple[int, int]], str | None]:
    """Laws of the query/key units that one score product pairs position by position, the
    units it claims, or the reason it gives none. A factor computed by several layers, each on
    its own positions of the contraction (DeepSeek's MLA: k = cat(k_nope from kv_b_proj, k_pe
    from kv_a_proj_with_mqa)), splits the product into a sum over those positions, one pairing
    of two layers each: a symmetry of one term leaves the others as they are."""
    a_sides, b_sides = entry.get("A", []), entry.get("B", [])
    if not a_sides or not b_sides:
        return [], [], "a factor of the score product is not computed by any layer"
    if len(a_sides) == len(b_sides) == 1:
        return _pair_two(a_sides[0], b_sides[0], states)
    owner_a, owner_b = _position_owner(a_sides), _position_owner(b_sides)
    if owner_a is None or owner_b is None:
        return [], [], ("a factor of the score product is computed by several layers that share positions of "
                        "the contraction")
    pairs: list[Pair] = []
    claimed: list[tuple[int, int]] = []
    for ia, ib in dict.fromkeys(zip(owner_a.tolist(), owner_b.tolist())):
        cols = ((owner_a == ia) & (owner_b == ib)).nonzero().flatten()
        (sid_a, sa), (sid_b, sb) = a_sides[ia], b_sides[ib]
        found, units, problem = _pair_two(
            (sid_a, _Side(sa.fibers[:, cols], sa.matrix, sa.degree, sa.pure)),
            (sid_b, _Side(sb.fibers[:, cols], sb.matrix, sb.degree, sb.pure)), states)
        if problem is not None:
            return [], [], problem
        pairs += found
        claimed += units
    return pairs, claimed, None


def _same_product(a: dict[str, list[tuple[int, _Side]]], b: dict[str, list[tuple[int, _Side]]]) -> bool:
    """Two score products whose factors carry the same units of the same layers at every
    position, each factor with the same properties (homogeneity degree, mixing kept): a
    symmetry of one is a symmetry of the other (DiffLlama's two attention calls; Nyströmformer's
    landmark products, whose factors are means of q and k over segments, linear in their units)."""
    def key(entry: dict[str, list[tuple[int, _Side]]], which: str) -> list[tuple[int, Tensor, tuple]]:
        return sorted(((sid, side.fibers, (side.degree, side.matrix)) for sid, side in entry.get(which, [])),
                      key=lambda t: t[0])

    for which in ("A", "B"):
        ka, kb = key(a, which), key(b, which)
        if len(ka) != len(kb) or any(sa != sb or pa != pb or fa.shape != fb.shape or not torch.equal(fa, fb)
                                     for (sa, fa, pa), (sb, fb, pb) in zip(ka, kb)):
            return False
    return True


def _position_owner(found: list[tuple[int, _Side]]) -> Tensor | None:
    """For each position of the contraction, which of the layers ``found`` computes the factor
    there, in every slice alike; None when a position has none, several, or changes hands."""
    stacked = torch.stack([side.fibers >= 0 for _, side in found])  # [layers, slices, K]
    if bool((stacked.sum(0) != 1).any()):
        return None
    owner = stacked.int().argmax(0)  # [slices, K]
    return owner[0] if bool((owner == owner[0]).all()) else None


def _pair_two(a_side: tuple[int, _Side], b_side: tuple[int, _Side], states: dict[int, _SiteState]
              ) -> tuple[list[Pair], list[tuple[int, int]], str | None]:
    """:func:`_pairing_laws` for a product whose factors are each computed by one layer."""
    (sid_a, sa), (sid_b, sb) = a_side, b_side
    if sa.degree != 1.0 or sb.degree != 1.0:
        return [], [], "a factor of the score product is not linear in its units"
    qa, kb = sa.fibers, sb.fibers
    if qa.shape != kb.shape or bool((qa < 0).any()) or bool((kb < 0).any()):
        return [], [], "the factors of the score product hold values that no layer computes"
    K = qa.shape[1]
    # components: slices sharing a query or a key block share one M
    parent: dict[tuple, tuple] = {}

    def find(x: tuple) -> tuple:
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    block_of: dict[tuple[int, int], tuple] = {}
    for s in range(qa.shape[0]):
        a, b = ("A", sid_a, tuple(qa[s].tolist())), ("B", sid_b, tuple(kb[s].tolist()))
        for key in (a, b):
            for u in key[2]:
                if block_of.setdefault((key[1], u), key) != key:
                    return [], [], "a unit enters the score product in two different head blocks"
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    if len(set(block_of)) != len(block_of) or len(block_of) != sum(len(k[2]) for k in set(block_of.values())):
        return [], [], "a unit appears twice in one head block"
    comps: dict[tuple, list[tuple]] = defaultdict(list)
    for key in set(block_of.values()):
        comps[find(key)].append(key)
    st_a, st_b = states[sid_a], states[sid_b]
    pairs: list[Pair] = []
    claimed = list(block_of)
    for n, keys in enumerate(sorted(comps.values(), key=lambda ks: min(k[2] for k in ks))):
        qs = sorted(k[2] for k in keys if k[0] == "A")
        ks = sorted(k[2] for k in keys if k[0] == "B")
        units = [(sid_a, u) for b in qs for u in b] + [(sid_b, u) for b in ks for u in b]
        mixing = sa.matrix and sb.matrix and st_a.site.mixing and st_b.site.mixing

        def whole(positions: list[int]) -> bool:  # these positions of the head block may mix (one M)
            return (mixing and all(len(states[s].members(u)) == 1 and u not in states[s].unmixed
                                   for s, blocks in ((sid_a, qs), (sid_b, ks)) for b in blocks for u in (b[j] for j in positions))
                    and len({st_a.blocks[b[j]] for b in qs for j in positions}) == 1
                    and len({st_b.blocks[b[j]] for b in ks for j in positions}) == 1)

        if whole(list(range(K))):
            inc = [r for b in qs for r in _incoming(st_a.site, torch.tensor(b))]
            out = [r for b in ks for r in _incoming(st_b.site, torch.tensor(b))]
            pairs.append(_pair_qk(st_a.site, st_b.site, "matrix", K, inc, out,
                                  f"{st_a.site.name} q·k {st_b.site.name} [block {n}: q units {qs[0][0]}.., k units {ks[0][0]}..]",
                                  f"attention scores: Σ Q̃_hQ̃_hᵀ − K̃_gK̃_gᵀ over {len(qs)} query head(s) sharing "
                                  f"{len(ks)} key head (upper triangle)"))
            continue
        # positions that mix alone (the coordinates a partial rotary embedding leaves as they are):
        # q_P → q_P M, k_P → k_P M^{-T} on those positions only keeps the scores, a matrix law on them
        free = [j for j in range(K) if whole([j])]
        if len(free) > 1 and whole(free):
            inc = [r for b in qs for r in _incoming(st_a.site, torch.tensor([b[j] for j in free]))]
            out = [r for b in ks for r in _incoming(st_b.site, torch.tensor([b[j] for j in free]))]
            pairs.append(_pair_qk(st_a.site, st_b.site, "matrix", len(free), inc, out,
                                  f"{st_a.site.name} q·k {st_b.site.name} [block {n}, {len(free)} coordinates mixed alike]",
                                  f"attention scores: Σ Q̃_hQ̃_hᵀ − K̃_gK̃_gᵀ on the {len(free)} coordinates of the head that "
                                  "no per-position rotation or scaling reaches (upper triangle)"))
        else:
            free = []
        # per-unit scaling only: positions tied by the sites' tie classes (RoPE planes)
        pos_parent = list(range(K))
        root_pos: dict[tuple[int, int], int] = {}
        for s, blocks in ((sid_a, qs), (sid_b, ks)):
            for b in blocks:
                for j, u in enumerate(b):
                    r = (s, states[s].root(u))
                    if r in root_pos:
                        _union(pos_parent, root_pos[r], j)
                    else:
                        root_pos[r] = j
        inside = set(units)
        for s, u in units:  # a tie reaching outside the component would need the same scale there
            for v in states[s].members(u):
                if (s, v) not in inside:
                    return [], [], f"unit {u} is tied to unit {v}, which the score product does not pair alike"
        classes: dict[int, list[int]] = defaultdict(list)
        for j in range(K):
            if j not in free:
                classes[_find(pos_parent, j)].append(j)
        by_size: dict[int, list[list[int]]] = defaultdict(list)
        for c in classes.values():
            by_size[len(c)].append(c)
        for size, cls in sorted(by_size.items()):
            inc = [r for b in qs for r in _incoming(st_a.site, torch.tensor([[b[j] for j in c] for c in cls]))]
            out = [r for b in ks for r in _incoming(st_b.site, torch.tensor([[b[j] for j in c] for c in cls]))]
            what = f"planes of {size}" if size > 1 else "coordinates"
            pairs.append(_pair_qk(st_a.site, st_b.site, "unit", len(cls), inc, out,
                                  f"{st_a.site.name} q·k {st_b.site.name} [block {n}, {what}]",
                                  f"attention scores with per-position rotations or scalings: ‖q rows‖² − ‖k rows‖² "
                                  f"per {what[:-1] if what.endswith('s') else what}, over {len(qs)} query head(s)"))
    return pairs, claimed, None


def _pair_qk(a: _Site, b: _Site, kind: Any, units: int, inc: list[RowReader], out: list[RowReader], label: str,
             reason: str) -> Pair:
    shifts = {**a.shifts, **b.shifts}
    return Pair(
        producer=a.name, consumer=b.name, ops=(), kind=kind, degree=1.0, units=units, positions=1,
        reason=_shift_said(shifts, reason), incoming=tuple(inc), outgoing=tuple(out), consumers=(b.name,),
        consumer_positions=(1,), label=label, shifts=tuple(shifts.items()),
    )


def _parameter_problem(pair: Pair, trainable: dict[str, bool], names_of: dict[str, list[str]], uses: dict[str, int],
                       slice_uses: dict[str, dict[int, tuple[int, int]]], experts: dict[str, int]) -> str | None:
    """Why the law of ``pair`` does not hold for its parameters, or None. A parameter read
    through a slice W[e] (one expert) counts as read once when that slice is taken once and
    read once, and W is read through constant slices only. Units that reach experts from
    outside (the layer before a router) need every expert's slice: ``experts`` gives each
    sliced parameter's number of experts (its first axis)."""
    sliced: dict[str, set[int]] = defaultdict(set)
    for name, fn in pair.incoming + pair.outgoing:
        if isinstance(fn, Sliced):
            sliced[name].add(fn.index)
    # units reaching experts from outside (no slice among the incoming readers) need every
    # expert's slice, each read once: then, whatever the routing, every expert undoes their rescaling
    from_outside = any(isinstance(fn, Sliced) for _, fn in pair.outgoing) and not any(
        isinstance(fn, Sliced) for _, fn in pair.incoming)
    for name, indices in sorted(sliced.items()):
        found = slice_uses.get(name, {})
        whole = sum(taken for taken, _ in found.values()) != uses.get(name, 0)  # W read whole too
        if from_outside:
            total = experts.get(name, 0)
            if indices != set(range(total)):
                return (f"the units of {pair.producer} reach experts chosen per input (slices of {name}), and the "
                        f"example input reaches {len(indices)} of its {total}: the others read these units too, so "
                        "their law cannot be formed from it (pass an input whose tokens reach every expert)")
            if whole or any(found.get(e) != (1, 1) for e in indices):
                return (f"the units of {pair.producer} reach the experts of {name}, which is not read once per "
                        f"expert slice: the {pair.name} law does not hold")
        elif whole:
            return f"{name} is read whole as well as by expert slices: the {pair.name} law does not hold"
        elif len(indices) > 1 or any(found.get(e, (0, 0)) != (1, 1) for e in indices):
            return f"{name}[{min(indices)}] is read by more than one op in forward: the {pair.name} law does not hold"
    plain = tuple(n for n in pair.parameter_names if n not in sliced)
    return _name_problem(tuple(sliced) + plain, pair.name, trainable, names_of, {**uses, **dict.fromkeys(sliced, 1)})


def _name_problem(names: tuple[str, ...], what: str, trainable: dict[str, bool], names_of: dict[str, list[str]],
                  uses: dict[str, int]) -> str | None:
    for name in dict.fromkeys(names):
        if not trainable.get(name, False):
            return f"{name} is frozen (requires_grad=False): the {what} law does not hold"
        others = [n for n in names_of.get(name, []) if n != name]
        if others:
            return f"{name} is shared with {', '.join(others)}: the {what} law does not hold"
        if uses.get(name, 0) != 1:
            return (f"{name} is read by {uses.get(name, 0)} ops in forward (a tied or reused "
                    f"parameter): the {what} law does not hold")
    return None


def find_graph_laws(model: nn.Module, example_input: Any) -> tuple[list[Pair], list[Skipped]]:
    """Every exact rescaling and attention law of ``model`` found from what it computes on
    ``example_input`` (see the module docstring), and every site it refuses, with a reason.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2))
        >>> pairs, skipped = find_graph_laws(m, torch.randn(5, 4))
        >>> pairs, skipped[0].reason
        ([], 'after 0, 3 unit(s) stop at gelu in 1 (op 1): gelu is not known to keep the rescaling of the units')
    """
    pairs, skipped, _ = analyse_graph(model, example_input)
    return pairs, skipped


class StaleReadError(RuntimeError):
    """The forward reads a value after an in-place write changed it through another view: the
    captured graph (and the module-level one) holds the value before the write."""

    def __init__(self, reads: list[str]) -> None:
        super().__init__(reads[0])
        self.reads = reads


def analyse_graph(model: nn.Module, example_input: Any) -> tuple[list[Pair], list[Skipped], GraphLawGroups]:
    """:func:`find_graph_laws`, plus the law groups beyond pairs that the rules of
    :mod:`torch_conslaw.structure.group_rules` find on the same graph (key biases, LayerNorm
    centering across a residual addition, approximate scale laws before a normalization).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
        >>> _, _, extra = analyse_graph(m, torch.randn(5, 4))
        >>> [(g.name, g.kind, g.count) for g in extra.groups]
        [('0→1 centering', 'linear', 5), ('0→1 scale', 'approximate', 1)]
    """
    g = capture(model, example_input)
    if g.stale_reads:
        raise StaleReadError(g.stale_reads)
    trainable: dict[str, bool] = {}
    by_param: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        trainable[name] = p.requires_grad
        by_param[id(p)].append(name)
    names_of = {n: ns for ns in by_param.values() for n in ns}
    sites, skipped = _find_sites(g, {n for n, t in trainable.items() if t})
    sides: dict[int, dict[str, list[tuple[int, _Side]]]] = {}
    gates = frozenset(n for n, t in trainable.items() if t)
    products: dict[int, list[_Factor]] = {}
    states = {s.sid: _Propagation(g, s, sides, gates, products).run() for s in sites}
    uses = g.param_uses()
    slice_uses = g.slice_uses()
    experts = {name: g.shapes[vid][0] for vid, name in g.params.items() if name in slice_uses and g.shapes[vid]}

    def problem(names: tuple[str, ...], what: str) -> str | None:
        return _name_problem(names, what, trainable, names_of, uses)

    # before the score products below add their own refusals to the units (the key-bias rule
    # needs only the key side of a product, whatever the query is)
    from .group_rules import find_law_groups  # group_rules reads this module's op tables

    extra = find_law_groups(model, g, states, sides, problem)
    _merge_streams(g, states, sides, gates, products)
    pairs: list[Pair] = []
    claimed: dict[tuple[int, int], int] = defaultdict(int)
    pairing: list[tuple[int, list[Pair], list[tuple[int, int]]]] = []
    seen: list[dict[str, list[tuple[int, _Side]]]] = []
    for op_index, entry in sorted(sides.items()):
        entry = _live_sides(entry, states)
        if any(_same_product(entry, other) for other in seen):
            continue  # the same scores computed again (DiffLlama's two attention calls): the same symmetry
        seen.append(entry)
        found, units, problem = _pairing_laws(op_index, entry, states)
        for sid, side in entry.get("A", []) + entry.get("B", []):
            for u in _units(side.fibers):
                claimed[(sid, u)] += 1
        if problem is not None:
            for sid, side in entry.get("A", []) + entry.get("B", []):
                for u in _units(side.fibers):
                    states[sid].kills.setdefault(u, f"score product op {op_index}: {problem}")
            continue
        pairing.append((op_index, found, units))
    linear_units = {(st.site.sid, u) for st in states.values() for use in st.uses for u in _units(use.fiber)}
    for op_index, found, units in pairing:
        bad = [su for su in units if claimed[su] > 1 or su in linear_units or su[1] in states[su[0]].kills]
        if bad:
            sid, u = bad[0]
            why = states[sid].kills.get(u, "it is also read elsewhere")
            skipped.append(Skipped(states[sid].site.name, None, (
                f"score product op {op_index}: unit {u} of {states[sid].site.name} breaks the "
                f"q·k symmetry ({why})")))
            for sid, u in units:
                states[sid].kills.setdefault(u, f"score product op {op_index} is not symmetric")
            continue
        pairs.extend(found)
    from .product_rules import parameter_product_laws, product_laws  # product_rules reads this module's tables

    joint, covered = product_laws(products, states)
    pairs.extend(joint)
    pairs.extend(parameter_product_laws(g, gates))
    for st in states.values():
        alive = [u for u in range(st.site.units) if u not in st.kills and claimed.get((st.site.sid, u), 0) == 0]
        found, problems = _linear_laws(st, alive)
        pairs.extend(found)
        for gate in st.gates:
            law = _scalar_gate_law(g, st, *gate)
            if isinstance(law, Pair):
                pairs.append(law)
            else:
                skipped.append(Skipped(st.site.name, None, law))
        skipped.extend(Skipped(st.site.name, None, f"{st.site.name}: {p}") for p in problems)
        reasons: dict[str, int] = defaultdict(int)
        for u, r in st.kills.items():
            if (st.site.sid, u) not in covered:
                reasons[r] += 1
        skipped.extend(Skipped(st.site.name, None, f"after {st.site.name}, {n} unit(s) stop at {r}")
                       for r, n in reasons.items() if r not in (_OUTPUT, _MERGED))
    kept: list[Pair] = []
    for p in pairs:
        problem = _parameter_problem(p, trainable, names_of, uses, slice_uses, experts)
        if problem is None:
            kept.append(p)
        else:
            skipped.append(Skipped(p.producer, p.consumer, problem))
    return kept, skipped, extra
