"""One walk over a model's nested output: tuples, lists, mappings and dataclass instances.

Every reader of model outputs (the numerical check, the count, the op-graph capture, analyze)
walks the same nesting, so a container the walk learns about (``ModelOutput``, an output
dataclass) is learnt once, here.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Out:
    ...     logits: int
    ...     extra: tuple
    >>> list(leaves({"a": [1, (2, 3)], "b": Out(4, (5,))}))
    [1, 2, 3, 4, 5]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["leaves"]


def leaves(obj: Any) -> Iterator[Any]:
    """The leaves of ``obj``, in order: the items of tuples and lists, the values of mappings
    (a Hugging Face ``ModelOutput`` is one) and the fields of dataclass instances, recursively;
    anything else is a leaf."""
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from leaves(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from leaves(o)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from leaves(getattr(obj, f.name))
    else:
        yield obj
