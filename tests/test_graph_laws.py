"""Laws found from the op graph on real architectures: tiny Hugging Face models built from
configs (no downloads) and hand-written blocks. For every model, the laws tracked equal an
independent by-hand count from the config, every law passes ⟨∇h, ∂_θ⟨u, f⟩⟩ ≈ 0 (float64,
torch.func, relative ≤ 1e-10) and has an SGD first-order part ≤ 1e-12."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_conslaw import ConservationMonitor
from torch_conslaw.lawgroups import build_groups
from torch_conslaw.laws.families.rescaling import Rows
from torch_conslaw.structure import Pair, find_graph_laws, find_structure

from graph_helpers import law_residuals, sgd_first_order
from graph_models import bert, build, distilbert, gpt2, llama, resnet18, t5, tri, vgg11_bn, vit

pytest.importorskip("transformers")

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny float64 matmuls: one thread avoids oversubscription on a loaded machine."""
    yield


FAST = [(gpt2, "eager"), (gpt2, "sdpa"), (llama, "eager"), (llama, "sdpa"), (bert, "sdpa")]
SLOW = [(bert, "eager"), (distilbert, "eager"), (distilbert, "sdpa"), (vit, "eager"), (vit, "sdpa"),
        (t5, "eager"), (t5, "sdpa"), (resnet18, "-"), (vgg11_bn, "-")]


def _check(factory, impl):
    model, example, pick, expected = build(factory, impl)
    pairs = find_structure(model, example).pairs
    groups = build_groups(pairs)
    assert sum(g.count for g in groups) == expected
    assert law_residuals(model, example, groups, pick) <= 1e-10
    assert sgd_first_order(model, example, groups, pick) <= 1e-12


@pytest.mark.parametrize("factory,impl", FAST, ids=[f"{f.__name__}-{i}" for f, i in FAST])
def test_hugging_face_models_every_exact_law_found_and_verified(factory, impl):
    _check(factory, impl)


@pytest.mark.slow
@pytest.mark.parametrize("factory,impl", SLOW, ids=[f"{f.__name__}-{i}" for f, i in SLOW])
def test_more_hugging_face_models(factory, impl):
    _check(factory, impl)


def test_gpt2_tied_lm_head_is_skipped_with_its_reason_and_conv1d_reads_columns():
    model, example, _, _ = build(gpt2, "eager")
    pairs, skipped = find_graph_laws(model, example)
    assert any("lm_head.weight is shared with transformer.wte.weight" in str(s) for s in skipped)
    ln = next(p for p in pairs if p.producer == "transformer.h.0.ln_1")
    assert ln.consumers == ("transformer.h.0.attn.c_attn",) and ln.units == 32
    # gelu_new runs as ops: x + 0.044715 x³ adds units of degrees 1 and 3, which ends c_fc's law
    assert any("after transformer.h.0.mlp.c_fc" in str(s) and "different homogeneity degrees" in str(s) for s in skipped)


def _head_law(model, layer: int, q_head: int, k_head: int) -> Pair:
    """The per-head q·k matrix law, as an (incorrect) claim under grouped or rotary attention."""
    attn = f"model.layers.{layer}.self_attn"
    q = Rows(torch.arange(8 * q_head, 8 * q_head + 8))
    k = Rows(torch.arange(8 * k_head, 8 * k_head + 8))
    return Pair(attn, attn, (), "matrix", 1.0, 8, 1, ((f"{attn}.q_proj.weight", q),),
                ((f"{attn}.k_proj.weight", k),), label="per-head q·k")


def test_per_head_law_is_false_under_rope_and_gqa_and_the_check_catches_it():
    model, example, pick, _ = build(llama, "eager")
    wrong = build_groups([_head_law(model, 0, 0, 0)])
    assert law_residuals(model, example, wrong, pick) > 1e-6  # true laws: ~1e-17
    pairs, _ = find_graph_laws(model, example)
    rope = [p for p in pairs if "q·k" in p.name and p.producer == "model.layers.0.self_attn.q_proj"]
    # one unit law per K/V group over its d_h / 2 rotated planes, each summed over the group's queries
    assert [(p.kind, p.units, len(p.incoming), len(p.outgoing)) for p in rope] == [("unit", 4, 2, 1)] * 2


