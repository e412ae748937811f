"""count_laws on real nn.Modules against the path-lifting calculator, on the authors' 100 architectures.

For every architecture of ``shared/paper_sweep_architectures.json`` it builds the
``nn.Sequential`` (Linear + ReLU/Identity, biases on hidden layers only, as in the sweep),
counts its laws from data fields with :func:`torch_conslaw.count_laws` (a well-conditioned
random θ, no expected count used) and compares with :func:`torch_conslaw.mlp_trace_dimension`
(gated path-lifting surrogates).

Inputs: by default N = ``n_inputs`` Gaussian inputs, counted on N/2 and N. With ``--rich``:
Gaussian directions with a log-uniform radius (e^-3 … e^5), so that thin cones and regions far
from the origin are reached, and the input set grows ×4 (nested) from N until the count has
not changed over two successive growths (at most ``--max-growths``); every count is kept.

Data fields are path-lifting fields at the 0/1 gate patterns the inputs realize, so the data
count is never below the path-lifting count. Deeper ReLU nets whose first layers are narrow
realize few joint activation patterns on R^n0 and can keep data-dependent laws however many
inputs are drawn.

    python experiments/count_sweep.py [--archs PATH] [--out results/count_sweep.json]
    python experiments/count_sweep.py --rich --only 51,52,... --out results/count_sweep_rich.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from torch_conslaw import count_laws, mlp_trace_dimension

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = ROOT.parent / "shared" / "paper_sweep_architectures.json"


def sequential(widths: list[int], activation: str, bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        last = k == len(widths) - 2
        layers.append(nn.Linear(widths[k], widths[k + 1], bias=bias and not last))
        if not last:
            layers.append(nn.ReLU() if activation == "relu" else nn.Identity())
    return nn.Sequential(*layers)


def n_inputs(widths: list[int], D: int) -> int:
    """Rich inputs: 32 D / (outputs per input), at least 256 (every ReLU pattern appears)."""
    return max(256, 32 * D // widths[-1])


def heavy_tailed_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """n Gaussian directions scaled by a log-uniform radius e^U, U ~ U(-3, 5) (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x * torch.empty(n, 1, dtype=torch.float64).uniform_(-3.0, 5.0, generator=g).exp()


def count_until_stable(model: nn.Module, n: int, dim: int, seed: int, max_growths: int):
    """count_laws on ×4-growing nested input sets until two growths leave the count unchanged."""
    x = heavy_tailed_inputs(n * 4**max_growths, dim, seed)
    history: list[dict] = []
    for k in range(max_growths + 1):
        res = count_laws(model, x[: n * 4**k], theta="random", seed=seed)
        history.append({"n_inputs": n * 4**k, "n_laws": res.n_laws, "levels": res.levels})
        if len(history) >= 3 and history[-1]["n_laws"] == history[-2]["n_laws"] == history[-3]["n_laws"]:
            break
    stable = len(history) >= 3 and history[-1]["n_laws"] == history[-2]["n_laws"] == history[-3]["n_laws"]
    return res, history, stable


def gaussian_count(model: nn.Module, n: int, dim: int, seed: int):
    """count_laws on N Gaussian inputs, with the count on N/2 as evidence."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    res = count_laws(model, x, theta="random", seed=seed, input_sizes=[n // 2, n])
    return res, res.input_counts, res.stable


def run(archs: list[dict], rich: bool = False, only: set[int] | None = None, max_growths: int = 3) -> list[dict]:
    rows = []
    for i, arch in enumerate(archs):
        if only is not None and i not in only:
            continue
        widths, act, bias = arch["widths"], arch["activation"], arch["bias"]
        n = n_inputs(widths, arch["D"])
        model = sequential(widths, act, bias)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if rich:
                res, history, stable = count_until_stable(model, n, widths[0], i, max_growths)
            else:
                res, history, stable = gaussian_count(model, n, widths[0], i)
        seconds = time.perf_counter() - start
        n = history[-1]["n_inputs"]
        ref = mlp_trace_dimension(widths, [act] * (len(widths) - 2), bias=bias, output_bias=False, seed=i)
        if res.D != arch["D"]:
            raise RuntimeError(f"architecture {i}: D={res.D} but the sweep lists D={arch['D']}")
        rows.append(
            {
                "index": i,
                "widths": "-".join(map(str, widths)),
                "activation": act,
                "bias": bias,
                "D": res.D,
                "n_inputs": n,
                "levels": res.levels,
                "n_laws": res.n_laws,
                "path_lifting_laws": ref.n_laws,
                "agrees": res.n_laws == ref.n_laws,
                "stable": stable,
                "input_counts": history,
                "gap": res.evidence,
                "warnings": sorted({str(w.message) for w in caught if "jit" not in str(w.message)}),
                "seconds": round(seconds, 2),
            }
        )
        print(
            f"{i:3d} {rows[-1]['widths']:>14} {act:6} bias={bias!s:5} D={res.D:4} N={n:5}: "
            f"count_laws {res.n_laws:3d}, path lifting {ref.n_laws:3d} ({seconds:.2f} s; "
            f"counts {[h['n_laws'] for h in history]})",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=Path, default=DEFAULT_ARCHS)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "count_sweep.json")
    parser.add_argument("--rich", action="store_true", help="heavy-tailed inputs, grown ×4 until the count is stable")
    parser.add_argument("--max-growths", type=int, default=3)
    parser.add_argument("--only", type=str, default=None, help="comma-separated architecture indices")
    args = parser.parse_args()
    archs = json.loads(args.archs.read_text())
    only = None if args.only is None else {int(i) for i in args.only.split(",")}
    start = time.perf_counter()
    rows = run(archs, rich=args.rich, only=only, max_growths=args.max_growths)
    total = time.perf_counter() - start
    summary = {
        "architectures": len(rows),
        "inputs": "heavy-tailed, grown x4 until stable" if args.rich else "Gaussian, N/2 and N",
        "agree": sum(r["agrees"] for r in rows),
        "agree_linear": sum(r["agrees"] for r in rows if r["activation"] == "linear"),
        "linear": sum(r["activation"] == "linear" for r in rows),
        "agree_relu_one_hidden_layer": sum(r["agrees"] for r in rows if r["activation"] == "relu" and r["widths"].count("-") == 2),
        "relu_one_hidden_layer": sum(r["activation"] == "relu" and r["widths"].count("-") == 2 for r in rows),
        "agree_relu_deeper": sum(r["agrees"] for r in rows if r["activation"] == "relu" and r["widths"].count("-") > 2),
        "relu_deeper": sum(r["activation"] == "relu" and r["widths"].count("-") > 2 for r in rows),
        "data_count_below_path_count": sum(r["n_laws"] < r["path_lifting_laws"] for r in rows),
        "stable": sum(r["stable"] for r in rows),
        "with_warnings": sum(bool(r["warnings"]) for r in rows),
        "worst_smallest_accepted": min(v for r in rows if (v := r["gap"]["smallest_accepted"]) == v),
        "worst_largest_rejected": max(v for r in rows if (v := r["gap"]["largest_rejected"]) == v),
        "total_seconds": round(total, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": list(__import__("os").getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
