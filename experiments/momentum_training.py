"""Conservation under SGD with momentum, in training: what holds exactly and what does not.

Four measurements (float64, CPU, synthetic regression with a fresh minibatch per step):

a. **Velocity laws.** A deep linear net (6-5-4-3, two linear hidden layers) and an attention
   block (``nn.MultiheadAttention``, 2 heads of width 4, then a linear read-out) are trained
   with PyTorch's SGD, momentum μ = 0.9, at three step sizes a decade apart. The monitor
   records, at every step, the relative residual of L⁺ = μL for every velocity law
   (SCIENCE.md §10). For contrast, the same quantity for the *symmetric* generators
   (q = θᵀAv of the matrix laws: scalings, not rotations) is computed from the same records.
b. **Exact decay.** From a velocity set by hand (L₀ ≠ 0), |L_k| against μ^k |L₀|.
c. **Quadratic laws under momentum.** The matrix laws h of the linear net are not conserved;
   their change h_k − h_0 is compared with the change the exact (h, q) recurrence predicts,
   accumulated step by step (the identity groups' ``second_order``).
d. **A ReLU net keeps nothing.** A 6-8-8-3 ReLU MLP, full batch, fixed training time T: plain
   SGD (time T = η n) against the heavy-ball discretization (μ = 1 − τh, η = h², T = n h,
   τ = 1). Under SGD the per-unit laws drift by O(η) (a law); under heavy ball the drift does
   not vanish as h → 0 (no law, as in continuous time), and no velocity law replaces them.

Writes ``<out>/momentum_velocity_laws.png`` and ``results/momentum_training.json``.

Usage:
    python experiments/momentum_training.py [--steps 500] [--out figures]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import torch_conslaw as tc

F64 = torch.float64
MU = 0.9
LRS = (1e-3, 1e-2, 1e-1)


class AttentionBlock(nn.Module):
    """Self-attention (2 heads of width 4) and a linear read-out, on sequences of 5 tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.read = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.read(self.attn(x, x, x, need_weights=False)[0])


def linear_net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3))


