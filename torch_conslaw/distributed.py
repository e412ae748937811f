"""Distributed-training helpers for the conservation monitor.

Under ``DistributedDataParallel`` every rank holds the same parameters, so every rank
computes the same law values without any communication (the monitor unwraps DDP's
``.module``); only the main rank (rank 0) writes logs and files. Sharded parameters
(FSDP2 ``fully_shard``) are handled by :mod:`torch_conslaw.monitor.sharded`: each rank sums its
local rows and one all-reduce per recording gives every rank the global law values.

Example:
    >>> from torch_conslaw.distributed import is_main_process
    >>> is_main_process()
    True
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_main_process"]


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 of an initialized process group.

    Example:
        >>> is_main_process()
        True
    """
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
