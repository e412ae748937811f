"""Findings of the fourth sweep of tiny Hugging Face architectures (experiments/hf_sweep.py,
the section "added by the fourth sweep"; table in results/hf_sweep_fourth.md), checked on
hand-written models through the public API:

* a parameter the forward never reads (ESM's ``contact_head``, computed only on request):
  analyze's note says so, instead of calling its entries laws "of these inputs and this θ
  only" (they are constant for every θ: no gradient reaches them);
* embedding lookups summed with ``e += lookup`` (MegatronBERT's position embeddings) keep the
  translation law between tables, as ``e = e + lookup`` does (not when the value is read
  before the in-place add);
* a law refused because the float64 model computes part of its forward in float32 (Helium's
  RMSNorm gain, ESM's rotary embedding) says so in its refusal (and in the "no law" warning);
* analyze's note on the range of the integer inputs names only the tables looked up at those
  ids (T5's relative position bias, read at computed buckets, was told to "pass an example
  whose ids span the vocabulary");
* a table tied between lookups that are each read only by LayerNorms (Pegasus's ``shared``,
  its encoder's and decoder's token embeddings) keeps the row sums each lookup gives (they
  were refused as "shared"); tied to an output layer too, it keeps none;
* a model in eval mode that draws its own random choice (ViT-MAE's patch masking) is told to
  pass that randomness as an input, not to call model.eval().

Every claim is checked independently (autograd / torch.func on the model itself).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_conslaw as tc

from graph_helpers import seeded_randn as _x

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ------------------------------------------------------------------ a head the forward never calls
class WithUnusedHead(nn.Module):
    """tanh MLP; ``contact`` is a head only ``forward(x, contacts=True)`` reads."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.contact = nn.Linear(2, 1)

    def forward(self, x, contacts: bool = False):
        y = self.fc2(torch.tanh(self.fc1(x)))
        return self.contact(y) if contacts else y


def test_unread_parameters_are_named_as_such():
    torch.manual_seed(0)
    model = WithUnusedHead().to(F64)
    x = _x(5, 3)
    # independent check: no autograd path from the head to the output, at any θ
    grads = torch.autograd.grad(model(x).sum(), list(model.parameters()), allow_unused=True)
    unused = {n for (n, _), g in zip(model.named_parameters(), grads) if g is None}
    assert unused == {"contact.weight", "contact.bias"}
    r = tc.analyze(model, x, theta="random", max_seconds=60)
    assert r.missing_laws is not None and r.missing_laws >= 3  # the 3 entries of the head at least
    said = [n for n in r.notes if "does not read at all" in n]
    assert len(said) == 1 and "contact.weight" in said[0] and "contact.bias" in said[0]
    assert said[0].startswith(f"3 of the {r.missing_laws} missing laws")
    # the data-dependent wording is not used for them
    assert not any("this θ only" in n and "contact." in n for n in r.notes)


# ------------------------------------------------------------------ embeddings summed with +=
class InPlaceEmbeddings(nn.Module):
    """MegatronBERT's embeddings: word (with a padding row) + token type, then ``+=`` the
    position lookups; no LayerNorm after them; a tanh head (``in_place`` False: ``e = e + pos``)."""

    def __init__(self, in_place: bool = True) -> None:
        super().__init__()
        self.word = nn.Embedding(7, 3, padding_idx=0)
        self.kind = nn.Embedding(2, 3)
        self.pos = nn.Embedding(6, 3)
        self.head = nn.Linear(3, 2)
        self.in_place = in_place

    def forward(self, ids, types):
        e = self.word(ids) + self.kind(types)
        p = self.pos(torch.arange(ids.shape[1]).expand_as(ids))
        if self.in_place:
            e += p
        else:
            e = e + p
        return self.head(torch.tanh(e))


def _embedding_inputs(seed: int, length: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 7, (3, length), generator=gen), "types": torch.randint(0, 2, (3, length), generator=gen)}


