"""tc.analyze, ConservationMonitor + SGD and tc.count_laws over ~30 small hand-written models.

Each model is tiny (D ≈ 20–300, float64) so that the counts run in seconds. Per model:

* ``tc.analyze(model, x, theta="random", max_seconds=120)``: D, tracked rank, Lie count,
  complete, missing laws and where they live, notes;
* ``tc.ConservationMonitor(model, x, every=1, recording="sync")`` attached to SGD (lr 1e-3),
  20 steps on an MSE loss against random targets: the largest relative first-order part of
  the groups expected to be conserved (SCIENCE.md §6: rounding noise, ~1e-16, under SGD);
* ``tc.count_laws(model, inputs, theta="random", max_seconds=120)`` on 64 random inputs shaped
  like ``x`` (a second count, independent of analyze's input-size choice);
* ``expected``: a count by hand / closed form (SCIENCE.md §3, §5, §9) where there is one.

One model per process (a crash or a hang costs only that model)::

    PYTHONPATH=. nice -n 19 python experiments/handwritten_sweep.py            # all, writes results/handwritten_sweep.md
    PYTHONPATH=. python experiments/handwritten_sweep.py --one mlp_relu_nobias  # one model, prints RESULT {json}
    PYTHONPATH=. python experiments/handwritten_sweep.py --list
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


# --------------------------------------------------------------------------- models
class Functional(nn.Module):
    """F.linear with nn.Parameters registered on the module (no nn.Linear)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3) / 2)
        self.b1 = nn.Parameter(torch.randn(4) / 2)
        self.w2 = nn.Parameter(torch.randn(2, 4) / 2)
        self.b2 = nn.Parameter(torch.randn(2) / 2)

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


class Tied(nn.Module):
    """One Linear used twice: f = W relu(W x + b) + b."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(F.relu(self.lin(x)))


class TiedTranspose(nn.Module):
    """Autoencoder with tied weights: f = Wᵀ relu(W x + b) + c, and a separate head on the code."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.dec_bias = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return F.linear(F.relu(self.enc(x)), self.enc.weight.t(), self.dec_bias)


