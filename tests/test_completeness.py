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


@pytest.mark.parametrize("dense_block_entries", [20_000_000, 0])
def test_sparse_block_rank_matches_the_dense_jacobian_rank(dense_block_entries):
    # rank of the tracked laws block by block (dense SVD per block, or Gram eigenvalues when
    # dense_block_entries=0) against the SVD of the full jacrev Jacobian of all laws
    from torch_conslaw.lawgroups import build_groups
    from torch_conslaw.structure import find_structure
    from torch_conslaw.tracked_rank import tracked_rank

    torch.manual_seed(0)
    cases = [
        (nn.Sequential(nn.Linear(1, 6, bias=False), nn.Linear(6, 1, bias=False)), None),  # dependent entries
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2)), None),
        (nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), torch.randn(2, 5, 8)),
    ]
    for model, x in cases:
        groups = build_groups(find_structure(model, x).pairs)
        params = {n: p.detach().double() for n, p in model.named_parameters()}
        got = tracked_rank(groups, params, dense_block_entries=dense_block_entries)
        names = sorted({n for g in groups for n in g.parameter_names})
        jac = torch.func.jacrev(lambda p: torch.cat([g.values(p) for g in groups]))({n: params[n] for n in names})
        dense = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], 1)
        s = torch.linalg.svdvals(dense)
        assert got.rank == int((s > 1e-8 * s[0]).sum()) and got.decision.clear
        assert (got.gram_blocks > 0) == (dense_block_entries == 0)
