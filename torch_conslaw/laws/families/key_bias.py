"""The key bias of attention (SCIENCE.md §8).

The scores of a query q against the keys k_j = W_K x_j + b_K are q·W_K x_j + q·b_K: the second
term is the same for every key, and the softmax over the keys removes it. So b_K has zero
gradient and each of its entries is a linear law (any optimizer without weight decay). For
``nn.MultiheadAttention`` b_K is ``in_proj_bias[E:2E]``; with ``add_bias_kv`` (an extra key
that does not carry b_K) or ``add_zero_attn`` (an extra zero score) the shift no longer reaches
every score, so no law is proposed.

Example:
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> from torch_conslaw.laws.families.proposals import Context
    >>> model = nn.MultiheadAttention(4, 2)
    >>> groups, _ = propose(model, find_structure(model), Context(dict(model.named_parameters())))
    >>> groups[0].name, groups[0].count
    ('key bias', 4)
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
    for path, m in model.named_modules():
        if not isinstance(m, nn.MultiheadAttention) or m.in_proj_bias is None:
            continue
        if m.bias_k is not None or m.add_zero_attn:
            continue
        E = int(m.embed_dim)
        bias = f"{path}.in_proj_bias" if path else "in_proj_bias"
        name = f"{path} key bias" if path else "key bias"
        problem = ctx.problem((bias,), name)
        if problem is not None:
            skipped.append(Skipped(path, path, problem))
            continue
        reason = (
            f"the softmax of {display(path, m)} over the keys removes q·b_K, the same for every "
            "key: the key bias has zero gradient, each entry is a linear law"
        )
        groups.append(
            LinearLaws(name, ((bias, lambda b, E=E: b[E : 2 * E]),), ctx.params, producer=path, consumer=path, reason=reason)
        )
    return groups, skipped
