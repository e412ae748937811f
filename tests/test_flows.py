"""Laws of flows other than gradient flow: heavy ball, Nesterov (phase space) and mirror flows.

The sampler (``trace_dimension`` / ``mlp_trace_dimension`` with ``flow=``) is checked against
closed forms (SCIENCE.md §10, regimes found by computation), against an independent dense
computation (sympy fields, explicit Jacobians, explicit brackets, rank by SVD at a rational
point), and, for NMF's mirror flow, against an integrated trajectory.
"""

from __future__ import annotations

import pytest
import sympy as sp
import torch

import torch_conslaw as tc

F64 = torch.float64


# ---- independent reference: exact fields, explicit Jacobians and brackets, SVD rank --------


def _dense_levels(generators: list[sp.Matrix], symbols: list[sp.Symbol], point: list[sp.Rational]) -> list[int]:
    """dim W_1, W_2, … at ``point``, W_{k+1} = W_k + [W_1, W_k], brackets ∂Y·X − ∂X·Y in sympy.

    A frame of each level is kept (fields independent at the point); bracketing the frame of
    W_1 with the new frame fields of W_k spans W_{k+1} (constant-rank argument, SCIENCE.md §3).
    """
    values: list[torch.Tensor] = []
    substitution = dict(zip(symbols, point))

    def value(field: sp.Matrix) -> torch.Tensor:
        return torch.tensor([float(e.xreplace(substitution)) for e in field], dtype=F64)

    def is_new(v: torch.Tensor) -> bool:
        if float(v.norm()) == 0.0:
            return False
        stacked = torch.stack([u / u.norm() for u in [*values, v]], dim=1)
        s = torch.linalg.svdvals(stacked)
        return int((s > 1e-9 * s[0]).sum()) > len(values)

    frame = []
    for g in generators:
        v = value(g)
        if is_new(v):
            values.append(v)
            frame.append(g)
    levels, newest = [len(values)], list(frame)
    while newest and len(values) < len(symbols):
        added = []
        for x in frame:
            for y in newest:
                b = (y.jacobian(symbols) * x - x.jacobian(symbols) * y).applyfunc(sp.expand)
                v = value(b)
                if is_new(v):
                    values.append(v)
                    added.append(b)
        newest = added
        levels.append(len(values))
    return levels


def _two_layer(n: int, r: int, m: int, relu: bool, bias: bool) -> tuple[list[sp.Symbol], list[sp.Expr]]:
    """Parameters (W1: r×n, b1: r, W2: m×r; MLP layout) and φ: W2 W1 (linear) or (u_j [v_j; b_j]^T)_j (ReLU)."""
    w1 = sp.Matrix(r, n, sp.symbols(f"a0:{r * n}"))
    b1 = sp.Matrix(r, 1, sp.symbols(f"c0:{r}")) if bias else sp.zeros(r, 0)
    w2 = sp.Matrix(m, r, sp.symbols(f"e0:{m * r}"))
    params = [*w1, *b1, *w2]
    if not relu:
        return params, list(w2 * w1)
    incoming = w1.row_join(b1)
    return params, [w2[i, j] * incoming[j, k] for j in range(r) for i in range(m) for k in range(incoming.shape[1])]


def _phase_space(params, phi, friction):
    """Symbols (t, θ, v) and the generators F_0 = (1, v, −τ(t) v), F_i = (0, 0, ∇φ_i)."""
    t = sp.Symbol("t")
    v = sp.symbols(f"v0:{len(params)}")
    drift = sp.Matrix([1, *v, *[-friction(t) * vi for vi in v]])
    zeros = [0] * (len(params) + 1)
    gens = [drift] + [sp.Matrix(zeros + [sp.diff(p, x) for x in params]) for p in phi]
    return [t, *params, *v], gens


