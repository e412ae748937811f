"""Law groups: all the laws of one hidden unit group, evaluated at once in float64.

A group is built from a :class:`~torch_conslaw.structure.Pair`. Every method takes a mapping
from qualified parameter names to tensors (live parameters, a snapshot or a step Δ), so the
same group evaluates h(θ), its bilinear form B(θ, Δ) and its natural scale:

* :class:`UnitLaws` — one law per unit / channel, ‖w_in‖² + b² − k‖w_out‖²
  (:func:`torch_conslaw.laws.unit_balance`); with the pair's ``shifts`` (a gain read as
  1 + γ) the law is the same quadratic form at the shifted point θ + c:
  (1 + γ_u)² + b_u² − k‖w_out,u‖², whose change over a step splits exactly as
  2B(θ + c, Δ) + B(Δ, Δ);
* :class:`MatrixLaws` — the upper triangle of Q = [W b][W b]^T − W_next^T W_next of a linear
  hidden layer (:func:`torch_conslaw.laws.matrix_balance`), n(n+1)/2 entries.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    >>> group = build_groups(find_structure(model).pairs)[0]
    >>> group.values(dict(model.named_parameters())).shape
    torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from . import laws
from .structure import Pair

__all__ = ["LawGroup", "UnitLaws", "MatrixLaws", "build_groups", "rearrangement_plan"]

F64 = torch.float64
_PLAN_MAX_NUMEL = 2**24


class LawGroup:
    """Base class: the laws of one :class:`Pair`, a flat float64 vector of ``count`` values.

    Attributes: ``name`` (``producer→consumer``), ``kind`` (``unit``, ``channel``,
    ``matrix``), ``count``, ``pair``, ``expected_conserved`` and ``reason`` (why the group
    is, or is not, expected to be conserved under the current training setup).
    """

    kind: str
    count: int
    # --- laws beyond layer pairs (issue 8): linear and approximate kinds -----------------
    approximate: bool = False  # True: exact only in a limit (a normalization's eps → 0)
    loss: str | None = None  # the one loss the law holds for (``"cross_entropy"``), else any
    degree: float = 1.0  # homogeneity k of the activations in between (UnitLaws sets its own)

    @property
    def producer(self) -> str:
        """Module path of the producing layer (for a law of one module: that module)."""
        return self.pair.producer

    @property
    def consumer(self) -> str:
        """Module path(s) of the consuming layer(s) (``+``-joined for a branch)."""
        return self.pair.consumer

    def first_order(self, before: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> Tensor:
        """The part of h(θ + Δ) − h(θ) linear in Δ (2B(θ, Δ) for a quadratic law)."""
        return 2.0 * self.bilinear(before, delta)

    def second_order(self, delta: Mapping[str, Tensor]) -> Tensor:
        """The rest, h(θ + Δ) − h(θ) − first order (B(Δ, Δ) for a quadratic law)."""
        return self.bilinear(delta, delta)
    # ---------------------------------------------------------------------------------------

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.name = pair.name
        self.expected_conserved = pair.conserved
        self.reason = pair.reason or self._default_reason()
        self.parameter_names: tuple[str, ...] = pair.parameter_names

    def _default_reason(self) -> str:
        raise NotImplementedError

    def values(self, params: Mapping[str, Tensor]) -> Tensor:
        """h(θ) for every law of the group (float64, shape ``[count]``)."""
        return self.bilinear(params, params)

    def bilinear(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
        """B(a, b) for every law, so that h(θ+Δ) − h(θ) = 2B(θ, Δ) + B(Δ, Δ) exactly."""
        raise NotImplementedError

    def scale(self, params: Mapping[str, Tensor]) -> Tensor:
        """Natural size of each law at θ (a bound on |h(θ)|), used for relative drift."""
        raise NotImplementedError

    def labels(self) -> list[str]:
        """One readable label per law, e.g. ``fc1→fc2[3]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind!r}, count={self.count})"