def batch(name: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "attention":
        return torch.randn(16, 5, 8, generator=gen, dtype=F64), torch.randn(16, 5, 3, generator=gen, dtype=F64)
    return torch.randn(16, 6, generator=gen, dtype=F64), torch.randn(16, 3, generator=gen, dtype=F64)


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return (AttentionBlock() if name == "attention" else linear_net()).double()


def train(name: str, lr: float, steps: int, initial_velocity: float = 0.0) -> tc.ConservationMonitor:
    model = make(name)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MU)
    if initial_velocity:
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            opt.state[p]["momentum_buffer"] = initial_velocity * torch.randn(p.shape, generator=gen, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the attention read-out is not a pair
        monitor = tc.ConservationMonitor(model, every=1).attach(opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = batch(name, gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return monitor


def velocity_residuals(monitor: tc.ConservationMonitor) -> np.ndarray:
    """Per step: max relative residual of L⁺ = μL over the velocity groups."""
    history = monitor.history()
    cols = [history[f"{g.name}/rel_drift"][1:] for g in monitor.identity_groups if g.kind == "velocity"]
    return np.max(np.stack(cols), axis=0)


def scaling_residuals(monitor: tc.ConservationMonitor) -> np.ndarray:
    """Per step: max over the matrix groups of |q⁺ − μq| / max|h| (q = θᵀAv, symmetric generators)."""
    history = monitor.history()
    out = []
    for g in monitor.identity_groups:
        if g.kind != "recurrence" or g.base.kind != "matrix":
            continue
        values = history[f"{g.name}/values"][1:]
        h, q = values[:, : g.base.count], values[:, g.base.count :]
        out.append(np.abs(q[1:] - MU * q[:-1]).max(axis=1) / np.abs(h[:-1]).max(axis=1))
    return np.max(np.stack(out), axis=0)


def relu_drift(h: float, heavy_ball: bool, total_time: float) -> float:
    """Max relative drift of the per-unit laws of a ReLU MLP after training time T (full batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 6, generator=gen, dtype=F64), torch.randn(64, 3, generator=gen, dtype=F64)
    if heavy_ball:  # θ'' + τθ' = −∇E with step h: μ = 1 − τh, η = h², T = n h (τ = 1)
        opt = torch.optim.SGD(model.parameters(), lr=h * h, momentum=1.0 - h)
    else:  # gradient flow with step h: T = n h
        opt = torch.optim.SGD(model.parameters(), lr=h)
    monitor = tc.ConservationMonitor(model, split=False, every=1).attach(opt)
    for _ in range(round(total_time / h)):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    rows = monitor.summary()
    assert not any(r["kind"] == "velocity" for r in rows)  # no velocity law for per-unit laws
    return max(r["max_rel_drift"] for r in rows if r["kind"] == "unit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps per run in (a)-(c)")
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and least noisy
    start = time.perf_counter()
    results: dict = {"momentum": MU, "steps": args.steps, "velocity": {}, "scaling": {}}

    # (a) velocity laws at three step sizes; symmetric generators for contrast
    curves = {}
    for name in ("linear", "attention"):
        for lr in LRS:
            monitor = train(name, lr, args.steps)
            res, sym = velocity_residuals(monitor), scaling_residuals(monitor)
            curves[name, lr] = (res, sym)
            groups = [g.name for g in monitor.identity_groups if g.kind == "velocity"]
            results["velocity"][f"{name} lr={lr:g}"] = {"max_rel_residual": float(res.max()), "groups": groups}
            results["scaling"][f"{name} lr={lr:g}"] = {"median_rel_residual": float(np.median(sym))}
            print(f"(a) {name:9} lr={lr:<6g} velocity laws ({len(groups)} groups): max rel. residual of "
                  f"L⁺ = μL {res.max():.2e}; scaling generators: median |q⁺ − μq|/|h| {np.median(sym):.2e}", flush=True)

    # (b) exact decay from a velocity set by hand
    decay = train("linear", 1e-2, 200, initial_velocity=1.0)
    history = decay.history()
    L = history["0→1 velocity/values"][1:]
    k = history["step"][1:].astype(float)
    L0 = L[0] / MU  # L₁ = μ L₀
    rel = np.abs(L - MU ** k[:, None] * L0).max(axis=1) / (MU**k * np.abs(L0).max())
    results["decay"] = {"max_rel_error_vs_mu_k_L0_over_100_steps": float(rel[:100].max())}
    print(f"(b) |L_k − μ^k L₀| / (μ^k |L₀|) over 100 steps: max {rel[:100].max():.2e}", flush=True)

    # (c) the quadratic laws drift exactly as the recurrence says
    monitor = train("linear", 1e-2, args.steps)
    history = monitor.history()
    base = next(g for g in monitor.groups if g.name == "0→1")
    h = history["0→1/values"]
    predicted = np.cumsum(history["0→1 recurrence/second_order"][1:, : base.count], axis=0)
    drift = h[1:] - h[0]
    mismatch = np.abs(drift - predicted).max() / np.abs(drift).max()
    row = {r["name"]: r for r in monitor.summary()}
    results["recurrence"] = {
        "max_rel_drift_of_h": row["0→1"]["max_rel_drift"],
        "max_rel_first_order_of_h": row["0→1"]["max_rel_first_order"],
        "max_rel_residual_of_recurrence": row["0→1 recurrence"]["max_rel_residual"],
        "accumulated_prediction_mismatch": float(mismatch),
    }
    print(f"(c) linear 0→1: h drifts by {row['0→1']['max_rel_drift']:.2e} (rel.), first order "
          f"{row['0→1']['max_rel_first_order']:.2e}; recurrence residual "
          f"{row['0→1 recurrence']['max_rel_residual']:.2e}; accumulated prediction vs drift "
          f"{mismatch:.2e}", flush=True)

    # (d) a ReLU net keeps nothing under momentum
    hs = np.array([0.1, 0.05, 0.02, 0.01])
    total_time = 2.0
    sgd = [relu_drift(float(x), False, total_time) for x in hs]
    heavy = [relu_drift(float(x), True, total_time) for x in hs]
    slope = lambda d: float(np.polyfit(np.log(hs), np.log(d), 1)[0])  # noqa: E731
    results["relu"] = {"h": hs.tolist(), "time": total_time, "sgd_drift": sgd, "heavy_ball_drift": heavy,
                       "sgd_slope": slope(sgd), "heavy_ball_slope": slope(heavy)}
    print(f"(d) ReLU per-unit laws at T={total_time}: SGD drift {sgd} (slope {slope(sgd):.2f}); heavy ball "
          f"{heavy} (slope {slope(heavy):.2f})", flush=True)

    plot(curves, L, L0, drift, predicted, hs, sgd, heavy, args.out / "momentum_velocity_laws.png")
    args.results.mkdir(exist_ok=True)
    results["seconds"] = time.perf_counter() - start
    (args.results / "momentum_training.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'momentum_velocity_laws.png'} and {args.results / 'momentum_training.json'} "
          f"in {results['seconds']:.0f} s")


def plot(curves, L, L0, drift, predicted, hs, sgd, heavy, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    a = ax[0, 0]
    colors = {1e-3: "tab:blue", 1e-2: "tab:orange", 1e-1: "tab:green"}
    for (name, lr), (res, sym) in curves.items():
        style = "-" if name == "linear" else "--"
        a.semilogy(np.maximum(res, 1e-18), style, color=colors[lr], lw=0.8, label=f"L⁺ = μL, {name}, η={lr:g}")
        if name == "linear":
            a.semilogy(sym, ":", color=colors[lr], lw=0.8, label=f"q⁺ = μq (scaling), η={lr:g}")
    a.set(title="(a) per-step relative residual, SGD momentum 0.9", xlabel="step", ylabel="relative residual")
    a.legend(fontsize=7, ncol=2)
    b = ax[0, 1]
    k = np.arange(1, len(L) + 1)
    for i in range(min(4, L.shape[1])):
        b.semilogy(k, np.abs(L[:, i]), lw=1.0, label=f"velocity law {i} of 0→1 (monitor)")
        b.semilogy(k, MU**k * abs(L0[i]), "k:", lw=0.8)
    b.set(title="(b) from a hand-set velocity: |L_k| and μ^k |L₀| (dotted)", xlabel="step")
    b.legend(fontsize=7)
    c = ax[1, 0]
    for i in range(min(4, drift.shape[1])):
        c.plot(drift[:, i], lw=1.2, label=f"h_k − h₀, law {i}")
        c.plot(predicted[:, i], "k:", lw=1.0)
    c.set(title="(c) matrix laws h: drift and the (h, q) recurrence (dotted)", xlabel="step")
    c.legend(fontsize=7)
    d = ax[1, 1]
    d.loglog(hs, sgd, "o-", label="plain SGD (η = h): a law, drift ∝ h")
    d.loglog(hs, heavy, "s-", label="heavy ball (μ = 1 − h, η = h²): no law")
    d.set(title="(d) ReLU per-unit laws at fixed time T = 2", xlabel="step h", ylabel="max relative drift")
    d.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
