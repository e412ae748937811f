"""Shared lookup for the families: the layer links of a structure, with their modules."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ... import catalogue
from ...structure import Structure


def producer_links(model: nn.Module, structure: Structure) -> Iterator[tuple[str, nn.Module, str | None, nn.Module | None]]:
    """``(producer path, producer, consumer path, consumer)`` for every direct link whose
    producer is a registered weight layer that is not itself a normalization (``consumer`` is
    ``None`` when the producer writes the model output)."""
    for link in structure.links:
        prod = model.get_submodule(link.producer)
        spec = catalogue.layer_spec(prod)
        if spec is None or spec.diagonal or getattr(prod, "weight", None) is None:
            continue
        cons = None if link.consumer is None else model.get_submodule(link.consumer)
        yield link.producer, prod, link.consumer, cons


def display(path: str, module: nn.Module) -> str:
    """``path (Type)``."""
    return f"{path} ({type(module).__name__})" if path else type(module).__name__
