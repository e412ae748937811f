"""count_laws on any nn.Module: MLPs against the path-lifting calculator, closed forms (convolutions,
attention heads, GELU, residual blocks), an independent dense computation (explicit Jacobian, explicit
second and third derivatives, SVD ranks), and bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import jacfwd, jacrev

import torch_conslaw as tc
from torch_conslaw.lie.kronecker import kronecker_blocks

F64 = torch.float64
SWEEP = Path(
    os.environ.get(
        "TORCH_CONSLAW_SWEEP_ARCHS", Path(__file__).resolve().parents[1].parent / "shared" / "paper_sweep_architectures.json"
    )
)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def mlp(widths: list[int], activation: str, bias: bool) -> nn.Sequential:
    """The paper's convention: biases on hidden layers only."""
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        last = k == len(widths) - 2
        layers.append(nn.Linear(widths[k], widths[k + 1], bias=bias and not last))
        if not last:
            layers.append(nn.ReLU() if activation == "relu" else nn.Identity())
    return nn.Sequential(*layers)


def rich_inputs(widths: list[int], D: int, seed: int = 0) -> torch.Tensor:
    """Enough Gaussian inputs for W_1 to fill its span and for every ReLU pattern to appear."""
    return gaussian(max(256, 32 * D // widths[-1]), widths[0], seed=seed)


def mlp_agrees(arch: dict, seed: int, stable: bool = True) -> tuple[int, int]:
    widths, act, bias = arch["widths"], arch["activation"], arch["bias"]
    x = rich_inputs(widths, arch["D"], seed)
    res = tc.count_laws(mlp(widths, act, bias), x, theta="random", seed=seed, input_sizes=[len(x) // 2, len(x)])
    ref = tc.mlp_trace_dimension(widths, [act] * (len(widths) - 2), bias=bias, output_bias=False, seed=seed)
    assert res.D == ref.D == arch["D"]
    assert res.stable or not stable, res.input_counts
    return res.n_laws, ref.n_laws


# ---------------------------------------------------------------------------------------------
# MLPs against mlp_trace_dimension


@pytest.mark.parametrize(
    "arch",
    [
        {"widths": [4, 3, 5], "activation": "linear", "bias": False, "D": 27},
        {"widths": [3, 4, 2, 4], "activation": "linear", "bias": False, "D": 28},
        {"widths": [3, 4, 5], "activation": "relu", "bias": True, "D": 36},
        {"widths": [4, 5, 3, 2], "activation": "relu", "bias": False, "D": 41},
    ],
)
def test_mlps_agree_with_the_path_lifting_count(arch):
    got, expected = mlp_agrees(arch, seed=1)
    assert got == expected


@pytest.mark.slow
def test_all_100_paper_sweep_mlps_agree_with_the_path_lifting_count():
    if not SWEEP.exists():
        pytest.skip(f"{SWEEP} not found: set TORCH_CONSLAW_SWEEP_ARCHS to paper_sweep_architectures.json")
    archs = json.loads(SWEEP.read_text())
    assert len(archs) == 100
    counts = [(a, *mlp_agrees(a, i, stable=False)) for i, a in enumerate(archs)]
    # data fields are path-lifting fields at the 0/1 gates the inputs realize: never more laws
    assert all(data >= path for _, data, path in counts)
    # equal for every linear net and every ReLU net with one hidden layer; deeper ReLU nets realize
    # too few joint activation patterns on R^n0 and keep data-dependent laws (results/count_sweep.json)
    shallow = [(data, path) for a, data, path in counts if a["activation"] == "linear" or len(a["widths"]) == 3]
    assert len(shallow) == 65 and all(data == path for data, path in shallow)


# ---------------------------------------------------------------------------------------------
# Closed forms


@pytest.mark.parametrize("hidden", [2, 3])
def test_two_layer_relu_conv_net_has_one_law_per_hidden_channel(hidden):
    net = nn.Sequential(nn.Conv2d(2, hidden, 3), nn.ReLU(), nn.Conv2d(hidden, 2, 3, bias=False))
    res = tc.count_laws(net, gaussian(8, 2, 7, 7), theta="random")
    assert res.n_laws == hidden
    assert res.stable and res.warnings == []
    assert res.levels[0] == res.levels[-1], "ReLU: W_1 is already closed under brackets"


class Head(nn.Module):
    """One attention head: softmax(X W_q (X W_k)ᵀ / √d) X W_v W_o, no biases."""

    def __init__(self, d_model: int, d_head: int):
        super().__init__()
        self.q = nn.Linear(d_model, d_head, bias=False)
        self.k = nn.Linear(d_model, d_head, bias=False)
        self.v = nn.Linear(d_model, d_head, bias=False)
        self.o = nn.Linear(d_head, d_model, bias=False)
        self.scale = 1.0 / math.sqrt(d_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1) * self.scale, dim=-1)
        return self.o(scores @ self.v(x))


def head_law_rank(head: Head, theta: torch.Tensor) -> int:
    """Rank at θ of the entries of Q̃ᵀQ̃ − K̃ᵀK̃ and ṼᵀṼ − O Oᵀ (upper triangles), by jacrev + SVD.

    θ is laid out as named_parameters: q.weight (d_h × d), k.weight, v.weight, o.weight (d × d_h).
    With nn.Linear's (out × in) weights, Q̃ = q.weightᵀ, so Q̃ᵀQ̃ = q.weight q.weightᵀ.
    """
    d_h, d = head.q.weight.shape
    n = d_h * d

    def laws(t: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = (t[i * n : (i + 1) * n].reshape(d_h, d) for i in range(3))
        wo = t[3 * n :].reshape(d, d_h)
        iu = torch.triu_indices(d_h, d_h)
        qk = wq @ wq.T - wk @ wk.T
        vo = wv @ wv.T - wo.T @ wo
        return torch.cat([qk[iu[0], iu[1]], vo[iu[0], iu[1]]])

    s = torch.linalg.svdvals(jacrev(laws)(theta))
    return int((s > 1e-9 * s[0]).sum())


@pytest.mark.parametrize("d_model,d_head", [(4, 2), (5, 3)])
def test_attention_head_laws_are_the_rank_of_its_matrix_laws(d_model, d_head):
    head = Head(d_model, d_head)
    res = tc.count_laws(head, gaussian(6, 4, d_model), theta="random")
    assert res.n_laws == head_law_rank(head, res.theta) > 0
    assert res.stable


class TorchMHA(nn.Module):
    """``nn.MultiheadAttention`` self-attention without biases, on its fused SDPA path."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(d_model, heads, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def mha_law_rank(net: TorchMHA, theta: torch.Tensor) -> int:
    """Rank at θ of every head's Q̃ᵀQ̃ − K̃ᵀK̃ and ṼᵀṼ − O Oᵀ entries (in_proj rows, out_proj columns)."""
    d, heads = net.mha.embed_dim, net.mha.num_heads
    d_h = d // heads
    iu = torch.triu_indices(d_h, d_h)

    def laws(t: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = t[: 3 * d * d].reshape(3 * d, d).split(d)
        wo = t[3 * d * d :].reshape(d, d)
        out = []
        for h in range(heads):
            rows = slice(h * d_h, (h + 1) * d_h)
            qk = wq[rows] @ wq[rows].T - wk[rows] @ wk[rows].T
            vo = wv[rows] @ wv[rows].T - wo[:, rows].T @ wo[:, rows]
            out += [qk[iu[0], iu[1]], vo[iu[0], iu[1]]]
        return torch.cat(out)

    s = torch.linalg.svdvals(jacrev(laws)(theta))
    return int((s > 1e-9 * s[0]).sum())


def test_torch_multihead_attention_laws_are_its_heads_matrix_laws():
    net = TorchMHA(4, 2)
    res = tc.count_laws(net, gaussian(8, 3, 4), theta="random")
    assert res.n_laws == mha_law_rank(net, res.theta) == 2 * (3 + 3)


def test_gelu_mlp_has_no_law():
    net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    res = tc.count_laws(net, gaussian(64, 3), theta="random")
    assert res.n_laws == 0


class Residual(nn.Module):
    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def test_residual_relu_block_has_the_laws_of_its_branch():
    branch = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3))
    x = gaussian(128, 3)
    with_skip = tc.count_laws(Residual(branch), x, theta="random")
    without = tc.count_laws(branch, x, theta="random")
    assert with_skip.n_laws == without.n_laws == 5


# ---------------------------------------------------------------------------------------------
# Against an independent dense computation


def dense_count(f, theta: torch.Tensor, draws: int | None = None, seed: int = 0) -> tuple[list[int], int]:
    """Levels dim W_1, W_2, W_3 at θ from the explicit derivatives of the output map ``f`` (flat θ →
    flat outputs): J, H = ∂J, T = ∂H by nested torch.func jacobians, brackets written out by hand:

    X_a = Jᵀa, DX_a = Σ a_o H_o, [X_a, X_b] = DX_b X_a − DX_a X_b,
    D[X_b, X_c] = T(c)·X_b + DX_c DX_b − T(b)·X_c − DX_b DX_c.
    """
    D = theta.numel()
    draws = draws or D + 8
    J = jacrev(f)(theta)  # (m, D)
    H = jacfwd(jacrev(f))(theta)  # (m, D, D)
    T = jacfwd(jacfwd(jacrev(f)))(theta)  # (m, D, D, D)
    g = torch.Generator().manual_seed(seed)
    keys = lambda: torch.randn(J.shape[0], generator=g, dtype=F64)
    X = lambda a: J.T @ a
    DX = lambda a: torch.einsum("o,oij->ij", a, H)

    def rank(cols: list[torch.Tensor]) -> int:
        M = torch.stack([c / c.norm() for c in cols if c.norm() > 0], 1)
        s = torch.linalg.svdvals(M)
        return int((s > 1e-9).sum())

    level1 = [X(keys()) for _ in range(draws)]
    level2, level3 = [], []
    for _ in range(draws):
        a, b, c = keys(), keys(), keys()
        xb, xc = X(b), X(c)
        y = DX(c) @ xb - DX(b) @ xc
        level2.append(DX(b) @ X(a) - DX(a) @ X(b))
        dy = torch.einsum("o,oijk,k->ij", c, T, xb) + DX(c) @ DX(b) - torch.einsum("o,oijk,k->ij", b, T, xc) - DX(b) @ DX(c)
        level3.append(dy @ X(a) - DX(a) @ y)
    levels = [rank(level1), rank(level1 + level2), rank(level1 + level2 + level3)]
    assert levels[1] == levels[2], "the reference needs levels that stabilize by depth 2"
    return levels, D - levels[-1]


def split(theta: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(theta[i : i + n].reshape(s))
        i += n
    return out


def test_attention_with_layernorm_matches_the_dense_count():
    d, d_h = 3, 2

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Head(d, d_h)
            self.norm = nn.LayerNorm(d, eps=0.5)

        def forward(self, x):
            return self.norm(self.head(x))

    x = gaussian(3, 3, d, seed=2)
    res = tc.count_laws(Block(), x, theta="random", input_sizes=[3])
    shapes = [p.shape for p in res.parameters]

    def reference(eps):
        def f(t):
            wq, wk, wv, wo, g, b = split(t, shapes)
            s = torch.softmax((x @ wq.T) @ (x @ wk.T).transpose(-2, -1) / math.sqrt(d_h), -1)
            h = (s @ (x @ wv.T)) @ wo.T
            c = h - h.mean(-1, keepdim=True)
            return (c / torch.sqrt((c * c).mean(-1, keepdim=True) + eps) * g + b).reshape(-1)

        return f

    assert [p.name for p in res.parameters] == ["head.q.weight", "head.k.weight", "head.v.weight", "head.o.weight", "norm.weight", "norm.bias"]
    levels, laws = dense_count(reference(0.5), res.theta)
    assert (res.levels[: len(levels)], res.n_laws) == (levels[: len(res.levels)], laws)
    assert res.n_laws_eps0 == dense_count(reference(0.0), res.theta)[1]


def test_conv_batchnorm_relu_net_matches_the_dense_count():
    net = nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2, eps=0.5), nn.ReLU(), nn.Conv2d(2, 1, 2, bias=False))
    x = gaussian(3, 1, 4, 4, seed=3)
    res = tc.count_laws(net, x, theta="random", input_sizes=[3])
    shapes = [p.shape for p in res.parameters]

    def reference(eps):
        def f(t):
            w1, b1, g, b, w2 = split(t, shapes)
            z = torch.nn.functional.conv2d(x, w1, b1)
            c = z - z.mean((0, 2, 3), keepdim=True)
            z = c / torch.sqrt((c * c).mean((0, 2, 3), keepdim=True) + eps) * g[:, None, None] + b[:, None, None]
            return torch.nn.functional.conv2d(torch.relu(z), w2).reshape(-1)

        return f

    levels, laws = dense_count(reference(0.5), res.theta)
    assert res.n_laws == laws
    # the bias before BatchNorm (2 linear laws) + one rescaling law per BN channel feeding ReLU
    assert laws == 4
    # at eps = 0 the conv filters before BatchNorm are scale invariant: one more law per channel
    assert res.n_laws_eps0 == dense_count(reference(0.0), res.theta)[1] == 6
    assert res.approximate_laws == 2


# ---------------------------------------------------------------------------------------------
# What the result exposes


def test_law_basis_is_orthonormal_and_holds_the_known_unit_laws():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    res = tc.count_laws(net, gaussian(128, 3), theta="random")
    B = res.law_basis
    assert B.shape == (res.D, res.n_laws) == (24, 4)
    assert torch.allclose(B.T @ B, torch.eye(4, dtype=F64), atol=1e-10)
    slot = {p.name: p for p in res.parameters}
    t = res.theta

    def view(name):
        p = slot[name]
        return t[p.offset : p.offset + p.numel].reshape(p.shape)

    for i in range(4):  # ∇(‖W1[i]‖² + b1[i]² − ‖W2[:, i]‖²) lies in span(law_basis)
        grad = torch.zeros_like(t)
        for name, value in (("0.weight", 2 * view("0.weight")[i]), ("0.bias", 2 * view("0.bias")[i : i + 1])):
            p = slot[name]
            rows = torch.arange(p.offset, p.offset + p.numel).reshape(p.shape)
            grad[rows[i] if name == "0.weight" else rows[i : i + 1]] = value
        p = slot["2.weight"]
        grad[torch.arange(p.offset, p.offset + p.numel).reshape(p.shape)[:, i]] = -2 * view("2.weight")[:, i]
        assert (grad - B @ (B.T @ grad)).norm() < 1e-9 * grad.norm()


def test_dead_units_are_reported_and_add_laws():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    torch.nn.init.normal_(net[0].weight, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, -100.0]))  # unit 3 never fires
    with pytest.warns(UserWarning, match="dead"):
        res = tc.count_laws(net, gaussian(128, 3))
    assert res.theta_source == "model"
    assert [(c.units, c.dead, c.always_active) for c in res.constant_units] == [(4, 1, 0)]
    generic = tc.count_laws(net, gaussian(128, 3), theta="random")
    assert generic.theta_source == "random" and generic.constant_units == []
    assert res.n_laws > generic.n_laws == 4