def _rational_point(size: int, seed: int, positive: bool = False) -> list[sp.Rational]:
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(200, 2000, (size,), generator=g) if positive else torch.randint(-2000, 2000, (size,), generator=g)
    return [sp.Rational(int(x), 1000) for x in draws]


def _torch_two_layer(n: int, r: int, m: int, relu: bool, bias: bool):
    """The same φ as :func:`_two_layer`, written in torch on the same flat layout."""

    def phi(t: torch.Tensor) -> torch.Tensor:
        w1 = t[: r * n].reshape(r, n)
        b1 = t[r * n : r * n + r] if bias else t[:0]
        w2 = t[r * n + len(b1) :].reshape(m, r)
        if not relu:
            return (w2 @ w1).reshape(-1)
        incoming = torch.cat([w1, b1.reshape(r, -1)], dim=1)
        return torch.einsum("ij,jk->jik", w2, incoming).reshape(-1)

    return phi, r * n + (r if bias else 0) + m * r


# ---- momentum: closed forms -------------------------------------------------------------


@pytest.mark.parametrize(
    "widths",
    [[2, 2, 2], [3, 2, 3], *[pytest.param(w, marks=pytest.mark.slow) for w in ([1, 3, 2], [2, 3, 2], [2, 4, 3])]],
)
def test_linear_two_layer_heavy_ball_keeps_r_choose_2_laws(widths):
    n, r, m = widths
    res = tc.mlp_trace_dimension(widths, ["linear"], flow="heavy_ball")
    assert res.D == 2 * (n * r + r * m) + 1
    assert res.n_laws == r * (r - 1) // 2
    assert not res.warnings
    assert tc.mlp_trace_dimension(widths, ["linear"]).n_laws == r * (r + 1) // 2  # gradient flow keeps more


@pytest.mark.parametrize("r", [3, *[pytest.param(r, marks=pytest.mark.slow) for r in (2, 4)]])
def test_scalar_linear_net_keeps_4r_minus_6_laws_under_momentum(r):
    """n = m = 1 (heavily over-parameterized): 4r − 6 laws, against 2r − 1 for gradient flow."""
    assert tc.mlp_trace_dimension([1, r, 1], ["linear"], flow="heavy_ball").n_laws == 4 * r - 6
    assert tc.mlp_trace_dimension([1, r, 1], ["linear"]).n_laws == 2 * r - 1


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("flow", ["heavy_ball", "nesterov"])
def test_relu_nets_keep_no_law_under_momentum(bias, flow):
    res = tc.mlp_trace_dimension([3, 2, 3], ["relu"], bias=bias, flow=flow)
    assert res.n_laws == 0 and res.flow == flow
    assert tc.mlp_trace_dimension([3, 2, 3], ["relu"], bias=bias).n_laws == 2  # one per unit without momentum


def test_nesterov_is_heavy_ball_with_friction_3_over_t():
    nesterov = tc.mlp_trace_dimension([2, 2, 2], ["linear"], flow="nesterov")
    scheduled = tc.mlp_trace_dimension([2, 2, 2], ["linear"], flow="heavy_ball", tau=lambda t: 3.0 / t)
    assert nesterov.levels == scheduled.levels and nesterov.n_laws == 1
    torch.testing.assert_close(torch.tensor(nesterov.evidence["smallest_accepted"]), torch.tensor(scheduled.evidence["smallest_accepted"]))


def test_default_flow_is_gradient_flow_unchanged():
    phi = lambda t: (t[:6].reshape(3, 2) @ t[6:].reshape(2, 4)).reshape(-1)
    default, explicit = tc.trace_dimension(phi, 14, seed=2), tc.trace_dimension(phi, 14, seed=2, flow="gradient")
    assert default.levels == explicit.levels == [10, 11, 11] and default.evidence == explicit.evidence
    assert default.flow == "gradient" and default.to_dict()["flow"] == "gradient"


