"""Gains read as γ + c: Gemma's RMSNorm multiplies by (1 + γ), Nemotron's ``LayerNorm1P``
passes ``weight + 1`` to ``F.layer_norm``. The symmetry rescales γ + c, so the law of unit u is
(γ_u + c)² (+ β_u²) − k‖w_out,u‖², the quadratic form of the plain law at the shifted point;
its change over a step splits exactly as 2B(θ + c, Δ) + B(Δ, Δ)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc
from torch_conslaw import ConservationMonitor, catalogue
from torch_conslaw.lawgroups import UnitLaws
from torch_conslaw.laws.verify import gradient_norms
from torch_conslaw.native import native_status
from torch_conslaw.structure import Pair
from torch_conslaw.tracked_rank import law_gradients

from fsdp_helpers import run_job_on_two_ranks


F64 = torch.float64
needs_native = pytest.mark.skipif(not native_status()[0], reason="the native kernel did not build here")


class OnePlusRMSNorm(nn.Module):
    """Gemma's RMSNorm: γ is stored around 0 and used as ``c + γ`` (c = 1 there)."""

    def __init__(self, d: int, c: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return out * (self.c + self.weight)


class LayerNorm1P(nn.LayerNorm):
    """Nemotron's LayerNorm: an ``nn.LayerNorm`` that passes ``weight + 1`` as its gain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class Net(nn.Module):
    def __init__(self, norm: nn.Module, d: int = 6, h: int = 8) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = norm, nn.Linear(d, h), nn.Linear(h, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def make(norm: str, dtype: torch.dtype = F64, c: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    layer = OnePlusRMSNorm(6, c) if norm == "rms" else LayerNorm1P(6)
    model = Net(layer).to(dtype)
    with torch.no_grad():  # γ and β away from their initial 0, so that every term matters
        model.norm.weight.normal_(0.0, 0.4)
        if getattr(model.norm, "bias", None) is not None:
            model.norm.bias.normal_(0.0, 0.4)
    return model


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def by_hand(model: nn.Module, c: float = 1.0) -> torch.Tensor:
    """(c + γ_u)² (+ β_u²) − ‖fc1.weight[:, u]‖², float64."""
    p = {n: t.detach().to(F64) for n, t in model.named_parameters()}
    law = (c + p["norm.weight"]) ** 2 - p["fc1.weight"].square().sum(0)
    return law + p["norm.bias"] ** 2 if "norm.bias" in p else law


def group_of(monitor: ConservationMonitor, producer: str = "norm"):
    found = [g for g in monitor.groups if g.producer == producer]
    assert len(found) == 1, [g.name for g in monitor.groups]
    return found[0]


@pytest.mark.parametrize("norm, c", [("rms", 1.0), ("rms", 0.5), ("layer_norm", 1.0)])
def test_the_shifted_gain_law_is_found_verified_and_equals_the_closed_form(norm, c):
    model = make(norm, c=c)
    monitor = ConservationMonitor(model, X.to(F64))
    group = group_of(monitor)
    assert group.shifts == {"norm.weight": c}
    assert f"norm.weight + {c:g}" in group.reason
    values = group.values(dict(model.named_parameters()))
    torch.testing.assert_close(values, by_hand(model, c), rtol=0, atol=1e-13)
    assert group.name.startswith("norm→fc1") and group.count == 6
    assert {g.name for g in monitor.groups} == {group.name, "fc1→fc2"}  # nothing else claimed


def test_the_law_is_orthogonal_to_the_model_gradient_and_the_unshifted_one_is_not():
    """By hand with torch.func: ∇h · ∂fᵀu = 0 for random cotangents u at θ for h = (1 + γ)² −
    ‖W[:, u]‖², while γ² − ‖W[:, u]‖² (what a γ-reading rule would claim) is no law."""
    model = make("rms")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def f(p):
        return torch.func.functional_call(model, p, (X.to(F64),))

    def shifted(p):
        return (1 + p["norm.weight"]) ** 2 - p["fc1.weight"].square().sum(0)

    def plain(p):
        return p["norm.weight"] ** 2 - p["fc1.weight"].square().sum(0)

    _, vjp = torch.func.vjp(f, params)
    gen = torch.Generator().manual_seed(5)
    worst = {"shifted": 0.0, "plain": 0.0}
    for _ in range(4):
        (g,) = vjp(torch.randn(16, 3, generator=gen, dtype=F64))
        for name, law in (("shifted", shifted), ("plain", plain)):
            jac = torch.func.jacrev(law)(params)
            for u in range(6):
                dot = sum((jac[n][u] * g[n]).sum() for n in params)
                norm = torch.sqrt(sum((jac[n][u] ** 2).sum() for n in params)) * torch.sqrt(sum((g[n] ** 2).sum() for n in params))
                worst[name] = max(worst[name], float(dot.abs() / norm))
    assert worst["shifted"] < 1e-12
    assert worst["plain"] > 1e-3


@pytest.mark.parametrize("evaluation", ["eager", pytest.param("native", marks=needs_native)])
def test_the_split_of_a_step_is_exact_at_the_shifted_point(evaluation):
    """The fused evaluations read θ, not θ + c: a shifted group takes the generic path."""
    model = make("layer_norm")
    monitor = ConservationMonitor(model, X.to(F64), every=1, recording="sync", evaluation=evaluation)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor.attach(opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    opt.zero_grad()
    F.mse_loss(model(X.to(F64)), y).backward()
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = monitor.history()
    name = group_of(monitor).name
    first, second = h[f"{name}/first_order"][1], h[f"{name}/second_order"][1]
    d_gamma = after["norm.weight"] - before["norm.weight"]
    d_beta = after["norm.bias"] - before["norm.bias"]
    d_w = after["fc1.weight"] - before["fc1.weight"]
    first_hand = 2 * ((1 + before["norm.weight"]) * d_gamma + before["norm.bias"] * d_beta
                      - (before["fc1.weight"] * d_w).sum(0))
    second_hand = d_gamma**2 + d_beta**2 - d_w.square().sum(0)
    torch.testing.assert_close(torch.as_tensor(first), first_hand, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.as_tensor(second), second_hand, rtol=1e-12, atol=1e-15)
    change = torch.as_tensor(h[f"{name}/values"][1]) - torch.as_tensor(h[f"{name}/values"][0])
    torch.testing.assert_close(change, first_hand + second_hand, rtol=1e-10, atol=1e-14)
    # gradient flow keeps it: the first-order part is rounding, the second order is η²-sized
    assert float(torch.as_tensor(first).abs().max()) < 1e-12
    assert float(torch.as_tensor(second).abs().max()) > 1e-6


def test_law_gradients_and_their_norms_are_those_of_the_shifted_form():
    """∇h = 2(θ + c) on γ's entries: the tracked-rank gradients and the norms the check
    divides by, against torch.func on the closed form."""
    model = make("layer_norm")
    monitor = ConservationMonitor(model, X.to(F64))
    group = group_of(monitor)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: (1 + p["norm.weight"]) ** 2 + p["norm.bias"] ** 2 - p["fc1.weight"].square().sum(0))(params)
    layout, offset = {}, 0
    for n, p in params.items():
        layout[n] = (offset, p.numel())
        offset += p.numel()
    dense = law_gradients([group], params, layout).dense().T  # [laws, θ entries]
    expected = torch.cat([jac[n].reshape(6, -1) for n in params], 1)
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(gradient_norms(group, params), expected.norm(dim=1), rtol=1e-14, atol=0)


def test_the_float32_monitor_tracks_the_law_through_training_and_analyze_is_complete():
    model = make("rms", dtype=torch.float32)
    monitor = ConservationMonitor(model, X, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor.attach(opt)
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(3))
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    row = next(r for r in monitor.summary() if r["name"] == group_of(monitor).name)
    assert row["max_rel_first_order"] < 1e-6  # float32 rounding of the parameters
    assert row["recorded_steps"] == 10
    report = tc.analyze(model, X, max_lie_parameters=200)
    assert report.complete and report.tracked_rank == report.lie_laws == 14


def test_the_module_level_layernorm_pair_gives_way_to_the_shifted_one():
    """``LayerNorm1P`` is an ``nn.LayerNorm``: its module-level rule reads γ, the model reads
    γ + 1. Only the op graph's shifted law is proposed (no refused γ² law in the notes)."""
    model = make("layer_norm")
    monitor = ConservationMonitor(model, X.to(F64))
    assert group_of(monitor).shifts == {"norm.weight": 1.0}
    assert not [s for s in monitor.skipped if "norm" in str(s) and "numerical check" in str(s)], monitor.skipped


def test_without_an_example_input_a_layer_with_its_own_forward_gets_a_note_and_no_law():
    """``LayerNorm1P`` derives from ``nn.LayerNorm``: without the op graph nothing says what its
    forward computes, so the LayerNorm law (γ², false here) is not assumed, and a note says so."""
    model = nn.Sequential(nn.Linear(4, 6), LayerNorm1P(6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    monitor = ConservationMonitor(model)
    assert [g.name for g in monitor.groups] == ["2→4"]
    notes = [str(s) for s in monitor.skipped if s.producer == "1"]
    assert len(notes) == 1 and "derives from LayerNorm" in notes[0] and "own forward" in notes[0]
    with_input = ConservationMonitor(model, torch.randn(3, 4))
    assert group_of(with_input, "1").shifts == {"1.weight": 1.0}


def test_a_registered_layer_read_shifted_gives_way_to_the_op_graph(monkeypatch):
    """A user registers the Gemma norm like an RMSNorm (γ read per unit): the module-level law
    reads γ, the model γ + 1; the op graph's shifted law replaces it (no refused γ² law)."""
    monkeypatch.setattr(catalogue, "_LAYERS", dict(catalogue._LAYERS))
    spec = catalogue.layer_spec(nn.LayerNorm(3))
    catalogue.register_layer(OnePlusRMSNorm, out_units=lambda m: m.weight.numel(), in_units=lambda m: m.weight.numel(),
                             incoming=lambda m: [("weight", lambda w: w.unsqueeze(1))], outgoing=spec.outgoing,
                             diagonal=spec.diagonal, barrier=spec.barrier)
    model = make("rms")
    assert catalogue.layer_spec(model.norm) is not None
    monitor = ConservationMonitor(model, X.to(F64))
    assert group_of(monitor).shifts == {"norm.weight": 1.0}
    assert not [s for s in monitor.skipped if "numerical check" in str(s)], monitor.skipped


@pytest.mark.parametrize("momentum, weight_decay, said", [(0.9, 0.0, "no identity"), (0.0, 0.01, "broken at first order")])
def test_momentum_and_weight_decay_say_what_they_do_to_a_shifted_law(momentum, weight_decay, said):
    model = make("rms")
    monitor = ConservationMonitor(model, X.to(F64), every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a note, no refusal warning
        monitor.attach(opt)
    group = group_of(monitor)
    assert said in group.reason and "norm.weight + 1" in group.reason
    assert all(group.name not in g.name for g in monitor.identity_groups)
    opt.zero_grad()
    F.mse_loss(model(X.to(F64)), torch.zeros(16, 3, dtype=F64)).backward()
    opt.step()
    if weight_decay:  # decay pulls γ to 0, not 1 + γ: a real first-order change
        first = torch.as_tensor(monitor.history()[f"{group.name}/first_order"][1])
        assert float(first.abs().max()) > 1e-4


def test_hf_gemma_and_nemotron_float32_track_the_shifted_norm_laws():
    tf = pytest.importorskip("transformers")
    ids = {"input_ids": torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))}
    common = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=4, vocab_size=16, max_position_embeddings=16)
    block = ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]
    cases = (
        (tf.GemmaConfig(**common), block),  # the final norm feeds the lm_head tied to the embedding: no law
        (tf.NemotronConfig(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2), block + ["model.norm.weight"]),
    )
    for config, expected in cases:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config).eval()
        monitor = ConservationMonitor(model, ids)
        shifted = [g for g in monitor.groups if getattr(g, "shifts", None)]
        assert sorted(n for g in shifted for n in g.shifts) == expected, type(model).__name__
        assert sum(g.count for g in shifted) == 8 * len(expected)  # one law per channel of each norm


