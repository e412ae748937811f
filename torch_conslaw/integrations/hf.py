"""Hugging Face ``TrainerCallback`` that monitors the conservation laws of the trained model.

At ``on_train_begin`` the callback builds a :class:`~torch_conslaw.ConservationMonitor` on
the (unwrapped) model and attaches it to the real torch optimizer underneath
accelerate's ``AcceleratedOptimizer``. Its step hooks bracket exactly the parameter
update that the Trainer performs between ``on_pre_optimizer_step`` and
``on_optimizer_step``: one record per optimizer step whatever the gradient accumulation,
and no record when a ``GradScaler`` skips a step (the inner ``step()`` never runs). The
monitor needs only θ before and after the update, never gradients, which are already
zeroed at ``on_step_end``.

With ``tensorboard_dir`` the per-group drift of every record is also written there as
TensorBoard scalars (see :mod:`torch_conslaw.integrations.tensorboard`), from rank 0.

At every checkpoint save the monitor's state goes to ``<checkpoint>/conslaw_monitor.pt``;
when training resumes from ``checkpoint-<global_step>`` in ``args.output_dir`` (or from
``resume_from``), that state is loaded, so drift is still measured against θ_0.

Example:
    >>> from torch_conslaw.integrations.hf import ConservationTrainerCallback
    >>> callback = ConservationTrainerCallback()  # doctest: +SKIP
    >>> transformers.Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
    >>> callback.monitor.summary()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch

from . import require

if TYPE_CHECKING:  # pragma: no cover
    from ..monitor import ConservationMonitor
    from .tensorboard import TensorBoardLogger

_transformers = require("transformers", "hf")

__all__ = ["ConservationTrainerCallback", "STATE_FILE"]

STATE_FILE = "conslaw_monitor.pt"


class ConservationTrainerCallback(_transformers.TrainerCallback):
    """Builds a :class:`~torch_conslaw.ConservationMonitor` when training begins and records
    every optimizer step.

    Args:
        example_input: passed to the monitor (structure discovery for untraceable models).
        resume_from: checkpoint folder whose ``conslaw_monitor.pt`` to load; default: the
            ``checkpoint-<global_step>`` folder of ``args.output_dir`` when resuming.
        tensorboard_dir: also write each record's drift scalars to this TensorBoard log
            directory (needs the ``[tensorboard]`` extra).
        **monitor_kwargs: ``split``, ``every``, ``log_spaced``, ``max_records``, ``recording``, ``overhead_budget``, ``loss`` of the monitor.

    Example:
        >>> callback = ConservationTrainerCallback(every=10)  # doctest: +SKIP
        >>> trainer = transformers.Trainer(..., callbacks=[callback])  # doctest: +SKIP
    """

    def __init__(
        self,
        example_input: Any = None,
        *,
        resume_from: str | None = None,
        tensorboard_dir: str | os.PathLike[str] | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        self.example_input = example_input
        self.resume_from = resume_from
        self.tensorboard_dir = tensorboard_dir
        self.monitor_kwargs = monitor_kwargs
        self.monitor: ConservationMonitor | None = None
        self.tensorboard: TensorBoardLogger | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from ..monitor import ConservationMonitor

        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError(
                "ConservationTrainerCallback needs the model and the optimizer at "
                "on_train_begin; use it with transformers.Trainer (transformers>=4.40)."
            )
        if self.monitor is None:
            self.monitor = ConservationMonitor(model, self.example_input, **self.monitor_kwargs)
            if self.tensorboard_dir is not None:
                from .tensorboard import TensorBoardLogger

                self.tensorboard = TensorBoardLogger(self.monitor, self.tensorboard_dir)
        saved = self._resume_file(args, state)
        if saved is not None:
            self.monitor.load_state_dict(torch.load(saved, weights_only=True))
        self.monitor.attach(_innermost(optimizer))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.monitor.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.detach()
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def _resume_file(self, args: Any, state: Any) -> str | None:
        folder = self.resume_from
        if folder is None and state.global_step > 0:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if folder is None:
            return None
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            return path
        if self.resume_from is not None:
            raise FileNotFoundError(
                f"ConservationTrainerCallback(resume_from={folder!r}): no {STATE_FILE} "
                "there; it is written at each checkpoint save by this callback."
            )
        warnings.warn(
            f"ConservationTrainerCallback: resuming at step {state.global_step} without "
            f"{path}; drift is measured from the resumed parameters, not the original θ₀",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's (possibly nested) optimizer wrappers."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
