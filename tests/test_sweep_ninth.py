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
