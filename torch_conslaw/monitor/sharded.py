"""Conservation laws of a model with sharded parameters (FSDP2 ``fully_shard``, ``DTensor``).

Every per-unit / per-channel law is a sum over parameter entries of products of entries at
the *same* position (incoming row sums of W_k and b_k, outgoing column sums of W_{k+1},
SCIENCE.md §5–6). Each rank therefore computes its contribution from the rows it holds,
placed into full-length per-unit vectors (zeros elsewhere), and one all-reduce (SUM) of the
concatenated vectors of all groups gives the exact global values on every rank: the law
values (and, with the split, the first- and second-order parts) at each recording, the law
values and their scales at construction.

Supported layouts: parameters sharded along dim 0 (``Shard(0)``, what FSDP2 uses) and
replicated (``Replicate()``, e.g. the replicate dimension of HSDP) on one device mesh; plain
(unsharded) parameters next to them are read on the first rank of the mesh only. The matrix
law of a linear hidden layer (entries of W_k W_kᵀ mix different rows) cannot be summed from
local rows: its group is excluded, with that reason in ``ConservationMonitor.skipped``,
whenever one of its parameters is sharded. Anything else (``Shard(d)`` with d ≠ 0, strided
or partial placements, parameters on different meshes) raises
:class:`ShardingNotSupported`, a ``NotImplementedError`` naming the parameter and placement.

This module is only used when the model has ``DTensor`` parameters; unsharded models never
reach it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..lawgroups import LawGroup, MatrixLaws, UnitLaws
from ..structure import Skipped

__all__ = ["ShardingNotSupported", "ShardedLaws", "has_sharded_parameters"]

F64 = torch.float64


class ShardingNotSupported(NotImplementedError):
    """A sharded layout the monitor cannot evaluate from local shards (the message says which)."""


def _is_dtensor(p: Any) -> bool:
    return type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"


def has_sharded_parameters(params: Mapping[str, Tensor]) -> bool:
    """True when any of ``params`` is a ``DTensor`` (cheap: no torch.distributed import)."""
    return any(_is_dtensor(p) for p in params.values())


def _local(p: Tensor) -> Tensor:
    """The tensor this rank holds for ``p``, detached (a view, never a copy)."""
    p = p.detach()
    return p.to_local() if _is_dtensor(p) else p


@dataclass(frozen=True)
class _ParamShard:
    """Where this rank's local rows of one parameter sit in the global parameter."""

    offset: int  # global index of the first local row
    rows: int  # number of local rows (may be 0)
    sharded: bool  # split along dim 0 across more than one rank (same on every rank)
    owner: bool  # this rank contributes these entries (one replica per entry in the sum)