def test_the_model_is_not_changed():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tc.count_laws(net, gaussian(16, 3).float(), theta="random", eps_zero=False)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_inputs_that_do_not_run_through_the_model():
    with pytest.raises(ValueError, match="inputs the model accepts"):
        tc.count_laws(nn.Linear(3, 2), gaussian(8, 5))


def test_non_finite_outputs():
    with pytest.raises(ValueError, match="not finite"):
        tc.count_laws(nn.Linear(3, 2), torch.full((8, 3), float("nan")))


def test_model_without_trainable_parameters():
    net = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        tc.count_laws(net, gaussian(8, 3))
    with pytest.raises(ValueError, match="no trainable parameters"):
        tc.count_laws(nn.ReLU(), gaussian(8, 3))


def test_budget_too_small():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(tc.CountBudgetError, match="raise max_seconds"):
        tc.count_laws(net, gaussian(64, 3), max_seconds=1e-6)
    with pytest.raises(tc.CountBudgetError, match="raise max_memory_gb"):
        tc.count_laws(net, gaussian(64, 3), method="dense", max_memory_gb=1e-9)


def test_bad_arguments_name_what_to_change():
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="theta must be"):
        tc.count_laws(net, gaussian(8, 3), theta="xavier")
    with pytest.raises(ValueError, match="input_sizes"):
        tc.count_laws(net, gaussian(8, 3), input_sizes=[4, 2])
    with pytest.raises(TypeError, match="nn.Module"):
        tc.count_laws(lambda x: x, gaussian(8, 3))


