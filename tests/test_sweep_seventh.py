"""Findings of the seventh sweep of tiny Hugging Face architectures (experiments/hf_sweep.py,
the section "added by the seventh sweep"; table in results/hf_sweep_seventh.md), checked on
hand-written models through the public API:

* an ``nn.Embedding(padding_idx=...)`` normalized right away (ModernBERT's embeddings:
  ``tok_embeddings`` → ``norm``, a LayerNorm) crashed ``ConservationMonitor`` and ``analyze``
  with ``ValueError: has padding_idx=0: ...``: the scale family asked the embedding for the rows
  of its units, which it refuses; the pair is now skipped with that reason.
* ``analyze`` at the model's θ then failed in the count at eps = 0 (the padding row is zero, and
  a LayerNorm of a zero row at eps = 0 is 0 / 0): the count at eps = 0 is now left out with a note.
* a forward that casts its own module (Switch Transformers' router runs
  ``self.classifier = self.classifier.to(router_dtype)``, float32 in a float64 model) made
  ``analyze`` fail in the count (``RuntimeError: mat1 and mat2 must have the same dtype``); the
  count is now "not computed" with a note naming the dtypes, a parameter and the model's line.

Every claim is checked independently (torch.func on the model itself).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, vjp

import torch_conslaw as tc

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


class _PaddedEmbeddingNorm(nn.Module):
    """Token embedding with a padding row, then LayerNorm, then a head (ModernBERT's embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)))


def _model_and_ids():
    torch.manual_seed(0)
    model = _PaddedEmbeddingNorm().to(F64)
    ids = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 0]])  # reads the padding row
    return model, ids


def _pullbacks(model, ids, n=3):
    """∂fᵀu for n random u, by torch.func (independent of the library's check)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out, pull = vjp(lambda p: functional_call(model, p, (ids,)), params)
    gen = torch.Generator().manual_seed(5)
    return [pull(torch.randn(out.shape, dtype=F64, generator=gen))[0] for _ in range(n)]


def _worst_by_hand(model, ids, groups):
    """Worst |⟨∇h_l, ∂fᵀu⟩| / (‖∇h_l‖ ‖∂fᵀu‖) over every law of every group."""
    pulls = _pullbacks(model, ids)
    worst = 0.0
    for g in groups:
        P = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        h = g.values(P)
        for l in range(h.numel()):
            grads = torch.autograd.grad(h[l], list(P.values()), retain_graph=True, allow_unused=True)
            gh = torch.cat([(z if z is not None else torch.zeros_like(v)).reshape(-1) for z, v in zip(grads, P.values())])
            for q in pulls:
                gq = torch.cat([q[k].reshape(-1) for k in P])
                worst = max(worst, float((gh @ gq).abs() / (gh.norm() * gq.norm())))
    return worst


def test_padded_embedding_before_a_norm_is_skipped_not_a_crash():
    model, ids = _model_and_ids()
    # independent: the forward reads the padding row, and its gradient is zero
    assert all(float(q["emb.weight"][0].abs().max()) == 0.0 for q in _pullbacks(model, ids))
    mon = tc.ConservationMonitor(model, ids)  # before the fix: ValueError: has padding_idx=0 ...
    assert mon.groups and sum(g.count for g in mon.groups) == 17
    assert _worst_by_hand(model, ids, mon.groups) < 1e-12
    reasons = [str(s) for s in mon.skipped]
    assert any("no scale law for emb (Embedding) before norm (LayerNorm)" in r and "padding_idx=0" in r for r in reasons)


def test_analyze_at_a_zero_padding_row_leaves_out_the_eps_zero_count():
    model, ids = _model_and_ids()
    # independent: at eps = 0 the LayerNorm of the (zero) padding row is 0 / 0
    row = model.emb.weight.detach()[0]
    assert float(row.abs().max()) == 0.0
    assert torch.isnan(nn.functional.layer_norm(row, (4,), eps=0.0)).all()
    r = tc.analyze(model, ids, max_seconds=30)  # before the fix: ValueError (padding_idx, then non-finite brackets)
    assert r.tracked_rank == 17
    assert r.lie_laws is not None and r.lie_laws >= r.tracked_rank
    assert "no count at eps = 0" in str(r) and "theta='random'" in str(r)


class _SelfCastingRouter(nn.Module):
    """Casts its own gate to float32 inside forward (as Switch Transformers' router does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        self.gate = self.gate.to(torch.float32)
        g = torch.softmax(self.gate(h.float()), -1).to(h.dtype)
        return self.fc2(h) * g.max(-1, keepdim=True).values


def test_a_forward_that_casts_its_own_module_gets_a_count_note_not_a_crash():
    torch.manual_seed(0)
    model = _SelfCastingRouter().to(F64)
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    model(x)  # independent: after one forward the parameters are of two dtypes
    assert {p.dtype for p in model.parameters()} == {torch.float64, torch.float32}
    r = tc.analyze(model, x, max_seconds=20)  # before the fix: RuntimeError (mat1 and mat2 ... same dtype)
    assert r.lie_laws is None and r.complete is None
    assert "several dtypes" in r.lie_note and "gate.weight" in r.lie_note
    assert "test_sweep_seventh.py:" in r.lie_note  # the model's line
