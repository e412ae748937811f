"""Branches into several layers: unit j of a producer feeds consumer layers C_1..C_m, each
through pass ops only, so rescaling unit j by λ and input column j of every C_b by 1/λ
keeps the network, and ‖w_in,j‖² + b_j² − k·Σ_b ‖w_out^(b),j‖² is conserved by gradient flow.
A branch with an arm that ends anywhere else stays skipped, with a reason naming that arm."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_conslaw import ConservationMonitor, analyze
from torch_conslaw.accounting import Accountant
from torch_conslaw.cli import main
from torch_conslaw.lawgroups import MatrixLaws, build_groups, rearrangement_plan
from torch_conslaw.structure import find_structure

from fsdp_helpers import history_lists, run_on_two_ranks, train_monitored, unsharded_reference

F64 = torch.float64
Norm = getattr(nn, "RMSNorm", None) or nn.LayerNorm  # RMSNorm since torch 2.4


class TwoHeads(nn.Module):
    """Linear → ReLU → {Linear a, Linear b}, the heads concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.a = nn.Linear(6, 2)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        return torch.cat([self.a(h), self.b(F.dropout(h, 0.0, self.training))], dim=-1)


class SummedHeads(TwoHeads):
    """The same branch, the two heads (both 6 → 3) summed at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        return self.a(h) + self.b(h)


class LlamaBlock(nn.Module):
    """Pre-norm attention (q/k/v by hand) and a SwiGLU MLP, each with a residual add."""

    def __init__(self, d: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.d = d
        self.embed = nn.Linear(3, d)
        self.attn_norm = Norm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.LayerNorm(d)  # with β: the bias term of the law matters too
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        h = self.attn_norm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d), dim=-1)
        x = x + self.o_proj(att @ v)
        h = self.mlp_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.head(x)


class UntraceableLlama(LlamaBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return super().forward(x)


ATTN = "attn_norm→q_proj+k_proj+v_proj"
MLP = "mlp_norm→gate_proj+up_proj"
# the laws the op graph adds on LlamaBlock when an example input is given
GRAPH = ("q_proj q·k k_proj [block 0: q units 0.., k units 0..]", "v_proj→o_proj[0..5]", "up_proj→down_proj")
# name → (producer, consumers, degree): the branch pairs of each model
EXPECTED = {
    "two-heads": (TwoHeads, (8, 4), {"fc→a+b": ("fc", ("a", "b"))}),
    "summed-heads": (SummedHeads, (8, 4), {"fc→a+b": ("fc", ("a", "b"))}),
    "llama": (LlamaBlock, (4, 5, 3), {ATTN: ("attn_norm", ("q_proj", "k_proj", "v_proj")),
                                      MLP: ("mlp_norm", ("gate_proj", "up_proj"))}),
}


def _make(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = cls().double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # γ away from 1 and β away from 0: every term of the law matters
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, Norm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model


def _law_by_hand(model: nn.Module, producer: str, consumers: tuple[str, ...]) -> torch.Tensor:
    prod = model.get_submodule(producer)
    values = []
    for j in range(prod.weight.shape[0]):
        w_in = prod.weight[j]
        total = (w_in * w_in).sum()
        if getattr(prod, "bias", None) is not None:
            total = total + prod.bias[j] ** 2
        for c in consumers:
            col = model.get_submodule(c).weight[:, j]
            total = total - (col * col).sum()  # ReLU: degree k = 1
        values.append(total)
    return torch.stack(values).detach()


def _rescaled(model: nn.Module, producer: str, consumers: tuple[str, ...], lam: torch.Tensor,
              skip: str | None = None) -> nn.Module:
    """Unit j of ``producer`` (row and bias) × λ_j, column j of every consumer ÷ λ_j
    (except ``skip``, to show the check can fail)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        prod = m.get_submodule(producer)
        prod.weight.mul_(lam.view(-1, *([1] * (prod.weight.dim() - 1))))
        if getattr(prod, "bias", None) is not None:
            prod.bias.mul_(lam)
        for c in consumers:
            if c != skip:
                m.get_submodule(c).weight.div_(lam)
    return m


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_branch_pairs_are_found_and_the_law_equals_a_by_hand_loop(case):
    cls, shape, expected = EXPECTED[case]
    model = _make(cls)
    s = find_structure(model)
    branches = {p.name: p for p in s.pairs if p.branch}
    assert sorted(branches) == sorted(expected)
    monitor = ConservationMonitor(model, every=1, recording="sync")
    params = dict(model.named_parameters())
    for name, (producer, consumers) in expected.items():
        pair = branches[name]
        assert pair.producer == producer and pair.consumers == consumers
        assert pair.consumer == "+".join(consumers) and pair.kind == "unit" and pair.degree == 1.0
        assert [n for n, _ in pair.outgoing] == [f"{c}.weight" for c in consumers]
        assert pair.consumer_positions == (1,) * len(consumers)
        by_hand = _law_by_hand(model, producer, consumers)
        torch.testing.assert_close(monitor.initial[name], by_hand, rtol=0, atol=1e-13)
        (group,) = [g for g in build_groups(s.pairs) if g.name == name]
        torch.testing.assert_close(group.values(params), by_hand, rtol=0, atol=1e-13)
        torch.testing.assert_close(group.bilinear(params, params), by_hand, rtol=0, atol=1e-13)
        # the Accountant's strided fast path agrees with the loop
        torch.testing.assert_close(Accountant([group]).values(params)[name], by_hand, rtol=0, atol=1e-13)
        for qualified, fn in pair.incoming + pair.outgoing:
            assert rearrangement_plan(fn, tuple(params[qualified].shape), pair.units) is not None
        # scale: ‖w_in‖² + b² + Σ‖w_out‖², bounding |h|
        plus = _law_by_hand(model, producer, ()) * 2 - by_hand
        torch.testing.assert_close(group.scale(params), plus, rtol=0, atol=1e-13)
        assert bool((group.scale(params) >= by_hand.abs() - 1e-13).all())


