"""Evaluate a module through elementary ops while counting its laws (SCIENCE.md §10, pitfalls).

Lie brackets of depth k need derivatives of order k + 1 of the model. Fused kernels are not
safe there: the third derivative of native ``batch_norm`` is wrong (3.4e-3 relative on a
depth-3 bracket), and ``batch_norm`` refuses ``eps=0`` in train mode, which the count "at
eps → 0" needs. :class:`ElementaryOps` is a ``TorchFunctionMode`` that reroutes, while it is
active:

* ``batch_norm``, ``instance_norm``, ``layer_norm``, ``group_norm``, ``rms_norm`` to
  mean/variance/sqrt written with elementary ops (batch statistics in training mode, running
  statistics otherwise; the running statistics are never updated);
* ``scaled_dot_product_attention`` to softmax(q kᵀ · scale + mask) v, and
  ``multi_head_attention_forward`` (``nn.MultiheadAttention``) to its explicit bmm path;
* every dropout to the identity (random masks have no fixed derivatives; the count is for the
  network without dropout);
* the recurrent kernels of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` and their cells to loops of
  matmuls (:mod:`.elementary_rnn`: the fused kernels have no vmap batching rule);
* ``torch._grouped_mm`` (mixture-of-experts layers) to one matmul per group: it has no
  float64 kernel (:class:`Float64Ops` does only this, for the check of the laws).

:class:`ActivationRecorder` records, on a plain forward, the units of ReLU-like activations
that are never or always active on the inputs (they add data-dependent laws).

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3).double()
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> with ElementaryOps():
    ...     y = bn(x)
    >>> bool(torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True)))
    True
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .elementary_rnn import REROUTES as _RNN_REROUTES

__all__ = ["ElementaryOps", "Float64Ops", "ActivationRecorder", "ConstantUnits", "UnreachedBounds", "EPS_ATTRIBUTES"]

EPS_ATTRIBUTES = ("eps", "variance_epsilon", "layer_norm_eps", "epsilon")
"""Module attributes that hold a normalization's eps (torch.nn and Hugging Face names)."""


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _normalize(x: Tensor, dims: list[int], eps: float) -> Tensor:
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    return centered / torch.sqrt((centered * centered).mean(dims, keepdim=True) + eps)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if training or running_mean is None or running_var is None:
        y = _normalize(input, [0, *range(2, input.dim())], eps)
    else:
        y = (input - running_mean.reshape(shape)) / torch.sqrt(running_var.reshape(shape) + eps)
    return _affine(y, weight, bias, shape)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if use_input_stats or running_mean is None or running_var is None:
        y = _normalize(input, list(range(2, input.dim())), eps)
    else:
        y = (input - running_mean.reshape(shape)) / torch.sqrt(running_var.reshape(shape) + eps)
    return _affine(y, weight, bias, shape)


