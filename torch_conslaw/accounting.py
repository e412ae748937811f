"""Exact accounting of a step: law values and the first/second-order split.

For a quadratic law h(θ) = B(θ, θ) and a step Δ = θ⁺ − θ (SCIENCE.md §6)::

    h(θ⁺) − h(θ) = 2 B(θ, Δ)  +  B(Δ, Δ)
                   first order   second order

Under plain SGD the first-order part vanishes (up to float64 rounding); a nonzero first-order
part shows that the training setup breaks the law.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw.lawgroups import build_groups
    >>> from torch_conslaw.structure import find_structure
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> groups = build_groups(find_structure(model).pairs)
    >>> before = {n: p.detach().clone() for n, p in model.named_parameters()}
    >>> after = {n: p + 0.1 for n, p in before.items()}
    >>> values, first, second = split_change(groups, before, after)
    >>> bool(torch.allclose(values["0→2"] - groups[0].values(before), first["0→2"] + second["0→2"]))
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .evaluation import CompiledLaws, GroupSpec, compiler_available
from .lawgroups import LawGroup, UnitLaws, rearrangement_plan
from .native import NativeLaws, native_status

__all__ = ["Accountant", "split_change", "evaluate", "as_float64", "EVALUATIONS"]

F64 = torch.float64
EVALUATIONS = ("auto", "eager", "compiled", "native")  # how Accountant evaluates the per-unit groups
#: ``evaluation="auto"`` fuses from this many tracked elements of per-unit laws on (below, an
#: eager record costs well under a millisecond and a build would not pay off)
AUTO_COMPILE_ELEMENTS = 2**18


def as_float64(params: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """Detached float64 copies of the named tensors (each converted once, whatever its dtype)."""
    return {n: params[n].detach().to(F64) for n in names}


def evaluate(groups: Sequence[LawGroup], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """h(θ) of every group, float64.

    Example:
        >>> evaluate([], {})
        {}
    """
    with torch.no_grad():
        return {g.name: g.values(params) for g in groups}


def split_change(
    groups: Sequence[LawGroup], before: Mapping[str, Tensor], after: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """h(after), first order 2B(before, Δ) and second order B(Δ, Δ) of every group, float64."""
    names = sorted({n for g in groups for n in g.parameter_names})
    with torch.no_grad():
        b64 = as_float64(before, names)
        a64 = as_float64(after, names)
        delta = {n: a64[n] - b64[n] for n in names}
        values = {g.name: g.values(a64) for g in groups}
        first = {g.name: g.first_order(b64, delta) for g in groups}  # 2B(θ, Δ) for quadratic laws
        second = {g.name: g.second_order(delta) for g in groups}  # B(Δ, Δ); 0 for linear laws
    return values, first, second


_CHUNK = 2**16  # CPU: elements per chunk, 512 KiB per float64 row, so the work stays in cache
_CHUNK_ACCELERATOR = 2**24  # GPU: few, large launches (cache blocking matters less than launches)
_SCRATCH_SHARE = 8  # the scratch rows hold at most 1/8 of the tracked elements each


def _chunk_length(device: torch.device, total: int) -> int:
    """Elements per chunk: cache-sized on CPUs, launch-sized on accelerators, and never more
    than ``total / _SCRATCH_SHARE`` (so the float64 scratch stays under the parameters'
    float32 bytes whatever the model; from 2**19 tracked elements on, it is the fixed
    512 KiB per row of ``_CHUNK``: fewer, larger chunks cost fewer tensor operations)."""
    base = _CHUNK if device.type == "cpu" else _CHUNK_ACCELERATOR
    return max(1024, min(base, total // _SCRATCH_SHARE))


def view_plan(reader: Any, shape: tuple[int, ...], units: int) -> tuple[int, int, int] | None:
    """The plan ``(A, U, B)`` of :func:`~torch_conslaw.lawgroups.rearrangement_plan`, read off
    the strides when ``reader`` returns a view of its input, with no data at all: the reader
    runs on a ``meta`` tensor of ``shape`` (no memory), and a view whose dimensions tile the
    input densely, the unit dimension of stride B, puts element i in row (i // B) % U.
    ``None`` when the reader does anything else (a copy, arithmetic, an in-place edit, a
    failure on meta tensors); the caller then probes with data.

    Example:
        >>> view_plan(lambda w: w, (3, 4), 3), view_plan(lambda w: w.T, (3, 4), 4)
        ((1, 3, 4), (3, 4, 1))
        >>> view_plan(lambda w: w.flatten(1), (8, 2, 3, 3), 8), view_plan(lambda w: 2 * w, (3, 4), 3)
        ((1, 8, 18), None)
    """
    n = math.prod(int(d) for d in shape)
    if units <= 0 or n == 0 or n % units:
        return None
    w = torch.empty(shape, device="meta")
    version = w._version
    try:
        with torch.no_grad():
            out = reader(w)
    except Exception:  # e.g. a reader that needs data: the caller probes instead
        return None
    if not isinstance(out, Tensor) or out.dtype != w.dtype or out.dim() < 1 or w._version != version:
        return None
    if not (out is w or out._base is w) or out.shape[0] != units or out.numel() != n or out.storage_offset():
        return None
    expected, unit_stride = 1, None
    dims = sorted((st, sz, i == 0) for i, (sz, st) in enumerate(zip(out.shape, out.stride())) if sz != 1)
    for stride, size, is_unit in dims:
        if stride != expected:  # overlapping or with gaps: not each element exactly once
            return None
        if is_unit:
            unit_stride = stride
        expected *= size
    b = n if units == 1 else unit_stride
    assert b is not None
    return (n // (units * b), units, b)


def _as_view(reader: Any, shape: tuple[int, ...], units: int) -> Any:
    """The view that a ``Rows`` / ``Columns`` reader of every row / column in order equals
    (``w`` or ``w.movedim(1, 0)``, unit axis split as the reader's indices), so that
    :func:`view_plan` reads its plan off the strides instead of probing it with data;
    ``None`` for any other reader."""
    from .laws.families.rescaling import Columns, Rows

    if not isinstance(reader, (Rows, Columns)) or reader.idx.dim() < 1 or reader.idx.shape[0] != units:
        return None
    idx, axis = reader.idx, 0 if isinstance(reader, Rows) else 1
    if len(shape) <= axis or shape[axis] != idx.numel() or not torch.equal(idx.reshape(-1).cpu(), torch.arange(idx.numel())):
        return None
    if isinstance(reader, Columns):
        return lambda w: w.movedim(1, 0).unflatten(0, tuple(idx.shape))
    if len(shape) == 1:
        return lambda w: w.unflatten(0, tuple(idx.shape)).unsqueeze(-1)
    return lambda w: w.unflatten(0, tuple(idx.shape))


class _Use:
    """One reader of a fast group: parameter elements ``i`` go to row ``(i // B) % U``.

    Its result ``[rows, U]`` lives in a persistent buffer, filled chunk by chunk: for ``A = 1``
    a chunk of whole rows gives a slice of the result, for ``A > 1`` a chunk of whole
    ``U × B`` blocks gives a partial sum over all rows (accumulated through ``partial``).
    """

    __slots__ = ("a", "u", "b", "block", "results", "partials")

    def __init__(self, plan: tuple[int, int, int]) -> None:
        self.a, self.u, self.b = plan
        self.block = self.b if self.a == 1 else self.u * self.b  # chunks are multiples of this
        self.results: dict[int, Tensor] = {}  # rows → [rows, U]
        self.partials: dict[int, Tensor] = {}

    def steps(self, x: Tensor, start: int) -> tuple[int, Tensor, Tensor, Tensor | None]:
        """(kind, input view, output, partial) that accumulate chunk ``x`` ([rows, m]) of the
        elements ``start … start + m − 1`` into ``results[rows]`` (a ``[rows, U]`` view of the
        plan's lanes, see :meth:`_FastPlan.bind`; views built once)."""
        rows, m = x.shape
        res = self.results[rows]
        if self.a == 1:
            u0 = start // self.b
            out = res[:, u0 : u0 + m // self.b]
            if self.b == 1:
                return (0, x, out, None)  # the products themselves (e.g. a bias)
            return (1, x.view(rows, m // self.b, self.b), out, None)
        view = x.view(rows, m // self.block, self.u, self.b)
        if start == 0:
            return (2, view, res, None)
        if rows not in self.partials:
            self.partials[rows] = torch.empty(rows, self.u, dtype=F64, device=x.device)
        return (3, view, self.partials[rows], res)


def _run(steps: list[tuple[int, Tensor, Tensor, Tensor | None]]) -> None:
    for kind, view, out, res in steps:
        if kind == 1:
            torch.sum(view, 2, out=out)
        elif kind == 0:
            out.copy_(view)
        elif kind == 2:
            torch.sum(view, (1, 3), out=out)
        else:
            torch.sum(view, (1, 3), out=out)
            res.add_(out)  # type: ignore[union-attr]


class _ParamWork:
    """The fast-path readers of one parameter and its chunks (aligned to every reader)."""

    __slots__ = ("name", "numel", "uses", "chunks")

    def __init__(self, name: str, numel: int, uses: list[_Use], chunk: int) -> None:
        self.name, self.numel, self.uses = name, numel, uses
        align = 1
        for use in uses:
            align = math.lcm(align, use.block)  # divides numel
        length = max(align, (chunk // align) * align)
        self.chunks = [(s, min(s + length, numel)) for s in range(0, numel, length)]


class _FastPlan:
    """Per-unit groups whose readers all rearrange elements (see
    :func:`~torch_conslaw.lawgroups.rearrangement_plan`), evaluated parameter by parameter in
    chunks through a small float64 scratch buffer ``[rows, chunk]``: row 0 holds θ (after) and
    becomes θ∘θ in place; for the split, row 2 holds Δ and becomes Δ∘Δ in place and row 1
    receives θ_before∘Δ. Each reader sums the chunk's products into its result. The scratch
    stays in cache and nothing parameter-sized is written (this work is memory-bound; a flat
    parameter-sized buffer measured ~1.5 ms slower per split step on the benchmark MLP).
    Every view is built once, so a call costs a few tensor ops per chunk and reader.
    """

    def __init__(self, groups: list[LawGroup], names: list[str], params: Mapping[str, Tensor]) -> None:
        tensors = [params[n] for n in names]
        self.shapes = [t.shape for t in tensors]
        self.device = tensors[0].device
        shape_of = dict(zip(names, self.shapes))
        self.fast: list[tuple[LawGroup, list[_Use], list[_Use], float]] = []
        self.generic: list[LawGroup] = []
        uses_of: dict[str, list[_Use]] = {}
        readers: list[tuple[list[tuple[str, _Use]], list[tuple[str, _Use]], float]] = []
        for g in groups:
            sides = self._plan(g, shape_of)
            if sides is None:
                self.generic.append(g)
                continue
            self.fast.append((g, [u for _, u in sides[0]], [u for _, u in sides[1]], float(g.degree)))
            readers.append((sides[0], sides[1], float(g.degree)))
            for name, use in sides[0] + sides[1]:
                uses_of.setdefault(name, []).append(use)
        chunk = _chunk_length(self.device, sum(shape_of[n].numel() for n in uses_of))
        self.work = [_ParamWork(n, shape_of[n].numel(), uses_of[n], chunk) for n in names if n in uses_of]
        # the same evaluation as data, for the fused kernel (torch_conslaw.evaluation)
        self.fast_names = [w.name for w in self.work]
        index = {n: i for i, n in enumerate(self.fast_names)}
        self.spec: list[GroupSpec] = [
            tuple([(index[n], (u.a, u.u, u.b)) for n, u in side] for side in (inc, out)) + (degree,)  # type: ignore[misc]
            for inc, out, degree in readers
        ]
        self.counts = [g.count for g, *_ in self.fast]
        self.generic_names = sorted({n for g in self.generic for n in g.parameter_names})
        self.longest = max((e - s for w in self.work for s, e in w.chunks), default=0)
        # rows → per parameter: [(start, end, rows of the scratch, reader steps)]
        self.views: dict[int, list[list[tuple[int, int, tuple[Tensor, ...], list]]]] = {}
        # the flat layout of the fast groups: group i owns columns offsets[i] … + counts[i];
        # reader j of a side writes lane j of that side (absent readers leave zeros)
        self.offsets = [sum(self.counts[:i]) for i in range(len(self.counts))]
        self.lane_count = tuple(max((len(f[k]) for f in self.fast), default=0) for k in (1, 2))
        self.lanes: dict[int, tuple[Tensor, Tensor]] = {}  # rows → (incoming, outgoing) [lanes, rows, laws]
        self.degrees: Tensor | None = None  # k of each law, made on the eager path's first use

    @staticmethod
    def _plan(g: LawGroup, shape_of: dict[str, torch.Size]) -> tuple[list, list] | None:
        if not isinstance(g, UnitLaws) or g.shifts:  # a shifted law reads θ + c: the generic path
            return None
        sides = []
        for readers in (g.pair.incoming, g.pair.outgoing):
            side = []
            for name, fn in readers:
                plan = view_plan(_as_view(fn, tuple(shape_of[name]), g.count) or fn, tuple(shape_of[name]), g.count)
                if plan is None:
                    plan = rearrangement_plan(fn, tuple(shape_of[name]), g.count)
                if plan is None:
                    return None
                side.append((name, _Use(plan)))
            if not side:
                return None
            sides.append(side)
        return sides[0], sides[1]

    def matches(self, tensors: list[Tensor]) -> bool:
        device = self.device
        for t, shape in zip(tensors, self.shapes):
            if t.shape != shape or t.device != device:
                return False
        return True

    def bind(self, rows: int) -> list[list[tuple[int, int, tuple[Tensor, ...], list]]]:
        """The views for ``rows`` product rows (1: values, 3: split), built on first use."""
        views = self.views.get(rows)
        if views is None:
            total = sum(self.counts)
            lanes = tuple(torch.zeros(n, rows, total, dtype=F64, device=self.device) for n in self.lane_count)
            for (_, inc, out, _), start, count in zip(self.fast, self.offsets, self.counts):
                for side, uses in zip(lanes, (inc, out)):
                    for j, use in enumerate(uses):
                        use.results[rows] = side[j, :, start : start + count]
            self.lanes[rows] = lanes  # type: ignore[assignment]
            scratch = torch.empty(rows, self.longest, dtype=F64, device=self.device)
            views = []
            for w in self.work:
                chunks = []
                for s, e in w.chunks:
                    x = scratch[:, : e - s]
                    steps = [use.steps(x, s) for use in w.uses]
                    chunks.append((s, e, (x, *x.unbind(0)), steps))
                views.append(chunks)
            self.views[rows] = views
        return views

    def release(self) -> None:
        """Free the scratch rows and lanes of the eager path (built again on its next use)."""
        self.views.clear()
        self.lanes.clear()
        for _, inc, out, _ in self.fast:
            for use in inc + out:
                use.results.clear()
                use.partials.clear()

    def values(self, params: Mapping[str, Tensor]) -> Tensor:
        """``[1, laws]``: h(θ) of the fast groups, in their order."""
        for w, chunks in zip(self.work, self.bind(1)):
            flat = params[w.name].detach().reshape(-1)
            whole = len(chunks) == 1
            for s, e, (x, theta), steps in chunks:
                theta.copy_(flat if whole else flat[s:e])  # exact conversion to float64
                x.mul_(x)  # a float32 square is exact in float64
                _run(steps)
        return self._combine(1)

    def split(self, before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> Tensor:
        """``[3, laws]``: h(θ⁺), 2 B(θ, Δ) and B(Δ, Δ) of the fast groups, in their order."""
        for w, chunks in zip(self.work, self.bind(3)):
            flat_a = after[w.name].detach().reshape(-1)
            flat_b = before[w.name].detach().reshape(-1)
            whole = len(chunks) == 1
            for s, e, (_, theta, cross, delta), steps in chunks:
                theta.copy_(flat_a if whole else flat_a[s:e])
                cross.copy_(flat_b if whole else flat_b[s:e])  # exact; float64 ops below vectorize
                torch.sub(theta, cross, out=delta)  # Δ = θ⁺ − θ
                cross.mul_(delta)  # θ∘Δ
                theta.mul_(theta)
                delta.mul_(delta)
                _run(steps)
        table = self._combine(3)
        table[1].mul_(2.0)
        return table

    def scales(self) -> Tensor:
        """``[laws]``: incoming + k · outgoing of the last :meth:`values` call (the natural
        scale ‖w_in‖² + b² + k‖w_out‖²)."""
        return self._combine(1, sign=1.0)[0]

    def _combine(self, rows: int, sign: float = -1.0) -> Tensor:
        """``[rows, laws]``: incoming − k · outgoing (``sign=+1``: incoming + k · outgoing) of
        every fast group, a fresh tensor (it belongs to the caller): a few tensor operations
        whatever the number of groups."""
        totals = []
        for lanes in self.lanes[rows]:
            acc = lanes[0]
            if len(lanes) > 1:
                acc = acc + lanes[1]
                for lane in lanes[2:]:
                    acc.add_(lane)
            totals.append(acc)
        if self.degrees is None:  # per law, for the eager path only
            counts = torch.tensor([g.count for g, *_ in self.fast], device=self.device)
            degrees = torch.tensor([f[3] for f in self.fast], dtype=F64, device=self.device)
            self.degrees = degrees.repeat_interleave(counts)
        return torch.addcmul(totals[0], totals[1], self.degrees, value=sign)


class Accountant:
    """:func:`evaluate` and :func:`split_change` for a fixed set of groups, without a float64
    copy of the parameters (the monitor's hot path).

    Per-unit groups whose readers only rearrange elements (every built-in layer) take a fast
    path: each parameter is read once, in its own dtype, in cache-sized chunks converted to
    float64, where the elementwise products θ∘θ (and, for the split, θ_before∘Δ and Δ∘Δ) are
    formed in place and summed by every reader of that parameter (both sides of a weight
    matrix use the same products; no transposed or reshaped copies, nothing parameter-sized is
    written). ``before`` may be in the parameters' own dtype: its conversion to float64 is
    exact, so the split equals the one against a float64 copy bit for bit. Squares of float32
    values are exact in float64, so the results equal :func:`evaluate` / :func:`split_change`
    up to float64 summation order. Other groups (matrix laws, custom readers) use
    :meth:`LawGroup.values` / :meth:`LawGroup.bilinear` on float64 copies of that one group's
    parameters, made when the group is evaluated and freed right after (work memory: the
    largest such group, never all parameters).

    ``evaluation="compiled"`` evaluates the fast groups instead with one fused kernel per
    record (:class:`~torch_conslaw.evaluation.CompiledLaws`: TorchInductor, compiled on the
    first call with a given input layout, seconds): each parameter is read once in its own
    dtype, converted, multiplied and summed in registers, with no scratch at all. The float64
    products are the same; only the summation order differs (bound in
    :mod:`torch_conslaw.evaluation`). Without a compiler, or when compiling fails, it warns
    and stays on the eager path. :meth:`initial` (values and scales, once) runs eagerly, or
    through the native kernel when that is the evaluation (the same sums as its records).
    ``evaluation="native"`` uses :class:`~torch_conslaw.native.NativeLaws` instead (CPU: a C
    kernel built once per machine that reads each parameter once, contiguously, for all its
    readers; the same products and bound). ``evaluation="auto"``, where the per-unit laws read
    at least :data:`AUTO_COMPILE_ELEMENTS` elements, picks native on the CPU and compiled on
    GPUs where they are available, and stays eager otherwise, without a warning
    (:attr:`evaluation` then says which one runs, :attr:`evaluation_reason` why);
    :meth:`prepare` builds the kernels ahead of the first record.
    The kernels use the torch thread count of the thread that built the accountant, whichever
    thread calls them (a recorder's worker too), so records stay bitwise equal across recorders.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_conslaw.lawgroups import build_groups
        >>> from torch_conslaw.structure import find_structure
        >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> acc = Accountant(build_groups(find_structure(model).pairs))
        >>> acc.values(dict(model.named_parameters()))["0→2"].dtype
        torch.float64
    """

    def __init__(self, groups: Sequence[LawGroup], evaluation: str = "eager") -> None:
        if evaluation not in EVALUATIONS:
            raise ValueError(
                f"Accountant: evaluation must be one of {', '.join(map(repr, EVALUATIONS))}, got {evaluation!r}"
            )
        self.groups = list(groups)
        self.names = sorted({n for g in self.groups for n in g.parameter_names})
        self._fast: _FastPlan | None = None
        self.requested = evaluation
        self.evaluation = "eager" if evaluation == "auto" else evaluation  # resolved with the plan
        self.evaluation_reason = "requested" if evaluation != "auto" else "auto: not resolved yet (no evaluation ran)"
        self._threads = torch.get_num_threads()  # the compiled kernels' (the constructing thread's)
        self._fused_laws: CompiledLaws | NativeLaws | None = None
        self._fused_for: _FastPlan | None = None  # the plan the kernels were built for
        self._order: Tensor | None = None  # group order of the fast block + generic columns
        # (kernel, names, shapes) when the native kernel alone gives every table in group order
        self._direct: tuple[NativeLaws, list[str]] | None = None

    @property
    def paths(self) -> dict[str, Any] | None:
        """How the last evaluation ran (None before the first): the groups on the fused
        row/column-sum path (``"fast"``), those evaluated group by group in float64
        (``"generic"``, readers that are not a rearrangement of the parameter), and the largest
        number of chunks a parameter was read in (``"chunks"``).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torch_conslaw.lawgroups import build_groups
            >>> from torch_conslaw.structure import find_structure
            >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
            >>> acc = Accountant(build_groups(find_structure(model).pairs))
            >>> _ = acc.values(dict(model.named_parameters()))
            >>> acc.paths
            {'fast': ['0→2'], 'generic': [], 'chunks': 1}
        """
        if self._fast is None:
            return None
        return {
            "fast": [g.name for g, *_ in self._fast.fast],
            "generic": [g.name for g in self._fast.generic],
            "chunks": max((len(w.chunks) for w in self._fast.work), default=0),
        }

    def _kernel(self, fast: _FastPlan, tensors: list[Tensor]) -> CompiledLaws | NativeLaws | None:
        """The fused kernels of the fast groups (``evaluation="compiled"`` or ``"native"``), or
        ``None`` for the chunked eager path: no compiler for the device, a failed build (then
        the accountant stays eager, with a warning), or inputs the kernel cannot read as they
        are (non-contiguous; for the native kernel also another device or dtype)."""
        if self.evaluation not in ("compiled", "native") or not fast.fast:
            return None
        if not all(t.is_contiguous() for t in tensors):
            return None
        if self._fused_laws is None or self._fused_for is not fast:
            if self.evaluation == "native":
                ok, how = native_status()
                if not ok or fast.device.type != "cpu":
                    self._give_up(how if not ok else f"it reads CPU tensors, not {fast.device.type} ones")
                    return None
                shapes = [t.shape for t in tensors[-len(fast.fast_names) :]]  # θ (after), not θ before
                self._fused_laws = NativeLaws(fast.spec, len(fast.fast_names), self._threads, shapes)
            elif not compiler_available(fast.device.type):
                self._give_up(f"no compiler for {fast.device.type} tensors was found")
                return None
            else:
                self._fused_laws = CompiledLaws(fast.spec, len(fast.fast_names), self._threads)
            self._fused_for = fast
            direct = isinstance(self._fused_laws, NativeLaws) and not fast.generic and self._order is None
            self._direct = (self._fused_laws, fast.fast_names) if direct else None  # type: ignore[assignment]
        return self._fused_laws

    def _give_up(self, why: str) -> None:
        self._direct = None
        self.evaluation_reason = f"{self.evaluation} evaluation not available: {why}"
        if self.requested == "auto":  # auto: stay eager without a warning (the reason says why)
            self.evaluation = "eager"
            self._fused_laws = None
            return
        warnings.warn(
            f"Accountant: evaluation={self.evaluation!r} is not available ({why}); the laws are "
            "evaluated by the chunked eager path instead",
            RuntimeWarning,
            stacklevel=4,
        )
        self.evaluation = "eager"
        self._fused_laws = None

    def _fused(self, fast: _FastPlan, kind: str, *sides: Mapping[str, Tensor]) -> Tensor | None:
        """The fast groups' table from the fused kernel (``[1, laws]`` for values, ``[3, laws]``
        for the split), or ``None`` when the eager path must run."""
        tensors = [side[n].detach() for side in sides for n in fast.fast_names]
        kernel = self._kernel(fast, tensors)
        if kernel is None:
            return None
        count = len(fast.fast_names)
        if isinstance(kernel, NativeLaws):  # None: not readable as they are (eager this time)
            return kernel.table(tensors[:count] if kind == "split" else None, tensors[-count:])
        try:
            if kind == "values":
                return kernel.values(tensors).view(1, -1)
            return kernel.split(tensors[:count], tensors[count:])
        except Exception as error:  # a compiler that cannot build the kernel: eager from now on
            self._give_up(f"{type(error).__name__}: {error}")
            return None

    def _plan(self, tensors: list[Tensor], params: Mapping[str, Tensor]) -> _FastPlan | None:
        """The fast-path plan for these tensors (rebuilt when a shape or device changes);
        ``None`` when the parameters live on several devices (then everything is generic)."""
        fast = self._fast
        if fast is not None and fast.matches(tensors):
            return fast
        if not tensors or len({t.device for t in tensors}) != 1:
            self._fast = self._direct = None
            return None
        self._fast = _FastPlan(self.groups, self.names, params)
        self._order = _order(self.groups, self._fast)
        self._direct = None
        if self.requested == "auto":
            self._resolve_auto(self._fast)
        return self._fast

    def _resolve_auto(self, fast: _FastPlan) -> None:
        """``evaluation="auto"``: for large per-unit laws, native on the CPU where the C kernel
        builds, else compiled where a compiler is found, else eager."""
        elements = sum(w.numel for w in fast.work)
        enough = f"{elements:,} tracked elements ≥ {AUTO_COMPILE_ELEMENTS:,}"
        native, how = native_status() if fast.device.type == "cpu" else (False, "not on the CPU")
        if not fast.fast:
            self.evaluation, self.evaluation_reason = "eager", "auto: no per-unit law to fuse"
        elif elements < AUTO_COMPILE_ELEMENTS:
            self.evaluation = "eager"
            self.evaluation_reason = f"auto: {elements:,} tracked elements < {AUTO_COMPILE_ELEMENTS:,}"
        elif native:
            self.evaluation = "native"
            self.evaluation_reason = f"auto: {enough} on the CPU and the native kernel ({how})"
        elif not compiler_available(fast.device.type):
            self.evaluation = "eager"
            self.evaluation_reason = f"auto: no compiler for {fast.device.type} tensors was found"
        else:
            self.evaluation = "compiled"
            self.evaluation_reason = f"auto: {enough} and a compiler (native kernel: {how})"

    def prepare(self, params: Mapping[str, Tensor], split: bool) -> None:
        """Build the plan and, for the compiled evaluation, compile the kernels a record needs
        now (values, and the split when ``split``) instead of at the first record: seconds,
        outside the training step. Nothing to do for the eager evaluation."""
        if self._plan([params[n] for n in self.names], params) is None or self.evaluation not in ("compiled", "native"):
            return
        self.values_table(params)
        if split and self.evaluation in ("compiled", "native"):  # the values kernel built
            self.split_table(params, params)
        if self._fast is not None:
            self._fast.release()  # the eager path's buffers (rebuilt if it ever runs again)

    def values_table(self, params: Mapping[str, Tensor]) -> Tensor:
        """``[1, laws]``: h(θ) of every law, float64, groups in order (:attr:`counts`): one
        tensor per record, a few tensor operations whatever the number of groups.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torch_conslaw.lawgroups import build_groups
            >>> from torch_conslaw.structure import find_structure
            >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
            >>> acc = Accountant(build_groups(find_structure(model).pairs))
            >>> acc.values_table(dict(model.named_parameters())).shape, acc.counts
            (torch.Size([1, 2]), [2])
        """
        table = self._direct_table(None, params)
        if table is not None:
            return table
        with torch.no_grad():
            fast = self._plan([params[n] for n in self.names], params)
            pieces: list[Tensor] = []
            if fast is not None and fast.fast:
                fused = self._fused(fast, "values", params)
                pieces.append(fused if fused is not None else fast.values(params))
            for g in self.groups if fast is None else fast.generic:
                p64 = as_float64(params, g.parameter_names)
                pieces.append(g.values(p64).reshape(1, -1))
                del p64
            return self._in_order(fast, pieces, 1)

    def split_table(self, before: Mapping[str, Tensor], after: Mapping[str, Tensor], advance: bool = False) -> Tensor:
        """``[3, laws]``: h(θ⁺), the first order 2 B(θ, Δ) and the second order B(Δ, Δ) of
        every law, float64, groups in order; the same numbers as :func:`split_change` up to
        float64 summation order. ``advance``: also copy θ⁺ (``after``) into the tensors of
        ``before`` (buffers of the caller, then θ before the next step; the native kernel
        writes each chunk while it is in cache)."""
        table = self._direct_table(before, after, advance)
        if table is not None:
            return table
        with torch.no_grad():
            table = self._split_in_order(before, after)
            if advance:
                for n in self.names:
                    before[n].copy_(after[n])
            return table

    def _direct_table(
        self, before: Mapping[str, Tensor] | None, after: Mapping[str, Tensor], advance: bool = False
    ) -> Tensor | None:
        """The whole table from the native kernel alone (every group on it, in group order: no
        autograd, no reordering), or ``None`` when that route is not open for these tensors."""
        direct = self._direct
        if direct is None:
            return None
        kernel, names = direct  # it checks the tensors' shapes against the plan's
        return kernel.table(None if before is None else [before[n] for n in names], [after[n] for n in names], advance)

    def _split_in_order(self, before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> Tensor:
        fast = self._plan([after[n] for n in self.names], after)
        if fast is None or not fast.matches([before[n] for n in self.names]):
            return _table(self._split_generic(before, after, self.groups), self.groups)
        pieces: list[Tensor] = []
        if fast.fast:
            fused = self._fused(fast, "split", before, after)
            pieces.append(fused if fused is not None else fast.split(before, after))
        if fast.generic:
            pieces.append(_table(self._split_generic(before, after, fast.generic), fast.generic))
        return self._in_order(fast, pieces, 3)

    def _in_order(self, fast: _FastPlan | None, pieces: list[Tensor], rows: int) -> Tensor:
        """The fast groups' block and then the generic groups' columns, in group order."""
        if not pieces:
            return torch.zeros(rows, 0, dtype=F64)
        table = pieces[0] if len(pieces) == 1 else torch.cat([p.to(pieces[0].device) for p in pieces], dim=1)
        if fast is None or self._order is None:
            return table
        return table.index_select(1, self._order.to(table.device))

    @property
    def counts(self) -> list[int]:
        """How many laws each group has, in order: the columns of the tables."""
        return [g.count for g in self.groups]

    def values(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """h(θ) of every group, float64 (views into :meth:`values_table`)."""
        return _per_group(self.groups, self.values_table(params)[0])

    def initial(self, params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """h(θ) and the natural scale (:meth:`LawGroup.scale`) of every group, float64, in one
        pass and without a float64 copy of θ (the monitor's θ₀)."""
        with torch.no_grad():
            fast = self._plan([params[n] for n in self.names], params)
            values: dict[str, Tensor] = {}
            scales: dict[str, Tensor] = {}
            if fast is not None and fast.fast:
                fused = self._native_initial(fast, params)
                value_row, scale_row = fused if fused is not None else (fast.values(params)[0], fast.scales())
                values.update(_per_group([g for g, *_ in fast.fast], value_row))
                scales.update(_per_group([g for g, *_ in fast.fast], scale_row))
            last: dict[str, Tensor] = {}  # the previous group's copies (neighbours share parameters)
            for g in self.groups if fast is None else fast.generic:
                p64 = {n: last[n] if n in last else params[n].detach().to(F64) for n in g.parameter_names}
                values[g.name], scales[g.name] = g.values(p64), g.scale(p64)
                last = p64
            order = [g.name for g in self.groups]
            return {k: values[k] for k in order}, {k: scales[k] for k in order}

    def _native_initial(self, fast: _FastPlan, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """The fast groups' values and natural scales from the native kernel (the same
        evaluation as the records that follow, and no chunk buffers), or ``None``."""
        if self.evaluation != "native":
            return None
        tensors = [params[n].detach() for n in fast.fast_names]
        kernel = self._kernel(fast, tensors)
        if not isinstance(kernel, NativeLaws):
            return None
        values, scales = kernel.table(None, tensors), kernel.table(None, tensors, sign=1.0)
        if values is None or scales is None:
            return None
        return values[0], scales[0]

    def split(
        self, before: Mapping[str, Tensor], after: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Same result as :func:`split_change` (up to float64 summation order), per group
        (views into :meth:`split_table`)."""
        table = self.split_table(before, after)
        values, first, second = (_per_group(self.groups, row) for row in table)
        return values, first, second

    @staticmethod
    def _split_generic(
        before: Mapping[str, Tensor], after: Mapping[str, Tensor], groups: Sequence[LawGroup]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Group by group, on float64 copies of that group's parameters only."""
        values, first, second = {}, {}, {}
        for g in groups:
            names = g.parameter_names
            b64 = as_float64(before, names)
            a64 = as_float64(after, names)
            delta = {n: a64[n] - b64[n] for n in names}
            values[g.name] = g.values(a64)
            first[g.name] = g.first_order(b64, delta)  # 2B(θ, Δ); cᵀΔ for linear laws
            second[g.name] = g.second_order(delta)  # B(Δ, Δ); 0 for linear laws
            del b64, a64, delta
        return values, first, second


def _per_group(groups: Sequence[LawGroup], flat: Tensor) -> dict[str, Tensor]:
    """The columns of each group in ``flat`` (``[laws]``), as views."""
    return dict(zip((g.name for g in groups), flat.split([g.count for g in groups])))


def _table(per_group: tuple[dict[str, Tensor], ...], groups: Sequence[LawGroup]) -> Tensor:
    """``[len(per_group), laws]``: the per-group vectors of each dict, groups in order."""
    if not groups:
        return torch.zeros(len(per_group), 0, dtype=F64)
    return torch.stack([torch.cat([part[g.name].reshape(-1) for g in groups]) for part in per_group])


def _order(groups: Sequence[LawGroup], fast: _FastPlan) -> Tensor | None:
    """The columns, in group order, of the fast block followed by the generic groups; ``None``
    when that is already the group order."""
    computed = [g for g, *_ in fast.fast] + list(fast.generic)
    if [g.name for g in computed] == [g.name for g in groups]:
        return None
    where: dict[str, tuple[int, int]] = {}
    start = 0
    for g in computed:
        where[g.name] = (start, g.count)
        start += g.count
    return torch.cat([torch.arange(where[g.name][0], where[g.name][0] + g.count) for g in groups])
