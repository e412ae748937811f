"""Scale of the Lie-algebra calculator: time and peak memory against D, per method.

Each configuration runs in its own subprocess so that its peak resident memory is its own.
Writes ``results/bench_lie.json`` and ``figures/bench_lie.png``.

    python experiments/bench_lie.py            # quick: sizes up to ~20k parameters (a few minutes)
    python experiments/bench_lie.py --full     # adds the 784-128-128-10 ReLU MLP with biases (D = 118,282)

The dense method keeps an explicit basis of W_k(θ) in R^D; the complement method works in the
complement of W_1(θ) found matrix-free, and reaches large D when that complement is small
(ReLU networks). ``method="auto"`` (used for the headline row) switches at D = 4000.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QUICK = [
    # (widths, activation, bias, method)
    ([8, 8, 8, 4], "linear", False, "dense"),
    ([16, 16, 16, 8], "linear", False, "dense"),
    ([24, 24, 24, 12], "linear", False, "dense"),
    ([32, 32, 32, 16], "linear", False, "dense"),
    ([40, 40, 40, 20], "linear", False, "dense"),
    ([16, 16, 16, 8], "relu", True, "dense"),
    ([32, 32, 32, 16], "relu", True, "dense"),
    ([48, 32, 32, 10], "relu", True, "dense"),
    ([64, 48, 48, 10], "relu", True, "dense"),
    ([32, 32, 32, 16], "relu", True, "complement"),
    ([64, 48, 48, 10], "relu", True, "complement"),
    ([196, 64, 64, 10], "relu", True, "complement"),
    ([392, 96, 64, 10], "relu", True, "auto"),
    ([12, 12, 12, 6], "linear", False, "complement"),
]
FULL = QUICK + [([784, 128, 128, 10], "relu", True, "auto")]


def single(widths: list[int], activation: str, bias: bool, method: str) -> dict:
    """Run one configuration in this process and return its measurements."""
    from torch_conslaw import mlp_trace_dimension

    start = time.perf_counter()
    try:
        res = mlp_trace_dimension(widths, activation, bias=bias, method=method)
    except ValueError as err:  # e.g. a complement too large for the matrix-free method
        return {"ok": False, "error": str(err), "seconds": time.perf_counter() - start}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "ok": True,
        "D": res.D,
        "n_laws": res.n_laws,
        "levels": res.levels,
        "known_laws": res.known_laws,
        "certified": res.certified,
        "method": res.method,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_mb,
        "evidence": res.evidence,
    }


def run_subprocess(widths: list[int], activation: str, bias: bool, method: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--single", json.dumps([widths, activation, bias, method])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s", "seconds": timeout}
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {("linear", "dense"): "s-", ("relu", "dense"): "o-", ("relu", "complement"): "^-", ("linear", "complement"): "x-"}
    for (act, method), style in styles.items():
        pts = sorted((r["D"], r["seconds"], r["peak_rss_mb"]) for r in rows if r.get("ok") and r["activation"] == act and r["method"] == method)
        if not pts:
            continue
        d, s, m = zip(*pts)
        axes[0].loglog(d, s, style, label=f"{act} MLP, {method}")
        axes[1].loglog(d, m, style, label=f"{act} MLP, {method}")
    for ax, label in zip(axes, ["seconds", "peak resident memory (MB)"]):
        ax.set_xlabel("parameters D")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("time to count every conservation law")
    axes[1].set_title("peak memory (whole process)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="include the 118k-parameter network")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        widths, activation, bias, method = json.loads(args.single)
        print(json.dumps(single(widths, activation, bias, method)))
        return
    rows = []
    for widths, activation, bias, method in FULL if args.full else QUICK:
        row = run_subprocess(widths, activation, bias, method, args.timeout)
        row.update({"widths": widths, "activation": activation, "bias": bias, "requested_method": method})
        row.setdefault("method", method)
        rows.append(row)
        if row.get("ok"):
            print(
                f"{'-'.join(map(str, widths)):>16} {activation:6} {row['method']:10} D={row['D']:>7}  laws={row['n_laws']:>5} "
                f"(known {row['known_laws']}, certified {row['certified']})  {row['seconds']:8.2f} s  {row['peak_rss_mb']:7.0f} MB",
                flush=True,
            )
        else:
            print(f"{'-'.join(map(str, widths)):>16} {activation:6} {method:10} not reached: {row['error']}", flush=True)
    out = ROOT / "results" / "bench_lie.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    plot(rows, ROOT / "figures" / "bench_lie.png")
    print(f"wrote {out} and figures/bench_lie.png")


if __name__ == "__main__":
    main()
