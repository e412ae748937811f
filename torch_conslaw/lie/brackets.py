"""Values at θ of right-nested Lie brackets [X_{a1}, [X_{a2}, … X_{ak}]] of generator fields.

For vector fields X, Y: [X, Y](θ) = ∂Y(θ) X(θ) − ∂X(θ) Y(θ), both Jacobian-vector products
obtained with ``torch.func.jvp`` through the (nested) field computations. The two terms'
norms are returned as the *scale* of each bracket: a bracket is zero when its value is small
relative to them, not in absolute terms.

Example:
    >>> import torch
    >>> from torch_conslaw.lie.generators import MLPGenerators
    >>> fam = MLPGenerators([3, 2, 2], ["linear"])
    >>> theta = fam.random_point(torch.Generator().manual_seed(0))
    >>> keys = fam.sample_keys(8, torch.Generator().manual_seed(1)).reshape(4, 2, -1)
    >>> values, scales = bracket_values(fam, theta, keys)
    >>> values.shape, scales.shape
    (torch.Size([4, 10]), torch.Size([4]))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp

from .generators import GeneratorFamily, fields

__all__ = ["bracket_values", "nested_field"]

Field = Callable[[Tensor], Tensor]


def nested_field(family: GeneratorFamily, keys: Tensor) -> Field:
    """The batched field Θ ↦ rows [X_{k[i,0]}, [X_{k[i,1]}, … ]](Θ[i]) for keys (n, depth, key_dim).

    Works on a stack Θ (n × D) of points: sample i only sees row i, so plain ``grad`` and
    ``jvp`` on the stack give every bracket at once.
    """
    generator: Field = lambda thetas: fields(family, thetas, keys[:, 0])
    if keys.shape[1] == 1:
        return generator
    inner = nested_field(family, keys[:, 1:])

    def bracket(thetas: Tensor) -> Tensor:
        dy_x, dx_y = _bracket_terms(generator, inner, thetas)
        return dy_x - dx_y

    return bracket


def _bracket_terms(generator: Field, inner: Field, thetas: Tensor) -> tuple[Tensor, Tensor]:
    """The two terms ∂Y X and ∂X Y of [X, Y] = ∂Y X − ∂X Y, X = ``generator``, Y = ``inner``."""
    x = generator(thetas)
    y, dy_x = jvp(inner, (thetas,), (x,))
    dx_y = jvp(generator, (thetas,), (y,))[1]
    return dy_x, dx_y


def _values_and_scales(family: GeneratorFamily, theta: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    thetas = theta.expand(keys.shape[0], -1).contiguous()
    generator: Field = lambda t: fields(family, t, keys[:, 0])
    if keys.shape[1] == 1:
        x = generator(thetas)
        return x, torch.linalg.vector_norm(x, dim=1)
    dy_x, dx_y = _bracket_terms(generator, nested_field(family, keys[:, 1:]), thetas)
    scales = torch.linalg.vector_norm(dy_x, dim=1) + torch.linalg.vector_norm(dx_y, dim=1)
    return dy_x - dx_y, scales


def bracket_values(
    family: GeneratorFamily, theta: Tensor, keys: Tensor, chunk: int = 256
) -> tuple[Tensor, Tensor]:
    """Values (n, D) and scales (n,) of n right-nested brackets; ``keys`` is (n, depth, key_dim).

    Depth 1 gives the generators themselves, with their norms as scales.
    """
    values, scales = [], []
    for start in range(0, keys.shape[0], chunk):
        v, s = _values_and_scales(family, theta, keys[start : start + chunk])
        values.append(v)
        scales.append(s)
    return torch.cat(values), torch.cat(scales)
