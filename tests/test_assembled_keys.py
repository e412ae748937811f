"""Keys assembled from two layers, and tensors filled in place.

DeepSeek's multi-head latent attention builds each key from two layers: ``k_nope`` from
``kv_b_proj`` (per head) and a rotated ``k_rot`` from ``kv_a_proj_with_mqa`` (one for all heads),
written into a fresh buffer (``k = x.new_empty(...); k[..., :d].copy_(k_nope); k[..., d:].copy_(k_rot)``).
The score product is then a sum over the two parts, and each part has its own q·k laws. The
in-place fill is followed as what it computes. Checked with torch.func, against the same model
written with ``torch.cat``, and against the Lie-algebra count."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc
from tests.graph_helpers import law_residuals

F64 = torch.float64


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LatentAttention(nn.Module):
    """Multi-head latent attention (2 heads), its key assembled by ``how``: "cat",
    "copy" (new_empty + slice copy_, as DeepSeek-V3) or "setitem" (zeros + k[..., :d] = ...)."""

    def __init__(self, how: str, d: int = 6, heads: int = 2, nope: int = 2, rot: int = 2, rank: int = 3, v: int = 2) -> None:
        super().__init__()
        self.how, self.h, self.nope, self.rot, self.v = how, heads, nope, rot, v
        self.q_proj = nn.Linear(d, heads * (nope + rot), bias=False)
        self.kv_a = nn.Linear(d, rank + rot, bias=False)
        self.kv_norm = nn.RMSNorm(rank, eps=1e-6)
        self.kv_b = nn.Linear(rank, heads * (nope + v), bias=False)
        self.o_proj = nn.Linear(heads * v, d, bias=False)
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        angle = torch.arange(t, dtype=x.dtype)[:, None] * torch.tensor([0.7], dtype=x.dtype)
        cos, sin = angle.cos(), angle.sin()
        q = self.q_proj(x).view(n, t, self.h, -1).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rot], -1)
        q = torch.cat([q_nope, _rotate(q_rot, cos, sin)], -1)
        latent, k_rot = self.kv_a(x).split([self.rank, self.rot], -1)
        k_rot = _rotate(k_rot.view(n, 1, t, self.rot), cos, sin).expand(n, self.h, t, self.rot)
        kv = self.kv_b(self.kv_norm(latent)).view(n, t, self.h, -1).transpose(1, 2)
        k_nope, values = kv.split([self.nope, self.v], -1)
        if self.how == "cat":
            k = torch.cat([k_nope, k_rot], -1)
        elif self.how == "copy":
            k = kv.new_empty(n, self.h, t, self.nope + self.rot)
            k[..., : self.nope].copy_(k_nope)
            k[..., self.nope:].copy_(k_rot)
        else:
            k = torch.zeros(n, self.h, t, self.nope + self.rot, dtype=x.dtype)
            k[..., : self.nope] = k_nope
            k[..., self.nope:] = k_rot
        probs = F.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.o_proj((probs @ values).transpose(1, 2).reshape(n, t, -1))


def _output(out: torch.Tensor) -> torch.Tensor:
    return out


def _model(how: str) -> nn.Module:
    torch.manual_seed(0)
    return LatentAttention(how).to(F64)


def _input(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, 6, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _groups(model: nn.Module, x: torch.Tensor) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tc.ConservationMonitor(model, x).groups


def test_a_key_from_two_layers_pairs_each_part_with_the_query():
    model, x = _model("cat"), _input()
    scores = {g.name: g.count for g in _groups(model, x) if "q·k" in g.name}
    # per head, the unrotated part mixes freely (a 2 × 2 matrix law: 3 entries); the rotated
    # plane, shared by both heads' queries through one key, one law: Σ_h ‖q_rot,h‖² − ‖k_rot‖²
    assert sorted(scores.values()) == [1, 3, 3]
    assert sum("q_proj q·k kv_b" in n for n in scores) == 2 and sum("q_proj q·k kv_a" in n for n in scores) == 1
    for group in _groups(model, x):
        assert law_residuals(model, x, [group], _output) < 1e-12, group.name


@pytest.mark.parametrize("how", ["copy", "setitem"])
def test_a_key_filled_in_place_has_the_laws_of_the_concatenated_one(how):
    x = _input()
    reference = {(g.name, g.count) for g in _groups(_model("cat"), x)}
    assert sum("q·k" in name for name, _ in reference) == 3
    model = _model(how)
    torch.testing.assert_close(model(x), _model("cat")(x), rtol=0, atol=0)
    groups = _groups(model, x)
    assert {(g.name, g.count) for g in groups} == reference
    for group in groups:
        assert law_residuals(model, x, [group], _output) < 1e-12, group.name


def test_latent_attention_laws_are_complete():
    model, x = _model("copy"), _input()
    report = tc.analyze(model, x)
    assert report.complete is True and report.tracked_rank == report.lie_laws, str(report)


class Overwritten(nn.Module):
    """h = a x; h[..., 0] = 0.5 (unit 0 replaced by a constant); out = b relu(h)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h[..., 0] = 0.5
        return self.b(torch.relu(h))


def test_a_unit_overwritten_by_a_constant_pairs_no_more():
    torch.manual_seed(0)
    model, x = Overwritten().to(F64), torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    groups = [g for g in _groups(model, x) if g.name.startswith("a→")]
    # units 1 and 2 keep ‖a_u‖² + b_u² − ‖b[:, u]‖²; unit 0 no longer reaches b through a, so
    # scaling its row would not be undone by b's column 0 (which reads the constant 0.5)
    assert [g.count for g in groups] == [2]
    assert law_residuals(model, x, [groups[0]], _output) < 1e-12
