"""Counts of models that torch.func.vmap cannot batch (a data-dependent dispatch, a branch on θ):
the count evaluates them one row at a time, says so, and finds the same laws as a batchable
formulation of the same function and as the closed form."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torch_conslaw as tc

F64 = torch.float64


class TinyMoE(nn.Module):
    """Top-1 routing to ReLU experts: by ``torch.nonzero`` dispatch (as Hugging Face MoE blocks
    do) or by a dense mask (the same function, batchable)."""

    def __init__(self, dispatch: str, d: int = 3, hidden: int = 3, experts: int = 2) -> None:
        super().__init__()
        self.dispatch = dispatch
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2)) for _ in range(experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1)
        if self.dispatch == "dense":
            return sum((choice == e).unsqueeze(-1).to(x.dtype) * expert(x) for e, expert in enumerate(self.experts))
        out = x.new_zeros(x.shape[0], 2)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(choice == e).squeeze(-1)
            out = out.index_add(0, rows, expert(x[rows]))
        return out


class BranchOnTheta(nn.Module):
    """A ReLU MLP whose forward branches on a value of θ (``if``: data-dependent control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h) if self.b.weight.abs().sum() > 0 else -self.b(h)


def _count(model: nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tc.count_laws(model, x)
    return result.n_laws, [str(w.message) for w in caught if "vmap cannot batch" in str(w.message)]


def test_a_router_dispatching_with_nonzero_is_counted_one_row_at_a_time():
    torch.manual_seed(3)  # both experts reached, every hidden unit active on some of its inputs, not all
    sparse = TinyMoE("nonzero").to(F64)
    dense = TinyMoE("dense").to(F64)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(256, 3, dtype=F64, generator=torch.Generator().manual_seed(1))  # the count is stable from 128 on
    assert torch.equal(sparse(x), dense(x))  # the same function
    n_sparse, said = _count(sparse, x)
    n_dense, said_dense = _count(dense, x)
    # closed form: argmax routing is locally constant, so all 8 router entries are laws (no
    # gradient reaches them); one rescaling law per hidden ReLU unit of each expert (2 × 3)
    assert n_sparse == n_dense == 8 + 6
    assert len(said) == 1 and "aten::nonzero" in said[0] and "one parameter point and one cotangent at a time" in said[0]
    assert said_dense == []


def test_a_branch_on_theta_is_counted_like_the_plain_network():
    torch.manual_seed(0)
    x = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    n, said = _count(BranchOnTheta().to(F64), x)
    assert n == 4  # one law per hidden ReLU unit, as for the same MLP without the branch
    assert len(said) == 1 and "data-dependent control flow" in said[0]


def test_random_ops_are_still_refused_not_looped():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) * (1 + 0.1 * torch.rand(()))

    with pytest.raises(NotImplementedError, match="draws random numbers"):
        tc.count_laws(Noisy().to(F64).eval(), torch.randn(16, 3, dtype=F64), theta="random")


class Accumulated(nn.Module):
    """A ReLU MLP whose output is accumulated into a tensor made inside the forward, in place
    (``out = torch.zeros(...); out += f(x)``: vmap cannot write a batched value into it) or not."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 2, dtype=x.dtype)
        if self.in_place:
            out += self.b(torch.relu(self.a(x)))
            return out
        return out + self.b(torch.relu(self.a(x)))


def test_an_in_place_accumulation_is_counted_one_row_at_a_time():
    x = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    counts = []
    for in_place in (True, False):
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counts.append(tc.count_laws(Accumulated(in_place).to(F64), x, theta="random").n_laws)
        assert any("one parameter point and one cotangent at a time" in str(w.message) for w in caught) == in_place
    assert counts == [4, 4]  # one law per hidden ReLU unit
