"""Op-graph capture: what a model computes on an example input, one torch function at a time.

One quiet forward pass (eval mode, no gradients, RNG state restored, so training is
unaffected) runs under a ``TorchFunctionMode`` that records every top-level torch function
and tensor method: ``F.linear``, ``torch.addmm`` (the Hugging Face ``Conv1D``), ``.view``,
``__getitem__``, ``torch.matmul``, ``F.scaled_dot_product_attention``, ``.mul`` … Modules
are not leaves: every module is seen through the ops it runs, so an ``RMSNorm`` class is
``pow → mean → rsqrt → mul`` by its weight and an activation class is its function.

Each tensor gets a value id; an op stores its function, its arguments with tensors replaced
by :class:`Val` references (plain numbers, shapes, slices and dtypes kept as they are), the
shapes of its values, and which parameter each parameter argument is. Small integer and
boolean tensors (indices, masks) keep their values, so index ops can be replayed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> g = capture(nn.Sequential(nn.Linear(3, 2), nn.ReLU()), torch.randn(4, 3))
    >>> [op.name for op in g.ops]
    ['linear', 'relu']
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..nested import leaves

__all__ = ["Val", "Op", "OpGraph", "capture", "kept_buffers"]

_KEEP_VALUES_MAX = 1 << 16  # integer/bool tensors up to this size keep their values


@dataclass(frozen=True)
class Val:
    """A reference to a recorded tensor value (``vid``) inside an op's arguments."""

    vid: int


@dataclass
class Op:
    """One recorded call: ``name`` (``linear``, ``view``, ``__getitem__``, ...), the callable,
    the arguments with tensors as :class:`Val`, the value ids read (``inputs``) and written
    (``outputs``, in the structure of the result as ``out``)."""

    index: int
    name: str
    func: Any
    args: tuple
    kwargs: dict
    inputs: list[int]
    out: Any
    outputs: list[int]
    module: str = ""  # path of the innermost module running when the op was called


@dataclass
class OpGraph:
    """The captured graph: ``ops`` in call order, ``shapes`` / ``dtypes`` of every value,
    ``params`` (value id → qualified parameter name), ``inputs`` / ``outputs`` (value ids),
    ``consts`` (kept values of small integer tensors), ``users`` (value id → ops reading it,
    live ops only), ``live`` (ops whose result reaches the output) and ``producers`` (value id
    → the op that wrote it; every output is a new value, so there is one)."""

    ops: list[Op]
    shapes: dict[int, tuple[int, ...]]
    dtypes: dict[int, torch.dtype]
    params: dict[int, str]
    inputs: list[int]
    outputs: list[int]
    consts: dict[int, Tensor]
    users: dict[int, list[int]] = field(default_factory=dict)
    live: set[int] = field(default_factory=set)
    producers: dict[int, int] = field(default_factory=dict)
    scalars: dict[int, float] = field(default_factory=dict)  # values of one-element floating tensors (not parameters)
    # ops that read a value written in place after it was recorded (a view taken before an
    # in-place write to its base, or the base after a write through a view): the graph holds
    # the value before the write, the model reads it after
    stale_reads: list[str] = field(default_factory=list)

    def producer(self, v: int) -> Op | None:
        """The op that wrote value ``v`` (None for an input, a parameter or a constant)."""
        index = self.producers.get(v)
        return None if index is None else self.ops[index]

    def param_uses(self) -> dict[str, int]:
        """How many live ops read each parameter (a law needs exactly one)."""
        counts: dict[str, int] = {}
        for vid, name in self.params.items():
            counts[name] = counts.get(name, 0) + len(self.users.get(vid, []))
        return counts

    def slice_of(self, x: Any) -> tuple[str, int] | None:
        """(parameter, e) when the value ``x`` is ``W[e]`` for a parameter W and a constant
        integer e (a Python int or a kept 0-dim integer tensor): one expert's weight."""
        if not isinstance(x, Val):
            return None
        op = self.producer(x.vid)
        if op is None or op.name not in ("__getitem__", "select") or len(op.outputs) != 1 or op.kwargs:
            return None
        args = op.args if op.name == "__getitem__" else (op.args[0], op.args[2]) if len(op.args) == 3 and op.args[1] == 0 else ()
        if len(args) != 2 or not isinstance(args[0], Val) or args[0].vid not in self.params:
            return None
        index = args[1]
        if isinstance(index, Val):
            index = self.consts.get(index.vid)
            if index is None or index.dim() != 0 or index.is_floating_point() or index.dtype == torch.bool:
                return None
            index = int(index)
        if not isinstance(index, int) or isinstance(index, bool):
            return None
        size = self.shapes[args[0].vid][0] if self.shapes[args[0].vid] else 0
        if not -size <= index < size:
            return None
        return self.params[args[0].vid], index % size

    def slice_uses(self) -> dict[str, dict[int, tuple[int, int]]]:
        """Per parameter read through constant slices ``W[e]`` (see :meth:`slice_of`): for each
        e, (how many ops take that slice, how many ops read what they take). An expert's law
        needs its slice taken once and read once, and W read through such slices only."""
        out: dict[str, dict[int, tuple[int, int]]] = {}
        for vid in self.params:
            for user in self.users.get(vid, []):
                op = self.ops[user]
                found = self.slice_of(Val(op.outputs[0])) if len(op.outputs) == 1 else None
                if found is not None:
                    taken, reads = out.setdefault(found[0], {}).get(found[1], (0, 0))
                    out[found[0]][found[1]] = (taken + 1, reads + len(self.users.get(op.outputs[0], [])))
        return out


