"""The monitor under torch.distributed on CPU (gloo): DDP, and FSDP2 fully_shard (laws summed from
local shards with one all-reduce per recording, equal to an unsharded run)."""

from __future__ import annotations

import gc
import json
import os
import traceback
import warnings

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


def _shut_down() -> None:
    """Free every object that may hold gloo work (DDP reducer, FSDP state) while the
    interpreter is alive, wait for the other rank, then destroy the process group: gloo
    threads torn down during interpreter finalization abort the process (SIGABRT)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _ddp_worker(rank: int, folder: str, with_tensorboard: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        _ddp_train(rank, folder, with_tensorboard)  # its objects are gone when it returns
    finally:
        _shut_down()


def _ddp_train(rank: int, folder: str, with_tensorboard: bool) -> None:
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    inner = _model()
    model = DistributedDataParallel(inner)
    monitor = ConservationMonitor(model, torch.randn(2, 5), every=1, recording="sync")
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


FSDP_STEPS = 3


def _fsdp_mlp() -> nn.Module:
    """ReLU units (7 hidden: uneven shards 4 + 3) and a linear hidden layer (matrix law 2→3)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Linear(6, 3))


class _Block(nn.Module):
    """A module with its own forward (not a catalogued leaf): fx traces into it."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _fsdp_blocks() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(_Block(5, 6, 4), _Block(4, 7, 3))


def _fsdp_cnn() -> nn.Module:
    """Channel laws 0→2 and 2→5, the latter read through a flatten (16 columns per channel)."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
    )