@pytest.mark.parametrize("in_place", [True, False])
def test_in_place_sum_of_lookups_keeps_the_translation(in_place):
    torch.manual_seed(0)
    model = InPlaceEmbeddings(in_place).to(F64)
    x = _embedding_inputs(0)
    mon = tc.ConservationMonitor(model, x)
    laws = [g for g in mon.groups if "translation" in g.name]
    assert [g.parameter_names for g in laws] == [("kind.weight", "pos.weight")] and laws[0].count == 3
    # independent check: Σ_v kind[v, k] − Σ_v pos[v, k] has a gradient orthogonal to the loss
    # gradient, on inputs of other lengths and types too (by hand, autograd)
    for seed, length in ((1, 4), (2, 6), (3, 2)):
        z = _embedding_inputs(seed, length)
        model.zero_grad()
        (model(**z) * _x(3, length, 2, seed=seed)).sum().backward()
        dh = model.kind.weight.grad.sum(0) - model.pos.weight.grad.sum(0)
        scale = model.kind.weight.grad.norm() + model.pos.weight.grad.norm()
        assert float(dh.abs().max()) <= 1e-12 * float(scale)
    # the values the monitor reads are those sums
    params = dict(model.named_parameters())
    want = params["kind.weight"].sum(0) - params["pos.weight"].sum(0)
    assert torch.allclose(laws[0].values({n: p.detach() for n, p in params.items()}), want.detach())


class InPlaceOnAValueReadTwice(InPlaceEmbeddings):
    """As :class:`InPlaceEmbeddings`, but the word + type sum is also read before the ``+=``
    (its row sums reach the output): shifting type against position changes the output."""

    def forward(self, ids, types):
        e = self.word(ids) + self.kind(types)
        s = torch.tanh(e).sum(-1, keepdim=True)
        e += self.pos(torch.arange(ids.shape[1]).expand_as(ids))
        return self.head(torch.tanh(e)) + s


def test_in_place_sum_read_elsewhere_gives_no_translation():
    torch.manual_seed(0)
    model = InPlaceOnAValueReadTwice().to(F64)
    x = _embedding_inputs(0)
    assert not [g for g in tc.ConservationMonitor(model, x).groups if "translation" in g.name]
    # independent check: the would-be law Σ kind − Σ pos is not conserved
    model.zero_grad()
    (model(**x) * _x(3, 4, 2, seed=1)).sum().backward()
    dh = model.kind.weight.grad.sum(0) - model.pos.weight.grad.sum(0)
    assert float(dh.abs().max()) > 1e-3 * float(model.kind.weight.grad.norm())


# ------------------------------------------------------------------ a check failed by float32 rounding inside
class CastMLP(nn.Module):
    """fc1 → ReLU → fc2 with the ReLU computed in float32 (``cast``), as Helium's RMSNorm
    multiplies by its gain and ESM rotates q and k in float32 inside a float64 model."""

    def __init__(self, cast: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 2)
        self.cast = cast

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(h.float()).to(x.dtype) if self.cast else torch.relu(h))


def test_a_check_failed_by_the_models_own_rounding_says_so():
    from graph_helpers import law_residuals

    torch.manual_seed(0)
    model, x = CastMLP().to(F64), _x(6, 3)
    with pytest.warns(RuntimeWarning, match="no conservation law is tracked .* rounds values below the precision"):
        mon = tc.ConservationMonitor(model, x)  # the "no law" warning gives that reason
    assert not mon.groups
    said = [str(s.reason) for s in mon.skipped if "fails the numerical check" in str(s.reason)]
    assert len(said) == 1 and "fc1→fc2" in said[0]
    assert "rounds values below the precision of the parameters (at float" in said[0] and "float64 model" in said[0]
    # independent check: the same law is exact without the cast (torch.func), off by float32
    # rounding with it: the refusal is that rounding's, as the hint says
    exact = CastMLP(cast=False).to(F64)
    exact.load_state_dict(model.state_dict())
    group = tc.ConservationMonitor(exact, x).groups
    assert [g.name for g in group] == ["fc1→fc2"]
    assert law_residuals(exact, x, group, lambda y: y) <= 1e-12
    assert 1e-10 < law_residuals(model, x, group, lambda y: y) <= 1e-5
    # in float32 the cast changes nothing: the law is tracked, and no hint is needed
    small = CastMLP().float()
    small.load_state_dict(model.state_dict())
    assert [g.name for g in tc.ConservationMonitor(small, x.float()).groups] == ["fc1→fc2"]



