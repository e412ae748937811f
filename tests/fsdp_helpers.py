"""Two-rank FSDP2 runs for the tests (gloo, CPU): one worker for every test that trains a
monitored model under ``fully_shard`` and checks what each rank recorded."""

from __future__ import annotations

import gc
import json
import os
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch_conslaw import ConservationMonitor

WORLD = 2
STEPS = 3  # training steps of train_monitored


def train_monitored(
    model: torch.nn.Module, mesh: Any, batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
) -> ConservationMonitor:
    """``STEPS`` MSE steps of SGD with momentum (a nonzero first-order part) on the batches
    ``batch(gen)`` (the same on every rank), with a monitor attached. With a ``mesh``, every
    child with parameters and then the model are sharded with ``fully_shard`` first."""
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model.children():
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    monitor = ConservationMonitor(model, every=1, recording="sync")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor.attach(optimizer)
    gen = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        x, y = batch(gen)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return monitor


def unsharded_reference(train: Callable[[Any], ConservationMonitor]) -> ConservationMonitor:
    """``train(None)`` in this process on one thread, as in the workers (the same float32
    reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(None)
    finally:
        torch.set_num_threads(threads)


def history_lists(monitor: ConservationMonitor) -> dict[str, list]:
    """``monitor.history()`` of the law groups as JSON-friendly lists ("/" in keys becomes
    "|"). The identity groups of SGD with momentum (``monitor.identity_groups``) are left out:
    they are refused under sharding, so only the unsharded reference has them."""
    identities = {g.name for g in monitor.identity_groups}
    return {
        k.replace("/", "|"): np.asarray(v).tolist()
        for k, v in monitor.history().items()
        if k.rsplit("/", 1)[0] not in identities
    }


def _worker(rank: int, folder: str, tag: str, job: Callable[[Any], dict]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    status: dict = {}
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        status.update(job(mesh))  # the job's objects are gone when it returns
        dist.barrier()  # both ranks are done with every collective
        # free the FSDP state and the mesh before the teardown: left to interpreter shutdown,
        # gloo sometimes aborts the process ("terminate called without an active exception")
        del mesh
        gc.collect()
    except Exception:
        status["failed"] = traceback.format_exc()
    finally:
        with open(os.path.join(folder, f"{tag}{rank}.json"), "w") as handle:
            json.dump(status, handle)
        dist.destroy_process_group()


class _TrainAndSummarize:
    """The job of :func:`run_on_two_ranks`: ``summarize(train(mesh))``, then the monitor
    detached (a class, so that it pickles)."""

    def __init__(self, train: Callable[[Any], ConservationMonitor], summarize: Callable[[ConservationMonitor], dict]) -> None:
        self.train, self.summarize = train, summarize

    def __call__(self, mesh: Any) -> dict:
        monitor = self.train(mesh)
        report = self.summarize(monitor)
        dist.barrier()  # the other rank may still be in a collective of the monitor
        monitor.detach()
        return report


def run_job_on_two_ranks(folder: str, tag: str, job: Callable[[Any], dict]) -> list[dict]:
    """Spawn two ranks that each run ``job(mesh)`` (a module-level function or a picklable
    object) and report the dict it returns; returns the two reports, after checking that
    neither failed."""
    mp.spawn(_worker, args=(folder, tag, job), nprocs=WORLD, join=True)
    status = [json.loads(open(os.path.join(folder, f"{tag}{rank}.json")).read()) for rank in range(WORLD)]
    for s in status:
        assert "failed" not in s, s["failed"]
    return status


def run_on_two_ranks(
    folder: str,
    tag: str,
    train: Callable[[Any], ConservationMonitor],
    summarize: Callable[[ConservationMonitor], dict],
) -> list[dict]:
    """Spawn two ranks that each run ``train(mesh)`` and report ``summarize(monitor)``
    (both module-level functions, so that they pickle); returns the two reports, after
    checking that neither failed."""
    return run_job_on_two_ranks(folder, tag, _TrainAndSummarize(train, summarize))
