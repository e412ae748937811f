"""Scale invariance before a normalization: approximate laws (SCIENCE.md §5, §8).

A normalization of the outputs of the layer right before it (BatchNorm / InstanceNorm per
channel, GroupNorm per channel group, LayerNorm / RMSNorm over the layer's features) divides
by sqrt(var + eps). Scaling the weights and bias of the normalized group by c scales var by
c², so at eps = 0 the output is unchanged and ‖w_group‖² + ‖b_group‖² is conserved. With
eps > 0 the symmetry is broken by a term of relative size ≈ eps / (var + eps): the law is
**approximate**. It is tracked with ``kind == "approximate"`` and never expected to be
conserved; its first-order part under SGD is the eps-induced breaking, measured at each step.

Example:
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> from torch_conslaw.laws.families.proposals import Context
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    >>> groups, _ = propose(model, find_structure(model), Context(dict(model.named_parameters())))
    >>> groups[0].name, groups[0].count, groups[0].approximate
    ('0→1 scale', 1, True)
"""

from __future__ import annotations

from torch import nn

from ... import catalogue
from ...lawgroups import LawGroup
from ...structure import Skipped, Structure
from ..groups import NormScaleLaws
from ._links import display, producer_links
from .mean_subtraction import PER_CHANNEL

_RMS_NORM = getattr(nn, "RMSNorm", None)
WHOLE_LAYER = (nn.LayerNorm,) + ((_RMS_NORM,) if _RMS_NORM is not None else ())


def propose(model: nn.Module, structure: Structure, ctx) -> tuple[list[LawGroup], list[Skipped]]:
    groups: list[LawGroup] = []
    skipped: list[Skipped] = []
    for path, prod, cpath, cons in producer_links(model, structure):
        spec = catalogue.layer_spec(prod)
        units = spec.out_units(prod)
        if isinstance(cons, PER_CHANNEL) and int(cons.num_features) == units:
            rows, per = units, "per channel"
        elif isinstance(cons, nn.GroupNorm) and int(cons.num_channels) == units:
            rows, per = int(cons.num_groups), "per channel group"
        elif isinstance(cons, WHOLE_LAYER) and tuple(cons.normalized_shape) == (units,) and spec.out_axis == "last":
            rows, per = 1, "over the whole layer"
        else:
            continue
        name = f"{path}→{cpath} scale"
        try:  # e.g. nn.Embedding(padding_idx=...) normalized right away (ModernBERT's embeddings)
            incoming = spec.incoming(prod)
        except ValueError as err:
            skipped.append(Skipped(path, cpath, f"no scale law for {display(path, prod)} before {display(cpath, cons)}: it {err}"))
            continue
        readers = tuple(
            (f"{path}.{attr}", lambda w, fn=fn, rows=rows: fn(w).reshape(rows, -1))
            for attr, fn in incoming
        )
        if isinstance(cons, nn.modules.batchnorm._BatchNorm) and not cons.training and cons.running_var is not None:
            skipped.append(Skipped(path, cpath, (
                f"no scale law for {display(path, prod)}: {display(cpath, cons)} is in eval mode and uses its running "
                "statistics, so it does not normalize the outputs (a fixed affine map); build the monitor in train "
                "mode to track it")))
            continue
        problem = ctx.problem(tuple(n for n, _ in readers), name)
        if problem is not None:
            skipped.append(Skipped(path, cpath, problem))
            continue
        eps = getattr(cons, "eps", None)
        reason = (
            f"approximate: {display(cpath, cons)} normalizes the outputs of {display(path, prod)}, "
            f"so ‖w‖² + ‖b‖² {per} would be conserved at eps = 0; eps = {eps:g} breaks it at first "
            "order (∝ eps), so it is never reported as exactly conserved"
        )
        groups.append(NormScaleLaws(name, readers, ctx.params, producer=path, consumer=cpath, reason=reason))
    return groups, skipped
