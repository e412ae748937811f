"""A bias right before a normalization that subtracts a mean over it (SCIENCE.md §8).

BatchNorm (train mode) and InstanceNorm subtract, per channel c, the mean of the channel over
the batch / the positions: adding t to the bias b_c of the layer right before them changes
nothing downstream, so ∂L/∂b_c = 0 for every loss and b_c is a (linear) law, exact at any eps.
GroupNorm subtracts the mean over the channels of a group and the positions: only adding the
same t to every bias of a group is a symmetry, so the law is Σ_{c ∈ group} b_c.

BatchNorm in eval mode uses its running statistics, so the law holds in train mode only; the
numerical check runs the model in the mode it is in when the monitor is built, so a model
built in eval mode gets this law refused (with the measured residual) rather than falsely
claimed.

Example:
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> from torch_conslaw.laws.families.proposals import Context
    >>> model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    >>> groups, _ = propose(model, find_structure(model), Context(dict(model.named_parameters())))
    >>> groups[0].name, groups[0].count
    ('0.bias→1', 3)
"""

from __future__ import annotations

from torch import nn

from ...lawgroups import LawGroup
from ...structure import Skipped, Structure
from ..groups import LinearLaws
from ._links import display, producer_links

PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def propose(model: nn.Module, structure: Structure, ctx) -> tuple[list[LawGroup], list[Skipped]]:
    groups: list[LawGroup] = []
    skipped: list[Skipped] = []
    for path, prod, cpath, cons in producer_links(model, structure):
        if not isinstance(cons, PER_CHANNEL + (nn.GroupNorm,)) or getattr(prod, "bias", None) is None:
            continue
        channels = int(cons.num_channels if isinstance(cons, nn.GroupNorm) else cons.num_features)
        if prod.bias.numel() != channels:
            continue
        name = f"{path}.bias→{cpath}"
        problem = ctx.problem((f"{path}.bias",), name)
        if problem is not None:
            skipped.append(Skipped(path, cpath, problem))
            continue
        if isinstance(cons, nn.GroupNorm):
            per = channels // int(cons.num_groups)
            reader = lambda b, per=per: b.reshape(-1, per).sum(1)  # noqa: E731
            what = f"the sum of the biases of each of its {cons.num_groups} channel groups"
            mean = "the mean over each channel group and the positions"
        else:
            reader = lambda b: b  # noqa: E731
            what = "each bias entry"
            mean = "the mean of each channel" + (" over the batch (train mode)" if isinstance(cons, nn.modules.batchnorm._BatchNorm) else " over the positions")
        reason = (
            f"{display(cpath, cons)} subtracts {mean}, so the bias of {display(path, prod)} right "
            f"before it has zero gradient: {what} is a linear law, exact at any eps"
        )
        groups.append(LinearLaws(name, ((f"{path}.bias", reader),), ctx.params, producer=path, consumer=cpath, reason=reason))
    return groups, skipped
