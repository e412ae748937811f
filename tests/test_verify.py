"""Verify before claiming: wrong registrations are caught, the check is public, honest about
what it did not verify, and leaves training untouched."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_conslaw as tc
from torch_conslaw import catalogue
from torch_conslaw.catalogue import InternalLaw

F64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch):
    """Registrations made by a test stay local to it."""
    for table in ("_LAYERS", "_ACT_MODULES", "_ACT_FUNCTIONS", "_ACT_METHODS", "_INTERNAL"):
        monkeypatch.setattr(catalogue, table, dict(getattr(catalogue, table)))


PRODUCTS = {operator.mul: lambda h: h * h, torch.mul: lambda h: torch.mul(h, h), "mul": lambda h: h.mul(h)}


class Square(nn.Module):
    """fc2(h * h): the product is 2-homogeneous in h, not 1-homogeneous."""

    def __init__(self, product=PRODUCTS[operator.mul]) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.product = product

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.product(self.fc1(x)))


def square_model(target=operator.mul) -> nn.Module:
    torch.manual_seed(0)
    return Square(PRODUCTS[target]).double()


def x3() -> Tensor:
    return torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(1))


def test_the_skip_reason_for_a_product_names_it_and_does_not_advise_registering_it():
    (skip,) = tc.find_structure(square_model()).skipped
    text = str(skip)
    assert "mul multiplies tensors (a product, not an activation)" in text
    assert "register_activation" not in text


@pytest.mark.parametrize("target", list(PRODUCTS), ids=["operator.mul", "torch.mul", "Tensor.mul"])
def test_a_wrong_registration_of_mul_is_caught_and_never_reported_as_conserved(target):
    catalogue.register_activation(target, degree=1, name="mul")
    model = square_model(target)
    (pair,) = tc.find_structure(model).pairs  # the finder believes the registration
    assert pair.name == "fc1→fc2"
    with pytest.warns(RuntimeWarning, match="no conservation law is tracked"):
        monitor = tc.ConservationMonitor(model, x3(), every=1, recording="sync")
    assert monitor.summary() == []
    (skip,) = [s for s in monitor.skipped if "fc1→fc2" in str(s)]
    text = str(skip)
    assert "fails the numerical check" in text and "not tracked" in text
    residual = float(text.split("= ")[1].split(" ")[0])
    assert residual > 1e-3  # measured: ≈ 0.1, nine orders of magnitude above rounding


def test_without_the_check_the_same_registration_would_be_a_false_claim():
    """What the check prevents: unverified, SGD shows a large first-order part."""
    catalogue.register_activation(operator.mul, degree=1, name="mul")
    model = square_model()
    with pytest.warns(RuntimeWarning, match="You registered mul"):
        monitor = tc.ConservationMonitor(model, every=1, recording="sync")  # no example input: nothing can be verified
    (row,) = monitor.summary()
    assert row["verified"] is False and "(unverified)" in monitor.table()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor.attach(opt)
    x, y = x3(), torch.randn(16, 2, dtype=F64)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert monitor.summary()[0]["max_rel_first_order"] > 1e-4


def test_the_right_degree_passes_the_check():
    catalogue.register_activation(operator.mul, degree=2, name="mul")  # (ch)·(ch) = c²·h·h
    monitor = tc.ConservationMonitor(square_model(), x3(), every=1, recording="sync")
    (row,) = monitor.summary()
    assert row["verified"] is True and row["verification_residual"] < 1e-14


def test_a_wrong_register_layer_is_caught():
    class Doubled(nn.Linear):  # reads its input twice: y = W(x ⊙ x), not a linear map
        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x * x, self.weight, self.bias)

    tc.register_layer(
        Doubled, out_units=lambda m: m.out_features, in_units=lambda m: m.in_features,
        incoming=lambda m: [("weight", lambda w: w), ("bias", lambda b: b[:, None])],
        outgoing=lambda m, positions: [("weight", lambda w: w.T)],
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), Doubled(4, 2)).double()
    with pytest.warns(RuntimeWarning, match="no conservation law"):
        monitor = tc.ConservationMonitor(model, x3(), every=1, recording="sync")
    assert monitor.groups == [] and "fails the numerical check" in str(monitor.skipped[-1])


def test_a_wrong_register_internal_laws_is_caught_and_a_right_one_passes():
    class Bilinear(nn.Module):  # y = (x aᵀ) b keeps a → G a, b → G⁻ᵀ b: law a aᵀ − b bᵀ
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(2, 3))

        def forward(self, x: Tensor) -> Tensor:
            return (x @ self.a.T) @ self.b

    def laws(m: nn.Module) -> list[InternalLaw]:
        return [
            InternalLaw("a·b", 2, (("a", lambda w: w),), (("b", lambda w: w),), "right"),
            InternalLaw("a·a", 2, (("a", lambda w: w),), (("a", lambda w: 2 * w),), "wrong"),
        ]

    tc.register_internal_laws(Bilinear, laws)
    torch.manual_seed(0)
    monitor = tc.ConservationMonitor(Bilinear().double(), x3(), every=1, recording="sync")
    assert [g.name for g in monitor.groups] == ["Bilinear.a·b"]
    assert any("Bilinear.a·a fails the numerical check" in str(s) for s in monitor.skipped)


def test_verify_laws_is_public_and_takes_groups_a_monitor_or_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = x3()
    proposed = tc.verify_laws(model, x)
    assert {v.group for v in proposed} == {"1→3", "0.bias→1", "0→1 scale"}
    assert all(v.passed for v in proposed)
    by_name = {v.group: v for v in proposed}
    # the bias before the BatchNorm has zero gradient in exact arithmetic: its residual is
    # rounding over OWN_FLOOR of ‖∂fᵀu‖, three orders above the rounding level, far below 1e-10
    assert by_name["1→3"].residual < 1e-14 and by_name["0.bias→1"].residual < 1e-12
    assert 1e-10 < by_name["0→1 scale"].residual < 1e-3  # approximate: the eps term, measured
    monitor = tc.ConservationMonitor(model, x, every=1, recording="sync")
    assert [v.group for v in tc.verify_laws(model, x, monitor)] == [g.name for g in monitor.groups]
    assert "passed" in str(proposed[0])
    with pytest.raises(ValueError, match="needs an example input"):
        tc.verify_laws(model, None)
    with pytest.raises(ValueError, match="cotangents must be"):
        tc.verify_laws(model, x, cotangents=0)


def test_translation_law_needs_the_loss_named_and_an_example_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5)).double()
    plain = tc.ConservationMonitor(model, x3(), every=1, recording="sync")
    assert "2 translation" not in {g.name for g in plain.groups}
    ce = tc.ConservationMonitor(model, x3(), loss="cross_entropy", every=1, recording="sync")
    (row,) = [s for s in ce.summary() if s["name"] == "2 translation"]
    assert row["loss"] == "cross_entropy" and "this loss only" in row["reason"]
    with pytest.raises(ValueError, match="pass example_input"):
        tc.ConservationMonitor(model, loss="cross_entropy", every=1, recording="sync")
    with pytest.raises(ValueError, match="loss must be one of"):
        tc.ConservationMonitor(model, x3(), loss="mse", every=1, recording="sync")


def test_translation_law_is_false_for_another_loss():
    """MSE reads every logit: the column sums move at first order under SGD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5)).double()
    monitor = tc.ConservationMonitor(model, x3(), loss="cross_entropy", every=1, recording="sync")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor.attach(opt)
    x = x3()
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), torch.randn(16, 5, dtype=F64)).backward()
        opt.step()
    (row,) = [s for s in monitor.summary() if s["name"] == "2 translation"]
    assert row["max_rel_first_order"] > 1e-6


