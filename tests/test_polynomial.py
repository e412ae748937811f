"""Polynomial conservation laws (torch_conslaw.polynomial): examples with known answers,
exact verification, independence, MLPs through generators, and bad input."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import sympy
import torch

from torch_conslaw.lie.generators import MLPGenerators
from torch_conslaw.polynomial import (
    format_law,
    monomial_basis,
    polynomial_laws,
    polynomial_laws_of,
)


def triple_product(t):
    return t[0:1] * t[1:2] * t[2:3]


def linear_two_layer(n: int, r: int, m: int):
    """φ(U, V) = U V^T with U ∈ R^{n×r}, V ∈ R^{m×r}; works on tensors and object arrays."""

    def phi(t):
        U, V = t[: n * r].reshape(n, r), t[n * r :].reshape(m, r)
        return (U @ V.T).reshape(-1)

    return phi, r * (n + m)


def relu_two_layer(r: int, m: int, n: int):
    """φ = (u_j v_j^T)_j, u_j ∈ R^m, v_j ∈ R^n: a 2-layer ReLU net as a polynomial map."""

    def phi(t):
        U, V = t[: r * m].reshape(r, m), t[r * m :].reshape(r, n)
        return (U[:, :, None] * V[:, None, :]).reshape(-1)

    return phi, r * (m + n)


def coefficient_rank(exprs, symbols) -> int:
    """Rank of the coefficient vectors of polynomials (their linear span's dimension)."""
    polys = [sympy.Poly(e, *symbols) for e in exprs]
    monoms = sorted({m for p in polys for m in p.monoms()})
    rows = [[p.coeff_monomial(m) for m in monoms] for p in polys]
    return sympy.Matrix(rows).rank()


def same_span(found, expected, symbols) -> bool:
    r = coefficient_rank(expected, symbols)
    return len(found) == r and coefficient_rank([*found, *expected], symbols) == r


# --------------------------------------------------------------------------------------
# Monomial basis


@pytest.mark.parametrize("D,k", [(1, 3), (3, 2), (4, 4), (7, 3)])
def test_basis_has_every_monomial_once_highest_degree_first(D, k):
    basis = monomial_basis(D, k)
    exps = basis.exponents
    assert basis.size == math.comb(D + k, k) - 1 == len({tuple(e) for e in exps.tolist()})
    degrees = exps.sum(1)
    assert degrees.min() >= 1 and degrees.max() <= k
    assert (degrees[:-1] >= degrees[1:]).all()


def test_closed_form_gradients_match_autograd():
    basis = monomial_basis(4, 3)
    point = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exps = torch.from_numpy(basis.exponents).to(torch.float64)
    values = lambda x: (x[None, :] ** exps).prod(1)
    expected = torch.autograd.functional.jacobian(values, point)
    torch.testing.assert_close(basis.gradients(point), expected)
    field = torch.randn(1, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(basis.directional(point[None], field)[0], field[0] @ expected.T)


# --------------------------------------------------------------------------------------
# Known answers


def test_triple_product_degree_two_is_exact_and_rational():
    laws = polynomial_laws(triple_product, 3, 2)
    x1, x2, x3 = laws.symbols
    assert [str(s) for s in laws.symbols] == ["x1", "x2", "x3"]
    assert same_span(list(laws), [x1**2 - x2**2, x1**2 - x3**2], laws.symbols)
    assert laws.verified == ["symbolic", "symbolic"]
    coefficients = {c for h in laws for c in sympy.Poly(h, *laws.symbols).coeffs()}
    assert coefficients <= {sympy.Integer(1), sympy.Integer(-1)}
    assert laws.gap[0] > 1e-3 and laws.gap[1] < 1e-12


def test_two_layer_linear_has_r_r_plus_1_over_2_quadratic_laws():
    n, r, m = 3, 2, 4
    phi, D = linear_two_layer(n, r, m)
    laws = polynomial_laws(phi, D, 2)
    assert len(laws) == r * (r + 1) // 2
    assert set(laws.verified) == {"symbolic"}
    syms = sympy.Matrix(laws.symbols)
    U, V = syms[: n * r, 0].reshape(n, r), syms[n * r :, 0].reshape(m, r)
    Q = (U.T * U - V.T * V).expand()
    expected = [Q[i, j] for i in range(r) for j in range(i, r)]
    assert same_span(list(laws), expected, laws.symbols)


def test_two_layer_relu_map_has_one_law_per_hidden_unit():
    r, m, n = 3, 2, 3
    phi, D = relu_two_layer(r, m, n)
    laws = polynomial_laws(phi, D, 2)
    syms = laws.symbols
    u = [syms[j * m : (j + 1) * m] for j in range(r)]
    v = [syms[r * m + j * n : r * m + (j + 1) * n] for j in range(r)]
    expected = [sum(s**2 for s in u[j]) - sum(s**2 for s in v[j]) for j in range(r)]
    assert same_span(list(laws), expected, syms)
    assert set(laws.verified) == {"symbolic"}


@pytest.mark.parametrize(
    "phi,D,degree",
    [
        (triple_product, 3, 3),
        (lambda t: (t.reshape(4, 2) @ t.reshape(4, 2).T).reshape(-1), 8, 2),  # U U^T: no law
        (linear_two_layer(2, 2, 2)[0], 8, 3),
    ],
)
def test_never_more_laws_than_D_minus_dim_lie(phi, D, degree):
    from torch_conslaw.lie import trace_dimension

    laws = polynomial_laws(phi, D, degree)
    assert len(laws) <= trace_dimension(phi, D).n_laws
    assert all(sympy.Poly(h, *laws.symbols).total_degree() <= degree for h in laws)


def test_products_of_laws_are_dropped_unless_all_is_asked():
    independent = polynomial_laws(triple_product, 3, 4)
    everything = polynomial_laws(triple_product, 3, 4, independent=False)
    assert len(independent) == 2 and independent.linear_dim == 5
    assert len(everything) == 5 and set(everything.verified) == {"symbolic"}
    x1, x2, x3 = everything.symbols
    a, b = x1**2 - x2**2, x1**2 - x3**2
    expected = [a, b, (a * a).expand(), (a * b).expand(), (b * b).expand()]
    assert same_span(list(everything), expected, everything.symbols)


def test_linear_law_and_its_powers():
    laws = polynomial_laws(lambda t: t[0:1] + t[1:2], 2, 3)
    assert [str(h) for h in laws] == ["x1 - x2"] and laws.linear_dim == 3


@pytest.mark.parametrize("dense_max", [10**9, 0])
def test_dense_svd_and_block_inverse_iteration_agree(dense_max, monkeypatch):
    """φ = (x1, x2, x3) in D = 5: the laws are all polynomials in x4, x5 (27 up to degree 6),
    enough to make the inverse-iteration block widen once."""
    import torch_conslaw.polynomial as polynomial

    monkeypatch.setattr(polynomial, "_DENSE_SVD_MAX", dense_max)
    laws = polynomial_laws(lambda t: t[:3], 5, 6, independent=False)
    assert len(laws) == 27 and set(laws.verified) == {"symbolic"}
    x4, x5 = laws.symbols[3:]
    assert all(h.free_symbols <= {x4, x5} for h in laws)
    assert laws.gap[0] > 1e-3 and laws.gap[1] < 1e-12


def test_maps_written_for_tensors_only_are_verified_numerically():
    laws = polynomial_laws(lambda t: torch.prod(t).reshape(1), 3, 2)
    assert len(laws) == 2 and laws.verified == ["numeric", "numeric"]


def test_irrational_coefficients_fall_back_to_floats_with_a_warning():
    with pytest.warns(RuntimeWarning, match="not small fractions"):
        laws = polynomial_laws(lambda t: t[0:1] + math.sqrt(2) * t[1:2], 2, 1)
    (law,) = laws
    x1, x2 = laws.symbols
    assert law.has(sympy.Float) and laws.verified == ["numeric"]
    assert abs(float(law.coeff(x2) / law.coeff(x1)) + 1 / math.sqrt(2)) < 1e-9


def test_unclear_singular_value_gap_is_reported_and_false_laws_dropped():
    with pytest.warns(RuntimeWarning) as record:
        laws = polynomial_laws(triple_product, 3, 2, rtol=0.5)  # cuts through the spectrum
    messages = " ".join(str(w.message) for w in record)
    assert "no clear singular-value gap" in messages and "fail verification" in messages
    assert laws.gap[1] > 1e-2 and len(laws.warnings) == len(record)
    assert set(laws.verified) <= {"symbolic"}  # what survives is exact


# --------------------------------------------------------------------------------------
# MLPs through generator families


def test_mlp_relu_with_bias_gives_the_unit_balance_laws_by_name():
    family = MLPGenerators([3, 2, 2], ["relu"], bias=True)
    laws = polynomial_laws_of(family, 2)
    s = {str(x): x for x in laws.symbols}
    expected = [
        sum(s[f"W1[{j},{i}]"] ** 2 for i in range(3)) + s[f"b1[{j}]"] ** 2 - sum(s[f"W2[{k},{j}]"] ** 2 for k in range(2))
        for j in range(2)
    ]
    assert [sympy.expand(h - e) for h, e in zip(laws, expected)] == [0, 0]
    assert laws.verified == ["symbolic", "symbolic"] and laws.D == family.D == 14


def test_deep_relu_laws_come_out_as_the_unit_laws_themselves():
    """A row-echelon basis mixes a unit's law with the next layer's; the sparsified basis
    gives ‖w_in‖² + b² − ‖w_out‖² per unit, exactly."""
    family = MLPGenerators([2, 2, 2, 1], ["relu", "relu"], bias=True)
    s = {str(x): x for x in polynomial_laws_of(family, 2).symbols}
    laws = polynomial_laws_of(family, 2)

    def unit(k, j, n_in, n_out):
        incoming = sum(s[f"W{k}[{j},{i}]"] ** 2 for i in range(n_in)) + s[f"b{k}[{j}]"] ** 2
        return incoming - sum(s[f"W{k + 1}[{o},{j}]"] ** 2 for o in range(n_out))

    expected = [unit(1, 0, 2, 2), unit(1, 1, 2, 2), unit(2, 0, 2, 1), unit(2, 1, 2, 1)]
    assert [sympy.expand(h - e) for h, e in zip(laws, expected)] == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "widths,activations,bias,count",
    [
        ([3, 2, 3], ["linear"], False, 3),  # r(r+1)/2
        ([3, 3, 3, 2], ["relu", "linear"], True, 3 + 6),  # one per ReLU unit + the linear layer's
    ],
)
def test_mlp_counts_are_verified_against_the_path_factorization(widths, activations, bias, count):
    laws = polynomial_laws_of(MLPGenerators(widths, activations, bias=bias), 2)
    assert len(laws) == count and set(laws.verified) == {"symbolic"}
    numeric = polynomial_laws_of(MLPGenerators(widths, activations, bias=bias), 2, symbolic=False)
    assert list(numeric) == list(laws) and set(numeric.verified) == {"numeric"}


def test_exact_check_rejects_a_non_law():
    from torch_conslaw.polynomial import _family_symbolic_map, _symbolic_check

    family = MLPGenerators([2, 1, 1], ["relu"], bias=True)  # W1[0,0], W1[0,1], b1[0], W2[0,0], b2[0]
    basis = monomial_basis(family.D, 2)
    exact = _family_symbolic_map(family, sympy.symbols("a:5"))
    exps = [tuple(e) for e in basis.exponents.tolist()]
    law = [Fraction(0)] * basis.size
    for e, c in [((2, 0, 0, 0, 0), 1), ((0, 2, 0, 0, 0), 1), ((0, 0, 2, 0, 0), 1), ((0, 0, 0, 2, 0), -1)]:
        law[exps.index(e)] = Fraction(c)
    assert _symbolic_check(law, basis, exact) is True
    law[exps.index((0, 0, 0, 0, 2))] = Fraction(1)  # + b2²: no longer conserved
    assert _symbolic_check(law, basis, exact) is False


def test_any_object_with_D_and_sample_works():
    class TripleProductFields:
        """X_a = a ∇(x1 x2 x3), drawn by hand: no generator family, no parameter names."""

        D = 3

        def sample(self, theta, n, generator):
            a = torch.randn(n, 1, dtype=torch.float64, generator=generator)
            x1, x2, x3 = theta
            return a * torch.stack([x2 * x3, x1 * x3, x1 * x2])

    laws = polynomial_laws_of(TripleProductFields(), 2)
    assert [str(h) for h in laws] == ["x1**2 - x3**2", "x2**2 - x3**2"]
    assert laws.verified == ["numeric", "numeric"]


def test_format_law_keeps_variable_order():
    x = sympy.symbols("x1:12")
    assert format_law(x[1] ** 2 - x[10] ** 2 - sympy.Rational(3, 2) * x[0], x) == "x2**2 - x11**2 - 3/2*x1"


# --------------------------------------------------------------------------------------
# Bad input


def test_non_flat_output_is_refused():
    with pytest.raises(ValueError, match=r"flat \(1-D\) tensor.*reshape\(-1\)"):
        polynomial_laws(lambda t: torch.outer(t, t), 3, 2)


def test_non_finite_output_is_refused():
    with pytest.raises(ValueError, match="non-finite"):
        polynomial_laws(lambda t: t / 0.0, 3, 2)


def test_bad_dimension_is_refused():
    with pytest.raises(ValueError, match="D must be a positive integer"):
        polynomial_laws(triple_product, 0, 2)


def test_dimension_mismatch_is_refused():
    with pytest.raises(ValueError, match="D matches"):
        polynomial_laws(lambda t: t.reshape(2, 3).sum(0), 5, 2)


@pytest.mark.parametrize("degree,error,message", [(0, ValueError, "degree must be >= 1"), (1.5, TypeError, "integer")])
def test_bad_degree_is_refused(degree, error, message):
    with pytest.raises(error, match=message):
        polynomial_laws(triple_product, 3, degree)


def test_degree_too_large_for_memory_is_refused_before_phi_runs():
    def phi(t):
        raise AssertionError("phi must not be called")

    with pytest.raises(ValueError) as info:
        polynomial_laws(phi, 40, 5)
    text = str(info.value)
    assert f"{math.comb(45, 5) - 1} unknown coefficients" in text
    assert "memory_budget" in text and "use degree <= 2" in text
    with pytest.raises(ValueError, match="use degree <= 1"):
        polynomial_laws_of(MLPGenerators([4, 3, 5], ["linear"]), 2, memory_budget=1e6)
