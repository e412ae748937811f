"""analyze(): rank of the tracked laws against the Lie-algebra count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_conslaw.completeness import analyze


def test_two_layer_relu_with_bias_tracks_every_law():
    torch.manual_seed(0)
    report = analyze(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5)))
    assert (report.tracked_laws, report.tracked_rank, report.lie_laws) == (4, 4, 4)
    assert report.complete is True and report.num_parameters == 3 * 4 + 4 + 4 * 5 + 5
    assert "tracked set: complete" in str(report)


def test_linear_hidden_layer_matrix_law_is_complete_and_its_rank_is_measured():
    torch.manual_seed(0)
    # 4-3-5 linear: r(r+1)/2 = 6 laws (SCIENCE.md §3 table)
    report = analyze(nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 5, bias=False)))
    assert (report.tracked_laws, report.tracked_rank, report.lie_laws, report.complete) == (6, 6, 6, True)


def test_wide_linear_hidden_layer_has_dependent_matrix_entries():
    torch.manual_seed(0)
    # r = 6 > n + m = 2: the 21 matrix entries are dependent; the rank and the Lie count agree
    report = analyze(nn.Sequential(nn.Linear(1, 6, bias=False), nn.Linear(6, 1, bias=False)))
    assert report.tracked_laws == 21 and report.tracked_rank < 21
    assert report.tracked_rank == report.lie_laws and report.complete


def test_leaky_relu_chain_and_mixed_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4), nn.Linear(4, 2))
    report = analyze(model)
    assert "activations ['leaky_relu', 'linear']" in report.lie_note
    assert report.tracked_rank == report.tracked_laws == 4 + 10  # 4 units + 4·5/2 matrix entries
    assert report.lie_laws == 14 and report.complete is True


def test_conv_nets_and_broken_pairs_get_no_lie_count_but_a_reason():
    cnn = analyze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)))
    assert cnn.tracked_rank == 4 and cnn.lie_laws is None and cnn.complete is None
    assert "fully connected" in cnn.lie_note
    gelu = analyze(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 5)))
    assert gelu.tracked_laws == 0 and gelu.complete is None
    assert "GELU between" in str(gelu)


def test_tracked_rank_needs_no_dense_jacobian():
    # 30 + 30 unit laws over 1860 parameters: decided block by block from sparse gradients,
    # even with a Jacobian budget far below 60 × 1860 (the budget only bounds readers that are
    # not plain rearrangements)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 2))
    report = analyze(model, lie=False, max_jacobian_entries=100)
    assert (report.tracked_laws, report.tracked_rank, report.complete) == (60, 60, None)