# ------------------------------------------------------------------ tables looked up at computed ids
class TokensAndBuckets(nn.Module):
    """A token table read at the input ids, and a bucket table read at ids the forward computes
    from the length (T5's relative position buckets): only the first depends on the ids' range."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 3)
        self.bucket = nn.Embedding(8, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        return self.head(torch.tanh(self.tok(ids) + self.bucket(pos)))


def test_the_id_range_note_names_only_tables_read_at_the_input_ids():
    torch.manual_seed(0)
    model = TokensAndBuckets().to(F64)
    x = torch.randint(0, 4, (3, 5), generator=torch.Generator().manual_seed(0))
    r = tc.analyze(model, x, theta="random", max_seconds=60)
    said = [n for n in r.notes if n.startswith("the integer inputs span ids")]
    assert len(said) == 1 and "tok has 10 rows" in said[0]
    # independent check: the bucket rows that get a gradient do not change with the ids' range
    def rows(ids):
        model.zero_grad()
        model(ids).sum().backward()
        return set(model.bucket.weight.grad.abs().sum(1).nonzero().flatten().tolist())
    wide = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(1))
    assert rows(x) == rows(wide) == set(range(5))


# ------------------------------------------------------------------ a table tied between two centred lookups
class TiedTable(nn.Module):
    """Pegasus's ``shared`` table: an encoder and a decoder lookup of one tensor, each read only
    by a LayerNorm; ``head``: the table is also the output layer (as a tied LM head)."""

    def __init__(self, head: bool = False) -> None:
        super().__init__()
        self.shared = nn.Embedding(6, 4)
        self.enc, self.dec = nn.Embedding(6, 4), nn.Embedding(6, 4)
        self.enc.weight = self.dec.weight = self.shared.weight
        self.ln1, self.ln2 = nn.LayerNorm(4), nn.LayerNorm(4)
        self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(4, 3)
        self.head = head

    def forward(self, ids, dec_ids):
        a = self.fc1(torch.tanh(self.ln1(self.enc(ids))))
        b = self.fc2(torch.tanh(self.ln2(self.dec(dec_ids))))
        out = a.sum(1, keepdim=True) + b
        return torch.cat([out, torch.tanh(self.dec(dec_ids)) @ self.shared.weight.T], -1) if self.head else out


def _tied_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 6, (2, 5), generator=gen), "dec_ids": torch.randint(0, 6, (2, 3), generator=gen)}


def test_a_table_tied_between_centred_lookups_keeps_its_row_sums():
    from graph_helpers import law_residuals

    torch.manual_seed(0)
    model, x = TiedTable().to(F64), _tied_inputs(0)
    groups = [g for g in tc.ConservationMonitor(model, x).groups if "centering" in g.name]
    assert len(groups) == 1 and groups[0].count == 6 and groups[0].parameter_names == ("shared.weight",)
    assert torch.allclose(groups[0].values(dict(model.named_parameters())), model.shared.weight.sum(1))
    assert law_residuals(model, x, groups, lambda y: y) <= 1e-12
    # by hand, on other inputs: the row sums of the tied table's gradient vanish
    for seed in (1, 2):
        z = _tied_inputs(seed)
        model.zero_grad()
        (model(**z) * _x(2, 3, 3, seed=seed)).sum().backward()
        assert float(model.shared.weight.grad.sum(1).abs().max()) <= 1e-12 * float(model.shared.weight.grad.norm())


def test_a_table_tied_to_an_output_layer_keeps_no_centering():
    torch.manual_seed(0)
    model, x = TiedTable(head=True).to(F64), _tied_inputs(0)
    mon = tc.ConservationMonitor(model, x)
    assert not [g for g in mon.groups if "centering" in g.name]
    assert any("is shared with" in str(s.reason) and "centering" in str(s.reason) for s in mon.skipped)
    model.zero_grad()
    (model(**x) * _x(2, 3, 9, seed=1)).sum().backward()  # the would-be law is false
    assert float(model.shared.weight.grad.sum(1).abs().max()) > 1e-3 * float(model.shared.weight.grad.norm())


# ------------------------------------------------------------------ a model that draws its own random choice in eval mode
class RandomMasking(nn.Module):
    """ViT-MAE's patch masking: in eval mode the forward still shuffles its positions with
    ``torch.rand`` unless ``noise`` is given."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x, noise=None):
        noise = torch.rand(x.shape[:2], dtype=x.dtype) if noise is None else noise
        keep = noise.argsort(1)[:, : x.shape[1] - 1]
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_random_choice_in_eval_mode_is_named_as_such():
    torch.manual_seed(0)
    model = RandomMasking().to(F64).eval()
    x = _x(2, 4, 3)
    r = tc.analyze(model, x, theta="random", max_seconds=60)
    assert r.lie_laws is None and "in eval mode: a random choice the model itself makes" in r.lie_note
    assert "pass model.eval()" not in r.lie_note  # it is in eval mode already
    # independent check: in eval mode two forwards on the same input differ (the model draws)
    assert not torch.equal(model(x), model(x))
    # with the randomness passed as an input the count runs
    noise = torch.rand(2, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert tc.analyze(model, {"x": x, "noise": noise}, theta="random", max_seconds=60).lie_laws is not None
