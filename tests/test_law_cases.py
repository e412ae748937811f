"""One table of law cases: every law family through the same four checks.

Each row names a small float64 model, an example input, the group the monitor must track and
three independent pieces written by hand here: the law as a function of the parameters, the
symmetry transform that should leave the output unchanged, and the training loss. Every row
runs through:

1. **by hand** — the monitor's θ₀ values equal the hand-written law;
2. **torch.func** — ⟨∇h_l, ∂f_o/∂θ⟩ = 0 for every law l and output o (full Jacobians of the
   hand-written law and of the model, relative to both norms);
3. **invariance** — applying the symmetry to the parameters leaves the output unchanged (for
   the translation law: the log-softmax; for the padding row there is no symmetry of f, the
   law comes from the backward definition of ``padding_idx``: the row says so);
4. **SGD** — under float64 SGD the monitor's first-order part stays ≤ 1e-12 relative.

Approximate rows (scale invariance before a normalization, exact only at eps = 0) run the same
checks with their own bound: residuals ≤ 100·eps, and the first-order part falls ≈ tenfold
when eps does. A new family is tested by adding a row.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_conslaw as tc
from torch_conslaw import catalogue

F64 = torch.float64
P = dict[str, Tensor]


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch):
    """Registrations made by a test stay local to it."""
    for table in ("_LAYERS", "_ACT_MODULES", "_ACT_FUNCTIONS", "_ACT_METHODS"):
        monkeypatch.setattr(catalogue, table, dict(getattr(catalogue, table)))


class ReLU2(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x) ** 2


class Branch(nn.Module):
    """LayerNorm read by two layers (branch consumers)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.ln, self.a, self.b = nn.LayerNorm(4, eps=eps), nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln(x)
        return torch.cat([self.a(y), self.b(y)], -1)


class Attn(nn.Module):
    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class FusedAttn(nn.Module):
    """Two heads from one fused qkv projection (GPT-2 style), matmul → softmax over the keys."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, 2, 2).transpose(1, 2) for t in self.qkv(x).split(4, -1))
        att = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, n, 4))


class PostLN(nn.Module):
    """Post-norm: LN(x + dense(x)) → head (the sum reaches only the LayerNorm)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.dense, self.ln, self.head = nn.Linear(4, 4), nn.LayerNorm(4, eps=eps), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ln(x + self.dense(x)))


class HandRMSNorm(nn.Module):
    """RMSNorm written with ops (as LlamaRMSNorm): weight · x · rsqrt(mean(x²) + eps)."""

    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def seq(*layers: Callable[[float], nn.Module]) -> Callable[[float], nn.Module]:
    return lambda eps: nn.Sequential(*(f(eps) for f in layers))


def lin(i: int, o: int) -> Callable[[float], nn.Module]:
    return lambda eps: nn.Linear(i, o)


def conv(i: int, o: int, pad: int = 0) -> Callable[[float], nn.Module]:
    return lambda eps: nn.Conv2d(i, o, 3, padding=pad)


RELU = lambda eps: nn.ReLU()  # noqa: E731
BN = lambda eps: nn.BatchNorm2d(3, eps=eps)  # noqa: E731
LN = lambda eps: nn.LayerNorm(4, eps=eps)  # noqa: E731

MLP = seq(lin(3, 4), RELU, lin(4, 2))
CONV_BN = seq(conv(2, 3, 1), BN, RELU, conv(3, 2))
LIN_LN = seq(lin(3, 4), LN, RELU, lin(4, 2))
LOGITS = seq(lin(3, 4), RELU, lin(4, 5))


# ----------------------------------------------------------------------------- hand-written laws
def unit(w1: Tensor, b1: Tensor, w2_cols: Tensor, k: float = 1.0) -> Tensor:
    """‖w_in,j‖² + b_j² − k‖w_out,j‖², by a loop over units."""
    return torch.stack([w1[j].square().sum() + b1[j] ** 2 - k * w2_cols[j].square().sum() for j in range(len(b1))])


def triu(m: Tensor) -> Tensor:
    i, j = torch.triu_indices(m.shape[0], m.shape[0])
    return m[i, j]


