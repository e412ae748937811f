"""Completeness report: are the laws the monitor tracks all the laws there are?

:func:`analyze` counts the independent laws the catalogue tracks (rank of their gradients
at θ, float64, ``torch.func.jacrev``) and, when the model is a chain of ``Linear`` layers
with hidden activations the Lie calculator knows (linear, ReLU, LeakyReLU), how many laws
exist at all (:func:`torch_conslaw.lie.mlp_trace_dimension`, SCIENCE.md §3).

Example:
    >>> from torch import nn
    >>> report = analyze(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5)))
    >>> report.tracked_rank, report.lie_laws, report.complete
    (4, 4, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .lawgroups import LawGroup, build_groups
from .lie import mlp_trace_dimension
from .lie.numerics import DEFAULT_RTOL, RankDecision, decide_rank
from .structure import Structure, find_structure, unwrap_model

__all__ = ["Analysis", "analyze"]

_LIE_KINDS = {"relu": "relu", "leakyrelu": "leaky_relu", "leaky_relu": "leaky_relu", "identity": "linear"}


@dataclass
class Analysis:
    """What :func:`analyze` found; ``str(report)`` gives a readable summary.

    ``complete`` is True when the tracked rank equals the Lie count, False when it is
    smaller, and None when the Lie count could not be computed (``lie_note`` says why).
    """

    model: str
    structure: Structure
    groups: list[LawGroup]
    num_parameters: int
    tracked_laws: int
    tracked_rank: int
    rank_decision: RankDecision | None
    lie_laws: int | None
    lie_note: str
    complete: bool | None
    lie: Any = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.model}: {self.num_parameters} trainable parameters"]
        lines.append(
            f"tracked: {len(self.groups)} law group(s), {self.tracked_laws} law function(s), "
            f"{self.tracked_rank} independent at θ"
            + (f" [{self.rank_decision.describe()}]" if self.rank_decision is not None else "")
        )
        for g in self.groups:
            lines.append(f"  {g.name:<20} {g.kind:<8} {g.count:>5} laws")
        if self.lie_laws is not None:
            lines.append(f"Lie-algebra count: {self.lie_laws} independent laws exist ({self.lie_note})")
        else:
            lines.append(f"Lie-algebra count: not computed ({self.lie_note})")
        verdict = {True: "complete", False: "INCOMPLETE: some laws are not tracked", None: "unknown"}
        lines.append(f"tracked set: {verdict[self.complete]}")
        lines.extend(f"skipped: {s}" for s in self.structure.skipped)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def analyze(
    model: nn.Module,
    example_input: Any = None,
    *,
    rtol: float = DEFAULT_RTOL,
    lie: bool = True,
    max_lie_parameters: int = 20_000,
    max_jacobian_entries: int = 50_000_000,
) -> Analysis:
    """Rank of the tracked laws at the model's θ, the Lie count where available, completeness.

    ``rtol`` is the relative singular-value threshold of both rank decisions;
    ``max_lie_parameters`` and ``max_jacobian_entries`` bound the cost (larger models get
    a note instead of a number).

    Example:
        >>> from torch import nn
        >>> print(analyze(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))).complete)
        True
    """
    model = unwrap_model(model)
    structure = find_structure(model, example_input)
    groups = build_groups(structure.pairs)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    num_parameters = sum(p.numel() for p in trainable.values())
    tracked_laws = sum(g.count for g in groups)
    notes: list[str] = []
    decision: RankDecision | None = None
    tracked_rank = 0
    if groups:
        names = sorted({n for g in groups for n in g.parameter_names})
        width = sum(trainable[n].numel() for n in names)
        if tracked_laws * width > max_jacobian_entries:
            raise ValueError(
                f"analyze: the Jacobian of the tracked laws would have {tracked_laws} × {width} "
                f"entries (more than max_jacobian_entries={max_jacobian_entries}); analyze a "
                "narrower copy of the architecture, or raise the limit"
            )
        theta = {n: trainable[n].detach().to(torch.float64).clone() for n in names}
        jac = _law_jacobian(groups, theta)
        s = torch.linalg.svdvals(jac)
        relative = s / s[0] if s.numel() and s[0] > 0 else s
        decision = decide_rank(relative, rtol, candidates=tracked_laws)
        tracked_rank = decision.rank
        if not decision.clear:
            notes.append(f"no clear singular-value gap in the tracked laws: {decision.describe()}")
    lie_result, lie_laws, lie_note = None, None, "disabled (lie=False)"
    if lie:
        lie_result, lie_laws, lie_note = _lie_count(
            model, structure, trainable, num_parameters, max_lie_parameters, rtol
        )
    complete = None if lie_laws is None else tracked_rank == lie_laws
    return Analysis(
        model=type(model).__name__,
        structure=structure,
        groups=groups,
        num_parameters=num_parameters,
        tracked_laws=tracked_laws,
        tracked_rank=tracked_rank,
        rank_decision=decision,
        lie_laws=lie_laws,
        lie_note=lie_note,
        complete=complete,
        lie=lie_result,
        notes=notes,
    )


def _law_jacobian(groups: list[LawGroup], theta: dict[str, Tensor]) -> Tensor:
    """(number of laws) × (number of parameters read by the laws), float64."""

    def laws(params: dict[str, Tensor]) -> Tensor:
        return torch.cat([g.values(params) for g in groups])

    jac = torch.func.jacrev(laws)(theta)
    return torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in theta], dim=1)


def _lie_count(
    model: nn.Module,
    structure: Structure,
    trainable: dict[str, nn.Parameter],
    num_parameters: int,
    max_parameters: int,
    rtol: float,
) -> tuple[Any, int | None, str]:
    arch = _mlp_architecture(model, structure, trainable)
    if isinstance(arch, str):
        return None, None, arch
    widths, activations, bias, output_bias = arch
    if num_parameters > max_parameters:
        return None, None, f"{num_parameters} parameters > max_lie_parameters={max_parameters}"
    result = mlp_trace_dimension(
        widths, activations, bias=bias, seed=0, output_bias=output_bias, rtol=rtol
    )
    note = f"MLP widths {widths}, activations {activations}, bias={bias}, output_bias={output_bias}"
    return result, int(result.n_laws), note


def _mlp_architecture(
    model: nn.Module, structure: Structure, trainable: dict[str, nn.Parameter]
) -> tuple[list[int], list[str], bool, bool] | str:
    """(widths, activations, hidden bias, output bias) when the model is a plain chain of
    Linear layers the Lie calculator can count; otherwise the reason why not."""
    linears = {path: m for path, m in model.named_modules() if type(m) is nn.Linear}
    inner = next((p for p in structure.pairs if p.internal), None)
    if inner is not None:
        return (
            f"{inner.producer or 'the model'} carries internal laws ({inner.name}, ...): the Lie "
            "calculator covers plain chains of Linear layers only"
        )
    branch = next((p for p in structure.pairs if p.branch), None)
    if branch is not None:
        return (
            f"{branch.producer} feeds several layers ({', '.join(branch.consumers)}): the Lie "
            "calculator covers plain chains only"
        )
    if structure.skipped:
        return "the structure has skipped pairs, so it is not a plain chain of layers"
    if not linears:
        return "no Linear layers: the Lie calculator covers fully connected chains only"
    owned = {f"{path}.{n}" for path, m in linears.items() for n, _ in m.named_parameters()}
    if set(trainable) != owned or any(not p.requires_grad for m in linears.values() for p in m.parameters()):
        return "parameters outside plain Linear layers (or frozen ones): not a plain MLP"
    nxt = {p.producer: p for p in structure.pairs}
    heads = set(nxt) - {p.consumer for p in structure.pairs}
    chain = [next(iter(heads))] if len(heads) == 1 else (list(linears)[:1] if not structure.pairs else [])
    if not chain:
        return "the layer pairs do not form a single chain"
    activations: list[str] = []
    while chain[-1] in nxt:
        pair = nxt[chain[-1]]
        kinds = [k for k in pair.op_kinds if k != "identity"]
        if len(kinds) > 1 or (kinds and kinds[0] not in _LIE_KINDS):
            return f"ops {pair.op_kinds} between {pair.producer} and {pair.consumer} are not in the Lie calculator's MLP kinds"
        activations.append(_LIE_KINDS[kinds[0]] if kinds else "linear")
        chain.append(pair.consumer)
    if sorted(chain) != sorted(linears):
        return "not every Linear layer lies on one chain of pairs"
    layers = [linears[p] for p in chain]
    widths = [layers[0].in_features] + [m.out_features for m in layers]
    hidden_bias = {m.bias is not None for m in layers[:-1]}
    if len(hidden_bias) > 1:
        return "some hidden layers have a bias and others not: not covered by the Lie calculator"
    bias = hidden_bias.pop() if hidden_bias else layers[-1].bias is not None
    return widths, activations, bias, layers[-1].bias is not None
