"""Approximate laws: the eps-induced first-order part of the scale laws before a normalization.

A Conv2d → BatchNorm2d → ReLU → Flatten → Linear → LayerNorm → ReLU → Linear net (float64),
20 steps of SGD (lr 0.05, MSE) at several eps. For each linear law group (bias → BatchNorm,
LayerNorm centering) and approximate group (scale before BatchNorm / LayerNorm): the largest
relative first-order part and the residual of the construction-time check. Writes
results/approximate_laws_eps.md.

    PYTHONPATH=$PWD python experiments/approximate_laws_eps.py
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc


def run(eps: float) -> dict[str, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, eps=eps), nn.ReLU(), nn.Flatten(),
        nn.Linear(75, 8), nn.LayerNorm(8, eps=eps), nn.ReLU(), nn.Linear(8, 2),
    ).double()
    x, y = torch.randn(16, 2, 5, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    monitor = tc.ConservationMonitor(model, x, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor.attach(opt)
    for _ in range(20):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return {s["name"]: s for s in monitor.summary() if s["kind"] in ("linear", "approximate")}


def main() -> None:
    torch.set_num_threads(1)
    results = {eps: run(eps) for eps in (1e-3, 1e-4, 1e-5, 1e-6)}
    names = list(next(iter(results.values())))
    lines = [
        "| eps | " + " | ".join(f"{n} ({next(iter(results.values()))[n]['kind']})" for n in names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for eps, rows in results.items():
        cells = [f"{rows[n]['max_rel_first_order']:.1e} / {rows[n]['verification_residual']:.1e}" for n in names]
        lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    out = Path("results/approximate_laws_eps.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Linear and approximate laws vs the normalization's eps\n\n"
        "Each cell: max relative first-order part over 20 SGD steps / residual of the "
        "construction-time check (max |cos(∇h, ∂fᵀu)|). Reproduce: "
        "`PYTHONPATH=$PWD python experiments/approximate_laws_eps.py`.\n\n" + text + "\n"
    )


if __name__ == "__main__":
    main()