class UnitLaws(LawGroup):
    """‖w_in‖² + b² − k‖w_out‖² per unit (or channel); scale ‖w_in‖² + b² + k‖w_out‖².

    This is :func:`torch_conslaw.laws.unit_balance_bilinear` evaluated parameter by
    parameter, which avoids concatenating the incoming rows (one pass less per step).
    """

    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        self.kind = pair.kind
        self.count = pair.units
        self.degree = pair.degree
        self.shifts = dict(pair.shifts)
        unknown = set(self.shifts) - set(pair.parameter_names)
        if unknown:
            raise ValueError(f"UnitLaws {pair.name}: shifts name parameters the group does not read: {sorted(unknown)}")
        self._scratch: dict[tuple[int, int], Tensor] = {}

    def shifted(self, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """``params`` with every shifted parameter read as θ + c (in float64): the point where
        the law is the plain quadratic form; ``params`` itself when nothing is shifted.

        Example:
            >>> import torch
            >>> from torch_conslaw.structure import Pair
            >>> from torch_conslaw.laws.families.rescaling import Columns, Rows
            >>> pair = Pair("norm", "fc", (), "unit", 1.0, 2, 1, (("norm.weight", Rows(torch.arange(2).unsqueeze(1))),),
            ...             (("fc.weight", Columns(torch.arange(2).unsqueeze(1))),), shifts=(("norm.weight", 1.0),))
            >>> p = {"norm.weight": torch.zeros(2), "fc.weight": torch.ones(3, 2)}
            >>> UnitLaws(pair).values(p).tolist()  # (1 + 0)² − 3
            [-2.0, -2.0]
        """
        if not self.shifts:
            return params
        moved = dict(params)
        for name, c in self.shifts.items():
            moved[name] = params[name].to(F64) + c
        return moved

    def values(self, params: Mapping[str, Tensor]) -> Tensor:
        point = self.shifted(params)
        return self.bilinear(point, point)

    def first_order(self, before: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> Tensor:
        """2B(θ + c, Δ): Δ moves θ and θ + c alike."""
        return 2.0 * self.bilinear(self.shifted(before), delta)

    def _default_reason(self) -> str:
        what = "unit" if self.pair.kind == "unit" else "channel"
        return (
            f"positively {self.pair.degree:g}-homogeneous ops between {self.pair.producer} and "
            f"{self.pair.consumer}: one law per {what}"
        )

    def _sides(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-unit ⟨in_a, in_b⟩ and ⟨out_a, out_b⟩."""
        sums = []
        for side, readers in enumerate((self.pair.incoming, self.pair.outgoing)):
            total: Tensor | None = None
            for i, (name, fn) in enumerate(readers):
                xa = fn(a[name].to(F64))
                dims = tuple(range(1, xa.dim()))
                if b is a and xa.is_contiguous():  # fused, no temporary; rounding ≤ 2 ulp
                    term = torch.linalg.vector_norm(xa, dim=dims).square()
                else:
                    xb = xa if b is a else fn(b[name].to(F64))
                    if torch.is_grad_enabled():  # differentiable path (e.g. analyze's jacrev)
                        prod = xa * xb
                    else:
                        prod = torch.mul(xa, xb, out=self._scratch_like((side, i), xa))
                    term = prod.sum(dim=dims)
                total = term if total is None else total + term
            assert total is not None
            sums.append(total)
        return sums[0], sums[1]

    def _scratch_like(self, key: tuple[int, int], x: Tensor) -> Tensor:
        """A reusable product buffer with the layout of ``x`` (avoids a large allocation)."""
        buf = self._scratch.get(key)
        if buf is None or buf.shape != x.shape or buf.stride() != x.stride():
            buf = self._scratch[key] = torch.empty_like(x)
        return buf

    def bilinear(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
        inc, out = self._sides(a, b)
        return inc - self.degree * out

    def scale(self, params: Mapping[str, Tensor]) -> Tensor:
        point = self.shifted(params)
        inc, out = self._sides(point, point)
        return inc + self.degree * out

    def labels(self) -> list[str]:
        return [f"{self.name}[{j}]" for j in range(self.count)]


class MatrixLaws(LawGroup):
    """Upper triangle of the matrix law; scale_ij = ‖I_i‖‖I_j‖ + ‖O_i‖‖O_j‖ (Cauchy–Schwarz)."""

    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        if pair.shifts:
            raise ValueError(f"MatrixLaws {pair.name}: a matrix law of shifted parameters is not supported")
        self.kind = "matrix"
        n = pair.units
        self.count = n * (n + 1) // 2
        self._rows_idx, self._cols_idx = torch.triu_indices(n, n)

    def _rows(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Incoming and outgoing matrices (one row per unit), float64."""
        inc = [fn(params[name].to(F64)).flatten(1) for name, fn in self.pair.incoming]
        out = [fn(params[name].to(F64)).flatten(1) for name, fn in self.pair.outgoing]
        return (torch.cat(inc, 1) if len(inc) > 1 else inc[0]), (
            torch.cat(out, 1) if len(out) > 1 else out[0]
        )

    def _default_reason(self) -> str:
        return (
            f"linear hidden layer between {self.pair.producer} and {self.pair.consumer}: "
            "matrix law (upper triangle)"
        )

    def bilinear(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
        in_a, out_a = self._rows(a)
        in_b, out_b = (in_a, out_a) if b is a else self._rows(b)
        q = laws.matrix_balance_bilinear(in_a, out_a, in_b, out_b)
        return q[self._rows_idx, self._cols_idx]

    def scale(self, params: Mapping[str, Tensor]) -> Tensor:
        inc, out = self._rows(params)
        ni, no = inc.norm(dim=1), out.norm(dim=1)
        s = torch.outer(ni, ni) + torch.outer(no, no)
        return s[self._rows_idx, self._cols_idx]

    def labels(self) -> list[str]:
        return [f"{self.name}[{i},{j}]" for i, j in zip(self._rows_idx.tolist(), self._cols_idx.tolist())]


def rearrangement_plan(reader, shape: tuple[int, ...], units: int) -> tuple[int, int, int] | None:
    """``(A, U, B)`` such that ``reader(w)`` puts element ``i`` of ``w.reshape(-1)`` in row
    ``(i // B) % U``, each element exactly once and unchanged; ``None`` when ``reader`` is
    anything else (arithmetic, a selection, a row order this form cannot express).

    With such a plan, the per-row sums of any elementwise product ``x ∘ y`` of two tensors of
    ``shape`` are ``(x ∘ y).view(A, U, B).sum((0, 2))``: a plain strided reduction with no
    transposed or reshaped copy (the hot path of :class:`~torch_conslaw.accounting.Accountant`).
    The built-in readers (rows, ``w.T``, bias columns, convolution and flatten readers) all
    have one. The reader is probed once on signed distinct integers (exact in float32, so
    tensors above ``2**24`` elements get no plan and their groups take the generic path).

    Example:
        >>> rearrangement_plan(lambda w: w, (3, 4), 3), rearrangement_plan(lambda w: w.T, (3, 4), 4)
        ((1, 3, 4), (3, 4, 1))
        >>> rearrangement_plan(lambda w: 2 * w, (3, 4), 3) is None
        True
    """
    n = 1
    for d in shape:
        n *= int(d)
    if units <= 0 or n == 0 or n % units or n > _PLAN_MAX_NUMEL:
        return None
    rest = n // units
    # probe: element i holds ±(i + 1), negative for odd i (distinct, exact in float32 up to 2**24)
    probe = torch.arange(1, n + 1, dtype=torch.float32)
    probe[1::2].neg_()
    try:
        with torch.no_grad():
            out = reader(probe.reshape(shape))
    except Exception:  # a reader that cannot run on a probe: no plan
        return None
    if not isinstance(out, Tensor) or out.dtype != torch.float32 or out.dim() < 1:
        return None
    if out.shape[0] != units or out.numel() != n:
        return None
    out = out.detach().reshape(units, rest)
    del probe
    mag = out.abs()
    if not bool(torch.all((mag >= 1) & (mag <= n) & (mag == mag.round()))):
        return None
    pos = mag.to(torch.int32).sub_(1)  # the element each entry came from
    del mag
    if not torch.equal(out > 0, pos.remainder(2) == 0):  # the value itself, sign included
        return None
    del out
    seen = torch.zeros(n, dtype=torch.bool)
    seen[pos.reshape(-1)] = True
    if not bool(seen.all()):  # n entries, all elements seen: each exactly once
        return None
    del seen
    # row of element i must be (i // B) % U, with B the run length of row 0 in storage order
    row0 = torch.sort(pos[0]).values
    jumps = torch.nonzero(row0 != torch.arange(rest, dtype=torch.int32))
    b = int(jumps[0]) if jumps.numel() else rest  # row 0 starts with elements 0 … B − 1
    if b == 0 or rest % b:
        return None
    unit = pos.div_(b, rounding_mode="floor").remainder_(units)
    if not torch.equal(unit, torch.arange(units, dtype=torch.int32).unsqueeze(1).expand(units, rest)):
        return None
    return (rest // b, units, b)


def build_groups(pairs: list[Pair]) -> list[LawGroup]:
    """One law group per pair: :class:`MatrixLaws` for ``kind == "matrix"``, else :class:`UnitLaws`.

    Example:
        >>> build_groups([])
        []
    """
    return [MatrixLaws(p) if p.kind == "matrix" else UnitLaws(p) for p in pairs]