def test_approximate_laws_are_never_counted_as_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2)).double()
    monitor = tc.ConservationMonitor(model, x3(), every=1, recording="sync")
    (row,) = [s for s in monitor.summary() if s["approximate"]]
    assert row["kind"] == "approximate" and row["expected_conserved"] is False
    assert "approximate" in row["reason"] and "eps" in row["reason"]
    line = next(l for l in monitor.table().splitlines() if l.startswith("0→1 scale"))
    assert line.rstrip().endswith("approximate")
    assert "+ 1 approximate" in repr(monitor)


def test_the_check_leaves_training_bitwise_identical_with_batchnorm_and_dropout():
    def train(with_monitor: bool) -> tuple[list[Tensor], Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
            nn.Linear(4 * 5 * 5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2),
        )
        x, y = torch.randn(8, 2, 5, 5), torch.randn(8, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        if with_monitor:
            monitor = tc.ConservationMonitor(model, x, every=1, recording="sync").attach(opt)
            assert all(s["verified"] for s in monitor.summary())
        for _ in range(4):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        return [t.detach().clone() for t in model.state_dict().values()], torch.rand(3)

    (a, rng_a), (b, rng_b) = train(False), train(True)
    assert all(torch.equal(s, t) for s, t in zip(a, b)) and torch.equal(rng_a, rng_b)


def test_a_check_that_cannot_run_is_reported_and_adds_no_family():
    class NoFloat64(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn, self.out = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            if x.dtype == torch.float64:
                raise TypeError("float32 only")
            return self.out(torch.relu(self.bn(self.fc(x))))

    with pytest.warns(RuntimeWarning, match="failed to run"):
        monitor = tc.ConservationMonitor(NoFloat64(), torch.randn(5, 3), every=1, recording="sync")
    assert [s["kind"] for s in monitor.summary()] == ["unit"]
    assert monitor.summary()[0]["verified"] is False
    assert "float32 only" in monitor.verification_note


def test_no_warning_without_example_input_when_nothing_was_registered():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor = tc.ConservationMonitor(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), every=1, recording="sync")
    assert "no example_input" in monitor.verification_note


class Scaler(nn.Module):
    """An unregistered module with parameters (a layer the finder does not know)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class Reshapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(2, 2)
        self.s, self.e = Scaler(), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x).view(-1, 2, 2).transpose(1, 2).reshape(-1, 4)  # a reshape the finder does not follow
        g = self.c(self.b(h)[:, :4])  # indexing
        return self.e(self.s(g)).sum() + self.d(g[:, :2]).sum()


def test_skip_reasons_name_reshapes_indexing_and_unknown_layers_without_advising_activations():
    reasons = [str(s) for s in tc.find_structure(Reshapes()).skipped]
    text = " | ".join(reasons)
    assert ".view() reshapes or permutes the tensor" in text
    assert "selects entries (indexing" in text
    assert ".sum() reduces over axes" in text
    assert "register_activation" not in text  # never: a reshape, an index, a product or a reduction
    layer = catalogue.barrier_reason(Scaler(), "s")  # reached when the forward is recorded with hooks
    assert "s (Scaler) has parameters but is not a registered layer" in layer
    assert "register_layer" in layer and "register_activation" not in layer


def test_a_model_built_in_eval_mode_gets_the_train_mode_only_bias_law_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3)).double()
    x = torch.randn(4, 2, 6, 6, dtype=F64)
    assert "0.bias→1" in {g.name for g in tc.ConservationMonitor(model, x, every=1, recording="sync").groups}
    model.eval()  # running statistics: the bias before BatchNorm does reach the output
    monitor = tc.ConservationMonitor(model, x, every=1, recording="sync")
    assert "0.bias→1" not in {g.name for g in monitor.groups}
    assert any("0.bias→1 fails the numerical check" in str(s) for s in monitor.skipped)
    assert not model.training  # the mode is left as it was


def test_closed_form_gradient_norms_equal_torch_func_jacobians():
    """The check's ‖∇h_l‖ for every built-in kind, against full jacrev Jacobians of the values."""
    from torch_conslaw.laws.verify import gradient_norms

    torch.manual_seed(0)
    models = [
        (nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4),
                       nn.LayerNorm(4), nn.Linear(4, 3), nn.Linear(3, 2)).double(), torch.randn(4, 2, 6, 6, dtype=F64)),
        (nn.Sequential(nn.Embedding(6, 4, padding_idx=1), nn.MultiheadAttention(4, 2, batch_first=True)).double(), None),
    ]
    kinds = set()
    for model, x in models:
        structure = tc.find_structure(model)
        from torch_conslaw.lawgroups import build_groups
        from torch_conslaw.laws.families.proposals import propose_laws

        groups = build_groups(structure.pairs) + propose_laws(model, structure)[0]
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        for g in groups:
            jac = torch.func.jacrev(g.values)(theta)
            exact = torch.cat([t.reshape(g.count, -1) for t in jac.values()], 1).square().sum(1).sqrt()
            torch.testing.assert_close(gradient_norms(g, theta), exact, rtol=1e-12, atol=1e-14)
            kinds.add(g.kind)
    assert kinds == {"channel", "unit", "matrix", "linear", "approximate"}


