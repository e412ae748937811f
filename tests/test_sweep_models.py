"""Models outside the usual test zoo (found by a robustness sweep of the public entry points):
recurrent layers, models without trainable parameters, ops that torch.func cannot batch."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc
from torch_conslaw.lie.elementary import ElementaryOps

F64 = torch.float64


def _outputs(value):
    if isinstance(value, tuple):
        return torch.cat([t.reshape(-1) for v in value for t in _outputs(v)])
    return value.reshape(-1)


RNN_CASES = [
    (cls, bias, layers, bidirectional, batch_first, proj)
    for cls, bias, layers, bidirectional, batch_first, proj in itertools.product(
        (nn.RNN, nn.GRU, nn.LSTM), (True, False), (1, 2), (False, True), (False, True), (0, 2)
    )
    if not (proj and cls is not nn.LSTM)
]


def test_recurrent_layers_run_through_elementary_ops_with_the_native_outputs():
    """Every layout of nn.RNN / nn.GRU / nn.LSTM (layers, directions, batch_first, no bias,
    LSTM projections) and the three cells: the elementary loops equal the fused kernels."""
    torch.manual_seed(0)
    worst = 0.0
    for cls, bias, layers, bidirectional, batch_first, proj in RNN_CASES:
        kw = {"proj_size": proj} if proj else {}
        rnn = cls(3, 4, num_layers=layers, bias=bias, bidirectional=bidirectional, batch_first=batch_first, **kw).to(F64)
        x = torch.randn(2, 5, 3, dtype=F64)
        with ElementaryOps():
            mine = rnn(x)
        worst = max(worst, (_outputs(rnn(x)) - _outputs(mine)).abs().max().item())
    for cls in (nn.RNNCell, nn.GRUCell, nn.LSTMCell):
        cell, x = cls(3, 4).to(F64), torch.randn(5, 3, dtype=F64)
        with ElementaryOps():
            mine = cell(x)
        worst = max(worst, (_outputs(cell(x)) - _outputs(mine)).abs().max().item())
    relu = nn.RNN(3, 4, nonlinearity="relu").to(F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    with ElementaryOps():
        mine = relu(x)
    worst = max(worst, (_outputs(relu(x)) - _outputs(mine)).abs().max().item())
    assert worst < 1e-12


def test_packed_sequences_are_refused_with_a_clear_error_while_counting():
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3, dtype=F64), [5, 3])
    for cls in (nn.GRU, nn.LSTM):
        with ElementaryOps(), pytest.raises(NotImplementedError, match="packed sequences"):
            cls(3, 4).to(F64)(packed)


@pytest.mark.parametrize("cls,gates_summed", [(nn.RNN, 1), (nn.GRU, 2), (nn.LSTM, 4)])
def test_recurrent_layer_counts_exactly_its_summed_bias_laws(cls, gates_summed):
    """A bare recurrent layer outputs its hidden states, so no rescaling is a symmetry; its only
    laws are b_ih − b_hh on the gates where the two biases are added (all gates of the RNN and
    the LSTM, r and z of the GRU, whose n gate multiplies b_hn by r). The law space found is
    exactly that one."""
    torch.manual_seed(0)
    hidden = 4
    rnn = cls(3, hidden, batch_first=True)
    x = torch.randn(24, 5, 3, generator=torch.Generator().manual_seed(1))
    res = tc.count_laws(rnn, x, theta="random")
    laws = gates_summed * hidden
    assert res.n_laws == laws and res.stable
    offsets = {s.name: s.offset for s in res.parameters}
    expected = torch.zeros(res.D, laws, dtype=F64)
    for j in range(laws):
        expected[offsets["bias_ih_l0"] + j, j], expected[offsets["bias_hh_l0"] + j, j] = 1.0, -1.0
    # same subspace: the expected directions lie in the law basis, and the dimensions agree
    inside = res.law_basis @ (res.law_basis.T @ expected)
    assert torch.linalg.norm(inside - expected) <= 1e-8 * torch.linalg.norm(expected)


class _RecurrentClassifier(nn.Module):
    def __init__(self, cls: type[nn.Module]):
        super().__init__()
        self.rnn, self.fc, self.out = cls(4, 6, batch_first=True), nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(F.relu(self.fc(self.rnn(x)[0])))


@pytest.mark.parametrize("cls, summed_gates", [(nn.GRU, 2), (nn.LSTM, 4)])
def test_analyze_counts_a_model_with_a_recurrent_layer(cls, summed_gates):
    torch.manual_seed(0)
    report = tc.analyze(_RecurrentClassifier(cls), torch.randn(2, 5, 4), n_inputs=32)
    assert report.lie_laws is not None, report.lie_note
    # fc → ReLU → out: one law per unit; b_ih − b_hh of every gate whose two biases are only
    # added (GRU: r, z; LSTM: i, f, g, o), 6 units each, verified on the example input
    assert report.lie_laws >= report.tracked_rank == 5 + 6 * summed_gates


def test_an_op_that_vmap_cannot_batch_is_counted_one_row_at_a_time():
    class Unbatchable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return torch.ops.aten.lstm_cell(x, (torch.zeros_like(x[:, :2]), torch.zeros_like(x[:, :2])),
                                            self.fc.weight.repeat(4, 1)[:8, :3], torch.zeros(8, 2, dtype=x.dtype))[0]

    with pytest.warns(UserWarning, match=r"vmap cannot batch the model \(Batching rule not implemented for aten::lstm_cell"):
        result = tc.count_laws(Unbatchable(), torch.randn(32, 3, generator=torch.Generator().manual_seed(0)))
    # every gate reads x·w_j (w_j a row of fc.weight), so h_j = σ(x·w_j) tanh(σ(x·w_j) tanh(x·w_j)):
    # no law among the weight's entries; the bias is never read, each entry a law
    assert (result.D, result.n_laws) == (8, 2)


def test_model_without_trainable_parameters_gets_a_reason_not_a_crash():
    class BuffersOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(3, 4))

        def forward(self, x):
            return x @ self.w.T

    report = tc.analyze(BuffersOnly(), torch.randn(2, 4))
    assert report.num_parameters == 0 and report.lie_laws is None and report.complete is None
    assert "no trainable parameters" in report.lie_note and "no trainable parameters" in str(report)
    frozen = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).requires_grad_(False)
    assert "no trainable parameters" in tc.analyze(frozen, torch.randn(2, 4)).lie_note


@pytest.mark.parametrize("cls,gates_summed", [(nn.RNN, 1), (nn.GRU, 2), (nn.LSTM, 4)])
def test_monitor_tracks_the_summed_recurrent_biases_verified_and_conserved(cls, gates_summed):
    torch.manual_seed(0)
    model = _RecurrentClassifier(cls).to(F64)
    x = torch.randn(3, 5, 4, dtype=F64)
    monitor = tc.ConservationMonitor(model, x, every=1, recording="sync")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    rows = {r["name"]: r for r in monitor.summary()}
    bias = rows["rnn.bias_ih_l0−bias_hh_l0"]
    assert bias["count"] == gates_summed * 6 and bias["kind"] == "linear" and bias["verified"]
    assert bias["expected_conserved"] and bias["max_rel_drift"] <= 1e-12
    assert all(v.passed for v in tc.verify_laws(model, x, monitor))
    # independent: the two biases get the same gradient exactly on the summed gates, not beyond
    model.zero_grad()
    model(x).square().mean().backward()
    g_ih, g_hh = model.rnn.bias_ih_l0.grad, model.rnn.bias_hh_l0.grad
    n = gates_summed * 6
    assert (g_ih[:n] - g_hh[:n]).abs().max() <= 1e-12 * g_ih.abs().max()
    if n < g_ih.numel():
        assert (g_ih[n:] - g_hh[n:]).abs().max() > 1e-6 * g_ih.abs().max()


def test_recurrent_bias_laws_of_every_layer_and_direction_and_refusals():
    model = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    expected = sorted(f"bias_ih_l{k}{s}−bias_hh_l{k}{s}" for k in (0, 1) for s in ("", "_reverse"))
    checks = {v.group: v for v in tc.verify_laws(model, x)}
    assert all(checks[name].passed for name in expected)
    monitor = tc.ConservationMonitor(model, x)
    assert sorted(g.name for g in monitor.groups) == expected
    model.bias_hh_l1.requires_grad_(False)
    monitor = tc.ConservationMonitor(model, x)
    assert "bias_ih_l1−bias_hh_l1" not in [g.name for g in monitor.groups]
    assert any("bias_hh_l1 is frozen" in str(s) for s in monitor.skipped)


class _GroupedExperts(nn.Module):
    """Two experts run by ``torch._grouped_mm`` (as Hugging Face MoE layers do) between two
    ReLU layers; tokens are split between the experts by fixed offsets."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 8, 8) / 3)
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        offs = torch.tensor([x.shape[0] // 2, x.shape[0]], dtype=torch.int32, device=x.device)
        mixed = torch._grouped_mm(x, self.w.to(x.dtype), offs=offs)
        return self.head(F.relu(self.fc(x + mixed)))


def test_grouped_mm_runs_in_float64_and_matches_the_fused_kernel():
    from torch_conslaw.lie.elementary import Float64Ops

    g = torch.Generator().manual_seed(0)
    cases = [  # (mat_a, mat_b, offs): 2-D × 3-D (MoE forward, with ignored tail rows), 3-D × 2-D, 2-D × 2-D, 3-D × 3-D
        (torch.randn(12, 8, generator=g), torch.randn(2, 8, 4, generator=g), [4, 10]),
        (torch.randn(2, 4, 8, generator=g), torch.randn(8, 12, generator=g), [4, 12]),
        (torch.randn(4, 12, generator=g), torch.randn(12, 8, generator=g), [4, 12]),
        (torch.randn(2, 4, 8, generator=g), torch.randn(2, 8, 4, generator=g), None),
    ]
    for a, b, ends in cases:
        offs = None if ends is None else torch.tensor(ends, dtype=torch.int32)
        native = torch._grouped_mm(a, b, offs=offs)
        with Float64Ops():
            mine = torch._grouped_mm(a.double(), b.double(), offs=offs)
        if a.dim() == 2 and b.dim() == 3:  # rows past offs[-1] are unspecified by the kernel
            native, mine = native[: ends[-1]], mine[: ends[-1]]
        assert mine.dtype == F64 and torch.allclose(mine.float(), native, atol=1e-5, rtol=1e-5)


def test_model_with_grouped_mm_experts_gets_its_laws_verified():
    torch.manual_seed(0)
    model, x = _GroupedExperts(), torch.randn(6, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = tc.ConservationMonitor(model, x, every=1, recording="sync")
    assert not any("failed to run" in str(w.message) for w in caught)
    assert monitor.verification_note == ""
    rows = monitor.summary()
    assert [r["name"] for r in rows if r["kind"] == "unit"] == ["fc→head"] and all(r["verified"] for r in rows)
    assert all(v.passed for v in tc.verify_laws(model, x, monitor))


def test_hugging_face_mixture_of_experts_laws_are_verified():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, vocab_size=50, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    ids = {"input_ids": torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))}
    monitor = tc.ConservationMonitor(model, ids, every=1, recording="sync")
    assert monitor.verification_note == ""
    rows = monitor.summary()
    assert rows and all(r["verified"] for r in rows)


class _DropPath(nn.Module):
    """Stochastic depth written by hand (as in timm / Hugging Face Swin): torch.rand in training."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if self.training:
            h = h * (torch.rand(h.shape[0], 1, dtype=h.dtype) > 0.1).to(h.dtype) / 0.9
        return self.fc2(h)


def test_random_ops_in_the_forward_are_a_clear_error_of_the_count_and_a_note_of_analyze():
    torch.manual_seed(0)
    model, x = _DropPath(), torch.randn(16, 3)
    with pytest.raises(NotImplementedError, match=r"draws random numbers .* model\.eval\(\)"):
        tc.count_laws(model, x)
    report = tc.analyze(model, torch.randn(2, 3), theta="random")  # counted on inputs, not as an MLP
    assert report.lie_laws is None and "draws random numbers" in report.lie_note
    assert tc.count_laws(model.eval(), x, theta="random").n_laws == 4  # one per ReLU unit


def test_tracked_rank_of_a_wide_linear_hidden_layer_uses_the_small_gram_matrix(one_torch_thread):
    """A linear hidden layer of u = 224 units (Whisper's classifier projector has 256) gives
    u(u+1)/2 = 25,200 matrix laws on 5u entries: decided on the 1,120 × 1,120 Gram matrix, not a
    25,200 × 25,200 one (5 GB). Closed form: Q = M S Mᵀ with M = [W₁ | b₁ | W₂ᵀ] (u × k, k = 5,
    rank k at generic θ) has tangent space {Y Mᵀ + M Yᵀ} of dimension k·u − k(k−1)/2 = 1110."""
    torch.manual_seed(0)
    report = tc.analyze(nn.Sequential(nn.Linear(2, 224), nn.Linear(224, 2)), lie=False)
    assert report.tracked_laws == 224 * 225 // 2
    assert report.tracked_rank == 5 * 224 - 10 and report.rank_decision.clear


CONV_CASES = {  # model, input, law groups expected: one law per hidden channel
    "grouped-consumer": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=4)),
                         (2, 4, 8, 8), [("0→2", 8)]),
    "depthwise": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 2, 1)),
                  (2, 3, 8, 8), [("0→2", 4), ("2→4", 4)]),
    "conv-transpose": (lambda: nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.ConvTranspose2d(5, 4, 3, stride=2), nn.ReLU(),
                                             nn.ConvTranspose2d(4, 2, 2)), (2, 3, 6, 6), [("0→2", 5), ("2→4", 4)]),
    "grouped-transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ReLU(),
                                                nn.ConvTranspose2d(6, 4, 3, groups=2, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1)),
                          (2, 4, 5, 5), [("0→2", 6), ("2→4", 4)]),
    "transpose-1d": (lambda: nn.Sequential(nn.ConvTranspose1d(2, 3, 3), nn.ReLU(), nn.Conv1d(3, 2, 3)), (2, 2, 6), [("0→2", 3)]),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_grouped_and_transposed_convolutions_carry_verified_channel_laws_and_are_complete(case):
    """Grouped / depthwise convolutions as consumers and ConvTranspose as producer and consumer:
    every channel law passes the numerical check, keeps an SGD first-order part at rounding
    level (float64), and the tracked rank equals count_laws' independent Lie count."""
    build, shape, expected = CONV_CASES[case]
    torch.manual_seed(0)
    model = build().to(F64)
    x = torch.randn(*shape, dtype=F64)
    monitor = tc.ConservationMonitor(model, x, every=1, recording="sync")
    assert [(g.name, g.count) for g in monitor.groups] == expected and not monitor.skipped
    assert all(v.passed and v.residual <= 1e-14 for v in monitor.verification.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor.attach(opt)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert max(r["max_rel_first_order"] for r in monitor.summary()) <= 1e-12
    report = tc.analyze(model, x, theta="random")
    assert report.tracked_rank == report.lie_laws == sum(n for _, n in expected) and report.complete


class _EmbeddingMLP(nn.Module):
    def __init__(self, **embedding_options):
        super().__init__()
        self.emb = nn.Embedding(20, 8, **embedding_options)
        self.fc, self.out = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.out(F.relu(self.fc(self.emb(ids)))).mean(1)


def test_embedding_is_a_producer_its_laws_are_verified_and_complete():
    """nn.Embedding is one_hot(ids) @ E, a Linear layer with weight Eᵀ: followed by a Linear
    layer without activation, EᵀE − WᵀW is a matrix law (8·9/2 = 36 laws); with the ReLU units
    after fc (6 laws) the tracked rank equals the Lie count."""
    torch.manual_seed(0)
    model = _EmbeddingMLP().to(F64)
    ids = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(0))
    monitor = tc.ConservationMonitor(model, ids, every=1, recording="sync")
    assert [(g.name, g.kind, g.count) for g in monitor.groups] == [("emb→fc", "matrix", 36), ("fc→out", "unit", 6)]
    assert all(v.passed and v.residual <= 1e-14 for v in monitor.verification.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor.attach(opt)
    for _ in range(2):
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()
    assert max(r["max_rel_first_order"] for r in monitor.summary()) <= 1e-12
    report = tc.analyze(model, ids)
    assert report.tracked_rank == report.lie_laws == 42 and report.complete


@pytest.mark.parametrize("option,reason", [
    ({"padding_idx": 0}, "padding_idx=0"), ({"max_norm": 1.0}, "max_norm=1.0"), ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
])
def test_embedding_options_that_change_its_gradient_are_refused_with_the_reason(option, reason):
    monitor = tc.ConservationMonitor(_EmbeddingMLP(**option), torch.randint(0, 20, (4, 5)))
    assert "emb→fc" not in [g.name for g in monitor.groups]
    assert any(reason in str(s) and "emb" in str(s) for s in monitor.skipped)
