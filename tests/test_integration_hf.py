"""ConservationTrainerCallback driven by a real transformers.Trainer on CPU (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

transformers = pytest.importorskip("transformers")
from torch_conslaw.integrations.hf import STATE_FILE, ConservationTrainerCallback  # noqa: E402


class TinyRegressor(nn.Module):
    """A ReLU MLP with the Trainer's calling convention: forward(x, labels) -> {"loss": ...}."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 96) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


def _trainer(out, model, callback, dataset=None, **kwargs):
    options = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    options.update(kwargs)
    args = transformers.TrainingArguments(**options)
    data = _Data() if dataset is None else dataset
    return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def test_one_record_per_optimizer_step_with_accumulation(tmp_path):
    model = TinyRegressor()
    callback = ConservationTrainerCallback(tensorboard_dir=tmp_path / "tb", every=1, recording="sync")
    _trainer(tmp_path, model, callback, max_steps=3, gradient_accumulation_steps=2).train()
    monitor = callback.monitor
    assert monitor is not None and monitor.model is model
    assert monitor.num_steps == 3
    assert monitor.history()["step"].tolist() == [0, 1, 2, 3]
    # the records bracket real parameter updates: SGD moves each ReLU law by eta^2 g^T A g
    summary = {s["name"]: s for s in monitor.summary()}
    assert all(summary[g.name]["max_abs_drift"] > 0 for g in monitor.groups)

    # the drift scalars reached TensorBoard, one point per optimizer step
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    group = monitor.groups[0].name
    events = acc.Scalars(callback.tensorboard.tag(group, "max_rel_drift"))
    assert [e.step for e in events] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in events], monitor.history()[f"{group}/rel_drift"][1:], rtol=1e-6)


def test_resume_from_checkpoint_keeps_theta0_and_history(tmp_path):
    reference = ConservationTrainerCallback(every=1, recording="sync")
    _trainer(tmp_path, TinyRegressor(), reference, max_steps=6, save_strategy="steps", save_steps=3).train()
    assert (tmp_path / "checkpoint-3" / STATE_FILE).is_file()

    resumed = ConservationTrainerCallback(every=1, recording="sync")
    trainer = _trainer(tmp_path, TinyRegressor(seed=99), resumed, max_steps=6)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))

    ref, got = reference.monitor, resumed.monitor
    assert got.num_steps == ref.num_steps == 6
    for group in ref.groups:
        torch.testing.assert_close(got.initial[group.name], ref.initial[group.name], rtol=0, atol=0)
    ref_h, got_h = ref.history(), got.history()
    assert got_h["step"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert sorted(got_h) == sorted(ref_h)
    for key in ref_h:
        np.testing.assert_allclose(got_h[key], ref_h[key], rtol=1e-12, atol=1e-15, err_msg=key)


def test_resume_without_monitor_state_warns(tmp_path):
    _trainer(tmp_path, TinyRegressor(), transformers.TrainerCallback(), max_steps=2, save_strategy="steps", save_steps=2).train()
    callback = ConservationTrainerCallback(every=1, recording="sync")
    with pytest.warns(RuntimeWarning, match="not the original"):
        _trainer(tmp_path, TinyRegressor(), callback, max_steps=3).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert callback.monitor.num_steps == 1


def test_missing_checkpoint_state_is_a_clear_error(tmp_path):
    callback = ConservationTrainerCallback(resume_from=str(tmp_path / "nowhere"), every=1, recording="sync")
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        _trainer(tmp_path, TinyRegressor(), callback, max_steps=1).train()


class _TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        gen = torch.Generator().manual_seed(5)
        self.ids, self.labels = torch.randint(0, 50, (n, 8), generator=gen), torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_real_pretrained_model_from_a_config(tmp_path):
    """A tiny BERT built from its config (nothing downloaded): fx cannot trace it, so the
    structure comes from forward hooks and the op graph on ``example_input``; the FFN's ReLU
    units, the attention heads and the [CLS] norm → pooler laws are found."""
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_act="relu", max_position_embeddings=16, num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    callback = ConservationTrainerCallback(example_input={"input_ids": torch.randint(0, 50, (2, 8))}, every=1, recording="sync")
    _trainer(tmp_path, model, callback, _TokenData(), max_steps=3, learning_rate=0.01).train()
    monitor = callback.monitor
    ffn = "bert.encoder.layer.0.intermediate.dense→bert.encoder.layer.0.output.dense"
    groups = {g.name: g for g in monitor.groups}
    assert groups[ffn].count == 32
    # the op graph adds, per head (2 heads, d_h = 8), q·k and V/O matrix laws (36 entries each),
    # and the last LayerNorm → pooler through the [CLS] token (16 units)
    quadratic = [g for g in monitor.groups if g.kind not in ("linear", "approximate")]
    assert sum(g.count for g in quadratic) == 32 + 2 * 2 * 36 + 16
    pad = "bert.embeddings.word_embeddings.weight[0]"  # padding row (linear law), verified on the input
    assert groups[pad].kind == "linear"
    assert any("Tanh" in str(s) for s in monitor.skipped)  # the pooler → classifier pair, with its reason
    rows = {r["name"]: r for r in monitor.summary()}
    assert rows[pad]["verified"] and rows[pad]["max_abs_drift"] == 0.0
    assert monitor.num_steps == 3
    assert all(rows[g.name]["expected_conserved"] and rows[g.name]["verified"] for g in quadratic)
    assert all(0 < rows[g.name]["max_rel_first_order"] < 1e-6 for g in quadratic)  # plain SGD: float32 rounding only


def test_live_reading_gives_the_synchronous_records_and_every_tensorboard_point(tmp_path, one_torch_thread):
    histories = {}
    for mode in ("sync", "live"):
        callback = ConservationTrainerCallback(tensorboard_dir=tmp_path / f"tb_{mode}", recording=mode, every=1)
        _trainer(tmp_path / str(mode), TinyRegressor(), callback, max_steps=5).train()
        histories[mode] = callback.monitor.history()
    for key, value in histories["sync"].items():
        assert np.array_equal(value, histories["live"][key], equal_nan=True), key
    # records reach the listeners in batches in live mode: all of them by the end of training
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(tmp_path / "tb_live"))
    acc.Reload()
    group = callback.monitor.groups[0].name
    assert [e.step for e in acc.Scalars(callback.tensorboard.tag(group, "max_rel_drift"))] == [1, 2, 3, 4, 5]
