"""Laws through the ops of decoders and gated convolutions, found from the op graph: transposed
convolutions (as producers, through the columns w[:, j] of their weight, and as consumers,
through its rows w[i]), resampling (``F.interpolate``), channel shuffles, ``F.glu``; and the
count of models with ``F.glu`` and the ``weight_norm`` parametrization, whose aten ops have
no forward-mode rule. Every tracked law passes ⟨∇h, ∂_θ⟨u, f⟩⟩ ≈ 0 (float64, torch.func,
relative ≤ 1e-10), and ``analyze`` compares the tracked set with the Lie-algebra count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc
from torch_conslaw import ConservationMonitor

from graph_helpers import law_residuals

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _groups(model: nn.Module, x: torch.Tensor) -> dict:
    return {g.name: g for g in ConservationMonitor(model, x, every=1).groups}


class Decoder(nn.Module):
    """conv_transpose (2 → 3 channels, stride 2) → ReLU → ×2 nearest/bilinear → conv 1×1."""

    def __init__(self, mode: str):
        super().__init__()
        self.up, self.out, self.mode = nn.ConvTranspose2d(2, 3, 2, stride=2), nn.Conv2d(3, 2, 1), mode

    def forward(self, x):
        h = F.relu(self.up(x))
        return self.out(F.interpolate(h, scale_factor=2, mode=self.mode))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_a_transposed_convolution_produces_channels_through_a_resampling(mode):
    torch.manual_seed(0)
    model = Decoder(mode).double()
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    groups = _groups(model, x)
    assert [(n, g.count) for n, g in groups.items()] == [("up→out", 3)]  # one law per output channel
    assert law_residuals(model, x, list(groups.values()), lambda y: y) <= 1e-10
    report = tc.analyze(model, x, theta="random")
    assert report.complete is True and report.tracked_rank == report.lie_laws == 3


class Encoder(nn.Module):
    """conv (2 → 3) → ReLU → conv_transpose (3 → 2): the transposed convolution consumes."""

    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ConvTranspose2d(3, 2, 2, stride=2)

    def forward(self, x):
        return self.up(F.relu(self.down(x)))


def test_a_transposed_convolution_consumes_channels_through_the_rows_of_its_weight():
    torch.manual_seed(0)
    model = Encoder().double()
    x = torch.randn(2, 2, 6, 6, dtype=F64)
    groups = _groups(model, x)
    assert [(n, g.count) for n, g in groups.items()] == [("down→up", 3)]
    assert law_residuals(model, x, list(groups.values()), lambda y: y) <= 1e-10
    # independent: ‖down_i‖² + b_i² − ‖up.weight[i]‖² per channel, by hand, against the group
    params = dict(model.named_parameters())
    by_hand = (params["down.weight"].flatten(1).square().sum(1) + params["down.bias"].square()
               - params["up.weight"].flatten(1).square().sum(1))
    torch.testing.assert_close(groups["down→up"].values(params), by_hand, rtol=1e-13, atol=1e-13)


class UNet(nn.Module):
    """d → {down → up (transposed)}, both concatenated on the channels into out."""

    def __init__(self):
        super().__init__()
        self.d, self.down = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up, self.out = nn.ConvTranspose2d(4, 3, 2, stride=2), nn.Conv2d(7, 1, 1)

    def forward(self, x):
        a = F.relu(self.d(x))
        return self.out(torch.cat([a, F.relu(self.up(F.relu(self.down(a))))], 1))


def test_a_unet_skip_concatenation_keeps_the_channel_laws_of_both_arms():
    torch.manual_seed(0)
    model = UNet().double()
    x = torch.randn(2, 2, 6, 6, dtype=F64)
    groups = _groups(model, x)
    assert {n: g.count for n, g in groups.items()} == {"d→down+out": 4, "down→up": 4, "up→out": 3}
    assert law_residuals(model, x, list(groups.values()), lambda y: y) <= 1e-10


class Shuffled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.shuffle, self.b = nn.Conv2d(2, 4, 1), nn.ChannelShuffle(2), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(F.relu(self.shuffle(self.a(x))))


def test_a_channel_shuffle_permutes_the_channels_and_the_laws_follow():
    torch.manual_seed(0)
    model = Shuffled().double()
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    groups = _groups(model, x)
    assert [(n, g.count) for n, g in groups.items()] == [("a→b", 4)]
    assert law_residuals(model, x, list(groups.values()), lambda y: y) <= 1e-10
    assert tc.analyze(model, x, theta="random").complete is True


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(F.glu(self.a(x), -1))


def test_glu_keeps_the_units_of_its_first_half_and_is_counted():
    torch.manual_seed(0)
    model = Gated().double()
    x = torch.randn(6, 3, dtype=F64)
    monitor = ConservationMonitor(model, x, every=1)
    groups = {g.name: g for g in monitor.groups}
    assert [(n, g.count) for n, g in groups.items()] == [("a→b", 4)]  # units 0..3 of a; 4..7 gate
    assert law_residuals(model, x, list(groups.values()), lambda y: y) <= 1e-10
    assert any("gate half of glu" in str(s) for s in monitor.skipped)
    report = tc.analyze(model, x, theta="random")  # the count runs F.glu as elementary ops
    assert report.complete is True and report.tracked_rank == report.lie_laws == 4


def test_the_weight_norm_parametrization_is_counted():
    """w = g · v / ‖v‖ per row: each ‖v_i‖² is a law (v_i → c v_i changes nothing), and so is
    the rescaling through the ReLU: g_i² + b_i² − ‖b.weight[:, i]‖²: 4 + 4 laws."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2)).double()
    result = tc.count_laws(model, torch.randn(32, 3, dtype=F64), theta="random")
    assert result.n_laws == 8 and result.stable
