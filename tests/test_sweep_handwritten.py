"""Hand-written models found by experiments/handwritten_sweep.py (results/handwritten_sweep.md):
parametrized weights (weight_norm, spectral_norm), ... Each law is checked independently with
torch.func gradients, and through the public API (analyze, ConservationMonitor)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import torch_conslaw as tc
from torch_conslaw.completeness import random_inputs_like

F64 = torch.float64


def _loss_grads(model, x, seed=0):
    """∇_θ of a random quadratic loss on the model's outputs, by torch.func (not the library)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = model(x).detach()
    target = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))

    def loss(p):
        return ((functional_call(model, p, (x,)) - target) ** 2).sum()

    return params, grad(loss)(params)


def _sgd_first_order(model, x, steps=10, lr=1e-3):
    mon = tc.ConservationMonitor(model, x, every=1, recording="sync")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon.attach(opt)
    target = torch.randn(model(x).shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    rows = mon.summary()
    return mon, max(r["max_rel_first_order"] for r in rows if r["expected_conserved"])


def _weight_norm_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2)).to(F64)


def test_weight_norm_producer_laws_are_tracked_and_complete():
    """W = g v/‖v‖ (dim 0) → ReLU → Linear: per unit j, ‖v_j‖² (the model does not see v_j's
    scale) and g_j² + b_j² − ‖W2[:, j]‖² (rescaling unit j through g_j): 8 laws, the whole
    count. Before: 0 tracked ("0.weight is not a parameter of the model")."""
    model = _weight_norm_mlp()
    x = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    params, g = _loss_grads(model, x)
    G, V = "0.parametrizations.weight.original0", "0.parametrizations.weight.original1"
    # independent check of both laws on the loss gradient (torch.func)
    assert (params[V] * g[V]).sum(1).abs().max() < 1e-12 * g[V].norm() * params[V].norm()
    unit = params[G][:, 0] * g[G][:, 0] + params["0.bias"] * g["0.bias"] - (params["2.weight"] * g["2.weight"]).sum(0)
    assert unit.abs().max() < 1e-12 * max(g[G].norm(), g["2.weight"].norm())
    report = tc.analyze(model, x, theta="random", max_seconds=60)
    assert report.tracked_rank == 8 and report.lie_laws == 8 and report.complete
    mon, first = _sgd_first_order(model, x)
    assert sorted((g.kind, g.count) for g in mon.groups) == [("scale", 4), ("unit", 4)]
    assert first < 1e-12


def test_spectral_norm_original_keeps_its_norm_in_train_mode():
    """spectral_norm: W = V/σ(V), σ from power-iteration vectors that do not change when V is
    scaled, so ‖V‖² is a law, also in train mode (u, v updated at every forward). No rescaling
    law starts at the layer (a row of V changes σ): the skip says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    model.eval()
    params, g = _loss_grads(model, x)
    V = "0.parametrizations.weight.original"
    assert abs(float((params[V] * g[V]).sum())) < 1e-12 * float(g[V].norm() * params[V].norm())
    model.train()
    mon, first = _sgd_first_order(model, x)
    assert [(g.kind, g.count) for g in mon.groups] == [("scale", 1)]
    assert first < 1e-12
    assert any("spectral" in str(s).lower() and "no rescaling law starts" in str(s) for s in mon.skipped)


def test_weight_norm_consumer_keeps_one_law_for_the_whole_layer():
    """A weight-normed consumer W2 = g v/‖v‖ cannot scale one column alone, but scaling g by
    1/λ scales all of W2: every unit of the producer × λ with g ÷ λ is a symmetry, so
    ‖W1‖² + ‖b1‖² − ‖g‖² is one law for the layer, besides ‖v_i‖² per row: 3 = the count
    (was 2: the consumer was refused). In a spectral-normed consumer no original scales W2:
    refused, with the parametrization named (was 'is not a parameter')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(4, 2))).to(F64)
    x = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    params, g = _loss_grads(model, x)
    G = "2.parametrizations.weight.original0"
    law = (params["0.weight"] * g["0.weight"]).sum() + (params["0.bias"] * g["0.bias"]).sum() - (params[G] * g[G]).sum()
    assert abs(float(law)) < 1e-12 * float(g["0.weight"].norm() * params["0.weight"].norm())
    report = tc.analyze(model, x, theta="random", max_seconds=60)
    assert report.tracked_rank == 3 and report.lie_laws == 3 and report.complete
    mon, first = _sgd_first_order(model, x)
    assert sorted((g.kind, g.count) for g in mon.groups) == [("scale", 2), ("unit", 1)] and first < 1e-12
    spectral = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.utils.parametrizations.spectral_norm(nn.Linear(4, 2))).to(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = tc.ConservationMonitor(spectral, x)
    assert not any(g.kind == "unit" for g in mon.groups)
    assert any("_SpectralNorm" in str(s) and "no rescaling law ends" in str(s) for s in mon.skipped)


class _BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(3, 2, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, a, b):
        return self.out(F.relu(self.bil(a, b)))


def test_bilinear_output_units_are_rescaling_producers():
    """y_k = x1ᵀ A_k x2 + b_k → ReLU → Linear: scaling (A_k, b_k) by λ and out[:, k] by 1/λ
    changes nothing: ‖A_k‖² + b_k² − ‖out[:, k]‖², 4 laws, the whole count (was 0 tracked:
    'no two registered layers'). As a consumer nn.Bilinear is refused with a reason."""
    torch.manual_seed(0)
    model = _BilinearNet().to(F64)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 3, dtype=F64, generator=gen), torch.randn(16, 2, dtype=F64, generator=gen))
    params = {n: p.detach() for n, p in model.named_parameters()}
    target = torch.randn(16, 2, dtype=F64, generator=gen)
    g = grad(lambda p: ((functional_call(model, p, x) - target) ** 2).sum())(params)
    law = (params["bil.weight"] * g["bil.weight"]).flatten(1).sum(1) + params["bil.bias"] * g["bil.bias"] \
        - (params["out.weight"] * g["out.weight"]).sum(0)
    assert law.abs().max() < 1e-12 * g["bil.weight"].norm()
    report = tc.analyze(model, x, theta="random", max_seconds=60)
    assert report.tracked_rank == 4 and report.lie_laws == 4 and report.complete
    mon = tc.ConservationMonitor(model, x, every=1, recording="sync")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon.attach(opt)
    for _ in range(10):
        opt.zero_grad()
        F.mse_loss(model(*x), target).backward()
        opt.step()
    assert [(r["kind"], r["count"]) for r in mon.summary()] == [("unit", 4)]
    assert mon.summary()[0]["max_rel_first_order"] < 1e-12