class _GatedPair(nn.Module):
    """y = (x aᵀ) b + Σ_k (x aᵀ)_k · (c · x): a → G a, b → G⁻ᵀ b keeps the first term, and the
    second only while c = 0 (its value when built)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(2, 3))
        self.c = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        h = x @ self.a.T
        return h @ self.b + h.sum(-1, keepdim=True) * (x * self.c)


def test_a_law_that_holds_only_at_the_initial_point_is_refused():
    """A declared a·b law that holds while the 1-D parameter c is 0, as built: the check at the
    model's θ passes it (c = 0 there); the second check, with every 1-D parameter moved off its
    value, refuses it. By hand, with c ≠ 0 the law's gradient is not orthogonal to the loss
    gradient (torch.func), and the model's parameters are put back bit for bit."""
    from torch.func import functional_call, grad, jacrev

    from torch_conslaw.catalogue import InternalLaw

    tc.register_internal_laws(_GatedPair, lambda m: [InternalLaw(
        "a·b", 2, (("a", lambda w: w),), (("b", lambda w: w),), "a → G a, b → G⁻ᵀ b")])
    torch.manual_seed(0)
    model = nn.Sequential(_GatedPair()).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = tc.ConservationMonitor(model, x)
    assert not [g for g in monitor.groups if "a·b" in g.name]
    assert any("a·b" in str(s) and "fails the numerical check" in str(s) for s in monitor.skipped)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    public = tc.verify_laws(model, x)  # the public check reads the same two points
    assert [v.passed for v in public if "a·b" in v.group] == [False]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params["0.c"] = torch.randn(3, dtype=torch.float64)
    target = torch.randn(8, 3, dtype=torch.float64)
    g = grad(lambda p: ((functional_call(model, p, (x,)) - target) ** 2).sum())(params)
    law = lambda p: (p["0.a"] @ p["0.a"].T - p["0.b"] @ p["0.b"].T)[tuple(torch.triu_indices(2, 2))]  # noqa: E731
    dh = jacrev(law)(params)
    inner = sum((dh[n] * g[n]).flatten(1).sum(1) for n in ("0.a", "0.b"))
    assert inner.abs().max() > 1e-3 * g["0.a"].abs().max()
