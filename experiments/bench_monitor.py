"""Overhead and memory of the ConservationMonitor, as ratios measured side by side in one run.

Phases (each with its own torch thread count; within a phase every training runs from the
same initialization and the steps are timed in interleaved blocks, so load from other
processes hits all of them alike; the order of the trainings is shuffled in every block (a
fixed order, the plain run always first, biased every ratio by a few percent here); a ratio is
the median over blocks of time(monitored) / time(plain); ``plain-again``, a second plain run,
is the null ratio: what the method reads when nothing differs):

* ``mlp_2threads`` — the 784-512-512-10 ReLU MLP at batch 128 (SGD), 2 torch threads:
  ``default`` (``ConservationMonitor(model)``: budget 3 %, ``evaluation="auto"``, which
  takes the native kernel here: 669 k tracked elements ≥ 2¹⁸), ``default-eager`` (the same
  with the eager fallback), ``auto-budget`` (``recording="auto", overhead_budget=0.03``),
  ``sync-values`` / ``sync-split`` (``every=1``, ``recording="sync"``, default evaluation),
  their ``-compiled`` rows (TorchInductor) and ``-eager`` rows (``evaluation="eager"``: what
  a machine without a compiler gets),
  ``snapshot-split``, ``live-split``, and reference post-step hooks doing only part of the
  work (``floors``: one float32 read of θ, a native copy, ``update_again`` (a θ-sized buffer
  updated in place from the gradient: the memory traffic of SGD's own update, the three
  θ-sized streams an exact split also needs), a float64 conversion, the eager law
  values alone, and the native kernel of the default evaluation alone: ``kernel_values``
  reads θ⁺, ``kernel_split`` reads θ⁺ and the θ its last call left and writes θ⁺ there, the
  exact float64 work of an ``every=1`` record with nothing around it);
* ``mlp_1thread`` — the same model, 1 torch thread (a core left free): ``sync-values``,
  ``sync-split`` and their ``-compiled`` and ``-eager`` rows, ``live-values``, ``live-split``,
  ``default``, ``auto-budget``, and the two kernel floors;
* ``block_2threads`` — a LLaMA-style pre-norm transformer block in plain torch (RMSNorm,
  q/k/v/o projections with causal attention, RMSNorm, SwiGLU MLP, residuals; d=256, 4 heads,
  sequence 64, batch 8; SGD), 2 threads: ``default``, ``auto-budget``, ``sync-values``,
  ``sync-split``, ``sync-split-eager``;
* ``memory`` — the monitor's extra peak memory on a 1024-4096-4096-1024 ReLU MLP (25.2 M
  float32 parameters): in a fresh process per mode, the rise of the peak RSS when the
  monitor is built and attached after 3 plain training steps and 6 more steps run
  (``none``: the noise of the probe; ``split``, ``values`` with the default evaluation, and
  their ``-eager`` modes), as a ratio of the parameters' native bytes: the median of 5 fresh
  processes per mode (every run's ratio is kept), and what each stored record adds.

The ``-async``/``-live`` monitors are flushed after the timing (a ``snapshot`` block ends
with ``flush()`` inside its timing, so its worker does not run into another training's
block). Results go to ``<out>/bench_monitor.json`` (default ``results/``) and, on the CPU,
``figures/bench_monitor.png`` (``--replot FILE`` redraws it from a JSON); the load average at
the start and end is recorded with them (the machine may be shared).

Usage:
    python experiments/bench_monitor.py [--blocks 12] [--steps 20] [--device cpu] [--out results] [--skip-memory] [--replot FILE]
    python experiments/bench_monitor.py --only mlp_2threads --settings update_again,kernel_split,sync-split --blocks 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torch_conslaw import ConservationMonitor
from torch_conslaw.accounting import Accountant
from torch_conslaw.lawgroups import build_groups
from torch_conslaw.native import native_status
from torch_conslaw.structure import find_structure

WIDTHS = (784, 512, 512, 10)
BATCH = 128
LARGE_WIDTHS = (1024, 4096, 4096, 1024)
KERNEL_FLOORS = ("kernel_values", "kernel_split")
PHASES = {"mlp_2threads": 2, "mlp_1thread": 1, "block_2threads": 2}  # phase: torch threads
FLOORS = ("read_f32", "copy_native", "update_again", "convert_f64", "accountant_values", *KERNEL_FLOORS)


def make_mlp(widths: tuple[int, ...] = WIDTHS) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


class Block(nn.Module):
    """A LLaMA-style pre-norm block: x + attn(norm(x)), then x + down(silu(gate) * up)."""

    def __init__(self, d: int = 256, heads: int = 4, hidden: int = 688) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def make_run(model_kind: str, setting: str, device: str) -> tuple[Callable[[], None], ConservationMonitor | None]:
    """A training step closure and its monitor (``None`` for the plain run and the floors)."""
    torch.manual_seed(0)
    model = (make_mlp() if model_kind == "mlp" else Block()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    if model_kind == "mlp":
        x = torch.randn(BATCH, WIDTHS[0], generator=g).to(device)
        y = torch.randint(0, WIDTHS[-1], (BATCH,), generator=g).to(device)
        loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    else:
        x = torch.randn(8, 64, 256, generator=g).to(device)
        y = torch.randn(8, 64, 256, generator=g).to(device)
        loss = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    monitor = None
    kwargs: dict | None = {
        "plain": None,
        "plain-again": None,
        "default": {},
        "auto-budget": {"recording": "auto", "overhead_budget": 0.03},
        "sync-values": {"every": 1, "recording": "sync", "split": False},
        "sync-split": {"every": 1, "recording": "sync"},
        "sync-values-eager": {"every": 1, "recording": "sync", "split": False, "evaluation": "eager"},
        "sync-split-eager": {"every": 1, "recording": "sync", "evaluation": "eager"},
        "sync-values-compiled": {"every": 1, "recording": "sync", "split": False, "evaluation": "compiled"},
        "sync-split-compiled": {"every": 1, "recording": "sync", "evaluation": "compiled"},
        "default-eager": {"evaluation": "eager"},
        "snapshot-split": {"every": 1, "recording": "snapshot"},
        "live-values": {"every": 1, "recording": "live", "split": False},
        "live-split": {"every": 1, "recording": "live"},
    }.get(setting, "floor")  # type: ignore[arg-type]
    if kwargs == "floor":
        opt.register_step_post_hook(reference_hook(setting, model))
    elif kwargs is not None:
        monitor = ConservationMonitor(model, max_records=1000, **kwargs).attach(opt)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return step, monitor


def reference_hook(kind: str, model: nn.Module):
    """An optimizer post-step hook doing only part of the monitor's work (see ``floors``)."""
    groups = build_groups(find_structure(model).pairs)
    acc = Accountant(groups)
    params = dict(model.named_parameters())
    tensors = [params[n] for n in acc.names]
    wide = [torch.empty(t.shape, dtype=torch.float64, device=t.device) for t in tensors]
    same = [torch.zeros_like(t) for t in tensors]
    kernel = read = before = None
    if kind in KERNEL_FLOORS:  # the native kernel the monitor's default evaluation calls, alone
        fused = Accountant(groups, evaluation="native")
        fused.values(params)  # builds it (private attributes: this row times nothing around it)
        kernel, read = fused._fused_laws, [params[n].detach() for n in fused._fast.fast_names]
        before = [t.clone() for t in read]

    def hook(*_args) -> None:
        with torch.no_grad():
            if kind == "read_f32":
                for t in tensors:
                    t.sum()
            elif kind == "copy_native":
                for b, t in zip(same, tensors):
                    b.copy_(t)
            elif kind == "update_again":  # SGD's own memory traffic: read two θ-sized tensors, write one
                for b, t in zip(same, tensors):
                    b.add_(t.grad)
            elif kind == "convert_f64":
                for b, t in zip(wide, tensors):
                    b.copy_(t)
            elif kind == "accountant_values":
                acc.values(params)
            elif kind == "kernel_values":
                kernel.table(None, read)
            elif kind == "kernel_split":  # θ before the step is the buffer the last call left
                kernel.table(before, read, advance=True)
            else:
                raise ValueError(kind)

    return hook


