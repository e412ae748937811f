"""Fused evaluation of per-unit laws: one compiled pass per record, accumulated in float64.

The per-unit groups of :class:`~torch_conslaw.accounting.Accountant`'s fast path read every
parameter through *rearrangement plans* ``(A, U, B)``: element ``i`` of the flat parameter
belongs to row ``(i // B) % U`` (:func:`~torch_conslaw.lawgroups.rearrangement_plan`). Given
these plans, the whole evaluation of one record is a fixed function of the tracked tensors:

* values: for each parameter, ``x = θ.to(float64)``; each reader sums ``x ∘ x`` over its
  rows; per group, incoming − k · outgoing; all groups concatenated into one float64 vector;
* split (SCIENCE.md §6): ``a = θ⁺.to(float64)``, ``b = θ.to(float64)``, ``d = a − b`` (the
  same float64 Δ as the reference definition); the three products ``a ∘ a``, ``b ∘ d`` and
  ``d ∘ d`` summed the same way give h(θ⁺), B(θ, Δ) and B(Δ, Δ), and the first order is
  2 B(θ, Δ).

:class:`CompiledLaws` traces that function once to an ATen graph (``make_fx``) and compiles
it with TorchInductor (``torch._inductor.compile``: no Dynamo guards at call time, so a call
costs one C++ kernel launch per reduction, from any thread). Inductor fuses the float64
conversion, the products and the sums: each parameter is read in its own dtype and nothing
parameter-sized is written (work memory: the law vectors). It needs a C++ compiler on CPU
(Triton on GPUs); :func:`compiler_available` says whether one is found, and
:class:`~torch_conslaw.accounting.Accountant` falls back to its chunked eager path otherwise.

Exactness: the products are formed in float64 exactly as in the reference (the square of a
float32 is exact in float64; ``d`` is the same float64 difference), so only the order of the
float64 sums differs. Each law of ``n`` products therefore differs from the reference
(:func:`~torch_conslaw.accounting.split_change`) by at most ``2 γ_n Σ|products|`` with
``γ_n = n u / (1 − n u)``, ``u = 2⁻⁵³`` (both sums are within ``γ_n Σ|products|`` of the exact
one); ``tests/test_fused_evaluation.py`` checks this bound on random models.

Example:
    >>> import torch
    >>> compiler_available() in (True, False)
    True
"""

from __future__ import annotations

import functools
import shutil
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["CompiledLaws", "compiler_available", "GroupSpec"]

F64 = torch.float64
Plan = tuple[int, int, int]
# per fast group: (incoming readers, outgoing readers, degree k); a reader is
# (index of its parameter among the tracked tensors, rearrangement plan)
GroupSpec = tuple[list[tuple[int, Plan]], list[tuple[int, Plan]], float]


@functools.cache
def compiler_available(device_type: str = "cpu") -> bool:
    """Whether TorchInductor can compile for ``device_type`` here: a C++ compiler for
    ``"cpu"`` (``$CXX``, ``g++``, ``c++``, ``clang++``), Triton for ``"cuda"``.

    Example:
        >>> compiler_available("cpu") in (True, False)
        True
    """
    if device_type == "cpu":
        import os

        return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.is_available()
    return False


def _rows(x: Tensor, plan: Plan) -> Tensor:
    """Per-row sums ``[U]`` of the flat products ``x`` under ``plan`` (a strided reduction)."""
    a, u, b = plan
    if a == 1 and b == 1:
        return x
    if a == 1:
        return x.view(u, b).sum(1)
    if b == 1:
        return x.view(a, u).sum(0)
    return x.view(a, u, b).sum((0, 2))


def _combine(products: Sequence[Tensor], spec: Sequence[GroupSpec]) -> Tensor:
    """incoming − k · outgoing of every group, concatenated: ``[number of laws]``."""
    out = []
    for incoming, outgoing, degree in spec:
        sides = []
        for readers in (incoming, outgoing):
            total = _rows(products[readers[0][0]], readers[0][1])
            for index, plan in readers[1:]:
                total = total + _rows(products[index], plan)
            sides.append(total)
        out.append(sides[0] - degree * sides[1])
    return torch.cat(out)


def _values_fn(spec: Sequence[GroupSpec], count: int) -> Callable[..., Tensor]:
    def values(*tensors: Tensor) -> Tensor:
        products = []
        for t in tensors:
            x = t.reshape(-1).to(F64)
            products.append(x * x)
        return _combine(products, spec)

    return values


