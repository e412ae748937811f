"""The monitor: track the conservation laws of a model through training (machinery only).

:class:`ConservationMonitor` (:mod:`.monitor`) uses :mod:`.recorders` (where and when θ is
read: sync, snapshot, live), :mod:`.sharded` (FSDP2 shards), :mod:`.store` (records, bounded
history), :mod:`.budget` and :mod:`.schedule` (when to record).
"""

from .monitor import ConservationMonitor, optimizer_breaking_reasons
from .store import Record

__all__ = ["ConservationMonitor", "Record", "optimizer_breaking_reasons"]
