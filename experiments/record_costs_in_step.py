"""What one synchronous record costs inside a training step, part by part, against the same part alone.

The monitor's synchronous record runs in the optimizer's post-step hook, right after the
training step has filled the caches with its own data and code. This probe times, on
``bench_monitor``'s 784-512-512-10 ReLU MLP (batch 128, SGD), each part of a values record
from inside such a hook (one part per training, every step) and the same part called alone in
a loop (warm caches):

* ``read_f32``: one float32 read of θ (``p.sum()`` per tensor), the issue's floor;
* ``law_values``: ``monitor.evaluator.values(params)``, the default evaluation of every law
  (``"auto"``: the native kernel where it builds); ``law_values_compiled``: the same with
  ``evaluation="compiled"`` (TorchInductor);
* ``one_small_op``: one float64 subtraction of two law-sized vectors (what the statistics do
  four times per record);
* ``record``: the whole post-step hook of a ``ConservationMonitor(every=1, split=False,
  recording="sync")`` (evaluation, statistics, history), timed around ``optimizer.step()``
  minus the plain step.

    python experiments/record_costs_in_step.py [--threads 2] [--steps 300]

writes results/record_costs_in_step.json (medians in microseconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_monitor import BATCH, WIDTHS, make_mlp  # noqa: E402

from torch_conslaw import ConservationMonitor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def training(
    hook: Callable[[], None] | None, monitored: bool = False, split: bool = False
) -> tuple[Callable[[], None], ConservationMonitor | None]:
    """A training step of the MLP (and its ``every=1`` synchronous monitor when ``monitored``)."""
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, WIDTHS[0], generator=g), torch.randint(0, WIDTHS[-1], (BATCH,), generator=g)
    monitor = ConservationMonitor(model, every=1, split=split, recording="sync", max_records=100_000) if monitored else None
    if monitor is not None:
        monitor.attach(opt)
    if hook is not None:
        opt.register_step_post_hook(lambda *_: hook())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step, monitor


def timed_hook(fn: Callable[[], object], into: list[float]) -> Callable[[], None]:
    def hook() -> None:
        t0 = time.perf_counter()
        fn()
        into.append(time.perf_counter() - t0)

    return hook


def alone(fn: Callable[[], object], n: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = make_mlp()
    params = dict(reference.named_parameters())
    evaluator = ConservationMonitor(reference, every=1, split=False, recording="sync").evaluator
    compiled = ConservationMonitor(reference, every=1, split=False, recording="sync", evaluation="compiled").evaluator
    laws = evaluator.values(params).shape[1]
    a, b, out = (torch.randn(1, laws, dtype=torch.float64) for _ in range(3))
    parts: dict[str, Callable[[], object]] = {
        "read_f32": lambda: [p.sum() for p in params.values()],
        "law_values": lambda: evaluator.values(params),
        "law_values_compiled": lambda: compiled.values(params),
        "one_small_op": lambda: torch.sub(a, b, out=out),
    }
    in_step: dict[str, list[float]] = {name: [] for name in parts}
    runs = {name: training(timed_hook(fn, in_step[name]))[0] for name, fn in parts.items()}
    plain, _ = training(None)
    monitored, _ = training(None, monitored=True)
    step_times: dict[str, list[float]] = {"plain": [], "monitored": []}
    for step in (*runs.values(), plain, monitored):
        for _ in range(20):
            step()
    for times in in_step.values():
        times.clear()
    for _ in range(args.steps):  # interleaved, one step each
        for step in runs.values():
            step()
        for name, step in (("plain", plain), ("monitored", monitored)):
            t0 = time.perf_counter()
            step()
            step_times[name].append(time.perf_counter() - t0)
    us = lambda s: round(1e6 * s, 1)  # noqa: E731
    plain_step = statistics.median(step_times["plain"])
    result = {
        "model": "784-512-512-10 ReLU MLP, batch 128, SGD",
        "threads": args.threads,
        "laws": laws,
        "evaluation": evaluator.inner.evaluation,
        "plain_step_us": us(plain_step),
        "in_step_us": {name: us(statistics.median(t)) for name, t in in_step.items()},
        "alone_us": {name: us(alone(fn, 500)) for name, fn in parts.items()},
        "record_in_step_us": us(statistics.median(step_times["monitored"]) - plain_step),
    }
    out_path = ROOT / "results" / "record_costs_in_step.json"
    out_path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
