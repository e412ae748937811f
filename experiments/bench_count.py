"""Time and memory of count_laws at scale: a ReLU CNN and a ResNet with BatchNorm of ≥ 100,000 parameters.

Both models are fully convolutional with a wide head (many outputs per input position): the
count's cost is about (complement dim) × (CG iterations) × (one jvp + one vjp over the batch), and
a batch must have more outputs than parameters before W_1(θ) can fill its span (SCIENCE.md §10),
so outputs per input are what makes a count cheap. The exact count is checked against the closed
form (one law per hidden ReLU channel; for BatchNorm, the laws of SCIENCE.md §8), and every rank
decision must have a clear gap.

    python experiments/bench_count.py [--threads 2] [--quick]

writes results/bench_count.json and figures/bench_count.png (peak memory = the process's max RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from torch_conslaw import count_laws

ROOT = Path(__file__).resolve().parents[1]


class ReluCNN(nn.Module):
    """conv3×3 (3 → c) · ReLU · conv3×3 (c → c) · ReLU · conv k×k (c → classes): a segmentation-style net."""

    def __init__(self, channels: int, classes: int, head_kernel: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(channels, classes, head_kernel, padding=head_kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def expected_laws(self) -> dict[str, int]:
        hidden = self.body[0].out_channels + self.body[2].out_channels
        return {"exact": hidden, "eps0": hidden}


class ResNetBN(nn.Module):
    """conv stem · BN · ReLU, one residual block (conv · BN · ReLU · conv · BN) + skip · ReLU, wide conv head."""

    def __init__(self, channels: int, classes: int, head_kernel: int):
        super().__init__()
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.branch = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        )
        self.head = nn.Conv2d(c, classes, head_kernel, padding=head_kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(torch.relu(h + self.branch(h)))

    def expected_laws(self) -> dict[str, int]:
        c = self.stem[0].out_channels
        # SCIENCE.md §8 per channel: the bias of each of the 3 convs before a BatchNorm (linear
        # laws); the branch's BN → ReLU → conv rescaling; the stem's BN → ReLU rescaling, which
        # crosses the skip together with the last BN's (γ, β) and the head's input column.
        # At eps = 0 each conv before a BatchNorm also keeps its filter norms (scale invariance).
        return {"exact": 3 * c + c + c, "eps0": 3 * c + c + c + 3 * c}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def bench(name: str, model: nn.Module, n_inputs: int, size: int, seed: int = 0, **kwargs) -> dict:
    x = torch.randn(n_inputs, 3, size, size, generator=torch.Generator().manual_seed(seed))
    D = sum(p.numel() for p in model.parameters())
    outputs = n_inputs * model(x[:1]).numel()
    print(f"{name}: D={D}, {n_inputs} inputs of 3×{size}×{size}, {outputs} outputs ({outputs / D:.1f} per parameter)", flush=True)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = count_laws(model, x, theta="random", seed=seed, progress=None, **kwargs)
    seconds = time.perf_counter() - start
    decisions = [d for ds in res.decisions for d in ds]
    row = {
        "model": name,
        "D": res.D,
        "n_inputs": n_inputs,
        "input_shape": [3, size, size],
        "outputs": outputs,
        "method": res.method,
        "levels": res.levels,
        "n_laws": res.n_laws,
        "n_laws_eps0": res.n_laws_eps0,  # every normalization eps set to 0 (its gaps: in warnings when unclear)
        "eps_counts": res.eps_counts,
        "input_counts": res.input_counts,
        "stable": res.stable,
        "expected": model.expected_laws(),
        "all_gaps_clear": all(d.clear for d in decisions),
        "decisions": [d.describe() for d in decisions],
        "evidence": res.evidence,
        "cg_iterations": None if res.null_space is None else res.null_space.cg_iterations,
        "cg_worst_relative_residual": None if res.null_space is None else res.null_space.worst_relative_residual,
        "eliminated": None if res.null_space is None else res.null_space.eliminated,
        "schur_size": None if res.null_space is None else res.null_space.schur_size,
        "schur_route": None if res.null_space is None else res.null_space.schur_route,
        "warnings": [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)],
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }
    print(json.dumps(row, indent=1), flush=True)
    return row


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [f"{r['model']}\nD={r['D']:,}" for r in rows]
    axes[0].bar(names, [r["seconds"] for r in rows], color="tab:blue")
    axes[0].axhline(600, color="gray", ls="--", lw=1)
    axes[0].set_ylabel("wall-clock seconds")
    axes[0].set_title("count_laws time (limit 600 s dashed)")
    axes[1].bar(names, [r["peak_rss_gb"] for r in rows], color="tab:orange")
    axes[1].axhline(8, color="gray", ls="--", lw=1)
    axes[1].set_ylabel("peak RSS (GB)")
    axes[1].set_title("peak memory (limit 8 GB dashed)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"exact law counts on {rows[0]['threads']} threads (load average {rows[-1]['load_average'][0]:.1f})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small models (D ≈ 2,600): the size that fits a heavily loaded machine")
    parser.add_argument("--only", choices=["cnn", "resnet"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = dict(channels=4, classes=64, head_kernel=3, n_inputs=6, size=6) if args.quick else dict(
        channels=8, classes=512, head_kernel=5, n_inputs=48, size=8
    )
    n, size = scale.pop("n_inputs"), scale.pop("size")
    # two input sizes (n/2, n: the evidence that n is enough); BatchNorm counted at eps = 1 (the
    # exact count is the same for every eps > 0, and eps = 1e-5 blurs the gaps) and at eps = 0
    rows = []
    if args.only in (None, "cnn"):
        rows.append(bench("ReLU CNN", ReluCNN(**scale), n, size, input_sizes=[n // 2, n]))
    if args.only in (None, "resnet"):
        rows.append(bench("ResNet + BatchNorm", ResNetBN(**scale), n, size, input_sizes=[n // 2, n], eps=1.0))
    for row in rows:
        row["scale"] = "quick" if args.quick else "full"
    out = ROOT / "results" / "bench_count.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and out.exists():  # keep the other model's row of an earlier run
        kept = [r for r in json.loads(out.read_text()) if r["model"] not in {row["model"] for row in rows}]
        rows = [r for r in kept if r.get("scale") == rows[0]["scale"]] + rows
    out.write_text(json.dumps(rows, indent=1))
    figure(rows, ROOT / "figures" / "bench_count.png")
    print(f"wrote {out} and figures/bench_count.png")


if __name__ == "__main__":
    main()
