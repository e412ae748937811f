"""Plotting: figures from a monitor's history, slope fitting, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from torch_conslaw import ConservationMonitor, plotting


@pytest.fixture(scope="module")
def history():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), nn.Linear(4, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = ConservationMonitor(model, every=1, recording="sync").attach(opt)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    for _ in range(8):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return mon.history()


def test_figures_are_written_with_one_curve_per_law_and_group(history, tmp_path):
    fig = plotting.plot_laws(history, max_laws=3)
    assert [len(ax.lines) for ax in fig.axes] == [3 + 1, 3 + 1]  # 3 laws + the zero line
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), history["0→2/values"][:, 0] - history["0→2/values"][0, 0])
    drift = plotting.plot_relative_drift(history)
    assert len(drift.axes[0].lines) == 2 and drift.axes[0].get_yscale() == "log"
    split = plotting.plot_split(history)
    assert len(split.axes[0].lines) == 4
    for name, f in (("laws", fig), ("drift", drift), ("split", split)):
        path = plotting.save(f, tmp_path / "sub" / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loglog_slope_and_drift_plot():
    eta = np.array([1e-3, 1e-2, 1e-1])
    fig, slopes = plotting.plot_drift_vs_step_size(eta, {"law": 3 * eta, "non-law": [0.5, 0.5, 0.5], "quadratic": eta**2})
    assert slopes["law"] == pytest.approx(1.0) and slopes["non-law"] == pytest.approx(0.0, abs=1e-12)
    assert slopes["quadratic"] == pytest.approx(2.0)
    assert fig.axes[0].get_xscale() == "log" and "slope 1.00" in fig.axes[0].get_legend().get_texts()[0].get_text()
    with pytest.raises(ValueError, match="at least two positive"):
        plotting.fit_loglog_slope([1.0, 2.0], [0.0, -1.0])
    with pytest.raises(ValueError, match="has 2 points for 3 step sizes"):
        plotting.plot_drift_vs_step_size(eta, {"x": [1, 2]})


def test_bad_histories_give_clear_errors(history):
    with pytest.raises(ValueError, match="no 'step' key"):
        plotting.plot_laws({})
    with pytest.raises(ValueError, match="holds no law group"):
        plotting.plot_relative_drift({"step": np.arange(2)})
    no_split = {k: v for k, v in history.items() if "order" not in k}
    with pytest.raises(ValueError, match="split=False"):
        plotting.plot_split(no_split)