@pytest.mark.parametrize("flow, damping", [("heavy_ball", lambda t: torch.exp(t)), ("nesterov", lambda t: t**3)])
def test_momentum_laws_of_linear_nets_are_damped_rotation_momenta(flow, damping):
    """h_S = e^{∫τ} ⟨v, X_S θ⟩ (X_S: the rotation S = −Sᵀ of the hidden layer) is a law:
    ⟨∇h, F_0⟩ = 0 because X_S is antisymmetric, ⟨∇h, F_a⟩ = 0 because X_S is a symmetry.
    There are r(r−1)/2 of them, independent, and that is the whole count."""
    n, r, m = 3, 3, 3
    count = tc.mlp_trace_dimension([n, r, m], ["linear"], flow=flow).n_laws
    from torch_conslaw.lie.generators import MLPGenerators

    family = tc.with_flow(MLPGenerators([n, r, m], ["linear"]), flow)
    D = (n + m) * r
    z = family.random_point(torch.Generator().manual_seed(0))

    def law(S: torch.Tensor):
        def h(point: torch.Tensor) -> torch.Tensor:
            t, theta, v = point[0], point[1 : 1 + D], point[1 + D :]
            w1, w2 = theta[: r * n].reshape(r, n), theta[r * n :].reshape(m, r)
            v1, v2 = v[: r * n].reshape(r, n), v[r * n :].reshape(m, r)
            return damping(t) * ((v1 * (S @ w1)).sum() - (v2 * (w2 @ S)).sum())

        return h

    rotations = []
    for i in range(r):
        for j in range(i + 1, r):
            S = torch.zeros(r, r, dtype=F64)
            S[i, j], S[j, i] = 1.0, -1.0
            rotations.append(S)
    grads = torch.stack([torch.func.grad(law(S))(z) for S in rotations])
    fields = family.sample(z, 40, torch.Generator().manual_seed(1))
    inner = grads @ fields.T
    assert inner.abs().max() <= 1e-12 * grads.norm(dim=1).max() * fields.norm(dim=1).max()
    assert int(torch.linalg.matrix_rank(grads)) == len(rotations) == r * (r - 1) // 2 == count
    # a symmetric generator (rescaling hidden unit 0) is a symmetry too, but ⟨v, X v⟩ ≠ 0 breaks it
    scaling = torch.func.grad(law(torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=F64))))(z) @ fields.T
    assert scaling.abs().max() >= 1e-3 * grads.norm(dim=1).max() * fields.norm(dim=1).max()


# ---- momentum: the sampler against the dense reference --------------------------------


@pytest.mark.parametrize(
    "case",
    [
        dict(n=1, r=2, m=1, relu=False, bias=False, flow="heavy_ball"),
        dict(n=2, r=2, m=2, relu=False, bias=False, flow="heavy_ball"),
        dict(n=2, r=2, m=2, relu=False, bias=False, flow="nesterov"),
        dict(n=2, r=2, m=2, relu=True, bias=False, flow="heavy_ball"),
        dict(n=2, r=2, m=1, relu=True, bias=True, flow="nesterov"),
    ],
    ids=lambda c: f"{c['n']}-{c['r']}-{c['m']}-{'relu' if c['relu'] else 'linear'}{'-bias' if c['bias'] else ''}-{c['flow']}",
)
def test_sampler_matches_dense_phase_space_computation(case):
    friction = (lambda t: sp.Integer(1)) if case["flow"] == "heavy_ball" else (lambda t: 3 / t)
    params, phi = _two_layer(case["n"], case["r"], case["m"], case["relu"], case["bias"])
    symbols, gens = _phase_space(params, phi, friction)
    point = [sp.Rational(3, 2)] + _rational_point(len(symbols) - 1, seed=5)
    reference = _dense_levels(gens, symbols, point)

    phi_torch, D = _torch_two_layer(case["n"], case["r"], case["m"], case["relu"], case["bias"])
    theta = torch.tensor([float(x) for x in point], dtype=F64)
    res = tc.trace_dimension(phi_torch, D, theta=theta, flow=case["flow"])
    assert res.levels == reference
    assert res.n_laws == len(symbols) - reference[-1]
    # the gated-surrogate family gives the same count at its own random point
    mlp = tc.mlp_trace_dimension(
        [case["n"], case["r"], case["m"]], ["relu" if case["relu"] else "linear"], bias=case["bias"],
        output_bias=False, flow=case["flow"],
    )
    assert mlp.n_laws == res.n_laws