class InterleavedRope(nn.Module):
    """Rotary embedding on adjacent pairs (2i, 2i + 1) — GPT-J style — one head group per K/V."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def rot(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.arange(x.shape[-2], dtype=x.dtype).unsqueeze(-1)
        ang = t * torch.arange(1, self.dh // 2 + 1, dtype=x.dtype)
        cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return x * cos + torch.stack((-x2, x1), dim=-1).flatten(-2) * sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        split = lambda y: y.view(b, n, self.h, self.dh).transpose(1, 2)
        q, k, v = self.rot(split(self.q(x))), self.rot(split(self.k(x))), split(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def test_interleaved_rope_pairs_are_read_from_the_ops():
    torch.manual_seed(0)
    model = InterleavedRope().double()
    x = torch.randn(2, 5, 8, dtype=F64)
    pairs, _ = find_graph_laws(model, x)
    qk = [p for p in pairs if "q·k" in p.name]
    assert [p.units for p in qk] == [2, 2]  # d_h / 2 planes per head
    planes = qk[0].incoming[0][1].idx.tolist()
    assert planes == [[0, 1], [2, 3]]  # adjacent coordinates, with the bias as the second reader
    groups = build_groups(pairs)
    assert sum(g.count for g in groups) == 2 * 2 + 2 * tri(4)  # planes + V/O blocks (q bias included)
    assert law_residuals(model, x, groups, lambda y: y) <= 1e-10


class Gated(nn.Module):
    """out = down(σ(gate x) ⊙ up x): up row i ↔ down column i whatever σ; the gate too if σ is ReLU."""

    def __init__(self, act) -> None:
        super().__init__()
        self.act = act
        self.gate, self.up, self.down = nn.Linear(5, 7), nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("act,laws", [(nn.SiLU(), {"up"}), (nn.GELU(), {"up"}), (nn.ReLU(), {"up", "gate"})])
def test_gated_products_keep_the_up_law_whatever_the_gate(act, laws):
    torch.manual_seed(0)
    model = Gated(act).double()
    x = torch.randn(6, 5, dtype=F64)
    s = find_structure(model, x)
    assert {p.producer for p in s.pairs} == laws
    assert all(p.units == 7 and p.consumers == ("down",) for p in s.pairs)
    groups = build_groups(s.pairs)
    assert law_residuals(model, x, groups, lambda y: y) <= 1e-10
    assert sgd_first_order(model, x, groups, lambda y: y) <= 1e-12
    if act.__class__ is nn.SiLU:
        assert any("silu" in str(k) for k in s.skipped)


def test_monitor_on_gpt2_keeps_training_bitwise_and_reports_first_order_zero():
    def train(with_monitor: bool):
        torch.manual_seed(0)
        model, example, _, expected = build(gpt2, "eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = ConservationMonitor(model, example, every=1, recording="sync").attach(opt) if with_monitor else None
        for _ in range(3):
            opt.zero_grad()
            model(**example, labels=example["input_ids"]).loss.backward()
            opt.step()
        return model, monitor, expected

    (a, _, _), (b, monitor, expected) = train(False), train(True)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    rows = monitor.summary()
    assert sum(r["count"] for r in rows if r["kind"] != "linear") == expected
    # in train mode the key biases (n_layer × n_embd) and no centering (dropout before ln_f)
    assert sum(r["count"] for r in rows if r["kind"] == "linear") == 2 * 32
    assert max(r["max_rel_first_order"] for r in rows) <= 1e-12


class _LayerScale(nn.Module):
    """x + γ ⊙ fc2(relu(fc1(x))) (LayerScale of CaiT / ConvNeXt / DINOv2), then a head;
    ``residual=False``: the gated branch is the output."""

    def __init__(self, residual: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 4)
        self.head = nn.Linear(4, 2) if residual else None
        self.gamma = nn.Parameter(torch.full((4,), 0.1) + 0.05 * torch.arange(4.0))

    def forward(self, x):
        branch = self.gamma * self.fc2(F.relu(self.fc1(x)))
        return branch if self.head is None else self.head(x + branch)


@pytest.mark.parametrize("residual", [True, False])
def test_a_per_feature_gate_consumes_the_units_of_the_layer_before_it(residual):
    """γ ⊙ h with a trainable γ of one entry per feature: scaling unit i of fc2 by λ and γ_i by
    1/λ changes nothing, before a residual addition too: ‖fc2_i‖² + b_i² − γ_i² per unit."""
    import torch_conslaw as tc

    torch.manual_seed(0)
    model = _LayerScale(residual).double()
    x = torch.randn(3, 5, 4, dtype=F64)
    groups = {g.name: g for g in ConservationMonitor(model, x, every=1).groups}
    assert groups["fc2→gamma"].count == 4 and groups["fc1→fc2"].count == 6
    assert law_residuals(model, x, list(groups.values()), lambda y: y) <= 1e-10
    assert sgd_first_order(model, x, list(groups.values()), lambda y: y) <= 1e-12
    report = tc.analyze(model, x, theta="random")
    assert report.complete is True and report.tracked_rank == report.lie_laws == 10


def test_a_frozen_gate_is_a_constant_factor_and_the_law_crosses_it():
    torch.manual_seed(0)
    model = nn.Sequential()  # fc → γ ⊙ · → ReLU → out, with γ frozen
    fc, out = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    gamma = nn.Parameter(torch.rand(4, dtype=F64) + 0.5, requires_grad=False)

    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out, self.gamma = fc, out, gamma

        def forward(self, x):
            return self.out(F.relu(self.fc(x) * self.gamma))

    model = Frozen()
    x = torch.randn(8, 3, dtype=F64)
    names = [g.name for g in ConservationMonitor(model, x, every=1).groups]
    assert names == ["fc→out"]


class _ReZero(nn.Module):
    """x + α · fc2(relu(fc1(x))) with a trainable scalar α (ReZero), then a head; ``leak``: the
    output of fc2 is also added to the result directly (so α alone cannot undo its rescaling)."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 2)
        self.alpha = nn.Parameter(torch.tensor(0.3))
        self.leak = leak

    def forward(self, x):
        h = self.fc2(F.relu(self.fc1(x)))
        y = x + self.alpha * h
        return self.head(y + h if self.leak else y)