class ResNetBN(nn.Module):
    """conv · BN · ReLU, a residual block (conv · BN · ReLU · conv · BN) + skip, ReLU, conv head."""

    def __init__(self, c: int, classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.branch = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        )
        self.head = nn.Conv2d(c, classes, 3, padding=1, bias=False)

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.branch(h)))


@pytest.mark.slow
def test_matrix_free_complement_agrees_with_the_dense_method_on_a_resnet_with_batchnorm():
    """Per channel: 3 biases before a BatchNorm, the branch's BN → ReLU → conv rescaling and the
    stem's rescaling across the skip (5c exact laws); at eps = 0 the 3 convs before a BatchNorm
    also keep their filter norms (8c). Exactly-zero gradients (the biases before BatchNorm) once
    broke the Jacobi-scaled CG of the matrix-free method (6 laws instead of 10)."""
    x = gaussian(4, 3, 5, 5).float()
    counts = [
        tc.count_laws(ResNetBN(2, 8), x, theta="random", input_sizes=[4], eps=1.0, method=method)
        for method in ("dense", "complement")
    ]
    assert [(r.n_laws, r.n_laws_eps0) for r in counts] == [(10, 16), (10, 16)]
    assert counts[1].null_space.eliminated == "head.weight"  # the Schur route, zero gradients and all


