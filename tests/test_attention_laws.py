"""Internal laws of nn.MultiheadAttention: per head, Q̃Q̃ᵀ − K̃K̃ᵀ and ṼṼᵀ − W_OᵀW_O."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_conslaw import ConservationMonitor
from torch_conslaw.accounting import Accountant
from torch_conslaw.cli import main
from torch_conslaw.completeness import analyze
from torch_conslaw.lawgroups import MatrixLaws, build_groups
from torch_conslaw.structure import find_structure

F64 = torch.float64
E, H = 6, 2
D = E // H

CONFIGS = {
    "self_seq_first": dict(),
    "self_batch_first": dict(batch_first=True),
    "no_bias": dict(bias=False, batch_first=True),
    "kdim_vdim": dict(kdim=4, vdim=5),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
}


class Net(nn.Module):
    """x → Linear → MultiheadAttention (self or cross) → Linear → ReLU → Linear."""

    def __init__(self, **cfg):
        super().__init__()
        self.batch_first = cfg.get("batch_first", False)
        self.cross = "kdim" in cfg
        self.inp = nn.Linear(3, E)
        self.attn = nn.MultiheadAttention(E, H, **cfg)
        if self.cross:
            self.kin, self.vin = nn.Linear(3, cfg["kdim"]), nn.Linear(3, cfg["vdim"])
        self.fc = nn.Linear(E, 5)
        self.out = nn.Linear(5, 1)

    def forward(self, x):  # x: (N, L, 3) when batch_first else (L, N, 3)
        h = self.inp(x)
        k, v = (self.kin(x), self.vin(x)) if self.cross else (h, h)
        a, _ = self.attn(h, k, v, need_weights=False)
        return self.out(torch.relu(self.fc(a)))


def _model(name: str, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(**CONFIGS[name]).to(F64)


def _data(model: Net, n: int = 8, length: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, length, 3) if model.batch_first else (length, n, 3)
    return torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape[:-1] + (1,), generator=gen, dtype=F64)


def _by_hand(m: nn.MultiheadAttention, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """M_QK and M_VO of head h, written out from the parameters."""
    e, d = m.embed_dim, m.head_dim
    s = slice(h * d, (h + 1) * d)
    if m.in_proj_weight is not None:  # one fused in_proj (same embed dims)
        wq, wk, wv = m.in_proj_weight[:e], m.in_proj_weight[e : 2 * e], m.in_proj_weight[2 * e :]
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    q, k, v = wq[s], wk[s], wv[s]
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias[:e], m.in_proj_bias[e : 2 * e], m.in_proj_bias[2 * e :]
        q, k, v = (torch.cat([w, b[s, None]], 1) for w, b in ((q, bq), (k, bk), (v, bv)))
    if m.bias_k is not None:
        k = torch.cat([k, m.bias_k.reshape(-1)[s, None]], 1)
        v = torch.cat([v, m.bias_v.reshape(-1)[s, None]], 1)
    o = m.out_proj.weight[:, s]
    return q @ q.T - k @ k.T, v @ v.T - o.T @ o


def _train(model, monitor, lr, steps, seed=1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if monitor is not None:
        monitor.attach(opt)
    x, y = _data(model, seed=seed)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    if monitor is not None:
        monitor.detach()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_law_values_equal_by_hand_per_head(name):
    model = _model(name)
    groups = build_groups(find_structure(model).pairs)
    attn = {g.name: g for g in groups if g.pair.internal}
    assert sorted(attn) == sorted(f"attn.h{h} {w}" for h in range(H) for w in ("q·k", "v·o"))
    params = dict(model.named_parameters())
    iu = torch.triu_indices(D, D)
    with torch.no_grad():
        for h in range(H):
            qk, vo = _by_hand(model.attn, h)
            for label, want in (("q·k", qk), ("v·o", vo)):
                g = attn[f"attn.h{h} {label}"]
                assert isinstance(g, MatrixLaws) and g.kind == "matrix" and g.count == D * (D + 1) // 2
                assert g.expected_conserved and g.reason
                torch.testing.assert_close(g.values(params), want[iu[0], iu[1]], rtol=1e-13, atol=1e-13)
    names = [g.name for g in groups]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sgd_first_order_vanishes_and_drift_halves_with_the_step(name):
    drifts = []
    for lr, steps in ((4e-3, 10), (2e-3, 20)):
        model = _model(name)
        monitor = ConservationMonitor(model, every=1, recording="sync")
        _train(model, monitor, lr, steps)
        rows = [r for r in monitor.summary() if r["name"].startswith("attn.h")]
        assert len(rows) == 2 * H
        for r in rows:
            assert r["expected_conserved"] and r["kind"] == "matrix"
            assert r["max_rel_first_order"] <= 1e-12, r
            assert 0 < r["max_rel_drift"] < 1e-3, r
        drifts.append(max(r["max_abs_drift"] for r in rows))
    ratio = drifts[1] / drifts[0]
    assert 0.4 < ratio < 0.6, (drifts, ratio)


def _transform_head(m: nn.MultiheadAttention, h: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """Q̃_h → A Q̃_h, K̃_h → A⁻ᵀ K̃_h (bias_k too), Ṽ_h → B Ṽ_h (bias_v too), W_O,h → W_O,h B⁻¹."""
    e, d = m.embed_dim, m.head_dim
    s = slice(h * d, (h + 1) * d)
    ait, bi = torch.linalg.inv(a).T, torch.linalg.inv(b)
    with torch.no_grad():
        if m.in_proj_weight is not None:  # one fused in_proj (same embed dims)
            ws = [(m.in_proj_weight, 0), (m.in_proj_weight, e), (m.in_proj_weight, 2 * e)]
        else:
            ws = [(m.q_proj_weight, 0), (m.k_proj_weight, 0), (m.v_proj_weight, 0)]
        for (w, off), boff, t in zip(ws, (0, e, 2 * e), (a, ait, b)):
            w[off + s.start : off + s.stop] = t @ w[off + s.start : off + s.stop]
            if m.in_proj_bias is not None:
                m.in_proj_bias[boff + s.start : boff + s.stop] = t @ m.in_proj_bias[boff + s.start : boff + s.stop]
        if m.bias_k is not None:
            m.bias_k.view(-1)[s] = ait @ m.bias_k.view(-1)[s]
            m.bias_v.view(-1)[s] = b @ m.bias_v.view(-1)[s]
        m.out_proj.weight[:, s] = m.out_proj.weight[:, s] @ bi


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_unchanged_under_the_head_symmetries(name):
    model = _model(name)
    x, _ = _data(model)
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(D, D, generator=gen, dtype=F64) + 2 * torch.eye(D, dtype=F64)
    b = torch.randn(D, D, generator=gen, dtype=F64) + 2 * torch.eye(D, dtype=F64)
    moved = copy.deepcopy(model)
    _transform_head(moved.attn, 1, a, b)
    assert not torch.allclose(moved.attn.out_proj.weight, model.attn.out_proj.weight)
    with torch.no_grad():
        y0, y1 = model(x), moved(x)
    assert float((y1 - y0).abs().max() / y0.abs().max()) <= 1e-12
    # the laws of the other head are untouched
    params0, params1 = dict(model.named_parameters()), dict(moved.named_parameters())
    with torch.no_grad():
        for g in build_groups(find_structure(model).pairs):
            if g.name.startswith("attn.h0"):
                torch.testing.assert_close(g.values(params1), g.values(params0), rtol=0, atol=0)


def test_bias_kv_must_be_in_the_law_and_zero_attn_keeps_it():
    model = _model("bias_kv_zero_attn")
    group = next(g for g in build_groups(find_structure(model).pairs) if g.name == "attn.h0 q·k")
    assert [n for n, _ in group.pair.outgoing] == ["attn.in_proj_weight", "attn.in_proj_bias", "attn.bias_k"]
    vo = next(g for g in build_groups(find_structure(model).pairs) if g.name == "attn.h0 v·o")
    assert [n for n, _ in vo.pair.incoming] == ["attn.in_proj_weight", "attn.in_proj_bias", "attn.bias_v"]
    # without the bias_k column the would-be law is not conserved: its derivative along the
    # gradient is far from zero, while the law with it has none
    x, y = _data(model)
    loss = nn.functional.mse_loss(model(x), y)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    with torch.no_grad():
        full = 2 * group.bilinear(params, grads)
        scale = group.scale(params)
        bk = model.attn.bias_k.reshape(-1)[:D]
        gbk = grads["attn.bias_k"].reshape(-1)[:D]
        iu = torch.triu_indices(D, D)
        without = full + (torch.outer(bk, gbk) + torch.outer(gbk, bk))[iu[0], iu[1]]
        gnorm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
    assert float((full.abs() / scale).max()) <= 1e-12 * float(gnorm)
    assert float((without.abs() / scale).max()) > 1e-4 * float(gnorm)


def test_training_is_bitwise_identical_with_and_without_the_monitor():
    plain, watched = _model("kdim_vdim"), _model("kdim_vdim")
    _train(plain, None, 1e-2, 5)
    monitor = ConservationMonitor(watched, every=1, recording="sync")
    _train(watched, monitor, 1e-2, 5)
    assert monitor.num_steps == 5
    for (n, p), (_, q) in zip(plain.named_parameters(), watched.named_parameters()):
        assert torch.equal(p, q), n


def test_frozen_or_untrained_parameters_break_the_expectation():
    model = _model("self_seq_first")
    model.attn.out_proj.weight.requires_grad_(False)
    s = find_structure(model)
    names = [p.name for p in s.pairs]
    assert "attn.h0 q·k" in names and "attn.h0 v·o" not in names
    assert any("out_proj.weight is frozen" in str(x) for x in s.skipped)

    model = _model("self_seq_first")
    monitor = ConservationMonitor(model, every=1, recording="sync")
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n != "attn.out_proj.weight"], lr=1e-2)
    with pytest.warns(RuntimeWarning, match="does not update attn.out_proj.weight;"):
        monitor.attach(opt)
    expect = {g.name: g.expected_conserved for g in monitor.groups}
    assert expect["attn.h1 q·k"] and not expect["attn.h1 v·o"]
    monitor.detach()


def test_transformer_encoder_layer_and_downstream_consumers(tmp_path, capsys):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 12, dropout=0.0, batch_first=True).to(F64)
    x = torch.randn(4, 5, E, dtype=F64)
    monitor = ConservationMonitor(layer, x, every=1, recording="sync")
    names = [g.name for g in monitor.groups]
    assert [n for n in names if n.startswith("self_attn.h")] == [
        f"self_attn.h{h} {w}" for h in range(H) for w in ("q·k", "v·o")
    ]
    assert "self_attn key bias" in names and "self_attn.out_proj→norm1 centering" in names
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    monitor.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    monitor.detach()
    hist = monitor.history()
    assert hist["self_attn.h0 q·k/values"].shape[1] == D * (D + 1) // 2
    assert "self_attn.h1 v·o" in monitor.table()
    from torch_conslaw.integrations.export import export_csv, scalar_tag

    assert export_csv(monitor, tmp_path / "h.csv") > 0
    assert "self_attn.h0 q·k" in (tmp_path / "h.csv").read_text(encoding="utf-8")
    assert scalar_tag("self_attn.h0 q·k", "max_rel_drift") == "conslaw/self_attn.h0 q·k/max_rel_drift"

    params = dict(layer.named_parameters())
    acc = Accountant(monitor.groups)
    values = acc.values(params)
    with torch.no_grad():
        for g in monitor.groups:
            torch.testing.assert_close(values[g.name], g.values(params), rtol=1e-14, atol=1e-14)

    report = analyze(_model("self_batch_first"))
    assert report.lie_laws is None and "internal laws" in report.lie_note
    assert "attn.h0 q·k" in str(report)

    factory = tmp_path / "factory.py"
    factory.write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True)\n"
    )
    assert main(["inspect", f"{factory}:make", "--input-shape", "2,3,6"]) == 0
    out = capsys.readouterr().out
    assert "self_attn.h1 v·o" in out and "internal matrix law of self_attn" in out


def test_tensorboard_tags_of_attention_groups(tmp_path):
    tb = pytest.importorskip("torch_conslaw.integrations.tensorboard")
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = _model("self_batch_first")
    monitor = ConservationMonitor(model, every=1, recording="sync")
    logger = tb.TensorBoardLogger(monitor, tmp_path / "tb")
    _train(model, monitor, 1e-2, 2)
    logger.close()
    acc = ea.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for h in range(H):
        for w in ("q·k", "v·o"):
            assert logger.tag(f"attn.h{h} {w}", "max_rel_drift") in tags


class _HandAttention(nn.Module):
    """Attention written with Linear layers (no nn.MultiheadAttention)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.norm = nn.LayerNorm(6)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.o_proj = nn.Linear(6, 4)
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        h = self.norm(self.inp(x))
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.head(torch.relu(self.fc(self.o_proj(a))))


def test_models_without_attention_keep_exactly_their_groups():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.LeakyReLU(), nn.Linear(6, 2))
    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.Linear(5, 2),
    )
    # recorded with the code before internal laws existed
    expected = {
        "mlp": [("0→2", "unit", 8), ("2→4", "unit", 6)],
        "cnn": [("1→3", "channel", 3), ("3→6", "channel", 4), ("6→7", "matrix", 15)],
        "hand": [("norm→q_proj+k_proj+v_proj", "unit", 6), ("o_proj→fc", "matrix", 10), ("fc→head", "unit", 5)],
    }
    for key, model in (("mlp", mlp), ("cnn", cnn), ("hand", _HandAttention())):
        groups = build_groups(find_structure(model).pairs)
        assert [(g.name, g.kind, g.count) for g in groups] == expected[key]
        assert not any(g.pair.internal for g in groups)
