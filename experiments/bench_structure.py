"""Monitor construction on ~100M-parameter models: seconds and peak memory per phase.

Two models, float32 parameters:

* ``gpt2``: a GPT-2-small-sized ``transformers`` model (12 layers, n_embd 768, vocab 50257:
  124.4M parameters, built from a ``GPT2Config`` offline), on one sequence of ``--tokens``;
* ``llama``: the demo's plain-torch LLaMA-style block (:func:`torch_conslaw.demo.make_llama_block`:
  RMSNorm, RoPE, grouped-query attention, SwiGLU) scaled to d = 3072, 24 heads / 8 K/V heads,
  hidden 8192 (100.9M parameters), on one sequence of ``--tokens`` vectors.

One construction of :class:`~torch_conslaw.ConservationMonitor` is timed with every phase
wrapped (exclusive times: a phase's own time, without the phases it calls), so the phases add
up to the whole:

* ``capture``: the op graph on the example input (``structure.graph.capture``);
* ``rules``: the op-graph rules (``structure.rules.find_graph_laws``, capture excluded);
* ``finder``: the module-level finder (``find_structure``, the two above excluded);
* ``families``: the laws beyond layer pairs (``laws.families.proposals.propose_laws``);
* ``verify``: the float64 check of every claimed law (``laws.verify.verify_groups``);
* ``accountant``: the accountant's plan and initial law values (``Accountant.initial``);
* ``monitor (rest)``: everything else in the constructor (groups, the first θ snapshot, ...).

Memory per phase: ``rss`` is the growth of the process's peak resident set over the resident
set at the phase's start (the kernel's peak is reset at every phase boundary through
``/proc/self/clear_refs``; torch's CPU tensors are in it; a phase's peak includes the phases
it calls); ``py`` is the same for Python-heap allocations, from a second construction under
``tracemalloc`` (tensor storage is not Python heap and is not in it).

Run: PYTHONPATH=$PWD python experiments/bench_structure.py [--models gpt2 llama] [--tokens 16]
Writes results/bench_structure.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIB = 1024 * 1024


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Exclusive seconds and peak-memory growth of nested, named phases (see the module docstring)."""

    def __init__(self, traced: bool) -> None:
        self.traced = traced
        self.rows: dict[str, dict[str, float]] = {}
        self.stack: list[list] = []  # [name, start time, child seconds, start memory, running peak]

    def _memory(self) -> tuple[float, float]:
        """(current, peak since the last reset), MiB."""
        if self.traced:
            now, peak = tracemalloc.get_traced_memory()
            return now / MIB, peak / MIB
        return _rss_kib("VmRSS") / 1024, _rss_kib("VmHWM") / 1024

    def _reset(self) -> None:
        if self.traced:
            tracemalloc.reset_peak()
        else:
            _reset_peak()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            _, peak = self._memory()
            if self.stack:
                self.stack[-1][4] = max(self.stack[-1][4], peak)
            self._reset()
            now, _ = self._memory()
            self.stack.append([name, time.perf_counter(), 0.0, now, now])
            try:
                return fn(*args, **kwargs)
            finally:
                _, peak = self._memory()
                _, start, children, mem0, running = self.stack.pop()
                total = time.perf_counter() - start
                row = self.rows.setdefault(name, {"seconds": 0.0, "peak_mib": 0.0})
                row["seconds"] += total - children
                row["peak_mib"] = max(row["peak_mib"], max(peak, running) - mem0)
                if self.stack:
                    self.stack[-1][2] += total
                    self.stack[-1][4] = max(self.stack[-1][4], peak, running)
                self._reset()

        return timed


def run_phases(model: torch.nn.Module, example: Any, traced: bool) -> tuple[Any, dict[str, dict[str, float]]]:
    """One monitor construction with every phase wrapped; returns the monitor and the phases."""
    import torch_conslaw.accounting as accounting
    import torch_conslaw.laws.families.proposals as proposals
    import torch_conslaw.laws.verify as verify
    import torch_conslaw.monitor.monitor as monitor_module
    import torch_conslaw.structure.rules as rules

    phases = Phases(traced)
    targets = [
        (rules, "capture", "capture"), (rules, "find_graph_laws", "rules"), (monitor_module, "find_structure", "finder"),
        (proposals, "propose_laws", "families"), (verify, "verify_groups", "verify"),
        (accounting.Accountant, "initial", "accountant"),
    ]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in targets]
    gc.collect()
    try:
        for obj, attr, name in targets:
            setattr(obj, attr, phases.wrap(name, getattr(obj, attr)))
        if traced:
            tracemalloc.start()
        monitor = phases.wrap("monitor (rest)", lambda: monitor_module.ConservationMonitor(model, example))()
    finally:
        if traced:
            tracemalloc.stop()
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
    return monitor, phases.rows


