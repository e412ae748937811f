"""Hand-written edge cases: 30 small models with constructs the other sweeps do not have.

Each model (PyTorch's own Transformer layers, EmbeddingBag, ModuleDict routing, a layer called
twice, PixelShuffle, ConvTranspose, GRU / LSTM with projections, pools, GroupNorm /
InstanceNorm, gates, abs / clamp / hardtanh / relu6 / softplus, dropout in train mode,
bfloat16 / float16, causal SDPA, a forward that takes one dict, BatchNorm in train mode, gains
used as 1 + γ, ...)
goes through ``ConservationMonitor`` (3 SGD steps, the largest relative drift of the laws it
expects conserved) and ``analyze`` (θ random, count budget 90 s): laws tracked, the Lie count,
completeness, where missing laws live, and any error.

    PYTHONPATH=. python experiments/edge_case_sweep.py [NAME ...]

writes results/edge_case_sweep.md and results/edge_case_sweep.json (with names: only their rows
are run again and replaced).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc

ROOT = Path(__file__).resolve().parents[1]


def _mlp(act: nn.Module | None = None, d_in: int = 4, hidden: int = 6, d_out: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), act if act is not None else nn.ReLU(), nn.Linear(hidden, d_out))


class Elementwise(nn.Module):
    """a → fn → o, with fn an elementwise function written in forward."""

    def __init__(self, fn):
        super().__init__()
        self.a, self.o, self.fn = nn.Linear(4, 6), nn.Linear(6, 2), fn

    def forward(self, x):
        return self.o(self.fn(self.a(x)))


class Bag(nn.Module):  # EmbeddingBag(mean) → Linear
    def __init__(self):
        super().__init__()
        self.e, self.fc = nn.EmbeddingBag(20, 6, mode="mean"), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.e(x))


class Route(nn.Module):  # layers in a ModuleDict
    def __init__(self):
        super().__init__()
        self.d = nn.ModuleDict({"a": nn.Linear(5, 7), "b": nn.Linear(7, 2)})

    def forward(self, x):
        return self.d["b"](torch.relu(self.d["a"](x)))


class Twice(nn.Module):  # one layer called twice
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


class Shuffle(nn.Module):  # conv → PixelShuffle(2) → conv
    def __init__(self):
        super().__init__()
        self.c1, self.ps, self.c2 = nn.Conv2d(2, 8, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(2, 3, 3)

    def forward(self, x):
        return self.c2(self.ps(torch.relu(self.c1(x))))


class TransposedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.t, self.c2 = nn.Conv2d(2, 4, 3), nn.ConvTranspose2d(4, 3, 3, stride=2), nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return self.c2(torch.relu(self.t(torch.relu(self.c1(x)))))


class Recurrent(nn.Module):  # GRU, or LSTM with projections, → Linear on the last step
    def __init__(self, lstm: bool):
        super().__init__()
        self.r = nn.LSTM(4, 6, proj_size=3, batch_first=True) if lstm else nn.GRU(4, 5, batch_first=True)
        self.fc = nn.Linear(3 if lstm else 5, 2)

    def forward(self, x):
        return self.fc(self.r(x)[0][:, -1])


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.fc(F.adaptive_max_pool2d(torch.relu(self.c2(h)), 1).flatten(1))


class Norms(nn.Module):  # GroupNorm and InstanceNorm(affine)
    def __init__(self):
        super().__init__()
        self.c1, self.n, self.c2 = nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 3)
        self.i, self.fc = nn.InstanceNorm2d(3, affine=True), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.i(self.c2(torch.relu(self.n(self.c1(x)))))).mean((2, 3)))


class Gate(nn.Module):  # relu(a x) * sigmoid(g x)
    def __init__(self):
        super().__init__()
        self.a, self.g, self.o = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.o(torch.relu(self.a(x)) * torch.sigmoid(self.g(x)))


class ParamScale(nn.Module):  # relu(a x) * s, s a parameter
    def __init__(self):
        super().__init__()
        self.a, self.s, self.o = nn.Linear(4, 6), nn.Parameter(torch.ones(6)), nn.Linear(6, 2)

    def forward(self, x):
        return self.o(torch.relu(self.a(x)) * self.s)


class EmbRelu(nn.Module):  # Embedding → relu → Linear → mean over tokens
    def __init__(self):
        super().__init__()
        self.e, self.o = nn.Embedding(10, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.o(torch.relu(self.e(x))).mean(1)


class Depthwise(nn.Module):  # grouped, dilated, circular padding
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, groups=3), nn.Conv2d(6, 4, 1)
        self.c3 = nn.Conv2d(4, 2, 3, dilation=2, padding=2, padding_mode="circular")

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


class Interp(nn.Module):  # nearest upsampling between convs
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.c2(F.interpolate(torch.relu(self.c1(x)), scale_factor=2.0, mode="nearest"))


class Maxout(nn.Module):  # max over pairs of units
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 8), nn.Linear(4, 2)

    def forward(self, x):
        return self.o(self.a(x).view(-1, 4, 2).amax(-1))


class CausalAttention(nn.Module):  # two heads through F.scaled_dot_product_attention(is_causal=True)
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        heads = lambda y: y.view(b, t, 2, 4).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, 8))


class TakesOneDict(nn.Module):  # forward(batch: dict) → dict
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, batch):
        return {"y": self.o(torch.relu(self.a(batch["x"]))) * batch["w"]}


class OnePlusGain(nn.Module):  # Gemma's RMSNorm: x̂ · (1 + γ), γ stored around 0 → Linear → ReLU → Linear
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(0.3 * torch.randn(4))
        self.a, self.o = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.o(torch.relu(self.a(x * (1.0 + self.gamma))))


class LayerNorm1P(nn.LayerNorm):  # Nemotron's LayerNorm: an nn.LayerNorm that passes weight + 1
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def _bn_train() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).train()


def _x(*shape):
    return lambda: torch.randn(*shape)


MODELS = {
    "transformer_encoder_layer": (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), _x(2, 5, 8)),
    "transformer_decoder_layer": (
        lambda: nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        lambda: (torch.randn(2, 5, 8), torch.randn(2, 4, 8)),
    ),
    "embedding_bag_mean": (Bag, lambda: torch.randint(0, 20, (3, 4))),
    "module_dict": (Route, _x(4, 5)),
    "layer_called_twice": (Twice, _x(4, 5)),
    "pixel_shuffle": (Shuffle, _x(2, 2, 5, 5)),
    "conv_transpose": (TransposedConv, _x(2, 2, 7, 7)),
    "gru": (lambda: Recurrent(lstm=False), _x(3, 4, 4)),
    "lstm_projections": (lambda: Recurrent(lstm=True), _x(3, 4, 4)),
    "max_pools": (Pools, _x(2, 1, 12, 12)),
    "group_instance_norm": (Norms, _x(2, 2, 9, 9)),
    "sigmoid_gate": (Gate, _x(5, 4)),
    "parameter_scale": (ParamScale, _x(5, 4)),
    "abs": (lambda: Elementwise(torch.abs), _x(5, 4)),
    "clamp_min": (lambda: Elementwise(lambda h: torch.clamp(h, min=0.0)), _x(5, 4)),
    "hardtanh": (lambda: _mlp(nn.Hardtanh()), _x(5, 4)),
    "relu6": (lambda: _mlp(nn.ReLU6()), _x(5, 4)),
    "softplus": (lambda: _mlp(nn.Softplus()), _x(5, 4)),
    "dropout_train_mode": (lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2)), _x(5, 4)),
    "embedding_relu": (EmbRelu, lambda: torch.randint(0, 10, (3, 4))),
    "grouped_dilated_circular": (Depthwise, _x(2, 3, 9, 9)),
    "nearest_upsampling": (Interp, _x(2, 2, 7, 7)),
    "maxout": (Maxout, _x(5, 4)),
    "bfloat16": (lambda: _mlp().to(torch.bfloat16), lambda: torch.randn(5, 4, dtype=torch.bfloat16)),
    "float16": (lambda: _mlp().to(torch.float16), lambda: torch.randn(5, 4, dtype=torch.float16)),
    "causal_sdpa": (CausalAttention, _x(2, 5, 8)),
    "forward_takes_one_dict": (TakesOneDict, lambda: ({"x": torch.randn(5, 4), "w": torch.rand(5, 1)},)),
    "batchnorm_train_mode": (_bn_train, _x(8, 4)),
    "one_plus_gain_rmsnorm": (OnePlusGain, _x(5, 4)),
    "layernorm_1p": (lambda: nn.Sequential(nn.Linear(4, 6), LayerNorm1P(6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)), _x(5, 4)),
}


def run(name: str) -> dict:
    make, inputs = MODELS[name]
    torch.manual_seed(0)
    model, x = make(), inputs()
    call = (lambda m: m(*x)) if isinstance(x, tuple) else (lambda m: m(x))
    row: dict = {"model": name, "D": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    t = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monitor = tc.ConservationMonitor(model, x)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            monitor.attach(opt)
            for _ in range(3):
                opt.zero_grad()
                out = call(model)
                out = out["y"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out
                out.float().square().mean().backward()
                opt.step()
            rows = monitor.summary()
        row["groups"] = [f"{g.name}:{g.kind}:{g.count}" for g in monitor.groups]
        row["laws"] = sum(g.count for g in monitor.groups)
        row["max_rel_drift"] = max((r["max_rel_drift"] for r in rows if r["expected_conserved"]), default=None)
        row["skipped"] = [str(s) for s in monitor.skipped][:3]
    except Exception as err:  # recorded, not hidden
        row["monitor_error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    row["t_monitor"] = round(time.time() - t, 1)
    t = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = tc.analyze(make_again(name), x, theta="random", max_seconds=90)
        row.update(tracked=report.tracked_rank, lie=report.lie_laws, complete=report.complete, missing=report.missing_laws)
        if report.missing is not None:
            row["where"] = {k: round(v, 2) for k, v in report.missing.shares.items() if v >= 0.05}
        row["notes"] = list(report.notes)[:4]
        if report.lie_laws is None:
            row["count_note"] = str(report).split("existing laws (Lie-algebra count): ")[1].splitlines()[0][:200]
    except Exception as err:
        row["analyze_error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    row["t_analyze"] = round(time.time() - t, 1)
    return row


def make_again(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]()


def table(rows: list[dict]) -> str:
    lines = [
        "# Hand-written edge cases: monitor and analyze",
        "",
        "Command: `PYTHONPATH=. python experiments/edge_case_sweep.py` (torch "
        f"{torch.__version__}, θ random for analyze, count budget 90 s).",
        "",
        "| model | D | laws tracked (groups) | drift, 3 SGD steps | Lie count | complete | missing (where) | errors | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        groups = ", ".join(g.rsplit(":", 2)[0] + " " + g.rsplit(":", 2)[2] for g in r.get("groups", [])) or "none"
        drift = f"{r['max_rel_drift']:.1e}" if r.get("max_rel_drift") is not None else "–"
        where = ", ".join(f"{k} {v}" for k, v in r.get("where", {}).items())
        missing = f"{r.get('missing')}" + (f" ({where})" if where else "")
        errors = "; ".join(r[k] for k in ("monitor_error", "analyze_error") if k in r) or "none"
        lie = r.get("lie") if r.get("lie") is not None else "not computed"
        lines.append(
            f"| {r['model']} | {r['D']} | {r.get('laws', '–')} ({groups}) | {drift} | {lie} | {r.get('complete')} | "
            f"{missing} | {errors} | {r['t_monitor']} + {r['t_analyze']} |"
        )
    lines += ["", "## Notes and skips per model", ""]
    for r in rows:
        said = r.get("notes", []) + r.get("skipped", []) + ([r["count_note"]] if "count_note" in r else [])
        if said:
            lines.append(f"- **{r['model']}**")
            lines += [f"  - {s[:300]}" for s in said]
    return "\n".join(lines) + "\n"


def main() -> None:
    names = sys.argv[1:] or list(MODELS)
    out = ROOT / "results" / "edge_case_sweep.json"
    kept = {r["model"]: r for r in json.loads(out.read_text())} if sys.argv[1:] and out.exists() else {}
    for name in names:  # named models: their rows are replaced in the files, the others kept
        row = run(name)
        print(json.dumps(row), flush=True)
        kept[name] = row
    rows = [kept[n] for n in MODELS if n in kept]
    out.write_text(json.dumps(rows, indent=1))
    (ROOT / "results" / "edge_case_sweep.md").write_text(table(rows))


if __name__ == "__main__":
    main()
