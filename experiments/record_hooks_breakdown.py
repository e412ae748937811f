"""Where a synchronous record's time goes inside a training step, hook by hook.

On ``bench_monitor``'s 784-512-512-10 ReLU MLP (batch 128, SGD), a plain training and one
with ``ConservationMonitor(every=1, recording="sync")`` take alternating steps; the monitored
one has its recorder's hooks and its evaluator wrapped in timers (the same objects the monitor
calls, so nothing else changes):

* ``before_step`` (the pre-step hook: the parameter guard, and with the split the check that
  the buffer still holds θ), of which ``guard``;
* ``after_step`` (the post-step hook), of which ``values`` / ``split`` (the evaluation of every
  law; of which ``kernel``, the native kernel's one call, where it runs) and ``deliver``
  (statistics and history);
* ``extra``: the monitored step minus the plain step (medians).

``--one-by-one`` delivers every record at its step (a batch of one: the monitor's behaviour
with a listener), to compare with the batched delivery of the default.

    python experiments/record_hooks_breakdown.py [--threads 2] [--split] [--one-by-one] [--steps 400]

writes results/record_hooks_breakdown[_split][_one_by_one]_<threads>t.json (medians in
microseconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_costs_in_step import training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(owner: object, name: str, into: list[float]) -> None:
    """Replace ``owner.name`` by a wrapper that appends its duration to ``into``."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--one-by-one", action="store_true", help="deliver every record at its step")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain, _ = training(None)
    monitored, monitor = training(None, monitored=True, split=args.split)
    if args.one_by_one:
        monitor._delivery_batch = 1  # an experiment switch, not an option: what a listener gets
    recorder = monitor._recorder  # the benchmark wraps the objects the monitor already calls
    ctx = recorder._ctx
    parts: dict[str, list[float]] = {
        k: [] for k in ("before_step", "guard", "after_step", "values", "split", "kernel", "deliver")
    }
    timed(recorder, "before_step", parts["before_step"])
    timed(recorder, "after_step", parts["after_step"])
    timed(ctx, "guard", parts["guard"])
    timed(ctx, "deliver", parts["deliver"])
    timed(ctx.evaluator, "values", parts["values"])
    timed(ctx.evaluator, "split", parts["split"])
    monitored()  # the evaluation is set up at the first record: then its kernel is timed too
    fused = getattr(ctx.evaluator.inner, "_fused_laws", None)
    if hasattr(fused, "_fn"):  # the native kernel alone (one ctypes call), inside values / split
        timed(fused, "_fn", parts["kernel"])
    for _ in range(30):
        plain()
        monitored()
    for times in parts.values():
        times.clear()
    steps: dict[str, list[float]] = {"plain": [], "monitored": []}
    for _ in range(args.steps):
        for name, step in (("plain", plain), ("monitored", monitored)):
            t0 = time.perf_counter()
            step()
            steps[name].append(time.perf_counter() - t0)
    us = lambda s: round(1e6 * s, 1)  # noqa: E731
    plain_step = statistics.median(steps["plain"])
    result = {
        "model": "784-512-512-10 ReLU MLP, batch 128, SGD",
        "threads": args.threads,
        "split": args.split,
        "delivery": "one by one" if args.one_by_one else "batched",
        "evaluation": monitor.evaluation,
        "plain_step_us": us(plain_step),
        "extra_us": us(statistics.median(steps["monitored"]) - plain_step),
        "hooks_us": {name: us(statistics.median(t)) for name, t in parts.items() if t},
    }
    tag = ("_split" if args.split else "") + ("_one_by_one" if args.one_by_one else "")
    out = ROOT / "results" / f"record_hooks_breakdown{tag}_{args.threads}t.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
