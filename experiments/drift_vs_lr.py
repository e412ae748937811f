"""Drift of the conservation laws against the step size at a fixed training time (SGD).

A ReLU MLP and a small CNN are trained with full-batch SGD on synthetic data for the same
training time T = η · steps, with η over three decades. For a conservation law the exact
per-step change is η² gᵀAg (SCIENCE.md §6), so the accumulated drift is O(η): the maximal
relative drift falls like η (slope ≈ 1 on log-log axes). A quantity that is not a law,
‖W_1‖² + ‖b_1‖², changes by an amount that does not vanish as η → 0 (slope ≈ 0).

Writes ``<out>/drift_vs_lr.png`` and ``<out>/drift_vs_lr.json``.

Usage:
    python experiments/drift_vs_lr.py [--time 1.0] [--points 7] [--out figures]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torch_conslaw import plotting
from torch_conslaw.demo import image_data, make_cnn, make_mlp, regression_data, train


def first_layer_norm(model: nn.Module) -> float:
    """‖W_1‖² + ‖b_1‖² of the first parametrized layer (not a conservation law)."""
    layer = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    return float(sum(p.detach().double().square().sum() for p in layer.parameters()))


def sweep(name: str, make, data, etas: np.ndarray, total_time: float) -> dict:
    law_drift, non_law, steps_used = [], [], []
    for eta in etas:
        model = make()
        x, y = data(model)
        steps = max(1, round(total_time / eta))
        before = first_layer_norm(model)
        monitor = train(model, x, y, lr=float(eta), steps=steps, split=False, max_records=500)
        law_drift.append(max(s["max_rel_drift"] for s in monitor.summary()))
        non_law.append(abs(first_layer_norm(model) - before) / before)
        steps_used.append(steps)
        print(f"{name:>9}  η={eta:.2e}  steps={steps:6d}  max rel law drift={law_drift[-1]:.3e}  "
              f"rel change of ‖W1‖²={non_law[-1]:.3e}", flush=True)
    return {"law_drift": law_drift, "non_law_change": non_law, "steps": steps_used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=float, default=1.0, help="training time T = η · steps")
    parser.add_argument("--points", type=int, default=7, help="step sizes between 10^-3.5 and 10^-0.5")
    parser.add_argument("--out", type=Path, default=Path("figures"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and least noisy
    start = time.perf_counter()
    etas = np.logspace(-3.5, -0.5, args.points)
    results = {
        "ReLU MLP": sweep("ReLU MLP", make_mlp, regression_data, etas, args.time),
        "small CNN": sweep("small CNN", make_cnn, image_data, etas, args.time),
    }
    series = {}
    for name, r in results.items():
        series[f"{name}: max rel. law drift"] = r["law_drift"]
        series[f"{name}: rel. change of ‖W1‖² (not a law)"] = r["non_law_change"]
    fig, slopes = plotting.plot_drift_vs_step_size(
        etas, series, title=f"SGD, fixed training time T = η · steps = {args.time:g}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    plotting.save(fig, args.out / "drift_vs_lr.png")
    summary = {
        "training_time": args.time,
        "step_sizes": etas.tolist(),
        "results": results,
        "loglog_slopes": slopes,
        "seconds": time.perf_counter() - start,
    }
    (args.out / "drift_vs_lr.json").write_text(json.dumps(summary, indent=2))
    for label, slope in slopes.items():
        print(f"slope {slope:5.2f}  {label}")
    print(f"wrote {args.out / 'drift_vs_lr.png'} and {args.out / 'drift_vs_lr.json'} in {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