_flat = leaves  # the finders' walk over nested outputs


class _Capture(TorchFunctionMode):
    def __init__(self, graph: OpGraph, param_names: dict[int, str]) -> None:
        super().__init__()
        self.g = graph
        self.param_names = param_names
        self.vid_of: dict[int, int] = {}
        self.keep: list[Tensor] = []  # tensors stay alive during capture: ids are not reused
        self.stack: list[str] = []  # module paths being run (forward pre/post hooks)
        self.by_storage: dict[int, list[int]] = {}  # storage address → values recorded in it
        self.stale: dict[int, tuple[str, bool]] = {}  # value → (the in-place write that changed it, the write reads θ)
        self.depends: set[int] = set()  # values computed from a parameter
        self.tensor_of: dict[int, Tensor] = {}  # value → the tensor that held it when recorded
        self.made_by: dict[int, Op] = {}  # value → the op that wrote it

    def value(self, t: Tensor) -> int:
        """The value id of ``t``, registering parameters and unseen tensors (constants)."""
        vid = self.vid_of.get(id(t))
        if vid is None:
            vid = self.new_value(t)
            name = self.param_names.get(id(t))
            if name is not None:
                self.g.params[vid] = name
                self.depends.add(vid)
        return vid

    def new_value(self, t: Tensor) -> int:
        vid = len(self.g.shapes)
        self.g.shapes[vid] = tuple(t.shape)
        self.g.dtypes[vid] = t.dtype
        if not t.is_floating_point() and not t.is_complex() and t.numel() <= _KEEP_VALUES_MAX:
            self.g.consts[vid] = t.detach().clone()
        elif t.is_floating_point() and t.numel() == 1 and not isinstance(t, nn.Parameter):
            self.g.scalars[vid] = float(t.detach().reshape(()))
        self.vid_of[id(t)] = vid
        self.keep.append(t)
        self.tensor_of[vid] = t
        key = _storage_key(t)
        if key is not None:
            self.by_storage.setdefault(key, []).append(vid)
        return vid

    def refs(self, obj: Any, inputs: list[int]) -> Any:
        if isinstance(obj, Tensor):
            vid = self.value(obj)
            inputs.append(vid)
            return Val(vid)
        if isinstance(obj, tuple):
            return tuple(self.refs(o, inputs) for o in obj)
        if isinstance(obj, list):
            return [self.refs(o, inputs) for o in obj]
        if isinstance(obj, dict):
            return {k: self.refs(v, inputs) for k, v in obj.items()}
        return obj

    def outs(self, obj: Any, outputs: list[int]) -> Any:
        if isinstance(obj, Tensor):
            vid = self.new_value(obj)
            outputs.append(vid)
            return Val(vid)
        if isinstance(obj, (tuple, list)):
            return tuple(self.outs(o, outputs) for o in obj)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if name == "__get__":  # a property such as x.T / x.mT
            name = "get_" + getattr(getattr(func, "__self__", None), "__name__", "?")
        inputs: list[int] = []
        rargs = self.refs(args, inputs)
        rkwargs = self.refs(kwargs, inputs)
        out = func(*args, **kwargs)
        if name.startswith("get_") and not isinstance(out, Tensor):
            return out  # x.shape, x.dtype, ...
        inplace = name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))
        if name in ("__setitem__", "copy_") and args and isinstance(args[0], Tensor) and self._fill(name, args, kwargs, rargs):
            return out
        outputs: list[int] = []
        if inplace and args and isinstance(args[0], Tensor):
            rout: Any = self.outs(args[0], outputs)  # the mutated tensor is a new value
        else:
            rout = self.outs(out, outputs)
        if outputs:
            module = self.stack[-1] if self.stack else ""
            where = f"{name} (op {len(self.g.ops)}{', in ' + module if module else ''})"
            # x.new_empty(...), torch.zeros_like(x): a fresh tensor that takes only x's shape / dtype
            fresh = name.startswith("new_") or name.endswith("_like")
            reads_theta = not fresh and any(v in self.depends for v in inputs)
            if reads_theta:
                self.depends.update(outputs)
            # a stale read matters where the graph holds a θ-dependent value that the model no longer
            # reads (its units or shifts would be followed to a reader that sees something else); a
            # θ-free buffer filled through views (DeepSeek-V3's key_states[..., :d].copy_(k)) stays a
            # constant in the graph, and the in-place write that fills it stops the units written
            stale = [self.stale[v][0] for v in inputs if v in self.stale and v in self.depends]
            if stale:
                self.g.stale_reads.append(f"{where} reads a value that {stale[0]} wrote in place after it was taken")
            # a write: x.add_(...), x[i] = v, x += y (__iadd__ returns x), F.relu(x, inplace=True);
            # not an op that returns its input unchanged (x.to(its own dtype), x.contiguous())
            written = inplace or (name.startswith("__i") and name.endswith("__")) or kwargs.get("inplace") is True
            if written and name not in _NOT_WRITES and args and isinstance(args[0], Tensor):
                key = _storage_key(args[0])
                for v in self.by_storage.get(key, []) if key is not None else []:
                    if v not in outputs:  # every earlier value in the written memory now differs from its record
                        self.stale.setdefault(v, (where, reads_theta))
            self._append(Op(len(self.g.ops), name, func, rargs, rkwargs, list(dict.fromkeys(inputs)), rout, outputs, module))
        return out

    def _append(self, op: Op) -> None:
        self.g.ops.append(op)
        self.made_by.update(dict.fromkeys(op.outputs, op))

    def _fill(self, name: str, args: tuple, kwargs: dict, rargs: tuple) -> bool:
        """Record ``base[index] = src`` and ``base[index].copy_(src)`` as what they compute:
        base′ = :func:`filled` (base, index, src), then the view again, base′[index], so what
        the model reads afterwards holds src's values (DeepSeek-V3 assembles its keys as
        ``k = x.new_empty(...); k[..., :d].copy_(k_nope); k[..., d:].copy_(k_rot)``). Returns
        False (the write is recorded as it is) for any other form."""
        if name == "__setitem__":
            if len(rargs) != 3 or not isinstance(rargs[0], Val):
                return False
            base_val, index, src, view = rargs[0], rargs[1], rargs[2], None
        else:
            made = self.made_by.get(self.vid_of.get(id(args[0]), -1))
            if len(rargs) != 2 or kwargs or made is None or made.name != "__getitem__" or len(made.args) != 2:
                return False
            base_val, index, src, view = made.args[0], made.args[1], rargs[1], args[0]
            if not isinstance(base_val, Val) or self.vid_of.get(id(self.tensor_of.get(base_val.vid))) != base_val.vid:
                return False  # the base was written again since the view was taken
            if view._base is None or _storage_key(view) != _storage_key(self.tensor_of[base_val.vid]):
                return False  # x[index_tensor] is a copy: writing into it leaves x as it is
        base = self.tensor_of[base_val.vid]
        reads = [base_val.vid] + value_ids((index, src))
        module = self.stack[-1] if self.stack else ""
        where = f"{name} (op {len(self.g.ops)}{', in ' + module if module else ''})"
        stale = [self.stale[v][0] for v in reads if v in self.stale and v in self.depends]
        if stale:
            self.g.stale_reads.append(f"{where} reads a value that {stale[0]} wrote in place after it was taken")
        reads_theta = any(v in self.depends for v in reads)
        key = _storage_key(base)
        before = list(self.by_storage.get(key, [])) if key is not None else []
        new_base = self.new_value(base)
        self._append(Op(len(self.g.ops), "__setitem__", filled, (base_val, index, src), {}, list(dict.fromkeys(reads)),
                        Val(new_base), [new_base], module))
        written = [new_base]
        if view is not None:
            new_view = self.new_value(view)
            self._append(Op(len(self.g.ops), "__getitem__", Tensor.__getitem__, (Val(new_base), index), {},
                            [new_base] + value_ids(index), Val(new_view), [new_view], module))
            written.append(new_view)
        if reads_theta:
            self.depends.update(written)
        for v in before:  # every earlier value in the written memory now differs from its record
            self.stale.setdefault(v, (where, reads_theta))
        return True