def test_random_theta_is_redrawn_while_a_relu_unit_fires_on_few_inputs():
    """A 3-4-5-2 ReLU MLP without biases has one law per hidden unit, 9 (the path-lifting count
    agrees). At the first random θ a second-layer unit fired on ~4 % of the inputs: joint
    patterns were so rare that count_laws on 64 inputs found 12 (analyze: 11, 'stable'),
    laws of those inputs only. θ is now redrawn while a unit is active on < 15 % (or > 85 %)
    of the inputs: 9 = 9."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 5, bias=False), nn.ReLU(),
                          nn.Linear(5, 2, bias=False)).to(F64)
    x = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert tc.mlp_trace_dimension([3, 4, 5, 2], ["relu", "relu"], bias=False, seed=0).n_laws == 9  # independent count
    inputs = random_inputs_like(x, 64, seed=1)
    res = tc.count_laws(model, inputs, theta="random")
    assert res.n_laws == 9 and res.stable
    theta = res.theta  # the draw used: every hidden unit fires on a fair share of the inputs
    W1, W2 = theta[:12].view(4, 3), theta[12:32].view(5, 4)
    h1 = torch.relu(inputs @ W1.T)
    shares = torch.cat([(h1 > 0).double().mean(0), (h1 @ W2.T > 0).double().mean(0)])
    assert shares.min() >= 0.15 and shares.max() <= 0.85
    report = tc.analyze(model, x, theta="random", max_seconds=60)
    assert report.tracked_rank == 9 and report.lie_laws == 9 and report.complete


def test_multihead_attention_output_projection_is_a_producer():
    """nn.MultiheadAttention(batch_first) → Linear: the attention output is out_proj's rows
    applied to the heads, a linear hidden layer with the head: [W_O b_O][W_O b_O]ᵀ − W_headᵀW_head
    (10 laws) besides the per-head laws (was 16 of 26 tracked; now complete)."""

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])

    torch.manual_seed(0)
    model = MHA().to(F64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 4, dtype=F64, generator=gen)
    params = {n: p.detach() for n, p in model.named_parameters()}
    target = torch.randn(3, 3, 2, dtype=F64, generator=gen)
    g = grad(lambda p: ((functional_call(model, p, (x,)) - target) ** 2).sum())(params)
    Wo = torch.cat([params["attn.out_proj.weight"], params["attn.out_proj.bias"][:, None]], 1)
    Go = torch.cat([g["attn.out_proj.weight"], g["attn.out_proj.bias"][:, None]], 1)
    law_grad = Go @ Wo.T - params["head.weight"].T @ g["head.weight"]  # d/dt of the matrix law, halved
    assert (law_grad + law_grad.T).abs().max() < 1e-12 * Go.norm() * Wo.norm()
    report = tc.analyze(model, x, theta="random", max_seconds=60)
    assert report.lie_laws == 26 and report.tracked_rank == 26 and report.complete



def test_recount_at_a_larger_eps_keeps_the_relu_units_after_a_norm_firing():
    """Linear → LayerNorm(4, eps=1e-6) → ReLU → Linear: 4 unit laws (γ_c, β_c → consumer) and
    4 centering laws (column sums and Σ b of the Linear before the norm) = 8 (+ 1 scale law at
    eps = 0). The model's tiny eps blurs the rank gaps, so the count is retaken at a larger eps;
    at eps = 1 the normalized values shrink and unit 0 of γ·n + β never fires, adding laws of
    these inputs only (11). The recount now uses the largest eps of 1, 0.1, 0.01 at which the
    units fire as at the model's eps: 8 (was 11 from the eps = 1 recount)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, eps=1e-6), nn.ReLU(), nn.Linear(4, 2)).to(F64)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.9, 1.1, 1.0]))
        model[1].bias.copy_(torch.tensor([-0.6, 0.2, -0.3, 0.5]))
    x = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # independent: what the units do at each eps
        fires = {e: (F.layer_norm(model[0](x), (4,), model[1].weight, model[1].bias, e)[:, 0] > 0).any().item()
                 for e in (1e-6, 0.01, 1.0)}
    assert fires == {1e-6: True, 0.01: True, 1.0: False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tc.count_laws(model, x)
        at_one = tc.count_laws(model, x, eps=1.0).n_laws
    assert res.n_laws == 8 and "1.0" not in res.eps_counts and res.n_laws_eps0 == 9
    assert at_one == 11  # the data-dependent count the recount used to report


class _TwoArmBilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa, self.fb = nn.Linear(3, 4), nn.Linear(2, 3)
        self.bil = nn.Bilinear(4, 3, 2)
        self.out = nn.Linear(2, 2)

    def forward(self, a, b):
        return self.out(F.relu(self.bil(F.relu(self.fa(a)), F.relu(self.fb(b)))))


def test_bilinear_consumer_reads_each_input_through_its_own_weight_slice():
    """Units of fa reach nn.Bilinear on input 1 (read by A[:, i, :]), units of fb on input 2
    (read by A[:, :, j]); the Bilinear's own outputs feed a Linear: 4 + 3 + 2 = 9 laws, the
    whole count (was 2: 'a unit of one input is read by a slice ... not supported')."""
    torch.manual_seed(0)
    model = _TwoArmBilinear().to(F64)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(32, 3, dtype=F64, generator=gen), torch.randn(32, 2, dtype=F64, generator=gen))
    params = {n: p.detach() for n, p in model.named_parameters()}
    target = torch.randn(32, 2, dtype=F64, generator=gen)
    g = grad(lambda p: ((functional_call(model, p, x) - target) ** 2).sum())(params)
    A, gA = params["bil.weight"], g["bil.weight"]
    arm_b = (params["fb.weight"] * g["fb.weight"]).sum(1) + params["fb.bias"] * g["fb.bias"] - (A * gA).sum((0, 1))
    arm_a = (params["fa.weight"] * g["fa.weight"]).sum(1) + params["fa.bias"] * g["fa.bias"] - (A * gA).sum((0, 2))
    assert max(arm_a.abs().max(), arm_b.abs().max()) < 1e-12 * gA.norm() * A.norm()
    report = tc.analyze(model, x, theta="random", max_seconds=60)
    assert report.tracked_rank == 9 and report.lie_laws == 9 and report.complete


