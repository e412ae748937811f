"""Rules found by the sweep of tiny Hugging Face architectures (GPT-2, GPT-Neo, OPT, Falcon,
BLOOM, ...), checked on hand-written models through the public API.

* a pre-norm residual stream read only by LayerNorms: every layer writing into it keeps its
  centering laws (GPT-2, OPT, ViT, CLIP: the attention output of every layer);
* two embedding tables that are only added (token + position): a translation law per feature;
* ``h @ W.T`` (Falcon's ``FalconLinear``) is a Linear layer, as producer and as consumer;
* a custom ``autograd.Function`` that torch.func cannot run (BLOOM's GELU): ``analyze`` says so
  in its note instead of raising.

Every tracked law is checked independently: ⟨∇h, ∂_θ⟨u, f⟩⟩ ≈ 0 (float64, torch.func).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_conslaw as tc

from graph_helpers import law_residuals, seeded_randn as _x, sync_monitor as _monitor

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ------------------------------------------------------------------ pre-norm residual stream
class PreNorm(nn.Module):
    """h = inp(x); h = h + f(ln1(h)); out(ln2(h)) (+ skip(h) when ``leak``: the stream is also
    read by a layer)."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.inp, self.ln1, self.f, self.ln2, self.out = (
            nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 2))
        self.skip = nn.Linear(6, 2) if leak else None

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f(torch.tanh(self.ln1(h)))
        y = self.out(self.ln2(h))
        return y + self.skip(h) if self.skip is not None else y


def test_a_stream_read_only_by_layer_norms_keeps_the_centering_of_what_writes_into_it():
    torch.manual_seed(0)
    model, x = PreNorm().double(), _x(5, 4, 3)
    groups = {g.name: g for g in _monitor(model, x).groups if g.kind == "linear"}
    # inp's output is read by ln1 and, through the add, by ln2: its 3 column sums and Σ b
    assert groups["inp→ln1 +1 LayerNorms centering"].count == 4
    assert groups["f→ln2 centering"].count == 7
    assert law_residuals(model, x, list(groups.values()), lambda o: o) <= 1e-10


def test_a_stream_also_read_by_a_layer_gets_no_centering_with_the_reason():
    torch.manual_seed(0)
    model, x = PreNorm(leak=True).double(), _x(5, 4, 3)
    monitor = _monitor(model, x)
    # no centering; out.bias − skip.bias is a law (their outputs are only added:
    # tests/test_sweep_decoders.py, parallel biases)
    linear = [(g.name, g.count) for g in monitor.groups if g.kind == "linear"]
    assert not [name for name, _ in linear if "centering" in name]
    assert ("out−skip bias difference", 2) in linear
    reasons = [str(s) for s in monitor.skipped]
    assert any("no LayerNorm centering law for inp" in r and "linear in skip" in r for r in reasons)
    # and the refusal is right: the column sums of inp are not laws here
    from torch_conslaw.laws.groups import LinearLaws

    sums = LinearLaws("inp sums", (("inp.weight", lambda w: w.sum(0)),), dict(model.named_parameters()),
                      producer="inp", consumer="", reason="test")
    assert law_residuals(model, x, [sums], lambda o: o) > 1e-3


# ------------------------------------------------------------------ embedding translation
class TokPos(nn.Module):
    def __init__(self, padding: int | None = None, share: bool = False, positions: int = 5) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(7, 4, padding_idx=padding), nn.Embedding(positions, 4)
        self.squash = False
        self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 7)
        if share:
            self.head.weight = self.tok.weight  # tied: the head reads the token table too

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))[None]
        if self.squash:  # no linear map between the tables and mix: no GL(4) of (tables, mix)
            h = torch.tanh(h)
        return self.head(torch.tanh(self.mix(h)))


def _ids():
    return torch.randint(1, 7, (3, 5), generator=torch.Generator().manual_seed(0))