def mha_rows(p: P, which: str, h: int) -> Tensor:
    """Q̃_h / K̃_h / Ṽ_h of head h (rows of in_proj_weight with the bias appended)."""
    off = {"q": 0, "k": 4, "v": 8}[which] + 2 * h
    return torch.cat([p["mha.in_proj_weight"][off : off + 2], p["mha.in_proj_bias"][off : off + 2, None]], 1)


# ----------------------------------------------------------------------------- symmetries
def rand(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def scale_unit(w_in: list[str], w_out: str | list[str], j: int, k: float = 1.0, out_axis: int = 1) -> Callable:
    """Row j of every incoming tensor × λ, slice j (axis ``out_axis``) of every outgoing ÷ λ^k."""

    def apply(p: P, gen: torch.Generator) -> P:
        lam = 1.5
        q = dict(p)
        for n in w_in:
            t = q[n].clone()
            t[j] = t[j] * lam
            q[n] = t
        for n in [w_out] if isinstance(w_out, str) else w_out:
            t = q[n].clone()
            t.select(out_axis, j).mul_(lam ** (-k))
            q[n] = t
        return q

    return apply


def mix_matrix(p: P, gen: torch.Generator) -> P:
    a = torch.eye(4, dtype=F64) + 0.3 * rand(gen, 4, 4)
    q = dict(p)
    q["0.weight"], q["0.bias"] = a @ p["0.weight"], a @ p["0.bias"]
    q["1.weight"] = p["1.weight"] @ torch.linalg.inv(a)
    return q


def mix_head(kind: str) -> Callable:
    def apply(p: P, gen: torch.Generator) -> P:
        a = torch.eye(2, dtype=F64) + 0.3 * rand(gen, 2, 2)
        w, b = p["mha.in_proj_weight"].clone(), p["mha.in_proj_bias"].clone()
        q = dict(p)
        if kind == "qk":  # head 0: Q̃ → A Q̃, K̃ → A⁻ᵀ K̃
            w[0:2], b[0:2] = a @ w[0:2], a @ b[0:2]
            inv_t = torch.linalg.inv(a).T
            w[4:6], b[4:6] = inv_t @ w[4:6], inv_t @ b[4:6]
        else:  # head 1: Ṽ → A Ṽ, W_O[:, head] → W_O[:, head] A⁻¹
            w[10:12], b[10:12] = a @ w[10:12], a @ b[10:12]
            o = p["mha.out_proj.weight"].clone()
            o[:, 2:4] = o[:, 2:4] @ torch.linalg.inv(a)
            q["mha.out_proj.weight"] = o
        q["mha.in_proj_weight"], q["mha.in_proj_bias"] = w, b
        return q

    return apply


def shift(name: str, rows: slice | None = None) -> Callable:
    def apply(p: P, gen: torch.Generator) -> P:
        q = dict(p)
        t = p[name].clone()
        if rows is None:
            t = t + rand(gen, *t.shape)
        else:
            t[rows] = t[rows] + rand(gen, *t[rows].shape)
        q[name] = t
        return q

    return apply


def shift_columns(prefix: str) -> Callable:
    """W → W + 1aᵀ, b → b + t·1 (centering and translation)."""

    def apply(p: P, gen: torch.Generator) -> P:
        q = dict(p)
        w = p[f"{prefix}.weight"]
        q[f"{prefix}.weight"] = w + rand(gen, 1, w.shape[1])
        q[f"{prefix}.bias"] = p[f"{prefix}.bias"] + rand(gen, 1)
        return q

    return apply


def scale_group(names: list[str], rows: slice) -> Callable:
    def apply(p: P, gen: torch.Generator) -> P:
        q = dict(p)
        for n in names:
            t = p[n].clone()
            t[rows] = 1.7 * t[rows]
            q[n] = t
        return q

    return apply


# ----------------------------------------------------------------------------- the table
@dataclass
class Case:
    make: Callable[[float], nn.Module]
    x: Callable[[], Any]
    group: str
    kind: str
    law: Callable[[P], Tensor]
    symmetry: Callable[[P, torch.Generator], P] | None
    why_no_symmetry: str = ""
    loss: str | None = None
    register: Callable[[], None] | None = None
    approximate: bool = False


def x_vec() -> Tensor:
    return torch.randn(16, 3, dtype=F64)


def x_vec4() -> Tensor:
    return torch.randn(16, 4, dtype=F64)


def x_img() -> Tensor:
    return torch.randn(8, 2, 5, 5, dtype=F64)


def x_seq() -> Tensor:
    return torch.randn(3, 5, 4, dtype=F64)


def x_tokens() -> Tensor:
    return torch.tensor([[0, 2, 5, 2], [1, 3, 2, 6]])


CASES: dict[str, Case] = {
    "relu unit": Case(
        MLP, x_vec, "0→2", "unit",
        lambda p: unit(p["0.weight"], p["0.bias"], p["2.weight"].T),
        scale_unit(["0.weight", "0.bias"], "2.weight", 1),
    ),
    "k-homogeneous (ReLU², k = 2)": Case(
        seq(lin(3, 4), lambda eps: ReLU2(), lin(4, 2)), x_vec, "0→2", "unit",
        lambda p: unit(p["0.weight"], p["0.bias"], p["2.weight"].T, k=2.0),
        scale_unit(["0.weight", "0.bias"], "2.weight", 2, k=2.0),
        register=lambda: tc.register_activation(ReLU2, degree=2),
    ),
    "linear matrix law": Case(
        seq(lin(3, 4), lin(4, 2)), x_vec, "0→1", "matrix",
        lambda p: triu(
            torch.cat([p["0.weight"], p["0.bias"][:, None]], 1) @ torch.cat([p["0.weight"], p["0.bias"][:, None]], 1).T
            - p["1.weight"].T @ p["1.weight"]
        ),
        mix_matrix,
    ),
    "conv channels": Case(
        seq(conv(2, 3, 1), RELU, conv(3, 2)), x_img, "0→2", "channel",
        lambda p: unit(p["0.weight"].flatten(1), p["0.bias"], p["2.weight"].transpose(0, 1).flatten(1)),
        scale_unit(["0.weight", "0.bias"], "2.weight", 0),
    ),
    "norm affine producer (BatchNorm γ, β)": Case(
        CONV_BN, x_img, "1→3", "channel",
        lambda p: unit(p["1.weight"][:, None], p["1.bias"], p["3.weight"].transpose(0, 1).flatten(1)),
        scale_unit(["1.weight", "1.bias"], "3.weight", 2),
    ),
    "branch consumers (LayerNorm → a, b)": Case(
        lambda eps: Branch(eps), x_vec4, "ln→a+b", "unit",
        lambda p: torch.stack([
            p["ln.weight"][c] ** 2 + p["ln.bias"][c] ** 2 - p["a.weight"][:, c].square().sum() - p["b.weight"][:, c].square().sum()
            for c in range(4)
        ]),
        scale_unit(["ln.weight", "ln.bias"], ["a.weight", "b.weight"], 1),
    ),
    "MHA head q·k": Case(
        lambda eps: Attn(), x_seq, "mha.h0 q·k", "matrix",
        lambda p: triu(mha_rows(p, "q", 0) @ mha_rows(p, "q", 0).T - mha_rows(p, "k", 0) @ mha_rows(p, "k", 0).T),
        mix_head("qk"),
    ),
    "MHA head v·o": Case(
        lambda eps: Attn(), x_seq, "mha.h1 v·o", "matrix",
        lambda p: triu(
            mha_rows(p, "v", 1) @ mha_rows(p, "v", 1).T - p["mha.out_proj.weight"][:, 2:4].T @ p["mha.out_proj.weight"][:, 2:4]
        ),
        mix_head("vo"),
    ),
    # --- linear laws h = cᵀθ ----------------------------------------------------------------
    "bias right before BatchNorm": Case(
        CONV_BN, x_img, "0.bias→1", "linear", lambda p: p["0.bias"] * 1.0, shift("0.bias"),
    ),
    "bias right before GroupNorm (group sums)": Case(
        seq(conv(2, 4, 1), lambda eps: nn.GroupNorm(2, 4, eps=eps), RELU, conv(4, 2)), x_img, "0.bias→1", "linear",
        lambda p: torch.stack([p["0.bias"][0] + p["0.bias"][1], p["0.bias"][2] + p["0.bias"][3]]),
        lambda p, gen: {**p, "0.bias": p["0.bias"] + torch.tensor([0.7, 0.7, -1.1, -1.1], dtype=F64)},
    ),
    "LayerNorm centering": Case(
        LIN_LN, x_vec, "0→1 centering", "linear",
        lambda p: torch.cat([p["0.weight"].sum(0), p["0.bias"].sum().reshape(1)]),
        shift_columns("0"),
    ),
    "embedding padding row": Case(
        seq(lambda eps: nn.Embedding(7, 4, padding_idx=2), lin(4, 3)), x_tokens, "0.weight[2]", "linear",
        lambda p: p["0.weight"][2] * 1.0, None,
        why_no_symmetry="f reads the padding row (its value); the law comes from padding_idx's backward, which "
        "never writes a gradient to the row, not from a symmetry of f",
    ),
    "MHA key bias": Case(
        lambda eps: Attn(), x_seq, "mha key bias", "linear", lambda p: p["mha.in_proj_bias"][4:8] * 1.0,
        shift("mha.in_proj_bias", slice(4, 8)),
    ),
    "key bias of a fused qkv projection (op graph)": Case(
        lambda eps: FusedAttn(), x_seq, "qkv key bias", "linear", lambda p: p["qkv.bias"][4:8] * 1.0,
        shift("qkv.bias", slice(4, 8)),
    ),
    "LayerNorm centering across a residual addition (op graph)": Case(
        lambda eps: PostLN(eps), x_vec4, "dense→ln centering", "linear",
        lambda p: torch.cat([p["dense.weight"].sum(0), p["dense.bias"].sum().reshape(1)]),
        shift_columns("dense"),
    ),
    "softmax cross-entropy translation": Case(
        LOGITS, x_vec, "2 translation", "linear",
        lambda p: torch.cat([p["2.weight"].sum(0), p["2.bias"].sum().reshape(1)]),
        shift_columns("2"), loss="cross_entropy",
    ),
    # --- approximate laws (exact only at eps = 0) ----------------------------------------------
    "scale before BatchNorm (approximate)": Case(
        CONV_BN, x_img, "0→1 scale", "approximate",
        lambda p: p["0.weight"].flatten(1).square().sum(1) + p["0.bias"].square(),
        scale_group(["0.weight", "0.bias"], slice(1, 2)), approximate=True,
    ),
    "scale before LayerNorm (approximate)": Case(
        LIN_LN, x_vec, "0→1 scale", "approximate",
        lambda p: (p["0.weight"].square().sum() + p["0.bias"].square().sum()).reshape(1),
        scale_group(["0.weight", "0.bias"], slice(None)), approximate=True,
    ),
    "scale before a hand-written RMSNorm (approximate, op graph)": Case(
        seq(lin(3, 4), lambda eps: HandRMSNorm(4, eps), RELU, lin(4, 2)), x_vec, "0→1 scale", "approximate",
        lambda p: (p["0.weight"].square().sum() + p["0.bias"].square().sum()).reshape(1),
        scale_group(["0.weight", "0.bias"], slice(None)), approximate=True,
    ),
}
EPS = 1e-5


def build(case: Case, eps: float = EPS) -> tuple[nn.Module, Any]:
    if case.register is not None:
        case.register()
    torch.manual_seed(0)
    model = case.make(eps).double()
    torch.manual_seed(1)
    return model, case.x()


def params_of(model: nn.Module) -> P:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def forward(model: nn.Module, p: P, x: Any) -> Tensor:
    """f(θ, x) in train mode, on a copy (BatchNorm statistics of the model stay untouched)."""
    m = copy.deepcopy(model).train()
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    return torch.func.functional_call(m, {**p, **buffers}, (x,))


def monitor_of(case: Case, model: nn.Module, x: Any) -> tc.ConservationMonitor:
    return tc.ConservationMonitor(model, x, loss=case.loss, every=1, recording="sync")


def row(monitor: tc.ConservationMonitor, group: str) -> dict[str, Any]:
    rows = {s["name"]: s for s in monitor.summary()}
    assert group in rows, f"{group} not tracked; tracked {sorted(rows)}, skipped {[str(s) for s in monitor.skipped]}"
    return rows[group]


@pytest.mark.parametrize("name", list(CASES))
def test_by_hand_value(name: str) -> None:
    case = CASES[name]
    model, x = build(case)
    monitor = monitor_of(case, model, x)
    s = row(monitor, case.group)
    assert s["kind"] == case.kind and s["approximate"] == case.approximate
    assert s["verified"] is True and s["verification_residual"] <= (1e-3 if case.approximate else 1e-10)
    assert s["expected_conserved"] is (not case.approximate)  # approximate laws are never claimed exact
    expected = case.law(params_of(model))
    torch.testing.assert_close(monitor.initial[case.group], expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_of_the_law_is_orthogonal_to_every_output_gradient(name: str) -> None:
    """⟨∇h_l, ∂f_o/∂θ⟩ with full torch.func Jacobians, relative to both norms."""
    case = CASES[name]
    model, x = build(case)
    p = params_of(model)
    jh = torch.func.jacrev(case.law)(p)
    jf = torch.func.jacrev(lambda q: forward(model, q, x))(p)
    out = forward(model, p, x)
    laws = case.law(p).numel()
    dots = torch.zeros(laws, out.numel(), dtype=F64)
    nh = torch.zeros(laws, dtype=F64)
    nf = torch.zeros(out.numel(), dtype=F64)
    for n in p:
        a = jh[n].reshape(laws, -1)
        b = jf[n].reshape(out.shape + (-1,))
        if case.loss == "cross_entropy":  # only cotangents with zero class sums reach the logits
            b = b - b.mean(dim=-2, keepdim=True)
        b = b.reshape(out.numel(), -1)
        dots += a @ b.T
        nh += a.square().sum(1)
        nf += b.square().sum(1)
    rel = dots.abs() / (nh.sqrt()[:, None] * nf.sqrt()[None, :]).clamp_min(1e-300)
    bound = 100 * EPS if case.approximate else 1e-12
    assert float(rel.max()) <= bound
    assert float(nh.min()) > 0 and float(nf.max()) > 0  # the check is not vacuous


@pytest.mark.parametrize("name", list(CASES))
def test_output_is_invariant_under_the_symmetry(name: str) -> None:
    case = CASES[name]
    if case.symmetry is None:
        assert case.why_no_symmetry  # every row without a symmetry says why
        return
    model, x = build(case)
    p = params_of(model)
    moved = case.symmetry(p, torch.Generator().manual_seed(5))
    assert any(not torch.equal(p[n], moved[n]) for n in p)  # the transform does something
    before, after = forward(model, p, x), forward(model, moved, x)
    if case.loss == "cross_entropy":
        before, after = F.log_softmax(before, -1), F.log_softmax(after, -1)
    change = float((after - before).abs().max() / before.abs().max())
    assert change <= (100 * EPS if case.approximate else 1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_sgd_first_order_part(name: str) -> None:
    case = CASES[name]

    def first_order(eps: float) -> float:
        model, x = build(case, eps)
        monitor = monitor_of(case, model, x)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor.attach(opt)
        out = model(x)
        target = torch.randn(out.shape, dtype=F64)
        classes = torch.randint(0, out.shape[-1], out.shape[:-1])
        for _ in range(4):
            opt.zero_grad()
            out = model(x)
            if case.loss == "cross_entropy":
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), classes.reshape(-1))
            else:
                loss = F.mse_loss(out, target)
            loss.backward()
            opt.step()
        s = row(monitor, case.group)
        assert s["max_rel_drift"] > 0 or case.kind == "linear"  # training moved the parameters
        return s["max_rel_first_order"]

    if not case.approximate:
        assert first_order(EPS) <= 1e-12
        return
    big, small = first_order(1e-4), first_order(1e-5)
    assert 1e-12 < small < big <= 1e-2  # measured, small and ∝ eps (ratio ≈ 10)
    assert 3 < big / small < 30
