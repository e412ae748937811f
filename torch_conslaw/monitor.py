"""ConservationMonitor: track the known conservation laws of a model through training.

The monitor finds every law group of the model (:mod:`torch_conslaw.structure`), evaluates
them at construction (θ₀), and at each recorded optimizer step stores the law values and,
with ``split=True``, the exact split of each change into its first-order (symmetry-breaking)
and second-order (discretization) parts (SCIENCE.md §6). It only reads parameters: training
is bitwise identical with and without it. Under FSDP2 (``fully_shard``) the laws are summed
from each rank's local shards with one all-reduce per recording (:mod:`torch_conslaw.sharding`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> monitor = ConservationMonitor(model).attach(opt)
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> for _ in range(5):
    ...     opt.zero_grad()
    ...     nn.functional.mse_loss(model(x), y).backward()
    ...     opt.step()
    >>> monitor.num_steps, monitor.summary()[0]["max_rel_first_order"] < 1e-6
    (5, True)
"""

from __future__ import annotations

import math
import operator
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .accounting import Accountant, Record, RecordStore
from .async_recording import AsyncRecorder
from .budget import OverheadBudget
from .recorders import choose_recording, recording_from_legacy
from .live_reading import LiveReader
from .lawgroups import LawGroup, build_groups
from .schedule import Schedule
from .sharding import ShardedLaws, has_sharded_parameters
from .structure import Skipped, Structure, find_structure, unwrap_model
from .catalogue import user_registrations
from .laws.verify import Verification, propose_and_check
from .velocity_tracking import IdentityGroup, VelocityTracker

__all__ = ["ConservationMonitor", "Record", "optimizer_breaking_reasons"]

_STATE_FORMAT = "torch_conslaw.ConservationMonitor/1"
# live reading: finished records reach the history and the listeners in batches of this many
# (one pass over warm code instead of one cold pass per training step)
_LIVE_DELIVERY_BATCH = 16


