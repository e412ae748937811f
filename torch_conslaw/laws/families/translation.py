"""Softmax cross-entropy translation law of the output layer (SCIENCE.md §5, §8). Opt-in.

Softmax cross-entropy is unchanged when the same c is added to every logit of a sample. If
the model's output is the output of a Linear layer (logits on the last axis) or a convolution
(classes on axis 1), W → W + 1aᵀ, b → b + t·1 adds (aᵀx + t) to every logit, so under that
loss the column sums Σ_i W[i, :] and Σ_i b_i are linear laws. They hold **only** for softmax
cross-entropy (not for MSE, not with label smoothing towards a non-uniform target, not when
the loss reads other outputs), so they are added only when the user names the loss:
``ConservationMonitor(model, example_input, loss="cross_entropy")``. They are verified with
cotangents u whose class sums vanish, as every gradient of that loss with respect to the
logits does.

Example:
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> from torch_conslaw.laws.families.proposals import Context
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5))
    >>> ctx = Context(dict(model.named_parameters()), loss="cross_entropy")
    >>> groups, _ = propose(model, find_structure(model), ctx)
    >>> groups[0].name, groups[0].count, groups[0].loss
    ('2 translation', 5, 'cross_entropy')
"""

from __future__ import annotations

from torch import nn

from ...lawgroups import LawGroup
from ...structure import Skipped, Structure
from ..groups import LinearLaws
from ._links import display, producer_links

CLASS_AXIS = {nn.Linear: -1, nn.Conv1d: 1, nn.Conv2d: 1, nn.Conv3d: 1}


def propose(model: nn.Module, structure: Structure, ctx) -> tuple[list[LawGroup], list[Skipped]]:
    if ctx.loss != "cross_entropy":
        return [], []
    groups: list[LawGroup] = []
    skipped: list[Skipped] = []
    for path, prod, cpath, _ in producer_links(model, structure):
        axis = CLASS_AXIS.get(type(prod))
        if cpath is not None or axis is None:
            continue
        readers = [(f"{path}.weight", lambda w: w.sum(0).reshape(-1))]
        if prod.bias is not None:
            readers.append((f"{path}.bias", lambda b: b.sum().reshape(1)))
        name = f"{path} translation"
        problem = ctx.problem(tuple(n for n, _ in readers), name)
        if problem is not None:
            skipped.append(Skipped(path, None, problem))
            continue
        reason = (
            f"softmax cross-entropy (loss='cross_entropy') is unchanged by adding the same value to "
            f"every logit written by {display(path, prod)}: its column sums"
            + (" and Σ b" if prod.bias is not None else "")
            + " are linear laws of this loss only"
        )
        groups.append(
            LinearLaws(
                name, tuple(readers), ctx.params, producer=path, consumer="output", reason=reason,
                loss="cross_entropy", class_axis=axis,
            )
        )
    if not groups and not skipped:
        skipped.append(Skipped(None, None, (
            "loss='cross_entropy': no Linear or convolution writes the model output directly "
            "(the translation law needs the logits to be that layer's output), so no translation "
            "law is tracked"
        )))
    return groups, skipped