def test_llama_block_skips_every_other_pair_with_a_reason():
    s = find_structure(_make(LlamaBlock))
    assert sorted(p.name for p in s.pairs) == sorted([ATTN, MLP])
    reasons = " | ".join(map(str, s.skipped))
    # the embedding's output is read by the norm and the residual add: a skip connection
    assert "the output of embed is used by 2 ops (attn_norm, add)" in reasons
    assert "the arm through add does not end in a layer: add is an addition" in reasons
    assert "between q_proj and o_proj: matmul" in reasons and "after o_proj: add" in reasons
    assert "between gate_proj and down_proj: mul" in reasons and "between down_proj and head: add" in reasons
    assert len(s.skipped) == 8


def _data(model: nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=F64)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=gen, dtype=F64)
    return x, y


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_sgd_conserves_the_branch_laws_exactly_at_first_order(case):
    cls, shape, expected = EXPECTED[case]
    model = _make(cls)
    x, y = _data(model, shape)
    monitor = ConservationMonitor(model, every=1, recording="sync")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor.attach(opt)
    for _ in range(15):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    rows = {r["name"]: r for r in monitor.summary()}
    for name in expected:
        row = rows[name]
        assert row["expected_conserved"]
        assert row["max_rel_first_order"] <= 1e-12, row  # exact split: only rounding noise
        assert row["max_rel_second_order"] > 0 and row["last_rel_drift"] > 1e-9
    # control: momentum breaks the laws, and the first-order part shows it
    model = _make(cls)
    monitor = ConservationMonitor(model, every=1, recording="sync")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    monitor.attach(opt)
    for _ in range(15):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    rows = {r["name"]: r for r in monitor.summary()}
    assert all(rows[name]["max_rel_first_order"] > 1e-6 for name in expected)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_rescaling_unit_j_and_every_consumer_column_leaves_the_output_unchanged(case):
    cls, shape, expected = EXPECTED[case]
    model = _make(cls)
    x, _ = _data(model, shape)
    with torch.no_grad():
        ref = model(x)
        for producer, consumers in expected.values():
            n = model.get_submodule(producer).weight.shape[0]
            lam = 0.3 + 2.7 * torch.rand(n, generator=torch.Generator().manual_seed(9), dtype=F64)
            out = _rescaled(model, producer, consumers, lam)(x)
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item())
            for c in consumers:  # leaving any one consumer out changes the output: the check can fail
                wrong = _rescaled(model, producer, consumers, lam, skip=c)(x)
                assert (wrong - ref).abs().max() > 1e-6 * ref.abs().max(), (producer, c)


