"""Rules found by the sweep of tiny Hugging Face decoders (results/hf_sweep_decoders.md),
checked on hand-written modules through the public API.

* partial rotary embeddings (GPT-NeoX, Phi, StableLM, Persimmon): RoPE on the first coordinates
  of each head, ``cat((rotated, rest), -1)``; the coordinates it leaves as they are keep the full
  q·k matrix law among themselves (one M per head on those coordinates) and their key bias;
* parallel blocks (GPT-NeoX, Phi): x + attn(ln1(x)) + mlp(ln2(x)): the two output biases shift the
  sum alike, so b_attn − b_mlp is a linear law;
* XGLM: embeddings scaled by a number still reach only LayerNorms (row sums), and scores floored at
  finfo.min before the softmax keep the key bias; Persimmon: the β of a LayerNorm on the keys is a
  key bias;
* Cohere: a LayerNorm written by hand (x − mean(x, -1)) is a centering, and its γ cast to float32
  is still the gain of a unit;
* OLMo: the linear layers that read a LayerNorm without affine parameters keep their row sums;
* casts to float32 inside a model (Hugging Face eager softmax, OLMo's LayerNorm): the count runs
  them in float64 (the function in exact arithmetic), and the check of the laws skips the casts
  that change nothing in the model's own precision.

Every tracked law is checked independently: ⟨∇h, ∂_θ⟨u, f⟩⟩ ≈ 0 (float64, torch.func), and the
symmetry behind each new law by hand.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import torch_conslaw as tc
from torch_conslaw import ConservationMonitor

from graph_helpers import law_residuals, seeded_randn as _x

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _groups(model, x):
    return {g.name: g for g in ConservationMonitor(model, x, every=1, recording="sync").groups}


# ------------------------------------------------------------------ partial rotary embeddings
def _rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


class PartialRope(nn.Module):
    """Causal-free attention with RoPE on the first ``rot`` of the ``d // heads`` coordinates of
    each head (GPT-NeoX's ``rotary_pct``, Phi's ``partial_rotary_factor``)."""

    def __init__(self, d: int = 8, heads: int = 2, rot: int = 2, T: int = 5) -> None:
        super().__init__()
        self.h, self.dh, self.rot = heads, d // heads, rot
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=F64) / rot))
        ang = torch.outer(torch.arange(T, dtype=F64), inv)
        ang = torch.cat((ang, ang), -1)
        self.register_buffer("cos", ang.cos())
        self.register_buffer("sin", ang.sin())

    def split(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.h, self.dh).transpose(1, 2)

    def rope(self, x):
        r, p = x[..., : self.rot], x[..., self.rot:]
        return torch.cat((r * self.cos + _rotate_half(r) * self.sin, p), -1)

    def forward(self, x):
        q, k, v = self.rope(self.split(self.q(x))), self.rope(self.split(self.k(x))), self.split(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.dh**0.5, -1) @ v
        return self.o(a.transpose(1, 2).reshape(x.shape))


def _pass_rows(model, head):
    """Rows of the q / k projections (weight and bias) that hold the unrotated coordinates of a head."""
    return [head * model.dh + j for j in range(model.rot, model.dh)]


def test_partial_rotary_keeps_the_matrix_law_and_the_key_bias_of_the_unrotated_coordinates():
    torch.manual_seed(0)
    model, x = PartialRope(d=12, rot=2).to(F64), _x(2, 5, 12)  # 6 coordinates per head, 4 unrotated
    groups = _groups(model, x)
    mixed = [g for n, g in groups.items() if "4 coordinates mixed alike" in n]
    assert len(mixed) == 2 and all(g.kind == "matrix" and g.count == 10 for g in mixed)  # 4·5/2 per head
    planes = [g for n, g in groups.items() if "planes of 2" in n]
    assert len(planes) == 2 and all(g.count == 1 for g in planes)  # the rotated plane: ‖q rows‖² − ‖k rows‖²
    bias = groups["k key bias"]
    assert bias.kind == "linear" and bias.count == 8  # the 4 unrotated key-bias entries of each head
    assert law_residuals(model, x, list(groups.values()), lambda y: y) < 1e-10
    # by hand: q_P → q_P M, k_P → k_P M^{-T} on the unrotated rows of head 0 leaves the output unchanged
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = _pass_rows(model, 0)
    M = torch.eye(4, dtype=F64) + 0.3 * _x(4, 4, seed=3)
    moved = dict(params)
    for name, factor in (("q", M), ("k", torch.linalg.inv(M).T)):
        W = torch.cat([params[f"{name}.weight"], params[f"{name}.bias"][:, None]], 1).clone()
        W[rows] = factor.T @ W[rows]  # the coordinates of a query (a key) are the rows of [W b]
        moved[f"{name}.weight"], moved[f"{name}.bias"] = W[:, :-1], W[:, -1]
    assert torch.allclose(functional_call(model, moved, (x,)), model(x), atol=1e-12)
    # ... while the same M on every coordinate of the head (rotated ones included) changes it
    rows_all = list(range(model.dh))
    M6 = torch.eye(6, dtype=F64) + 0.3 * _x(6, 6, seed=4)
    moved = dict(params)
    for name, factor in (("q", M6), ("k", torch.linalg.inv(M6).T)):
        W = torch.cat([params[f"{name}.weight"], params[f"{name}.bias"][:, None]], 1).clone()
        W[rows_all] = factor.T @ W[rows_all]
        moved[f"{name}.weight"], moved[f"{name}.bias"] = W[:, :-1], W[:, -1]
    assert not torch.allclose(functional_call(model, moved, (x,)), model(x), atol=1e-6)


def test_partial_rotary_attention_is_complete():
    torch.manual_seed(0)
    model, x = PartialRope(d=8, rot=2).to(F64), _x(2, 5, 8)
    report = tc.analyze(model, x, theta="random", max_seconds=60)
    # per head: 3 (2 unrotated coordinates) + 1 (the rotated plane) + 10 (value → output) + 2 key bias
    assert report.tracked_rank == report.lie_laws == 32 and report.complete


# ------------------------------------------------------------------ parallel blocks
class Parallel(nn.Module):
    """h = inp(x); h = m(relu(fc(ln2 h))) + a(tanh(ln1 h)) + h; head(tanh(lnf h)) (the order of
    GPT-NeoX's parallel residual: mlp + attn + residual). ``sequential``: h = h + a(...), then
    h = h + m(...ln2(h)), as GPT-2 (the attention output also reaches ln2: no law)."""

    def __init__(self, d: int = 4, sequential: bool = False) -> None:
        super().__init__()
        self.sequential = sequential
        self.inp = nn.Linear(3, d)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.a, self.fc, self.m = nn.Linear(d, d), nn.Linear(d, 6), nn.Linear(6, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.inp(x)
        if self.sequential:
            h = h + self.a(torch.tanh(self.ln1(h)))
            h = h + self.m(torch.relu(self.fc(self.ln2(h))))
        else:
            h = self.m(torch.relu(self.fc(self.ln2(h)))) + self.a(torch.tanh(self.ln1(h))) + h
        return self.head(torch.tanh(self.lnf(h)))


def test_parallel_block_biases_keep_their_difference():
    torch.manual_seed(0)
    model, x = Parallel().to(F64), _x(5, 3)
    groups = _groups(model, x)
    diff = groups["m−a bias difference"]
    assert diff.kind == "linear" and diff.count == 4
    assert law_residuals(model, x, list(groups.values()), lambda y: y) < 1e-10
    # by hand: both biases get the same gradient under a random loss
    params = {n: p.detach() for n, p in model.named_parameters()}
    target = _x(5, 2, seed=2)
    g = grad(lambda p: (functional_call(model, p, (x,)) - target).pow(3).sum())(params)
    assert torch.allclose(g["m.bias"], g["a.bias"], atol=1e-13) and g["m.bias"].abs().max() > 1e-3
    report = tc.analyze(model, x, theta="random", max_seconds=60)
    assert report.tracked_rank == report.lie_laws == 29 and report.complete
    # the translation rule sees the same two added terms: the laws are tracked once
    monitor = ConservationMonitor(model, x)
    pair = [g.name for g in monitor.groups if set(g.parameter_names) == {"m.bias", "a.bias"}]
    assert pair == ["m−a bias difference"]


def test_sequential_block_biases_have_no_difference_law():
    torch.manual_seed(0)
    model, x = Parallel(sequential=True).to(F64), _x(5, 3)
    groups = _groups(model, x)
    assert not any("bias difference" in n for n in groups)
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = grad(lambda p: functional_call(model, p, (x,)).pow(3).sum())(params)
    assert not torch.allclose(g["m.bias"], g["a.bias"], atol=1e-6)


def test_downsampling_block_batch_norm_shifts_keep_their_difference():
    """relu(bn2(conv2(·)) + bn_s(conv_s(x))) (a ResNet downsampling block): β_bn2 − β_s per channel,
    with batch statistics (train mode) as with running ones."""
    from graph_models import BasicBlock

    torch.manual_seed(0)
    model, x = BasicBlock(2, 3, 2).to(F64), _x(4, 2, 6, 6)
    for train in (True, False):
        model.train(train)
        groups = _groups(model, x)
        diff = groups["bn2−shortcut.1 bias difference"]
        assert diff.kind == "linear" and diff.count == 3
        copy = deepcopy(model)  # plain autograd (train-mode BatchNorm updates its running statistics)
        copy(x).pow(3).sum().backward()
        gb, gs = copy.bn2.bias.grad, copy.shortcut[1].bias.grad
        assert torch.allclose(gb, gs, atol=1e-12) and gb.abs().max() > 1e-3
    model.eval()
    assert law_residuals(model, x, [diff], lambda y: y) < 1e-10


# ------------------------------------------------------------------ XGLM, Persimmon: scaled embeddings, floored scores, normed keys
class XglmLike(nn.Module):
    """Scaled token embeddings (× √d) into a pre-norm stream read only by LayerNorms; attention
    scores floored at finfo.min (``torch.max(s, torch.tensor(finfo.min))``) before the softmax;
    ``normed_keys``: the keys pass a LayerNorm with affine (γ, β) per head first (Persimmon's
    ``k_layernorm``), so β is added to every key alike."""

    def __init__(self, d: int = 4, vocab: int = 6, normed_keys: bool = False) -> None:
        super().__init__()
        self.d = d
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.kn = nn.LayerNorm(d) if normed_keys else None
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.emb(ids) * self.d**0.5
        a = self.ln1(h)
        k = self.k(a) if self.kn is None else self.kn(self.k(a))
        s = self.q(a) @ k.transpose(-1, -2)
        s = torch.max(s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype))
        h = h + self.o(torch.softmax(s, -1) @ self.v(a))
        return self.head(torch.tanh(self.lnf(h)))


def test_scaled_embeddings_and_floored_scores_keep_centering_and_key_bias():
    torch.manual_seed(0)
    model, ids = XglmLike().to(F64), torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    groups = _groups(model, ids)
    assert groups["k key bias"].count == 4
    assert groups["emb→ln1 +1 LayerNorms centering"].count == 6  # one row sum per token
    assert law_residuals(model, ids, list(groups.values()), lambda y: y) < 1e-10
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = grad(lambda p: functional_call(model, p, (ids,)).pow(3).sum())(params)
    assert g["k.bias"].abs().max() < 1e-12 and g["emb.weight"].sum(1).abs().max() < 1e-12
    assert g["emb.weight"].abs().max() > 1e-3


def test_the_bias_of_a_layer_norm_on_the_keys_is_a_key_bias():
    torch.manual_seed(0)
    model, ids = XglmLike(normed_keys=True).to(F64), torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    groups = _groups(model, ids)
    assert groups["kn key bias"].count == 4 and "k key bias" not in groups  # k's bias is centered away by kn
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = grad(lambda p: functional_call(model, p, (ids,)).pow(3).sum())(params)
    assert g["kn.bias"].abs().max() < 1e-12 and g["kn.weight"].abs().max() > 1e-3
    exact = [grp for grp in groups.values() if grp.kind != "approximate"]  # k→kn scale: exact at eps = 0 only
    assert law_residuals(model, ids, exact, lambda y: y) < 1e-10


# ------------------------------------------------------------------ float32 upcasts inside a float64 model
class UpcastAttention(nn.Module):
    """Attention whose softmax runs in float32 and is cast back (Hugging Face eager attention:
    ``softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)``); q and k have no bias (their
    key-bias law holds only up to that rounding in the model itself)."""

    def __init__(self, d: int = 8, heads: int = 2, upcast: bool = True, key_bias: bool = False) -> None:
        super().__init__()
        self.h, self.dh, self.upcast = heads, d // heads, upcast
        self.q, self.k = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=key_bias)
        self.v, self.o = nn.Linear(d, d), nn.Linear(d, d)

    def split(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.h, self.dh).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        s = q @ k.transpose(-1, -2) / self.dh**0.5
        p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) if self.upcast else torch.softmax(s, -1)
        return self.o((p @ v).transpose(1, 2).reshape(x.shape))


def test_the_count_runs_float32_upcasts_of_a_float64_model_in_float64():
    """Before: the count saw the float32 rounding of the softmax as extra fields (33 laws instead
    of 40, every tracked law 'not exact', 33 'missing'). The count is of the function in exact
    arithmetic: the same model with a float64 softmax gives the same number, and a note says so."""
    torch.manual_seed(0)
    x = _x(2, 5, 8)
    counts = {}
    for upcast in (True, False):
        torch.manual_seed(0)
        model = UpcastAttention(upcast=upcast).to(F64)
        report = tc.analyze(model, x, theta="random", max_seconds=60)
        counts[upcast] = (report.tracked_rank, report.lie_laws, report.complete)
        noted = [n for n in report.notes if "runs them in float64" in n]
        assert bool(noted) == upcast
    assert counts[True] == counts[False] == (40, 40, True)  # per head: 10 (q·k) + 10 (value → output)


def test_a_key_bias_refused_for_the_model_s_precision_is_said_to_be_one():
    """With a key bias and the float32 softmax in a float64 model, the key bias is a law of the
    exact function (the count finds it) that the rule refuses for this model: the note on
    zero-gradient entries says so instead of calling them laws of these inputs only."""
    torch.manual_seed(0)
    model, x = UpcastAttention(key_bias=True).to(F64), _x(2, 5, 8)
    report = tc.analyze(model, x, theta="random", max_seconds=60)
    assert (report.tracked_rank, report.lie_laws, report.missing_laws) == (40, 48, 8)
    note = next(n for n in report.notes if "single entries" in n)
    assert "k.bias (8 entries)" in note and "a rule refused for this model" in note and "below the precision" in note


class UpcastNorm(nn.Module):
    """OLMo's LayerNorm: no affine, computed in float32 and cast back (``exact``: in the input's dtype)."""

    exact = False

    def forward(self, x):
        work = x.dtype if self.exact else torch.float32
        return torch.nn.functional.layer_norm(x.to(work), x.shape[-1:], None, None, 1e-5).to(x.dtype)


class UpcastPreNorm(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.inp, self.f, self.head = nn.Linear(3, d), nn.Linear(d, d), nn.Linear(d, 2)
        self.n1, self.n2 = UpcastNorm(), UpcastNorm()

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f(torch.tanh(self.n1(h)))
        return self.head(self.n2(h))


def test_casts_that_are_no_ops_in_the_model_do_not_round_the_check_of_its_laws():
    """A float32 model whose LayerNorm casts to float32 (a no-op there, OLMo): the float64 check
    used to round at that cast and refuse the centering laws (|cos| ≈ 4e-8); it now keeps float64
    there. In a float64 model the same cast really rounds, and the laws stay refused."""
    torch.manual_seed(0)
    model, x = UpcastPreNorm(), torch.randn(5, 4, 3)
    groups = _groups(model, x)
    assert sorted((n, g.count) for n, g in groups.items()) == [
        ("f→n2 centering", 7), ("inp→n1 +1 LayerNorms centering", 4), ("n2→head centered input", 2)]
    exact = UpcastPreNorm().to(F64)  # the same function in float64, without the casts: an independent check
    exact.load_state_dict(model.state_dict())
    for norm in (exact.n1, exact.n2):
        norm.exact = True
    assert law_residuals(exact, x.to(F64), list(groups.values()), lambda y: y) < 1e-10
    monitor = ConservationMonitor(model.to(F64), x.to(F64), every=1, recording="sync")
    assert not monitor.groups
    assert sum("centering fails the numerical check" in str(s) for s in monitor.skipped) == 2



class HandLayerNorm(nn.Module):
    """CohereLayerNorm: no bias, the statistics written by hand in float32, γ cast too
    (``exact``: in the input's dtype, for an independent float64 check)."""

    exact = False

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        work = x.dtype if self.exact else torch.float32
        h = x.to(work)
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        h = (h - mean) * torch.rsqrt(var + 1e-5)
        return (self.weight.to(work) * h).to(x.dtype)


class HandNormBlock(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.inp, self.f, self.head = nn.Linear(3, d), nn.Linear(d, d), nn.Linear(d, 2)
        self.n1, self.n2 = HandLayerNorm(d), HandLayerNorm(d)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f(self.n1(h))
        return self.head(torch.tanh(self.n2(h)))


def test_a_hand_written_layer_norm_centers_and_its_cast_gain_rescales():
    """Cohere's LayerNorm (x − mean(x)) · rsqrt(var + eps), γ.to(float32) ⊙ ·: the layers writing
    into the stream it reads keep their column sums, and γ_c ↔ the columns of the next layer."""
    torch.manual_seed(0)
    model, x = HandNormBlock(), torch.randn(5, 4, 3)
    groups = _groups(model, x)
    assert sorted((n, g.count) for n, g in groups.items()) == [
        ("f→n2 centering", 7), ("inp→n1 +1 LayerNorms centering", 4), ("n1→f", 6)]
    exact = HandNormBlock().to(F64)
    exact.load_state_dict(model.state_dict())
    for norm in (exact.n1, exact.n2):
        norm.exact = True
    assert law_residuals(exact, x.to(F64), list(groups.values()), lambda y: y) < 1e-10
    params = {n: p.detach() for n, p in exact.named_parameters()}
    g = grad(lambda p: functional_call(exact, p, (x.to(F64),)).pow(3).sum())(params)
    assert g["inp.weight"].sum(0).abs().max() < 1e-12 and g["f.bias"].sum().abs() < 1e-12



class PlainNormConsumers(nn.Module):
    """OLMo: a LayerNorm without affine parameters read by two linear layers (and by the residual
    path through a third): each consumer's row sums are laws (its inputs sum to zero)."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.head = nn.Linear(3, d), nn.Linear(d, 4), nn.Linear(d, 4), nn.Linear(4, 2)

    def forward(self, x):
        n = torch.nn.functional.layer_norm(self.inp(x), (5,))
        return self.head(torch.tanh(self.a(n)) * self.b(n)) + n[..., :2]


def test_linear_layers_reading_a_plain_layer_norm_keep_their_row_sums():
    torch.manual_seed(0)
    model, x = PlainNormConsumers().to(F64), _x(6, 3)
    groups = _groups(model, x)
    assert groups["layer_norm→a centered input"].count == 4 and groups["layer_norm→b centered input"].count == 4
    assert law_residuals(model, x, [g for g in groups.values() if g.kind != "approximate"], lambda y: y) < 1e-10
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = grad(lambda p: functional_call(model, p, (x,)).pow(3).sum())(params)
    assert g["a.weight"].sum(1).abs().max() < 1e-12 and g["b.weight"].sum(1).abs().max() < 1e-12
    assert g["head.weight"].sum(1).abs().max() > 1e-3  # head reads no centered input: no such law
