"""Lightning 2.x callback that monitors the conservation laws of the trained module.

At ``on_fit_start`` (after Lightning has configured the optimizers and restored any
checkpoint) the callback builds a :class:`~torch_conslaw.ConservationMonitor` on the
``LightningModule`` (or on one of its sub-modules) and attaches it to the optimizer, so
each record brackets exactly one ``optimizer.step()``: gradient accumulation gives one
record per optimizer step, and steps skipped by a mixed-precision ``GradScaler`` are not
recorded. The monitor's state (initial values, history) is saved in Lightning
checkpoints and restored on resume, so drift is still measured against the original θ_0.
If the trainer has loggers, each record's per-group drift goes to them as
``conslaw/<group>/<quantity>`` metrics from global rank 0.

Example:
    >>> from torch_conslaw.integrations.lightning import ConservationCallback
    >>> callback = ConservationCallback(example_input=torch.randn(1, 784))  # doctest: +SKIP
    >>> trainer = lightning.Trainer(callbacks=[callback]); trainer.fit(module, data)  # doctest: +SKIP
    >>> callback.monitor.summary()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import require
from .export import record_scalars, scalar_tag

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..monitor import ConservationMonitor, Record

_pl = require("lightning.pytorch", "lightning")

__all__ = ["ConservationCallback"]


class ConservationCallback(_pl.Callback):
    """Builds a :class:`~torch_conslaw.ConservationMonitor` at fit start and records every
    optimizer step.

    Args:
        example_input: passed to the monitor (structure discovery for untraceable models);
            default: the module's ``example_input_array`` when it sets one.
        submodule: dotted name of the sub-module to monitor (e.g. ``"net"``); default: the
            whole ``LightningModule``.
        log: send each record's per-group drift to the trainer's loggers (global rank 0).
        **monitor_kwargs: ``split``, ``every``, ``log_spaced``, ``max_records``, ``recording``, ``overhead_budget``, ``loss`` of the monitor.

    Example:
        >>> callback = ConservationCallback(submodule="net", every=10)  # doctest: +SKIP
        >>> lightning.Trainer(callbacks=[callback]).fit(module, loader)  # doctest: +SKIP
    """

    def __init__(
        self,
        example_input: Any = None,
        *,
        submodule: str | None = None,
        log: bool = True,
        **monitor_kwargs: Any,
    ) -> None:
        self.example_input = example_input
        self.submodule = submodule
        self.log = log
        self.monitor_kwargs = monitor_kwargs
        self.monitor: ConservationMonitor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._trainer: Any = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from ..monitor import ConservationMonitor

        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ValueError(
                f"ConservationCallback supports exactly one optimizer, the trainer has "
                f"{len(optimizers)}; monitor each sub-network with its own "
                "ConservationMonitor attached to its own optimizer instead."
            )
        if self.monitor is None:
            model = self._target(pl_module)
            example = self.example_input
            if example is None and self.submodule is None:
                example = getattr(pl_module, "example_input_array", None)
            self.monitor = ConservationMonitor(model, example, **self.monitor_kwargs)
            if self.log:
                self.monitor.add_listener(self._log_record)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None
        self._trainer = trainer
        self.monitor.attach(optimizers[0])

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.detach()

    def state_dict(self) -> dict[str, Any]:
        if self.monitor is None:
            return dict(self._pending_state or {})
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.monitor is None:
            self._pending_state = state_dict  # applied at on_fit_start, once the monitor exists
        else:
            self.monitor.load_state_dict(state_dict)

    def _target(self, pl_module: Any) -> nn.Module:
        if self.submodule is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError as err:
            raise ValueError(
                f"ConservationCallback(submodule={self.submodule!r}): the LightningModule has "
                "no such sub-module; pass the dotted name printed by print(module)."
            ) from err

    def _log_record(self, record: Record) -> None:
        loggers = getattr(self._trainer, "loggers", [])
        if not loggers or not self._trainer.is_global_zero:
            return
        assert self.monitor is not None
        metrics = {scalar_tag(g, q): v for (g, q), v in record_scalars(self.monitor, record).items()}
        for logger in loggers:
            logger.log_metrics(metrics, step=record.step)
