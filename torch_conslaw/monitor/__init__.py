"""The monitor: track the conservation laws of a model through training (machinery only).

:class:`ConservationMonitor` (:mod:`.monitor`) is a short façade that wires the parts:
:mod:`.hooks` (optimizer pre/post-step protocol, parameter guard), :mod:`.recorders` (where
and when θ is read: sync, snapshot, live), :mod:`.sharded` (FSDP2: laws from local shards),
:mod:`.store` (records, bounded history, running maxima, invalid marks), :mod:`.statistics`
(summary rows, history columns, the table), :mod:`.expectations` (which optimizer breaks which
law), :mod:`.budget` and :mod:`.schedule` (when to record).

Example:
    >>> from torch import nn
    >>> ConservationMonitor(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    ConservationMonitor(Sequential: 1 groups, 3 laws, 0 skipped, 0 steps)
"""

from .expectations import optimizer_breaking_reasons
from .monitor import ConservationMonitor
from .store import Record

__all__ = ["ConservationMonitor", "Record", "optimizer_breaking_reasons"]
