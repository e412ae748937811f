"""Finding where laws live in a model.

* :mod:`.finder` — module-level finder (``torch.fx`` with leaf modules, hooks fallback) and the
  :class:`Pair` / :class:`Skipped` / :class:`Structure` records;
* :mod:`.graph` — op-graph capture on an example input (every torch function, modules seen
  through the ops they run);
* :mod:`.rules` — symmetry rules over the captured graph → rescaling, gated, norm-affine and
  attention (heads, RoPE planes, grouped queries) laws, every refusal with a reason;
* :mod:`.group_rules` — rules over the same graph for the laws beyond pairs: key biases,
  LayerNorm centering (across residual additions), approximate scale before a normalization.

Example:
    >>> from torch import nn
    >>> s = find_structure(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    >>> [p.name for p in s.pairs]
    ['0→2']
"""

from .finder import Pair, Skipped, Structure, find_structure, unwrap_model
from .graph import OpGraph, capture
from .rules import find_graph_laws

__all__ = ["Pair", "Skipped", "Structure", "find_structure", "unwrap_model", "OpGraph", "capture", "find_graph_laws"]
