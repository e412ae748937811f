"""Native evaluation of per-unit laws: one pass over the parameters, in C, on the CPU.

:class:`NativeLaws` does what :class:`~torch_conslaw.evaluation.CompiledLaws` does (the values
h(θ) and the split h(θ⁺), 2 B(θ, Δ), B(Δ, Δ) of every per-unit law, accumulated in float64)
with a small C kernel (``native_laws.c``) built once by the machine's C compiler and called
through :mod:`ctypes`. Where Inductor's kernel reads a weight once for its row sums and again,
with a strided walk, for its column sums, this kernel reads each parameter once, contiguously,
and adds every element's float64 product to the rows of every reader of that parameter: a
record is one pass over θ, bound by the float64 arithmetic rather than by memory (measured
in ``experiments/record_costs_in_step.py`` and ``experiments/bench_monitor.py``).

The build is cached (``$TORCH_CONSLAW_CACHE``, else ``~/.cache/torch_conslaw``, else a private
directory under the temporary directory) under a key of the source, the compiler, the flags
and the CPU, so it runs once per machine (a fraction of a second). ``TORCH_CONSLAW_NATIVE=0``
turns it off. :func:`native_status` says whether the kernel is available and why not; the
:class:`~torch_conslaw.accounting.Accountant` then uses Inductor or its eager path instead.

Exactness: the same float64 products as the reference; only the order of the float64 sums
differs, so each law is within the bound of :mod:`torch_conslaw.evaluation`
(``2 γ_n Σ|products|``). The work is cut into ``parts`` fixed ranges (the thread count when
the kernel was set up), summed in order: records are the same bits whichever thread calls.

Example:
    >>> import torch
    >>> w1, w2 = torch.ones(3, 2), torch.ones(1, 3)
    >>> spec = [([(0, (1, 3, 2))], [(1, (1, 3, 1))], 1.0)]  # ‖w_in‖² − ‖w_out‖² per unit
    >>> native_status()[0] in (True, False)
    True
    >>> NativeLaws(spec, 2).values([w1, w2]).tolist() if native_status()[0] else [1.0, 1.0, 1.0]
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import operator
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .evaluation import GroupSpec

__all__ = ["NativeLaws", "native_status", "RunningMax"]

SOURCE = Path(__file__).with_name("native_laws.c")
DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC"]
OUTPUTS_AHEAD = 16  # output tables NativeLaws makes at a time (a torch call in a step is slow)
BINDINGS = 8  # sets of tensors whose checked kernel arguments NativeLaws keeps


def _compiler() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dirs() -> list[Path]:
    """Where the built kernel may live: ``$TORCH_CONSLAW_CACHE``, else ``~/.cache``, else a
    directory of this user's own under the temporary directory."""
    root = os.environ.get("TORCH_CONSLAW_CACHE")
    if root:
        return [Path(root)]
    return [Path.home() / ".cache" / "torch_conslaw", Path(tempfile.gettempdir()) / f"torch_conslaw-{os.getuid() if hasattr(os, 'getuid') else 'user'}"]