def layer_norm(
    input: Tensor,
    normalized_shape: Any,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    y = _normalize(input, list(range(input.dim() - n, input.dim())), eps)
    return _affine(y, weight, bias, tuple(input.shape[input.dim() - n :]))


def group_norm(
    input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    grouped = input.reshape(input.shape[0], num_groups, -1)
    y = _normalize(grouped, [2], eps).reshape(input.shape)
    return _affine(y, weight, bias, (1, -1) + (1,) * (input.dim() - 2))


def rms_norm(input: Tensor, normalized_shape: Any, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    dims = list(range(input.dim() - n, input.dim()))
    y = input / torch.sqrt((input * input).mean(dims, keepdim=True) + eps)
    return _affine(y, weight, None, tuple(input.shape[input.dim() - n :]))


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def multi_head_attention_forward(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` on its explicit path: softmax(q kᵀ) v by bmm.

    Its ``need_weights=False`` path calls the fused attention kernel from inside, where this
    mode no longer reroutes (no forward AD on CPU). The explicit path computes the same output;
    the weights are returned only if the caller asked for them, and attention dropout is off.
    """
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    asked = bound.arguments.get("need_weights", True)
    bound.arguments["need_weights"] = True
    bound.arguments["dropout_p"] = 0.0
    output, weights = F.multi_head_attention_forward(*bound.args, **bound.kwargs)
    return output, (weights if asked else None)


def grouped_mm(
    mat_a: Tensor, mat_b: Tensor, *, offs: Tensor | None = None, bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``torch._grouped_mm`` (mixture-of-experts layers) as one matmul per group.

    The fused kernel takes bfloat16/float16/float32 only, and float64 is what the check of the
    laws and the count run in. ``offs[g]`` ends group g along the jagged axis (entries past
    ``offs[-1]`` are ignored: zero rows or columns): 2-D ``mat_a`` × 3-D ``mat_b`` slices the
    rows of ``mat_a``; 3-D × 2-D the columns of ``mat_b``; 2-D × 2-D the shared inner axis (a
    3-D result); 3-D × 3-D is a batched matmul.
    """
    if bias is not None:
        raise NotImplementedError("grouped_mm with a bias has no elementary version here")
    if offs is None:
        out = torch.bmm(mat_a, mat_b)
    else:
        ends = [int(e) for e in offs.tolist()]
        bounds = list(zip([0, *ends[:-1]], ends))
        if mat_a.dim() == 2 and mat_b.dim() == 3:
            pieces = [mat_a[s:e] @ mat_b[g] for g, (s, e) in enumerate(bounds)]
            pieces.append(mat_a.new_zeros(mat_a.shape[0] - ends[-1], mat_b.shape[-1]))
            out = torch.cat(pieces, 0)
        elif mat_a.dim() == 3 and mat_b.dim() == 2:
            pieces = [mat_a[g] @ mat_b[:, s:e] for g, (s, e) in enumerate(bounds)]
            pieces.append(mat_a.new_zeros(mat_a.shape[1], mat_b.shape[1] - ends[-1]))
            out = torch.cat(pieces, 1)
        else:
            out = torch.stack([mat_a[:, s:e] @ mat_b[s:e] for s, e in bounds])
    return out if out_dtype is None else out.to(out_dtype)


_FLOAT64_FALLBACKS: dict[Callable[..., Any], Callable[..., Any]] = {torch._grouped_mm: grouped_mm}
if hasattr(F, "grouped_mm"):
    _FLOAT64_FALLBACKS[F.grouped_mm] = grouped_mm


class Float64Ops(TorchFunctionMode):
    """Run the fused ops that have no float64 kernel (``torch._grouped_mm`` of mixture-of-experts
    layers) as elementary ops, so a model can run in float64; every other op is untouched, but
    for casts to a float dtype at least as precise as ``floor`` (the precision of the model's own
    parameters): they change nothing in the model (``x.float()`` in a float32 model), so a float64
    copy of it keeps float64 there instead of rounding to float32 (``kept`` names them).

    Example:
        >>> a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
        >>> with Float64Ops():
        ...     y = torch._grouped_mm(a, b, offs=torch.tensor([2, 5], dtype=torch.int32))
        >>> bool(torch.allclose(y, torch.cat([a[:2] @ b[0], a[2:] @ b[1]])))
        True
    """

    def __init__(self, floor: torch.dtype | None = None) -> None:
        super().__init__()
        self.kept: set[str] = set()
        eps = torch.finfo(floor).eps if floor is not None and floor.is_floating_point else None
        self._skip = lambda d: eps is not None and d in _LOW_FLOATS and torch.finfo(d).eps <= eps

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        done, value, args, kwargs = _without_casts(func, args, kwargs or {}, self._skip, self.kept)
        if done:
            return value
        replacement = _FLOAT64_FALLBACKS.get(func)
        return (replacement or func)(*args, **kwargs)


def _identity_dropout(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return input


def glu(input: Tensor, dim: int = -1) -> Tensor:
    """``F.glu``: a ⊙ σ(b) for the two halves along ``dim`` (aten's glu has no forward-mode rule)."""
    a, b = input.chunk(2, dim)
    return a * torch.sigmoid(b)


def weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm`` (the ``weight_norm`` parametrization): v · g / ‖v‖, the norm over
    every axis but ``dim`` (over all of v for ``dim = -1``); aten's version has no forward-mode rule."""
    if dim == -1:
        return v * (g / v.norm())
    axes = [a for a in range(v.dim()) if a != dim % v.dim()]
    return v * (g / (v * v).sum(axes, keepdim=True).sqrt())


def embedding_bag(
    input: Tensor,
    weight: Tensor,
    offsets: Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Tensor:
    """``F.embedding_bag`` as a lookup and a sum, mean or max per bag (aten's has no forward-mode
    rule): bags are the rows of a 2-D ``input``, or the slices of a 1-D one between ``offsets``;
    entries equal to ``padding_idx`` are left out (of the mean's count too), an empty bag gives
    zeros. ``max_norm`` (which renormalizes the table in place) is left to aten."""
    if max_norm is not None:
        return F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                               per_sample_weights, include_last_offset, padding_idx)
    if input.dim() == 2:
        bags = list(input)
        weights = list(per_sample_weights) if per_sample_weights is not None else [None] * len(bags)
    else:
        starts = [int(o) for o in offsets] if offsets is not None else [0]
        ends = starts[1:] + ([] if include_last_offset else [input.numel()])
        starts = starts[: len(ends)]
        bags = [input[a:b] for a, b in zip(starts, ends)]
        weights = [per_sample_weights[a:b] if per_sample_weights is not None else None for a, b in zip(starts, ends)]
    out = []
    for ids, w in zip(bags, weights):
        if padding_idx is not None:
            keep = ids != padding_idx % weight.shape[0]
            ids, w = ids[keep], (w[keep] if w is not None else None)
        rows = weight[ids]
        if w is not None:
            rows = rows * w.unsqueeze(-1)
        if rows.shape[0] == 0:
            out.append(weight.new_zeros(weight.shape[1]))
        elif mode == "sum":
            out.append(rows.sum(0))
        elif mode == "mean":
            out.append(rows.mean(0))
        else:
            out.append(rows.amax(0))
    return torch.stack(out) if out else weight.new_zeros(0, weight.shape[1])


_REROUTES: dict[Callable[..., Any], Callable[..., Any]] = {
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
    F.layer_norm: layer_norm,
    F.group_norm: group_norm,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    F.multi_head_attention_forward: multi_head_attention_forward,
    torch.batch_norm: batch_norm,
    torch.layer_norm: layer_norm,
    torch.group_norm: group_norm,
    torch.instance_norm: instance_norm,
    F.glu: glu,
    torch._weight_norm: weight_norm,
    F.embedding_bag: embedding_bag,
}
for _name in ("rms_norm",):
    if hasattr(F, _name):
        _REROUTES[getattr(F, _name)] = rms_norm
    if hasattr(torch, _name):
        _REROUTES[getattr(torch, _name)] = rms_norm
_REROUTES.update(_RNN_REROUTES)
_REROUTES.update(_FLOAT64_FALLBACKS)
for _name in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"):
    _REROUTES[getattr(F, _name)] = _identity_dropout
    if hasattr(torch, _name):
        _REROUTES[getattr(torch, _name)] = _identity_dropout


_LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_CASTS = {Tensor.to, Tensor.float, Tensor.half, Tensor.bfloat16, Tensor.type, Tensor.type_as}
_DTYPE_ARG = {F.softmax: 3, F.log_softmax: 3, torch.softmax: 2, torch.log_softmax: 2, Tensor.softmax: 2,
              Tensor.log_softmax: 2}  # position of ``dtype`` (F.softmax(input, dim, _stacklevel, dtype))


# products that do not promote mixed float dtypes (elementwise ops do): matmul, mm, bmm, linear, einsum
_PRODUCTS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.mm, Tensor.mm, torch.bmm,
             Tensor.bmm, F.linear, torch.einsum}


def _products_lifted(func: Any, args: tuple, kwargs: dict, skip: Callable[[Any], bool],
                     kept: set[str]) -> tuple[tuple, dict]:
    """A product of a float64 tensor (a cast kept in float64) with a constant tensor of a dtype
    ``skip`` accepts (one the model made in its own precision from integers or a factory,
    ``spatial_shapes.float()``, ``torch.arange(n, dtype=torch.float32)``: no float64 source to
    keep) takes that operand to float64, as torch promotes in elementwise ops; otherwise the
    product raises (``expected m1 and m2 to have the same dtype``). A tensor that requires grad
    (a parameter the forward cast to another dtype, Switch Transformers' router) is left as it
    is: the count's note names that parameter."""
    flat = [a for x in args for a in (x if isinstance(x, (list, tuple)) else (x,))] + list(kwargs.values())
    if not any(isinstance(a, Tensor) and a.dtype == torch.float64 for a in flat):
        return args, kwargs
    low = lambda a: (isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64 and skip(a.dtype)
                     and not a.requires_grad)  # a constant: a parameter of another dtype stays (its own note)
    if not any(low(a) for a in flat):
        return args, kwargs
    kept.add(getattr(func, "__name__", str(func)))
    up = lambda a: a.to(torch.float64) if low(a) else a
    args = tuple(type(x)(up(a) for a in x) if isinstance(x, (list, tuple)) else up(x) for x in args)
    return args, {k: up(v) for k, v in kwargs.items()}


def _without_casts(func: Any, args: tuple, kwargs: dict, skip: Callable[[Any], bool],
                   kept: set[str]) -> tuple[bool, Any, tuple, dict]:
    """A cast of a float64 tensor to a dtype ``skip`` accepts left out: (done, its value) for a
    cast (``x.float()``, ``x.to(torch.float32)``, ``x.type_as(y)``), or the arguments without
    that ``dtype`` for a softmax (``softmax(x, -1, dtype=torch.float32)``); a product of such a
    kept float64 tensor with one of that dtype computes in float64 (:func:`_products_lifted`)."""
    if func in _PRODUCTS:
        args, kwargs = _products_lifted(func, args, kwargs, skip, kept)
    src = args[0] if args else kwargs.get("input")
    if not (isinstance(src, Tensor) and src.dtype == torch.float64):
        return False, None, args, kwargs
    if func in _CASTS:
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and skip(out.dtype):
            kept.add(getattr(func, "__name__", str(func)))
            # a new tensor, as the cast gives (the model may write into it in place)
            return True, (src.clone() if out.device == src.device else src.to(out.device)), args, kwargs
        return True, out, args, kwargs
    pos = _DTYPE_ARG.get(func)
    if pos is not None:
        if skip(kwargs.get("dtype")):
            kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
            kept.add(getattr(func, "__name__", str(func)))
        elif len(args) > pos and skip(args[pos]):
            args = args[:pos] + (None,) + args[pos + 1:]
            kept.add(getattr(func, "__name__", str(func)))
    return False, None, args, kwargs


class ElementaryOps(TorchFunctionMode):
    """Reroute fused normalizations, attention and dropout to elementary ops (see module doc).

    Casts of a float64 tensor to a lower float precision (``x.float()``, ``x.to(torch.float32)``,
    ``softmax(x, dtype=torch.float32)``, as Hugging Face eager attention and norms do) are kept
    in float64: the count is of the function in exact arithmetic, and float32 rounding inside
    it would look like extra fields. ``kept`` names the ops whose cast was skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        done, value, args, kwargs = _without_casts(func, args, kwargs or {}, _LOW_FLOATS.__contains__, self.kept)
        if done:
            return value
        replacement = _REROUTES.get(func)
        return (replacement or func)(*args, **kwargs)


_RELU_LIKE = {F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.leaky_relu_}


@dataclass
class ConstantUnits:
    """One call of a ReLU-like activation: units never active (dead) and always active on the inputs.

    A unit is one feature: dim 1 of a 2-D or ≥ 4-D activation (Linear, Conv2d/3d channels),
    the last dim of a 3-D one ((batch, tokens, features) of sequence models), over every
    other position.
    """

    call: int
    op: str
    units: int
    dead: int
    always_active: int


@dataclass
class UnreachedBounds:
    """One call of a clipping activation (``relu6``, ``hardtanh``): its units that never reach
    a clipping bound on the inputs. Where no input reaches it, the activation acts as ReLU
    (``relu6``) or as the identity (``hardtanh``), whose laws then hold for such inputs only."""

    call: int
    op: str
    units: int
    bounds: str  # the bounds that clip: the upper one when the lower one is 0, else both
    never_clipped: int  # units that reach none of them on the inputs
    acts_as: str  # what the activation is where it does not clip: "ReLU" or "the identity"


_CLIPPING = {F.relu6: (0.0, 6.0), F.hardtanh: (-1.0, 1.0)}


def _unit_rows(z: Tensor) -> Tensor:
    """``[units, positions]``: one row per unit of an activation's input (dim 1 of a 2-D or
    ≥ 4-D tensor, the last dim of a 3-D one), over every other position."""
    feature = z.dim() - 1 if z.dim() == 3 else 1
    return z.movedim(feature, 0).reshape(z.shape[feature], -1)


class ActivationRecorder(TorchFunctionMode):
    """Record the ReLU-like units that are dead or always active on a plain forward, and the
    units of clipping activations that never reach a bound (:class:`UnreachedBounds`).

    Also counts ``floating_numel``, the entries of every floating tensor the forward creates
    (an upper bound on what one differentiated forward keeps, used to size batches).
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[ConstantUnits] = []
        self.clipping: list[UnreachedBounds] = []
        self.floating_numel = 0
        self.balance = 0.5  # min over ReLU-like units of min(p, 1 − p), p: the unit's active share

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _RELU_LIKE and args and isinstance(args[0], Tensor) and args[0].dim() >= 2:
            active = _unit_rows(args[0].detach()) > 0
            if active.shape[1]:
                share = active.double().mean(1)
                self.balance = min(self.balance, float(torch.minimum(share, 1 - share).min()))
            self.calls.append(
                ConstantUnits(
                    call=len(self.calls),
                    op=getattr(func, "__name__", str(func)),
                    units=active.shape[0],
                    dead=int((~active).all(1).sum()),
                    always_active=int(active.all(1).sum()),
                )
            )
        if func in _CLIPPING and args and isinstance(args[0], Tensor) and args[0].dim() >= 2:
            self._clipping(func, args, kwargs or {})
        out = func(*args, **(kwargs or {}))
        if isinstance(out, Tensor) and out.is_floating_point():
            self.floating_numel += out.numel()
        return out

    def _clipping(self, func: Any, args: tuple, kwargs: dict) -> None:
        """Units of a ``relu6`` / ``hardtanh`` call that never reach a bound where it clips: its
        upper bound when the lower one is 0 (``relu6``, ``nn.ReLU6``: ReLU there), else either
        bound (the identity there)."""
        low, high = _CLIPPING[func]
        if func is F.hardtanh:
            low = float(args[1]) if len(args) > 1 else float(kwargs.get("min_val", low))
            high = float(args[2]) if len(args) > 2 else float(kwargs.get("max_val", high))
        rows = _unit_rows(args[0].detach())
        clipped = rows >= high if low == 0.0 else (rows >= high) | (rows <= low)
        self.clipping.append(
            UnreachedBounds(
                call=len(self.clipping),
                op=getattr(func, "__name__", str(func)),
                units=rows.shape[0],
                bounds=f"{high:g}" if low == 0.0 else f"{low:g} and {high:g}",
                never_clipped=int((~clipped).all(1).sum()),
                acts_as="ReLU" if low == 0.0 else "the identity",
            )
        )
