"""ConservationCallback driven by a real lightning.Trainer on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
from torch_conslaw.integrations.lightning import ConservationCallback  # noqa: E402

BATCHES_PER_EPOCH = 4


class TinyModule(pl.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(batches: int = BATCHES_PER_EPOCH) -> DataLoader:
    gen = torch.Generator().manual_seed(7)
    data = TensorDataset(torch.randn(8 * batches, 5, generator=gen), torch.randn(8 * batches, 3, generator=gen))
    return DataLoader(data, batch_size=8, shuffle=False)


def _trainer(tmp_path, max_steps: int, callback: ConservationCallback, **kwargs) -> pl.Trainer:
    options = dict(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=[callback], **options)


def test_one_record_per_optimizer_step_and_metrics_in_tensorboard(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from lightning.pytorch.loggers import TensorBoardLogger

    callback = ConservationCallback(submodule="net", every=1, recording="sync")
    module = TinyModule()
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = _trainer(tmp_path, 6, callback, logger=logger, log_every_n_steps=1)
    trainer.fit(module, _loader())
    monitor = callback.monitor
    assert monitor is not None and monitor.model is module.net
    assert monitor.num_steps == trainer.global_step == 6
    assert monitor.history()["step"].tolist() == [0, 1, 2, 3, 4, 5, 6]

    logger.experiment.flush()
    acc = ea.EventAccumulator(logger.log_dir)
    acc.Reload()
    group = monitor.groups[0].name
    events = acc.Scalars(f"conslaw/{group}/max_rel_drift")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[-1].value > 0  # SGD at a finite step moves the law by eta^2 g^T A g


def test_gradient_accumulation_gives_one_record_per_optimizer_step(tmp_path):
    callback = ConservationCallback(submodule="net", every=1, recording="sync")
    trainer = _trainer(tmp_path, 2, callback, accumulate_grad_batches=2)
    trainer.fit(TinyModule(), _loader())
    assert callback.monitor.num_steps == 2
    assert callback.monitor.history()["step"].tolist() == [0, 1, 2]


def test_bad_submodule_name_is_a_clear_error(tmp_path):
    trainer = _trainer(tmp_path, 1, ConservationCallback(submodule="encoder", every=1, recording="sync"))
    with pytest.raises(ValueError, match="no such sub-module"):
        trainer.fit(TinyModule(), _loader())


def test_checkpoint_resume_keeps_theta0_and_history(tmp_path):
    # uninterrupted reference: two epochs
    # (whole epochs: Lightning replays data differently after a mid-epoch checkpoint)
    reference = ConservationCallback(submodule="net", every=1, recording="sync")
    _trainer(tmp_path / "ref", -1, reference, max_epochs=2).fit(TinyModule(), _loader())

    # first epoch, checkpoint, then resume into a module initialised differently
    first = ConservationCallback(submodule="net", every=1, recording="sync")
    trainer = _trainer(tmp_path / "a", -1, first, max_epochs=1)
    trainer.fit(TinyModule(), _loader())
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = ConservationCallback(submodule="net", every=1, recording="sync")
    _trainer(tmp_path / "b", -1, resumed, max_epochs=2).fit(TinyModule(seed=123), _loader(), ckpt_path=ckpt)

    ref, got = reference.monitor, resumed.monitor
    assert got.num_steps == ref.num_steps == 2 * BATCHES_PER_EPOCH
    for group in ref.groups:
        torch.testing.assert_close(got.initial[group.name], ref.initial[group.name], rtol=0, atol=0)
    ref_h, got_h = ref.history(), got.history()
    assert sorted(got_h) == sorted(ref_h)
    assert got_h["step"].tolist() == list(range(2 * BATCHES_PER_EPOCH + 1))
    for key in ref_h:
        np.testing.assert_allclose(got_h[key], ref_h[key], rtol=1e-12, atol=1e-15, err_msg=key)
    assert [s["max_rel_drift"] for s in got.summary()] == pytest.approx(
        [s["max_rel_drift"] for s in ref.summary()], rel=1e-9
    )


def test_whole_module_under_bf16_mixed_precision(tmp_path):
    callback = ConservationCallback(every=1, recording="sync")  # monitor the LightningModule itself
    module = TinyModule()
    _trainer(tmp_path, 3, callback, precision="bf16-mixed").fit(module, _loader())
    monitor = callback.monitor
    assert monitor.model is module
    assert [g.name for g in monitor.groups] == ["net.0→net.2"]
    assert monitor.history()["step"].tolist() == [0, 1, 2, 3]
    assert all(s["max_abs_drift"] > 0 for s in monitor.summary())


class UntraceableModule(TinyModule):
    """Data-dependent control flow: torch.fx cannot trace it, forward hooks on an example can."""

    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = torch.randn(2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if x.abs().sum() > 0 else self.net(-x)


def test_example_input_array_is_used_for_untraceable_modules(tmp_path):
    callback = ConservationCallback(every=1, recording="sync")
    _trainer(tmp_path, 2, callback).fit(UntraceableModule(), _loader())
    assert [g.name for g in callback.monitor.groups] == ["net.0→net.2"]
    assert callback.monitor.num_steps == 2


def test_live_reading_gives_the_synchronous_records(tmp_path, one_torch_thread):
    """Lightning steps with a closure (forward and backward inside optimizer.step()): live
    reading waits for the worker after the closure and records what the synchronous mode does."""
    histories, monitors = {}, {}
    for mode in ("sync", "live"):
        callback = ConservationCallback(submodule="net", recording=mode, every=1)
        trainer = _trainer(tmp_path, 6, callback)
        module = TinyModule()
        layer_hooks = _forward_pre_hook_counter(module.net[0])  # torch's public hook API
        trainer.fit(module, _loader())
        monitors[mode] = callback.monitor
        histories[mode] = callback.monitor.history()
    assert histories["sync"].keys() == histories["live"].keys()
    for key, value in histories["sync"].items():
        assert np.array_equal(value, histories["live"][key], equal_nan=True), key
    assert histories["live"]["step"].tolist() == list(range(7))
    assert layer_hooks() == 0  # each read started at the model's forward pass: no layer hooks


def _forward_pre_hook_counter(layer: torch.nn.Module):
    """A function that says how many forward pre-hooks other code registered on ``layer``
    (through ``register_forward_pre_hook``) so far."""
    registered = []
    register = layer.register_forward_pre_hook

    def counting(*args, **kwargs):
        registered.append(args)
        return register(*args, **kwargs)

    layer.register_forward_pre_hook = counting  # type: ignore[method-assign]
    return lambda: len(registered)