def gpt2(tokens: int) -> tuple[torch.nn.Module, Any, str]:
    import transformers

    cfg = transformers.GPT2Config(n_layer=12)  # n_embd 768, 12 heads, vocab 50257
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}, "GPT-2 small config (transformers), 12 layers"


def llama(tokens: int) -> tuple[torch.nn.Module, Any, str]:
    from torch_conslaw.demo import make_llama_block

    model = make_llama_block(d_in=64, d=3072, heads=24, kv_heads=8, hidden=8192, d_out=64, dtype=torch.float32)
    x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(0))
    return model, x, "LLaMA-style block in plain torch (demo.make_llama_block, d 3072, hidden 8192)"


MODELS = {"gpt2": gpt2, "llama": llama}


def bench(name: str, tokens: int, python_heap: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model, example, label = MODELS[name](tokens)
    params = sum(p.numel() for p in model.parameters())
    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    with torch.no_grad():  # warm up (lazy imports, first-call allocations): the numbers are the monitor's own
        model(**example) if isinstance(example, dict) else model(example)
    rss_before = _rss_kib("VmRSS") / 1024
    start = time.perf_counter()
    monitor, rows = run_phases(model, example, traced=False)
    whole = time.perf_counter() - start
    groups, laws = len(monitor.groups), sum(g.count for g in monitor.groups)
    worst = max((v.residual for v in monitor.verification.values() if v.threshold < 1e-6), default=0.0)
    del monitor
    if python_heap:
        _, traced = run_phases(model, example, traced=True)
        for phase, row in traced.items():
            rows[phase]["py_peak_mib"] = row["peak_mib"]
    order = ["capture", "rules", "finder", "families", "verify", "accountant", "monitor (rest)"]
    phases = {p: {"seconds": rows[p]["seconds"], "rss_peak_mib": rows[p]["peak_mib"],
                  **({"py_peak_mib": rows[p]["py_peak_mib"]} if "py_peak_mib" in rows[p] else {})}
              for p in order if p in rows}
    return {
        "model": label,
        "parameters": params,
        "parameters_mib_float32": param_mib,
        "tokens": tokens,
        "groups": groups,
        "laws": laws,
        "worst_residual_exact": worst,
        "seconds_whole": whole,
        "rss_before_mib": rss_before,
        "rss_peak_growth_whole_mib": phases["monitor (rest)"]["rss_peak_mib"],
        "phases": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the second, traced run of each phase")
    parser.add_argument("--out", default="results/bench_structure.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        if len(args.models) > 1:  # each model in a fresh process: memory freed by one is not reused by the next
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "row.json"
                command = [sys.executable, __file__, "--models", name, "--tokens", str(args.tokens),
                           "--threads", str(args.threads), "--out", str(out)]
                subprocess.run(command + (["--no-tracemalloc"] if args.no_tracemalloc else []),
                               check=True, stdout=subprocess.DEVNULL)
                row = json.loads(out.read_text())["models"][0]
        else:
            row = bench(name, args.tokens, not args.no_tracemalloc)
        rows.append(row)
        print(f"\n{row['model']}: {row['parameters'] / 1e6:.1f}M parameters ({row['parameters_mib_float32']:.0f} MiB), "
              f"{row['tokens']} tokens; {row['groups']} groups, {row['laws']} laws, worst exact residual "
              f"{row['worst_residual_exact']:.1e}")
        print(f"  whole construction {row['seconds_whole']:.2f} s, peak RSS +{row['rss_peak_growth_whole_mib']:.0f} MiB")
        print(f"  {'phase':<16} {'seconds':>8} {'peak RSS +MiB':>14} {'Python heap MiB':>16}")
        for phase, m in row["phases"].items():
            rss = f"{m['rss_peak_mib']:.0f}" if "rss_peak_mib" in m else "-"
            py = f"{m['py_peak_mib']:.1f}" if "py_peak_mib" in m else "-"
            print(f"  {phase:<16} {m['seconds']:>8.2f} {rss:>14} {py:>16}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    meta = {"threads": args.threads, "cpus": os.cpu_count(), "load_average_1min_at_end": load,
            "torch": torch.__version__, "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "models": rows}, indent=1) + "\n")
    print(f"\nload average {load:.1f} on {os.cpu_count()} CPUs, {args.threads} torch thread(s); wrote {args.out}")


if __name__ == "__main__":
    main()