# ---------------------------------------------------------------------------------------------
# Kronecker-factored preconditioner of the matrix-free count


def test_kronecker_factors_of_a_linear_layer_are_its_input_second_moments():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = gaussian(16, 3)
    blocks = kronecker_blocks(net, lambda: net(x).reshape(-1), [n for n, _ in net.named_parameters()])
    first = {b.name: b for b in blocks}["0.weight"]
    torch.testing.assert_close(first.a, x.T @ x, rtol=1e-12, atol=0)
    hidden = torch.relu(net[0](x)).detach()
    torch.testing.assert_close({b.name: b for b in blocks}["2.weight"].a, hidden.T @ hidden, rtol=1e-12, atol=0)
    assert all(torch.linalg.eigvalsh(b.b).min() >= -1e-12 for b in blocks)


def test_kronecker_preconditioned_count_is_the_same_with_fewer_cg_iterations():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 6, 3))
    x = gaussian(3, 2, 5, 5)
    runs = {
        pc: tc.count_laws(
            net, x, theta="random", input_sizes=[3], method="complement", preconditioner=pc, eliminate_output_layer=False
        )
        for pc in ("kronecker", "jacobi")
    }
    assert runs["kronecker"].n_laws == runs["jacobi"].n_laws == 3  # one law per hidden channel
    assert sum(runs["kronecker"].null_space.cg_iterations) < sum(runs["jacobi"].null_space.cg_iterations)
    with pytest.raises(ValueError, match="preconditioner"):
        tc.count_laws(net, x, preconditioner="ilu")