def test_two_embedding_tables_only_added_keep_a_translation_law_per_feature():
    torch.manual_seed(0)
    model, ids = TokPos().double(), _ids()
    groups = [g for g in _monitor(model, ids).groups if g.kind == "linear"]
    assert [(g.name, g.count) for g in groups] == [("tok−pos translation", 4)]
    assert law_residuals(model, ids, groups, lambda o: o) <= 1e-10
    # by hand: the column sums of both gradients agree
    model.zero_grad()
    model(ids).square().sum().backward()
    assert torch.allclose(model.tok.weight.grad.sum(0), model.pos.weight.grad.sum(0), atol=1e-12)


@pytest.mark.parametrize("kind", ["padding", "shared"])
def test_no_translation_law_with_a_padding_row_or_a_shared_table(kind):
    torch.manual_seed(0)
    model = TokPos(padding=0 if kind == "padding" else None, share=kind == "shared").double()
    ids = _ids()
    ids[0, 0] = 0  # a padding token
    monitor = _monitor(model, ids)
    assert not [g for g in monitor.groups if "translation" in g.name]
    assert any("no embedding translation law" in str(s) and ("padding_idx" if kind == "padding" else "tied") in str(s)
               for s in monitor.skipped)
    model.zero_grad()
    model(ids).square().sum().backward()  # and the law is false there
    assert not torch.allclose(model.tok.weight.grad.sum(0), model.pos.weight.grad.sum(0), atol=1e-6)


# ------------------------------------------------------------------ h @ W.T
class TransposedMLP(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(2, 5))
        self.b1 = nn.Parameter(torch.randn(5)) if bias else None

    def forward(self, x):
        h = x @ self.w1.T
        if self.b1 is not None:
            h = h + self.b1
        return torch.relu(h) @ self.w2.T


@pytest.mark.parametrize("bias", [False, True])
def test_a_matmul_by_a_transposed_weight_is_a_layer(bias):
    torch.manual_seed(0)
    model, x = TransposedMLP(bias).double(), _x(8, 3)
    groups = [g for g in _monitor(model, x).groups]
    assert [(g.kind, g.count, tuple(sorted(g.parameter_names))) for g in groups] == [
        ("unit", 5, tuple(sorted(["w1", "w2"] + (["b1"] if bias else []))))]
    assert law_residuals(model, x, groups, lambda o: o) <= 1e-10
    report = tc.analyze(model, x)
    assert report.tracked_rank == 5 and report.complete


# ------------------------------------------------------------------ a function torch.func cannot run
class _OldStyle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


class OldStyleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_OldStyle.apply(self.a(x)))


def test_analyze_says_when_the_count_cannot_run_under_torch_func():
    torch.manual_seed(0)
    report = tc.analyze(OldStyleNet().double(), _x(6, 3), theta="random")
    assert report.lie_laws is None and report.complete is None
    assert "not computed" in report.lie_note and "setup_context" in report.lie_note


# ------------------------------------------------------------------ entries no input reads
def test_analyze_names_the_missing_laws_that_are_rows_no_input_reads():
    torch.manual_seed(0)
    model, ids = TokPos(positions=8).double(), _ids()  # 5 positions read of 8; token 0 never drawn
    model.squash = True
    report = tc.analyze(model, ids, theta="random")
    assert report.complete is False and report.missing_laws == 16
    note = next(n for n in report.notes if "missing laws are single entries" in n)
    assert note.startswith("16 of the 16 missing laws")
    assert "tok.weight (4 entries: row 0)" in note and "pos.weight (12 entries: rows 5–7)" in note
    # by hand: those rows get no gradient on any input of the count's kind
    model.zero_grad()
    model(_ids()).square().sum().backward()
    assert not model.pos.weight.grad[5:].any() and not model.tok.weight.grad[0].any()


