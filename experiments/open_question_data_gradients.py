"""Open question (SCIENCE.md §7): do the data gradients of a deep ReLU network generate the
same Lie algebra trace as its path lifting?

For a fixed dataset x_1..x_N the loss gradients of a ReLU network live in
span{∇_θ f_o(θ, x_i)}, computed with the *actual* 0/1 activation patterns (locally constant
in θ). This script builds that generator family — ψ_{c,y}(θ) = Σ_i c_i yᵀ f(θ, x_i) with
random coefficients c over the data and read-outs y — and compares dim Lie(θ) with the path
lifting's (random real gates, :class:`~torch_conslaw.lie.generators.MLPGenerators`) at the same θ,
for growing N. Proven equal for two layers; here deeper nets are probed.

    python experiments/open_question_data_gradients.py   # writes results/open_question_data_gradients.md
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from torch_conslaw.lie.generators import DTYPE, MLPGenerators
from torch_conslaw.lie import lie_trace

ROOT = Path(__file__).resolve().parents[1]


class DataGradientGenerators(MLPGenerators):
    """Generators ∇_θ Σ_i c_i yᵀ f(θ, x_i) of a real ReLU MLP on a fixed dataset ``data`` (N × n0).

    Only the key layout and ψ change: the layout of θ and the random point are those of the
    path-lifting family, so both are compared at the same θ.
    """

    def __init__(self, widths: list[int], bias: bool, data: Tensor):
        super().__init__(widths, "relu", bias)
        self.data = data.to(DTYPE)
        self.n_data = data.shape[0]
        self.key_dim = self.n_data + widths[-1]

    def psi_batch(self, thetas: Tensor, keys: Tensor) -> Tensor:
        coeffs, readout = keys[:, : self.n_data], keys[:, self.n_data :]
        n = thetas.shape[0]
        parts = iter(torch.split(thetas, self.sizes, dim=1))
        h = self.data.expand(n, -1, -1)  # (n, N, n0)
        for k in range(self._n_layers):
            w = next(parts).reshape(n, self.widths[k + 1], self.widths[k])
            z = torch.einsum("bij,bsj->bsi", w, h)
            if self.layer_bias[k]:
                z = z + next(parts)[:, None, :]
            h = torch.relu(z) if k < self._n_layers - 1 else z
        return torch.einsum("bs,bso,bo->b", coeffs, h, readout)

    def gram_matvec(self, theta: Tensor):  # pragma: no cover - dense method only
        raise NotImplementedError("the data-gradient family is used with method='dense'")

    def constant_units(self, theta: Tensor) -> tuple[int, int]:
        """Hidden units that never fire (dead) and that always fire, over the dataset, at θ."""
        h, dead, always = self.data, 0, 0
        for k, (w, b) in enumerate(self.unflatten(theta)[:-1]):
            z = h @ w.T + (b if b is not None else 0)
            active = z > 0
            dead += int((~active).all(0).sum())
            always += int(active.all(0).sum())
            h = torch.relu(z)
        return dead, always


def compare(widths: list[int], bias: bool, n_data: list[int], seed: int = 0) -> list[dict]:
    path = MLPGenerators(widths, "relu", bias)
    theta = path.random_point(torch.Generator().manual_seed(seed))
    reference = lie_trace(path, theta, method="dense", seed=seed)
    rows = []
    for n in n_data:
        data = torch.randn(n, widths[0], generator=torch.Generator().manual_seed(seed + n), dtype=DTYPE)
        fam = DataGradientGenerators(widths, bias, data)
        res = lie_trace(fam, theta, method="dense", seed=seed)
        dead, always = fam.constant_units(theta)
        rows.append(
            {
                "widths": "-".join(map(str, widths)),
                "bias": bias,
                "D": path.D,
                "N": n,
                "data_levels": res.levels,
                "path_levels": reference.levels,
                "data_laws": res.n_laws,
                "path_laws": reference.n_laws,
                "same_trace": res.dim == reference.dim,
                "dead_units": dead,
                "always_active_units": always,
                "warnings": res.warnings,
            }
        )
        print(
            f"{rows[-1]['widths']:>12} bias={bias!s:5} D={path.D:4}  N={n:4}: data gradients levels {res.levels} "
            f"({res.n_laws} laws)  vs path lifting {reference.levels} ({reference.n_laws} laws); "
            f"units dead/always active on the data: {dead}/{always}",
            flush=True,
        )
    return rows


def main() -> None:
    cases = [
        ([3, 4, 2], False, [1, 2, 4, 16, 64]),
        ([4, 5, 5, 3], False, [1, 4, 16, 64, 256, 1024]),
        ([4, 5, 5, 3], True, [1, 4, 16, 64, 256]),
        ([3, 4, 4, 4, 2], True, [1, 4, 16, 64, 256, 4096]),
    ]
    rows = [row for widths, bias, ns in cases for row in compare(widths, bias, ns)]
    out = ROOT / "results" / "open_question_data_gradients.md"
    lines = [
        "# Data gradients vs path lifting (SCIENCE.md §7)",
        "",
        "| widths | bias | D | N data points | levels (data gradients) | levels (path lifting) | laws (data) | laws (path) | units dead / always active |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['widths']} | {r['bias']} | {r['D']} | {r['N']} | {r['data_levels']} | {r['path_levels']} | "
        f"{r['data_laws']} | {r['path_laws']} | {r['dead_units']} / {r['always_active_units']} |"
        for r in rows
    ]
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
