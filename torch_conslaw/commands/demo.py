"""``conslaw demo``: train the demo models with a monitor, print a table per law group, and
write the figures (laws over training, relative drift, first/second-order split, drift
against step size).

Example:
    $ conslaw demo --out /tmp/conslaw-demo
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import plotting
from ..demo import (
    image_data,
    make_cnn,
    make_llama_block,
    make_mlp,
    make_transformer,
    regression_data,
    sequence_data,
    train,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``conslaw demo``."""
    parser.add_argument("--out", type=Path, default=Path("conslaw-demo"), help="folder for the figures (default: ./conslaw-demo)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per model (default: 300)")
    parser.add_argument("--no-figures", action="store_true", help="print the tables only")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread; the caller's setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(args: argparse.Namespace) -> int:
    """Train, print and plot; returns 0."""
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    start = time.perf_counter()
    figures: list[Path] = []
    with _one_thread():
        mlp = make_mlp()
        x, y = regression_data(mlp)
        runs = {
            "ReLU MLP, SGD (lr 0.05)": train(mlp, x, y, lr=0.05, steps=args.steps),
            "ReLU MLP, Adam (lr 1e-3)": train(make_mlp(), x, y, lr=1e-3, steps=args.steps, optimizer="adam"),
        }
        cnn = make_cnn()
        xi, yi = image_data(cnn)
        runs["small CNN, SGD (lr 0.05)"] = train(cnn, xi, yi, lr=0.05, steps=args.steps)
        encoder = make_transformer()
        xs, ys = sequence_data(encoder)
        # torch.fx cannot trace nn.TransformerEncoderLayer: the example input lets the
        # structure finder follow it with forward hooks
        runs["transformer encoder layer (2 heads), SGD (lr 0.02)"] = train(
            encoder, xs, ys, lr=0.02, steps=args.steps, example_input=xs[:2]
        )
        # LLaMA-style block (RoPE, grouped-query attention, SwiGLU, RMSNorm): its laws are
        # found from the op graph on the example input
        llama = make_llama_block()
        xl, yl = sequence_data(llama)
        runs["LLaMA-style block (RoPE, GQA 4/2, SwiGLU, RMSNorm), SGD (lr 0.02)"] = train(
            llama, xl, yl, lr=0.02, steps=args.steps, example_input=xl[:2]
        )
        for title, monitor in runs.items():
            print(f"\n== {title}: {monitor.num_steps} steps ==")
            print(monitor.table())
        etas, total_time = (0.004, 0.02, 0.1), 4.0
        drift = []
        for eta in etas:
            m = train(make_mlp(), x, y, lr=eta, steps=round(total_time / eta), split=False)
            drift.append(max(s["max_rel_drift"] for s in m.summary()))
        slope = plotting.fit_loglog_slope(etas, drift)
        print(f"\nmax relative drift at fixed training time T = {total_time:g}: "
              + ", ".join(f"η={e:g}: {d:.2e}" for e, d in zip(etas, drift))
              + f"  (log-log slope {slope:.2f}; a conservation law gives ≈ 1)")
    if not args.no_figures:
        sgd, adam, cnn_run, encoder_run, llama_run = runs.values()
        out = args.out
        figures.append(plotting.save(plotting.plot_laws(sgd.history()), out / "demo_mlp_laws.png"))
        figures.append(plotting.save(plotting.plot_relative_drift(sgd.history()), out / "demo_mlp_sgd_drift.png"))
        figures.append(plotting.save(plotting.plot_split(sgd.history()), out / "demo_mlp_sgd_split.png"))
        figures.append(plotting.save(plotting.plot_split(adam.history()), out / "demo_mlp_adam_split.png"))
        figures.append(plotting.save(plotting.plot_relative_drift(cnn_run.history()), out / "demo_cnn_sgd_drift.png"))
        figures.append(
            plotting.save(plotting.plot_relative_drift(encoder_run.history()), out / "demo_transformer_sgd_drift.png")
        )
        figures.append(plotting.save(plotting.plot_relative_drift(llama_run.history()), out / "demo_llama_sgd_drift.png"))
        figures.append(plotting.save(plotting.plot_split(llama_run.history()), out / "demo_llama_sgd_split.png"))
        fig, _ = plotting.plot_drift_vs_step_size(etas, {"ReLU MLP laws": drift}, title=f"T = η · steps = {total_time:g}")
        figures.append(plotting.save(fig, out / "demo_drift_vs_lr.png"))
        print("\nfigures:")
        for path in figures:
            print(f"  {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