def _private(directory: Path) -> bool:
    """Create ``directory`` (mode 0700) where needed; whether it is this user's alone (a
    library is loaded from it)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not hasattr(os, "getuid"):
        return True
    info = directory.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _build(cc: str, flags: list[str], target: Path) -> str | None:
    """Compile the kernel to ``target`` (atomically); the compiler's complaint, or ``None``."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return "the compiler ran for over 300 s"
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip()[-500:] or f"exit status {done.returncode}"
        os.replace(out, target)  # concurrent builders (ranks) each write a whole file
    return None


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("TORCH_CONSLAW_NATIVE", "1") == "0":
        return None, "turned off by TORCH_CONSLAW_NATIVE=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    cache = None
    for directory in _cache_dirs():
        try:
            if _private(directory):
                cache = directory
                break
        except OSError:
            continue
    if cache is None:
        return None, f"no private cache directory could be made ({', '.join(map(str, _cache_dirs()))})"
    source = SOURCE.read_bytes()
    errors = []
    # OpenMP and the CPU's own instructions where the compiler has them; plainer builds else
    for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
        flags = _FLAGS + extra
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_key().encode()])).hexdigest()[:20]
        target = cache / f"native_laws-{key}{'.dll' if os.name == 'nt' else '.so'}"
        try:
            if not target.exists():
                error = _build(cc, flags, target)
                if error is not None:
                    errors.append(f"{' '.join(extra) or 'plain'}: {error}")
                    continue
            lib = ctypes.CDLL(str(target))
        except OSError as error:
            errors.append(f"{' '.join(extra) or 'plain'}: {error}")
            continue
        lib.tcl_laws.restype = lib.tcl_fold.restype = ctypes.c_int64
        pointer, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.tcl_laws.argtypes = [pointer, pointer, i64, pointer, pointer, pointer, i64, pointer, pointer, i64]
        lib.tcl_fold.argtypes = [i64, i64, pointer, pointer, pointer, pointer]
        return lib, f"built with {cc} {' '.join(flags)} ({target})"
    return None, "the C kernel did not build: " + "; ".join(errors)


def native_status() -> tuple[bool, str]:
    """Whether the native kernel is available here, and how it was built or why not.

    Example:
        >>> ok, how = native_status()
        >>> isinstance(how, str)
        True
    """
    lib, how = _library()
    return lib is not None, how


_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")


class _Binding(NamedTuple):
    """The shapes and dtypes of the tensors a :class:`NativeLaws` call checked, the kernel's
    arguments for them up to the output, and what those addresses point into (kept alive)."""

    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    args: tuple
    owners: tuple