@pytest.mark.parametrize(
    "net,x",
    [
        # a segmentation-style CNN: most parameters in the output conv
        (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 16, 3, padding=1, bias=False)), gaussian(4, 2, 5, 5)),
        # fewer inputs than output-layer columns: the output weight's input patches have a null space
        (nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 30)), gaussian(5, 5)),
        # tokens: a Linear output layer on (batch, tokens, features)
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 24)), gaussian(3, 4, 3)),
        # a strided, dilated output convolution
        (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 20, 2, stride=2, dilation=2, padding=1, bias=False)), gaussian(4, 2, 6, 6)),
    ],
)
def test_eliminating_the_output_layer_gives_the_cg_and_dense_counts(net, x):
    kwargs = dict(theta="random", input_sizes=[x.shape[0]])
    schur = tc.count_laws(net, x, method="complement", **kwargs)
    cg = tc.count_laws(net, x, method="complement", eliminate_output_layer=False, **kwargs)
    dense = tc.count_laws(net, x, method="dense", **kwargs)
    last = len(net) - 1
    assert schur.null_space.eliminated in (f"{last}.weight", f"{last}.weight, {last}.bias") and schur.null_space.cg_iterations == []
    assert schur.null_space.schur_route == "factored"  # through the output layer's input, checked against G
    assert cg.null_space.eliminated is None and cg.null_space.cg_iterations
    assert cg.null_space.not_eliminated == "eliminate_output_layer=False"
    assert schur.levels == cg.levels == dense.levels and schur.n_laws == dense.n_laws
    assert all(d.clear for ds in schur.decisions for d in ds)
    # the laws' gradients are orthogonal to the explicit Jacobian (jacrev, outside the count)
    work = copy.deepcopy(net).double()

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        p = {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in schur.parameters}
        return torch.func.functional_call(work, p, (x.double(),)).reshape(-1)

    jac = jacrev(outputs)(schur.theta)
    assert (jac @ schur.law_basis).abs().max() <= 1e-10 * jac.abs().max()


