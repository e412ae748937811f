"""ConservationMonitor: track the known conservation laws of a model through training.

The monitor finds every law group of the model (:mod:`torch_conslaw.structure`), evaluates
them at construction (θ₀), and at each recorded optimizer step stores the law values and,
with ``split=True``, the exact split of each change into its first-order (symmetry-breaking)
and second-order (discretization) parts (SCIENCE.md §6). It only reads parameters: training
is bitwise identical with and without it. Under FSDP2 (``fully_shard``) the laws are summed
from each rank's local shards with one all-reduce per recording (:mod:`torch_conslaw.monitor.sharded`).

The class is a façade: the optimizer hooks (:mod:`.hooks`), the recorders (:mod:`.recorders`:
where and when θ is read), the record store and running statistics (:mod:`.store`,
:mod:`.statistics`), the expectations (:mod:`.expectations`) and the schedule (:mod:`.budget`,
:mod:`.schedule`) each live in their own module.

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

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..accounting import Accountant
from ..catalogue import user_registrations
from ..lawgroups import LawGroup, build_groups
from ..laws.verify import Verification, propose_and_check
from ..structure import Skipped, Structure, find_structure, unwrap_model
from ..velocity_tracking import IdentityGroup, VelocityTracker
from .budget import OverheadBudget
from .expectations import set_expectations
from .hooks import ParameterGuard, StepHooks
from .recorders import (
    Recorder,
    RecordingContext,
    choose_recording,
    make_recorder,
    recording_from_legacy,
    warn_without_a_free_core,
)
from .schedule import Schedule
from .sharded import ShardedLaws, has_sharded_parameters
from .statistics import group_columns, group_rows, table_text
from .evaluator import LawTable
from .store import DriftStatistics, LawLayout, Record, RecordStore

__all__ = ["ConservationMonitor", "DEFAULT_OVERHEAD_BUDGET", "DEFAULT_RECORDING"]

DEFAULT_OVERHEAD_BUDGET = 0.03  # fraction of the training step time the monitor may take by default
DEFAULT_RECORDING = "auto"  # the cheapest recorder the setup allows (recorders.choice)
DELIVERY_BATCH = 16  # records formed and stored together when nothing reads them one by one
DELIVERY_BYTES = 2**20  # ... and at most this many bytes of tables waiting (large models: fewer)

_STATE_FORMAT = "torch_conslaw.ConservationMonitor/1"


class ConservationMonitor:
    """Find the conservation laws of ``model``, then record them at each scheduled step.

    Args:
        model: the network (``DistributedDataParallel`` and other ``.module`` wrappers are
            unwrapped; :attr:`model` is the inner module). Sharded parameters (FSDP2
            ``fully_shard``: ``DTensor`` with ``Shard(0)``) are supported inside an initialized
            process group: each rank sums its local rows and one all-reduce per recording gives
            every rank the exact global laws (:mod:`torch_conslaw.monitor.sharded`; matrix laws of
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
        every: record every ``every`` optimizer steps; ``every=1`` records every step. Without
            ``every`` / ``log_spaced`` the monitor is **bounded by default**: it records as often
            as ``overhead_budget`` (default :data:`DEFAULT_OVERHEAD_BUDGET` = 3 % of the training
            step time) allows.
        log_spaced: record on a log-spaced grid of steps instead (then ``every`` must stay 1).
        max_records: bound on the stored history; older records are thinned evenly, the
            running maxima of :meth:`summary` stay exact.
        max_history_bytes: bound on the memory of the stored history (default 64 MiB): at
            most ``max_history_bytes`` // (the bytes of one record: 8 per law, 24 with the
            split) records are kept (at least 2), thinned the same way, so that the history of
            a model with many laws stays bounded whatever ``max_records``.
        track_broken: also track the would-be laws of pairs whose activation is not
            positively homogeneous (GELU, tanh, ...), with ``expected_conserved=False``,
            to show how they break.
        asynchronous: deprecated alias of ``recording`` (``False`` → ``"sync"``, ``True`` →
            ``"snapshot"``, ``"live"``), with a ``DeprecationWarning``.
        async_buffers: with ``recording="snapshot"``, how many parameter snapshots (each the
            size of the tracked parameters, in their own dtype) may be in flight.
        recording: which recorder reads θ (:mod:`torch_conslaw.monitor.recorders`): ``"sync"`` (the
            training thread), ``"snapshot"`` (a native copy, evaluated by a worker thread;
            on CUDA on a side stream), ``"live"`` (the worker reads θ during the next
            forward pass; CPU, :meth:`attach`), or ``"auto"`` (the default): sharded → sync,
            CUDA → snapshot, CPU with a core torch leaves free → live from :meth:`attach` on,
            otherwise sync. The worker recorders deliver records, listener calls and
            non-finite warnings later (at the next hook or :meth:`flush`); pass
            ``recording="sync"`` for code that needs them at once. :attr:`recording` and
            :attr:`recording_reason` say which was chosen. Records are bitwise the same
            whichever recorder runs.
        overhead_budget: record as often as this fraction of the training step time allows
            (default 0.03 when neither ``every`` nor ``log_spaced`` is given; or a
            :class:`~torch_conslaw.OverheadBudget`), measured online on the training thread
            (:mod:`torch_conslaw.monitor.budget`); every recorded step keeps its exact split,
            and ``summary()`` / ``history()["step"]`` say which steps were recorded.
            Exclusive with ``every`` / ``log_spaced``.
        evaluation: how the per-unit laws are evaluated (:class:`~torch_conslaw.accounting.Accountant`):
            ``"eager"`` (chunked torch operations, needs nothing), ``"native"`` (CPU: one
            pass of a small C kernel per record, built once per machine by its C compiler,
            :mod:`torch_conslaw.native`), ``"compiled"`` (one fused TorchInductor kernel per
            record; Triton on GPUs) or ``"auto"`` (default: where the per-unit laws read at
            least ``AUTO_COMPILE_ELEMENTS`` = 2¹⁸ elements, native on the CPU and compiled on
            GPUs, else eager). The fused ones equal the eager records up to float64 summation
            order, and fall back to eager with a warning where they cannot be built. They are
            built when the monitor is (cached on disk). :attr:`evaluation` says which one runs
            and :attr:`evaluation_reason` why. Every recorder uses the same evaluator.

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
    :mod:`torch_conslaw.monitor.recorders.live`). Records reach the history and the listeners in batches
    of 16 (and at :meth:`flush`, :meth:`summary`, ...). It adds a forward pre-hook to the
    model while attached, and to every tracked layer once a step passes without the model's
    own forward pass (:meth:`detach` removes them; a copied or pickled model keeps an inert
    one).

    :attr:`evaluator` is what every recorder calls to evaluate the laws, ``values(params)``
    (``[1, laws]``) and ``split(before, after)`` (``[3, laws]``), float64 tables with the
    groups' columns in order (:class:`~torch_conslaw.monitor.evaluator.LawTable`, around an
    :class:`~torch_conslaw.accounting.Accountant`, or the sharded evaluator under FSDP2).
    Wrapping its methods observes each evaluation, on the thread that runs it (tests use it to
    hold the worker and check back-pressure).
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
        max_history_bytes: int = 64 * 2**20,
        track_broken: bool = False,
        asynchronous: bool | str | None = None,
        async_buffers: int = 4,
        recording: str | None = None,
        overhead_budget: float | OverheadBudget | None = None,
        loss: str | None = None,
        evaluation: str = "auto",
    ) -> None:
        self.model: nn.Module = unwrap_model(model)
        self._params: dict[str, Tensor] = dict(self.model.named_parameters(remove_duplicate=False))
        sharded = has_sharded_parameters(self._params)
        # a forward outside training does not run through fully_shard's hooks: under sharding the
        # structure is the module-level one and nothing is checked (the note says so)
        self.structure: Structure = find_structure(self.model, None if sharded else example_input)
        candidates = [s.candidate for s in self.structure.skipped if s.candidate is not None]
        pairs = list(self.structure.pairs) + (candidates if track_broken else [])
        self.groups: list[LawGroup] = build_groups(pairs)
        self.skipped: list[Skipped] = [
            s for s in self.structure.skipped if not (track_broken and s.candidate is not None)
        ]
        # --- verify before claiming; linear and approximate families (issue 8) --------------
        checked = propose_and_check(
            self.model, self.structure, example_input, self.groups, self.skipped, loss=loss,
            sharded=sharded,
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
        if sharded:
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
        # --- recording schedule (torch_conslaw.monitor.budget) ---
        self.schedule: Schedule | OverheadBudget = _schedule(every, log_spaced, overhead_budget)
        self._budget = self.schedule if isinstance(self.schedule, OverheadBudget) else None
        # --- end recording schedule ---
        self._store = RecordStore(max_records, max_history_bytes)
        self._listeners: list[Callable[[Record], None]] = []
        self._pending: list[tuple[int, Tensor]] = []  # evaluated tables not yet delivered
        self._hooks = StepHooks(
            self.pre_step, self.post_step, self._defer_to_closure, self._budget, lambda: self.num_steps + 1
        )
        self._base_expectation = {g.name: (g.expected_conserved, g.reason) for g in self.groups}
        self._names = sorted({n for g in self.groups for n in g.parameter_names})
        self._guard = ParameterGuard(self.model, self._names)
        self.num_steps = 0
        if not self.groups:
            reasons = "; ".join(str(s) for s in self.skipped) or "no layer pairs"
            warnings.warn(
                f"ConservationMonitor: no conservation law is tracked for "
                f"{type(self.model).__name__} ({reasons})",
                RuntimeWarning,
                stacklevel=2,
            )
        # evaluates the laws for every recorder (see the class doc)
        self.evaluator = LawTable(Accountant(self.groups, evaluation) if self._sharded is None else self._sharded)
        # --- recorder selection (torch_conslaw.monitor.recorders) ---
        if asynchronous is not None:
            if recording is not None:
                raise ValueError(
                    f"ConservationMonitor: pass recording={recording!r} or the deprecated "
                    f"asynchronous={asynchronous!r}, not both"
                )
            recording = recording_from_legacy(asynchronous)
        recording = DEFAULT_RECORDING if recording is None else recording
        tracked = [self._params[n] for n in self._names]
        self.recording, self.recording_reason = choose_recording(recording, tracked, sharded=self._sharded is not None)
        # "auto" → live: synchronous until attach() (a manual loop stays synchronous)
        self._live_at_attach = recording == "auto" and self.recording == "live"
        if self._live_at_attach:
            self.recording = "sync"
            self.recording_reason += "; becomes 'live' at attach()"
        self._async_buffers = async_buffers
        if self.recording != "sync" and self._sharded is not None:
            raise ValueError(
                f"ConservationMonitor: recording={self.recording!r} is not supported with "
                "sharded (FSDP2) parameters, whose laws need a collective per recording; use "
                "the default synchronous mode"
            )
        self._recorder: Recorder = self._make_recorder(self.recording)
        if self.recording != "sync":
            warn_without_a_free_core(self.recording, tracked)
        # --- end recorder selection ---
        if self._sharded is None:  # chunked, in float64 from the native tensors (no float64 θ)
            values0, scales = self.evaluator.initial(self._params)
            self.initial: dict[str, Tensor] = {k: v.cpu() for k, v in values0.items()}
            self.evaluator.inner.prepare(self._params, self.split)  # compiles now, not in a step
        else:  # one all-reduce: values and scales summed from the local shards
            self.initial, scales = self._sharded.initial(self._params)
        layout = LawLayout([g.name for g in self.groups], [g.count for g in self.groups])
        self._stats = DriftStatistics(layout, self.initial, scales, self.split)
        table_bytes = (3 if self.split else 1) * max(layout.size, 1) * 8
        self._delivery_batch = max(1, min(DELIVERY_BATCH, DELIVERY_BYTES // table_bytes))
        zeros = {name: torch.zeros_like(v) for name, v in self.initial.items()}
        first = zeros if self.split else None
        self._store.add(Record(0, dict(self.initial), first, first, dict.fromkeys(self.initial, 0.0)))
        self._recorder.detached()

    def _make_recorder(self, name: str) -> Recorder:
        """The recorder ``name``, wired to this monitor's parameters, evaluator and schedule."""
        ctx = RecordingContext(
            params=self._params,
            names=self._names,
            evaluator=self.evaluator,
            local=None if self._sharded is None else self._sharded.local,
            split=self.split,
            due=lambda step: self.schedule.due(step),
            guard=self._guard.check,
            deliver=self._deliver,
        )
        modules = self._guard.modules(self._names)
        return make_recorder(name, ctx, buffers=self._async_buffers, root=self.model, modules=modules)

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
        if self._hooks.attached:
            raise RuntimeError("ConservationMonitor.attach: already attached; call detach() first")
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not owned & {id(p) for p in self.model.parameters()}:
            raise ValueError(
                f"ConservationMonitor.attach: the {type(optimizer).__name__} owns none of the "
                f"parameters of {type(self.model).__name__}; pass the optimizer that trains "
                "this model (built from model.parameters())"
            )
        set_expectations(self.groups, self._params, self._base_expectation, optimizer, owned)
        notes = self._identities.configure(optimizer, self._sharded is not None)
        for g in self.groups:
            if g.name in notes and not g.expected_conserved:
                g.reason = f"{g.reason}; {notes[g.name]}"
        self.skipped = self._base_skipped + self._identities.skipped
        self._hooks.install(optimizer)
        self._recorder.start(self.num_steps + 1)
        if self._live_at_attach:  # recording="auto" with a free core
            self._recorder = self._make_recorder("live")
            self.recording = "live"
            self._recorder.start(self.num_steps + 1)
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (manual :meth:`step` calls work again afterwards)."""
        self._hooks.remove()
        self._identities.release()
        self._recorder.stop()
        if self._live_at_attach and self.recording == "live":
            self._recorder.close()  # recording="auto": synchronous again until the next attach()
            self._recorder = self._make_recorder("sync")
            self.recording = "sync"
            self._recorder.detached()

    def _defer_to_closure(self) -> bool:
        return self._recorder.defer_to_closure()

    def _count_step(self) -> int:
        self.num_steps += 1
        return self.num_steps

    def pre_step(self) -> None:
        """Snapshot θ before a step that will be recorded (called by the pre hook)."""
        if self.schedule.due(self.num_steps + 1):
            self._identities.before_step(self.num_steps + 1)  # reads θ and momentum buffers
        self._recorder.before_step(self.num_steps + 1)

    def post_step(self) -> None:
        """Count the step and record it if it is due (called by the post hook)."""
        if self.schedule.due(self.num_steps + 1):
            self._identities.after_step(self.num_steps + 1)
        self._recorder.after_step(self._count_step, self._hooks.attached)

    def step(self) -> None:
        """For manual loops: call after ``optimizer.step()``.

        The split of a recorded change is taken against θ at the previous record.
        """
        if self._hooks.attached:
            raise RuntimeError(
                "ConservationMonitor.step: this monitor is attached to an optimizer, whose hooks "
                "already record each step; call detach() to drive it by hand"
            )
        if self._recorder.manual_step_error is not None:
            raise RuntimeError(self._recorder.manual_step_error)
        if self._budget is not None:
            self._budget.step_ended(self.num_steps + 1)
            with self._budget.timing():
                self._recorder.manual_step(self._count_step)
            return
        self._recorder.manual_step(self._count_step)

    def add_listener(self, fn: Callable[[Record], None]) -> None:
        """Call ``fn(record)`` on every record the monitor takes (e.g. to log it)."""
        if not callable(fn):
            raise TypeError(f"ConservationMonitor.add_listener: {fn!r} is not callable")
        self._deliver_pending()  # records taken before it are not its
        self._listeners.append(fn)

    # ------------------------------------------------------------------ recording
    def _deliver(self, step: int, table: Tensor) -> None:
        """Statistics, history and listeners for the evaluated laws of ``step`` (``table``:
        ``[1, laws]``, or ``[3, laws]`` with the split; always on the training thread; with a
        worker recorder called when the worker's result is collected).

        Without listeners or identity groups (which read the optimizer at this step), a
        finite table is folded into the running maxima at once (one native call) and waits,
        with up to :data:`DELIVERY_BATCH` others (fewer when their tables would take more than
        :data:`DELIVERY_BYTES`), for its :class:`Record` to be formed and
        stored at the next read (:meth:`flush`) or when the batch is full: the same records,
        in the same order, with the rest of the per-record Python work paid once per batch. A
        table with a non-finite law is delivered at once, with its warning."""
        if self._identities.groups or self._listeners:
            self._deliver_one(step, table)
        elif self._stats.fold(table):
            self._pending.append((step, table))
            if len(self._pending) >= self._delivery_batch:
                self._deliver_pending()
        else:
            self._deliver_pending()
            self._deliver_one(step, table)

    def _deliver_pending(self) -> None:
        pending, self._pending = self._pending, []
        for step, table in pending:
            self._store.add(self._stats.record(step, table, folded=True))

    def _deliver_one(self, step: int, table: Tensor) -> None:
        extra = None
        if self._identities.groups:  # velocity laws, recurrences: entries of their own
            values: dict[str, Tensor] = {}
            rel: dict[str, float] = {}
            first: dict[str, Tensor] | None = {} if self.split else None
            second: dict[str, Tensor] | None = {} if self.split else None
            self._identities.complete(step, values, first, second, rel)
            extra = (values, first, second, rel) if values else None
        record = self._stats.record(step, table, extra)
        self._store.add(record)
        for fn in self._listeners:
            fn(record)

    def flush(self) -> None:
        """Worker recorders (``"snapshot"``, ``"live"``): wait for the worker and deliver every
        pending record; every recorder: fold and store the records that wait
        (:meth:`_deliver`). Re-raises an exception of the worker."""
        self._recorder.flush()
        self._deliver_pending()

    @property
    def identity_groups(self) -> list[IdentityGroup]:
        """The identity groups of the attached optimizer: velocity laws and momentum /
        weight-decay recurrences (:mod:`torch_conslaw.velocity_tracking`); empty under plain
        SGD or before :meth:`attach`."""
        return list(self._identities.groups)

    @property
    def evaluation(self) -> str:
        """Which evaluation runs the per-unit laws: ``"eager"``, ``"native"`` or ``"compiled"``
        (``"sharded"`` under FSDP2: local shards and one all-reduce)."""
        return getattr(self.evaluator.inner, "evaluation", "sharded")

    @property
    def evaluation_reason(self) -> str:
        """Why :attr:`evaluation` runs (the ``"auto"`` decision, or a compiler that failed)."""
        return getattr(self.evaluator.inner, "evaluation_reason", "sharded parameters")

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
        out = group_rows(self.groups, self._stats, self.verification, self.split, latest)
        out += self._identities.summary_rows(self.split, latest)
        # --- which steps were recorded (recording schedule, torch_conslaw.monitor.budget) ---
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
        out = group_columns(self.groups, records, self.split)
        out.update(self._identities.history_columns(records, self.split))
        return out

    def table(self) -> str:
        """The summary as a fixed-width text table (one line per law group)."""
        self.flush()
        return table_text(
            self.summary(), has_groups=bool(self.groups), note=self.verification_note, skipped=self.skipped
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """θ₀ law values, scales, history, running maxima and the step counter."""
        self.flush()
        return {
            "format": _STATE_FORMAT,
            "num_steps": self.num_steps,
            "groups": {g.name: g.count for g in self.groups},
            "initial": {k: v.clone() for k, v in self.initial.items()},
            **self._stats.state_dict(),
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
        self._stats.load_state_dict(self.initial, state)
        self._store.load_state_dict(state["store"])
        self._identities.load_state_dict(state.get("identities"))
        self._recorder.forget(self._hooks.attached)

    def __repr__(self) -> str:
        laws = sum(g.count for g in self.groups if not g.approximate)
        approx = sum(g.count for g in self.groups if g.approximate)
        return (
            f"ConservationMonitor({type(self.model).__name__}: {len(self.groups)} groups, "
            f"{laws} laws{f' + {approx} approximate' if approx else ''}, {len(self.skipped)} skipped, "
            f"{self.num_steps} steps)"
        )


def _schedule(every: int | None, log_spaced: bool, budget: float | OverheadBudget | None) -> Schedule | OverheadBudget:
    """The recording schedule: ``every`` / ``log_spaced`` when given, else the overhead
    budget (:data:`DEFAULT_OVERHEAD_BUDGET` when none is given)."""
    if budget is None:
        if every is None and not log_spaced:
            return OverheadBudget(DEFAULT_OVERHEAD_BUDGET)
        return Schedule(1 if every is None else every, log_spaced)
    if every is not None or log_spaced:
        raise ValueError(
            "ConservationMonitor: overhead_budget sets how often the laws are recorded; pass it "
            f"or every={every!r} / log_spaced={log_spaced!r}, not both"
        )
    return budget if isinstance(budget, OverheadBudget) else OverheadBudget(budget)
