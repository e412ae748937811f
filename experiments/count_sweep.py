"""count_laws on real nn.Modules against the path-lifting calculator, on the authors' 100 architectures.

For every architecture of ``shared/paper_sweep_architectures.json`` it builds the
``nn.Sequential`` (Linear + ReLU/Identity, biases on hidden layers only, as in the sweep),
counts its laws from data fields with :func:`torch_conslaw.count_laws` (a well-conditioned
random θ, no expected count used) and compares with :func:`torch_conslaw.mlp_trace_dimension`
(gated path-lifting surrogates).

Inputs: by default N = ``n_inputs`` Gaussian inputs, counted on N/2 and N. With ``--rich``:
Gaussian directions with a log-uniform radius (e^-3 … e^5), so that thin cones and regions far
from the origin are reached, and the input set grows ×4 (nested) from N until the count has
not changed over two successive growths (at most ``--max-growths``); every count is kept.

With ``--regions``: a fixed θ and n0 + 1 inputs inside every activation region
(:mod:`relu_regions`, a walk over the regions by linear programs), stopped early once the
count meets the path lifting at the same θ; each ReLU net is also counted by
:func:`torch_conslaw.trace_dimension` on the gated surrogate at exactly the patterns found, and
``--verify`` checks every law beyond the path lifting with fresh torch.func fields and brackets.

Data fields are path-lifting fields at the 0/1 gate patterns the inputs realize, so the data
count is never below the path-lifting count. Deeper ReLU nets whose first layers are narrow
realize few joint activation patterns on R^n0 and keep data-dependent laws for every input
set (``--regions`` finds them all and proves it).

    python experiments/count_sweep.py [--archs PATH] [--out results/count_sweep.json]
    python experiments/count_sweep.py --rich --only 51,52,... --out results/count_sweep_rich.json
    python experiments/count_sweep.py --regions --verify --out results/count_sweep_regions.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from torch_conslaw import count_laws, mlp_trace_dimension, trace_dimension
from torch_conslaw.lie import lie_trace
from torch_conslaw.lie.generators import MLPGenerators
from torch_conslaw.lie.modules import ModuleLieResult, ParameterSlot, random_theta

from relu_regions import RegionWalk, pattern_outputs, patterns_of, region_inputs, relu_layers  # experiments/

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = ROOT.parent / "shared" / "paper_sweep_architectures.json"


def sequential(widths: list[int], activation: str, bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        last = k == len(widths) - 2
        layers.append(nn.Linear(widths[k], widths[k + 1], bias=bias and not last))
        if not last:
            layers.append(nn.ReLU() if activation == "relu" else nn.Identity())
    return nn.Sequential(*layers)


def n_inputs(widths: list[int], D: int) -> int:
    """Rich inputs: 32 D / (outputs per input), at least 256 (every ReLU pattern appears)."""
    return max(256, 32 * D // widths[-1])


def heavy_tailed_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """n Gaussian directions scaled by a log-uniform radius e^U, U ~ U(-3, 5) (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x * torch.empty(n, 1, dtype=torch.float64).uniform_(-3.0, 5.0, generator=g).exp()


def count_until_stable(model: nn.Module, n: int, dim: int, seed: int, max_growths: int):
    """count_laws on ×4-growing nested input sets until two growths leave the count unchanged."""
    x = heavy_tailed_inputs(n * 4**max_growths, dim, seed)
    history: list[dict] = []
    for k in range(max_growths + 1):
        res = count_laws(model, x[: n * 4**k], theta="random", seed=seed)
        history.append({"n_inputs": n * 4**k, "n_laws": res.n_laws, "levels": res.levels})
        if len(history) >= 3 and history[-1]["n_laws"] == history[-2]["n_laws"] == history[-3]["n_laws"]:
            break
    stable = len(history) >= 3 and history[-1]["n_laws"] == history[-2]["n_laws"] == history[-3]["n_laws"]
    return res, history, stable


def gaussian_count(model: nn.Module, n: int, dim: int, seed: int):
    """count_laws on N Gaussian inputs, with the count on N/2 as evidence."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    res = count_laws(model, x, theta="random", seed=seed, input_sizes=[n // 2, n])
    return res, res.input_counts, res.stable


THETA_DRAWS = 32
"""Regions mode: θ draws tried (seeds seed + 7919 k, as count_laws' theta="random") until no
hidden unit is dead or always active on a heavy-tailed probe of 20,000 inputs."""


def slots_of(model: nn.Module) -> list[ParameterSlot]:
    slots, offset = [], 0
    for name, p in model.named_parameters():
        slots.append(ParameterSlot(name, tuple(p.shape), offset, p.numel()))
        offset += p.numel()
    return slots


def regions_theta(model: nn.Sequential, seed: int) -> tuple[torch.Tensor, int]:
    """count_laws' theta="random" rule on a fixed probe: the first draw with no constant hidden unit
    (a unit that varies on the probe varies on R^n0), else the draw with the fewest; (θ, draw)."""
    slots = slots_of(model)
    probe = heavy_tailed_inputs(20_000, model[0].in_features, seed).numpy()
    best = None
    for k in range(THETA_DRAWS):
        theta = random_theta(model, slots, torch.Generator().manual_seed(seed + 7919 * k))
        load_theta(model, theta)
        bits, _ = patterns_of(relu_layers(model), probe)
        constant = int((bits.all(0) | ~bits.any(0)).sum())
        if best is None or constant < best[0]:
            best = (constant, theta, k)
        if constant == 0:
            break
    load_theta(model, best[1])
    return best[1], best[2]


def load_theta(model: nn.Module, theta: torch.Tensor) -> None:
    torch.nn.utils.vector_to_parameters(theta.to(next(model.parameters()).dtype), model.parameters())


def _fields_and_brackets(makers: list, theta: torch.Tensor) -> torch.Tensor:
    """The fields X_k(θ) of six field makers, their 15 brackets [X_a, X_b] and four nested
    brackets [X_a, [X_b, X_c]], by torch.func (jvp of grad), as rows."""
    from torch.func import jvp

    def bracket(f, g):
        return lambda t: jvp(g, (t,), (f(t),))[1] - jvp(f, (t,), (g(t),))[1]

    vectors = [f(theta) for f in makers]
    vectors += [bracket(makers[a], makers[b])(theta) for a in range(6) for b in range(a + 1, 6)]
    vectors += [bracket(makers[a], bracket(makers[b], makers[c]))(theta) for a, b, c in [(0, 1, 2), (3, 4, 5), (1, 3, 5), (2, 0, 4)]]
    return torch.stack(vectors)


def extra_law_check(model: nn.Module, x: torch.Tensor, theta: torch.Tensor, extra: torch.Tensor, family: MLPGenerators, seed: int) -> dict:
    """Independent float64 check of laws found by the data count but not by the path lifting.

    ``extra`` (D × e, orthonormal): law directions at θ orthogonal to the all-pattern laws.
    Fresh random data fields X_u = ∇θ⟨u, f(θ, x)⟩ (u random over the whole batch), their
    brackets and nested brackets (torch.func, not the engine) must be orthogonal to them:
    ``data_residual`` = max over those vectors F and directions v of |⟨v, F⟩| / |F|. The same
    vectors of the path lifting (fields at random gates) must not be: ``path_lifting_overlap``
    = the largest |⟨v, F⟩| / |F| there (O(1): the extra laws fail where the data cannot go).
    """
    from torch.func import functional_call, grad

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def out(t: torch.Tensor) -> torch.Tensor:
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(t, sizes), shapes)}
        return functional_call(model, params, (x,))

    gen = torch.Generator().manual_seed(10_000 + seed)
    shape = out(theta).shape
    us = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(6)]
    data = _fields_and_brackets([lambda t, u=u: grad(lambda s: (out(s) * u).sum())(t) for u in us], theta)
    keys = family.sample_keys(6, gen)
    lifted = _fields_and_brackets([lambda t, k=k: grad(lambda s: family.psi_batch(s[None], k[None]).sum())(t) for k in keys], theta)

    def worst(vectors: torch.Tensor) -> float:
        return float(((vectors @ extra).abs().max(1).values / vectors.norm(dim=1).clamp_min(1e-300)).max())

    return {"vectors": data.shape[0], "data_residual": worst(data), "path_lifting_overlap": worst(lifted)}


FIRST_REGIONS = 1000
"""Regions mode: the walk first stops at this many regions, then ×4 until it settles the count."""


def region_count(arch: dict, seed: int, verify: bool) -> tuple[dict, ModuleLieResult]:
    """count_laws on inputs inside the activation regions (relu_regions) at a fixed θ.

    The region walk stops at 1000 regions, then ×4, until the count equals the path-lifting
    count at the same θ (more regions can only lower the count, which never goes below the
    path lifting: agreement settled) or every region is found (the count is the count of
    every input: a remaining gap is genuine).
    """
    widths, act, bias = arch["widths"], arch["activation"], arch["bias"]
    model = sequential(widths, act, bias).to(torch.float64)
    family = MLPGenerators(widths, [act] * (len(widths) - 2), bias, output_bias=False)
    times = {"regions": 0.0, "count_laws": 0.0}
    walk_log: list[dict] = []
    start = time.perf_counter()
    if act == "relu":
        theta, draw = regions_theta(model, seed)
    else:
        theta, draw = random_theta(model, slots_of(model), torch.Generator().manual_seed(seed)), 0
        load_theta(model, theta)
    same_theta = lie_trace(family, theta, seed=seed, law_basis_max_bytes=1e8)
    times["path_lifting"] = time.perf_counter() - start
    if act == "relu":
        layers = relu_layers(model)
        walk = RegionWalk(layers, seed=seed)
        budget = FIRST_REGIONS
        while True:
            start = time.perf_counter()
            regions = walk.grow(budget)
            x = torch.from_numpy(region_inputs(layers, regions))
            times["regions"] += time.perf_counter() - start
            start = time.perf_counter()
            n_regions = len(regions.patterns)
            res = count_laws(model, x, theta=theta, seed=seed, input_sizes=[n_regions, x.shape[0]])
            times["count_laws"] += time.perf_counter() - start
            walk_log.append({"regions": n_regions, "complete": walk.complete, "n_laws": res.n_laws})
            if walk.complete or res.n_laws == same_theta.n_laws:
                break
            budget *= 4
        region_info = {
            "regions": n_regions,
            "walk_complete": walk.complete,
            "walk": walk_log,
            "hidden_units": int(regions.patterns.shape[1]),
            "lp_solved": regions.n_lp,
            "regions_certified": regions.certified,
            "lp_smallest_accepted": regions.smallest_accepted,
            "lp_largest_rejected": regions.largest_rejected,
            "constant_units_on_Rn0": regions.constant_units,
            "theta_draw": draw,
        }
        start = time.perf_counter()
        phi = pattern_outputs(widths, bias, regions.patterns)
        at_patterns = trace_dimension(phi, res.D, theta=theta, seed=seed).n_laws
        times["path_lifting"] += time.perf_counter() - start
    else:  # a linear net is one region: Gaussian inputs, counted on N/2 and N
        n = max(64, 2 * (widths[0] + 1))
        x = torch.randn(n, widths[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        start = time.perf_counter()
        res = count_laws(model, x, theta=theta, seed=seed, input_sizes=[n // 2, n])
        times["count_laws"] += time.perf_counter() - start
        region_info, at_patterns = {"regions": 1, "walk_complete": True, "theta_draw": draw}, None
    row = {**region_info, "n_inputs": int(x.shape[0]), "same_theta_all_patterns": same_theta.n_laws, "realizable_patterns_count": at_patterns}
    if verify and act == "relu" and res.n_laws > same_theta.n_laws and res.law_basis is not None and same_theta.law_basis is not None:
        start = time.perf_counter()
        q_s, q_all = res.law_basis, same_theta.law_basis
        inside = float((q_all - q_s @ (q_s.T @ q_all)).norm() / max(1.0, float(q_all.norm())))
        u, sv, _ = torch.linalg.svd(q_s - q_all @ (q_all.T @ q_s), full_matrices=False)
        extra = u[:, : res.n_laws - same_theta.n_laws]
        check = extra_law_check(model, x, theta, extra, family, seed)
        check.update({"all_pattern_laws_inside": inside, "extra_laws": extra.shape[1], "extra_singular_values": [float(v) for v in sv[: extra.shape[1] + 1]]})
        row["extra_law_check"] = check
        times["verify"] = time.perf_counter() - start
    row["times"] = {k: round(v, 2) for k, v in times.items()}
    return row, res


def run(archs: list[dict], rich: bool = False, only: set[int] | None = None, max_growths: int = 3, regions: bool = False, verify: bool = False, seed_offset: int = 0) -> list[dict]:
    rows = []
    for i, arch in enumerate(archs):
        if only is not None and i not in only:
            continue
        widths, act, bias = arch["widths"], arch["activation"], arch["bias"]
        seed = i + seed_offset
        n = n_inputs(widths, arch["D"])
        model = None if regions else sequential(widths, act, bias)
        start = time.perf_counter()
        extra: dict = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if regions:
                extra, res = region_count(arch, seed, verify)
                history, stable = res.input_counts, res.stable
            elif rich:
                res, history, stable = count_until_stable(model, n, widths[0], i, max_growths)
            else:
                res, history, stable = gaussian_count(model, n, widths[0], i)
        seconds = time.perf_counter() - start
        n = history[-1]["n_inputs"]
        if regions:
            extra["seed_offset"] = seed_offset
        ref = mlp_trace_dimension(widths, [act] * (len(widths) - 2), bias=bias, output_bias=False, seed=seed)
        if res.D != arch["D"]:
            raise RuntimeError(f"architecture {i}: D={res.D} but the sweep lists D={arch['D']}")
        rows.append(
            {
                "index": i,
                "widths": "-".join(map(str, widths)),
                "activation": act,
                "bias": bias,
                "D": res.D,
                "n_inputs": n,
                "levels": res.levels,
                "n_laws": res.n_laws,
                "path_lifting_laws": ref.n_laws,
                "agrees": res.n_laws == ref.n_laws,
                "stable": stable,
                "input_counts": history,
                "gap": res.evidence,
                **extra,
                "warnings": sorted({str(w.message) for w in caught if "jit" not in str(w.message)}),
                "seconds": round(seconds, 2),
            }
        )
        more = ""
        if regions:
            more = (
                f"; regions {extra['regions']}, same θ all patterns {extra['same_theta_all_patterns']}, "
                f"realizable patterns {extra['realizable_patterns_count']}"
            )
            if "extra_law_check" in extra:
                c = extra["extra_law_check"]
                more += f", extra laws: data residual {c['data_residual']:.1e}, path-lifting overlap {c['path_lifting_overlap']:.2f}"
        print(
            f"{i:3d} {rows[-1]['widths']:>14} {act:6} bias={bias!s:5} D={res.D:4} N={n:5}: "
            f"count_laws {res.n_laws:3d}, path lifting {ref.n_laws:3d} ({seconds:.2f} s; "
            f"counts {[h['n_laws'] for h in history]}{more})",
            flush=True,
        )
    return rows


def regions_summary(rows: list[dict]) -> dict:
    """Regions mode: agreement settled, genuine gaps (every region found), and the cross-checks."""
    relu = [r for r in rows if r["activation"] == "relu"]
    gaps = [r for r in rows if r["n_laws"] > r["same_theta_all_patterns"]]
    return {
        "agree_same_theta_path_lifting": sum(r["n_laws"] == r["same_theta_all_patterns"] for r in rows),
        "genuine_gaps": [
            {"index": r["index"], "widths": r["widths"], "bias": r["bias"], "regions": r["regions"], "count_laws": r["n_laws"],
             "realizable_patterns": r["realizable_patterns_count"], "path_lifting_same_theta": r["same_theta_all_patterns"],
             "path_lifting": r["path_lifting_laws"]}
            for r in gaps if r["walk_complete"]
        ],
        "unsettled": [r["index"] for r in gaps if not r["walk_complete"]],
        "relu_count_equals_realizable_patterns_count": sum(r["n_laws"] == r["realizable_patterns_count"] for r in relu),
        "same_theta_path_lifting_equals_mlp_trace_dimension": sum(r["same_theta_all_patterns"] == r["path_lifting_laws"] for r in rows),
        "relu": len(relu),
        "relu_walks_complete": sum(r["walk_complete"] for r in relu),
        "relu_walks_certified": sum(bool(r["regions_certified"]) for r in relu),
        "regions_total": sum(r["regions"] for r in relu),
        "lp_solved": sum(r["lp_solved"] for r in relu),
        "seconds_regions": round(sum(r["times"]["regions"] for r in rows), 1),
        "seconds_count_laws": round(sum(r["times"]["count_laws"] for r in rows), 1),
        "seconds_path_lifting_checks": round(sum(r["times"]["path_lifting"] for r in rows), 1),
        "seconds_verify": round(sum(r["times"].get("verify", 0.0) for r in rows), 1),
    }


def regions_table(summary: dict, rows: list[dict], command: str) -> str:
    """results/count_sweep_regions.md: the summary and one line per ReLU net with more than one hidden layer."""
    lines = [
        "# count_laws on inputs inside every activation region (the authors' 100 architectures)",
        "",
        f"`{command}`",
        "",
        f"- count_laws = path lifting (mlp_trace_dimension): **{summary['agree']}/{summary['architectures']}**; "
        f"= path lifting at the same θ: {summary['agree_same_theta_path_lifting']}/{summary['architectures']}",
        f"- genuine gaps (every region found, count_laws = path lifting restricted to the realizable patterns > path lifting): "
        f"{len(summary['genuine_gaps'])}; unsettled: {summary['unsettled'] or 'none'}",
        f"- ReLU nets: count_laws = the path-lifting count at exactly the patterns found: "
        f"{summary['relu_count_equals_realizable_patterns_count']}/{summary['relu']}; walks complete "
        f"{summary['relu_walks_complete']}/{summary['relu']}, certified {summary['relu_walks_certified']}/{summary['relu']} "
        f"({summary['regions_total']} regions, {summary['lp_solved']} LPs)",
        f"- worst rank gap of count_laws: smallest accepted {summary['worst_smallest_accepted']:.1e}, "
        f"largest rejected {summary['worst_largest_rejected']:.1e}",
        f"- time: {summary['total_seconds']} s in all (regions {summary['seconds_regions']} s, count_laws "
        f"{summary['seconds_count_laws']} s, path-lifting counts {summary['seconds_path_lifting_checks']} s, "
        f"extra-law checks {summary['seconds_verify']} s), {summary['torch_threads']} torch thread, nice 19, shared 2-core machine",
        "",
        "Deeper ReLU nets (hidden patterns 2^H; regions found; walk = regions → laws at each stop, "
        "(cut): stopped once the count met the path lifting, which more regions cannot lower; "
        "extra-law check: max |<v, F>|/|F| over fresh data fields and brackets, and over path-lifting ones). "
        "In regions mode the first count of `input_counts` is on the region centres only (one input per region) "
        "and may differ from the count on all n0 + 1 inputs per region; the latter is exact (the fields of a region are affine in x).",
        "",
        "| # | widths | bias | D | 2^H | regions | walk | count_laws | at realizable patterns | path lifting (same θ) | mlp_trace_dimension | extra laws: data residual / path-lifting overlap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["activation"] != "relu" or r["widths"].count("-") < 3:
            continue
        walk = ", ".join(f"{w['regions']}→{w['n_laws']}" for w in r["walk"]) + ("" if r["walk_complete"] else " (cut)")
        c = r.get("extra_law_check")
        check = f"{c['data_residual']:.0e} / {c['path_lifting_overlap']:.2f}" if c else ""
        lines.append(
            f"| {r['index']} | {r['widths']} | {'yes' if r['bias'] else 'no'} | {r['D']} | 2^{r['hidden_units']} | {r['regions']} | {walk} | "
            f"{r['n_laws']} | {r['realizable_patterns_count']} | {r['same_theta_all_patterns']} | {r['path_lifting_laws']} | {check} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=Path, default=DEFAULT_ARCHS)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "count_sweep.json")
    parser.add_argument("--rich", action="store_true", help="heavy-tailed inputs, grown ×4 until the count is stable")
    parser.add_argument("--max-growths", type=int, default=3)
    parser.add_argument("--only", type=str, default=None, help="comma-separated architecture indices")
    parser.add_argument("--regions", action="store_true", help="inputs inside every activation region (relu_regions.py), fixed θ")
    parser.add_argument("--verify", action="store_true", help="--regions: check the laws beyond the path lifting (torch.func fields and brackets)")
    parser.add_argument("--seed-offset", type=int, default=0, help="--regions: θ seed = index + offset (another θ of each architecture)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    archs = json.loads(args.archs.read_text())
    only = None if args.only is None else {int(i) for i in args.only.split(",")}
    start = time.perf_counter()
    rows = run(archs, rich=args.rich, only=only, max_growths=args.max_growths, regions=args.regions, verify=args.verify, seed_offset=args.seed_offset)
    total = time.perf_counter() - start
    summary = {
        "architectures": len(rows),
        "inputs": (
            "n0+1 inputs inside every activation region (linear nets: Gaussian, N/2 and N)"
            if args.regions
            else "heavy-tailed, grown x4 until stable" if args.rich else "Gaussian, N/2 and N"
        ),
        "agree": sum(r["agrees"] for r in rows),
        "agree_linear": sum(r["agrees"] for r in rows if r["activation"] == "linear"),
        "linear": sum(r["activation"] == "linear" for r in rows),
        "agree_relu_one_hidden_layer": sum(r["agrees"] for r in rows if r["activation"] == "relu" and r["widths"].count("-") == 2),
        "relu_one_hidden_layer": sum(r["activation"] == "relu" and r["widths"].count("-") == 2 for r in rows),
        "agree_relu_deeper": sum(r["agrees"] for r in rows if r["activation"] == "relu" and r["widths"].count("-") > 2),
        "relu_deeper": sum(r["activation"] == "relu" and r["widths"].count("-") > 2 for r in rows),
        "data_count_below_path_count": sum(r["n_laws"] < r["path_lifting_laws"] for r in rows),
        "stable": sum(r["stable"] for r in rows),
        "with_warnings": sum(bool(r["warnings"]) for r in rows),
        "worst_smallest_accepted": min(v for r in rows if (v := r["gap"]["smallest_accepted"]) == v),
        "worst_largest_rejected": max(v for r in rows if (v := r["gap"]["largest_rejected"]) == v),
        **(regions_summary(rows) if args.regions else {}),
        "total_seconds": round(total, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": list(__import__("os").getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    if args.regions:
        command = "python " + " ".join(["experiments/count_sweep.py", *__import__("sys").argv[1:]])
        args.out.with_suffix(".md").write_text(regions_table(summary, rows, command))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