def test_the_schur_count_of_a_segmentation_cnn_is_one_law_per_hidden_channel():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 64, 3, padding=1, bias=False)
    )
    res = tc.count_laws(net, gaussian(12, 3, 6, 6), theta="random", input_sizes=[6, 12])
    assert res.method == "complement" and res.null_space.eliminated == "4.weight"
    assert res.n_laws == 8 and res.stable and not res.constant_units


def test_the_factored_route_leaves_the_model_as_it_was():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 16, 3, padding=1)).double()
    x = gaussian(4, 2, 5, 5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = net(x)
    res = tc.count_laws(net, x, theta="random", input_sizes=[4], method="complement")
    assert res.null_space.schur_route == "factored"
    assert "forward" not in vars(net[2])  # its forward was replaced only inside the count's copy
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(net(x), out)


class SegmentationWithSideOutput(nn.Module):
    """A segmentation CNN that also returns its hidden features' mean: the output conv is still
    an exact block, but the other parameters reach an output it does not see."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(3, 16, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), h.mean((2, 3))


def test_a_model_with_outputs_beside_its_output_layer_takes_the_gram_columns_route():
    net, x = SegmentationWithSideOutput(), gaussian(4, 2, 5, 5)
    kwargs = dict(theta="random", input_sizes=[4])
    schur = tc.count_laws(net, x, method="complement", **kwargs)
    dense = tc.count_laws(net, x, method="dense", **kwargs)
    assert schur.null_space.eliminated == "head.weight"
    assert schur.null_space.schur_route == "streamed"  # the factored route misses h.mean: its check fails
    assert schur.levels == dense.levels and schur.n_laws == dense.n_laws


def test_the_count_says_why_no_output_layer_was_eliminated():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 16, 3, padding=1, bias=False))
    x = gaussian(4, 2, 5, 5)
    small = tc.count_laws(net, x, theta="random", input_sizes=[4], method="complement", max_memory_gb=1e-4)
    assert small.null_space.eliminated is None and "max_memory_gb" in small.null_space.not_eliminated
    assert small.n_laws == 3


def test_no_output_layer_is_eliminated_after_a_nonlinearity():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 6), nn.Tanh())
    res = tc.count_laws(net, gaussian(32, 3), theta="random", input_sizes=[32], method="complement")
    assert res.null_space.eliminated is None
    assert "not an output layer" in res.null_space.not_eliminated
    assert res.n_laws == tc.count_laws(net, gaussian(32, 3), theta="random", input_sizes=[32], method="dense").n_laws


@pytest.mark.parametrize("activation", [nn.ReLU6(), nn.Hardtanh(-3.0, 3.0)])
@pytest.mark.parametrize("scaled", [False, True])
def test_a_clipping_activation_whose_bound_no_input_reaches_is_said_to_act_unclipped(activation, scaled):
    """``relu6`` / ``hardtanh`` is not homogeneous, but a unit that no input drives to its bound
    is ReLU (relu6) or the identity (hardtanh) there. The count finds the laws of those units
    (k unit laws, or a k×k symmetric matrix law: k(k+1)/2) and now says how many units never
    reach the bound; with the model's θ scaled so that units cross it, k is checked by hand
    from the pre-activations, and k = 0 comes with no such note and no law."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), activation, nn.Linear(6, 2)).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    relu6 = isinstance(activation, nn.ReLU6)
    if scaled:
        with torch.no_grad():
            model[0].weight.normal_(0.0, 3.0)
            model[0].bias.zero_()
        result = tc.count_laws(model, x)
        pre = model[0](x)
        clipped = pre >= activation.max_val if relu6 else (pre >= activation.max_val) | (pre <= activation.min_val)
        k = int((~clipped).all(0).sum())
    else:
        result = tc.count_laws(model, x, theta="random")
        said = [w for w in result.warnings if "never reach its bound" in w]
        k = int(said[0].split(" of the ")[0]) if said else 0
    notes = [w for w in result.warnings if "never reach its bound" in w]
    assert bool(notes) == (k > 0) and all("(data-dependent)" in w for w in notes)
    if k:
        assert notes[0].startswith(f"{k} of the 6 units") and ("acts as ReLU" if relu6 else "acts as the identity") in notes[0]
    assert result.n_laws == (k if relu6 else k * (k + 1) // 2)


@pytest.mark.parametrize("mode, padding_idx", [("mean", None), ("mean", 3), ("sum", None)])
def test_embedding_bag_is_counted_like_the_embedding_it_averages(mode, padding_idx):
    """``nn.EmbeddingBag`` had no count (aten's ``_embedding_bag`` has no forward-mode rule); it
    now runs as a lookup and a sum / mean per bag. Its count equals that of the same function
    written with ``nn.Embedding`` (a different code path), d(d+1)/2 = 21 by hand for E → EA,
    W → WA⁻¹ on 6 features (and the 6 entries of the padding row, which no bag reads), and
    its elementary forward equals the native one."""

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.fc = nn.EmbeddingBag(20, 6, mode=mode, padding_idx=padding_idx), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(self.e(x))

    class Looked(nn.Module):
        def __init__(self, bag):
            super().__init__()
            self.e, self.fc = nn.Embedding(20, 6), bag.fc
            self.e.weight = bag.e.weight

        def forward(self, x):
            rows = self.e(x)
            if padding_idx is not None:
                rows = rows * (x != padding_idx).unsqueeze(-1)
            total = rows.sum(1)
            if mode == "sum":
                return self.fc(total)
            count = (x != padding_idx).sum(1, keepdim=True) if padding_idx is not None else x.shape[1]
            return self.fc(total / count)

    torch.manual_seed(0)
    x = torch.randint(0, 20, (40, 4))
    x[:, 0] = 5  # no bag is all padding
    bag = Bag().double()
    result = tc.count_laws(bag, x)
    assert result.elementary_check < 1e-12
    assert result.n_laws == tc.count_laws(Looked(bag).double(), x).n_laws == 21 + (6 if padding_idx is not None else 0)