class SE(nn.Module):
    """Conv → ReLU → squeeze-excitation (x * sigmoid(W2 relu(W1 mean(x)))) → conv → pool → linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 2)
        self.fc2 = nn.Linear(2, 4)
        self.conv2 = nn.Conv2d(4, 3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        s = h.mean(dim=(2, 3))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        h = h * g[:, :, None, None]
        h = F.relu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))


class Dense(nn.Module):
    """DenseNet-style: every conv reads the concatenation of the input and all earlier outputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(5, 3, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h1 = F.relu(self.c1(x))
        x = torch.cat([x, h1], 1)
        h2 = F.relu(self.c2(x))
        x = torch.cat([x, h2], 1)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.f1 = nn.Linear(4, 5)
        self.f2 = nn.Linear(5, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f2(F.relu(self.f1(h)))
        return self.out(F.relu(h))


class Mixer(nn.Module):
    """MLP-Mixer block (tokens T=4, channels C=3) with ReLU MLPs, then mean over tokens → head."""

    def __init__(self, T=4, C=3):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.t1, self.t2 = nn.Linear(T, 5), nn.Linear(5, T)
        self.c1, self.c2 = nn.Linear(C, 6), nn.Linear(6, C)
        self.head = nn.Linear(C, 2)

    def forward(self, x):  # (B, T, C)
        y = self.n1(x).transpose(1, 2)
        x = x + self.t2(F.relu(self.t1(y))).transpose(1, 2)
        x = x + self.c2(F.relu(self.c1(self.n2(x))))
        return self.head(x.mean(1))


class HandAttention(nn.Module):
    """Two-head self-attention written with einsum / bmm / softmax, then an output projection."""

    def __init__(self, d=4, heads=2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (B, T, d)
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, T, self.h, self.dh).transpose(1, 2)
        v = self.v(x).view(B, T, self.h, self.dh).transpose(1, 2)
        s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(self.dh)
        a = torch.softmax(s, dim=-1)
        out = torch.bmm(a.reshape(B * self.h, T, T), v.reshape(B * self.h, T, self.dh))
        return self.o(out.view(B, self.h, T, self.dh).transpose(1, 2).reshape(B, T, d))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.attn(x, x, x)
        return self.head(out)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 3, num_layers=2, batch_first=True)
        self.gru = nn.GRU(3, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.head(h[:, -1])


class EmbedMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, ids):
        return self.fc2(F.relu(self.fc1(self.emb(ids).mean(1))))


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(3, 2, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, a, b):
        return self.out(F.relu(self.bil(a, b)))


class Decoder(nn.Module):
    """ConvTranspose2d → ReLU → Upsample → Conv2d → ReLU → PixelShuffle → Conv2d(1×1)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 2, stride=2)
        self.resample = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.out = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        h = self.resample(F.relu(self.up(x)))
        return self.out(self.shuffle(F.relu(self.conv(h))))


class TwoHeads(nn.Module):
    def __init__(self, as_dict: bool):
        super().__init__()
        self.as_dict = as_dict
        self.trunk = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 1)

    def forward(self, x):
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h)} if self.as_dict else (self.a(h), self.b(h))


def mlp_relu_nobias():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2, bias=False))
    return m, randn(8, 3), 9, "one law per hidden ReLU unit (4 + 5)"


def mlp_homogeneous():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 3), nn.PReLU(),
                      nn.Linear(3, 3), nn.Identity(), nn.Linear(3, 2))
    return m, randn(8, 3), None, "4 + 4 + 3 unit laws; PReLU slope outside; linear hidden layer 3: matrix law (count speaks)"


def mlp_smooth():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.Hardtanh(), nn.Linear(3, 3), nn.ELU(), nn.Linear(3, 3), nn.GELU(),
                      nn.Linear(3, 3), nn.SiLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Softplus(), nn.Linear(3, 2))
    return m, randn(8, 3), 0, "no homogeneous activation: no rescaling law (tanh is odd: sign flips are discrete)"


def mlp_prelu_channels():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2))
    return m, randn(8, 3), 4, "per-channel PReLU is positively homogeneous: one law per unit"


def linear_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2))
    return m, randn(8, 3), "mlp_trace_dimension", "deep linear: matrix laws; closed form by the path-lifting count"


def linear_nobias():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 5, bias=False))
    return m, randn(8, 4), 6, "2-layer linear 4-3-5: r(r+1)/2 = 6 (SCIENCE.md §3)"


def tied():
    torch.manual_seed(0)
    return Tied(), randn(8, 3), None, "shared Linear: no per-unit rescaling (count speaks)"


def tied_transpose():
    torch.manual_seed(0)
    return TiedTranspose(), randn(8, 3), None, "Wᵀ relu(W x): rescaling a unit scales it twice (count speaks)"


def frozen():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    m[0].weight.requires_grad_(False)
    return m, randn(8, 3), 4, "first layer's weight frozen: its units keep no law; the 4 second-layer units do"


def functional():
    torch.manual_seed(0)
    return Functional(), randn(8, 3), 4, "one law per hidden unit"


def cnn_strided():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, dilation=2, padding=2, groups=2), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(), nn.MaxPool2d(2),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    return m, randn(4, 2, 8, 8), 12, "one law per hidden channel (4 + 4 + 4)"


def cnn_1d():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(3, 3, 3), nn.ReLU(),
                      nn.AvgPool1d(2), nn.Flatten(), nn.Linear(3, 2))
    return m, randn(4, 2, 8), 6, "one law per hidden channel"


def cnn_3d():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv3d(1, 2, 2), nn.ReLU(), nn.Conv3d(2, 2, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
    return m, randn(4, 1, 3, 3, 3), 4, "one law per hidden channel"


def cnn_norms():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                      nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                      nn.Conv2d(4, 3, 3), nn.InstanceNorm2d(3, affine=True), nn.ReLU(),
                      nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))
    return m, randn(4, 2, 6, 6), None, "per norm: γ/β unit laws + the bias before it + centering (count speaks)"


def se_block():
    torch.manual_seed(0)
    return SE(), randn(4, 2, 5, 5), None, "fc1 units (2) + conv2 channels (3); conv1 channels are gated (count speaks)"


def densenet():
    torch.manual_seed(0)
    return Dense(), randn(4, 2, 5, 5), 6, "one law per hidden channel (3 + 3), consumers read every concat copy"


def residual_mlp():
    torch.manual_seed(0)
    return ResMLP(), randn(8, 3), None, "f1 units (5) + the residual stream (count speaks)"


def mlp_mixer():
    torch.manual_seed(0)
    return Mixer(), randn(4, 4, 3), None, "token units (5) + channel units (6) + centering (count speaks)"


def hand_attention():
    torch.manual_seed(0)
    return HandAttention(), randn(3, 3, 4), None, "per head q·k and v·o matrix laws + key bias (count speaks)"


def mha():
    torch.manual_seed(0)
    return MHA(), randn(3, 3, 4), None, "per head q·k and v·o matrix laws + key bias (count speaks)"


def recurrent():
    torch.manual_seed(0)
    return Recurrent(), randn(3, 4, 3), None, "LSTM b_ih − b_hh (4·3 per layer), GRU r,z (2·3) (count speaks)"


def embedding_mean():
    torch.manual_seed(0)
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 2], [1, 3, 5, 4]])
    return EmbedMean(), ids, 10, "one law per fc1 unit (4) + EᵀE − W1ᵀW1 (6): the mean over tokens is linear, E → E A, fc1 → fc1 A⁻¹"


def bilinear():
    torch.manual_seed(0)
    return BilinearNet(), (randn(8, 3), randn(8, 2, seed=1)), 4, "one law per Bilinear output unit (4): ‖A_k‖² + b_k² − ‖w_out,k‖²"


def decoder():
    torch.manual_seed(0)
    return Decoder(), randn(4, 2, 3, 3), 4, "ConvTranspose2d channels (3) + 1: PixelShuffle puts the 4 conv channels on one channel, rescaled together against the 1×1 conv"


def weight_norm():
    torch.manual_seed(0)
    m = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2))
    return m, randn(8, 3), 8, "per unit: ‖v_j‖² (scale invariance of W = g v/‖v‖) and g_j² + b_j² − ‖w_out,j‖²"


def spectral_norm():
    torch.manual_seed(0)
    m = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2))
    return m.eval(), randn(8, 3), 1, "W/σ(W) is scale invariant: ‖W‖² (no unit law: a row of W changes σ)"


def weight_norm_consumer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(4, 2)))
    return m, randn(8, 3), 3, "‖v_i‖² per row of the consumer (2) + ‖W1‖² + ‖b1‖² − ‖g‖² (all fc1 units against g)"


class BilinearConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bil = nn.Bilinear(4, 2, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, a, b):
        return self.out(F.relu(self.bil(F.relu(self.fc(a)), b)))


def bilinear_consumer():
    torch.manual_seed(0)
    return BilinearConsumer(), (randn(8, 3), randn(8, 2, seed=1)), 7, "fc units (4) read by weight[:, i, :] + bil output units (3)"


def orthogonal():
    torch.manual_seed(0)
    m = nn.Sequential(nn.utils.parametrizations.orthogonal(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    return m, randn(8, 4), 10, "matrix_exp of the skew part of the original's strict lower triangle: its 10 other entries are never read (zero gradient); no row-linear or scale-invariant original"


def compiled():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return torch.compile(m), randn(8, 3), 4, "one law per hidden unit"


def nested_sequential():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2))))
    return m, randn(8, 3), 7, "one law per hidden unit (4 + 3)"


def tuple_out():
    torch.manual_seed(0)
    return TwoHeads(False), randn(8, 3), 4, "one law per trunk unit, outgoing = both heads"


def dict_out():
    torch.manual_seed(0)
    return TwoHeads(True), randn(8, 3), 4, "one law per trunk unit, outgoing = both heads"


BUILDERS = {f.__name__: f for f in (
    mlp_relu_nobias, mlp_homogeneous, mlp_smooth, mlp_prelu_channels, linear_net, linear_nobias, tied, tied_transpose,
    frozen, functional, cnn_strided, cnn_1d, cnn_3d, cnn_norms, se_block, densenet, residual_mlp, mlp_mixer,
    hand_attention, mha, recurrent, embedding_mean, bilinear, bilinear_consumer, decoder, weight_norm,
    weight_norm_consumer, spectral_norm, orthogonal, compiled,
    nested_sequential, tuple_out, dict_out)}


# --------------------------------------------------------------------------- one model
def _tensors(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _tensors(x)]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _tensors(x)]
    return []


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, (tuple, list)) else model(x)


def run_one(name: str) -> dict:
    import torch_conslaw as tc
    from torch_conslaw.completeness import random_inputs_like

    torch.set_num_threads(1)
    model, x, expected, why = BUILDERS[name]()
    model = model.to(F64)
    if expected == "mlp_trace_dimension":
        inner = model
        widths = [inner[0].in_features] + [m.out_features for m in inner if isinstance(m, nn.Linear)]
        expected = tc.mlp_trace_dimension(widths, ["linear"] * (len(widths) - 2), bias=True, seed=0).n_laws
    D = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res = {"name": name, "D": D, "expected": expected, "why": why, "errors": []}
    # 1. analyze
    t = time.time()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            r = tc.analyze(model, x, theta="random", max_seconds=120)
        print(r)
        res.update(tracked=r.tracked_rank, lie=r.lie_laws, complete=r.complete, missing=r.missing_laws,
                   groups=[f"{g.name}:{g.kind}:{g.count}" for g in r.groups])
        if r.missing is not None and r.missing.dimension:
            res["where"] = {k: round(v, 2) for k, v in r.missing.shares.items() if v >= 0.01}
        res["notes"] = [n[:200] for n in r.notes]
        res["warnings_analyze"] = sorted({str(m.message)[:200] for m in w})
    except Exception:
        traceback.print_exc()
        res["errors"].append("analyze: " + traceback.format_exc().strip().splitlines()[-1][:300])
    res["t_analyze"] = round(time.time() - t, 1)
    # 2. monitor + 20 SGD steps
    t = time.time()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            mon = tc.ConservationMonitor(model, x, every=1, recording="sync")
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=1e-3)
            mon.attach(opt)
            with torch.no_grad():
                targets = [torch.randn_like(o) for o in _tensors(_call(model, x))]
            for _ in range(20):
                opt.zero_grad()
                loss = sum(F.mse_loss(o, y) for o, y in zip(_tensors(_call(model, x)), targets))
                loss.backward()
                opt.step()
            rows = mon.summary()
        res["monitor_laws"] = sum(g.count for g in mon.groups)
        res["monitor_groups"] = [f"{g.name}:{g.kind}:{g.count}" for g in mon.groups]
        fo = [row["max_rel_first_order"] for row in rows if row["expected_conserved"] and row["max_rel_first_order"] is not None]
        res["max_first_order"] = max(fo) if fo else None
        res["steps"] = mon.num_steps
        res["warnings_monitor"] = sorted({str(m.message)[:200] for m in w})
    except Exception:
        traceback.print_exc()
        res["errors"].append("monitor: " + traceback.format_exc().strip().splitlines()[-1][:300])
    res["t_monitor"] = round(time.time() - t, 1)
    # 3. count_laws on 64 inputs
    t = time.time()
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            c = tc.count_laws(model, random_inputs_like(x, 64, seed=1), theta="random", max_seconds=120)
        res.update(count=c.n_laws, count_stable=c.stable, count_eps0=c.n_laws_eps0)
    except Exception:
        traceback.print_exc()
        res["errors"].append("count_laws: " + traceback.format_exc().strip().splitlines()[-1][:300])
    res["t_count"] = round(time.time() - t, 1)
    return res


# --------------------------------------------------------------------------- driver
def _cell(v):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1e}"
    return str(v)


def write_table(results: list[dict], path: str, command: str) -> None:
    lines = [
        "# Hand-written models: analyze, monitor + SGD, count_laws",
        "",
        f"Command: `{command}` (one model per process, torch {torch.__version__}, 1 thread, `nice -n 19` on the shared 2-core machine).",
        "",
        "D: trainable entries; tracked: rank of the tracked laws (analyze, θ random); Lie: analyze's count; "
        "count64: `count_laws` on 64 random inputs (θ random); expected: by hand / closed form; "
        "1st order: largest relative first-order part over 20 SGD steps (lr 1e-3) of the groups expected to be conserved.",
        "",
        "| model | D | tracked | Lie | count64 | expected | complete | missing (where) | 1st order | errors | t analyze / monitor / count (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        where = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("where") or {}).items())
        missing = _cell(r.get("missing")) + (f" ({where})" if where else "")
        errs = "; ".join(r.get("errors", [])).replace("|", "\\|") or "none"
        lines.append(
            f"| {r['name']} | {r.get('D')} | {_cell(r.get('tracked'))} | {_cell(r.get('lie'))} | {_cell(r.get('count'))} | "
            f"{_cell(r.get('expected'))} | {_cell(r.get('complete'))} | {missing} | {_cell(r.get('max_first_order'))} | {errs} | "
            f"{r.get('t_analyze', '–')} / {r.get('t_monitor', '–')} / {r.get('t_count', '–')} |"
        )
    lines += ["", "## Per model: what was expected, groups, notes", ""]
    for r in results:
        lines.append(f"- **{r['name']}** — expected: {r.get('why')}. Groups: {', '.join(r.get('groups', [])) or 'none'}.")
        for n in r.get("notes", [])[:4]:
            lines.append(f"  - note: {n}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", default="results/handwritten_sweep.md")
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args()
    if args.list:
        print("\n".join(BUILDERS))
        return
    if args.one:
        print("RESULT", json.dumps(run_one(args.one)))
        return
    names = args.only or list(BUILDERS)
    results = []
    for name in names:
        t = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=args.timeout)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"name": name, "errors": [f"process exit {p.returncode}: " + p.stderr.strip()[-300:]]}
        except subprocess.TimeoutExpired:
            res = {"name": name, "errors": [f"timeout after {args.timeout} s"]}
        print(f"{name}: {json.dumps(res)[:600]} ({time.time() - t:.0f} s)", flush=True)
        results.append(res)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    cmd = "PYTHONPATH=. nice -n 19 python experiments/handwritten_sweep.py" + (f" --only {' '.join(args.only)}" if args.only else "")
    write_table(results, args.out, cmd)


if __name__ == "__main__":
    main()
