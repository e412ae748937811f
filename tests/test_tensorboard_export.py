"""TensorBoard logging and CSV / JSON Lines export of a monitor's history."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from torch_conslaw import ConservationMonitor
from torch_conslaw.integrations import export
from torch_conslaw.integrations.export import export_csv, export_jsonl

tb = pytest.importorskip("torch_conslaw.integrations.tensorboard")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

STEPS = 6


def _train(monitor: ConservationMonitor, model: nn.Module, steps: int = STEPS) -> list:
    """Train with SGD + momentum (laws drift, first-order part nonzero); return the records."""
    records: list = []
    monitor.add_listener(records.append)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor.attach(optimizer)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    monitor.detach()
    return records


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def test_tensorboard_scalars_equal_the_monitor(tmp_path):
    model = _model()
    monitor = ConservationMonitor(model, torch.randn(2, 5), every=1, recording="sync")
    assert monitor.groups, "the ReLU MLP must have law groups"
    logger = tb.TensorBoardLogger(monitor, tmp_path / "tb")
    records = _train(monitor, model)
    logger.close()
    assert len(records) == STEPS

    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    history = monitor.history()
    for group in monitor.groups:
        values = history[f"{group.name}/values"][1:]  # row 0 is θ_0 (step 0)
        initial = monitor.initial[group.name].double().numpy().ravel()
        first = history[f"{group.name}/first_order"][1:]
        expected = {
            "max_rel_drift": [r.rel_drift[group.name] for r in records],
            "max_abs_drift": np.abs(values - initial).max(axis=1),
            "max_abs_first_order": np.abs(first).max(axis=1),
        }
        for quantity, want in expected.items():
            tag = logger.tag(group.name, quantity)
            assert tag in tags
            events = acc.Scalars(tag)
            assert [e.step for e in events] == [r.step for r in records]
            np.testing.assert_allclose([e.value for e in events], want, rtol=1e-6, atol=1e-30)
    # momentum breaks the laws: the logged first-order part is not zero
    assert max(e.value for e in acc.Scalars(logger.tag(monitor.groups[0].name, "max_abs_first_order"))) > 0


def test_tag_names_keep_one_level_per_group_and_quantities_are_checked():
    monitor = ConservationMonitor(_model(), torch.randn(2, 5), every=1, recording="sync")
    logger = tb.TensorBoardLogger(monitor, _NullWriter())
    assert logger.tag("net.0→net/2", "max_rel_drift") == "conslaw/net.0→net_2/max_rel_drift"
    with pytest.raises(ValueError, match="unknown quantity"):
        logger.tag("g", "drift")


class _NullWriter:
    def __init__(self) -> None:
        self.calls: list = []

    def add_scalar(self, tag, value, global_step=None):
        self.calls.append((tag, value, global_step))

    def flush(self) -> None:
        pass


def test_only_rank_zero_logs_and_exports(tmp_path, monkeypatch):
    model = _model()
    monitor = ConservationMonitor(model, torch.randn(2, 5), every=1, recording="sync")
    monkeypatch.setattr(tb, "is_main_process", lambda: False)
    monkeypatch.setattr(export, "is_main_process", lambda: False)
    logger = tb.TensorBoardLogger(monitor, tmp_path / "tb")
    _train(monitor, model, steps=2)
    assert logger.writer is None and not (tmp_path / "tb").exists()
    assert export_csv(monitor, tmp_path / "h.csv") == 0 and not (tmp_path / "h.csv").exists()
    assert export_jsonl(monitor, tmp_path / "h.jsonl") == 0


def test_csv_and_jsonl_hold_the_full_history(tmp_path):
    model = _model()
    monitor = ConservationMonitor(model, torch.randn(2, 5), every=1, recording="sync")
    _train(monitor, model)
    history = monitor.history()
    # under momentum the identity groups (momentum recurrences) are exported like the laws
    n_laws = sum(g.count for g in monitor.groups) + sum(g.count for g in monitor.identity_groups)
    assert monitor.identity_groups
    n_rows = STEPS + 1  # θ_0 and one record per step

    rows = export_csv(monitor, tmp_path / "h.csv")
    assert rows == n_rows * n_laws
    with open(tmp_path / "h.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == rows
    for group in monitor.groups:
        mine = [r for r in table if r["group"] == group.name]
        for part in ("values", "first_order", "second_order"):
            got = np.array([float(r[part]) for r in mine]).reshape(n_rows, -1)
            want = history[f"{group.name}/{part}"]
            np.testing.assert_array_equal(got, want)  # repr() round-trips float64 exactly

    lines = export_jsonl(monitor, tmp_path / "h.jsonl")
    assert lines == n_rows
    entries = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == np.asarray(history["step"]).tolist()
    for group in monitor.groups:
        got = np.array([e["first_order"][group.name] for e in entries])
        np.testing.assert_array_equal(got, history[f"{group.name}/first_order"])
        got = [e["rel_drift"][group.name] for e in entries]
        np.testing.assert_array_equal(got, history[f"{group.name}/rel_drift"])


def test_non_finite_laws_are_null_in_jsonl_and_skipped_by_logged_maxima(tmp_path):
    model = _model()
    monitor = ConservationMonitor(model, torch.randn(2, 5), every=1, recording="sync")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(optimizer)
    records: list = []
    monitor.add_listener(records.append)
    with pytest.warns(Warning):
        with torch.no_grad():
            model[0].weight[0, 0] = math.inf  # poisons the first unit's law
        optimizer.step()
    export_jsonl(monitor, tmp_path / "h.jsonl")
    entry = json.loads((tmp_path / "h.jsonl").read_text().splitlines()[-1])
    first_group = monitor.groups[0].name
    assert None in entry["values"][first_group]
    # the logged maxima skip the invalid law, like the monitor's rel_drift
    scalars = export.record_scalars(monitor, records[-1])
    assert all(math.isfinite(v) for v in scalars.values()), scalars
