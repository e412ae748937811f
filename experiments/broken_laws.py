"""Which training setups break the laws, and the exact formulas of SCIENCE.md §6.

The demo ReLU MLP and small CNN are trained (full batch, float64) with plain SGD, SGD with
weight decay, SGD with momentum and Adam, and the same nets with GELU or tanh under SGD
(their would-be laws are tracked with ``track_broken=True``). For each run the monitor's
first-order part 2B(θ, Δ) shows whether the setup breaks the laws. For SGD, weight decay and
momentum the observed change of every law is compared, step by step, with the closed forms:

* SGD:          h⁺ = h + η² B(g, g)
* weight decay: h⁺ = (1 − ηλ)² h + η² B(g, g)
* momentum:     h⁺ = h − 2ημ B(θ, v) + η² B(v⁺, v⁺)   (v⁺ = μ v + g, PyTorch convention)

Writes ``<out>/broken_laws.png`` and ``<out>/broken_laws.json``.

Usage:
    python experiments/broken_laws.py [--steps 150] [--lr 0.02] [--out figures]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from torch_conslaw import ConservationMonitor, plotting
from torch_conslaw.demo import image_data, make_cnn, make_mlp, make_optimizer, regression_data


def predicted_change(group, setup: dict, theta: dict, grad: dict, v_prev: dict, v_new: dict, lr: float) -> Tensor:
    """Closed-form h(θ⁺) of SCIENCE.md §6 for plain SGD, weight decay or momentum."""
    h = group.values(theta)
    if setup.get("momentum", 0.0):
        mu = setup["momentum"]
        return h - 2 * lr * mu * group.bilinear(theta, v_prev) + lr**2 * group.values(v_new)
    lam = setup.get("weight_decay", 0.0)
    return (1 - lr * lam) ** 2 * h + lr**2 * group.values(grad)


def run(name: str, model: nn.Module, x: Tensor, y: Tensor, setup: dict, steps: int, lr: float) -> dict:
    opt = make_optimizer(model, setup["optimizer"], lr, setup.get("momentum", 0.0), setup.get("weight_decay", 0.0))
    monitor = ConservationMonitor(model, track_broken=True, every=1).attach(opt)
    records: list = []
    monitor.add_listener(records.append)  # the observed h(θ⁺) is the monitor's own record
    params = dict(model.named_parameters())
    loss_fn = nn.functional.cross_entropy if not y.is_floating_point() else nn.functional.mse_loss
    mismatch = 0.0
    # the closed forms rely on B(θ, g) = 0, i.e. on true laws (not GELU/tanh candidates)
    has_formula = setup["optimizer"] == "sgd" and all(g.pair.conserved for g in monitor.groups)
    for _ in range(steps):
        theta = {n: p.detach().clone() for n, p in params.items()}
        v_prev = {n: opt.state[p]["momentum_buffer"].clone() if "momentum_buffer" in opt.state[p]
                  else torch.zeros_like(p) for n, p in params.items()}
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        grad = {n: p.grad.detach().clone() for n, p in params.items()}
        opt.step()
        v_new = {n: opt.state[p].get("momentum_buffer", torch.zeros_like(p)) for n, p in params.items()}
        if has_formula:
            for g in monitor.groups:
                predicted = predicted_change(g, setup, theta, grad, v_prev, v_new, lr)
                observed = records[-1].values[g.name]
                mismatch = max(mismatch, float(((observed - predicted).abs() / g.scale(theta)).max()))
    hist = monitor.history()
    summary = [s for s in monitor.summary() if "max_rel_residual" not in s]  # law groups only
    return {
        "run": name,
        "setup": setup,
        "groups": [s["name"] for s in summary],
        "expected_conserved": [s["expected_conserved"] for s in summary],
        "reasons": [s["reason"] for s in summary],
        "max_rel_first_order": max(s["max_rel_first_order"] for s in summary),
        "max_rel_second_order": max(s["max_rel_second_order"] for s in summary),
        "max_rel_drift": max(s["max_rel_drift"] for s in summary),
        "formula_max_rel_mismatch": mismatch if has_formula else None,
        "first_order_per_step": np.abs(np.concatenate(
            [hist[f"{g.name}/first_order"] for g in monitor.groups], axis=1)).max(axis=1)[1:].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--out", type=Path, default=Path("figures"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    sgd = {"optimizer": "sgd"}
    setups = [
        ("MLP ReLU, SGD", make_mlp, sgd),
        ("MLP ReLU, SGD + weight decay 0.01", make_mlp, {"optimizer": "sgd", "weight_decay": 0.01}),
        ("MLP ReLU, SGD + momentum 0.9", make_mlp, {"optimizer": "sgd", "momentum": 0.9}),
        ("MLP ReLU, Adam", make_mlp, {"optimizer": "adam"}),
        ("MLP GELU, SGD", lambda: make_mlp(activation=nn.GELU), sgd),
        ("MLP tanh, SGD", lambda: make_mlp(activation=nn.Tanh), sgd),
        ("CNN ReLU, SGD", make_cnn, sgd),
        ("CNN ReLU, SGD + momentum 0.9", make_cnn, {"optimizer": "sgd", "momentum": 0.9}),
        ("CNN ReLU, Adam", make_cnn, {"optimizer": "adam"}),
        ("CNN GELU, SGD", lambda: make_cnn(activation=nn.GELU), sgd),
    ]
    results = []
    for name, make, setup in setups:
        model = make()
        x, y = (regression_data if name.startswith("MLP") else image_data)(model)
        lr = args.lr * (0.05 if setup["optimizer"] == "adam" else 1.0)
        r = run(name, model, x, y, setup, args.steps, lr)
        r["lr"] = lr
        results.append(r)
        formula = "—" if r["formula_max_rel_mismatch"] is None else f"{r['formula_max_rel_mismatch']:.1e}"
        print(f"{name:<36} max rel 1st order {r['max_rel_first_order']:.1e}   max rel drift "
              f"{r['max_rel_drift']:.1e}   §6 formula mismatch {formula}", flush=True)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    labels = [r["run"] for r in results]
    ypos = np.arange(len(results))
    left.barh(ypos, [max(r["max_rel_first_order"], 1e-18) for r in results], color=[
        "C2" if all(r["expected_conserved"]) else "C3" for r in results])
    left.set_yticks(ypos, labels, fontsize=8)
    left.invert_yaxis()
    left.set_xscale("log")
    left.set_xlabel("max relative first-order part 2B(θ, Δ) / scale")
    left.set_title("symmetry breaking (green: law expected to hold)", fontsize=10)
    for i, r in enumerate(results):
        right.plot(np.arange(1, args.steps + 1), np.maximum(r["first_order_per_step"], 1e-20),
                   color=f"C{i % 10}", lw=1, label=r["run"])
    right.set_yscale("log")
    right.set_xlabel("optimizer step")
    right.set_ylabel("max |first-order part| over the laws")
    right.legend(fontsize=6)
    args.out.mkdir(parents=True, exist_ok=True)
    plotting.save(fig, args.out / "broken_laws.png")
    (args.out / "broken_laws.json").write_text(json.dumps(
        {"steps": args.steps, "results": results, "seconds": time.perf_counter() - start}, indent=2))
    print(f"wrote {args.out / 'broken_laws.png'} and {args.out / 'broken_laws.json'} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