def test_a_scalar_gate_gives_one_law_for_the_whole_layer():
    """α · h with a trainable scalar α: scaling every unit of fc2 by λ and α by 1/λ changes
    nothing, so ‖W_fc2‖² + ‖b_fc2‖² − α² is conserved, before a residual addition too."""
    import torch_conslaw as tc

    torch.manual_seed(0)
    model = _ReZero().double()
    x = torch.randn(3, 5, 4, dtype=F64)
    groups = {g.name: g for g in ConservationMonitor(model, x, every=1).groups}
    assert groups["fc2→alpha (scalar gate)"].count == 1 and groups["fc1→fc2"].count == 6
    assert law_residuals(model, x, list(groups.values()), lambda y: y) <= 1e-10
    assert sgd_first_order(model, x, list(groups.values()), lambda y: y) <= 1e-12
    params = dict(model.named_parameters())  # independent: the law by hand
    by_hand = params["fc2.weight"].square().sum() + params["fc2.bias"].square().sum() - params["alpha"].square()
    torch.testing.assert_close(groups["fc2→alpha (scalar gate)"].values(params), by_hand.reshape(1))
    report = tc.analyze(model, x, theta="random")
    assert report.complete is True and report.tracked_rank == report.lie_laws == 7


def test_a_scalar_gate_that_part_of_the_output_bypasses_gives_no_law():
    torch.manual_seed(0)
    model = _ReZero(leak=True).double()
    monitor = ConservationMonitor(model, torch.randn(3, 5, 4, dtype=F64), every=1)
    assert not [g for g in monitor.groups if "scalar gate" in g.name]
    assert any("before the scalar gate alpha" in str(s) for s in monitor.skipped)


class _ChannelGate(nn.Module):
    """conv → γ.view(1, C, 1, 1) ⊙ · → ReLU → conv: a per-channel gate reached through a view."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.gamma = nn.Parameter(torch.tensor([0.5, 1.0, 1.5]))

    def forward(self, x):
        return self.b(F.relu(self.a(x) * self.gamma.view(1, -1, 1, 1)))


def test_a_per_channel_gate_through_a_view_consumes_and_produces_channels():
    import torch_conslaw as tc

    torch.manual_seed(0)
    model = _ChannelGate().double()
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    groups = {g.name: g for g in ConservationMonitor(model, x, every=1).groups}
    assert {n: g.count for n, g in groups.items()} == {"a→gamma": 3, "gamma→b": 3}
    assert law_residuals(model, x, list(groups.values()), lambda y: y) <= 1e-10
    report = tc.analyze(model, x, theta="random")
    assert report.complete is True and report.tracked_rank == report.lie_laws == 6