def value_ids(obj: Any) -> list[int]:
    """The value ids referenced in recorded arguments (tuples, lists and dicts of them)."""
    if isinstance(obj, Val):
        return [obj.vid]
    if isinstance(obj, (tuple, list)):
        return [v for o in obj for v in value_ids(o)]
    if isinstance(obj, dict):
        return [v for o in obj.values() for v in value_ids(o)]
    return []


def filled(base: Tensor, index: Any, src: Any) -> Tensor:
    """``base`` with ``base[index] = src``, out of place: how the graph records an in-place fill.

    Example:
        >>> import torch
        >>> filled(torch.zeros(2, 3), (slice(None), slice(1, None)), torch.ones(2, 2)).tolist()
        [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    """
    out = base.clone()
    out[index] = src
    return out


_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "pin_memory"}


def _storage_key(t: Tensor) -> int | None:
    """The address of ``t``'s memory (tensors that share it are views of each other), or None."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # a tensor subclass or layout without plain storage
        return None
    return ptr or None  # a meta or empty tensor has no address


def _split_input(example_input: Any) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of ``model(...)`` for an example input: a dict is
    keyword arguments, a tuple or list positional ones, anything else the one argument."""
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


_WARNED_WRITES: set[int] = set()


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Around a forward pass that torch_conslaw runs on the user's model: the buffers that the
    forward writes in place (a running mean updated in ``forward``, a step counter; eval mode
    already stops the norms' running statistics) are put back, so that training goes on as
    without the monitor, bit for bit. A parameter that the forward writes in place
    (``w.clamp_`` under ``no_grad``, ``F.embedding(..., max_norm=...)``) cannot be put back
    without a copy of every parameter: a warning names it.

    Example:
        >>> class Counter(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_buffer("n", torch.zeros(()))
        ...     def forward(self, x):
        ...         self.n += 1
        ...         return x
        >>> m = Counter()
        >>> with kept_buffers(m):
        ...     _ = m(torch.ones(1))
        >>> float(m.n)
        0.0
    """
    def version(t: Tensor) -> int | None:
        try:
            return t._version
        except Exception:  # an inference tensor has no version counter
            return None

    buffers = [(n, b, version(b), b.detach().clone()) for n, b in model.named_buffers() if isinstance(b, Tensor)]
    params = [(n, p, version(p)) for n, p in model.named_parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for _, b, v, saved in buffers:
                if version(b) != v:
                    b.copy_(saved)
        written = [n for n, p, v in params if version(p) != v]
        if written and id(model) not in _WARNED_WRITES:  # once per model: every forward writes them again
            _WARNED_WRITES.add(id(model))
            warnings.warn(
                f"{type(model).__name__}'s forward writes parameter(s) {', '.join(written[:5])} in place "
                "(an in-place op on a parameter, e.g. w.clamp_() under no_grad or F.embedding(max_norm=...)): "
                "the example forward that torch_conslaw ran changed them as one training forward would; "
                "the laws found assume the parameters change only through the optimizer",
                stacklevel=3,
            )


def capture(model: nn.Module, example_input: Any) -> OpGraph:
    """Record what ``model`` computes on ``example_input`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments), quietly: eval mode, no gradients, the RNG
    state restored and the train flags put back, so training is unaffected.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> g = capture(nn.Linear(3, 2), torch.randn(4, 3))
        >>> sorted(g.params.values())
        ['bias', 'weight']
    """
    args, kwargs = _split_input(example_input)
    graph = OpGraph([], {}, {}, {}, [], [], {})
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    rec = _Capture(graph, names)
    for a in _flat((args, kwargs)):
        if isinstance(a, Tensor):
            graph.inputs.append(rec.value(a))
    training = {m: m.training for m in model.modules()}
    handles = []

    def enter(path: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            rec.stack.append(path)
        return hook

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        rec.stack.pop()

    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(path)))
        handles.append(module.register_forward_hook(leave))
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad(), kept_buffers(model), rec:
            out = model(*args, **kwargs)
        graph.outputs = [rec.vid_of[id(o)] for o in _flat(out) if isinstance(o, Tensor) and id(o) in rec.vid_of]
    finally:
        for m, flag in training.items():
            m.train(flag)
        for h in handles:
            h.remove()
        rec.keep.clear()
    _link(graph)
    return graph


def _link(graph: OpGraph) -> None:
    """Mark the live ops (their result reaches an output) and index the users and the producer
    of each value."""
    need = set(graph.outputs)
    for op in reversed(graph.ops):
        if any(v in need for v in op.outputs):
            graph.live.add(op.index)
            need.update(op.inputs)
    for op in graph.ops:
        graph.producers.update(dict.fromkeys(op.outputs, op.index))
        if op.index in graph.live:
            for v in op.inputs:
                graph.users.setdefault(v, []).append(op.index)