# ------------------------------------------------------------------ key bias through a 0-d scale
class ScaledKeys(nn.Module):
    """q·(k / s)ᵀ with s a 0-d tensor (DeBERTa-v2 divides the keys by torch.sqrt(tensor(d)))."""

    def __init__(self, viewed: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))
        self.viewed = viewed

    def forward(self, x):
        scale = torch.sqrt(torch.tensor(4.0, dtype=x.dtype))
        s = torch.bmm(self.q(x), self.k(x).transpose(-1, -2) / scale)
        if self.viewed:  # DeBERTa: bmm on (batch·heads, n, n), then a view to (batch, heads, n, n)
            s = s.view(x.shape[0], 1, x.shape[1], x.shape[1])
        p = torch.softmax(s, dim=-1).reshape(x.shape[0], x.shape[1], x.shape[1])
        return self.o(p @ self.v(x))


@pytest.mark.parametrize("viewed", [False, True], ids=["scaled", "scaled-and-viewed"])
def test_the_key_bias_law_holds_through_a_zero_dimensional_scale_and_a_view_of_the_scores(viewed):
    torch.manual_seed(0)
    model, x = ScaledKeys(viewed).double(), _x(3, 5, 4)
    groups = [g for g in _monitor(model, x).groups if g.kind == "linear"]
    assert [(g.name, g.count) for g in groups] == [("k key bias", 4)]
    assert law_residuals(model, x, groups, lambda o: o) <= 1e-10
    model.zero_grad()
    model(x).square().sum().backward()  # by hand: the key bias gets no gradient
    assert model.k.bias.grad.abs().max() <= 1e-12 * model.q.bias.grad.abs().max()


# ------------------------------------------------------------------ an inconsistent eps = 0 count
def test_a_count_at_eps_zero_below_the_count_is_said_not_printed_as_negative():
    from types import SimpleNamespace

    report = tc.analyze(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    report.lie = SimpleNamespace(approximate_laws=-14, n_laws_eps0=224)  # as measured on a tiny OPT in the sweep
    text = str(report)
    assert "plus -14" not in text and "found 14 law(s) FEWER (224)" in text


# ------------------------------------------------------------------ parameters added into the stream
class TinyViT(nn.Module):
    """[CLS] + patches (a Linear) + position parameter, a pre-norm block, a final LayerNorm read
    at [CLS] (``leak``: the stream is also returned)."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.patch, self.cls, self.pos = nn.Linear(3, 4), nn.Parameter(torch.randn(1, 1, 4)), nn.Parameter(torch.randn(1, 6, 4))
        self.ln1, self.f, self.ln = nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4)
        self.leak = leak

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.patch(x)], dim=1) + self.pos
        h = h + self.f(torch.tanh(self.ln1(h)))
        out = self.ln(h)[:, 0]
        return (out, h) if self.leak else out


def test_parameters_added_into_a_stream_read_only_by_layer_norms_keep_their_row_sums():
    torch.manual_seed(0)
    model, x = TinyViT().double(), _x(3, 5, 3)
    groups = {g.name: g for g in _monitor(model, x).groups if g.kind == "linear"}
    assert groups["cls→ln1 +1 LayerNorms centering"].count == 1
    assert groups["pos→ln1 +1 LayerNorms centering"].count == 6
    assert groups["patch→ln1 +1 LayerNorms centering"].count == 4  # 3 columns + Σ b
    assert law_residuals(model, x, list(groups.values()), lambda o: o) <= 1e-10
    model.zero_grad()
    model(x).square().sum().backward()  # by hand: the row sums of the gradients vanish
    assert model.pos.grad.sum(-1).abs().max() <= 1e-12 and model.cls.grad.sum().abs() <= 1e-12


def test_no_row_sums_when_the_stream_is_also_returned():
    torch.manual_seed(0)
    model, x = TinyViT(leak=True).double(), _x(3, 5, 3)
    monitor = _monitor(model, x)
    assert not [g for g in monitor.groups if g.kind == "linear" and "centering" in g.name]
    assert any("no LayerNorm centering law for cls" in str(s) and "the model's output" in str(s) for s in monitor.skipped)


# ------------------------------------------------------------------ a bias table added into softmax scores
class RelBias(nn.Module):
    """Scores q·kᵀ + B[bucket(i, j), h] (T5's relative position bias, heads on the table's
    columns); ``keys_on_columns``: the table's columns land on the key axis instead."""

    def __init__(self, keys_on_columns: bool = False) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(4, 12), nn.Linear(4, 4)
        self.bias = nn.Embedding(9, 5 if keys_on_columns else 2)
        self.keys_on_columns = keys_on_columns

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, 2, 2).transpose(1, 2) for t in self.qkv(x).split(4, -1))
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None] + 4
        if self.keys_on_columns:  # [i, j] reads row rel[i, 0], column j
            table = self.bias(rel[:, :1]).squeeze(1)[None, None]
        else:
            table = self.bias(rel).permute(2, 0, 1).unsqueeze(0)
        p = torch.softmax(q @ k.transpose(-1, -2) + table, dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, n, 4))


