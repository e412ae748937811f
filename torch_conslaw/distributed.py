"""Distributed-training helpers for the conservation monitor.

Under ``DistributedDataParallel`` every rank holds the same parameters, so every rank
computes the same law values without any communication (the monitor unwraps DDP's
``.module``); only the main rank (rank 0) writes logs and files. Sharded parameters (FSDP2 ``fully_shard``, any
``DTensor``) are refused with a clear error: a law couples the incoming and outgoing
weights of a unit, which live on different shards.

Example:
    >>> import torch
    >>> from torch_conslaw.distributed import check_unsharded, is_main_process
    >>> is_main_process()
    True
    >>> check_unsharded(torch.nn.Linear(2, 2))  # plain parameters: nothing to refuse
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

__all__ = ["is_main_process", "check_unsharded"]


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 of an initialized process group.

    Example:
        >>> is_main_process()
        True
    """
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_unsharded(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` if any parameter of ``model`` is sharded (a DTensor).

    Example:
        >>> import torch
        >>> check_unsharded(torch.nn.Linear(2, 2))  # plain tensors: nothing happens
    """
    for name, param in model.named_parameters():
        placements = getattr(param, "placements", None)
        if placements is not None:
            raise NotImplementedError(
                f"ConservationMonitor does not support sharded parameters: {name!r} is a "
                f"DTensor with placements {tuple(placements)} (FSDP2 fully_shard or tensor "
                "parallelism). Monitor the model under DistributedDataParallel, or build the "
                "monitor on an unsharded copy of the model."
            )