def optimizer_breaking_reasons(optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Map ``id(parameter)`` → why this optimizer's update breaks the laws (SCIENCE.md §6).

    Plain SGD (no momentum, no weight decay) keeps every law up to the O(η²)-per-step
    discretization drift, so its parameters are absent from the result.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> list(optimizer_breaking_reasons(torch.optim.Adam([p])).values())[0][:4]
        'Adam'
    """
    reasons: dict[int, str] = {}
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.SGD):
            parts = []
            if group.get("momentum", 0):
                parts.append(
                    f"momentum={group['momentum']:g}: the laws follow an exact recurrence, "
                    "not a conservation"
                )
            if group.get("weight_decay", 0):
                parts.append(
                    f"weight_decay={group['weight_decay']:g}: each law shrinks by (1 − ηλ)² per step"
                )
            if not parts:
                continue
            reason = f"{name} with " + "; ".join(parts)
        else:
            reason = (
                f"{name} is not plain SGD: its preconditioned or accumulated update has a "
                "nonzero first-order part, so the laws are not conserved"
            )
        for p in group["params"]:
            reasons[id(p)] = reason
    return reasons


class ConservationMonitor:
    """Find the conservation laws of ``model``, then record them at each scheduled step.

    Args:
        model: the network (``DistributedDataParallel`` and other ``.module`` wrappers are
            unwrapped; :attr:`model` is the inner module). Sharded parameters (FSDP2
            ``fully_shard``: ``DTensor`` with ``Shard(0)``) are supported inside an initialized
            process group: each rank sums its local rows and one all-reduce per recording gives
            every rank the exact global laws (:mod:`torch_conslaw.sharding`; matrix laws of
            linear hidden layers with a sharded parameter are excluded, with the reason in
            :attr:`skipped`). Build it on every rank and record on every rank.
        example_input: what ``model(...)`` takes (a tensor, a tuple of positional arguments or
            a dict of keyword arguments). With it, every law is checked numerically before it
            is tracked (⟨∇h, ∂fᵀu⟩ = 0 for random output cotangents u, float64,
            :mod:`torch_conslaw.laws.verify`): a group that fails goes to :attr:`skipped` with
            its measured residual, and the linear and approximate families are added
            (:mod:`torch_conslaw.laws.families`). Without it the layer-pair laws are tracked
            unverified (:attr:`verification_note` and ``summary()[i]["verified"]`` say so).
            It is also needed when ``torch.fx`` cannot trace the model (see
            :func:`~torch_conslaw.find_structure`).
        loss: ``"cross_entropy"`` also tracks the softmax cross-entropy translation law of the
            output layer, which holds for that loss only (needs ``example_input``).
        split: also record the exact first-/second-order split of every change (costs a
            parameter snapshot before each recorded step).
        every: record every ``every`` optimizer steps (default: every step, unless
            ``overhead_budget`` is given; ``every=1`` always records every step).
        log_spaced: record on a log-spaced grid of steps instead (then ``every`` must stay 1).
        max_records: bound on the stored history; older records are thinned evenly, the
            running maxima of :meth:`summary` stay exact.
        track_broken: also track the would-be laws of pairs whose activation is not
            positively homogeneous (GELU, tanh, ...), with ``expected_conserved=False``,
            to show how they break.
        asynchronous: deprecated alias of ``recording`` (``False`` → ``"sync"``, ``True`` →
            ``"snapshot"``, ``"live"``), with a ``DeprecationWarning``.
        async_buffers: with ``recording="snapshot"``, how many parameter snapshots (each the
            size of the tracked parameters, in their own dtype) may be in flight.
        recording: which recorder reads θ (:mod:`torch_conslaw.recorders`): ``"sync"`` (the
            training thread), ``"snapshot"`` (a native copy, evaluated by a worker thread;
            on CUDA on a side stream), ``"live"`` (the worker reads θ during the next
            forward pass; CPU, :meth:`attach`), or ``"auto"``: sharded → sync, CUDA →
            snapshot, CPU with a core torch leaves free → live from :meth:`attach` on,
            otherwise sync. The default stays ``"sync"``: the worker recorders deliver
            records, listener calls and non-finite warnings later (at the next hook or
            :meth:`flush`), which code written for the synchronous monitor may not expect.
            :attr:`recording` and :attr:`recording_reason` say which was chosen. Records are
            bitwise the same whichever recorder runs.
        overhead_budget: record as often as this fraction of the training step time allows
            (e.g. ``0.03``; or a :class:`~torch_conslaw.OverheadBudget`), measured online
            on the training thread (:mod:`torch_conslaw.budget`); every recorded step keeps
            its exact split, and ``summary()`` / ``history()["step"]`` say which steps were
            recorded. Exclusive with ``every`` / ``log_spaced``.
        evaluation: how the per-unit laws are evaluated (:class:`~torch_conslaw.accounting.Accountant`):
            ``"eager"`` (chunked torch operations, needs nothing) or ``"compiled"`` (one fused
            TorchInductor kernel per record, compiled at the first record, seconds; equal to
            the eager records up to float64 summation order; falls back to eager with a
            warning where no compiler is found). Every recorder uses the same evaluator.

    Snapshot recording (``recording="snapshot"``, formerly ``asynchronous=True``): at a recorded step the training thread
    only copies the tracked parameters, in their own dtype, into one of ``async_buffers``
    preallocated buffers; one daemon worker thread evaluates the laws and the split from these
    snapshots with the same float64 code, so the records are bitwise those of the synchronous
    mode. With ``split=True`` the snapshot after step t serves as θ before step t + 1 unless a
    parameter was modified in between (its version counter or storage changed; then a fresh
    snapshot is taken before the step; in-place edits through ``.data`` between steps are not
    seen and would be counted in the next step's change). Records reach the history, the
    running maxima and the listeners **on the training thread**: finished ones are delivered at
    the next optimizer hook (or :meth:`step`), and :meth:`summary`, :meth:`history`,
    :meth:`table`, :meth:`state_dict`, :meth:`load_state_dict`, :meth:`flush` and
    :meth:`detach` first wait for the worker. Non-finite warnings and worker exceptions also
    surface there. When every buffer is in flight the training thread waits for the worker
    (back-pressure; nothing is dropped). The mode pays off when a core is free for the
    worker; on a fully loaded machine the work only moves to another thread. Not available
    for sharded (FSDP2) parameters.

    Live reading (``recording="live"``, formerly ``asynchronous="live"``; CPU parameters, :meth:`attach` only): the training
    thread copies nothing. The worker reads the parameters themselves while the next forward
    and backward passes run (θ does not change between optimizer steps), starting at the
    model's next forward pass; the optimizer's pre-step hook waits until the read is over. Records are bitwise those of the synchronous mode when nothing
    edits the parameters between steps; an edit made between ``optimizer.step()`` and the
    next forward pass belongs to the record of that step, and the split of each record is
    taken against the state read for the previous record, so consecutive records differ by
    exactly first + second order. With ``optimizer.step(closure)`` (Lightning, L-BFGS) the
    forward pass runs inside the step: the pre-step hook wraps the closure and waits after it.
    In-place edits through ``.data`` during a training step are not seen (see
    :mod:`torch_conslaw.live_reading`). Records reach the history and the listeners in batches
    of 16 (and at :meth:`flush`, :meth:`summary`, ...). It adds a forward pre-hook to the
    model while attached, and to every tracked layer once a step passes without the model's
    own forward pass (:meth:`detach` removes them; a copied or pickled model keeps an inert
    one).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any = None,
        *,
        split: bool = True,
        every: int | None = None,
        log_spaced: bool = False,
        max_records: int = 10_000,
        track_broken: bool = False,
        asynchronous: bool | str | None = None,
        async_buffers: int = 4,
        recording: str = "sync",
        overhead_budget: float | OverheadBudget | None = None,
        loss: str | None = None,
        evaluation: str = "eager",  # fused evaluation (torch_conslaw.evaluation)
    ) -> None:
        self.model: nn.Module = unwrap_model(model)
        self._params: dict[str, Tensor] = dict(self.model.named_parameters(remove_duplicate=False))
        self.structure: Structure = find_structure(self.model, example_input)
        candidates = [s.candidate for s in self.structure.skipped if s.candidate is not None]
        pairs = list(self.structure.pairs) + (candidates if track_broken else [])
        self.groups: list[LawGroup] = build_groups(pairs)
        self.skipped: list[Skipped] = [
            s for s in self.structure.skipped if not (track_broken and s.candidate is not None)
        ]
        # --- verify before claiming; linear and approximate families (issue 8) --------------
        checked = propose_and_check(
            self.model, self.structure, example_input, self.groups, self.skipped, loss=loss,
            sharded=has_sharded_parameters(self._params),
        )
        self.groups, self.skipped = checked.groups, checked.skipped
        self.verification: dict[str, Verification] = checked.verification
        self.verification_note: str = checked.note
        if checked.note and user_registrations():
            warnings.warn(
                f"ConservationMonitor: {checked.note}. You registered "
                f"{', '.join(user_registrations())}: a wrong registration gives false laws that "
                "only the check can catch",
                RuntimeWarning,
                stacklevel=2,
            )
        # -------------------------------------------------------------------------------------
        # sharded parameters (FSDP2 fully_shard / DTensor): laws summed from local shards
        self._sharded: ShardedLaws | None = None
        if has_sharded_parameters(self._params):
            self._sharded = ShardedLaws(self._params, self.groups)
            self.groups = self._sharded.groups
            self.skipped += self._sharded.excluded
            for s in self._sharded.excluded:
                warnings.warn(f"ConservationMonitor: {s}", RuntimeWarning, stacklevel=2)
        # identity groups of SGD with momentum / weight decay (velocity laws, recurrences),
        # built at attach (:mod:`torch_conslaw.velocity_tracking`)
        self._base_skipped = list(self.skipped)
        self._identities = VelocityTracker(self._params, self.groups)
        self.split = bool(split)
        # --- recording schedule (torch_conslaw.budget) ---
        self.schedule: Schedule | OverheadBudget = _schedule(every, log_spaced, overhead_budget)
        self._budget = self.schedule if isinstance(self.schedule, OverheadBudget) else None
        # --- end recording schedule ---
        self._store = RecordStore(max_records)
        self._listeners: list[Callable[[Record], None]] = []
        self._handles: list[Any] = []
        self._in_step = False  # between the optimizer's pre- and post-step hooks
        self._nested = 0  # hook calls of an inner step() (a subclass calling super().step())
        self._base_expectation = {g.name: (g.expected_conserved, g.reason) for g in self.groups}
        self._names = sorted({n for g in self.groups for n in g.parameter_names})
        self._layout = {n: _locate(self.model, n) + (self._params[n].shape,) for n in self._names}
        edges, leaves = _fast_layout(self.model, self._layout)
        # (registry, key) → expected object: every module on the path to a tracked parameter
        # (parent._modules) and every tracked parameter (module._parameters)
        self._lookups = [(p._modules, k) for p, k, _ in edges] + [(m._parameters, a) for m, a, _, _ in leaves]
        self._expected = [c for *_, c in edges] + [p for _, _, p, _ in leaves]
        self._leaf_params = [p for _, _, p, _ in leaves]
        self._shapes = [shape for *_, shape in leaves]
        self.num_steps = 0
        self._before: dict[str, Tensor] | None = None
        self._spare: dict[str, Tensor] | None = None  # reused buffers for the pre-step snapshot
        self._last_snapshot: dict[str, Tensor] | None = None
        if not self.groups:
            reasons = "; ".join(str(s) for s in self.skipped) or "no layer pairs"
            warnings.warn(
                f"ConservationMonitor: no conservation law is tracked for "
                f"{type(self.model).__name__} ({reasons})",
                RuntimeWarning,
                stacklevel=2,
            )
        self._accountant = Accountant(self.groups, evaluation)  # fused evaluation (torch_conslaw.evaluation)
        self._async: AsyncRecorder | None = None
        self._live: LiveReader | None = None
        # --- recorder selection (torch_conslaw.recorders) ---
        if asynchronous is not None:
            if recording != "sync":
                raise ValueError(
                    f"ConservationMonitor: pass recording={recording!r} or the deprecated "
                    f"asynchronous={asynchronous!r}, not both"
                )
            recording = recording_from_legacy(asynchronous)
        tracked = [self._params[n] for n in self._names]
        self.recording, self.recording_reason = choose_recording(recording, tracked, sharded=self._sharded is not None)
        # "auto" → live: synchronous until attach() (a manual loop stays synchronous)
        self._live_at_attach = recording == "auto" and self.recording == "live"
        if self._live_at_attach:
            self.recording = "sync"
            self.recording_reason += "; becomes 'live' at attach()"
        mode = {"sync": None, "snapshot": "snapshot", "live": "live"}[self.recording]
        asynchronous = f"recording={self.recording!r}"  # for the messages below
        self._async_buffers = async_buffers
        # --- end recorder selection ---
        self._reuse: tuple[int, tuple[tuple[int, int], ...]] | None = None  # async: θ after the last step
        self._stats_job: tuple[tuple[Tensor, ...], Callable[..., Any]] | None = None
        if mode is not None:
            if self._sharded is not None:
                raise ValueError(
                    f"ConservationMonitor: {asynchronous} is not supported with "
                    "sharded (FSDP2) parameters, whose laws need a collective per recording; use "
                    "the default synchronous mode"
                )
            self._async = AsyncRecorder(
                self._params, self._names, self._accountant, async_buffers, self._deliver
            )
            _warn_without_a_free_core(asynchronous, [self._params[n] for n in self._names])
        if mode == "live":
            self._build_live()
        if self._sharded is None:  # chunked, in float64 from the native tensors (no float64 θ)
            values0, scales = self._accountant.initial(self._params)
            self.initial: dict[str, Tensor] = {k: v.cpu() for k, v in values0.items()}
        else:  # one all-reduce: values and scales summed from the local shards
            self.initial, scales = self._sharded.initial(self._params)
        self._counts = [g.count for g in self.groups]
        self._group_index = torch.repeat_interleave(
            torch.arange(len(self.groups)), torch.tensor(self._counts, dtype=torch.long)
        ).unsqueeze(0)
        self._init_flat = self._flat(self.initial)
        self._scale_flat = self._flat({g.name: _floor_scale(scales[g.name]).cpu() for g in self.groups})
        self._invalid = torch.zeros(sum(self._counts), dtype=torch.bool)
        self._maxima = {g.name: dict.fromkeys(_MAXIMA, 0.0) for g in self.groups}
        self._mark_invalid(0, self._init_flat, None, None)
        zeros = {name: torch.zeros_like(v) for name, v in self.initial.items()}
        first = zeros if self.split else None
        self._store.add(Record(0, dict(self.initial), first, first, dict.fromkeys(self.initial, 0.0)))
        if self.split and self._live is None:
            self._last_snapshot = self._snapshot()

    def _build_live(self) -> None:
        """The live reader (``recording="live"``; ``"auto"`` builds it at :meth:`attach`)."""
        devices = sorted({str(self._params[n].device) for n in self._names if self._params[n].device.type != "cpu"})
        if devices:
            raise ValueError(
                f"ConservationMonitor: recording='live' reads CPU parameters during the "
                f"forward pass; the tracked parameters live on {', '.join(devices)}. Use "
                "recording='snapshot' (or 'auto') there"
            )
        if self._async is None:
            self._async = AsyncRecorder(self._params, self._names, self._accountant, self._async_buffers, self._deliver)
        modules = [self._layout[n][2] for n in self._names]
        self._live = LiveReader(
            self._async,
            self._params,
            self._names,
            self.model,
            modules,
            self._statistics_job,
            self._check_unchanged,
        )

    # ------------------------------------------------------------------ optimizer hooks
    def attach(self, optimizer: torch.optim.Optimizer) -> "ConservationMonitor":
        """Record around every ``optimizer.step()`` through step pre/post hooks; returns self.

        Raises ``ValueError`` when the optimizer owns none of the model's parameters.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"ConservationMonitor.attach: expected a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}"
            )
        if self._handles:
            raise RuntimeError("ConservationMonitor.attach: already attached; call detach() first")
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not owned & {id(p) for p in self.model.parameters()}:
            raise ValueError(
                f"ConservationMonitor.attach: the {type(optimizer).__name__} owns none of the "
                f"parameters of {type(self.model).__name__}; pass the optimizer that trains "
                "this model (built from model.parameters())"
            )
        self._set_expectations(optimizer, owned)
        notes = self._identities.configure(optimizer, self._sharded is not None)
        for g in self.groups:
            if g.name in notes and not g.expected_conserved:
                g.reason = f"{g.reason}; {notes[g.name]}"
        self.skipped = self._base_skipped + self._identities.skipped
        self._in_step, self._nested = False, 0
        self._handles = [
            optimizer.register_step_pre_hook(self._optimizer_pre_hook),
            optimizer.register_step_post_hook(self._optimizer_post_hook),
        ]
        self._drop_last_snapshot()
        if self._live_at_attach:  # recording="auto" with a free core
            self._build_live()
            self.recording = "live"
        if self._live is not None:
            self._live.start(self._capture_for(self.num_steps + 1))
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (manual :meth:`step` calls work again afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._identities.release()
        if self._live is not None:
            self._live.stop()
            if not self._live_at_attach:
                return
            self._live = None  # recording="auto": synchronous again until the next attach()
            self._async.close()  # type: ignore[union-attr]
            self._async = None
            self.recording = "sync"
        self._release_before()
        self._release_reuse()
        self.flush()
        if self.split:
            self._drop_last_snapshot()
            self._last_snapshot = self._snapshot()

    def _optimizer_pre_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        """Once per ``optimizer.step()``: an optimizer subclass whose ``step`` calls
        ``super().step()`` runs the hooks again inside the step (torch hooks both classes);
        those nested calls are ignored."""
        if self._in_step:
            if _steps_on_stack(optimizer) > 1:
                self._nested += 1
                return None
            self._nested = 0  # the previous step raised before its post-step hook ran
        self._in_step = True
        if self._budget is not None:  # the monitor's time counts against the overhead budget
            with self._budget.timing():
                return self._pre_step_hook(args, kwargs)
        return self._pre_step_hook(args, kwargs)

    def _optimizer_post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._nested:
            self._nested -= 1
            return
        self._in_step = False
        if self._budget is not None:
            self._budget.step_ended(self.num_steps + 1)
            with self._budget.timing():
                self.post_step()
            return
        self.post_step()

    def _pre_step_hook(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """The optimizer's pre-step hook. Live reading with ``step(closure)`` (Lightning,
        L-BFGS): the forward and backward passes run inside ``step()``, so the read must be
        waited for after the closure, not before it: the closure is wrapped (its result is
        returned unchanged). ``args`` starts with the optimizer itself."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if self._live is None or closure is None:
            self.pre_step()
            return None
        self._live.wait_in_flight()  # a read a forward pass before step() started

        def closure_then_wait(*a: Any, **k: Any) -> Any:
            result = closure(*a, **k)
            self.pre_step()  # the forward pass started the read; θ changes after this
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_wait}
        return (args[0], closure_then_wait, *args[2:]), kwargs

    def pre_step(self) -> None:
        """Snapshot θ before a step that will be recorded (called by the pre hook)."""
        if self.schedule.due(self.num_steps + 1):
            self._identities.before_step(self.num_steps + 1)  # reads θ and momentum buffers
        if self._live is not None:
            self._async.collect(min_ready=_LIVE_DELIVERY_BATCH)  # type: ignore[union-attr]
            step = self.num_steps + 1  # the structure check runs on the worker, with each read
            self._live.before_step(step, self._capture_for(step) is not None)
            return
        if self._async is not None:
            self._async_pre_step()
            return
        self._check_unchanged()
        if self.split and self.schedule.due(self.num_steps + 1):
            self._before = self._snapshot(self._spare)

    def post_step(self) -> None:
        """Count the step and record it if it is due (called by the post hook)."""
        if self.schedule.due(self.num_steps + 1):
            self._identities.after_step(self.num_steps + 1)
        if self._live is not None:
            self.num_steps += 1
            due = self.num_steps if self.schedule.due(self.num_steps) else None
            self._live.after_step(due, self._capture_for(self.num_steps + 1))
            return
        if self._async is not None:
            self._async_post_step()
            return
        self.num_steps += 1
        if self.schedule.due(self.num_steps):
            before, self._before = self._before, None
            self._record(before if before is not None else self._last_snapshot)
            if before is not None:
                self._spare = before

    def step(self) -> None:
        """For manual loops: call after ``optimizer.step()``.

        The split of a recorded change is taken against θ at the previous record.
        """
        if self._handles:
            raise RuntimeError(
                "ConservationMonitor.step: this monitor is attached to an optimizer, whose hooks "
                "already record each step; call detach() to drive it by hand"
            )
        if self._live is not None:
            raise RuntimeError(
                "ConservationMonitor.step: recording='live' reads the parameters during the "
                "next forward pass and needs the optimizer's pre-step hook to know when the read "
                "must end; call attach(optimizer), or build the monitor with recording='snapshot' "
                "for a manual loop"
            )
        if self._budget is not None:
            self._budget.step_ended(self.num_steps + 1)
            with self._budget.timing():
                self._manual_step()
            return
        self._manual_step()

    def _manual_step(self) -> None:
        if self._async is not None:
            self._async.collect()
        self._check_unchanged()
        self.num_steps += 1
        if self.schedule.due(self.num_steps):
            if self._async is not None:
                after = self._async.snapshot()
                self._async.submit(self.num_steps, self._last_snapshot, after, self._statistics_job())
                if self.split:
                    self._drop_last_snapshot()
                    self._last_snapshot = after
                else:
                    self._async.release(after)
                return
            self._record(self._last_snapshot)
            if self.split:
                self._last_snapshot = self._snapshot(self._last_snapshot)

    def add_listener(self, fn: Callable[[Record], None]) -> None:
        """Call ``fn(record)`` on every record the monitor takes (e.g. to log it)."""
        if not callable(fn):
            raise TypeError(f"ConservationMonitor.add_listener: {fn!r} is not callable")
        self._listeners.append(fn)

    # ------------------------------------------------------------------ recording
    def _check_unchanged(self) -> None:
        """Refuse to go on when a tracked layer or parameter was replaced or resized."""
        # fast path (every step): the registered children and parameters are still the same
        # objects, of the same shapes; anything else goes through the full check below
        found = [registry.get(key) for registry, key in self._lookups]
        if all(map(operator.is_, found, self._expected)) and [p.shape for p in self._leaf_params] == self._shapes:
            return
        for name, (path, attr, module, param, shape) in self._layout.items():
            try:
                now = self.model.get_submodule(path) if path else self.model
            except AttributeError:
                now = None
            current = getattr(now, attr, None) if now is not None else None
            if now is not module or current is not param or param.shape != shape:
                raise RuntimeError(
                    f"ConservationMonitor: parameter {name} was replaced, resized or its layer "
                    "swapped after the monitor was built; its laws no longer describe the model. "
                    "Build a new ConservationMonitor for the edited model"
                )

    def _snapshot(self, into: dict[str, Tensor] | None = None) -> Any:
        """Copy of the tracked parameters in their own dtype (exact; the laws convert chunk by
        chunk), reusing the tensors of ``into`` when given (asynchronous mode: a snapshot
        buffer of the ring)."""
        if self._async is not None:
            return self._async.snapshot()
        params = self._params if self._sharded is None else self._sharded.local(self._params)
        with torch.no_grad():
            if into is None:
                into = {
                    n: torch.empty(p.shape, dtype=p.dtype, device=p.device)
                    for n, p in ((n, params[n]) for n in self._names)
                }
            for n in self._names:
                into[n].copy_(params[n].detach())
            return into

    def _record(self, before: dict[str, Tensor] | None) -> None:
        first: dict[str, Tensor] | None = None
        second: dict[str, Tensor] | None = None
        evaluator = self._accountant if self._sharded is None else self._sharded
        if self.split and before is not None:
            values, first, second = evaluator.split(before, self._params)
        else:
            values = evaluator.values(self._params)
        values = {k: v.cpu() for k, v in values.items()}  # small vectors; history lives on the CPU
        self._deliver(self.num_steps, values, _to_cpu(first), _to_cpu(second))

    def _deliver(
        self,
        step: int,
        values: dict[str, Tensor],
        first: dict[str, Tensor] | None,
        second: dict[str, Tensor] | None,
        precomputed: Any = None,
    ) -> None:
        """Statistics, history and listeners for the evaluated laws of ``step`` (always on the
        training thread; in asynchronous mode called when the worker's result is collected)."""
        rel = self._update_statistics(values, first, second, step, precomputed)
        if self.split and first is None:  # no snapshot to split against (post_step alone)
            first = second = {k: torch.full_like(v, math.nan) for k, v in values.items()}
        if self._identities.groups:  # velocity laws, recurrences: entries of their own
            values, rel = dict(values), dict(rel)
            if first is not None and second is not None:
                first, second = dict(first), dict(second)
            self._identities.complete(step, values, first, second, rel)
        record = Record(step, values, first, second, rel)
        self._store.add(record)
        for fn in self._listeners:
            fn(record)

    # ------------------------------------------------------------------ asynchronous mode
    def flush(self) -> None:
        """Asynchronous mode: wait for the worker and deliver every pending record (no-op in
        the synchronous mode). Re-raises an exception of the worker."""
        if self._live is not None:
            self._live.settle()
        elif self._async is not None:
            self._async.drain()

    def _capture_for(self, step: int) -> int | None:
        """Live reading: ``step`` if θ before it must be kept for its split."""
        return step if self.split and self.schedule.due(step) else None

    def _async_pre_step(self) -> None:
        rec = self._async
        assert rec is not None
        rec.collect()
        self._check_unchanged()
        reuse, self._reuse = self._reuse, None
        if self.split and self.schedule.due(self.num_steps + 1):
            self._release_before()
            if reuse is not None and reuse[1] == rec.versions():
                self._before = reuse[0]  # θ after the last step, unchanged since
                return
            rec.release(reuse[0] if reuse is not None else None)
            self._before = rec.snapshot()
        elif reuse is not None:
            rec.release(reuse[0])

    def _async_post_step(self) -> None:
        rec = self._async
        assert rec is not None
        rec.collect()
        self.num_steps += 1
        if not self.schedule.due(self.num_steps):
            return
        before, self._before = self._before, None
        if before is None:
            before = self._last_snapshot
            if before is not None:
                rec.retain(before)
        after = rec.snapshot()
        rec.submit(self.num_steps, before, after, self._statistics_job())
        rec.release(before)
        if self.split and self._handles and self.schedule.due(self.num_steps + 1):
            old, self._reuse = self._reuse, (after, rec.versions())
            if old is not None:
                rec.release(old[0])
        else:
            rec.release(after)

    def _release_before(self) -> None:
        before, self._before = self._before, None
        if self._async is not None and before is not None:
            self._async.release(before)

    def _release_reuse(self) -> None:
        reuse, self._reuse = self._reuse, None
        if self._async is not None and reuse is not None:
            self._async.release(reuse[0])

    def _drop_last_snapshot(self) -> None:
        last, self._last_snapshot = self._last_snapshot, None
        if self._async is not None and last is not None:
            self._async.release(last)

    def _flat(self, per_group: dict[str, Tensor] | None) -> Tensor | None:
        if per_group is None:
            return None
        if not self.groups:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([per_group[g.name] for g in self.groups])

    def _group_maxima(self, v: Tensor, f: Tensor | None, s: Tensor | None) -> list[list[float]]:
        """Per group: max |h − h₀|, max rel. drift (+ max rel. first/second order), valid laws only."""
        return _maxima_table(
            v, f, s, self._init_flat, self._scale_flat, self._invalid, self._group_index, len(self.groups)
        )

    def _statistics_job(self) -> Callable[..., Any] | None:
        """For the asynchronous worker: ``(values, first, second) →`` the flat vectors and the
        maxima table under the current θ₀ values, scales and invalid mask (tensors that are
        replaced, never modified in place, so the worker may read them). :meth:`_deliver`
        uses the table only if these three are still the monitor's own."""
        if not self.groups:
            return None
        cached = self._stats_job
        if cached is not None:  # once per record on the training thread: no generator here
            init, scale, invalid = cached[0]
            if init is self._init_flat and scale is self._scale_flat and invalid is self._invalid:
                return cached[1]
        key = (self._init_flat, self._scale_flat, self._invalid)
        names = [g.name for g in self.groups]
        index, n = self._group_index, len(self.groups)

        def run(values: dict[str, Tensor], first: dict[str, Tensor] | None, second: dict[str, Tensor] | None) -> Any:
            v = torch.cat([values[k] for k in names])
            f = None if first is None else torch.cat([first[k] for k in names])
            s = None if second is None else torch.cat([second[k] for k in names])
            return key, v, f, s, _maxima_table(v, f, s, *key, index, n)

        self._stats_job = (key, run)
        return run

    def _update_statistics(
        self,
        values: dict[str, Tensor],
        first: dict[str, Tensor] | None,
        second: dict[str, Tensor] | None,
        step: int,
        precomputed: Any = None,
    ) -> dict[str, float]:
        if not self.groups:
            return {}
        key = precomputed[0] if precomputed is not None else None
        if key is not None and key[0] is self._init_flat and key[1] is self._scale_flat and key[2] is self._invalid:
            _, v, f, s, table = precomputed  # computed by the asynchronous worker
        else:
            v, f, s = self._flat(values), self._flat(first), self._flat(second)
            table = self._group_maxima(v, f, s)
        if any(math.isnan(x) or x == math.inf for row in table for x in row):
            self._mark_invalid(step, v, f, s)
            table = self._group_maxima(v, f, s)
        rel: dict[str, float] = {}
        for i, g in enumerate(self.groups):
            column = [row[i] for row in table]
            if column[0] == -math.inf:  # every law of the group is invalid
                rel[g.name] = math.nan
                continue
            m = self._maxima[g.name]
            for key, x in zip(_MAXIMA, column):
                m[key] = max(m[key], x)
            rel[g.name] = column[1]
        return rel

    def _mark_invalid(self, step: int, v: Tensor, f: Tensor | None, s: Tensor | None) -> None:
        bad = ~torch.isfinite(v)
        if f is not None and s is not None:
            bad |= ~torch.isfinite(f) | ~torch.isfinite(s)
        new = bad & ~self._invalid
        if not bool(new.any()):
            return
        self._invalid = self._invalid | bad  # a new tensor: the asynchronous worker may read the old one
        for g, count in zip(self.groups, new.split(self._counts)):
            n = int(count.sum())
            if n:
                warnings.warn(
                    f"ConservationMonitor: {n} law(s) of group {g.name} became non-finite at "
                    f"step {step} (NaN/Inf in its parameters); they are marked invalid and left "
                    "out of the drift statistics",
                    RuntimeWarning,
                    stacklevel=5,
                )

    def _set_expectations(self, optimizer: torch.optim.Optimizer, owned: set[int]) -> None:
        breaking = optimizer_breaking_reasons(optimizer)
        missing: list[str] = []
        for g in self.groups:
            g.expected_conserved, g.reason = self._base_expectation[g.name]
            if not g.expected_conserved:
                continue
            for n in g.parameter_names:
                p = self._params[n]
                if id(p) not in owned:
                    g.expected_conserved = False
                    g.reason = f"{n} is not updated by the optimizer, so {g.name} is not conserved"
                    missing.append(n)
                    break
                if id(p) in breaking:
                    g.expected_conserved = False
                    g.reason = breaking[id(p)]
                    break
        if missing:
            warnings.warn(
                f"ConservationMonitor.attach: the optimizer does not update {', '.join(dict.fromkeys(missing))}; "
                "the laws of the affected groups are not expected to be conserved",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def identity_groups(self) -> list[IdentityGroup]:
        """The identity groups of the attached optimizer: velocity laws and momentum /
        weight-decay recurrences (:mod:`torch_conslaw.velocity_tracking`); empty under plain
        SGD or before :meth:`attach`."""
        return list(self._identities.groups)

    # ------------------------------------------------------------------ results
    def summary(self) -> list[dict[str, Any]]:
        """One dict per law group: drift statistics over every recorded step (exact maxima).

        Keys: ``name, kind, count, max_abs_drift, max_rel_drift, max_rel_first_order,
        max_rel_second_order, expected_conserved, reason, invalid, producer, consumer, degree,
        approximate, loss, verified, verification_residual, last_rel_drift``, and which steps
        the statistics cover: ``recorded_steps`` (how many optimizer steps were recorded;
        ``history()["step"]`` lists them, thinned to ``max_records``), ``last_recorded_step``
        and ``schedule`` (the recorder is :attr:`recording`). The split keys are ``None`` when
        ``split=False``. ``kind`` is ``unit``, ``channel``, ``matrix``, ``linear`` (h = cᵀθ) or
        ``approximate`` (exact only at a normalization's eps = 0; ``expected_conserved`` is then
        always False). ``verified`` is True when the group passed the numerical check on
        ``example_input``, False when it was not checked, None for a group tracked to show its
        breaking; ``verification_residual`` is the measured max |cos(∇h, ∂fᵀu)|.

        After the law groups come the :attr:`identity_groups` (kinds ``"velocity"`` and
        ``"recurrence"``) with one more key, ``max_rel_residual``: the largest relative
        residual of their identity over the recorded steps (also in ``max_rel_drift``).
        """
        self.flush()
        latest = self._store.latest
        invalid = {g.name: int(c.sum()) for g, c in zip(self.groups, self._invalid.split(self._counts))}
        out = []
        for g in self.groups:
            m = self._maxima[g.name]
            out.append(
                {
                    "name": g.name,
                    "kind": g.kind,
                    "count": g.count,
                    "max_abs_drift": m["max_abs_drift"],
                    "max_rel_drift": m["max_rel_drift"],
                    "max_rel_first_order": m["max_rel_first_order"] if self.split else None,
                    "max_rel_second_order": m["max_rel_second_order"] if self.split else None,
                    "expected_conserved": g.expected_conserved,
                    "reason": g.reason,
                    "invalid": invalid[g.name],
                    "producer": g.producer,
                    "consumer": g.consumer,
                    "degree": g.degree,
                    "approximate": g.approximate,
                    "loss": g.loss,
                    "verified": g.name in self.verification if g.expected_conserved or g.approximate else None,
                    "verification_residual": (
                        self.verification[g.name].residual if g.name in self.verification else None
                    ),
                    "last_rel_drift": latest.rel_drift.get(g.name, math.nan) if latest else math.nan,
                }
            )
        out += self._identities.summary_rows(self.split, latest)
        # --- which steps were recorded (recording schedule, torch_conslaw.budget) ---
        for row in out:
            row["recorded_steps"] = self._store.seen - 1  # θ₀ is not a step
            row["last_recorded_step"] = latest.step if latest else 0
            row["schedule"] = repr(self.schedule)
        # --- end ---
        return out

    def history(self) -> dict[str, np.ndarray]:
        """The stored records as numpy arrays.

        Keys: ``"step"`` (R,), and per group ``"<name>/values"`` (R × count),
        ``"<name>/rel_drift"`` (R,), plus ``"<name>/first_order"`` and
        ``"<name>/second_order"`` (R × count) when ``split=True``. Row 0 is θ₀ (step 0).
        For :attr:`identity_groups`, ``rel_drift`` is the relative residual of the identity and
        ``first_order`` its residual (NaN rows before the group existed).
        """
        self.flush()
        records = self._store.records()
        out: dict[str, np.ndarray] = {"step": np.array([r.step for r in records], dtype=np.int64)}
        for g in self.groups:
            out[f"{g.name}/values"] = _stack([r.values[g.name] for r in records], g.count)
            out[f"{g.name}/rel_drift"] = np.array([r.rel_drift[g.name] for r in records])
            if self.split:
                for key in ("first_order", "second_order"):
                    rows = [getattr(r, key)[g.name] for r in records]
                    out[f"{g.name}/{key}"] = _stack(rows, g.count)
        out.update(self._identities.history_columns(records, self.split))
        return out

    def table(self) -> str:
        """The summary as a fixed-width text table (one line per law group)."""
        self.flush()
        head = f"{'group':<18} {'kind':<8} {'laws':>5} {'max rel drift':>14} {'max rel 1st':>12} {'max rel 2nd':>12}  expected"
        lines = [head, "-" * len(head)]
        for s in self.summary():
            first = "-" if s["max_rel_first_order"] is None else f"{s['max_rel_first_order']:.2e}"
            second = "-" if s["max_rel_second_order"] is None else f"{s['max_rel_second_order']:.2e}"
            lines.append(
                f"{s['name']:<18} {s['kind']:<8} {s['count']:>5} {s['max_rel_drift']:>14.2e} "
                f"{first:>12} {second:>12}  {_expected(s)}"
            )
        if not self.groups:
            lines.append("(no law tracked)")
        if self.verification_note:
            lines.append(self.verification_note)
        for s in self.skipped:
            lines.append(f"skipped: {s}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """θ₀ law values, scales, history, running maxima and the step counter."""
        self.flush()
        return {
            "format": _STATE_FORMAT,
            "num_steps": self.num_steps,
            "groups": {g.name: g.count for g in self.groups},
            "initial": {k: v.clone() for k, v in self.initial.items()},
            "scale": self._scale_flat.clone(),
            "invalid": self._invalid.clone(),
            "maxima": {k: dict(v) for k, v in self._maxima.items()},
            "store": self._store.state_dict(),
            "identities": self._identities.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: drift is measured against the original θ₀, the step counter continues."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(
                "ConservationMonitor.load_state_dict: not a monitor state (expected the dict "
                "returned by ConservationMonitor.state_dict())"
            )
        mine = {g.name: g.count for g in self.groups}
        if state["groups"] != mine:
            raise ValueError(
                "ConservationMonitor.load_state_dict: the state tracks groups "
                f"{state['groups']} but this monitor tracks {mine}; build the monitor on the "
                "same architecture"
            )
        self.flush()
        self.num_steps = int(state["num_steps"])
        self.initial = {k: v.clone() for k, v in state["initial"].items()}
        self._init_flat = self._flat(self.initial)
        self._scale_flat = state["scale"].clone()
        self._invalid = state["invalid"].clone()
        self._maxima = {k: dict(v) for k, v in state["maxima"].items()}
        self._store.load_state_dict(state["store"])
        self._identities.load_state_dict(state.get("identities"))
        self._release_before()
        if self.split and not self._handles and self._live is None:
            self._drop_last_snapshot()
            self._last_snapshot = self._snapshot()

    def __repr__(self) -> str:
        laws = sum(g.count for g in self.groups if not g.approximate)
        approx = sum(g.count for g in self.groups if g.approximate)
        return (
            f"ConservationMonitor({type(self.model).__name__}: {len(self.groups)} groups, "
            f"{laws} laws{f' + {approx} approximate' if approx else ''}, {len(self.skipped)} skipped, "
            f"{self.num_steps} steps)"
        )


def _expected(row: dict[str, Any]) -> str:
    """The table's last column: ``conserved`` / ``broken`` for a law group; for an identity
    group (velocity laws, recurrences: its drift columns are the identity's residual) ``identity``."""
    if "max_rel_residual" in row:
        return "identity"
    text = "approximate" if row.get("approximate") else ("conserved" if row["expected_conserved"] else "broken")
    return text + " (unverified)" if row.get("verified") is False else text


def _steps_on_stack(optimizer: torch.optim.Optimizer) -> int:
    """How many calls of ``optimizer``'s hooked ``step`` are running on this thread's stack."""
    count = 0
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "wrapper" and "optimizer" in code.co_filename and frame.f_locals.get("self") is optimizer:
            count += 1
        frame = frame.f_back
    return count


def _warn_without_a_free_core(asynchronous: Any, tensors: list[Tensor]) -> None:
    """The worker needs a core that CPU training leaves free; say so when torch uses them all."""
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch.get_num_threads()
    if threads >= cores:
        warnings.warn(
            f"ConservationMonitor: {asynchronous} evaluates the laws on a worker "
            f"thread, but torch already uses {threads} threads on {cores} core(s), so the worker "
            "competes with training and recording costs more than in the synchronous mode; call "
            f"torch.set_num_threads({max(cores - 1, 1)}) to leave it a core, or use "
            "recording='sync'",
            RuntimeWarning,
            stacklevel=3,
        )


def _schedule(every: int | None, log_spaced: bool, budget: float | OverheadBudget | None) -> Schedule | OverheadBudget:
    """The recording schedule: ``every`` / ``log_spaced`` when given, else the overhead
    budget when given, else every step."""
    if budget is None:
        return Schedule(1 if every is None else every, log_spaced)
    if every is not None or log_spaced:
        raise ValueError(
            "ConservationMonitor: overhead_budget sets how often the laws are recorded; pass it "
            f"or every={every!r} / log_spaced={log_spaced!r}, not both"
        )
    return budget if isinstance(budget, OverheadBudget) else OverheadBudget(budget)


def _locate(model: nn.Module, name: str) -> tuple[str, str, nn.Module, Tensor]:
    """(module path, attribute, module, parameter) of a qualified parameter name."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    return path, attr, module, getattr(module, attr)


def _fast_layout(model: nn.Module, layout: dict[str, tuple]) -> tuple[list[tuple], list[tuple]]:
    """(parent, child name, child) of every module on the path to a tracked parameter, and
    (module, attribute, parameter, shape) of every tracked parameter (for the fast check)."""
    edges: dict[tuple[int, str], tuple] = {}
    for path, *_ in layout.values():
        parent = model
        for key in path.split(".") if path else []:
            child = parent._modules.get(key)
            edges[(id(parent), key)] = (parent, key, child)
            parent = child
    leaves = [(module, attr, param, shape) for _, attr, module, param, shape in layout.values()]
    return list(edges.values()), leaves


_MAXIMA = ("max_abs_drift", "max_rel_drift", "max_rel_first_order", "max_rel_second_order")


def _maxima_table(
    v: Tensor,
    f: Tensor | None,
    s: Tensor | None,
    init_flat: Tensor,
    scale_flat: Tensor,
    invalid: Tensor,
    group_index: Tensor,
    n_groups: int,
) -> list[list[float]]:
    """Per group: max |h − h₀|, max rel. drift (+ max rel. first/second order), valid laws only."""
    drift = (v - init_flat).abs_()
    rows = [drift, drift / scale_flat]
    if f is not None and s is not None:
        rows += [f.abs() / scale_flat, s.abs() / scale_flat]
    table = torch.stack(rows).masked_fill_(invalid, -math.inf)
    out = torch.full((len(rows), n_groups), -math.inf, dtype=torch.float64)
    out.scatter_reduce_(1, group_index.expand(len(rows), -1), table, "amax")
    return out.tolist()


def _to_cpu(per_group: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if per_group is None else {k: v.cpu() for k, v in per_group.items()}


def _floor_scale(scale: Tensor) -> Tensor:
    """Natural scales, floored so that laws of all-zero units do not divide by zero."""
    finite = scale[torch.isfinite(scale)]
    ref = float(finite.max()) if finite.numel() else 0.0
    return scale.clamp_min(ref * 1e-12 if ref > 0 else 1.0)


def _stack(rows: list[Tensor], count: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, count))
    return torch.stack(rows).numpy()
