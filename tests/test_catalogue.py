"""Registration tables: user activations (ReLU², non-homogeneous) and user layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_conslaw import catalogue
from torch_conslaw.monitor import ConservationMonitor
from torch_conslaw.structure import find_structure


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch):
    """Registrations made by a test stay local to it."""
    for table in ("_LAYERS", "_ACT_MODULES", "_ACT_FUNCTIONS", "_ACT_METHODS"):
        monkeypatch.setattr(catalogue, table, dict(getattr(catalogue, table)))


class ReLU2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) ** 2


def relu2_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), ReLU2(), nn.Linear(4, 2)).double()


def test_unregistered_custom_activation_is_reported_not_guessed():
    s = find_structure(relu2_model())
    assert s.pairs == []
    assert "register_activation" in str(s.skipped[0])


def test_relu_squared_registered_with_degree_two_is_conserved_by_sgd():
    catalogue.register_activation(ReLU2, degree=2)
    model = relu2_model()
    (pair,) = find_structure(model).pairs
    assert pair.degree == 2.0 and pair.kind == "unit"
    monitor = ConservationMonitor(model, every=1, recording="sync")
    w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight
    by_hand = torch.stack(
        [w1[j].square().sum() + b1[j] ** 2 - 2 * w2[:, j].square().sum() for j in range(4)]
    ).detach()
    torch.testing.assert_close(monitor.initial["0→2"], by_hand, rtol=0, atol=1e-14)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor.attach(opt)
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    # with the k = 2 weighting the symmetry-breaking part vanishes; with k = 1 it would not
    assert monitor.summary()[0]["max_rel_first_order"] < 1e-12
    catalogue.register_activation(ReLU2, degree=1)
    wrong = ConservationMonitor(relu2_model(), every=1, recording="sync")
    wrong.attach(opt2 := torch.optim.SGD(wrong.model.parameters(), lr=1e-2))
    for _ in range(5):
        opt2.zero_grad()
        nn.functional.mse_loss(wrong.model(x), y).backward()
        opt2.step()
    assert wrong.summary()[0]["max_rel_first_order"] > 1e-6


def test_registering_a_non_homogeneous_activation_reports_it():
    catalogue.register_activation(ReLU2, degree=None, name="ReLU2")
    s = find_structure(relu2_model())
    assert str(s.skipped[0]) == "ReLU2 between 0 (Linear) and 2 (Linear) is not positively homogeneous"


def test_register_activation_rejects_bad_input():
    with pytest.raises(ValueError, match="degree must be a positive finite number"):
        catalogue.register_activation(ReLU2, degree=-1)
    with pytest.raises(TypeError, match="degree must be a number"):
        catalogue.register_activation(ReLU2, degree="2")
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        catalogue.register_activation(int, degree=1)


def test_register_layer_for_a_custom_layer_type():
    class Dense(nn.Module):
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(n_in, n_out, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.kernel

    catalogue.register_layer(
        Dense,
        out_units=lambda m: m.kernel.shape[1],
        in_units=lambda m: m.kernel.shape[0],
        incoming=lambda m: [("kernel", lambda k: k.T)],
        outgoing=lambda m, positions: [("kernel", lambda k: k)],
    )
    model = nn.Sequential(Dense(3, 4), nn.ReLU(), Dense(4, 2))
    (pair,) = find_structure(model).pairs
    assert pair.name == "0→2" and pair.units == 4
    monitor = ConservationMonitor(model, every=1, recording="sync")
    k1, k2 = model[0].kernel.detach(), model[2].kernel.detach()
    torch.testing.assert_close(monitor.initial["0→2"], k1.square().sum(0) - k2.square().sum(1))
    with pytest.raises(ValueError, match="out_axis must be 'last' or 'channel'"):
        catalogue.register_layer(
            Dense, out_units=len, in_units=len, incoming=list, outgoing=list, out_axis="rows"
        )