# ---- mirror flow of NMF -------------------------------------------------------------------


def _nmf_phi(n: int, r: int, m: int):
    return lambda t: (t[: n * r].reshape(n, r) @ t[n * r :].reshape(m, r).T).reshape(-1)


def _nmf_law_gradients(n: int, r: int, m: int) -> torch.Tensor:
    """Gradients of h_k = Σ_i U_ik − Σ_j V_jk (constant), rows k = 1..r."""
    u = torch.eye(r, dtype=F64).repeat(n, 1).T  # (r, n r): ∂h_k/∂U_ik = 1
    v = -torch.eye(r, dtype=F64).repeat(m, 1).T
    return torch.cat([u, v], dim=1)


def test_nmf_mirror_flow_conserves_column_sum_differences():
    n, r, m = 2, 2, 3
    D = (n + m) * r
    res = tc.trace_dimension(_nmf_phi(n, r, m), D, flow="mirror", potential="entropy")
    assert res.n_laws == r and res.flow == "mirror"
    assert tc.trace_dimension(_nmf_phi(n, r, m), D).n_laws == r * (r + 1) // 2

    # dense reference: the algebra of the fields θ ⊙ ∇φ_i, and ∇h ⊥ every field of it
    U = sp.Matrix(n, r, sp.symbols(f"u0:{n * r}"))
    V = sp.Matrix(m, r, sp.symbols(f"w0:{m * r}"))
    params = [*U, *V]
    gens = [sp.Matrix([x * sp.diff(p, x) for x in params]) for p in U * V.T]
    point = _rational_point(D, seed=3, positive=True)
    levels = _dense_levels(gens, params, point)
    assert res.levels == levels

    substitution = dict(zip(params, point))
    frame = torch.stack([torch.tensor([float(e.xreplace(substitution)) for e in g], dtype=F64) for g in gens])
    for x in gens:  # depth-2 brackets complete the algebra here (levels stabilize at level 2)
        for y in gens:
            b = y.jacobian(params) * x - x.jacobian(params) * y
            frame = torch.cat([frame, torch.tensor([[float(e.xreplace(substitution)) for e in b]], dtype=F64)])
    assert int(torch.linalg.matrix_rank(frame)) == levels[-1]
    laws = _nmf_law_gradients(n, r, m)
    assert (laws @ frame.T).abs().max() <= 1e-12 * frame.abs().max()


def test_polynomial_finder_recovers_the_nmf_mirror_law():
    """The flow's family feeds the polynomial-law finder unchanged: degree ≤ 2 gives exactly
    Σ_i U_ik − Σ_j V_jk (x1..x4 = U row-major, x5..x10 = V row-major)."""
    from torch_conslaw.lie.generators import FunctionGenerators

    family = tc.with_flow(FunctionGenerators(_nmf_phi(2, 2, 3), 10), "mirror", potential="entropy")
    assert sorted(str(h) for h in tc.polynomial_laws_of(family, 2)) == ["-x10 + x2 + x4 - x6 - x8", "x1 + x3 - x5 - x7 - x9"]


