"""The padding row of an embedding (SCIENCE.md §8).

``nn.Embedding(padding_idx=p)`` (and ``nn.EmbeddingBag``) never passes a gradient to row p
of its weight, so every entry of that row is a linear law, under any optimizer without weight
decay. A weight tied to anything but embeddings with the same padding row (an output layer)
is refused; one tied between such embeddings only (Marian's encoder / decoder / shared table)
keeps the law. The numerical check catches any other use of the row.

Example:
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> from torch_conslaw.laws.families.proposals import Context
    >>> model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0))
    >>> groups, _ = propose(model, find_structure(model), Context(dict(model.named_parameters())))
    >>> groups[0].name, groups[0].count
    ('0.weight[0]', 4)
"""

from __future__ import annotations

from torch import nn

from ...lawgroups import LawGroup
from ...structure import Skipped, Structure
from ..groups import LinearLaws
from ._links import display


def propose(model: nn.Module, structure: Structure, ctx) -> tuple[list[LawGroup], list[Skipped]]:
    groups: list[LawGroup] = []
    skipped: list[Skipped] = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or module.padding_idx is None:
            continue
        pad = int(module.padding_idx) % int(module.num_embeddings)
        weight = f"{path}.weight" if path else "weight"
        name = f"{weight}[{pad}]"
        problem = ctx.problem((weight,), name)
        if problem is not None and "is shared with" in problem:
            tied = _tied_lookups(model, ctx, weight, pad)
            if tied is not None:  # every holder is a lookup with this padding row (Marian's shared table)
                if weight != tied:
                    continue  # proposed once, under the name the model lists the tensor by
                problem = None
        if problem is not None:
            skipped.append(Skipped(path, path, problem))
            continue
        reason = (
            f"{display(path, module)} never passes a gradient to its padding row {pad}: each "
            "entry of that row is a linear law"
        )
        groups.append(
            LinearLaws(name, ((weight, lambda w, pad=pad: w[pad]),), ctx.params, producer=path, consumer=path, reason=reason)
        )
    return groups, skipped


def _tied_lookups(model: nn.Module, ctx, weight: str, pad: int) -> str | None:
    """When every name of ``weight``'s tensor is the weight of an embedding with padding row
    ``pad`` (a table tied between an encoder and a decoder), none of them passes a gradient to
    that row: the name ``model.named_parameters()`` lists the tensor by; else None."""
    p = ctx.params.get(weight)
    if p is None or not p.requires_grad:
        return None
    for holder in ctx.names_of.get(id(p), [weight]):
        path, _, attr = holder.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return None
        if attr != "weight" or not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or module.padding_idx is None:
            return None
        if int(module.padding_idx) % int(module.num_embeddings) != pad:
            return None
    return next((n for n, q in model.named_parameters() if q is p), None)
