"""The monitor under torch.distributed on CPU (gloo): DDP works, FSDP2 is refused clearly."""

from __future__ import annotations

import json
import os
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torch_conslaw import ConservationMonitor
from torch_conslaw.integrations.export import export_jsonl

WORLD = 2
STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _flat(history: dict) -> dict:
    """np.savez keys cannot hold "/": "<group>/values" → "<group>|values"."""
    return {key.replace("/", "|"): value for key, value in history.items()}


def _ddp_worker(rank: int, folder: str, with_tensorboard: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        from torch.nn.parallel import DistributedDataParallel

        inner = _model()
        model = DistributedDataParallel(inner)
        monitor = ConservationMonitor(model, torch.randn(2, 5))
        assert monitor.model is inner, "the monitor must unwrap DDP's .module"
        tensorboard = None
        if with_tensorboard:
            from torch_conslaw.integrations.tensorboard import TensorBoardLogger

            tensorboard = TensorBoardLogger(monitor, os.path.join(folder, "tb"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor.attach(optimizer)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        for _ in range(STEPS):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(torch.randn(8, 5, generator=gen)), torch.randn(8, 3, generator=gen)).backward()
            optimizer.step()
        if tensorboard is not None:
            tensorboard.close()
        np.savez(os.path.join(folder, f"history{rank}.npz"), **_flat(monitor.history()))
        export_jsonl(monitor, os.path.join(folder, f"history{rank}.jsonl"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_and_only_rank_zero_writes(tmp_path):
    try:
        import torch_conslaw.integrations.tensorboard  # noqa: F401

        have_tb = True
    except ImportError:
        have_tb = False
    mp.spawn(_ddp_worker, args=(str(tmp_path), have_tb), nprocs=WORLD, join=True)

    h0, h1 = np.load(tmp_path / "history0.npz"), np.load(tmp_path / "history1.npz")
    assert sorted(h0.files) == sorted(h1.files)
    assert h0["step"].tolist() == list(range(STEPS + 1))
    for key in h0.files:
        np.testing.assert_array_equal(h0[key], h1[key], err_msg=key)  # bitwise identical
    assert (tmp_path / "history0.jsonl").is_file()
    assert not (tmp_path / "history1.jsonl").exists()
    if have_tb:
        event_files = [f for _, _, files in os.walk(tmp_path / "tb") for f in files if "tfevents" in f]
        assert len(event_files) == 1, event_files


def _fsdp_worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    result: dict = {}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            ConservationMonitor(model, torch.randn(2, 5))
            result = {"raised": None}
        except Exception as err:  # report to the parent, which asserts
            result = {"raised": type(err).__name__, "message": str(err)}
    except Exception:
        result = {"setup_failed": traceback.format_exc()}
    finally:
        with open(os.path.join(folder, f"fsdp{rank}.json"), "w") as handle:
            json.dump(result, handle)
        dist.destroy_process_group()


def test_fsdp2_sharded_parameters_are_refused_with_a_clear_error(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 not in this torch")
    mp.spawn(_fsdp_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"fsdp{rank}.json").read_text())
        if "setup_failed" in result:
            pytest.skip(f"fully_shard does not run on CPU/gloo here: {result['setup_failed'][-300:]}")
        assert result["raised"] == "NotImplementedError", result
        assert "sharded parameters" in result["message"] and "DistributedDataParallel" in result["message"]