# ------------------------------------------------------------------------------------------
# FSDP2: a shifted γ sharded along dim 0 (its local entries are moved by c alike)
# ------------------------------------------------------------------------------------------
# Under fully_shard the monitor has no op graph (it is not captured through FSDP's hooks), so a
# shift is not found there today; the sharded evaluator is checked on the law the monitor finds
# before sharding, with readers of whole tensors (as the module-level rules write them).


def _sharded_job(mesh) -> dict:
    from torch.distributed.fsdp import fully_shard

    from torch_conslaw.monitor.sharded import ShardedLaws

    status: dict = {}
    model = make("layer_norm", dtype=torch.float32)
    # the law as the monitor finds it, with readers written as functions of whole tensors
    # (the op graph's index readers are not mapped onto shards)
    found = next(g for g in ConservationMonitor(model, X).groups if g.producer == "norm")
    pair = Pair("norm", "fc1", (), "unit", 1.0, 6, 1,
                (("norm.weight", lambda w: w.unsqueeze(1)), ("norm.bias", lambda b: b.unsqueeze(1))),
                (("fc1.weight", lambda w: w.T),), shifts=tuple(found.shifts.items()))
    groups = [UnitLaws(pair)]
    status["shifts"] = [dict(g.shifts) for g in groups]
    full = {n: p.detach().to(F64) for n, p in model.named_parameters()}
    assert torch.equal(groups[0].values(full), found.values(full))  # the same law
    for layer in model.children():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = dict(model.named_parameters())
    # an example input cannot run through fully_shard's hooks here (fx traces into the
    # norm's own forward): the monitor builds without it, and says so
    calls = []
    handle = model.fc2.register_forward_pre_hook(lambda *_: calls.append(1))
    given = ConservationMonitor(model, X)
    handle.remove()
    status["with_input"] = {"groups": [g.name for g in given.groups], "note": given.verification_note,
                            "forwards": len(calls)}
    laws = ShardedLaws(params, groups)
    before = {n: t.detach().to(F64).clone() for n, t in laws.local(params).items()}
    full_before = {n: p.full_tensor().detach().to(F64) for n, p in params.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):  # momentum: a nonzero first-order part at the second step
        opt.zero_grad()
        F.mse_loss(model(X), torch.ones(16, 3)).backward()
        opt.step()
    table = laws.split_table(before, params)
    full_after = {n: p.full_tensor().detach().to(F64) for n, p in params.items()}
    delta = {n: full_after[n] - full_before[n] for n in full_after}
    expected = torch.stack([
        torch.cat([g.values(full_after) for g in groups]),
        torch.cat([g.first_order(full_before, delta) for g in groups]),
        torch.cat([g.second_order(delta) for g in groups]),
    ])
    status["table"], status["expected"] = table.tolist(), expected.tolist()
    norm = groups[0]
    status["initial"] = laws.initial(params)[0][norm.name].tolist()  # h(θ) and scales at construction
    status["initial_expected"] = norm.values(full_after).tolist()
    return status


def test_fsdp2_sharded_shifted_gain_laws_equal_the_unsharded_evaluation(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 not in this torch")
    status = run_job_on_two_ranks(str(tmp_path), "shifted", _sharded_job)
    assert status[0] == status[1]  # every rank gets the same all-reduced values
    assert {"norm.weight": 1.0} in status[0]["shifts"]
    given = status[0]["with_input"]
    assert given["groups"] == ["fc1→fc2"] and "sharded (FSDP2)" in given["note"], given
    assert given["forwards"] == 0  # nothing runs through fully_shard's hooks outside training
    table, expected = np.asarray(status[0]["table"]), np.asarray(status[0]["expected"])
    scale = np.abs(expected[0]).max()
    np.testing.assert_allclose(table, expected, rtol=1e-9, atol=1e-12 * scale)
    assert np.abs(expected[1]).max() > 1e-6 * scale  # a real first-order part, compared too
    np.testing.assert_allclose(status[0]["initial"], status[0]["initial_expected"], rtol=1e-12, atol=1e-12 * scale)
