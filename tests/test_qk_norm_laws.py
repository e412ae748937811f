"""Per-head q / k normalizations (Qwen3, EXAONE-4, Gemma-3): an RMSNorm over each head's
coordinates with one gain γ shared by the heads, on the queries and on the keys. Scaling
γ_q[i] by λ and γ_k[i] by 1/λ leaves every score q·k unchanged, so γ_q[i]² − γ_k[i]² is a law
per coordinate; after RoPE, which rotates the planes (i, i + d/2), per plane:
γ_q[i]² + γ_q[i + d/2]² − γ_k[i]² − γ_k[i + d/2]². The q_proj / k_proj units also reach the
score product (through the normalized value) but were stopped at the norm's mean: they take no
part in the pairing, which used to refuse the gains ("a factor of the score product is not
computed by exactly one layer")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc
from torch_conslaw import ConservationMonitor

F64 = torch.float64
HEADS, D = 2, 4


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


class HandRMSNorm(nn.Module):
    """As Hugging Face writes it: x · rsqrt(mean(x²) + eps), then γ ⊙ (the projection's units
    reach the score product through x, stopped at the mean)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class QKNormAttention(nn.Module):
    def __init__(self, rope: bool, hand: bool, width: int = HEADS * D) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width, bias=False) for _ in range(4))
        norm = HandRMSNorm if hand else (lambda d: nn.RMSNorm(d, eps=1e-6))
        self.q_norm, self.k_norm = norm(D), norm(D)
        self.rope = rope
        angles = torch.arange(6).unsqueeze(1) * torch.tensor([1.0, 0.1])  # positions × planes
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1))
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, HEADS, D).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = q * self.cos + rotate_half(q) * self.sin, k * self.cos + rotate_half(k) * self.sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, HEADS * D))


def make(rope: bool, hand: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = QKNormAttention(rope, hand).double()
    with torch.no_grad():
        model.q_norm.weight.uniform_(0.5, 1.5)
        model.k_norm.weight.uniform_(0.5, 1.5)
    return model


X = torch.randn(2, 6, HEADS * D, generator=torch.Generator().manual_seed(1), dtype=F64)


def by_hand(model: nn.Module, rope: bool) -> torch.Tensor:
    q, k = model.q_norm.weight.detach() ** 2, model.k_norm.weight.detach() ** 2
    if rope:  # planes (i, i + D/2)
        q, k = q[: D // 2] + q[D // 2 :], k[: D // 2] + k[D // 2 :]
    return q - k


def qk_group(monitor: ConservationMonitor):
    found = [g for g in monitor.groups if "q_norm" in g.name and "k_norm" in g.name]
    assert len(found) == 1, [g.name for g in monitor.groups]
    return found[0]


@pytest.mark.parametrize("hand", [True, False])
@pytest.mark.parametrize("rope", [False, True])
def test_the_shared_gains_of_per_head_norms_pair_across_the_score_product(rope, hand):
    model = make(rope, hand)
    monitor = ConservationMonitor(model, X)
    group = qk_group(monitor)
    values = group.values(dict(model.named_parameters()))
    expected = by_hand(model, rope)
    assert values.shape == expected.shape == (D // 2 if rope else D,)
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-14)
    report = tc.analyze(model, X, max_lie_parameters=300)
    assert report.complete, report


def test_the_pairing_is_a_law_of_the_model_by_hand():
    """torch.func: ∇h · ∂fᵀu = 0 for the per-plane laws under RoPE, and not for the per-coordinate
    ones (RoPE mixes the two coordinates of a plane)."""
    model = make(rope=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, vjp = torch.func.vjp(lambda p: torch.func.functional_call(model, p, (X,)), params)
    gen = torch.Generator().manual_seed(2)
    planes = lambda p: by_hand_of(p, True)  # noqa: E731
    coords = lambda p: by_hand_of(p, False)  # noqa: E731
    worst = {"planes": 0.0, "coords": 0.0}
    for _ in range(3):
        (g,) = vjp(torch.randn(X.shape, generator=gen, dtype=F64))
        for name, law in (("planes", planes), ("coords", coords)):
            jac = torch.func.jacrev(law)(params)
            for row in range(jac["q_norm.weight"].shape[0]):
                dot = sum((jac[n][row] * g[n]).sum() for n in jac)
                scale = torch.sqrt(sum((jac[n][row] ** 2).sum() for n in jac) * sum((g[n] ** 2).sum() for n in jac))
                worst[name] = max(worst[name], float(dot.abs() / scale))
    assert worst["planes"] < 1e-12
    assert worst["coords"] > 1e-4


def by_hand_of(p: dict, rope: bool) -> torch.Tensor:
    q, k = p["q_norm.weight"] ** 2, p["k_norm.weight"] ** 2
    if rope:
        q, k = q[: D // 2] + q[D // 2 :], k[: D // 2] + k[D // 2 :]
    return q - k


def test_hf_qwen3_and_exaone4_track_their_q_norm_k_norm_laws():
    tf = pytest.importorskip("transformers")
    ids = {"input_ids": torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))}
    common = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=4, vocab_size=16, max_position_embeddings=16)
    for config in (tf.Qwen3Config(**common), tf.Exaone4Config(**common, pad_token_id=0)):
        torch.manual_seed(0)
        model = tf.AutoModel.from_config(config).eval()
        monitor = ConservationMonitor(model, ids)
        found = [g for g in monitor.groups if "q_norm" in g.name and "k_norm" in g.name]
        assert [g.count for g in found] == [2], (type(model).__name__, [g.name for g in monitor.groups])