def _split_fn(spec: Sequence[GroupSpec], count: int) -> Callable[..., Tensor]:
    def split(*tensors: Tensor) -> Tensor:
        before, after = tensors[:count], tensors[count:]
        squares, crosses, deltas = [], [], []
        for tb, ta in zip(before, after):
            a = ta.reshape(-1).to(F64)
            b = tb.reshape(-1).to(F64)
            d = a - b  # Δ = θ⁺ − θ, the same float64 difference as the reference
            squares.append(a * a)
            crosses.append(b * d)
            deltas.append(d * d)
        value = _combine(squares, spec)
        first = 2.0 * _combine(crosses, spec)  # 2 B(θ, Δ)
        second = _combine(deltas, spec)  # B(Δ, Δ)
        return torch.stack([value, first, second])

    return split


class CompiledLaws:
    """The fused values and split of fixed per-unit groups, compiled per input layout.

    ``spec`` lists, per group, its incoming and outgoing readers (tensor index, plan) and its
    degree. :meth:`values` returns one float64 vector with every law, :meth:`split` a
    ``[3, laws]`` float64 tensor (h(θ⁺), first order, second order). A kernel is compiled on
    the first call with a given layout of the inputs (shapes, strides, dtypes, device;
    seconds, cached on disk by Inductor) and reused for every later call with that layout.
    CPU kernels run on ``threads`` OpenMP threads, fixed at construction: how a reduction is
    split depends on it, so it is part of the kernel, and results are bitwise the same
    whichever thread calls (or compiled) them.

    Example:
        >>> import torch
        >>> w1, w2 = torch.ones(3, 2), torch.ones(1, 3)
        >>> laws = CompiledLaws([([(0, (1, 3, 2))], [(1, (1, 3, 1))], 1.0)], 2)
        >>> laws.reference_values(w1, w2).tolist()  # ‖w_in‖² − ‖w_out‖² per unit, uncompiled
        [1.0, 1.0, 1.0]
    """

    def __init__(self, spec: Sequence[GroupSpec], count: int, threads: int = 1) -> None:
        self.spec = list(spec)
        self.count = count
        self.threads = threads
        self.reference_values = _values_fn(self.spec, count)
        self.reference_split = _split_fn(self.spec, count)
        self._kernels: dict[tuple, Callable[..., Tensor]] = {}

    def _kernel(self, kind: str, tensors: Sequence[Tensor]) -> Callable[..., Tensor]:
        key = (kind, *((t.shape, t.stride(), t.dtype, t.device) for t in tensors))
        kernel = self._kernels.get(key)
        if kernel is None:
            fn = self.reference_values if kind == "values" else self.reference_split
            kernel = self._kernels[key] = _compile(fn, tensors, self.threads)
        return kernel

    def values(self, tensors: Sequence[Tensor]) -> Tensor:
        """h(θ) of every law, float64 (``[laws]``)."""
        return self._kernel("values", tensors)(*tensors)

    def split(self, before: Sequence[Tensor], after: Sequence[Tensor]) -> Tensor:
        """``[3, laws]``: h(θ⁺), 2 B(θ, Δ) and B(Δ, Δ), float64."""
        tensors = [*before, *after]
        return self._kernel("split", tensors)(*tensors)


def _compile(fn: Callable[..., Tensor], tensors: Sequence[Tensor], threads: int) -> Callable[..., Tensor]:
    """``fn`` traced to ATen ops on fake tensors of the layout of ``tensors`` (no memory, no
    arithmetic) and compiled by TorchInductor (no Dynamo: no guards at call time)."""
    from torch._inductor import compile as inductor_compile
    from torch.fx.experimental.proxy_tensor import make_fx

    examples = [t.detach() for t in tensors]  # only their layout is used: traced on fake tensors
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's own, inside the compiler
        graph = make_fx(fn, tracing_mode="fake")(*examples)
        # the thread count is part of the kernel (how reductions are split): fixed here, not
        # taken from whichever thread compiles, so every caller gets the same bits
        compiled = inductor_compile(graph, examples, options={"cpp.threads": threads})

    def run(*inputs: Tensor) -> Tensor:
        out = compiled(*inputs)
        return out[0] if isinstance(out, (tuple, list)) else out

    return run
