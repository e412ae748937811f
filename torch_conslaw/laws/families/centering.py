"""LayerNorm centering: a Linear layer right before a LayerNorm over its features (SCIENCE.md §8).

LayerNorm subtracts the mean over the features of each sample. Replacing W → W + 1aᵀ and
b → b + t·1 adds (aᵀx + t)·1 to the layer's output, which that subtraction removes, so the
column sums Σ_i W[i, :] (one law per input feature) and Σ_i b_i are linear laws, exact at
any eps.

Example:
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> from torch_conslaw.laws.families.proposals import Context
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    >>> groups, _ = propose(model, find_structure(model), Context(dict(model.named_parameters())))
    >>> groups[0].name, groups[0].count
    ('0→1 centering', 4)
"""

from __future__ import annotations

from torch import nn

from ...lawgroups import LawGroup
from ...structure import Skipped, Structure
from ..groups import LinearLaws
from ._links import display, producer_links


def propose(model: nn.Module, structure: Structure, ctx) -> tuple[list[LawGroup], list[Skipped]]:
    groups: list[LawGroup] = []
    skipped: list[Skipped] = []
    for path, prod, cpath, cons in producer_links(model, structure):
        if not (isinstance(cons, nn.LayerNorm) and isinstance(prod, nn.Linear)):
            continue
        if tuple(cons.normalized_shape) != (prod.out_features,):
            continue  # normalizes more than the layer's features: its column shifts mix axes
        readers = [(f"{path}.weight", lambda w: w.sum(0))]
        if prod.bias is not None:
            readers.append((f"{path}.bias", lambda b: b.sum().reshape(1)))
        name = f"{path}→{cpath} centering"
        problem = ctx.problem(tuple(n for n, _ in readers), name)
        if problem is not None:
            skipped.append(Skipped(path, cpath, problem))
            continue
        reason = (
            f"{display(cpath, cons)} subtracts the mean over the features of {display(path, prod)}: "
            "its column sums Σ_i W[i, :]" + (" and Σ_i b_i" if prod.bias is not None else "")
            + " are linear laws, exact at any eps"
        )
        groups.append(LinearLaws(name, tuple(readers), ctx.params, producer=path, consumer=cpath, reason=reason))
    return groups, skipped