def _fsdp_data(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches on every rank, so that FSDP2 trains exactly like one process."""
    gen = torch.Generator().manual_seed(7)
    shape = (8, 5) if kind == "mlp" else (8, 2, 4, 4)
    return [(torch.randn(*shape, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(FSDP_STEPS)]


def _train(kind: str, mesh=None, with_monitor: bool = True):
    """Train one model (sharded with fully_shard when ``mesh`` is given); returns (model, monitor)."""
    model = _fsdp_mlp() if kind == "mlp" else _fsdp_cnn()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    monitor = ConservationMonitor(model, every=1, recording="sync") if with_monitor else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # nonzero 1st order
    if monitor is not None:
        monitor.attach(optimizer)
    for x, y in _fsdp_data(kind):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, monitor


def _save_monitor(monitor: ConservationMonitor, folder: str, tag: str) -> None:
    np.savez(os.path.join(folder, f"{tag}.npz"), **_flat(monitor.history()))
    with open(os.path.join(folder, f"{tag}.json"), "w") as handle:
        json.dump({"summary": monitor.summary(), "skipped": [str(s) for s in monitor.skipped]}, handle)


def _fsdp_worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    status: dict = {}
    try:
        _fsdp_checks(rank, folder, status)  # its objects are gone when it returns
    finally:
        with open(os.path.join(folder, f"fsdp{rank}.json"), "w") as handle:
            json.dump(status, handle)
        _shut_down()


def _fsdp_checks(rank: int, folder: str, status: dict) -> None:
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        for kind in ("mlp", "cnn"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model, monitor = _train(kind, mesh)
            status[f"{kind}_warnings"] = [str(w.message) for w in caught]
            _save_monitor(monitor, folder, f"{kind}{rank}")
            export_jsonl(monitor, os.path.join(folder, f"{kind}{rank}.jsonl"))
            if kind == "mlp":  # the monitor only reads: training is bitwise that of no monitor
                bare, _ = _train(kind, mesh, with_monitor=False)
                status["bitwise_unaffected"] = all(
                    torch.equal(a.full_tensor(), b.full_tensor())
                    for a, b in zip(model.parameters(), bare.parameters())
                )
            # an example input cannot run through fully_shard's hooks outside training: the
            # monitor builds as without one (it used to raise from inside FSDP), and says so
            given = ConservationMonitor(model, _fsdp_data(kind)[0][0], every=1, recording="sync")
            status[f"{kind}_with_input"] = {
                "groups": [g.name for g in given.groups], "without": [g.name for g in monitor.groups],
                "note": given.verification_note,
            }
        # blocks wrapped one by one, as transformers are: tracing the structure must not run
        # fully_shard's hooks (they used to fail on symbolic values and leave the model unable
        # to train), and the laws are those of the unsharded model
        from torch.distributed.fsdp import fully_shard

        blocks = _fsdp_blocks()
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(blocks, mesh=mesh)
        monitor = ConservationMonitor(blocks, every=1, recording="sync")
        optimizer = torch.optim.SGD(blocks.parameters(), lr=0.05)
        monitor.attach(optimizer)
        for x, y in _fsdp_data("mlp"):
            optimizer.zero_grad()
            nn.functional.mse_loss(blocks(x), y).backward()
            optimizer.step()
        status["blocks"] = {"groups": [g.name for g in monitor.groups], "steps": monitor.num_steps}
        # a layout that cannot be summed from local rows is refused, naming the parameter
        from torch.distributed.tensor import Shard, distribute_tensor

        odd = _fsdp_mlp()
        odd[0].weight = nn.Parameter(distribute_tensor(odd[0].weight.detach(), mesh, [Shard(1)]))
        try:
            ConservationMonitor(odd, every=1, recording="sync")
            status["shard1"] = None
        except NotImplementedError as err:
            status["shard1"] = f"{type(err).__name__}: {err}"
        status["ok"] = True
    except Exception:
        status["failed"] = traceback.format_exc()


def test_fsdp2_laws_from_local_shards_equal_an_unsharded_run(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 not in this torch")
    mp.spawn(_fsdp_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    status = [json.loads((tmp_path / f"fsdp{rank}.json").read_text()) for rank in range(WORLD)]
    for s in status:
        assert s.get("ok"), s.get("failed")
        assert s["bitwise_unaffected"]
        assert s["shard1"] is not None and s["shard1"].startswith("ShardingNotSupported")
        assert "0.weight" in s["shard1"] and "Shard(dim=1)" in s["shard1"] and "Shard(0)" in s["shard1"]
        unsharded = ConservationMonitor(_fsdp_blocks())  # its matrix law 0.down→1.up is excluded under sharding
        assert s["blocks"] == {"groups": [g.name for g in unsharded.groups if g.kind != "matrix"], "steps": FSDP_STEPS}
        assert s["blocks"]["groups"] == ["0.up→0.down", "1.up→1.down"]
        for kind in ("mlp", "cnn"):
            given = s[f"{kind}_with_input"]
            assert given["groups"] == given["without"] and given["groups"]
            assert "sharded (FSDP2)" in given["note"] and "before fully_shard" in given["note"]
    for kind in ("mlp", "cnn"):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the workers: the same float32 reduction order
        try:
            _, ref_monitor = _train(kind)  # one process, unsharded, same data
        finally:
            torch.set_num_threads(threads)
        _save_monitor(ref_monitor, str(tmp_path), f"{kind}_ref")
        ref = np.load(tmp_path / f"{kind}_ref.npz")
        ref_info = json.loads((tmp_path / f"{kind}_ref.json").read_text())
        h = [np.load(tmp_path / f"{kind}{rank}.npz") for rank in range(WORLD)]
        info = [json.loads((tmp_path / f"{kind}{rank}.json").read_text()) for rank in range(WORLD)]
        assert sorted(h[0].files) == sorted(h[1].files)
        for key in h[0].files:  # every rank gets the same all-reduced values, bit for bit
            np.testing.assert_array_equal(h[0][key], h[1][key], err_msg=f"{kind} {key}")
        assert info[0] == info[1]
        assert h[0]["step"].tolist() == list(range(FSDP_STEPS + 1))

        sharded_groups = {s["name"] for s in info[0]["summary"]}
        # the unsharded run also has the identity groups of SGD with momentum (refused under
        # sharding, with the reason): compare the law groups
        ref_groups = {s["name"]: s for s in ref_info["summary"] if "max_rel_residual" not in s}
        if kind == "mlp":
            assert ref_groups["2→3"]["kind"] == "matrix" and "2→3" not in sharded_groups
            reason = [r for r in info[0]["skipped"] if "2→3" in r]
            assert reason and "matrix law" in reason[0] and "sharded" in reason[0], info[0]["skipped"]
            assert any("matrix law" in w for w in status[0]["mlp_warnings"])
            assert sharded_groups == {"0→2"}
        else:
            assert sharded_groups == {"0→2", "2→5"} == set(ref_groups)
            assert {s["kind"] for s in info[0]["summary"]} == {"channel"}
        for name in sharded_groups:
            for part in ("values", "first_order", "second_order"):
                key = f"{name}|{part}"
                scale = np.abs(ref[f"{name}|values"]).max()
                np.testing.assert_allclose(h[0][key], ref[key], rtol=1e-9, atol=1e-12 * scale, err_msg=f"{kind} {key}")
                if part == "first_order":  # momentum: a real, nonzero first-order part
                    assert np.abs(ref[key][1:]).max() > 1e-8 * scale
            np.testing.assert_allclose(h[0][f"{name}|rel_drift"], ref[f"{name}|rel_drift"], rtol=1e-9)
        for s in info[0]["summary"]:
            r = ref_groups[s["name"]]
            for key, value in s.items():
                if isinstance(value, float):
                    assert value == pytest.approx(r[key], rel=1e-9, abs=1e-300), (kind, s["name"], key)
                else:
                    assert value == r[key], (kind, s["name"], key)
        assert (tmp_path / f"{kind}0.jsonl").is_file() and not (tmp_path / f"{kind}1.jsonl").exists()
