"""Exact first/second-order split, bounded record store and recording schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_conslaw.accounting import Accountant, evaluate, split_change
from torch_conslaw.monitor.store import Record, RecordStore
from torch_conslaw.lawgroups import build_groups
from torch_conslaw.monitor.schedule import Schedule
from torch_conslaw.structure import find_structure


def groups_and_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.Linear(5, 2)).double()
    return build_groups(find_structure(model).pairs), {n: p.detach() for n, p in model.named_parameters()}


def test_split_reproduces_the_change_for_an_arbitrary_step():
    groups, before = groups_and_params()
    g = torch.Generator().manual_seed(3)
    after = {n: p + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in before.items()}
    values, first, second = split_change(groups, before, after)
    for grp in groups:
        torch.testing.assert_close(values[grp.name], grp.values(after), rtol=0, atol=0)
        change = grp.values(after) - grp.values(before)
        torch.testing.assert_close(first[grp.name] + second[grp.name], change, rtol=0, atol=1e-13)
        # second order is B(Δ, Δ) = h(Δ): the law evaluated on the step itself
        delta = {n: after[n] - before[n] for n in before}
        torch.testing.assert_close(second[grp.name], grp.values(delta), rtol=0, atol=1e-15)


def test_split_of_a_step_along_the_symmetry_is_purely_first_order():
    groups, before = groups_and_params()
    # rescale unit 0 of the ReLU layer: w_in → c w_in, w_out → w_out / c changes the law by
    # (c² − 1)‖w_in‖² − (1/c² − 1)‖w_out‖², a finite change, so the split must still be exact
    after = {n: p.clone() for n, p in before.items()}
    c = 1.5
    after["0.weight"][0] *= c
    after["0.bias"][0] *= c
    after["2.weight"][:, 0] /= c
    values, first, second = split_change(groups[:1], before, after)
    w_in = torch.cat([before["0.weight"][0], before["0.bias"][:1]])
    w_out = before["2.weight"][:, 0]
    expected = (c**2 - 1) * w_in.square().sum() - (1 / c**2 - 1) * w_out.square().sum()
    change = first["0→2"][0] + second["0→2"][0]
    torch.testing.assert_close(change, expected, rtol=0, atol=1e-13)
    assert torch.all(first["0→2"][1:] == 0) and torch.all(second["0→2"][1:] == 0)


def test_record_store_thins_evenly_and_keeps_first_and_latest():
    store = RecordStore(max_records=4)
    for s in range(10):
        store.add(Record(s, {}, None, None, {}))
    assert [r.step for r in store.records()] == [0, 4, 8, 9]
    restored = RecordStore(max_records=4)
    restored.load_state_dict(store.state_dict())
    restored.add(Record(10, {}, None, None, {}))
    store.add(Record(10, {}, None, None, {}))
    assert [r.step for r in restored.records()] == [r.step for r in store.records()]
    with pytest.raises(ValueError, match="max_records must be an integer"):
        RecordStore(1)


def test_schedules():
    assert [s for s in range(1, 10) if Schedule(every=3).due(s)] == [3, 6, 9]
    log = [s for s in range(1, 1001) if Schedule(log_spaced=True, per_decade=2).due(s)]
    assert log == [1, 4, 10, 32, 100, 317, 1000]  # first steps reaching 10^(i/2)
    assert not Schedule().due(0)
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Schedule(every=0)
    with pytest.raises(ValueError, match="every=5 would be ignored"):
        Schedule(every=5, log_spaced=True)


def test_tables_put_every_group_in_its_columns_when_fast_and_generic_groups_interleave():
    """Matrix laws (generic path) between per-unit laws (fused path): the table's columns
    follow the groups' order and equal the float64 definition group by group."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 4), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)
    )
    groups = build_groups(find_structure(model).pairs)
    assert [g.kind for g in groups] == ["matrix", "unit", "matrix", "unit"]
    acc = Accountant(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = {n: p + 0.01 * torch.randn_like(p) for n, p in before.items()}
    values = acc.values_table(after)
    table = acc.split_table(before, after)
    reference = split_change(groups, before, after)
    assert values.shape == (1, sum(acc.counts)) and table.shape == (3, sum(acc.counts))
    start = 0
    for g, count in zip(groups, acc.counts):
        columns = slice(start, start + count)
        for row, part in zip(table, reference):
            assert torch.allclose(row[columns], part[g.name], rtol=1e-12, atol=1e-15)
        assert torch.allclose(values[0, columns], evaluate([g], after)[g.name], rtol=1e-12, atol=1e-15)
        start += count
