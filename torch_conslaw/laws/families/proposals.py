"""Law families beyond layer pairs (SCIENCE.md §8): which groups each family proposes.

Each family module has ``propose(model, structure, context) -> (groups, skipped)``: the law
groups its symmetry gives on ``model`` and the candidates it had to refuse, with the reason.
:func:`propose_laws` runs them all. Every proposed group is checked numerically
(:mod:`torch_conslaw.laws.verify`) before the monitor tracks it.

* :mod:`.mean_subtraction` — a bias right before BatchNorm / InstanceNorm (per channel) or
  GroupNorm (per group): linear, zero gradient;
* :mod:`.centering` — a Linear layer right before a LayerNorm over its features: column sums
  and Σ b (linear);
* :mod:`.embedding` — the padding row of ``nn.Embedding(padding_idx=...)`` (linear);
* :mod:`.key_bias` — the key bias of ``nn.MultiheadAttention`` (linear);
* :mod:`.recurrent_bias` — b_ih − b_hh of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` and their cells
  (linear: the two biases are only added);
* :mod:`.translation` — softmax cross-entropy: column sums of the output layer (linear,
  opt-in with ``loss="cross_entropy"``);
* :mod:`.scale` — ‖w‖² + ‖b‖² of a layer right before a normalization (approximate: exact
  only at eps = 0);
* :mod:`.parametrization` — ‖v_j‖² of ``weight_norm``'s direction, ‖V‖² of ``spectral_norm``:
  originals the parametrized weight does not depend on the scale of (exact, quadratic).

These families match module types. With an example input, the op-graph rules of
:mod:`torch_conslaw.structure.group_rules` add the same kinds of laws wherever the ops show
them (a fused ``Conv1D`` key bias, LayerNorm centering across a residual addition, the scale
law before a hand-written RMSNorm): :func:`propose_laws` merges them, and a graph group with the kind, parameters and
count of a module-level group is that same group (a ``Linear`` right before a ``LayerNorm``
is seen by both), so it is not added again.

Example:
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    >>> groups, skipped = propose_laws(model, find_structure(model))
    >>> [(g.name, g.kind, g.count) for g in groups]
    [('0.bias→1', 'linear', 4), ('0→1 scale', 'approximate', 4)]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ...lawgroups import LawGroup
from ...structure import Skipped, Structure
from . import centering, embedding, key_bias, mean_subtraction, parametrization, recurrent_bias, scale, translation

__all__ = ["Context", "FAMILIES", "LOSSES", "propose_laws"]

FAMILIES = (mean_subtraction, centering, embedding, key_bias, recurrent_bias, translation, scale, parametrization)
LOSSES = (None, "cross_entropy")
"""Values of ``loss``: ``None`` (laws of every loss) or a loss whose own laws are wanted."""


@dataclass
class Context:
    """What every family needs besides the model and its structure."""

    params: dict[str, Tensor]
    loss: str | None = None
    names_of: dict[int, list[str]] = field(default_factory=dict)

    def problem(self, names: tuple[str, ...], group: str) -> str | None:
        """Why ``group`` cannot be tracked (a frozen or shared parameter), else None."""
        for n in names:
            p = self.params.get(n)
            if p is None:
                return f"{n} is not a parameter of the model: cannot read the {group} laws"
            if not p.requires_grad:
                return f"{n} is frozen (requires_grad=False): the {group} laws are not tracked"
            others = [m for m in self.names_of.get(id(p), []) if m != n]
            if others:
                return f"{n} is shared with {', '.join(others)}: the {group} laws do not hold"
        return None


def propose_laws(
    model: nn.Module, structure: Structure, *, loss: str | None = None
) -> tuple[list[LawGroup], list[Skipped]]:
    """Every law group of the families above on ``model``, and the refused candidates."""
    if loss not in LOSSES:
        raise ValueError(
            f"loss must be one of {LOSSES} (the loss whose own laws to add: 'cross_entropy' adds "
            f"the softmax translation law of the output layer), got {loss!r}"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}
    for name, p in params.items():
        names_of.setdefault(id(p), []).append(name)
    ctx = Context(params, loss, names_of)
    groups: list[LawGroup] = []
    skipped: list[Skipped] = []
    for family in FAMILIES:
        g, s = family.propose(model, structure, ctx)
        groups += g
        skipped += s
    graph = getattr(structure, "graph_laws", None)
    if graph is not None:
        taken = {(g.kind, frozenset(g.parameter_names), g.count) for g in groups}
        for g in graph.groups:
            if (g.kind, frozenset(g.parameter_names), g.count) in taken:
                continue  # the module-level family found this law already
            problem = ctx.problem(tuple(g.parameter_names), g.name)
            if problem is not None and "is shared with" in problem and getattr(g, "tied_uses", 0):
                problem = None  # a tied table whose every use gives this law (group_rules._tied_centering)
            if problem is not None:
                skipped.append(Skipped(g.producer, g.consumer, problem))
                continue
            groups.append(g)
        skipped += graph.skipped
    return groups, skipped