def test_no_scale_law_is_claimed_from_a_degenerate_initial_original():
    """orthogonal() (matrix_exp of the skew part of X's strict lower triangle, with its
    trivialization) starts from an X whose lower triangle is zero, so scaling rows of X leaves
    the weight unchanged *there*; at any other X it does not (torch.func below), so ‖X_j‖² is
    no law and the monitor must not track it (was: 4 'scale' laws claimed). The 10 entries of X
    the map never reads (diagonal and upper triangle) have zero gradient: linear laws, the whole
    count (was 0 of 10 tracked)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.orthogonal(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    X = "0.parametrizations.weight.original"
    start = model.get_parameter(X).detach().clone()
    assert float(start.tril(-1).abs().max()) == 0.0
    with torch.no_grad():
        model.get_parameter(X).normal_(generator=torch.Generator().manual_seed(2))
    params, g = _loss_grads(model, x)
    assert (params[X] * g[X]).sum(1).abs().max() > 1e-3 * g[X].norm() * params[X].norm()  # not a law at X ≠ 0
    with torch.no_grad():
        model.get_parameter(X).copy_(start)
    assert float(g[X].triu().abs().max()) == 0.0  # the entries its map never reads: linear laws
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = tc.ConservationMonitor(model, x)
    assert not [g for g in mon.groups if g.kind == "scale"]
    assert [(g.kind, g.count) for g in mon.groups] == [("linear", 10)]  # diagonal + upper triangle of X
    report = tc.analyze(model, x, theta="random", max_seconds=60)
    assert report.tracked_rank == 10 and report.lie_laws == 10 and report.complete


def test_torch_transformer_layers_track_each_law_once():
    """``nn.TransformerEncoderLayer`` / ``DecoderLayer``: the op-graph centering rule reached
    ``self_attn.out_proj → norm1`` along two paths (the registered layer and the attention's
    functional call of it) and proposed the same group twice, so the monitor tracked 99 law
    functions for a rank of 90. Each group is now tracked once: the number of law functions
    equals the rank of their gradients (analyze's tracked rank, computed from the laws'
    gradients), and for the encoder layer the Lie count (90 = 90, run by hand, 12 s)."""
    torch.manual_seed(0)
    layers = [
        (nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double(), torch.randn(2, 5, 8, dtype=F64)),
        (
            nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double(),
            (torch.randn(2, 5, 8, dtype=F64), torch.randn(2, 4, 8, dtype=F64)),
        ),
    ]
    for model, x in layers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = tc.ConservationMonitor(model, x).groups
            report = tc.analyze(model, x, lie=False, theta="random")
        names = [g.name for g in groups]
        assert len(names) == len(set(names)), names
        assert sum(g.count for g in groups if not getattr(g, "approximate", False)) == report.tracked_rank


class _EmbedMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, ids):
        return self.fc2(F.relu(self.fc1(self.emb(ids).mean(1))))


def test_an_embedding_averaged_over_tokens_keeps_its_matrix_law_with_the_next_layer():
    """Embedding → mean over tokens → Linear: the lookup is one_hot(ids) @ E and the mean is
    linear, so E → E A, fc1 → fc1 A⁻¹ leaves the function unchanged: EᵀE − W₁ᵀW₁ (3·4/2 = 6
    laws) with the 4 unit laws of fc1 → fc2. The op graph now reads a lookup as a producer
    (before: 4 of 10 tracked, the module-level finder stopped at the mean). Checked by analyze's
    count (10 = 10) and independently: the matrix law's gradient is orthogonal to a random
    loss's gradient (torch.func)."""
    torch.manual_seed(0)
    model = _EmbedMean().double()
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 2], [1, 3, 5, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = {g.name: (g.kind, g.count) for g in tc.ConservationMonitor(model, ids).groups}
        report = tc.analyze(model, ids, theta="random", max_seconds=60)
    assert groups == {"fc1→fc2": ("unit", 4), "emb→fc1[0..2]": ("matrix", 6)}
    assert (report.tracked_rank, report.lie_laws, report.complete) == (10, 10, True)
    params, g = _loss_grads(model, ids, seed=1)

    def law(p):
        e, w = p["emb.weight"], p["fc1.weight"]
        return (e.T @ e - w.T @ w)[tuple(torch.triu_indices(3, 3))]

    dh = torch.func.jacrev(law)(params)
    inner = sum((dh[n] * g[n]).flatten(1).sum(1) for n in ("emb.weight", "fc1.weight"))
    assert inner.abs().max() < 1e-12 * (1 + g["emb.weight"].abs().max())


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_an_embedding_bag_is_a_producer(mode):
    """nn.EmbeddingBag → Linear: a sum or mean of E's rows per bag is linear in E (the matrix
    law EᵀE − WᵀW, 6·7/2 = 21, = analyze's count), a max is positively homogeneous per feature
    (one law per feature, 6). Checked independently: each law's gradient is orthogonal to a
    random loss's gradient (torch.func)."""

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.fc = nn.EmbeddingBag(20, 6, mode=mode), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(self.e(x))

    torch.manual_seed(0)
    model = Bag().double()
    ids = torch.randint(0, 20, (30, 4), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = [(g.kind, g.count) for g in tc.ConservationMonitor(model, ids).groups]
    assert groups == ([("matrix", 21)] if mode == "mean" else [("unit", 6)])
    if mode == "mean":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = tc.analyze(model, ids, theta="random", max_seconds=60)
        assert (report.tracked_rank, report.lie_laws, report.complete) == (21, 21, True)
    params, g = _loss_grads(model, ids, seed=1)

    def law(p):
        e, w = p["e.weight"], p["fc.weight"]
        if mode == "mean":
            return (e.T @ e - w.T @ w)[tuple(torch.triu_indices(6, 6))]
        return e.square().sum(0) - w.square().sum(0)

    dh = torch.func.jacrev(law)(params)
    inner = sum((dh[n] * g[n]).flatten(1).sum(1) for n in ("e.weight", "fc.weight"))
    assert inner.abs().max() < 1e-12 * (1 + g["e.weight"].abs().max())
