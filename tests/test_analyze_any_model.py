"""analyze() on models that are not plain Linear chains: GELU MLPs, CNNs, residual blocks,
attention, LayerNorm; a ResNet-18 without the dense Jacobian; where missing laws live."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import torch_conslaw as tc

from graph_models import ResNet18  # the CIFAR ResNet-18 (11.2 M parameters at width 64)

F64 = torch.float64


class Residual(nn.Module):
    """y = x + fc2(relu(fc1(x))), or the branch alone with ``skip=False``."""

    def __init__(self, d: int = 3, h: int = 4, skip: bool = True):
        super().__init__()
        self.fc1, self.fc2, self.skip = nn.Linear(d, h), nn.Linear(h, d), skip

    def forward(self, x):
        y = self.fc2(F.relu(self.fc1(x)))
        return x + y if self.skip else y


class OneHead(nn.Module):
    """One attention head written with plain torch ops (q, k, v, o projections with biases)."""

    def __init__(self, d: int = 3, dh: int = 2):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(d, dh), nn.Linear(d, dh), nn.Linear(d, dh), nn.Linear(dh, d)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(self.q.out_features)
        return self.o(torch.softmax(scores, -1) @ self.v(x))


def _flat_params(model):
    return {n: p.detach().to(F64).clone() for n, p in model.named_parameters()}


def _jacobian(model, x):
    """Dense ∂f/∂θ over the batch (K × D), by torch.func.jacrev (independent of the Lie engine)."""
    model64 = model.to(F64)
    params = _flat_params(model64)
    jac = jacrev(lambda p: functional_call(model64, p, (x.to(F64),)).reshape(-1))(params)
    return torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in params], 1), params


def test_gelu_mlp_has_no_law_and_is_complete_with_nothing_tracked():
    torch.manual_seed(0)
    report = tc.analyze(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 5)), torch.randn(2, 3))
    assert (report.tracked_laws, report.tracked_rank, report.lie_laws) == (0, 0, 0)
    assert report.complete is True and report.missing_laws == 0
    assert "tracked set: complete" in str(report)


def test_relu_cnn_has_one_law_per_hidden_channel_and_is_complete():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3))
    report = tc.analyze(model, torch.randn(2, 2, 7, 7))
    assert report.tracked_rank == report.lie_laws == 3 and report.complete is True
    assert report.lie.stable  # the count's own evidence: same count on fewer inputs


def test_residual_block_keeps_the_laws_of_its_branch():
    torch.manual_seed(0)
    block = Residual()
    branch = Residual(skip=False)
    branch.load_state_dict(block.state_dict())
    x = torch.randn(2, 3)
    with_skip, without = tc.analyze(block, x), tc.analyze(branch, x)
    assert with_skip.lie_laws == without.lie_laws == 4  # one per hidden unit (ICML 2025)
    assert with_skip.complete is True and with_skip.tracked_rank == 4


def test_attention_head_laws_are_counted_and_the_untracked_ones_located():
    torch.manual_seed(0)
    model = OneHead()
    x = torch.randn(2, 4, 3)
    report = tc.analyze(model, x, theta="random", seed=1)
    # independent: the known head laws (Q̃Q̃ᵀ − K̃K̃ᵀ, ṼṼᵀ − OᵀO with biases appended, the key
    # bias) are laws (their gradients are ⊥ every row of the dense Jacobian at θ and inputs),
    # and the rank of their gradients equals the count
    ref = OneHead()
    with torch.no_grad():
        for (name, p), flat in zip(ref.named_parameters(), _theta_of(report)):
            p.copy_(flat)
    xs = torch.randn(16, 4, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    jac, params = _jacobian(ref, xs)

    def known(p):
        q = torch.cat([p["q.weight"], p["q.bias"][:, None]], 1)
        k = torch.cat([p["k.weight"], p["k.bias"][:, None]], 1)
        v = torch.cat([p["v.weight"], p["v.bias"][:, None]], 1)
        iu = torch.triu_indices(2, 2)
        qk = (q @ q.T - k @ k.T)[iu[0], iu[1]]
        vo = (v @ v.T - p["o.weight"].T @ p["o.weight"])[iu[0], iu[1]]
        return torch.cat([qk, vo, p["k.bias"]])

    grads = jacrev(known)(params)
    g = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in params], 1)
    assert (jac @ g.T).abs().max() <= 1e-10 * jac.norm() * g.norm()
    s = torch.linalg.svdvals(g)
    assert report.lie_laws == int((s > 1e-8 * s[0]).sum())
    # the op-graph rules see through hand-written heads: Q̃Q̃ᵀ − K̃K̃ᵀ, ṼṼᵀ − OᵀO and the key
    # bias are tracked, each verified on the example input: the tracked set is complete
    assert report.complete is True and report.tracked_rank == report.lie_laws
    assert any(g.kind == "linear" and tuple(g.parameter_names) == ("k.bias",) for g in report.groups)
    # the layer-pair catalogue alone misses the key bias: those laws are located, mostly in
    # k.bias (the rest of the share is its overlap with the tracked q·k law, which reads k.bias)
    report = tc.analyze(model, x, theta="random", seed=1, families=False)
    assert report.complete is False and report.missing_laws == report.lie_laws - report.tracked_rank == 2
    assert set(report.missing.shares) <= {"q.weight", "q.bias", "k.weight", "k.bias"}
    assert max(report.missing.shares, key=report.missing.shares.get) == "k.bias"
    assert abs(sum(report.missing.shares.values()) - 1) < 1e-9
    assert "where the missing laws live" in str(report)
    # the missing laws themselves, on those tensors: the key bias
    assert sorted(str(h) for h in report.polynomial_laws) == ["k.bias[0]", "k.bias[1]"]


def _theta_of(report):
    theta = report.lie.theta
    return [theta[s.offset : s.offset + s.numel].view(s.shape) for s in report.lie.parameters]


def test_layernorm_centering_laws_are_tracked_and_without_families_located_as_polynomials():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))
    report = tc.analyze(model, torch.randn(2, 3))
    # tracked: the 4 unit laws of 1→3 and the 4 verified centering laws (3 column sums, Σ b);
    # the scale law before the LayerNorm holds only at eps = 0: named, not counted
    assert report.complete is True and report.tracked_rank == report.lie_laws == 8
    assert sorted(g.kind for g in report.groups) == ["linear", "unit"]
    assert "approximate laws" in str(report) and "0→1 scale" in str(report)
    report = tc.analyze(model, torch.randn(2, 3), families=False)
    assert report.complete is False and report.missing_laws == 4
    # the column sums of the layer before LayerNorm: 3 of its weight columns and its bias
    assert report.missing.shares.keys() == {"0.weight", "0.bias"}
    assert report.missing.shares["0.weight"] == pytest.approx(0.75) and report.missing.shares["0.bias"] == pytest.approx(0.25)
    laws = [str(h) for h in report.polynomial_laws]
    assert len(laws) == 4 and "0.bias[0] + 0.bias[1] + 0.bias[2] + 0.bias[3]" in laws
    # independent check: every loss gradient has zero column sums there
    x = torch.randn(8, 3)
    F.mse_loss(model(x), torch.randn(8, 2)).backward()
    assert model[0].weight.grad.sum(0).abs().max() < 1e-6 and model[0].bias.grad.sum().abs() < 1e-6
    text = str(report)
    assert "INCOMPLETE" in text and "0.weight" in text and "polynomial laws of degree ≤ 1" in text


def test_resnet18_gets_its_tracked_rank_and_says_why_it_was_not_counted():
    torch.manual_seed(0)
    report = tc.analyze(ResNet18(), torch.randn(2, 3, 32, 32))
    assert report.num_parameters == 11_173_962
    # one law per BN1 channel of each block (1920), and one per channel of each stage's residual
    # stream (64 + 128 + 256 + 512): written by the stem / shortcut BatchNorm and every bn2; and
    # β_bn2 − β_shortcut per channel of the three downsampling blocks (128 + 256 + 512: their outputs
    # are only added before the ReLU, tests/test_sweep_decoders.py)
    assert report.tracked_laws == report.tracked_rank == 1920 + 960 + 896
    assert report.lie_laws is None and report.complete is None
    assert "max_lie_parameters=20000" in report.lie_note


def test_bad_input_gets_a_clear_error():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3))
    with pytest.raises(ValueError, match="example_input"):
        tc.analyze(model, torch.randn(2, 5, 7, 7))  # wrong channel count
    with pytest.raises(ValueError, match="theta must be"):
        tc.analyze(model, torch.randn(2, 2, 7, 7), theta="init")
    with pytest.raises(ValueError, match="polynomial_degree"):
        tc.analyze(model, torch.randn(2, 2, 7, 7), polynomial_degree=0)
    with pytest.raises(ValueError, match="n_inputs"):
        tc.analyze(model, torch.randn(2, 2, 7, 7), n_inputs=2)
    small = tc.analyze(model, torch.randn(2, 2, 7, 7), max_lie_parameters=10)
    assert small.lie_laws is None and "max_lie_parameters=10" in small.lie_note and small.tracked_rank == 3
    rushed = tc.analyze(model, torch.randn(2, 2, 7, 7), max_seconds=1e-6)
    assert rushed.lie_laws is None and "budget" in rushed.lie_note and "max_seconds" in rushed.lie_note
    gelu = tc.analyze(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 5)))
    assert gelu.complete is None and "pass one batch" in gelu.lie_note


def test_inspect_analyze_prints_counts_verdict_location_and_laws(tmp_path, capsys):
    from torch_conslaw.cli import main

    path = tmp_path / "lnnet.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make_model():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))\n"
    )
    assert main(["inspect", f"{path}:make_model", "--input-shape", "2,3", "--analyze"]) == 0
    out = capsys.readouterr().out
    assert "tracked: 2 law group(s), 8 law function(s), 8 independent at θ" in out
    assert "0→1 centering" in out and "existing laws (Lie-algebra count): 8 independent" in out
    assert "tracked set: complete" in out


class TorchAttention(nn.Module):
    """nn.MultiheadAttention as used by nn.TransformerEncoderLayer (fused in_proj)."""

    def __init__(self, d: int = 2, heads: int = 1):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_torch_multihead_attention_tracks_its_key_bias_and_pairs_alone_miss_exactly_it():
    torch.manual_seed(0)
    model = TorchAttention()
    report = tc.analyze(model, torch.randn(2, 3, 2), theta="random")
    assert report.tracked_rank == report.lie_laws == 8 and report.complete is True  # with the key bias
    report = tc.analyze(model, torch.randn(2, 3, 2), theta="random", families=False)
    assert report.tracked_rank == 6  # q·k and v·o matrix laws of the head (d_h = 2: 3 + 3)
    assert report.lie_laws == 8 and report.missing_laws == 2 and report.complete is False
    assert [str(h) for h in report.polynomial_laws] == ["attn.in_proj_bias[2]", "attn.in_proj_bias[3]"]
    # independent check: the key bias gets no gradient from any loss
    x = torch.randn(5, 3, 2)
    model(x).square().sum().backward()
    assert model.attn.in_proj_bias.grad[2:4].abs().max() < 1e-6 < model.attn.in_proj_bias.grad[4:].abs().max()


class _Lookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.a, self.b = nn.Embedding(10, 4, padding_idx=0), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, ids):
        return self.b(torch.relu(self.a(self.e(ids))))


def test_polynomial_laws_say_which_are_tracked_and_unread_embedding_rows_get_a_note():
    torch.manual_seed(0)
    model = _Lookup()
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])  # token 9 never appears
    report = tc.analyze(model, ids)
    flags = dict(zip((str(h) for h in report.polynomial_laws), report.polynomial_tracked))
    # the padding row is a tracked (verified) law; row 9, which no drawn input reads, is a law
    # of these inputs only, not tracked, and a note says why it appears
    assert {law: f for law, f in flags.items() if law.startswith("e.weight[0,")} == {f"e.weight[0,{j}]": True for j in range(4)}
    assert {law: f for law, f in flags.items() if law.startswith("e.weight[9,")} == {f"e.weight[9,{j}]": False for j in range(4)}
    assert any("span ids 0..8" in n and "has 10 rows" in n for n in report.notes)
    assert "    (tracked)" in str(report) and "of which 4 tracked" in str(report)
    # independent: no loss moves the padding row or row 9 on such inputs
    model(ids).square().sum().backward()
    assert model.e.weight.grad[[0, 9]].abs().max() == 0 < model.e.weight.grad[1:9].abs().max()
    pairs_only = tc.analyze(model, ids, families=False)
    assert pairs_only.polynomial_laws is not None and not any(pairs_only.polynomial_tracked)


def test_a_post_norm_transformer_encoder_layer_is_complete():
    """nn.TransformerEncoderLayer(4, 2, 8): 8 FFN unit laws, 4 × 3 head matrix laws, the key bias
    (4), the centering of linear2 (9) and of self_attn.out_proj (5) before their LayerNorms: 38,
    the Lie count's number (the README's example)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
    report = tc.analyze(layer, torch.randn(2, 3, 4), theta="random")
    counts = {g.name: g.count for g in report.groups}
    assert counts["self_attn.out_proj→norm1 centering"] == 5 and counts["linear2→norm2 centering"] == 9
    assert report.complete is True and report.tracked_rank == report.lie_laws == 38


