"""Mixture-of-experts layers that store their experts in 3-D parameters (``W[e]``, as Qwen3-MoE,
OLMoE, Mixtral and GraniteMoE do): expert e is ``down[e] · σ(up[e] · x)`` on the tokens routed
to it, so scaling row j of ``up[e]`` by λ and column j of ``down[e]`` by λ^(−k) changes
nothing, whatever the routing: ‖up[e][j]‖² − k‖down[e][:, j]‖² per unit. A law whose units
reach the experts from outside (the layer before the router) needs every expert's columns: it
is formed when the example input reaches every expert, and refused when it reaches only some."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_conslaw import ConservationMonitor

F64 = torch.float64
D, H, E = 4, 6, 3


class MoE(nn.Module):
    """inp → top-1 router → experts (ReLU MLPs in two 3-D parameters) → head."""

    def __init__(self, tensor_index: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(5, D)
        self.router = nn.Linear(D, E, bias=False)
        self.up = nn.Parameter(0.5 * torch.randn(E, H, D))
        self.down = nn.Parameter(0.5 * torch.randn(E, D, H))
        self.tensor_index = tensor_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        probs = torch.softmax(self.router(h), -1)
        top = probs.argmax(-1)
        out = torch.zeros_like(h)
        hit = torch.unique(top) if self.tensor_index else range(E)
        for e in hit:  # a 0-dim tensor index (as Hugging Face loops over the experts hit) or an int
            rows = (top == e).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            y = F.linear(torch.relu(F.linear(h[rows], self.up[e])), self.down[e])
            out = out.index_add(0, rows, y * probs[rows, e].unsqueeze(-1))
        return out


def make(tensor_index: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return MoE(tensor_index).double()


X = torch.randn(12, 5, generator=torch.Generator().manual_seed(1), dtype=F64)


def routed(model: nn.Module, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return sorted(set(model.router(model.inp(x)).argmax(-1).tolist()))


def expert_groups(monitor: ConservationMonitor) -> dict[int, object]:
    return {int(g.name.split("[")[1].split("]")[0]): g for g in monitor.groups if g.name.startswith("up[")}


@pytest.mark.parametrize("tensor_index", [True, False])
def test_every_expert_the_input_reaches_gets_its_unit_laws(tensor_index):
    model = make(tensor_index)
    monitor = ConservationMonitor(model, X)
    found = expert_groups(monitor)
    assert sorted(found) == routed(model, X) and len(found) >= 2
    up, down = model.up.detach(), model.down.detach()
    for e, group in found.items():
        assert group.name == f"up[{e}]→down[{e}]" and group.count == H
        torch.testing.assert_close(group.values(dict(model.named_parameters())),
                                   up[e].square().sum(1) - down[e].square().sum(0), rtol=0, atol=1e-14)
    # X reaches every expert: the law of inp's units runs over the router and all three experts
    assert routed(model, X) == list(range(E))
    (whole,) = [g for g in monitor.groups if g.producer == "inp"]
    assert all(f"up[{e}]" in whole.name for e in range(E))


def test_the_expert_laws_hold_at_any_input_and_the_refused_one_does_not():
    """torch.func at an input routed differently: ∇h · ∂fᵀu = 0 for an expert's law, while the
    law of inp's units over the router and the experts the example input reached (what an
    op-graph rule would form from it) is not orthogonal there."""
    model = make()
    with torch.no_grad():
        top = model.router(model.inp(X)).argmax(-1)
    few = X[top != top[-1]]  # an example input that does not reach one expert
    seen = routed(model, few)
    monitor = ConservationMonitor(model, few)
    assert sorted(expert_groups(monitor)) == seen and any("reach experts" in str(s) for s in monitor.skipped)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    other = torch.randn(64, 5, generator=torch.Generator().manual_seed(9), dtype=F64)
    assert set(routed(model, other)) - set(seen)  # routed to the expert the example input missed
    _, vjp = torch.func.vjp(lambda p: torch.func.functional_call(model, p, (other,)), params)
    e = seen[0]

    def expert_law(p):
        return p["up"][e].square().sum(1) - p["down"][e].square().sum(0)

    def partial_law(p):  # inp's rows against the router's and the seen experts' columns only
        cols = p["router.weight"].square().sum(0) + sum(p["up"][k].square().sum(0) for k in seen)
        return p["inp.weight"].square().sum(1) + p["inp.bias"].square() - cols

    def whole_law(p):  # the same over every expert: what the monitor tracks when all are reached
        cols = p["router.weight"].square().sum(0) + p["up"].square().sum((0, 1))
        return p["inp.weight"].square().sum(1) + p["inp.bias"].square() - cols

    gen = torch.Generator().manual_seed(3)
    worst = {"expert": 0.0, "partial": 0.0, "whole": 0.0}
    for _ in range(3):
        (g,) = vjp(torch.randn(other.shape[0], D, generator=gen, dtype=F64))
        for name, law in (("expert", expert_law), ("partial", partial_law), ("whole", whole_law)):
            jac = torch.func.jacrev(law)(params)
            for row in range(next(iter(jac.values())).shape[0]):
                dot = sum((jac[n][row] * g[n]).sum() for n in jac)
                scale = torch.sqrt(sum((jac[n][row] ** 2).sum() for n in jac) * sum((g[n] ** 2).sum() for n in jac))
                worst[name] = max(worst[name], float(dot.abs() / scale.clamp_min(1e-300)))
    assert worst["expert"] < 1e-12 and worst["whole"] < 1e-12
    assert worst["partial"] > 1e-4


def test_training_keeps_the_expert_laws_to_rounding():
    model = make().float()
    monitor = ConservationMonitor(model, X.float(), every=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor.attach(opt)
    target = torch.randn(12, D, generator=torch.Generator().manual_seed(4))
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(model(X.float()), target).backward()
        opt.step()
    rows = [r for r in monitor.summary() if r["name"].startswith("up[")]
    assert rows and all(r["max_rel_first_order"] < 1e-6 and r["recorded_steps"] == 5 for r in rows)


def test_a_weight_read_whole_and_by_slices_gets_no_expert_law():
    class Mixed(MoE):
        def forward(self, x):
            return super().forward(x) + 0.0 * self.up.sum()  # W read whole as well

    torch.manual_seed(0)
    model = Mixed(True).double()
    monitor = ConservationMonitor(model, X)
    assert not expert_groups(monitor)
    assert any("read whole as well as by expert slices" in str(s) for s in monitor.skipped), monitor.skipped


def test_hf_qwen3_moe_tracks_the_laws_of_the_experts_it_routes_to():
    tf = pytest.importorskip("transformers")
    config = tf.Qwen3MoeConfig(hidden_size=8, intermediate_size=16, moe_intermediate_size=8, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=16,
                               max_position_embeddings=16, num_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(config).double().eval()
    ids = {"input_ids": torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))}
    monitor = ConservationMonitor(model, ids)
    experts = [g for g in monitor.groups if g.name.startswith("layers.0.mlp.experts.gate_up_proj[")]
    assert experts and all(g.count == 8 and "experts.down_proj[" in g.name for g in experts)
    if len(experts) == config.num_experts:  # every expert reached: the norm's gain pairs with all of them
        (gain,) = [g for g in monitor.groups if g.producer == "layers.0.post_attention_layernorm"]
        assert gain.count == 8 and all(f"gate_up_proj[{e}]" in gain.name for e in range(config.num_experts))
