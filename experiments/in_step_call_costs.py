"""What one small Python or torch call costs inside a training step, against the same call alone.

A synchronous record runs in the optimizer's post-step hook, right after the forward pass,
the backward pass and the update have filled the caches with their own data and code. This
probe times single calls there: each call in the post-step hook of its own training of
``bench_monitor``'s 784-512-512-10 ReLU MLP (batch 128, SGD), steps interleaved, and the same
call in a loop alone (warm caches). The calls are the kinds a record's bookkeeping makes:

* ``nothing``: an empty hook body (the timer and the call of the hook's code);
* ``guard``: the monitor's parameter guard (``ParameterGuard.check``, every step);
* ``data_ptrs``, ``shapes``, ``versions``: one attribute of every parameter, in a list;
* ``torch_empty``: one new ``[3, 1024]`` float64 tensor (a record's table);
* ``tensor_view``: one view of a preallocated tensor (``buf[1]``);
* ``dict_lookups``: the parameters looked up by name.

    python experiments/in_step_call_costs.py [--threads 2] [--steps 300]

writes results/in_step_call_costs.json (medians in microseconds).
"""

from __future__ import annotations

import argparse
import json
import operator
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_monitor import BATCH, WIDTHS, make_mlp  # noqa: E402
from record_costs_in_step import alone  # noqa: E402

from torch_conslaw.monitor.hooks import ParameterGuard  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def calls(model: nn.Module) -> dict[str, Callable[[], object]]:
    """The probed calls, on ``model``'s parameters."""
    params = dict(model.named_parameters())
    tensors, names = list(params.values()), list(params)
    guard = ParameterGuard(model, names)
    table = torch.empty(3, 1024, dtype=torch.float64)
    shape = operator.attrgetter("shape")
    return {
        "nothing": lambda: None,
        "guard": guard.check,
        "data_ptrs": lambda: [p.data_ptr() for p in tensors],
        "shapes": lambda: list(map(shape, tensors)),
        "versions": lambda: [p._version for p in tensors],
        "torch_empty": lambda: torch.empty(3, 1024, dtype=torch.float64),
        "tensor_view": lambda: table[1],
        "dict_lookups": lambda: [params[n] for n in names],
    }


def training(name: str) -> tuple[Callable[[], None], list[float], Callable[[], object]]:
    """A training step of the MLP whose post-step hook times the call ``name``."""
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, WIDTHS[0], generator=g), torch.randint(0, WIDTHS[-1], (BATCH,), generator=g)
    fn = calls(model)[name]
    times: list[float] = []

    def hook(*_: object) -> None:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)

    opt.register_step_post_hook(hook)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step, times, fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {name: training(name) for name in calls(make_mlp())}
    for _ in range(30):
        for step, _, _ in runs.values():
            step()
    for _, times, _ in runs.values():
        times.clear()
    for _ in range(args.steps):  # interleaved: one step of each training in turn
        for step, _, _ in runs.values():
            step()
    us = lambda s: round(1e6 * s, 2)  # noqa: E731
    result = {
        "model": "784-512-512-10 ReLU MLP, batch 128, SGD; 6 parameters",
        "threads": args.threads,
        "in_step_us": {name: us(statistics.median(times)) for name, (_, times, _) in runs.items()},
        "alone_us": {name: us(alone(fn, 2000)) for name, (_, _, fn) in runs.items()},
    }
    (ROOT / "results" / "in_step_call_costs.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