def test_monitor_never_changes_training_bitwise_on_the_llama_block():
    def train(with_monitor: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        model = LlamaBlock()
        x, y = torch.randn(4, 5, 3), torch.randn(4, 5, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if with_monitor:
            monitor = ConservationMonitor(model, x, split=True, every=1, recording="sync").attach(opt)
            # with the example input the op graph adds q·k, V/O and the SwiGLU up → down laws
            assert {g.name for g in monitor.groups} == {ATTN, MLP} | set(GRAPH)
        for _ in range(6):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        if with_monitor:
            # the law groups, then the identity groups of SGD with momentum (recurrences)
            names = [s["name"] for s in monitor.summary()]
            assert names[: len(monitor.groups)] == [g.name for g in monitor.groups]
            assert len(names) == 2 + len(GRAPH) + len(monitor.identity_groups)
        return [t.detach().clone() for t in model.state_dict().values()], torch.rand(3)

    (a, rng_a), (b, rng_b) = train(False), train(True)
    assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(rng_a, rng_b)


def test_hooks_fallback_finds_the_same_branch_pairs():
    model = _make(UntraceableLlama)
    x = torch.randn(4, 5, 3, dtype=F64)
    assert find_structure(model).method == "none"
    s = find_structure(model, x)
    ref = find_structure(_make(LlamaBlock), x)
    assert s.method == "hooks"
    key = lambda st: sorted((p.name, p.kind, p.units, p.consumers, tuple(n for n, _ in p.outgoing)) for p in st.pairs)
    assert key(s) == key(ref) and {p.name for p in s.pairs} == {ATTN, MLP} | set(GRAPH)
    monitor = ConservationMonitor(model, x, every=1, recording="sync")
    torch.testing.assert_close(
        monitor.initial[ATTN], _law_by_hand(model, "attn_norm", ("q_proj", "k_proj", "v_proj")), rtol=0, atol=1e-13
    )
    heads = find_structure(TwoHeads(), torch.randn(2, 4))  # traceable, hooks not needed: same answer
    assert [p.name for p in heads.pairs] == ["fc→a+b"]


class ResidualArm(nn.Module):
    """fc → ReLU → {a, the residual add}: one arm is a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        return self.out(h + self.a(h))


class OutputArm(nn.Module):
    """fc → ReLU → {a, the model output}."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.a = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc(x))
        return self.a(h), h


class ActivationArm(TwoHeads):
    """An activation after the split: fc → ReLU → {a, ReLU → b}."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        return torch.cat([self.a(h), self.b(torch.relu(h))], dim=-1)


class NormArm(nn.Module):
    """fc → ReLU → {a, LayerNorm}: a normalization consumes one arm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.a = nn.Linear(6, 2)
        self.ln = nn.LayerNorm(6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        return self.a(h) * self.b(self.ln(h))


class SameLayerTwice(nn.Module):
    """fc → ReLU → {a, dropout → a}: one layer reached through two arms."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.a = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        return self.a(h) * self.a(F.dropout(h, 0.1, self.training))


class SlicedArm(TwoHeads):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        return torch.cat([self.a(h), self.b(h[..., :5])], dim=-1)


class FrozenArm(TwoHeads):
    def __init__(self) -> None:
        super().__init__()
        self.b.weight.requires_grad_(False)


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (ResidualArm, "the output of fc (after relu) is used by 2 ops (a, add): a branch or skip connection, "
                      "so no law crosses it — the arm through add does not end in a layer: add is an addition"),
        (OutputArm, "the output of fc (after relu) is used by 2 ops (a, output): a branch or skip connection, "
                    "so no law crosses it — one arm goes to the model output, not to a layer"),
        (ActivationArm, "the arm through relu has an activation after the split"),
        (NormArm, "the output of fc (after relu) feeds 2 layers (a, ln); the arm to ln breaks it: "
                  "between fc and ln: ln (LayerNorm) renormalizes the units"),
        (SameLayerTwice, "a reads it through 2 arms (one layer reached several times, not several layers)"),
        (SlicedArm, "the arm through getitem does not end in a layer"),
        (FrozenArm, "b.weight is frozen (requires_grad=False): the fc→a+b law does not hold"),
    ],
)
def test_a_branch_with_an_arm_that_breaks_it_stays_skipped_with_a_reason_naming_it(cls, expected):
    s = find_structure(cls())
    assert not any(p.producer == "fc" for p in s.pairs)
    reasons = [str(k) for k in s.skipped if k.producer == "fc"]
    assert len(reasons) == 1 and expected in reasons[0], reasons


def test_an_arm_with_the_wrong_axis_is_named():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv1d(2, 3, 1)
            self.a = nn.Conv1d(3, 2, 1)
            self.b = nn.Linear(5, 2)  # reads the length axis, not the channels

        def forward(self, x):
            h = F.relu(self.c(x))
            return self.a(h).sum() + self.b(h).sum()

    reasons = [str(k) for k in find_structure(Net()).skipped if k.producer == "c"]
    assert len(reasons) == 1
    assert reasons[0].startswith("the output of c (after relu) feeds 2 layers (a, b); the arm to b breaks it: b (Linear) reads axis 'last'")


def test_conv_branch_with_flatten_gives_each_consumer_its_own_positions():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(2, 3, 3, padding=1)
            self.a = nn.Conv2d(3, 2, 1)
            self.fc = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            h = F.relu(self.c(x))
            return self.a(h).flatten(1) @ torch.ones(2 * 16, 2, dtype=x.dtype) + self.fc(h.flatten(1))

    torch.manual_seed(0)
    model = Net().double()
    (pair,) = [p for p in find_structure(model).pairs if p.producer == "c"]
    assert (pair.name, pair.kind, pair.consumer_positions, pair.positions) == ("c→a+fc", "channel", (1, 16), 16)
    params = dict(model.named_parameters())
    (group,) = [g for g in build_groups([pair])]
    by_hand = torch.stack([
        model.c.weight[j].square().sum() + model.c.bias[j] ** 2 - model.a.weight[:, j].square().sum()
        - model.fc.weight[:, 16 * j:16 * (j + 1)].square().sum()
        for j in range(3)
    ]).detach()
    torch.testing.assert_close(group.values(params), by_hand, rtol=0, atol=1e-13)
    torch.testing.assert_close(Accountant([group]).values(params)["c→a+fc"], by_hand, rtol=0, atol=1e-13)


def test_linear_hidden_layer_feeding_several_layers_gives_the_summed_matrix_law():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(3, 5)
            self.keep = nn.Identity()

        def forward(self, x):
            h = self.fc(x)
            return torch.cat([self.a(h), self.b(self.keep(h))], dim=-1)

    torch.manual_seed(0)
    model = Net().double()
    (pair,) = find_structure(model).pairs
    assert (pair.name, pair.kind) == ("fc→a+b", "matrix")
    (group,) = build_groups([pair])
    assert isinstance(group, MatrixLaws) and group.count == 6
    w_b = torch.cat([model.fc.weight, model.fc.bias[:, None]], 1)
    q = w_b @ w_b.T - model.a.weight.T @ model.a.weight - model.b.weight.T @ model.b.weight
    i, j = torch.triu_indices(3, 3)
    torch.testing.assert_close(group.values(dict(model.named_parameters())), q[i, j].detach(), rtol=0, atol=1e-13)
    # the matrix law: W → A W, b → A b, every consumer V → V A⁻¹ keeps the network
    x, y = _data(model, (8, 4))
    a_mat = torch.eye(3, dtype=F64) + 0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.fc.weight.copy_(a_mat @ m.fc.weight)
        m.fc.bias.copy_(a_mat @ m.fc.bias)
        for c in (m.a, m.b):
            c.weight.copy_(c.weight @ torch.linalg.inv(a_mat))
        torch.testing.assert_close(m(x), model(x), rtol=1e-12, atol=1e-12)
    monitor = ConservationMonitor(model, every=1, recording="sync")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor.attach(opt)
    for _ in range(10):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    (row,) = monitor.summary()
    assert row["expected_conserved"] and row["max_rel_first_order"] <= 1e-12, row


def test_summary_analyze_and_inspect_handle_branch_pairs(tmp_path, capsys):
    model = _make(LlamaBlock)
    s = find_structure(model)
    text = str(s)
    assert f"{ATTN}: 6 unit group(s) through [nothing], degree 1, 3 consuming layers" in text
    report = analyze(model)  # must not crash; the Lie count covers plain chains only
    assert report.tracked_laws == report.tracked_rank == 12
    assert report.lie_laws is None and report.complete is None and report.lie_note
    heads = analyze(_make(TwoHeads))
    assert heads.lie_laws is None and "feeds several layers" in heads.lie_note
    path = tmp_path / "block.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from test_branch_consumers import LlamaBlock\n\n"
        "def make_model():\n"
        "    return LlamaBlock()\n"
    )
    assert main(["inspect", f"{path}:make_model", "--input-shape", "2,5,3", "--analyze", "--max-lie-parameters", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{ATTN}: 6 unit group(s)" in out and f"{MLP}: 6 unit group(s)" in out
    # the example input of inspect lets the op graph add q·k (21), V/O (21) and up → down (10)
    assert "law groups: 5 (64 laws)" in out


# ------------------------------------------------------------------------------------------
# FSDP2: a branch group is read like a single consumer (sums of local rows, one all-reduce)
# ------------------------------------------------------------------------------------------

def _fsdp_train(mesh=None) -> ConservationMonitor:
    torch.manual_seed(4)
    return train_monitored(
        LlamaBlock(), mesh, lambda gen: (torch.randn(4, 5, 3, generator=gen), torch.randn(4, 5, 2, generator=gen))
    )


def _fsdp_summary(monitor: ConservationMonitor) -> dict:
    # exact check of the sharded evaluation: the all-reduced local rows give the law of the
    # gathered parameters
    full = {n: p.full_tensor().detach() for n, p in monitor.model.named_parameters()}
    history = monitor.history()
    gathered_error = max(
        float((g.values(full) - torch.as_tensor(history[f"{g.name}/values"][-1])).abs().max() / g.scale(full).max())
        for g in build_groups(find_structure(monitor.model).pairs)
    )
    return {
        "groups": [g.name for g in monitor.groups],
        "gathered_error": gathered_error,
        "history": history_lists(monitor),
    }


def test_fsdp2_sharded_branch_laws_equal_an_unsharded_run(tmp_path):
    import numpy as np

    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 not in this torch")
    status = run_on_two_ranks(str(tmp_path), "branch", _fsdp_train, _fsdp_summary)
    assert status[0] == status[1]  # every rank gets the same all-reduced values
    ref = unsharded_reference(_fsdp_train)
    assert status[0]["groups"] == [g.name for g in ref.groups] == [ATTN, MLP]
    assert status[0]["gathered_error"] <= 1e-14
    expected, got = history_lists(ref), status[0]["history"]
    assert sorted(got) == sorted(expected)
    for key, value in sorted(expected.items()):
        if key == "step":
            assert got[key] == value
            continue
        scale = np.abs(np.asarray(expected[key.split("|")[0] + "|values"])).max()
        # the float32 training path of FSDP differs from the unsharded one in the last bits of
        # the MLP gradients (≈ 5e-12 of the laws here); the exact check is the worker's own
        np.testing.assert_allclose(got[key], value, rtol=1e-9, atol=1e-10 * scale, err_msg=key)
        if key.endswith("first_order"):  # momentum: a real first-order part, compared too
            assert np.abs(np.asarray(value)[1:]).max() > 1e-8 * scale