def test_a_bias_table_added_into_softmax_scores_keeps_its_column_sums():
    torch.manual_seed(0)
    model, x = RelBias().double(), _x(3, 5, 4)
    groups = [g for g in _monitor(model, x).groups if g.kind == "linear"]
    assert [(g.name, g.count) for g in groups] == [("qkv key bias", 4), ("bias score bias", 2)]
    assert law_residuals(model, x, groups, lambda o: o) <= 1e-10
    model.zero_grad()
    model(x).square().sum().backward()  # by hand: each column of the table's gradient sums to zero
    assert model.bias.weight.grad.sum(0).abs().max() <= 1e-12 * model.bias.weight.grad.abs().max()


def test_no_column_sums_when_the_columns_lie_along_the_softmax():
    torch.manual_seed(0)
    model, x = RelBias(keys_on_columns=True).double(), _x(3, 5, 4)
    assert not [g for g in _monitor(model, x).groups if "score bias" in g.name]
    model.zero_grad()
    model(x).square().sum().backward()
    assert model.bias.weight.grad.sum(0).abs().max() > 1e-6


def test_t5_relative_bias_shared_by_two_layers_keeps_its_column_sums():
    from graph_models import build as build_hf, t5

    model, example, pick, _ = build_hf(t5, "eager")
    model.eval()
    groups = [g for g in _monitor(model, example).groups if "score bias" in g.name]
    assert [g.count for g in groups] == [model.config.num_heads]
    assert law_residuals(model, example, groups, pick) <= 1e-10


class ConvViT(nn.Module):
    """ViT's patch embedding: a Conv2d, flatten(2).transpose(1, 2), [CLS], positions, pre-norm."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(2, 4, 2, stride=2)
        self.cls, self.pos = nn.Parameter(torch.randn(1, 1, 4)), nn.Parameter(torch.randn(1, 5, 4))
        self.ln1, self.f, self.ln = nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), p], dim=1) + self.pos
        h = h + self.f(torch.tanh(self.ln1(h)))
        return self.ln(h)[:, 0]


def test_a_patch_convolution_whose_channels_become_the_features_keeps_its_centering():
    torch.manual_seed(0)
    model, x = ConvViT().double(), _x(3, 2, 4, 4)
    groups = {g.name: g for g in _monitor(model, x).groups if g.kind == "linear"}
    assert groups["patch→ln1 +1 LayerNorms centering"].count == 2 * 2 * 2 + 1  # Σ_out W[out] per (c, i, j), Σ b
    assert law_residuals(model, x, list(groups.values()), lambda o: o) <= 1e-10
    model.zero_grad()
    model(x).square().sum().backward()  # by hand: summed over output channels, the gradients vanish
    assert model.patch.weight.grad.sum(0).abs().max() <= 1e-12 and model.patch.bias.grad.sum().abs() <= 1e-12
