"""Overhead of the ConservationMonitor on a 784-512-512-10 ReLU MLP at batch 128 (SGD).

Seven trainings run side by side from the same initialization: no monitor, a monitor that
records every step without the split, one that records every step with the exact
first/second-order split, the same two monitors with ``asynchronous=True`` (the training
thread copies the parameters into a snapshot buffer, a worker thread evaluates the laws;
``values-async``, ``split-async``) and with ``asynchronous="live"`` (the training thread
copies nothing: the worker reads the parameters themselves during the next forward/backward
pass and the optimizer's pre-step hook waits until it is done; ``values-live``,
``split-live``). Each ``-async`` block ends with ``monitor.flush()``, inside the timing, so
its worker does not run into the next block of another training. A ``-live`` worker only
starts reading at the next forward pass of its own model, so its blocks end without a flush:
the last step's read runs, overlapped like every other, in its next block (the final one is
flushed after the timing). Steps are timed in interleaved blocks (so load from other
processes hits all of them alike) and the overhead is the median over blocks of
time(monitored) / time(plain) − 1. Results go to ``<out>/bench_monitor.json``.

The same blocks also train four reference runs whose optimizer post-step hook does only part
of the work (``floors`` in the JSON: overhead over the plain step, same method):

* ``read_f32``: one float32 sum over every tracked parameter (reading each once; no exact
  method can do less);
* ``copy_native``: copying every tracked parameter into persistent buffers of its own dtype
  (what the training thread does in asynchronous mode);
* ``convert_f64``: copying every tracked parameter into persistent float64 buffers (the exact
  float32 → float64 conversion of all parameters);
* ``accountant_values``: the law values alone (:class:`~torch_conslaw.accounting.Accountant`,
  without the monitor's bookkeeping).

These run inside the training loop, so they pay the same cold caches as the monitor.

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
from torch_conslaw.accounting import Accountant
from torch_conslaw.lawgroups import build_groups
from torch_conslaw.structure import find_structure

WIDTHS = (784, 512, 512, 10)
BATCH = 128
MONITORED = ("values", "split", "values-async", "split-async", "values-live", "split-live")


def make_run(mode: str | None, device: str):
    """A training step closure for ``mode`` in (None, "values", "split", "values-async",
    "split-async", "values-live", "split-live") or a reference hook ``read_f32`` / ``copy_native`` / ``convert_f64`` / ``accountant_values`` (see ``floors``)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(WIDTHS[0], WIDTHS[1]), nn.ReLU(), nn.Linear(WIDTHS[1], WIDTHS[2]), nn.ReLU(),
        nn.Linear(WIDTHS[2], WIDTHS[3]),
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = None
    if mode in MONITORED:
        monitor = ConservationMonitor(
            model,
            split=mode.startswith("split"),
            every=1,
            max_records=1000,
            asynchronous="live" if mode.endswith("-live") else mode.endswith("-async"),
        )
        monitor.attach(opt)
    elif mode is not None:
        opt.register_step_post_hook(reference_hook(mode, model))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, WIDTHS[0], generator=g).to(device)
    y = torch.randint(0, WIDTHS[-1], (BATCH,), generator=g).to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step, monitor


def reference_hook(kind: str, model: nn.Module):
    """An optimizer post-step hook doing only part of the monitor's work (see ``floors``)."""
    acc = Accountant(build_groups(find_structure(model).pairs))
    params = dict(model.named_parameters())
    tensors = [params[n] for n in acc.names]
    bufs = [torch.empty(t.shape, dtype=torch.float64, device=t.device) for t in tensors]
    same = [torch.empty_like(t) for t in tensors]

    def hook(*_args) -> None:
        with torch.no_grad():
            if kind == "read_f32":
                for t in tensors:
                    t.sum()
            elif kind == "copy_native":
                for b, t in zip(same, tensors):
                    b.copy_(t)
            elif kind == "convert_f64":
                for b, t in zip(bufs, tensors):
                    b.copy_(t)
            elif kind == "accountant_values":
                acc.values(params)
            else:
                raise ValueError(kind)

    return hook


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
    modes = {"plain": None} | {m: m for m in MONITORED}
    runs = {name: make_run(mode, args.device) for name, mode in modes.items()}
    floors = ("read_f32", "copy_native", "convert_f64", "accountant_values")
    timed = {name: step for name, (step, _) in runs.items()} | {f: make_run(f, args.device)[0] for f in floors}
    # asynchronous monitors: each timed block ends with flush() (waits for the worker), so
    # a block's time contains all the recording work of its steps
    ends = {name: m.flush for name, (_, m) in runs.items() if m is not None and name.endswith("-async")}
    for name, step in timed.items():  # warm-up
        for _ in range(5):
            step()
        ends.get(name, lambda: None)()
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.blocks):
        for name, step in timed.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            ends.get(name, lambda: None)()
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    for _, m in runs.values():
        if m is not None:
            m.flush()
    ratio = {
        name: statistics.median(t / b for t, b in zip(times[name], times["plain"]))
        for name in timed
        if name != "plain"
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
        "overhead_values_only_async": ratio["values-async"] - 1,
        "overhead_with_split_async": ratio["split-async"] - 1,
        "overhead_values_only_live": ratio["values-live"] - 1,
        "overhead_with_split_live": ratio["split-live"] - 1,
        "targets": {"values_only": 0.02, "with_split": 0.10},
        "floors": {name: ratio[name] - 1 for name in floors},
        "recorded_steps": {k: m.num_steps for k, (_, m) in runs.items() if m is not None},
        "last_delivered_record": {k: int(m.history()["step"][-1]) for k, (_, m) in runs.items() if m is not None},
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_monitor.json" if args.device == "cpu" else f"bench_monitor_{args.device.split(':')[0]}.json"
    if args.threads != 1:
        name = name.replace(".json", f"_{args.threads}threads.json")
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(f"plain step: {result['median_step_ms']['plain']:.3f} ms (median, {result['device']}, {args.threads} thread(s))")
    print(f"overhead, recording every step, values only: {100 * result['overhead_values_only']:+.1f} % (target ≤ 2 %)")
    print(f"overhead, recording every step, with split:  {100 * result['overhead_with_split']:+.1f} % (target ≤ 10 %)")
    print(f"overhead, asynchronous, values only:         {100 * result['overhead_values_only_async']:+.1f} % (target ≤ 2 %)")
    print(f"overhead, asynchronous, with split:          {100 * result['overhead_with_split_async']:+.1f} % (target ≤ 10 %)")
    print(f"overhead, live reading, values only:         {100 * result['overhead_values_only_live']:+.1f} % (target ≤ 2 %)")
    print(f"overhead, live reading, with split:          {100 * result['overhead_with_split_live']:+.1f} % (target ≤ 10 %)")
    for name, r in result["floors"].items():
        print(f"  reference, post-step hook doing only {name + ':':<19} {100 * r:+5.1f} %")


if __name__ == "__main__":
    main()