def test_nmf_law_is_constant_along_an_integrated_mirror_flow():
    n, r, m = 3, 2, 4
    g = torch.Generator().manual_seed(0)
    theta = torch.rand((n + m) * r, dtype=F64, generator=g) + 0.5
    target = torch.rand(n, m, dtype=F64, generator=g) * 2
    phi = _nmf_phi(n, r, m)
    energy_grad = torch.func.grad(lambda t: 0.5 * ((phi(t) - target.reshape(-1)) ** 2).sum())
    velocity = lambda t: -t * energy_grad(t)  # θ' = −∇²Φ^{-1}∇E for Φ = Σ θ log θ
    laws = _nmf_law_gradients(n, r, m)
    h0, start, dt = laws @ theta, theta.clone(), 1e-3
    for _ in range(500):  # RK4
        k1 = velocity(theta)
        k2 = velocity(theta + dt / 2 * k1)
        k3 = velocity(theta + dt / 2 * k2)
        k4 = velocity(theta + dt * k3)
        theta = theta + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert (theta - start).abs().max() > 0.05  # the flow moved
    assert (laws @ theta - h0).abs().max() <= 1e-12


def test_callable_potential_matches_named_entropy():
    n, r, m = 2, 2, 2
    phi, D = _nmf_phi(n, r, m), (n + m) * r
    theta = torch.rand(D, dtype=F64, generator=torch.Generator().manual_seed(1)) + 0.5
    named = tc.trace_dimension(phi, D, theta=theta, flow="mirror", potential="entropy")
    callable_ = tc.trace_dimension(phi, D, theta=theta, flow="mirror", potential=lambda t: (t * torch.log(t)).sum())
    assert named.levels == callable_.levels and named.n_laws == r


# ---- the wrapper works on any family -----------------------------------------------------


def test_with_flow_wraps_any_generator_family():
    from torch_conslaw.lie import lie_trace
    from torch_conslaw.lie.generators import MLPGenerators

    base = MLPGenerators([2, 2, 2], ["linear"])
    family = tc.with_flow(base, "heavy_ball", tau=0.5)
    point = family.random_point(torch.Generator().manual_seed(0))
    res = lie_trace(family, point)
    assert family.D == 2 * base.D + 1 and res.D == family.D and res.n_laws == 1
    assert tc.with_flow(base, "gradient") is base


@pytest.mark.parametrize(
    "flow, potential, expected",
    [("heavy_ball", None, 1), ("mirror", "entropy", 2), ("mirror", lambda t: (t * torch.log(t)).sum(), 2)],
    ids=["heavy_ball", "entropy", "callable_potential"],
)
def test_matrix_free_complement_method_agrees_with_dense(flow, potential, expected):
    """The flows' Gram operators (F_0F_0ᵀ + the base's in the v block; M G M for mirror flows)."""
    phi = _nmf_phi(2, 2, 2)
    theta = torch.rand(8, dtype=F64, generator=torch.Generator().manual_seed(4)) + 0.5  # in every domain
    counts = {
        method: tc.trace_dimension(phi, 8, theta=theta, method=method, flow=flow, potential=potential).n_laws
        for method in ("dense", "complement")
    }
    assert counts == {"dense": expected, "complement": expected}


def test_theta_may_be_parameters_or_a_whole_phase_point():
    phi, D = _nmf_phi(2, 2, 2), 8
    theta = torch.randn(D, dtype=F64, generator=torch.Generator().manual_seed(0))
    lifted = tc.trace_dimension(phi, D, theta=theta, flow="heavy_ball")
    phase = torch.cat([torch.tensor([1.5], dtype=F64), theta, torch.randn(D, dtype=F64)])
    full = tc.trace_dimension(phi, D, theta=phase, flow="nesterov")
    assert lifted.n_laws == full.n_laws == 1 and lifted.D == full.D == 2 * D + 1


# ---- bad input ---------------------------------------------------------------------------


def _product(t):
    return t.prod().reshape(1)


def test_unknown_flow_is_refused():
    with pytest.raises(ValueError, match="unknown flow 'adam'.*heavy_ball"):
        tc.trace_dimension(_product, 3, flow="adam")
    with pytest.raises(ValueError, match="unknown flow"):
        tc.mlp_trace_dimension([2, 2, 2], ["linear"], flow="momentum")


