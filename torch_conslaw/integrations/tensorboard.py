"""Per-group drift of a :class:`~torch_conslaw.ConservationMonitor` as TensorBoard scalars.

For every record the monitor stores, and for every law group ``<group>``, the logger
writes (at ``global_step`` = the record's step):

* ``conslaw/<group>/max_rel_drift`` — max over the group's laws of
  |h(θ_t) − h(θ_0)| / natural scale (the record's ``rel_drift``);
* ``conslaw/<group>/max_abs_drift`` — max |h(θ_t) − h(θ_0)|;
* ``conslaw/<group>/max_abs_first_order`` and ``.../max_abs_second_order`` — the largest
  symmetry-breaking and discretization parts of the last step's change (when the monitor
  splits changes);
* ``conslaw/<group>/max_rel_residual`` — for the monitor's identity groups (velocity laws and
  recurrences under momentum / weight decay) instead of the two drifts: the relative residual
  of their identity at that step.

A ``/`` inside a group name becomes ``_``; :meth:`TensorBoardLogger.tag` gives the exact
tag. Only the main process (rank 0) writes.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from torch_conslaw import ConservationMonitor
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> monitor = ConservationMonitor(model).attach(opt)
    >>> logger = TensorBoardLogger(monitor, tempfile.mkdtemp())
    >>> model(torch.randn(8, 4)).square().mean().backward(); opt.step()
    >>> logger.tag("0→2", "max_rel_drift")
    'conslaw/0→2/max_rel_drift'
    >>> logger.close()
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..distributed import is_main_process
from . import require
from .export import QUANTITIES, record_scalars, scalar_tag

if TYPE_CHECKING:  # pragma: no cover
    from ..monitor import ConservationMonitor, Record

_tb = require("torch.utils.tensorboard", "tensorboard")

__all__ = ["TensorBoardLogger", "QUANTITIES"]



class TensorBoardLogger:
    """Listener that writes each stored record of ``monitor`` to a ``SummaryWriter``.

    ``writer_or_logdir`` is a ``torch.utils.tensorboard.SummaryWriter`` (yours: the logger
    flushes it but never closes it) or a directory (the logger opens and closes its own
    writer, on the main process only).

    Example:
        >>> logger = TensorBoardLogger(monitor, "runs/exp1")  # doctest: +SKIP
    """

    def __init__(
        self,
        monitor: ConservationMonitor,
        writer_or_logdir: Any,
        *,
        prefix: str = "conslaw",
    ) -> None:
        self.monitor = monitor
        self.prefix = prefix
        self._owns_writer = isinstance(writer_or_logdir, (str, os.PathLike))
        self.writer: Any = None
        if is_main_process():
            self.writer = (
                _tb.SummaryWriter(log_dir=os.fspath(writer_or_logdir))
                if self._owns_writer
                else writer_or_logdir
            )
        monitor.add_listener(self)

    def tag(self, group: str, quantity: str) -> str:
        """The TensorBoard tag under which ``quantity`` of law group ``group`` is written."""
        return scalar_tag(group, quantity, self.prefix)

    def scalars(self, record: Record) -> dict[str, float]:
        """The ``{tag: value}`` pairs written for ``record``."""
        return {self.tag(g, q): v for (g, q), v in record_scalars(self.monitor, record).items()}

    def __call__(self, record: Record) -> None:
        if self.writer is None:
            return
        for tag, value in self.scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record.step)

    def flush(self) -> None:
        """Write pending events to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush, and close the writer if the logger opened it."""
        if self.writer is None:
            return
        self.monitor.flush()  # records a worker still holds (recording="live"/"snapshot") are logged first
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()

