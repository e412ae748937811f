"""Parameters multiplied together, and scores computed twice.

* p ⊙ q of two trainable parameters read nowhere else (a learned scale times a learned gain):
  p_i → c p_i, q_j → q_j / c where entries meet, so Σ p_i² − Σ q_j² per set of entries that meet;
  read only by their dot product Σ p_i q_i (DiffLlama's λ_q · λ_k), p → M p, q → M⁻ᵀ q for any
  invertible M, so p pᵀ − q qᵀ.
* the same attention scores computed twice (DiffLlama calls attention once per value half):
  a symmetry of the one is a symmetry of the other, so the q·k laws hold.
Checked with torch.func (law_residuals), one SGD step's first-order part, the Lie-algebra count,
and a monitor recording through training."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc
from tests.graph_helpers import law_residuals, quiet_monitor, seeded_randn, sgd_first_order, sgd_mse

F64 = torch.float64


class Scales(nn.Module):
    """tanh(l x) ⊙ (α · g) + exp(λ_q · λ_k): a scalar times a gain, and a dot product."""

    def __init__(self, shared_alpha: bool = False, product_read_twice: bool = False) -> None:
        super().__init__()
        self.shared_alpha, self.twice = shared_alpha, product_read_twice
        self.l = nn.Linear(4, 3)
        self.alpha, self.gain = nn.Parameter(torch.tensor(0.7)), nn.Parameter(torch.randn(3))
        self.lq, self.lk = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.lq * self.lk
        lam = torch.exp(both.sum()) + (both[0] if self.twice else 0.0)
        out = torch.tanh(self.l(x)) * (self.alpha * self.gain) + lam
        return out + self.alpha if self.shared_alpha else out


class TwiceAttention(nn.Module):
    """One head whose scores softmax(q kᵀ) are computed twice, once per half of the values
    (DiffLlama's two attention calls), the halves then concatenated."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        v1, v2 = v.chunk(2, -1)
        out1 = F.softmax(q @ k.transpose(-1, -2), -1) @ v1
        out2 = F.softmax(q @ k.transpose(-1, -2), -1) @ v2
        return self.o(torch.cat([out1, out2], -1))


def _groups(model: nn.Module, x: torch.Tensor) -> dict[str, object]:
    return {g.name: g for g in quiet_monitor(model, x).groups}


def _scales(**kw) -> nn.Module:
    torch.manual_seed(0)
    return Scales(**kw).to(F64)


def test_a_scale_times_a_gain_and_a_dot_product_of_parameters_have_laws():
    model, x = _scales(), seeded_randn(8, 4, seed=1)
    groups = _groups(model, x)
    assert groups["alpha⊙gain"].count == 1  # α² − Σ g_j²: α meets every entry of g
    assert groups["lq·lk"].count == 10 and groups["lq·lk"].kind == "matrix"  # upper triangle of 4 × 4
    p = dict(model.named_parameters())
    by_hand = torch.outer(p["lq"], p["lq"]) - torch.outer(p["lk"], p["lk"])
    iu = torch.triu_indices(4, 4)
    torch.testing.assert_close(groups["lq·lk"].values(p), by_hand[iu[0], iu[1]].detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(groups["alpha⊙gain"].values(p), (p["alpha"] ** 2 - p["gain"].square().sum()).reshape(1).detach(),
                               rtol=0, atol=1e-14)
    chosen = [groups["alpha⊙gain"], groups["lq·lk"]]
    assert law_residuals(model, x, chosen, lambda out: out) < 1e-12
    assert sgd_first_order(model, x, chosen, lambda out: out) < 1e-12


def test_the_count_agrees_that_they_are_all_the_laws():
    model, x = _scales(), seeded_randn(8, 4, seed=1)
    report = tc.analyze(model, x)
    assert report.complete is True and report.tracked_rank == report.lie_laws == 8, str(report)


def test_a_parameter_read_elsewhere_pairs_with_nothing():
    groups = _groups(_scales(shared_alpha=True), seeded_randn(8, 4, seed=1))
    assert "alpha⊙gain" not in groups and "lq·lk" in groups


def test_a_product_read_beyond_its_dot_product_keeps_the_per_entry_laws_only():
    model, x = _scales(product_read_twice=True), seeded_randn(8, 4, seed=1)
    groups = _groups(model, x)
    assert "lq·lk" not in groups and groups["lq⊙lk"].count == 4 and groups["lq⊙lk"].kind == "unit"
    assert law_residuals(model, x, [groups["lq⊙lk"]], lambda out: out) < 1e-12


def test_scores_computed_twice_keep_their_q_k_laws():
    torch.manual_seed(0)
    model, x = TwiceAttention().to(F64), seeded_randn(2, 5, 4, seed=1)
    groups = _groups(model, x)
    scores = [g for name, g in groups.items() if "q·k" in name]
    assert [g.count for g in scores] == [10]  # the 4 × 4 matrix law Q̃ᵀQ̃ − K̃ᵀK̃ (upper triangle)
    assert law_residuals(model, x, scores, lambda out: out) < 1e-12


def test_the_monitor_records_them_through_training():
    model, x = _scales(), seeded_randn(8, 4, seed=1)
    monitor = quiet_monitor(model, x)
    sgd_mse(model, x, seeded_randn(8, 3, seed=2), lr=1e-3, steps=5, monitor=monitor)
    rows = {row["name"]: row for row in monitor.summary()}
    for name in ("alpha⊙gain", "lq·lk"):
        assert rows[name]["recorded_steps"] == 5
        assert rows[name]["max_rel_first_order"] < 1e-12  # the first-order part vanishes: a law
    history = monitor.history()
    p = dict(model.named_parameters())
    torch.testing.assert_close(torch.as_tensor(history["alpha⊙gain/values"][-1]),
                               (p["alpha"] ** 2 - p["gain"].square().sum()).reshape(1).detach(), rtol=0, atol=1e-14)


class TwiceAttentionOnceRectified(nn.Module):
    """softmax(q kᵀ) and softmax(relu(q) kᵀ): the second product keeps per-unit scalings only
    (relu(q M) ≠ relu(q) M), so no matrix law may come from the first."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        out1 = F.softmax(q @ k.transpose(-1, -2), -1) @ v
        out2 = F.softmax(torch.relu(q) @ k.transpose(-1, -2), -1) @ v
        return self.o(out1 + out2)


def test_scores_computed_again_through_a_rectifier_keep_no_matrix_law():
    torch.manual_seed(0)
    model, x = TwiceAttentionOnceRectified().to(F64), seeded_randn(2, 5, 4, seed=1)
    proposed, _ = tc.find_graph_laws(model, x)  # the rules' proposals, before the numerical check
    assert not [p for p in proposed if "q·k" in p.label and p.kind == "matrix"]
    groups = _groups(model, x)
    assert law_residuals(model, x, list(groups.values()), lambda out: out) < 1e-12