class TakesOneDict(nn.Module):
    """forward(batch): one dict argument, and a dict output."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, batch):
        return {"y": self.o(F.relu(self.a(batch["x"]))) * batch["w"]}


def test_a_model_that_takes_one_dict_is_counted_and_checked_through_a_tuple():
    """A dict example_input is passed as keyword arguments; a model taking one dict gets it as
    ``(batch,)``. Its count then reads the tensors inside the dict (before: "inputs hold no
    tensor"; then float32 inputs met float64 weights in the polynomial search), the six unit
    laws are verified and complete, and a dict passed bare is refused with the hint. Checked
    independently: each law's gradient is orthogonal to a random loss's (torch.func)."""
    torch.manual_seed(0)
    model = TakesOneDict()
    batch = {"x": torch.randn(5, 4), "w": torch.rand(5, 1)}
    with pytest.warns(RuntimeWarning, match=r"give \(example_input,\)"):
        tc.ConservationMonitor(model, batch)
    monitor = tc.ConservationMonitor(model, (batch,))
    assert [(g.name, g.count) for g in monitor.groups] == [("a→o", 6)]
    assert monitor.summary()[0]["verified"] is True
    report = tc.analyze(model, (batch,), theta="random", max_seconds=120)
    assert (report.tracked_rank, report.lie_laws, report.complete) == (6, 6, True)
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    inputs = {"x": batch["x"].double(), "w": batch["w"].double()}
    target = torch.randn(5, 2, dtype=F64)

    def loss(p):
        return ((functional_call(model, p, (inputs,))["y"] - target) ** 2).sum()

    def laws(p):
        return p["a.weight"].square().sum(1) + p["a.bias"].square() - p["o.weight"].square().sum(0)

    g = torch.func.grad(loss)(params)
    dh = jacrev(laws)(params)
    inner = sum((dh[n] * g[n]).flatten(1).sum(1) for n in params)
    assert inner.abs().max() < 1e-12 * (1 + max(v.abs().max() for v in g.values()))


class NormalizedByHand(nn.Module):
    """h / ‖h‖ of a ReLU layer (and a temperature it does not use yet): finite at θ, but 0 / 0
    at random θ where every unit is off for some input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.c(h / h.norm(dim=-1, keepdim=True))


def test_a_map_not_finite_at_random_points_gets_a_note_not_a_crash():
    """The polynomial search samples random θ; where the fields are not finite there it says so."""
    torch.manual_seed(0)
    model = NormalizedByHand().to(F64)
    x = torch.randn(24, 4, dtype=F64)
    assert bool(torch.isfinite(model(x)).all())
    report = tc.analyze(model, x)
    assert report.polynomial_note.startswith("not searched: the gradient fields are not finite"), report.polynomial_note
    assert report.lie_laws > report.tracked_rank
