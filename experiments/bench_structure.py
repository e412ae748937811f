"""Monitor construction on ~100M-parameter models: seconds and peak memory per phase.

Two models, float32 parameters:

* ``gpt2``: a GPT-2-small-sized ``transformers`` model (12 layers, n_embd 768, vocab 50257:
  124.4M parameters, built from a ``GPT2Config`` offline), on one sequence of ``--tokens``;
* ``llama``: the demo's plain-torch LLaMA-style block (:func:`torch_conslaw.demo.make_llama_block`:
  RMSNorm, RoPE, grouped-query attention, SwiGLU) scaled to d = 3072, 24 heads / 8 K/V heads,
  hidden 8192 (100.9M parameters), on one sequence of ``--tokens`` vectors.

Each phase runs on its own, after the previous one, so that its time and memory are its own:

* ``capture``: the op graph on the example input (:func:`torch_conslaw.structure.graph.capture`);
* ``rules``: the op-graph rules (:func:`~torch_conslaw.structure.rules.find_graph_laws`, minus capture);
* ``finder``: the module-level finder (:func:`~torch_conslaw.find_structure`, minus the two above);
* ``families``: the laws beyond layer pairs (:func:`~torch_conslaw.laws.families.proposals.propose_laws`);
* ``verify``: the float64 check of every claimed law (:func:`~torch_conslaw.laws.verify.verify_groups`);
* ``monitor``: the whole :class:`~torch_conslaw.ConservationMonitor` construction (all the above
  plus the accountant's plan and initial values); ``monitor init`` is its part not in the phases above.

Memory: ``rss`` is the growth of the process's peak resident set during the phase (the peak is
reset before each phase through ``/proc/self/clear_refs``; torch's CPU tensors are in it),
``py`` the peak of Python-heap allocations during a second run of the phase under
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


def measure(fn: Callable[[], Any], python_heap: bool) -> tuple[Any, dict[str, float]]:
    """Run ``fn`` once for seconds and peak RSS growth, once more under tracemalloc."""
    gc.collect()
    resettable = _reset_peak()
    start_rss = _rss_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    row = {"seconds": seconds, "rss_peak_mib": (peak - start_rss) / 1024 if resettable else float("nan")}
    if python_heap:
        del result
        gc.collect()
        tracemalloc.start()
        result = fn()
        row["py_peak_mib"] = tracemalloc.get_traced_memory()[1] / MIB
        tracemalloc.stop()
    return result, row


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
    from torch_conslaw import ConservationMonitor, find_structure
    from torch_conslaw.lawgroups import build_groups
    from torch_conslaw.laws.families.proposals import propose_laws
    from torch_conslaw.laws.verify import verify_groups
    from torch_conslaw.structure.graph import capture
    from torch_conslaw.structure.rules import find_graph_laws

    torch.manual_seed(0)
    model, example, label = MODELS[name](tokens)
    params = sum(p.numel() for p in model.parameters())
    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    with torch.no_grad():  # warm up (lazy imports, first-call allocations): the numbers are the monitor's own
        model(**example) if isinstance(example, dict) else model(example)
    phases: dict[str, dict[str, float]] = {}
    _, phases["capture"] = measure(lambda: capture(model, example), python_heap)
    _, rules = measure(lambda: find_graph_laws(model, example), python_heap)
    structure, finder = measure(lambda: find_structure(model, example), python_heap)
    groups = build_groups(list(structure.pairs))
    families, phases["families"] = measure(lambda: propose_laws(model, structure)[0], python_heap)
    claimed = [g for g in groups + families if g.expected_conserved or getattr(g, "approximate", False)]
    checks, phases["verify"] = measure(lambda: verify_groups(model, example, claimed), python_heap)
    monitor, whole = measure(lambda: ConservationMonitor(model, example), python_heap)
    phases["rules"] = dict(rules, seconds=rules["seconds"] - phases["capture"]["seconds"])
    phases["finder"] = dict(finder, seconds=finder["seconds"] - rules["seconds"])
    parts = sum(phases[p]["seconds"] for p in ("capture", "rules", "finder", "families", "verify"))
    phases["monitor init"] = {"seconds": whole["seconds"] - parts}
    phases["monitor (whole)"] = whole
    order = ["capture", "rules", "finder", "families", "verify", "monitor init", "monitor (whole)"]
    return {
        "model": label,
        "parameters": params,
        "parameters_mib_float32": param_mib,
        "tokens": tokens,
        "groups": len(monitor.groups),
        "laws": sum(g.count for g in monitor.groups),
        "claimed_groups_checked": len(checks),
        "worst_residual_exact": max((c.residual for c in checks if c.threshold < 1e-6), default=0.0),
        "phases": {p: phases[p] for p in order},
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
        row = bench(name, args.tokens, not args.no_tracemalloc)
        rows.append(row)
        print(f"\n{row['model']}: {row['parameters'] / 1e6:.1f}M parameters ({row['parameters_mib_float32']:.0f} MiB), "
              f"{row['tokens']} tokens; {row['groups']} groups, {row['laws']} laws, worst exact residual "
              f"{row['worst_residual_exact']:.1e}")
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
