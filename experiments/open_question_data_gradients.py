"""Open question (SCIENCE.md §7, §9): does the data-driven count reach the path-lifting count
once the inputs are rich enough — for deep ReLU MLPs, for CNNs, for residual blocks? And do
residual blocks conserve what the block without its skip conserves (ICML 2025)?

For inputs x_1..x_N, every loss gradient lies in W(θ) = span{∂_θ⟨u, f(θ, x_i)⟩};
D − dim Lie(W)(θ) is the number of laws on those inputs (:func:`torch_conslaw.count_laws`,
brackets through ``torch.func`` on the real ``nn.Module``, with the actual 0/1 ReLU patterns).
It is compared, at the same well-conditioned θ and for growing N (the first N of one batch),
with:

* MLPs: the path-lifting count (random real gates, :class:`~torch_conslaw.lie.generators.MLPGenerators`);
* CNNs and residual blocks: the rank of the catalogue's laws at θ (one rescaling law per
  hidden unit or channel, matrix laws of linear hidden layers: :func:`torch_conslaw.analyze`'s
  tracked rank); residual networks also against the same network without its skips.

    python experiments/open_question_data_gradients.py            # all parts, ~10-20 min on 2 busy cores
    python experiments/open_question_data_gradients.py --part cnn  # one part: mlp, mlp_seeds, cnn, residual

writes results/open_question_data_gradients.{json,md} and figures/open_question_data_gradients.png.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torch_conslaw as tc
from torch_conslaw.lie import lie_trace
from torch_conslaw.lie.generators import DTYPE, MLPGenerators

ROOT = Path(__file__).resolve().parents[1]


class Residual(nn.Module):
    """``blocks`` residual ReLU blocks x ↦ x + W2 relu(W1 x + b1) + b2 (``skip=False``: the
    same blocks without their skips), then a linear read-out to ``out`` outputs (none: 0)."""

    def __init__(self, d: int, h: int, blocks: int, out: int = 0, skip: bool = True):
        super().__init__()
        self.inner = nn.ModuleList(nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)) for _ in range(blocks))
        self.head = nn.Linear(d, out) if out else nn.Identity()
        self.skip = skip

    def forward(self, x):
        for block in self.inner:
            x = x + block(x) if self.skip else block(x)
        return self.head(x)


class ConvResidual(nn.Module):
    """Conv stem, one residual conv block (conv-relu-conv plus skip), ReLU, conv read-out."""

    def __init__(self, c: int = 2, h: int = 3, skip: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(c, h, 3, padding=1), nn.Conv2d(h, c, 3, padding=1)
        self.out = nn.Conv2d(c, 1, 3)
        self.skip = skip

    def forward(self, x):
        x = self.stem(x)
        y = self.conv2(F.relu(self.conv1(x)))
        return self.out(F.relu(x + y if self.skip else y))


def _mlp(widths: list[int], bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        layers.append(nn.Linear(widths[k], widths[k + 1], bias=bias))
        if k < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _count(model: nn.Module, x: torch.Tensor, theta, sizes: list[int], seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        res = tc.count_laws(model, x[: sizes[-1]], theta=theta, seed=seed, input_sizes=sizes, eps_zero=False)
    return res, time.perf_counter() - start


def _rows(part: str, name: str, res, reference: int, reference_kind: str, seconds: float, extra: dict) -> list[dict]:
    gaps = [d for ds in res.decisions for d in ds if not d.clear]
    return [
        {
            "part": part,
            "model": name,
            "D": res.D,
            "N": c["n_inputs"],
            "data_laws": c["n_laws"],
            "data_levels": c["levels"],
            "reference_laws": reference,
            "reference": reference_kind,
            "equal": c["n_laws"] == reference,
            "dead_or_always_active_units": (
                f"{sum(u.dead for u in res.constant_units)} / {sum(u.always_active for u in res.constant_units)}"
                if c is res.input_counts[-1] else None
            ),
            "unclear_decisions_at_largest_N": len(gaps),
            "seconds_all_N": round(seconds, 1),
            **extra,
        }
        for c in res.input_counts
    ]


def mlp_part(seed: int = 0) -> list[dict]:
    short, long = [1, 4, 16, 64, 256, 1024], [1, 4, 16, 64, 256, 1024, 4096, 16384]
    cases = [([3, 4, 2], False, short), ([4, 5, 5, 3], False, short), ([4, 5, 5, 3], True, short), ([3, 4, 4, 4, 2], True, long)]
    rows = []
    for widths, bias, sizes in cases:
        family = MLPGenerators(widths, "relu", bias)
        theta = family.random_point(torch.Generator().manual_seed(seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = lie_trace(family, theta, method="dense", seed=seed)
        x = torch.randn(sizes[-1], widths[0], generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
        res, seconds = _count(_mlp(widths, bias), x, theta, sizes, seed)
        name = "-".join(map(str, widths)) + (" bias" if bias else "")
        rows += _rows("mlp", name, res, path.n_laws, "path lifting", seconds, {"path_levels": path.levels})
        print(f"[mlp] {name}: data {[c['n_laws'] for c in res.input_counts]} vs path lifting {path.n_laws} ({seconds:.0f} s)", flush=True)
    return rows


def mlp_seeds_part(seed: int = 0, datasets: int = 8) -> list[dict]:
    """4-5-5-3 without biases, one θ, several Gaussian datasets: how often N points suffice."""
    widths = [4, 5, 5, 3]
    family = MLPGenerators(widths, "relu", False)
    theta = family.random_point(torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = lie_trace(family, theta, method="dense", seed=seed)
    rows = []
    for k in range(1, datasets + 1):
        x = torch.randn(4096, 4, generator=torch.Generator().manual_seed(100 + k), dtype=DTYPE)
        res, seconds = _count(_mlp(widths, False), x, theta, [256, 1024, 4096], seed)
        rows += _rows("mlp_seeds", f"4-5-5-3, dataset {k}", res, path.n_laws, "path lifting", seconds, {})
        print(f"[mlp seeds] dataset {k}: data {[c['n_laws'] for c in res.input_counts]} vs path lifting {path.n_laws}", flush=True)
    return rows


def _catalogue_rank(model: nn.Module, example: torch.Tensor, theta: torch.Tensor) -> int:
    """Rank of the catalogue's laws at θ (the rescaling laws of every hidden unit/channel)."""
    probe = _loaded(model, theta)
    return tc.analyze(probe, example, lie=False).tracked_rank


