"""What verify-before-claiming costs: seconds and peak memory of the numerical check.

For each model: the structure finder alone, then the check (``tc.verify_laws``: every law the
monitor would propose, float64 copy, one forward, 3 cotangent vjps, 8 + 3 jvps of all the law
values), and the whole ``ConservationMonitor(model, x)`` construction. Peak memory is the
process's max RSS growth around the check (CPU). Writes results/verify_cost.md.

    PYTHONPATH=$PWD python experiments/verify_cost.py            # demo models + VGG-BN + 25M MLP + 6-layer encoder
    PYTHONPATH=$PWD python experiments/verify_cost.py --quick    # demo models only
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from pathlib import Path

import torch
from torch import nn

import torch_conslaw as tc
from torch_conslaw import demo


def vgg_bn(width: int = 32) -> nn.Module:
    """A VGG-style CNN for 32×32 inputs: conv → BN → ReLU blocks, max-pools, a linear head."""
    cfg = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width, "M"]
    layers: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    layers += [nn.Flatten(), nn.Linear(c * 2 * 2, 10)]
    return nn.Sequential(*layers)


def encoder(layers: int, d: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d, 8, 4 * d, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, model: nn.Module, x: torch.Tensor) -> dict:
    gc.collect()
    t0 = time.perf_counter()
    tc.find_structure(model, x)
    t_structure = time.perf_counter() - t0
    before = rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    checks = tc.verify_laws(model, x)
    t_verify, c_verify = time.perf_counter() - t0, time.process_time() - c0
    peak = rss_mib() - before
    t0 = time.perf_counter()
    monitor = tc.ConservationMonitor(model, x)
    t_monitor = time.perf_counter() - t0
    exact = sum(g.count for g in monitor.groups if not g.approximate)
    approx = sum(g.count for g in monitor.groups if g.approximate)
    worst = max((c.residual for c in checks if c.threshold < 1e-6), default=0.0)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "groups": len(checks),
        "exact": exact,
        "approx": approx,
        "worst": worst,
        "structure_s": t_structure,
        "verify_s": t_verify,
        "verify_cpu_s": c_verify,
        "monitor_s": t_monitor,
        "peak_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/verify_cost.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [
        ("demo MLP 10-32-32-4", demo.make_mlp(dtype=torch.float32), torch.randn(64, 10)),
        ("demo CNN", demo.make_cnn(dtype=torch.float32), torch.randn(32, 3, 8, 8)),
        ("demo transformer layer", demo.make_transformer(dtype=torch.float32), torch.randn(8, 6, 16)),
    ]
    if not args.quick:
        cases += [
            ("VGG-BN (width 32), CIFAR input", vgg_bn(32), torch.randn(8, 3, 32, 32)),
            ("MLP 1024-4096-4096-1024 (25M)", demo.make_mlp((1024, 4096, 4096, 1024), dtype=torch.float32), torch.randn(32, 1024)),
            ("6-layer encoder d=512 (19M)", encoder(6, 512), torch.randn(4, 32, 512)),
        ]
    rows = [measure(*c) for c in cases]
    lines = [
        "| model | parameters | groups checked | exact laws | approximate laws | worst exact residual | structure (s) | check (s wall / CPU) | monitor build (s) | check peak RSS growth (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['groups']} | {r['exact']} | {r['approx']} | {r['worst']:.1e} | "
            f"{r['structure_s']:.2f} | {r['verify_s']:.2f} / {r['verify_cpu_s']:.2f} | {r['monitor_s']:.2f} | {r['peak_mib']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        "# Cost of the numerical check (verify before claiming)\n\n"
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, on a shared loaded "
        "machine (timings noisy). Reproduce: `PYTHONPATH=$PWD python experiments/verify_cost.py`.\n\n"
        + text + "\n"
    )


if __name__ == "__main__":
    main()
