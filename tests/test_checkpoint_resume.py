"""Train, checkpoint, kill the process, resume in a new one: same history as an uninterrupted run.

The module doubles as the worker script: ``python test_checkpoint_resume.py PHASE FOLDER``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import torch
from torch import nn

STEPS = 8
CUT = 4  # the first process is killed after this many steps


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, first: int, last: int) -> None:
    for step in range(first, last):
        gen = torch.Generator().manual_seed(step)  # the batch depends on the step only
        optimizer.zero_grad()
        nn.functional.mse_loss(model(torch.randn(16, 5, generator=gen)), torch.randn(16, 3, generator=gen)).backward()
        optimizer.step()


def _save_history(monitor, path: str) -> None:
    arrays = {key.replace("/", "|"): value for key, value in monitor.history().items()}
    for name, value in monitor.initial.items():
        arrays[f"{name}|initial"] = value.numpy()
    np.savez(path, **arrays)


def _worker(phase: str, folder: str) -> None:
    from torch_conslaw import ConservationMonitor

    checkpoint = os.path.join(folder, "checkpoint.pt")
    model = _model(seed=0 if phase in ("full", "first") else 1234)  # resume starts elsewhere
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if phase == "resume":
        state = torch.load(checkpoint, weights_only=True)  # torch's safe default must do
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    monitor = ConservationMonitor(model, torch.randn(2, 5), every=1, recording="sync").attach(optimizer)
    if phase == "resume":
        monitor.load_state_dict(state["monitor"])
    first, last = {"full": (0, STEPS), "first": (0, CUT), "resume": (CUT, STEPS)}[phase]
    _train(model, optimizer, first, last)
    if phase == "first":
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "monitor": monitor.state_dict()},
            checkpoint,
        )
        os.kill(os.getpid(), signal.SIGKILL)  # no clean shutdown
    _save_history(monitor, os.path.join(folder, f"{phase}.npz"))


def _run(phase: str, folder) -> subprocess.CompletedProcess:
    import torch_conslaw

    root = os.path.dirname(os.path.dirname(torch_conslaw.__file__))  # importable without install
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, __file__, phase, str(folder)], env=env, capture_output=True, text=True, timeout=300
    )


def test_resume_in_a_new_process_matches_an_uninterrupted_run(tmp_path):
    full = _run("full", tmp_path)
    assert full.returncode == 0, full.stderr
    first = _run("first", tmp_path)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "first.npz").exists()
    resumed = _run("resume", tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    want, got = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resume.npz")
    assert sorted(got.files) == sorted(want.files)
    assert got["step"].tolist() == list(range(STEPS + 1))
    for key in want.files:
        # θ_0 and the whole history are the uninterrupted run's, bit for bit (same ops, same order)
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])


def test_a_state_without_per_law_maxima_resumes_with_its_group_maxima():
    """A checkpoint written before the monitor kept per-law maxima (only the per-group ones)
    restores them as a floor: the summary after resuming is never below the saved maxima."""
    from torch_conslaw import ConservationMonitor

    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # breaks the laws: drift
    monitor = ConservationMonitor(model, every=1, recording="sync").attach(opt)
    _train(model, opt, 0, 6)
    state = monitor.state_dict()
    saved = {g: dict(m) for g, m in state["maxima"].items()}
    del state["running"]
    resumed = ConservationMonitor(model, every=1, recording="sync")
    resumed.load_state_dict(state)
    for row in resumed.summary():
        for key, value in saved[row["name"]].items():
            if row[key] is not None:
                assert row[key] == value
