"""A bias whose shift linear ops cancel: every entry is a linear law (an op-graph rule).

A bias b (of ``F.linear`` / ``addmm`` / a convolution, or the β of a normalization) adds the same
b_c to every element of channel c of the op's output. Follow that shift, t = Σ_c r_c e_c for a
random r, through the ops that read it while each is *linear* in it and independent of the
input (moves and copies, ``cat``, additions and subtractions of any other value, products with
numbers, average pooling, means and sums, zero padding, eval dropout): the shift of each output
is the op applied to the shift of its inputs, exactly. When it vanishes everywhere before any
other op or the model output sees it, the output does not depend on b at all: ∂L/∂b = 0 for
every loss and input, so each entry of b is a linear law.

PoolFormer's token mixer, ``avg_pool(x) − x`` with ``count_include_pad=False``: an average of a
constant is that constant, so the β of the GroupNorm before it cancels (b_c − b_c). A random
combination vanishes only when every channel's shift does (almost surely), and the law is
verified numerically before it is tracked, like every law.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .graph import Op, OpGraph, Val
from .rules import _ADD, _ADD_IN_PLACE, _CAST, _CONV, _CONV_T, _DROPOUT, _SHAPE, _arg

__all__ = ["vanishing_shift_rule"]

_AVERAGES = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
             "adaptive_avg_pool3d", "sum", "mean", "neg", "negative", "__neg__", "pad"}
_SCALE = {"mul", "__mul__", "__rmul__", "multiply", "div", "__truediv__", "true_divide", "divide"}


def _bias(g: OpGraph, op: Op) -> tuple[Val, int] | None:
    """(the 1-D bias parameter of ``op``, the axis of the output it lies along)."""
    spots = {"linear": (2, "bias", -1), "addmm": (0, "input", -1), "layer_norm": (3, "bias", -1),
             "group_norm": (3, "bias", 1), "batch_norm": (4, "bias", 1), "instance_norm": (4, "bias", 1)}
    spot = spots.get(op.name) or ((2, "bias", 1) if op.name in _CONV or op.name in _CONV_T else None)
    if spot is None or len(op.outputs) != 1:
        return None
    b = _arg(op, spot[0], spot[1])
    if not (isinstance(b, Val) and b.vid in g.params and len(g.shapes[b.vid]) == 1):
        return None
    out = g.shapes[op.outputs[0]]
    if op.name == "layer_norm" and len(tuple(_arg(op, 1, "normalized_shape"))) != 1:
        return None
    axis = spot[2] % len(out)
    return (b, axis) if out[axis] == g.shapes[b.vid][0] else None


def _shift(model: nn.Module, g: OpGraph, op: Op, shifts: dict[int, Tensor]) -> Tensor | None | str:
    """The shift of ``op``'s output from those of its inputs (None: none), or why the op is not
    followed (a string)."""
    from .group_rules import _dropout_active

    name, out = op.name, g.shapes[op.outputs[0]] if len(op.outputs) == 1 else None
    if out is None:
        return f"{name} has several outputs"
    first = op.args[0] if op.args else None
    others = [a for a in list(op.args[1:]) + list(op.kwargs.values()) if isinstance(a, Val)]
    if name in _ADD or name in _ADD_IN_PLACE:
        a, b = _arg(op, 0, "input"), _arg(op, 1, "other")
        alpha = _arg(op, 2, "alpha", 1)
        if not isinstance(alpha, (int, float)):
            return f"{name} with a tensor alpha"
        ta = shifts.get(a.vid) if isinstance(a, Val) else None
        tb = shifts.get(b.vid) if isinstance(b, Val) else None
        sign = -1.0 if name in ("sub", "__sub__", "subtract", "sub_", "__isub__") else 1.0
        total = torch.zeros(out, dtype=torch.float64)
        total = total + (ta if ta is not None else 0.0) + sign * alpha * (tb if tb is not None else 0.0)
        return total
    if name == "cat" or name in ("concat", "concatenate"):
        parts, dim = (op.args[0] if op.args else op.kwargs.get("tensors")), _arg(op, 1, "dim", 0)
        if not isinstance(parts, (list, tuple)) or not isinstance(dim, int):
            return "cat of something else than a list of tensors"
        return torch.cat([shifts[p.vid] if isinstance(p, Val) and p.vid in shifts else
                          torch.zeros(g.shapes[p.vid], dtype=torch.float64) for p in parts], dim)
    if not isinstance(first, Val) or first.vid not in shifts or others:
        return f"{name} reads the shift with other tensors"
    t = shifts[first.vid]
    if name in _DROPOUT:
        return f"{name} is active (train mode)" if _dropout_active(model, op) else t
    if name in _CAST or name in ("contiguous", "clone"):
        return t
    if name in _SCALE:
        factor = _arg(op, 1, "other")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool):
            return f"{name} by something else than a number"
        return t * factor if name in ("mul", "__mul__", "__rmul__", "multiply") else t / factor
    if name in _SHAPE or name in _AVERAGES:
        args, kwargs = list(op.args[1:]), dict(op.kwargs)
        if name == "pad":  # the linear part of a pad: a constant pad adds zeros
            mode = _arg(op, 2, "mode", "constant")
            args, kwargs = [_arg(op, 1, "pad")], {"mode": mode}
            if mode == "constant":
                kwargs["value"] = 0.0
        try:
            moved = op.func(t, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - not replayable: not followed
            return f"{name} could not be replayed on the shift ({type(err).__name__})"
        if not isinstance(moved, Tensor) or tuple(moved.shape) != tuple(out):
            return f"{name} could not be replayed on the shift"
        return moved
    return f"{name} is not linear in the shift"


def vanishing_shift_rule(model: nn.Module, g: OpGraph):
    """Biases whose shift linear ops cancel (see the module docstring): yields proposals."""
    uses = g.param_uses()
    gen = torch.Generator().manual_seed(0)
    for start in g.ops:
        found = _bias(g, start) if start.index in g.live else None
        if found is None or uses.get(g.params[found[0].vid], 0) != 1:
            continue
        bias, axis = found
        out = g.shapes[start.outputs[0]]
        r = torch.rand(out[axis], generator=gen, dtype=torch.float64) + 0.5
        shifts = {start.outputs[0]: r.reshape((-1,) + (1,) * (len(out) - axis - 1)).expand(out[axis:]).expand(out)}
        scale = float(r.abs().max())
        why = None
        for op in g.ops[start.index + 1:]:
            if op.index not in g.live or not any(v in shifts for v in op.inputs):
                continue
            moved = _shift(model, g, op, shifts)
            if isinstance(moved, str):
                why = moved
                break
            if moved is not None and float(moved.abs().max()) > 1e-12 * scale:
                shifts[op.outputs[0]] = moved
        if why is None and not any(v in shifts for v in g.outputs):
            yield _proposal(g.params[bias.vid], start)


def _proposal(bias: str, op: Op):
    module = bias.rsplit(".", 1)[0] if "." in bias else ""
    name = f"{bias} cancelled shift"
    reason = (f"the shift that {bias} adds to every element of its channel ({op.name}"
              f"{f' in {op.module}' if op.module else ''}, op {op.index}) is cancelled by linear ops alone "
              "(e.g. avg_pool(x) − x: an average of a constant is that constant) before anything else reads it: "
              "the output does not depend on it, so each entry is a linear law")

    def build(params):
        from ..laws.groups import LinearLaws

        return LinearLaws(name, ((bias, lambda b: b),), params, producer=module, consumer=op.module, reason=reason)

    return build, (bias,), name, module