def _i64(values: Sequence[int]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


class NativeLaws:
    """The fused values and split of fixed per-unit groups, by the native kernel.

    ``spec`` as for :class:`~torch_conslaw.evaluation.CompiledLaws`: per group, its incoming
    and outgoing readers ``(tensor index, (A, U, B))`` and its degree; ``count`` tensors.
    :meth:`values` returns ``[laws]``, :meth:`split` ``[3, laws]`` (h(θ⁺), 2 B(θ, Δ),
    B(Δ, Δ)), float64. ``threads``: the most parts (and threads) of the work; fewer where
    their accumulators would take more than 1 MiB or 1 % of θ. Fixed here: results depend on
    it, never on the thread that calls.
    :meth:`supports` says whether a set of tensors can be read by it (CPU, contiguous, float32,
    float64, bfloat16 or float16, sizes of the spec, and ``shapes`` when given: the plan was
    made for those).
    """

    def __init__(
        self, spec: Sequence[GroupSpec], count: int, threads: int = 1, shapes: Sequence[torch.Size] | None = None
    ) -> None:
        lib, how = _library()
        if lib is None:
            raise RuntimeError(f"NativeLaws: {how}")
        self._fn = lib.tcl_laws
        readers: list[list[tuple[int, int, int]]] = [[] for _ in range(count)]  # per tensor: (U, B, offset)
        numel = [0] * count
        groups: list[int] = []  # per group: first law, laws, incoming, outgoing, row offsets
        degrees: list[float] = []
        width = laws = 0
        for incoming, outgoing, degree in spec:
            starts = []
            for index, (a, u, b) in [*incoming, *outgoing]:
                readers[index].append((u, b, width))
                numel[index] = a * u * b
                starts.append(width)
                width += u
            units = incoming[0][1][1]
            groups += [laws, units, len(incoming), len(outgoing), *starts]
            degrees.append(float(degree))
            laws += units
        self.count = count
        self.laws = laws
        self.numel = numel
        self.shapes = None if shapes is None else [torch.Size(x) for x in shapes]
        self.width = width
        # each part has its own accumulators (``rows × width`` doubles): at most ``threads``
        # parts, and together at most 1 MiB or 1 % of θ (at 4 bytes an element) for the split
        room = max(2**20, sum(numel) * 4 // 100) // (3 * 8 * max(width, 1))
        self.parts = max(1, min(int(threads), room))
        chunks = []
        for plans in readers:
            runs = [b if b > 1 else u for u, b, _ in plans]
            chunks.append(max(1, math.gcd(*runs)) if runs else 1)  # 1 for an empty tensor
        flat = [r for plans in readers for r in plans]
        starts = [0]
        for plans in readers:
            starts.append(starts[-1] + len(plans))
        sections = [numel, chunks, starts, [u for u, _, _ in flat], [b for _, b, _ in flat], [o for _, _, o in flat], groups]
        header = [count, width, self.parts, laws, len(spec)]
        at = len(header) + len(sections)
        for section in sections:
            header.append(at)
            at += len(section)
        self._plan = _i64(header + [x for section in sections for x in section])
        # law = incoming − degree · outgoing; the natural scale is incoming + degree · outgoing
        self._degrees = {sign: torch.tensor([-sign * d for d in degrees], dtype=torch.float64) for sign in (-1.0, 1.0)}
        self._scratch: dict[int, Tensor] = {}  # per number of rows, made on first use
        # per (rows, sign, data pointers) of the last BINDINGS sets of tensors found readable:
        # their shapes and the kernel's arguments for them, up to the output and ``advance``
        # (a worker recorder's ring of snapshots is several sets, read in turn)
        self._bound: dict[tuple, _Binding] = {}
        self._spare: dict[int, list[Tensor]] = {}  # output tables made ahead, per number of rows

    def supports(self, tensors: Sequence[Tensor]) -> bool:
        """Whether the kernel reads these tensors as they are (else the caller falls back)."""
        return len(tensors) % self.count == 0 and all(
            t.device.type == "cpu"
            and t.dtype in DTYPES
            and t.is_contiguous()
            and t.numel() == self.numel[i % self.count]
            and (self.shapes is None or t.shape == self.shapes[i % self.count])
            for i, t in enumerate(tensors)
        )

    def table(
        self, before: Sequence[Tensor] | None, after: Sequence[Tensor], advance: bool = False, sign: float = -1.0
    ) -> Tensor | None:
        """``[1, laws]`` values (``before`` None) or the ``[3, laws]`` split; ``None`` when the
        kernel cannot read these tensors as they are (the caller falls back). ``advance``: the
        split also copies θ⁺ into ``before``, chunk by chunk while it is in cache (θ before the
        next step, at the cost of a write). ``sign=+1``: incoming + k · outgoing instead (the
        natural scales of the values).

        A call on tensors read before (the same storage, shapes and dtypes, still contiguous;
        the last :data:`BINDINGS` sets are kept) reuses the arguments checked then, and the
        table comes from a few made ahead: inside a training step, where every Python and
        torch call runs from cold caches, a record then costs the kernel and a few attribute
        reads."""
        rows = 1 if before is None else 3
        tensors = list(after) if before is None else [*after, *before]
        key = (rows, sign, *map(Tensor.data_ptr, tensors))
        bound = self._bound.get(key)
        if (
            bound is None
            or list(map(_shape, tensors)) != bound.shapes
            or list(map(_dtype, tensors)) != bound.dtypes  # new tensors where freed ones were
            or not all(map(Tensor.is_contiguous, tensors))
        ):
            bound = self._bind(key, tensors)
            if bound is None:
                return None
        out = self._output(rows)
        done = self._fn(*bound.args, out.data_ptr(), int(advance and rows == 3))
        if done != 0:
            raise TypeError("NativeLaws: a tensor has a dtype the kernel does not read")
        return out

    def _bind(self, key: tuple, tensors: list[Tensor]) -> _Binding | None:
        """Check ``tensors`` (θ⁺, then θ for the split; ``key``: rows, sign, their data
        pointers) and keep the kernel's arguments for them; ``None`` (and nothing kept) when
        the kernel cannot read them as they are."""
        self._bound.pop(key, None)
        rows, sign, pointers = key[0], key[1], key[2:]
        after = tensors[: self.count]
        if not self.supports(tensors) or any(b.dtype != a.dtype for b, a in zip(tensors[self.count :], after)):
            return None
        codes = _i64(DTYPES[x.dtype] for x in after)
        after_array = (ctypes.c_void_p * self.count)(*pointers[: self.count])
        before_array = (ctypes.c_void_p * self.count)(*pointers[self.count :]) if rows == 3 else None
        scratch = self._scratch.get(rows)
        if scratch is None:
            scratch = self._scratch[rows] = torch.empty(self.parts * rows * self.width, dtype=torch.float64)
        degrees = self._degrees[sign]
        args = (
            self._plan.data_ptr(), degrees.data_ptr(), rows, before_array, after_array, codes.data_ptr(),
            self.parts, scratch.data_ptr(),
        )
        bound = _Binding(list(map(_shape, tensors)), list(map(_dtype, tensors)), args, (codes, after_array, before_array))
        while len(self._bound) >= BINDINGS:
            del self._bound[next(iter(self._bound))]  # the oldest
        self._bound[key] = bound
        return bound

    def _output(self, rows: int) -> Tensor:
        """A new ``[rows, laws]`` float64 table (made a few at a time, at most 1 MiB ahead)."""
        spare = self._spare.get(rows)
        if not spare:
            ahead = max(1, min(OUTPUTS_AHEAD, 2**20 // (rows * max(self.laws, 1) * 8)))
            spare = self._spare[rows] = [torch.empty(rows, self.laws, dtype=torch.float64) for _ in range(ahead)]
        return spare.pop()

    def values(self, tensors: Sequence[Tensor]) -> Tensor:
        """h(θ) of every law, float64 (``[laws]``)."""
        return self._readable(self.table(None, tensors))[0]

    def split(self, before: Sequence[Tensor], after: Sequence[Tensor]) -> Tensor:
        """``[3, laws]``: h(θ⁺), 2 B(θ, Δ) and B(Δ, Δ), float64."""
        return self._readable(self.table(before, after))

    @staticmethod
    def _readable(table: Tensor | None) -> Tensor:
        if table is None:
            raise TypeError("NativeLaws: the kernel cannot read these tensors as they are (see supports())")
        return table


class RunningMax:
    """The running maxima of records: ``running = max(running, |table − base|)``, with 0 for
    the laws marked invalid, for fixed ``base`` and ``running`` tensors (float64, CPU,
    contiguous, ``[rows, laws]``). A call returns ``False`` and changes nothing when a law not
    marked has a non-finite entry. One native call where the kernel is built (a record's
    statistics then cost microseconds inside a training step), the same result from torch
    operations otherwise; a call checks only the record's table.

    Example:
        >>> fold = RunningMax(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64))
        >>> fold(torch.tensor([[2.0, float("nan")]], dtype=torch.float64), None)
        False
    """

    def __init__(self, base: Tensor, running: Tensor) -> None:
        self.base, self.running = base, running
        lib, _ = _library()
        fixed = all(t.dtype == torch.float64 and t.is_cpu and t.is_contiguous() and t.dim() == 2 for t in (base, running))
        self._fn = lib.tcl_fold if lib is not None and fixed and base.shape == running.shape else None
        self._pointers = (base.data_ptr(), running.data_ptr())
        self._head = tuple(base.shape)  # rows, laws: the kernel's first arguments

    def __call__(self, table: Tensor, invalid: Tensor | None) -> bool:
        """Fold ``table`` in; ``invalid``: ``[laws]`` uint8 or bool marks (or ``None``)."""
        fn = self._fn
        if fn is not None and table.dtype == torch.float64 and table.is_cpu and table.is_contiguous() and table.shape == self._head:
            if invalid is None:
                return fn(*self._head, table.data_ptr(), *self._pointers, None) == 0
            mask = invalid if invalid.dtype == torch.uint8 and invalid.is_contiguous() else invalid.to(torch.uint8).contiguous()
            return fn(*self._head, table.data_ptr(), *self._pointers, mask.data_ptr()) == 0
        gap = torch.sub(table, self.base).abs_()
        if invalid is not None:
            gap.masked_fill_(invalid.bool(), 0.0)
        if not bool(torch.isfinite(gap).all()):
            return False
        torch.maximum(self.running, gap, out=self.running)
        return True
