"""Scale-invariant originals of a parametrization (``weight_norm``, ``spectral_norm``): exact laws.

``torch.nn.utils.parametrizations.weight_norm`` computes W = g · v / ‖v‖ row by row (dim 0):
scaling row j of v by c > 0 leaves W, hence the model and the loss, unchanged, so
⟨∇_v L, v_j⟩ = 0 and ‖v_j‖² is conserved by gradient flow, one law per row. ``spectral_norm``
computes W = V / σ(V) (σ from power-iteration vectors that do not change when V is scaled):
‖V‖² is one law. Entries of an original the parametrization never reads (``orthogonal`` reads
only the strict lower triangle of its original) have zero gradient: linear laws. This holds for any loss and any data, because the model never sees the scale.

Which originals are scale-invariant, per row (axis 0) or as a whole, is measured on the
module's own originals (:func:`~torch_conslaw.structure.parametrized.original_kinds`), not
assumed from the parametrization's class, and every group is checked numerically before it is
tracked (:mod:`torch_conslaw.laws.verify`). The rescaling law of a weight-normed producer's
units (g_j² + b_j² − ‖w_out,j‖²) comes from the layer pairs, which read g through the
parametrization (:func:`~torch_conslaw.structure.parametrized.parametrized_incoming`).

Example:
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> from torch_conslaw.laws.families.proposals import Context
    >>> model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2))
    >>> groups, _ = propose(model, find_structure(model), Context(dict(model.named_parameters())))
    >>> [(g.name, g.kind, g.count) for g in groups]
    [('0.weight original1 scale', 'scale', 4)]
"""

from __future__ import annotations

from torch import nn

from ...lawgroups import LawGroup
from ...structure import Skipped, Structure
from ...structure.parametrized import is_parametrized, original_kinds, parametrization_names, unread_entries
from ..groups import InvariantScaleLaws, LinearLaws
from ._links import display


def propose(model: nn.Module, structure: Structure, ctx) -> tuple[list[LawGroup], list[Skipped]]:
    groups: list[LawGroup] = []
    skipped: list[Skipped] = []
    for path, module in model.named_modules():
        if not is_parametrized(module):
            continue
        for attr in list(module.parametrizations.keys()):
            try:
                kinds = original_kinds(module, attr)
            except Exception as err:  # a parametrization that cannot run on its own
                skipped.append(Skipped(path, None, f"{display(path, module)}: its {attr} parametrization "
                                       f"could not be evaluated alone ({type(err).__name__}: {err}); no scale law is proposed"))
                continue
            for orig, idx in unread_entries(module, attr).items():  # entries the weight never reads
                qual = f"{path}.parametrizations.{attr}.{orig}" if path else f"parametrizations.{attr}.{orig}"
                name = f"{path + '.' if path else ''}{attr} {orig} unread"
                problem = ctx.problem((qual,), name)
                if problem is not None:
                    skipped.append(Skipped(path, None, problem))
                    continue
                reason = (
                    f"{display(path, module)} computes {attr} with {parametrization_names(module, attr)}, which never "
                    f"reads these {idx.numel()} entries of {orig}: their gradient is zero (linear laws, exact under "
                    "any optimizer without weight decay)"
                )
                groups.append(LinearLaws(name, ((qual, lambda t, idx=idx: t.reshape(-1)[idx.to(t.device)]),), ctx.params,
                                         producer=path, consumer=path, reason=reason))
            for orig, kind in kinds:
                if kind not in ("row-invariant", "invariant"):
                    continue
                qual = f"{path}.parametrizations.{attr}.{orig}" if path else f"parametrizations.{attr}.{orig}"
                per_row = kind == "row-invariant"
                reader = (qual, (lambda t: t.reshape(t.shape[0], -1)) if per_row else (lambda t: t.reshape(1, -1)))
                name = f"{path + '.' if path else ''}{attr} {orig} scale"
                problem = ctx.problem((qual,), name)
                if problem is not None:
                    skipped.append(Skipped(path, None, problem))
                    continue
                where = "each row (axis 0) of " if per_row else ""
                reason = (
                    f"{display(path, module)} computes {attr} with {parametrization_names(module, attr)}, which "
                    f"does not change when {where}{orig} is scaled: ‖{orig}{'[j]' if per_row else ''}‖² is "
                    "conserved (exact; under SGD it grows by η²‖g‖² per step)"
                )
                groups.append(InvariantScaleLaws(name, (reader,), ctx.params, producer=path, consumer=path, reason=reason))
    return groups, skipped
