"""Exact scale laws before an op that keeps only the direction of a layer's output.

``F.normalize(h, dim=-1)``, ``h / h.norm(dim=-1, keepdim=True)`` (also by hand, sqrt(Σ h²),
``torch.linalg.vector_norm``, a ``clamp_min(eps)`` of the norm) and each argument of
``F.cosine_similarity`` are unchanged when h is scaled by λ > 0. When a layer's output reaches
nothing else (through ReLU and shape ops), scaling the whole layer changes nothing, so the
gradient is orthogonal to its parameters and ‖W‖² + ‖b‖² is conserved exactly; a weight read
only through ``F.normalize(w, dim=d)`` keeps ‖w[slice]‖² per slice. Checked with torch.func,
one SGD step (the first-order change is zero) and near misses that must get no law."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc
from tests.graph_helpers import law_residuals, quiet_monitor, seeded_model, seeded_randn, sgd_first_order, sgd_mse



class Normalized(nn.Module):
    """a → ReLU → b → ReLU → (a direction of it, ``how``) → c."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        how = self.how
        if how == "normalize":
            return self.c(F.normalize(h, dim=-1))
        if how == "norm":
            return self.c(h / h.norm(dim=-1, keepdim=True))
        if how == "by_hand":  # as CLIP writes it
            return self.c(h / torch.pow(torch.sum(torch.pow(h, 2), dim=-1, keepdim=True), 0.5))
        if how == "clamped_vector_norm":
            return self.c(h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(1e-6))
        if how == "plus_eps":  # not exact: ‖h‖ + eps does not scale with h
            return self.c(h / (h.norm(dim=-1, keepdim=True) + 1e-3))
        if how == "over_the_batch":  # a direction over another axis: not the layer's scale
            return self.c(h / h.norm(dim=0, keepdim=True))
        if how == "also_residual":  # h also reaches the output as it is
            return self.c(F.normalize(h, dim=-1)) + h[:, :3]
        raise ValueError(how)


class CosineHead(nn.Module):
    """A cosine classifier: τ · cos(features, class weights), the weights normalized per class."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 5)
        self.classes = nn.Parameter(torch.randn(3, 5))
        self.tau = nn.Parameter(torch.tensor(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.normalize(self.b(torch.relu(self.a(x))), dim=-1)
        return self.tau * h @ F.normalize(self.classes, dim=1).t()


class Siamese(nn.Module):
    """cos(b(relu(a(x))), d(relu(c(y)))): each projection keeps its own scale law."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(4, 6), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.b(torch.relu(self.a(x))), self.d(torch.relu(self.c(x.flip(-1))))
        return F.cosine_similarity(left, right, dim=-1)


@pytest.mark.parametrize("how", ["normalize", "norm", "by_hand", "clamped_vector_norm"])
def test_the_layer_before_a_direction_keeps_its_scale(how):
    model, x = seeded_model(Normalized, how), seeded_randn(8, 4, seed=1) + 1.0
    groups = quiet_monitor(model, x).groups
    (scale,) = [g for g in groups if g.kind == "scale"]
    assert (scale.name, scale.count) == ("b scale", 1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    by_hand = params["b.weight"].square().sum() + params["b.bias"].square().sum()
    torch.testing.assert_close(scale.values(params), by_hand.reshape(1), rtol=1e-14, atol=0)
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12
    assert sgd_first_order(model, x, [scale], lambda out: out) < 1e-12


@pytest.mark.parametrize("how", ["plus_eps", "over_the_batch", "also_residual"])
def test_near_misses_get_no_scale_law(how):
    model, x = seeded_model(Normalized, how), seeded_randn(8, 4, seed=1) + 1.0
    assert not [g for g in quiet_monitor(model, x).groups if g.kind == "scale"]


def test_a_cosine_classifier_keeps_its_feature_scale_and_one_law_per_class():
    model, x = seeded_model(CosineHead), seeded_randn(8, 4, seed=1)
    groups = quiet_monitor(model, x).groups
    scales = {g.name: g for g in groups if g.kind == "scale"}
    assert {n: g.count for n, g in scales.items()} == {"b scale": 1, "classes scale": 3}
    params = {n: p.detach() for n, p in model.named_parameters()}
    torch.testing.assert_close(scales["classes scale"].values(params), params["classes"].square().sum(1), rtol=1e-14, atol=0)
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12
    assert sgd_first_order(model, x, list(scales.values()), lambda out: out) < 1e-12


def test_each_argument_of_a_cosine_similarity_keeps_its_scale():
    model, x = seeded_model(Siamese), seeded_randn(8, 4, seed=1)
    groups = quiet_monitor(model, x).groups
    assert sorted((g.name, g.count) for g in groups if g.kind == "scale") == [("b scale", 1), ("d scale", 1)]
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12


def test_the_scale_law_is_conserved_through_training():
    """SGD changes ‖W‖² + ‖b‖² of the layer by its second-order part only: the records say so."""
    model, x = seeded_model(Normalized, "normalize"), seeded_randn(16, 4, seed=1) + 1.0
    monitor = quiet_monitor(model, x)
    sgd_mse(model, x, seeded_randn(16, 3, seed=2), lr=0.05, steps=5, monitor=monitor)
    (row,) = [r for r in monitor.summary() if r["name"] == "b scale"]
    assert row["max_rel_first_order"] < 1e-12 and row["recorded_steps"] == 5, row


class DescriptorHead(nn.Module):
    """conv → ReLU → conv → F.normalize over the channels at every pixel (SuperPoint's descriptors)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.c2(torch.relu(self.c1(x))), p=2, dim=1)


def test_a_convolution_normalized_over_its_channels_keeps_its_scale_and_is_complete():
    model, x = seeded_model(DescriptorHead), seeded_randn(2, 3, 6, 6, seed=1)
    groups = quiet_monitor(model, x).groups
    assert sorted((g.name, g.count) for g in groups) == [("c1→c2", 8), ("c2 scale", 1)]
    assert law_residuals(model, x, groups, lambda out: out) < 1e-12
    report = tc.analyze(model, x)
    assert report.complete is True and report.tracked_rank == report.lie_laws == 9, str(report)