def phase(model_kind: str, settings: list[str], threads: int, device: str, blocks: int, steps: int) -> dict:
    """Interleaved timing of ``settings`` (plus the plain run) at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    runs = {name: make_run(model_kind, name, device) for name in ["plain", "plain-again", *settings]}
    ends = {n: m.flush for n, (_, m) in runs.items() if m is not None and m.recording == "snapshot"}
    for name, (step, _) in runs.items():  # warm-up (the budget measures here too)
        for _ in range(2 * steps):
            step()
        ends.get(name, lambda: None)()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = random.Random(0)
    for _ in range(blocks):
        for name, (step, _) in order.sample(list(runs.items()), len(runs)):
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            ends.get(name, lambda: None)()
            sync()
            times[name].append((time.perf_counter() - t0) / steps)
    out: dict = {"threads": threads, "plain_step_ms": 1e3 * statistics.median(times["plain"]), "overhead": {}, "recorded": {}}
    for name in ["plain-again", *settings]:
        out["overhead"][name] = statistics.median(t / b for t, b in zip(times[name], times["plain"])) - 1
        monitor = runs[name][1]
        if monitor is not None:
            monitor.flush()
            out["recorded"][name] = {
                "recording": monitor.recording,
                "schedule": repr(monitor.schedule),
                "recorded_steps": monitor.summary()[0]["recorded_steps"] if monitor.groups else 0,
                "optimizer_steps": monitor.num_steps,
            }
    return out


def _peak_rss_bytes() -> int:
    """This process image's peak RSS: VmHWM of /proc/self/status where there is one.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` survives ``execve`` on Linux: a probe started by a
    bench process that had grown larger would see the parent's peak and measure 0."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def memory_probe(mode: str, steps: int = 6) -> dict:
    """The monitor's extra peak memory on the 25 M-parameter MLP, in this (fresh) process:
    train 3 plain steps (the peak of training alone: parameters, gradients, activations),
    then build and attach the monitor (``mode``: ``none``, ``split``, ``values``, or either
    with ``-eager``) and train ``steps`` more; the extra is the rise of the peak RSS.
    Before the baseline, a monitor with the same options records two steps of a tiny MLP:
    code, lazy imports and caches (the native library or the compiler's, for the default
    evaluation) do not grow with θ and are not counted; what a new kernel's compilation
    allocates still is. ``record_bytes``: what each stored record adds (its float64 table)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = make_mlp(LARGE_WIDTHS)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, LARGE_WIDTHS[0]), torch.randn(4, LARGE_WIDTHS[-1])

    def train(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    eager = mode.endswith("-eager")
    options = {
        "split": mode.removesuffix("-eager") == "split",
        "every": 1,
        "recording": "sync",
        "evaluation": "eager" if eager else "auto",
    }
    if mode != "none":  # code, lazy imports and caches that do not grow with the model
        small = make_mlp((8, 16, 16, 4))
        warm = torch.optim.SGD(small.parameters(), lr=1e-3)
        fused = "native" if native_status()[0] else "compiled"  # what "auto" picks on the large MLP
        ConservationMonitor(small, **(options if eager else options | {"evaluation": fused})).attach(warm)
        for _ in range(2):
            warm.zero_grad()
            small(torch.randn(2, 8)).sum().backward()
            warm.step()
    train(3)
    base = _peak_rss_bytes()
    monitor = None
    if mode != "none":
        monitor = ConservationMonitor(model, **options).attach(opt)
    train(steps)
    peak = _peak_rss_bytes()
    native = sum(p.numel() * p.element_size() for p in model.parameters())
    recorded = monitor.num_steps if monitor is not None else 0
    laws = sum(g.count for g in monitor.groups) if monitor is not None else 0
    return {
        "params": sum(p.numel() for p in model.parameters()), "param_bytes": native, "extra_bytes": peak - base,
        "recorded": recorded, "evaluation": monitor.evaluation if monitor is not None else None,
        "record_bytes": 8 * laws * (3 if options["split"] else 1),
    }


MEMORY_MODES = ("none", "split", "values", "split-eager", "values-eager")


def memory(repeats: int = 5) -> dict:
    """Each mode in ``repeats`` fresh processes (peak RSS is per process): the median extra
    bytes (the rise moves by ~0.3 MiB from run to run: the Python and glibc heaps), and every
    run's, as ratios to the parameters' native bytes."""
    # a fixed mmap threshold: every large buffer is mapped and returned when freed, so the
    # peak RSS follows the live tensors instead of glibc's adaptive heap (noise ~0.2x here)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for mode in MEMORY_MODES:
            done = subprocess.run([sys.executable, __file__, "--memory-probe", mode], env=env, capture_output=True, text=True, check=True)
            runs.setdefault(mode, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    probes = {m: r[0] for m, r in runs.items()}
    extra = {m: statistics.median(p["extra_bytes"] for p in r) for m, r in runs.items()}
    native = probes["none"]["param_bytes"]
    return {
        "model": "-".join(map(str, LARGE_WIDTHS)) + " ReLU MLP, float32",
        "params": probes["none"]["params"],
        "param_bytes_native": native,
        "repeats": repeats,
        "extra_mib": {m: x / 2**20 for m, x in extra.items()},
        "extra_x_params": {m: x / native for m, x in extra.items()},
        "extra_x_params_runs": {m: [p["extra_bytes"] / native for p in r] for m, r in runs.items()},
        "evaluation": {m: p["evaluation"] for m, p in probes.items()},
        "records_stored": {m: p["recorded"] + 1 for m, p in probes.items()},  # with θ₀'s
        "record_x_params": {m: p["record_bytes"] / native for m, p in probes.items()},
        "targets": {"split": 1.25, "values": 0.01},
    }


TARGET_OF = {  # per phase, the target key of the rows that have one
    "mlp_2threads": {"default": "default", "sync-values": "every1_values", "sync-split": "every1_split"},
    "mlp_1thread": {"sync-values": "every1_values", "sync-split": "every1_split"},
    "block_2threads": {"default": "block_default", "sync-values": "block_every1", "sync-split": "block_every1"},
}


def figure(result: dict, path: Path) -> None:
    """One panel per phase: the overhead of every row (per training step, against the plain
    run), the null row in grey, the rows with a target marked by it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [k for k in ("mlp_2threads", "mlp_1thread", "block_2threads") if k in result]
    fig, axes = plt.subplots(1, len(phases), figsize=(5.2 * len(phases), 5.4), squeeze=False)
    targets = result.get("targets", {})
    for ax, key in zip(axes[0], phases):
        rows = result[key]["overhead"]
        names = list(rows)[::-1]
        values = [100 * rows[n] for n in names]
        colors = []
        for n in names:
            if n == "plain-again":
                colors.append("0.6")
            elif n in FLOORS:
                colors.append("tab:gray")
            elif n.endswith("-eager"):
                colors.append("tab:red")
            elif n.endswith("-compiled"):
                colors.append("tab:orange")
            else:
                colors.append("tab:blue")
        ax.barh(range(len(names)), values, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i, n in enumerate(names):
            goal = targets.get(TARGET_OF[key].get(n, ""))
            if goal is not None:
                ax.plot([100 * goal] * 2, [i - 0.4, i + 0.4], color="k", lw=2)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("extra time per training step (%)")
        ax.set_title(f"{key}: plain step {result[key]['plain_step_ms']:.2f} ms", fontsize=9)
    fig.suptitle(
        "ConservationMonitor overhead (blue: default evaluation, orange: compiled, red: eager, "
        "grey: reference hooks and the null row; black ticks: targets)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12, help="interleaved timing blocks per phase")
    parser.add_argument("--steps", type=int, default=20, help="training steps per block")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--skip-memory", action="store_true", help="leave out the 25 M-parameter memory probes")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", choices=PHASES, help="run this phase alone (with --settings: only those rows), written to bench_monitor_<phase>.json"
    )
    parser.add_argument("--settings", help="comma-separated rows for --only (default: the phase's own rows)")
    parser.add_argument("--replot", type=Path, help="only draw figures/bench_monitor.png from this JSON")
    args = parser.parse_args()
    if args.replot:
        figure(json.loads(args.replot.read_text()), Path(__file__).resolve().parents[1] / "figures" / "bench_monitor.png")
        return
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return
    # the 2-thread phases time snapshot/live recorders on purpose without a free core
    warnings.filterwarnings("ignore", message=".*competes with training")
    load = [os.getloadavg()[0]]
    # the kernel floors where the default evaluation takes the native kernel (a CPU with a C compiler)
    kernels = [k for k in KERNEL_FLOORS if args.device == "cpu" and native_status()[0]]
    mlp_settings = [
        "default", "default-eager", "auto-budget", "sync-values", "sync-split", "sync-values-compiled",
        "sync-split-compiled", "sync-values-eager", "sync-split-eager",
        "snapshot-split", "live-split", *(f for f in FLOORS if f not in KERNEL_FLOORS), *kernels,
    ]
    settings = {
        "mlp_2threads": mlp_settings,
        "mlp_1thread": [
            "sync-values", "sync-split", "sync-values-compiled", "sync-split-compiled", "sync-values-eager",
            "sync-split-eager", "live-values", "live-split", "default", "auto-budget", *kernels,
        ],
        "block_2threads": ["default", "auto-budget", "sync-values", "sync-split", "sync-split-eager"],
    }
    if args.settings and not args.only:
        parser.error("--settings needs --only PHASE")
    chosen = [args.only] if args.only else list(PHASES)
    if args.settings:
        settings[args.only] = args.settings.split(",")
    result = {
        key: phase("block" if key.startswith("block") else "mlp", settings[key], PHASES[key], args.device, args.blocks, args.steps)
        for key in chosen
    }
    if not args.skip_memory and not args.only:
        result["memory"] = memory()
    load.append(os.getloadavg()[0])
    result |= {
        "targets": {"default": 0.05, "every1_values": 0.04, "every1_split": 0.08, "block_default": 0.05, "block_every1": 0.15},
        "load_average_start_end": load,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "blocks": args.blocks,
        "steps_per_block": args.steps,
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_monitor" + (f"_{args.only}" if args.only else "") + ("" if args.device == "cpu" else f"_{args.device.split(':')[0]}")
    name += ".json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    if args.device == "cpu" and not args.only:
        figure(result, Path(__file__).resolve().parents[1] / "figures" / "bench_monitor.png")
    for key in chosen:
        r = result[key]
        print(f"{key}: plain step {r['plain_step_ms']:.2f} ms")
        for setting, x in r["overhead"].items():
            rec = r["recorded"].get(setting)
            extra = f"  ({rec['recording']}, {rec['recorded_steps']}/{rec['optimizer_steps']} steps recorded)" if rec else ""
            print(f"  {setting:<18} {100 * x:+6.1f} %{extra}")
    if "memory" in result:
        m = result["memory"]
        ratios = ", ".join(f"{k} {v:.3f}x" for k, v in m["extra_x_params"].items())
        print(f"memory, {m['params'] / 1e6:.1f} M params, extra peak / native parameter bytes: {ratios} (targets: split ≤ 1.25x, values ≤ 0.01x)")
    print(f"load average: {load[0]:.1f} → {load[1]:.1f} on {result['cores']} cores")


if __name__ == "__main__":
    main()
