"""Overhead of the ConservationMonitor on a 784-512-512-10 ReLU MLP at batch 128 (SGD).

Three trainings run side by side from the same initialization: no monitor, a monitor that
records every step without the split, and one that records every step with the exact
first/second-order split. Steps are timed in interleaved blocks (so load from other
processes hits all three alike) and the overhead is the median over blocks of
time(monitored) / time(plain) − 1. Results go to ``<out>/bench_monitor.json``.

Usage:
    python experiments/bench_monitor.py [--blocks 15] [--steps 20] [--threads 1] [--device cpu] [--out figures]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from torch_conslaw import ConservationMonitor

WIDTHS = (784, 512, 512, 10)
BATCH = 128


def make_run(mode: str | None, device: str):
    """A training step closure for ``mode`` in (None, "values", "split")."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(WIDTHS[0], WIDTHS[1]), nn.ReLU(), nn.Linear(WIDTHS[1], WIDTHS[2]), nn.ReLU(),
        nn.Linear(WIDTHS[2], WIDTHS[3]),
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = None
    if mode is not None:
        monitor = ConservationMonitor(model, split=(mode == "split"), every=1, max_records=1000)
        monitor.attach(opt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, WIDTHS[0], generator=g).to(device)
    y = torch.randint(0, WIDTHS[-1], (BATCH,), generator=g).to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step, monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=15, help="interleaved timing blocks")
    parser.add_argument("--steps", type=int, default=20, help="training steps per block")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noisy)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("figures"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    modes = {"plain": None, "values": "values", "split": "split"}
    runs = {name: make_run(mode, args.device) for name, mode in modes.items()}
    for step, _ in runs.values():  # warm-up
        for _ in range(5):
            step()
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.blocks):
        for name, (step, _) in runs.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    ratio = {
        name: statistics.median(t / b for t, b in zip(times[name], times["plain"]))
        for name in ("values", "split")
    }
    result = {
        "model": "-".join(map(str, WIDTHS)) + " ReLU MLP",
        "batch": BATCH,
        "optimizer": "SGD lr=0.01",
        "threads": args.threads,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "blocks": args.blocks,
        "steps_per_block": args.steps,
        "median_step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "overhead_values_only": ratio["values"] - 1,
        "overhead_with_split": ratio["split"] - 1,
        "targets": {"values_only": 0.02, "with_split": 0.10},
        "recorded_steps": {k: m.num_steps for k, (_, m) in runs.items() if m is not None},
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_monitor.json" if args.device == "cpu" else f"bench_monitor_{args.device.split(':')[0]}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(f"plain step: {result['median_step_ms']['plain']:.3f} ms (median, {result['device']}, {args.threads} thread(s))")
    print(f"overhead, recording every step, values only: {100 * result['overhead_values_only']:+.1f} % (target ≤ 2 %)")
    print(f"overhead, recording every step, with split:  {100 * result['overhead_with_split']:+.1f} % (target ≤ 10 %)")


if __name__ == "__main__":
    main()
