"""The two biases of a recurrent layer (``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` and their cells).

A recurrent layer computes its gates as W_ih x + b_ih + W_hh h + b_hh. Where the two biases
are only added, they always get the same gradient, so every entry of b_ih − b_hh is a linear
law (under any optimizer whose update depends on the gradient alone and starts from the
same state for both; weight decay breaks it). That is every gate of ``nn.RNN`` and
``nn.LSTM`` (i, f, g, o), and the r and z gates of ``nn.GRU``: its n gate multiplies b_hn by
r, so there only the first 2·hidden entries are laws. One group per layer and direction; a
frozen or shared bias is refused, and the numerical check catches a subclass whose forward
uses the biases differently.

Example:
    >>> from torch import nn
    >>> from torch_conslaw.structure import find_structure
    >>> from torch_conslaw.laws.families.proposals import Context
    >>> model = nn.GRU(3, 4, num_layers=2)
    >>> groups, _ = propose(model, find_structure(model), Context(dict(model.named_parameters())))
    >>> [(g.name, g.count) for g in groups]
    [('bias_ih_l0−bias_hh_l0', 8), ('bias_ih_l1−bias_hh_l1', 8)]
"""

from __future__ import annotations

from torch import nn

from ...lawgroups import LawGroup
from ...structure import Skipped, Structure
from ..groups import DifferenceLaws
from ._links import display

_SUMMED_GATES = {nn.RNN: 1, nn.RNNCell: 1, nn.LSTM: 4, nn.LSTMCell: 4, nn.GRU: 2, nn.GRUCell: 2}
"""How many blocks of ``hidden_size`` gate entries add b_ih and b_hh and nothing else."""


def _summed_gates(module: nn.Module) -> int | None:
    for cls in type(module).__mro__:
        if cls in _SUMMED_GATES:
            return _SUMMED_GATES[cls]
    return None


def _bias_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(bias_ih, bias_hh)`` attribute names of every layer and direction."""
    if isinstance(module, nn.RNNBase):
        names = [n for n in module._flat_weights_names if n.startswith("bias_ih")]
        return [(n, n.replace("bias_ih", "bias_hh", 1)) for n in names]
    return [("bias_ih", "bias_hh")]


def propose(model: nn.Module, structure: Structure, ctx) -> tuple[list[LawGroup], list[Skipped]]:
    groups: list[LawGroup] = []
    skipped: list[Skipped] = []
    for path, module in model.named_modules():
        gates = _summed_gates(module)
        if gates is None or not getattr(module, "bias", False):
            continue
        n = gates * int(module.hidden_size)
        for b_ih, b_hh in _bias_pairs(module):
            plus, minus = (f"{path}.{b}" if path else b for b in (b_ih, b_hh))
            name = f"{plus}−{b_hh}"
            problem = ctx.problem((plus, minus), name)
            if problem is not None:
                skipped.append(Skipped(path, path, problem))
                continue
            what = "the r and z gates" if gates == 2 else "every gate"
            reason = (
                f"{display(path, module)} adds {b_ih} and {b_hh} in {what}: they always get the "
                f"same gradient, so each of the {n} entries of their difference there is a linear law"
            )
            take = lambda b, n=n: b[:n]  # noqa: E731
            groups.append(DifferenceLaws(name, (plus, take), (minus, take), ctx.params, producer=path, consumer=path, reason=reason))
    return groups, skipped
