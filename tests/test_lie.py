"""The Lie-algebra calculator against closed forms, the SCIENCE.md table and second computations."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import grad

from torch_conslaw import mlp_trace_dimension, trace_dimension
from torch_conslaw.lie.generators import FunctionGenerators, MLPGenerators
from torch_conslaw.lie.gram import gram_null_space
from torch_conslaw.lie import RankGapWarning, lie_trace

F64 = torch.float64


@pytest.mark.parametrize("n,r,m", [(4, 3, 5), (3, 4, 5), (2, 2, 2), (5, 3, 2), (6, 4, 1)])
def test_two_layer_linear_has_r_r_plus_1_over_2_laws(n, r, m):
    res = mlp_trace_dimension([n, r, m], ["linear"])
    assert r <= n + m  # the closed form holds in this range
    assert res.n_laws == r * (r + 1) // 2
    assert res.certified
    assert res.levels[0] < res.levels[1], "the brackets must matter for linear nets"


@pytest.mark.parametrize("widths", [[3, 4, 5], [5, 7, 3], [4, 5, 3, 2], [6, 3, 3, 3, 2]])
@pytest.mark.parametrize("bias", [False, True])
def test_relu_nets_have_one_law_per_hidden_unit(widths, bias):
    res = mlp_trace_dimension(widths, ["relu"] * (len(widths) - 2), bias=bias)
    assert res.n_laws == sum(widths[1:-1])
    assert res.levels[0] == res.levels[-1], "ReLU nets: W_1 is already closed under brackets"
    assert res.certified


@pytest.mark.parametrize(
    "widths,acts,bias",
    [([6, 4, 3, 2], ["relu", "linear"], True), ([5, 4, 4, 3], ["linear", "relu"], False), ([4, 3, 3, 3, 2], ["linear", "relu", "linear"], False)],
)
def test_mixed_stacks_match_the_rank_of_their_known_laws(widths, acts, bias):
    res = mlp_trace_dimension(widths, acts, bias=bias)
    assert res.known_laws is not None
    assert res.n_laws == res.known_laws and res.certified


@pytest.mark.parametrize(
    "widths,acts,bias,D,levels,laws",
    [
        ([4, 3, 5], ["linear"], False, 27, [18, 21, 21], 6),
        ([3, 4, 5], ["linear"], False, 32, [15, 22, 22], 10),
        ([3, 4, 5], ["relu"], False, 32, [28, 28], 4),
        ([3, 4, 5], ["relu"], True, 36, [32, 32], 4),
        ([5, 5, 5, 5], ["linear"] * 2, False, 75, [25, 45, 45], 30),
        ([5, 5, 5, 5], ["relu"] * 2, True, 85, [75, 75], 10),
    ],
)
def test_science_table(widths, acts, bias, D, levels, laws):
    res = mlp_trace_dimension(widths, acts, bias=bias, output_bias=False)
    assert (res.D, res.levels, res.n_laws) == (D, levels, laws)


def test_science_table_linear_30_30_30():
    res = mlp_trace_dimension([30, 30, 30], ["linear"])
    assert (res.D, res.levels, res.n_laws) == (1800, [900, 1335, 1335], 465)


def test_product_of_six_coordinates_has_five_laws():
    res = trace_dimension(lambda t: t.prod().reshape(1), 6)
    assert res.levels == [1, 1] and res.n_laws == 5
    assert res.evidence["largest_rejected"] < 1e-12  # [X, X] = 0 recognised relative to its terms


def test_symmetric_factorization_has_no_law_thanks_to_brackets():
    phi = lambda t: (t.reshape(5, 2) @ t.reshape(5, 2).T).reshape(-1)
    res = trace_dimension(phi, 10)
    assert res.levels == [9, 10] and res.n_laws == 0


def _two_layer_linear_phi(n: int, r: int, m: int):
    def phi(t):
        u, v = t[: m * r].reshape(m, r), t[m * r :].reshape(r, n)
        return (u @ v).reshape(-1)

    return phi


def test_explicit_map_agrees_with_gated_surrogate():
    n, r, m = 4, 3, 5
    explicit = trace_dimension(_two_layer_linear_phi(n, r, m), n * r + r * m)
    surrogate = mlp_trace_dimension([n, r, m], ["linear"])
    assert explicit.levels == surrogate.levels


def test_explicit_relu_factorization_agrees_with_gated_surrogate():
    n, r, m = 3, 4, 2

    def phi(t):  # (u_j v_j^T)_j with v_j incoming (n), u_j outgoing (m)
        v, u = t[: r * n].reshape(r, n), t[r * n :].reshape(m, r)
        return torch.einsum("mj,jn->jmn", u, v).reshape(-1)

    explicit = trace_dimension(phi, r * n + m * r)
    surrogate = mlp_trace_dimension([n, r, m], ["relu"])
    assert explicit.n_laws == surrogate.n_laws == r
    assert explicit.levels == surrogate.levels


@pytest.mark.parametrize(
    "widths,acts,bias", [([8, 5, 4, 3], ["relu", "relu"], True), ([6, 4, 3, 2], ["relu", "linear"], False)]
)
def test_complement_method_agrees_with_dense(widths, acts, bias):
    dense = mlp_trace_dimension(widths, acts, bias=bias, method="dense")
    complement = mlp_trace_dimension(widths, acts, bias=bias, method="complement")
    assert dense.levels == complement.levels
    assert complement.method == "complement" and complement.null_space is not None


def test_complement_method_for_a_generic_map():
    phi = lambda t: (t.reshape(5, 2) @ t.reshape(5, 2).T).reshape(-1)
    assert trace_dimension(phi, 10, method="complement").levels == [9, 10]


def test_gated_fields_equal_a_per_sample_autograd_loop():
    fam = MLPGenerators([3, 4, 2, 2], ["relu", "linear"], bias=True)
    theta = fam.random_point(torch.Generator().manual_seed(0))
    keys = fam.sample_keys(5, torch.Generator().manual_seed(1))
    batched = fam.sample(theta, 5, torch.Generator().manual_seed(1))
    for key, row in zip(keys, batched):
        x, gates, y, betas = fam._split_keys(key[None])
        t = theta.clone().requires_grad_(True)
        h = x[0]
        for k, (w, b) in enumerate(fam.unflatten(t)):
            h = w @ h + betas[k][0] * b
            if k < 2 and gates[k] is not None:
                h = h * gates[k][0]
        (g,) = torch.autograd.grad(torch.dot(y[0], h), t)
        torch.testing.assert_close(row, g, rtol=1e-12, atol=1e-12)


def test_gram_operator_range_is_the_span_of_the_generators():
    fam = MLPGenerators([5, 4, 3, 2], ["relu", "linear"], bias=True)
    theta = fam.random_point(torch.Generator().manual_seed(0))
    gram = fam.gram_matvec(theta)(torch.eye(fam.D, dtype=F64))
    torch.testing.assert_close(torch.diagonal(gram), fam.gram_diagonal(theta), rtol=1e-12, atol=1e-12)
    samples = fam.sample(theta, 3 * fam.D, torch.Generator().manual_seed(2))
    evals, evecs = torch.linalg.eigh(gram)
    null = evecs[:, evals < evals[-1] * 1e-12]
    assert (samples @ null).abs().max() < 1e-10
    assert torch.linalg.matrix_rank(samples).item() == fam.D - null.shape[1]
    basis, decision, _ = gram_null_space(fam, theta)
    assert basis.shape[1] == null.shape[1] and decision.clear


def test_gram_of_a_generic_map_is_jacobian_gram():
    fam = FunctionGenerators(_two_layer_linear_phi(3, 2, 4), 14)
    theta = fam.random_point(torch.Generator().manual_seed(0))
    jac = torch.func.jacrev(fam.phi)(theta)
    gram = fam.gram_matvec(theta)(torch.eye(14, dtype=F64))
    torch.testing.assert_close(gram, jac.T @ jac)
    torch.testing.assert_close(fam.gram_diagonal(theta), (jac * jac).sum(0))


def test_same_seed_same_result_and_theta_argument():
    a = mlp_trace_dimension([4, 3, 5], ["linear"], seed=3)
    b = mlp_trace_dimension([4, 3, 5], ["linear"], seed=3)
    assert a.levels == b.levels and a.evidence == b.evidence
    theta = torch.randn(6, dtype=F64)
    assert trace_dimension(lambda t: t.prod().reshape(1), 6, theta=theta).n_laws == 5


def test_result_dict_and_text():
    res = mlp_trace_dimension([4, 3, 5, 2], ["linear", "relu"])
    d = res.to_dict()
    assert {"D", "lie_dim", "n_laws", "levels", "known_laws", "certified", "seconds"} <= set(d)
    assert d["lie_dim"] + d["n_laws"] == d["D"]
    assert "conservation laws" in str(res) and "certified" in str(res)


# ---- bad input -------------------------------------------------------------------------


def test_non_flat_output_is_refused():
    with pytest.raises(ValueError, match="flat"):
        trace_dimension(lambda t: t.reshape(2, 3), 6)


def test_non_finite_output_is_refused():
    with pytest.raises(ValueError, match="non-finite"):
        trace_dimension(lambda t: t / 0.0, 3)


def test_float32_output_is_refused():
    with pytest.raises(ValueError, match="float64"):
        trace_dimension(lambda t: t.float(), 3)


def test_dimension_mismatch_is_reported():
    with pytest.raises(ValueError, match="D=5"):
        trace_dimension(lambda t: t.reshape(2, 3).sum(0), 5)
    with pytest.raises(ValueError, match="theta has 4 entries but D=3"):
        trace_dimension(lambda t: t, 3, theta=torch.zeros(4, dtype=F64))


def test_bad_activation_and_widths_are_reported():
    with pytest.raises(ValueError, match="unsupported activation 'gelu'"):
        mlp_trace_dimension([3, 3, 2], ["gelu"])
    with pytest.raises(ValueError, match="one entry per hidden layer"):
        mlp_trace_dimension([3, 3, 3, 2], ["relu"])
    with pytest.raises(ValueError, match="method must be"):
        mlp_trace_dimension([3, 3, 2], ["relu"], method="magic")


def test_decision_without_clear_gap_warns():
    phi = lambda t: torch.stack([t[0], 1e-9 * t[1]])
    with pytest.warns(RankGapWarning, match="no clear gap"):
        res = trace_dimension(phi, 2)
    assert res.warnings and "no clear gap" in res.warnings[0]


def test_clear_decisions_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankGapWarning)
        res = mlp_trace_dimension([3, 4, 5], ["relu"], bias=True)
    assert res.warnings == [] and math.isfinite(res.evidence["smallest_accepted"])


def test_phi_that_torch_func_cannot_differentiate_is_explained():
    def uses_item(t):
        return torch.stack([t[0] * t[1].item()])

    with pytest.raises(ValueError, match="torch.func"):
        trace_dimension(uses_item, 2)


def test_auto_method_switches_to_complement_for_large_relu_nets():
    res = mlp_trace_dimension([60, 30, 10], ["relu"], bias=True)  # D = 2140 > DENSE_LIMIT
    assert res.method == "complement" and res.n_laws == 30 and res.certified


@pytest.mark.slow  # ~21 s on 2 cores: a D = 2025 dense count
def test_auto_method_falls_back_to_dense_when_the_complement_is_large():
    res = mlp_trace_dimension([41, 25, 40], ["linear"])  # D = 2025 > DENSE_LIMIT; W_1 has a large complement
    assert res.D == 2025 and res.method == "dense" and res.n_laws == 25 * 26 // 2


@pytest.mark.slow
def test_relu_mlp_with_100k_parameters_is_counted_exactly():
    """784-128-128-10 with biases: D = 118,282, one law per hidden unit, method chosen by size."""
    res = mlp_trace_dimension([784, 128, 128, 10], ["relu", "relu"], bias=True)
    assert res.D == 118_282 and res.method == "complement"
    assert res.n_laws == 256 and res.certified and not res.warnings


@pytest.mark.parametrize("kind", ["leaky_relu", "abs"])
def test_other_homogeneous_kinds_behave_like_relu(kind):
    res = mlp_trace_dimension([4, 5, 3, 2], [kind, "relu"], bias=True)
    assert res.n_laws == 5 + 3 and res.certified


def test_registered_activation_kind_is_used_by_name():
    from torch_conslaw.lie.generators import ACTIVATION_KINDS, ActivationKind, register_activation_kind

    register_activation_kind(ActivationKind("my_gate", gated=True))
    try:
        assert mlp_trace_dimension([3, 4, 2], ["my_gate"]).n_laws == 4
    finally:
        del ACTIVATION_KINDS["my_gate"]
