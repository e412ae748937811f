"""Laws tracked by the monitor vs the exact laws that exist, on tiny Hugging Face models and
CIFAR CNNs (the models of tests/graph_models.py), with the seconds to build the monitor.

Every "exist" column is an independent by-hand count from each config (tests/graph_models.py:
the factories' counts for the rescaling, gated, norm-affine and attention families,
``linear_laws`` for the zero-gradient laws: key biases, LayerNorm centering, padding rows,
biases before a BatchNorm; ``approximate_laws`` for scale invariance before a normalization),
never read from the monitor. The Hugging Face models are built in eval mode (as
``from_pretrained`` returns them: dropout off, which LayerNorm centering across a residual
addition needs), the CNNs in train mode (a bias before a BatchNorm has zero gradient only with
batch statistics). Every tracked exact law is checked with
⟨∇h, ∂_θ⟨u, f⟩⟩ / (‖∇h‖‖∂_θ⟨u, f⟩‖) (float64, torch.func, 3 random cotangents, eval mode: the
quadratic laws, and the linear laws of the models built in eval mode) and with one SGD step
(quadratic: first-order part 2B(θ, Δ) / scale(θ); linear: |cᵀΔ| / (‖c‖‖Δ‖)). Writes
results/graph_laws.md.

Run: PYTHONPATH=$PWD python experiments/graph_laws_table.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from graph_helpers import law_residuals, sgd_first_order  # noqa: E402
from graph_models import (  # noqa: E402
    approximate_laws, bert, build, distilbert, gpt2, linear_laws, llama, resnet18, t5, vgg11_bn, vit,
)

from torch_conslaw import ConservationMonitor  # noqa: E402
from torch_conslaw.laws.groups import DifferenceLaws  # noqa: E402

MODELS = [("GPT-2", gpt2), ("LLaMA (RoPE, GQA 4/2, SwiGLU, RMSNorm)", llama), ("BERT", bert),
          ("DistilBERT", distilbert), ("ViT", vit), ("T5 encoder", t5), ("ResNet-18 (CIFAR, width 8)", resnet18),
          ("VGG-11-BN (CIFAR, width ÷8)", vgg11_bn)]


def linear_sgd_change(model, example, groups, pick, lr: float = 1e-2, seed: int = 1) -> float:
    """max |cᵀΔ| / (‖c‖ ‖Δ‖) over the laws of linear ``groups`` for one SGD step on a random loss."""
    if not groups:
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    params = {n: p.detach() for n, p in model.named_parameters()}
    call = (lambda p: pick(torch.func.functional_call(model, p, (), example))) if isinstance(example, dict) else (
        lambda p: pick(torch.func.functional_call(model, p, (example,))))
    target = torch.randn(call(params).shape, generator=gen, dtype=torch.float64)
    delta = {n: -lr * g for n, g in torch.func.grad(lambda p: (call(p) - target).square().sum())(params).items()}
    step = torch.sqrt(sum(d.square().sum() for d in delta.values()))
    worst = 0.0
    for g in groups:
        parts = [fn(torch.ones_like(params[n])).reshape(-1) for n, fn in g.readers]
        norms = (sum(parts) if isinstance(g, DifferenceLaws) else torch.cat(parts)).sqrt()  # a − b: both sides
        worst = max(worst, float((g.values(delta).abs() / (norms * step)).max()))
    return worst


def main() -> None:
    torch.set_num_threads(1)
    rows = ["| model | mode | quadratic tracked | quadratic exist (by hand) | linear tracked | linear exist (by hand) "
            "| approximate tracked | approximate exist (by hand) | build s (with the check) "
            "| monitor's check, worst exact law | max rel ⟨∇h, ∂fᵀu⟩ (exact, eval) | max SGD first order (exact) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, factory in MODELS:
        model, example, pick, expected = build(factory, "eager")
        train = not hasattr(model, "config")
        model.train(train)
        start = time.perf_counter()
        monitor = ConservationMonitor(model, example, every=1)
        seconds = time.perf_counter() - start
        exact = [g for g in monitor.groups if g.kind != "approximate"]
        quadratic_groups = [g for g in exact if g.kind != "linear"]
        linear_groups = [g for g in exact if g.kind == "linear"]
        quadratic = sum(g.count for g in quadratic_groups)
        linear = sum(g.count for g in linear_groups)
        approximate = sum(g.count for g in monitor.groups if g.kind == "approximate")
        checked = max(r["verification_residual"] for r in monitor.summary() if r["name"] in {g.name for g in exact})
        # the independent helpers run the model in eval mode: the quadratic laws hold in both
        # modes, the linear ones are checked there only when the monitor was built in eval mode
        independent = quadratic_groups + ([] if train else linear_groups)
        resid = law_residuals(model, example, independent, pick)
        first = max(sgd_first_order(model, example, quadratic_groups, pick),
                    0.0 if train else linear_sgd_change(model, example, linear_groups, pick))
        rows.append(
            f"| {name} | {'train' if train else 'eval'} | {quadratic} | {expected} | {linear} "
            f"| {linear_laws(model, 'eager', train)} | {approximate} | {approximate_laws(model)} | {seconds:.2f} "
            f"| {checked:.1e} | {resid:.1e} | {first:.1e} |"
        )
        print(rows[-1], flush=True)
    out = ROOT / "results" / "graph_laws.md"
    out.write_text("\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
