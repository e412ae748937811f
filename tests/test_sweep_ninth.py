"""Findings of the ninth sweep of tiny Hugging Face architectures (experiments/hf_sweep.py,
the section "added by the ninth sweep"; table in results/hf_sweep_ninth.md), checked on
hand-written models through the public API:

* a float32 model whose forward multiplies a cast activation (``flat.float()``, a no-op in
  float32) with a tensor it makes itself in float32 from integers (Siglip2's vision embeddings
  resize their position table with ``weights @ flat_embeddings.float()``, ``weights`` from
  ``spatial_shapes.float()`` and ``torch.arange(..., dtype=torch.float32)``): the monitor's
  float64 check keeps the cast in float64 but not the factory's float32, and the product raised
  ``expected m1 and m2 to have the same dtype``; the monitor warned "the numerical check of the
  laws failed to run" and tracked the layer-pair laws unverified (Siglip2 float32: 104 unverified
  laws instead of the float64 monitor's 155). Such a product now computes in float64
  (``lie.elementary._products_lifted``), as torch promotes in elementwise ops.
* a model with no law must say why truthfully: MobileNetV1 (every convolution → BatchNorm →
  ReLU6, built in eval mode) got "BatchNorm2d renormalizes the units, so the rescaling law does
  not hold across it" for each conv → BatchNorm pair; in eval mode a BatchNorm does not
  renormalize (γ_c (x − μ_c) / σ_c + β_c with its running statistics), and the rescaling
  W_c → cW_c, γ_c → γ_c / c is an exact symmetry while μ_c = 0 (fresh statistics: measured
  |cos| ≤ 2.3e-17 on TextNet and MobileNetV1, 0.08 / 0.97 with μ ~ N(0, 0.25)); the reason now
  says so (a law the library does not track: reported, not added).

Every claim is checked independently (torch.func on the model itself, in float64).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vjp

import torch_conslaw as tc

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


class _FactoryWeights(nn.Module):
    """ReLU MLP whose output rows are mixed by weights the forward makes in float32 from integers,
    times the output cast with ``.float()`` (Siglip2's ``weights @ flat_embeddings.float()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        n = torch.arange(1, x.shape[0] + 1, dtype=torch.float32)
        w = torch.outer(n, n.flip(0)) / n.sum()
        return (w @ self.b(torch.relu(self.a(x))).float()).to(x.dtype)


def _unit_laws(p):
    """‖W_a[j]‖² + b_a[j]² − ‖W_b[:, j]‖² for the 4 hidden units (written out by hand)."""
    return p["a.weight"].square().sum(1) + p["a.bias"].square() - p["b.weight"].square().sum(0)


def test_float32_product_with_factory_weights_is_verified():
    torch.manual_seed(0)
    model, x = _FactoryWeights(), torch.randn(6, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = tc.ConservationMonitor(model, x)
    assert not [w for w in caught if "failed to run" in str(w.message)], [str(w.message) for w in caught]
    assert sum(g.count for g in monitor.groups) == 4
    assert all(row["verified"] for row in monitor.summary())
    # the tracked laws are the four unit laws (values at θ), and those hold by hand in float64
    params = {k: v.detach().to(F64) for k, v in model.named_parameters()}
    tracked = torch.cat([g.values(params).reshape(-1) for g in monitor.groups])
    assert torch.allclose(tracked.sort().values, _unit_laws(params).sort().values, atol=1e-12)
    model64 = _FactoryWeights().to(F64)
    model64.load_state_dict(params)
    out, pull = vjp(lambda p: functional_call(model64, p, (x.to(F64),)), params)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        g = pull(torch.randn(out.shape, generator=gen, dtype=F64))[0]
        for j in range(4):
            dh = grad(lambda p: _unit_laws(p)[j])(params)
            dot = sum((dh[k] * g[k]).sum() for k in params)
            scale = torch.sqrt(sum(dh[k].square().sum() for k in params) * sum(g[k].square().sum() for k in params))
            assert float(dot.abs() / scale) < 1e-12


def _conv_bn_relu6():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU6(), nn.Conv2d(3, 2, 1)).to(F64)
    return model.eval(), torch.randn(2, 1, 6, 6, dtype=F64)


def _rescaling_residual(model, x):
    """max |cos(∇(‖W_c‖² − γ_c²), ∂fᵀu)| over the 3 channels of conv 0 → BatchNorm 1 (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out, pull = vjp(lambda p: functional_call(model, p, (x,)), params)
    gen, worst = torch.Generator().manual_seed(1), 0.0
    W, gam = params["0.weight"], params["1.weight"]
    for _ in range(3):
        g = pull(torch.randn(out.shape, generator=gen, dtype=F64))[0]
        for c in range(3):
            dot = (W[c] * g["0.weight"][c]).sum() - gam[c] * g["1.weight"][c]
            scale = torch.sqrt((W[c].square().sum() + gam[c] ** 2) * (g["0.weight"][c].square().sum() + g["1.weight"][c] ** 2))
            worst = max(worst, float(dot.abs() / scale))
    return worst


def test_eval_mode_batch_norm_reason_is_truthful():
    model, x = _conv_bn_relu6()
    with pytest.warns(RuntimeWarning, match="no conservation law is tracked"):
        monitor = tc.ConservationMonitor(model, x)
    assert monitor.groups == []
    reasons = [str(s) for s in monitor.skipped if s.producer == "0" and s.consumer == "1"]
    pair = [r for r in reasons if r.startswith("between 0 (Conv2d) and 1 (BatchNorm2d)")]
    assert pair and "is in eval mode: a fixed affine map per channel" in pair[0], reasons
    assert "running mean μ_c is zero" in pair[0] and "renormalizes" not in pair[0]
    # independent: the symmetry the reason names holds at μ = 0 and breaks at μ ≠ 0
    assert _rescaling_residual(model, x) < 1e-12
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.5, -0.4, 0.3], dtype=F64))
    assert _rescaling_residual(model, x) > 1e-3
    model.train()  # train mode: the BatchNorm renormalizes, the wording is unchanged
    reasons = [str(s) for s in tc.find_structure(model).skipped]
    assert any("1 (BatchNorm2d) renormalizes the units" in r for r in reasons), reasons