def test_mirror_needs_a_known_potential():
    with pytest.raises(ValueError, match="needs a potential"):
        tc.trace_dimension(_product, 3, flow="mirror")
    with pytest.raises(ValueError, match="unknown potential 'burg'"):
        tc.trace_dimension(_product, 3, flow="mirror", potential="burg")
    with pytest.raises(TypeError, match="potential must be"):
        tc.trace_dimension(_product, 3, flow="mirror", potential=3.0)
    with pytest.raises(ValueError, match="flow='mirror' only"):
        tc.trace_dimension(_product, 3, potential="entropy")


def test_entropy_refuses_non_positive_points():
    theta = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    with pytest.raises(ValueError, match="θ > 0.*1 of the 3 entries"):
        tc.trace_dimension(_product, 3, theta=theta, flow="mirror", potential="entropy")


def test_non_convex_potential_is_refused():
    with pytest.raises(ValueError, match="not positive definite"):
        tc.trace_dimension(_product, 3, flow="mirror", potential=lambda t: -(t**2).sum())


@pytest.mark.parametrize("tau", [-1.0, float("nan"), float("inf")])
def test_invalid_friction_is_refused(tau):
    with pytest.raises(ValueError, match="finite friction ≥ 0"):
        tc.trace_dimension(_product, 3, flow="heavy_ball", tau=tau)


def test_friction_of_the_wrong_kind_or_flow_is_refused():
    with pytest.raises(TypeError, match="tau must be a real number"):
        tc.trace_dimension(_product, 3, flow="heavy_ball", tau="fast")
    with pytest.raises(ValueError, match="fixed to 3/t"):
        tc.trace_dimension(_product, 3, flow="nesterov", tau=2.0)
    with pytest.raises(ValueError, match="heavy_ball' only"):
        tc.trace_dimension(_product, 3, tau=2.0)
    with pytest.raises(ValueError, match="tau\\(t\\) failed"):
        tc.trace_dimension(_product, 3, flow="heavy_ball", tau=lambda t: float(t))


def test_wrong_point_sizes_and_times_are_refused():
    with pytest.raises(ValueError, match="D=3.*size 2D\\+1=7"):
        tc.trace_dimension(_product, 3, theta=torch.ones(5, dtype=F64), flow="heavy_ball")
    with pytest.raises(ValueError, match="t > 0"):
        tc.trace_dimension(_product, 3, theta=torch.zeros(7, dtype=F64), flow="nesterov")


def test_known_laws_certification_is_for_gradient_flow_only():
    with pytest.raises(ValueError, match="known_laws=True.*flow='heavy_ball'"):
        tc.mlp_trace_dimension([2, 2, 2], ["linear"], flow="heavy_ball", known_laws=True)
    res = tc.mlp_trace_dimension([2, 2, 2], ["linear"], flow="heavy_ball")
    assert res.known_laws is None and res.certified is None


def test_count_laws_takes_the_flow_of_any_module():
    """count_laws(flow=...) on modules agrees with the calculator's MLP count under momentum."""
    import torch_conslaw as tc
    from torch import nn

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Linear(3, 2, bias=False))
    x = torch.randn(16, 2)
    heavy = tc.count_laws(linear, x, theta="random", flow="heavy_ball")
    assert heavy.n_laws == tc.mlp_trace_dimension([2, 3, 2], ["linear"], bias=False, flow="heavy_ball").n_laws == 3
    assert heavy.D == 2 * 12 + 1 and heavy.law_basis is None  # phase space (t, θ, v)
    assert tc.count_laws(linear, x, theta="random").n_laws == 6  # gradient flow: r(r+1)/2
    relu = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    assert tc.count_laws(relu, torch.randn(64, 2), theta="random", flow="nesterov").n_laws == 0
    with pytest.raises(ValueError, match="unknown flow"):
        tc.count_laws(linear, x, flow="adam")