def _loaded(model: nn.Module, theta: torch.Tensor) -> nn.Module:
    import copy

    probe = copy.deepcopy(model).to(DTYPE)
    offset = 0
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(theta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return probe


def _random_theta(model: nn.Module, seed: int) -> torch.Tensor:
    from torch_conslaw.lie.modules import ParameterSlot, random_theta

    slots, offset = [], 0
    for name, p in model.named_parameters():
        slots.append(ParameterSlot(name, tuple(p.shape), offset, p.numel()))
        offset += p.numel()
    return random_theta(model, slots, torch.Generator().manual_seed(seed))


def cnn_part(seed: int = 0) -> list[dict]:
    cases = {  # name: (model, input sizes N); few outputs per input need more inputs before W_1 fills
        "conv 1-3-1 (3x3), ReLU": (nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 1, 3)), [1, 2, 4, 8, 16, 32, 64, 128]),
        "conv 2-3-3-2 (3x3), ReLU": (
            nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3)),
            [1, 2, 4, 8, 16, 32, 64, 128],
        ),
        "conv 1-4 (3x3), ReLU, maxpool, linear 2": (
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)),
            [32, 64, 128, 256],
        ),
    }
    rows = []
    for name, (model, sizes) in cases.items():
        torch.manual_seed(seed)
        cin = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        x = torch.randn(sizes[-1], cin, 8, 8, generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
        theta = _random_theta(model, seed)
        reference = _catalogue_rank(model, x[:2], theta)
        res, seconds = _count(model, x, theta, sizes, seed)
        rows += _rows("cnn", name, res, reference, "one law per hidden channel (catalogue rank)", seconds, {})
        print(f"[cnn] {name}: data {[c['n_laws'] for c in res.input_counts]} vs channels {reference} ({seconds:.0f} s)", flush=True)
    return rows


def residual_part(seed: int = 0) -> list[dict]:
    cases = [
        ("one block x + F(x), d=3 h=4", lambda skip: Residual(3, 4, 1, 0, skip), (3,), [4, 16, 64, 256]),
        ("two blocks, d=3 h=4", lambda skip: Residual(3, 4, 2, 0, skip), (3,), [4, 16, 64, 256]),
        ("two blocks + linear head, d=3 h=4", lambda skip: Residual(3, 4, 2, 2, skip), (3,), [4, 16, 64, 256]),
        ("conv stem + conv block c=2 h=3 + conv head", lambda skip: ConvResidual(2, 3, skip), (1, 6, 6), [2, 4, 8, 16, 32, 64, 128]),
    ]
    rows = []
    for name, make, shape, sizes in cases:
        torch.manual_seed(seed)
        with_skip, without = make(True), make(False)
        without.load_state_dict(with_skip.state_dict())
        theta = _random_theta(with_skip, seed)
        x = torch.randn(sizes[-1], *shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
        counts = {}
        for label, model in (("with skip", with_skip), ("no skip", without)):
            reference = _catalogue_rank(model, x[:2], theta)
            res, seconds = _count(model, x, theta, sizes, seed)
            rows += _rows("residual", f"{name} ({label})", res, reference, "catalogue rank", seconds, {})
            counts[label] = ([c["n_laws"] for c in res.input_counts], reference)
        print(f"[residual] {name}: data/catalogue with skip {counts['with skip']}, without {counts['no skip']}", flush=True)
    return rows


def write(rows: list[dict]) -> None:
    out = ROOT / "results" / "open_question_data_gradients.md"
    lines = [
        "# Data-driven count vs path lifting / catalogue (SCIENCE.md §7, §9)",
        "",
        "Counts by `torch_conslaw.count_laws` on the first N of one Gaussian batch, at one",
        "well-conditioned θ per model (float64). Reference: the path-lifting count (MLPs) or the",
        "rank of the catalogue's rescaling laws (CNNs, residual blocks: laws of the branch).",
        "Command: `python experiments/open_question_data_gradients.py`.",
        "",
        "| part | model | D | N | levels (data) | laws (data) | reference laws | reference | equal | ReLU units dead / always active (largest N) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['part']} | {r['model']} | {r['D']} | {r['N']} | {r['data_levels']} | {r['data_laws']} | "
        f"{r['reference_laws']} | {r['reference']} | {'yes' if r['equal'] else 'no'} | "
        f"{'' if r['dead_or_always_active_units'] is None else r['dead_or_always_active_units']} |"
        for r in rows
    ]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    _figure(rows, ROOT / "figures" / "open_question_data_gradients.png")


def _figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("mlp", "cnn", "residual") if any(r["part"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.6 * len(parts), 4.6), squeeze=False)
    for ax, part in zip(axes[0], parts):
        models = list(dict.fromkeys(r["model"] for r in rows if r["part"] == part))
        for k, name in enumerate(models):
            mine = [r for r in rows if r["model"] == name]
            color = f"C{k}"
            ax.plot([r["N"] for r in mine], [r["data_laws"] for r in mine], "o-", color=color, label=name)
            ax.axhline(mine[0]["reference_laws"], color=color, ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("number of inputs N")
        ax.set_ylabel("laws on these inputs")
        ax.set_title({"mlp": "ReLU MLPs (dotted: path lifting)", "cnn": "ReLU CNNs (dotted: one per channel)",
                      "residual": "residual nets (dotted: catalogue rank)"}[part], fontsize=10)
        ax.legend(fontsize=6, loc="upper right", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "mlp", "mlp_seeds", "cnn", "residual"), default="all")
    parser.add_argument("--redraw", action="store_true", help="rewrite the table and figure from the saved JSON")
    args = parser.parse_args()
    if args.redraw:
        write(json.loads((ROOT / "results" / "open_question_data_gradients.json").read_text()))
        return
    torch.set_num_threads(1)
    rows: list[dict] = []
    for part, run in (("mlp", mlp_part), ("mlp_seeds", mlp_seeds_part), ("cnn", cnn_part), ("residual", residual_part)):
        if args.part in ("all", part):
            rows += run()
    previous = ROOT / "results" / "open_question_data_gradients.json"
    if args.part != "all" and previous.exists():  # one part rerun: keep the other parts' rows
        rows = [r for r in json.loads(previous.read_text()) if r.get("part") != args.part] + rows
        order = ("mlp", "mlp_seeds", "cnn", "residual")
        rows.sort(key=lambda r: order.index(r["part"]))
    write(rows)


if __name__ == "__main__":
    main()