class ShardedLaws:
    """Evaluate law groups from local shards with one all-reduce per call.

    Built by :class:`~torch_conslaw.ConservationMonitor` when the model has ``DTensor``
    parameters. :attr:`groups` are the groups it evaluates; :attr:`excluded` the matrix
    groups it cannot (each a :class:`~torch_conslaw.structure.Skipped` with the reason).
    """

    def __init__(self, params: Mapping[str, Tensor], groups: Sequence[LawGroup]) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ShardingNotSupported(
                "ConservationMonitor: the model has DTensor (sharded) parameters but no "
                "torch.distributed process group is initialized; build the monitor inside the "
                "distributed run, on every rank"
            )
        names = sorted({n for g in groups for n in g.parameter_names})
        self._mesh, self._group, self._lead = _common_mesh(params, names)
        self._shards = {n: _param_shard(n, params[n], self._mesh, self._lead) for n in names}
        self.groups: list[LawGroup] = []
        self.excluded: list[Skipped] = []
        for g in groups:
            sharded = [n for n in g.parameter_names if self._shards[n].sharded]
            if isinstance(g, MatrixLaws) and sharded:
                self.excluded.append(
                    Skipped(
                        g.pair.producer,
                        g.pair.consumer,
                        f"matrix law of {'' if g.pair.internal else 'the linear hidden layer '}"
                        f"{g.name} not tracked under "
                        f"sharding: its entries (W W^T) mix different rows of {sharded[0]}, "
                        "which is sharded (FSDP2 / DTensor Shard(0)), so they cannot be summed "
                        "from local rows with one all-reduce",
                    )
                )
            else:
                self.groups.append(g)
        self.names = sorted({n for g in self.groups for n in g.parameter_names})
        self._error: str | None = None
        self._plans: list[tuple[list[tuple[str, Any, str, int]], ...] | None] = []
        for g in self.groups:
            try:
                self._plans.append(None if isinstance(g, MatrixLaws) else self._unit_plan(g, params))
            except ShardingNotSupported as err:  # raised on every rank after the first reduce
                self._error = self._error or str(err)
                self._plans.append(None)
        self._counts = [g.count for g in self.groups]
        self._bufs: dict[tuple[str, str], Tensor] = {}
        self._device = _local(params[self.names[0]]).device if self.names else torch.device("cpu")

    # ------------------------------------------------------------------ construction
    def _unit_plan(
        self, g: LawGroup, params: Mapping[str, Tensor]
    ) -> tuple[list[tuple[str, Any, str, int]], ...]:
        """Per side, (name, reader, mode, offset): mode ``rows`` puts the reader's output rows
        at ``offset`` (the unit axis is the sharded dim 0), ``all`` adds them to every unit
        (the sharded dim is summed over), ``skip`` when this rank contributes nothing."""
        sides = []
        for readers in (g.pair.incoming, g.pair.outgoing):
            plan = []
            for name, fn in readers:
                info = self._shards[name]
                local = _local(params[name])
                if not info.owner or local.numel() == 0:
                    plan.append((name, fn, "skip", 0))
                elif not info.sharded:
                    plan.append((name, fn, "all", 0))
                else:
                    plan.append((name, fn, _classify_reader(g, name, fn, local, info), info.offset))
            sides.append(plan)
        return tuple(sides)

    def initial(self, params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """h(θ₀) and the natural scales of every group (global, identical on every rank)."""
        with torch.no_grad():
            p64 = self._load("after", _locals(params, self.names))
            parts = []
            for g, plan in zip(self.groups, self._plans):
                if plan is None:
                    if isinstance(g, MatrixLaws) and self._lead:
                        parts += [g.values(p64), g.scale(p64)]
                    else:
                        parts += [self._zeros(g.count), self._zeros(g.count)]
                    continue
                point = _at(g, p64)
                inc, out = self._sides(g, plan, point, point)
                parts += [inc - g.degree * out, inc + g.degree * out]  # type: ignore[attr-defined]
            flat = self._reduce(parts, check=True)
        values, scales = {}, {}
        for g, (v, s) in zip(self.groups, _pairs(flat, self._counts)):
            values[g.name], scales[g.name] = v, s
        return values, scales

    # ------------------------------------------------------------------ recording
    def local(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The local tensors of the tracked parameters (views, no copy)."""
        return _locals(params, self.names)

    def values(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """h(θ) of every group, from the local shards and one all-reduce."""
        return dict(zip((g.name for g in self.groups), self.values_table(params)[0].split(self._counts)))

    def values_table(self, params: Mapping[str, Tensor]) -> Tensor:
        """``[1, laws]``: h(θ) of every law, groups in order (one all-reduce)."""
        with torch.no_grad():
            p64 = self._load("after", _locals(params, self.names))
            points = [_at(g, p64) for g in self.groups]
            flat = self._reduce([self._bilinear(g, plan, x, x) for g, plan, x in zip(self.groups, self._plans, points)])
        return flat.view(1, -1)

    def split_table(self, before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> Tensor:
        """``[3, laws]``: h(after), 2B(before, Δ) and B(Δ, Δ) of every law, groups in order;
        ``before`` holds local float64 snapshots (:meth:`local` shapes), ``after`` the live
        parameters. One all-reduce."""
        with torch.no_grad():
            a64 = self._load("after", _locals(after, self.names))
            b64 = {n: before[n] for n in self.names}
            delta = {n: torch.sub(a64[n], b64[n], out=self._buf("delta", n, a64[n])) for n in self.names}
            parts = []
            for g, plan in zip(self.groups, self._plans):
                point = _at(g, a64)
                parts += [
                    self._bilinear(g, plan, point, point),
                    2.0 * self._bilinear(g, plan, _at(g, b64), delta),  # 2B(θ + c, Δ) for a shifted law
                    self._bilinear(g, plan, delta, delta),
                ]
            flat = self._reduce(parts)
        chunks = flat.split([c for c in self._counts for _ in range(3)])  # per group: h, first, second
        if not chunks:
            return flat.new_zeros(3, 0)
        return torch.stack([torch.cat(chunks[i::3]) for i in range(3)])

    def split(
        self, before: Mapping[str, Tensor], after: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """h(after), 2B(before, Δ) and B(Δ, Δ) of every group (views into :meth:`split_table`)."""
        names = [g.name for g in self.groups]
        values, first, second = (dict(zip(names, row.split(self._counts))) for row in self.split_table(before, after))
        return values, first, second

    # ------------------------------------------------------------------ internals
    def _bilinear(self, g: LawGroup, plan: Any, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
        if plan is None:  # a matrix group with no sharded parameter: evaluated whole on one rank
            return g.bilinear(a, b) if self._lead else self._zeros(g.count)
        inc, out = self._sides(g, plan, a, b)
        return inc - g.degree * out  # type: ignore[attr-defined]

    def _sides(self, g: LawGroup, plan: Any, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> list[Tensor]:
        sums = []
        for side in plan:
            total = self._zeros(g.count)
            for name, fn, mode, offset in side:
                if mode == "skip":
                    continue
                xa = fn(a[name])
                xb = xa if b is a else fn(b[name])
                prod = xa * xb
                term = prod.sum(dim=tuple(range(1, prod.dim()))) if prod.dim() > 1 else prod
                if mode == "rows":
                    total[offset : offset + term.shape[0]] += term
                else:
                    total += term
            sums.append(total)
        return sums

    def _zeros(self, n: int) -> Tensor:
        return torch.zeros(n, dtype=F64, device=self._device)

    def _buf(self, kind: str, name: str, like: Tensor) -> Tensor:
        buf = self._bufs.get((kind, name))
        if buf is None or buf.shape != like.shape or buf.device != like.device:
            buf = self._bufs[(kind, name)] = torch.empty(like.shape, dtype=F64, device=like.device)
        return buf

    def _load(self, kind: str, local: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """float64 views of the local tensors (copied into persistent buffers when needed)."""
        return {n: t if t.dtype == F64 else self._buf(kind, n, t).copy_(t) for n, t in local.items()}

    def _reduce(self, parts: list[Tensor], check: bool = False) -> Tensor:
        """One all-reduce (SUM) of the concatenated partial vectors over the mesh's ranks."""
        import torch.distributed as dist

        flat = torch.cat(parts) if parts else self._zeros(0)
        if check:  # an error flag rides along, so a rank-local failure stops every rank
            flag = self._zeros(1) + (1.0 if self._error else 0.0)
            flat = torch.cat([flat, flag])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._group)
        if check:
            flat, flag = flat[:-1], flat[-1]
            if float(flag) > 0:
                raise ShardingNotSupported(
                    self._error
                    or "ConservationMonitor: another rank could not map its local shards onto "
                    "the laws (see the error raised there)"
                )
        return flat.cpu()


def _locals(params: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    return {n: _local(params[n]) for n in names}


def _pairs(flat: Tensor, counts: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    chunks = flat.split([c for c in counts for _ in range(2)])
    return [(chunks[2 * i], chunks[2 * i + 1]) for i in range(len(counts))]


def _common_mesh(params: Mapping[str, Tensor], names: Sequence[str]) -> tuple[Any, Any, bool]:
    """(device mesh, process group for the all-reduce, whether this rank leads the mesh)."""
    import torch.distributed as dist

    mesh = None
    first = ""
    for n in names:
        p = params[n]
        if not _is_dtensor(p):
            continue
        m = p.device_mesh
        if mesh is None:
            mesh, first = m, n
        elif m != mesh:
            raise ShardingNotSupported(
                f"ConservationMonitor: parameters {first} and {n} live on different device "
                "meshes; the laws can only be summed over one mesh (shard the model with one "
                "fully_shard mesh)"
            )
    if mesh is None:  # DTensors only outside the tracked parameters: nothing is sharded here
        return None, None, dist.get_rank() == 0
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ShardingNotSupported("ConservationMonitor: this rank is not part of the parameters' device mesh")
    if mesh.ndim == 1:
        group = mesh.get_group(0)
    elif mesh.size() == dist.get_world_size():
        group = None  # the default group spans the mesh
    else:
        raise ShardingNotSupported(
            f"ConservationMonitor: a {mesh.ndim}-D device mesh that does not span all "
            f"{dist.get_world_size()} ranks is not supported (no single process group to sum over)"
        )
    return mesh, group, all(c == 0 for c in coordinate)


def _param_shard(name: str, p: Tensor, mesh: Any, lead: bool) -> _ParamShard:
    local = _local(p)
    if not _is_dtensor(p):  # a plain parameter next to sharded ones: full on each rank
        return _ParamShard(0, local.shape[0] if local.dim() else 1, False, lead)
    from torch.distributed.tensor import Replicate, Shard

    if local.dim() == 0:
        raise ShardingNotSupported(f"ConservationMonitor: scalar DTensor parameter {name} is not supported")
    coordinate = mesh.get_coordinate()
    owner, offset, rows, sharded = True, 0, p.shape[0], False
    seen_shard = False
    for dim, placement in enumerate(p.placements):
        if type(placement) is Replicate:
            owner = owner and coordinate[dim] == 0
        elif type(placement) is Shard and placement.dim == 0 and not seen_shard:
            seen_shard = True
            size = mesh.size(dim)
            chunk = math.ceil(p.shape[0] / size)
            offset = coordinate[dim] * chunk
            rows = max(0, min(chunk, p.shape[0] - offset))
            sharded = size > 1
        else:
            raise ShardingNotSupported(
                f"ConservationMonitor: parameter {name} has placement {placement} on mesh dim "
                f"{dim} (placements {tuple(p.placements)}); only Shard(0) (FSDP2 fully_shard's "
                "default) and Replicate() can be summed from local shards"
            )
    if local.shape[0] != rows or tuple(local.shape[1:]) != tuple(p.shape[1:]):
        raise ShardingNotSupported(
            f"ConservationMonitor: the local shard of {name} has shape {tuple(local.shape)}, not "
            f"the {rows} rows of dim 0 expected from {tuple(p.placements)}: layout not understood"
        )
    return _ParamShard(offset, rows, sharded, owner)


def _classify_reader(g: LawGroup, name: str, fn: Any, local: Tensor, info: _ParamShard) -> str:
    """``rows`` when the reader keeps dim 0 as the unit axis, ``all`` when it sums over dim 0
    (checked on a probe of global row indices, local size, once at construction)."""
    shape = (-1,) + (1,) * (local.dim() - 1)
    row_ids = torch.arange(info.offset, info.offset + info.rows, dtype=F64)
    probe = row_ids.view(shape).expand(local.shape)
    fail = (
        f"ConservationMonitor: cannot map the local rows of sharded parameter {name} onto the "
        f"units of {g.name} (its row reader mixes rows); this layer type is not supported "
        "under FSDP2 / DTensor sharding"
    )
    try:
        out = fn(probe)
    except Exception as err:  # a reader written for the full shape
        raise ShardingNotSupported(f"{fail} ({type(err).__name__}: {err})") from err
    if out.dim() == 0 or out.numel() != local.numel():
        raise ShardingNotSupported(fail)
    rows = out.reshape(out.shape[0], -1)
    if (
        out.shape[0] == info.rows
        and info.offset + info.rows <= g.count
        and bool((rows == row_ids.view(-1, 1)).all())
    ):
        return "rows"
    if out.shape[0] == g.count:
        index = (rows - info.offset).long()
        counts = torch.zeros(g.count, info.rows, dtype=F64).scatter_add_(1, index, torch.ones_like(rows))
        if bool((counts == counts[0, 0]).all()):  # every unit sees every local row equally
            return "all"
    raise ShardingNotSupported(fail)


def _at(g: LawGroup, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The point whose quadratic form is the law: θ + c for a unit law of shifted parameters
    (:meth:`~torch_conslaw.lawgroups.UnitLaws.shifted`, local entries alike), else θ."""
    return g.shifted(params) if isinstance(g, UnitLaws) else params
