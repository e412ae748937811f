"""Law groups beyond layer pairs: linear laws and approximate (normalization scale) laws.

Both go through the generic :class:`~torch_conslaw.lawgroups.LawGroup` interface that the
monitor evaluates: ``values(θ)``, ``first_order(θ, Δ)``, ``second_order(Δ)``, ``scale(θ)``.

* :class:`LinearLaws` — h = cᵀθ (SCIENCE.md §8): a bias entry, a column sum, an embedding row.
  Its change over a step is exactly cᵀΔ: first order only, no second-order part, so under
  any update along the gradient (SGD, and also momentum or Adam when every gradient entry
  the law reads is zero) it stays constant up to rounding.
* :class:`NormScaleLaws` — ‖w_group‖² + ‖b_group‖² of the layer right before a normalization.
  The normalization's eps breaks the scale symmetry slightly, so these laws are
  **approximate**: ``approximate`` is True, ``kind`` is ``"approximate"``, they are never
  expected to be conserved exactly, and their first-order part (∝ eps) is what the monitor
  measures.

A *reader* is ``(qualified parameter name, fn)``. For :class:`LinearLaws`, ``fn(w)`` returns
one value per law (a 1-D tensor) and must be a selection or a sum of entries with coefficient
+1 (``b``, ``w.sum(0)``, ``w[idx]``), so that ``fn(|w|)`` is the natural size Σ|c_i θ_i| of the
law. For :class:`NormScaleLaws`, ``fn(w)`` returns one row per law (like the incoming readers
of :mod:`torch_conslaw.laws.forms`).

Example:
    >>> import torch
    >>> b = {"fc.bias": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    >>> laws = LinearLaws("fc.bias", (("fc.bias", lambda x: x),), b, producer="fc", consumer="bn",
    ...                   reason="bias before BatchNorm")
    >>> laws.values(b).tolist(), laws.second_order(b).tolist()
    ([1.0, -2.0], [0.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ..lawgroups import LawGroup

__all__ = ["DifferenceLaws", "InvariantScaleLaws", "LinearLaws", "NormScaleLaws"]

F64 = torch.float64
Reader = tuple[str, Callable[[Tensor], Tensor]]


class _StandaloneGroup(LawGroup):
    """A law group that is not built from a :class:`~torch_conslaw.structure.Pair`."""

    def __init__(
        self,
        name: str,
        readers: tuple[Reader, ...],
        *,
        producer: str,
        consumer: str,
        reason: str,
        expected_conserved: bool,
    ) -> None:
        self.pair = None  # type: ignore[assignment]
        self.name = name
        self.readers = tuple(readers)
        self._producer, self._consumer = producer, consumer
        self.expected_conserved = expected_conserved
        self.reason = reason
        self.parameter_names = tuple(dict.fromkeys(n for n, _ in self.readers))

    @property
    def producer(self) -> str:
        return self._producer

    @property
    def consumer(self) -> str:
        return self._consumer

    def labels(self) -> list[str]:
        return [f"{self.name}[{j}]" for j in range(self.count)]


class LinearLaws(_StandaloneGroup):
    """h = cᵀθ, one law per entry of the concatenated reader outputs; scale Σ|c_i θ_i|.

    ``loss`` names the one loss the laws hold for (``"cross_entropy"`` for the translation
    law; ``None``: every loss), ``class_axis`` the axis of the model output the loss reads
    the classes on (used to verify a loss-specific law). ``params`` sizes the group.
    """

    kind = "linear"

    def __init__(
        self,
        name: str,
        readers: tuple[Reader, ...],
        params: Mapping[str, Tensor],
        *,
        producer: str,
        consumer: str,
        reason: str,
        loss: str | None = None,
        class_axis: int = -1,
    ) -> None:
        super().__init__(
            name, readers, producer=producer, consumer=consumer, reason=reason, expected_conserved=True
        )
        self.loss = loss
        self.class_axis = class_axis
        with torch.no_grad():
            self.count = int(self.values(params).numel())

    def _default_reason(self) -> str:  # pragma: no cover - the reason is always given
        return "linear law"

    def values(self, params: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([fn(params[n].to(F64)).reshape(-1) for n, fn in self.readers])

    def first_order(self, before: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> Tensor:
        return self.values(delta)  # cᵀΔ, exactly the whole change

    def second_order(self, delta: Mapping[str, Tensor]) -> Tensor:
        first = self.readers[0][0]
        return torch.zeros(self.count, dtype=F64, device=delta[first].device)

    def bilinear(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
        raise TypeError(f"{self.name}: a linear law cᵀθ has no bilinear form; use first_order")

    def scale(self, params: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([fn(params[n].to(F64).abs()).reshape(-1) for n, fn in self.readers])


class NormScaleLaws(_StandaloneGroup):
    """Σ_readers ‖row_u‖² per law u: scale invariance of the layer before a normalization.

    Approximate: exact only at eps = 0 (``approximate`` True, ``kind`` ``"approximate"``,
    ``expected_conserved`` False).
    """

    kind = "approximate"
    approximate = True

    def __init__(
        self,
        name: str,
        readers: tuple[Reader, ...],
        params: Mapping[str, Tensor],
        *,
        producer: str,
        consumer: str,
        reason: str,
    ) -> None:
        super().__init__(
            name, readers, producer=producer, consumer=consumer, reason=reason, expected_conserved=False
        )
        with torch.no_grad():
            self.count = int(self.values(params).numel())

    def _default_reason(self) -> str:  # pragma: no cover - the reason is always given
        return "approximate scale law"

    def bilinear(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
        total: Tensor | None = None
        for n, fn in self.readers:
            xa = fn(a[n].to(F64))
            xb = xa if b is a else fn(b[n].to(F64))
            term = (xa * xb).reshape(xa.shape[0], -1).sum(1)
            total = term if total is None else total + term
        assert total is not None
        return total

    def scale(self, params: Mapping[str, Tensor]) -> Tensor:
        return self.values(params)


class InvariantScaleLaws(NormScaleLaws):
    """Σ_readers ‖row_u‖² per law u, **exact**: the model does not change when a row is
    scaled (the direction v of ``weight_norm``, the whole original of ``spectral_norm``), so
    the gradient is orthogonal to it and ‖row‖² is conserved by gradient flow; under SGD it
    grows by exactly η²‖g_row‖² per step (second order only)."""

    kind = "scale"
    approximate = False

    def __init__(self, name, readers, params, *, producer, consumer, reason) -> None:  # type: ignore[no-untyped-def]
        super().__init__(name, readers, params, producer=producer, consumer=consumer, reason=reason)
        self.expected_conserved = True


class DifferenceLaws(_StandaloneGroup):
    """h = a(θ) − b(θ), one law per entry: two parameters that always get the same gradient
    (two biases that are only ever added, like ``bias_ih`` and ``bias_hh`` of a recurrent
    layer) keep their difference under any update that depends on the gradient alone.

    ``plus`` and ``minus`` are readers (selections of entries, coefficient +1, as for
    :class:`LinearLaws`) returning one value per law. The change over a step is exactly
    a(Δ) − b(Δ) (first order only); the natural size is |a(θ)| + |b(θ)|.

    Example:
        >>> import torch
        >>> p = {"b1": torch.tensor([1.0, 2.0]), "b2": torch.tensor([0.5, 3.0])}
        >>> laws = DifferenceLaws("b1−b2", ("b1", lambda b: b), ("b2", lambda b: b), p,
        ...                       producer="rnn", consumer="rnn", reason="summed biases")
        >>> laws.values(p).tolist(), laws.scale(p).tolist()
        ([0.5, -1.0], [1.5, 5.0])
    """

    kind = "linear"

    def __init__(
        self,
        name: str,
        plus: Reader,
        minus: Reader,
        params: Mapping[str, Tensor],
        *,
        producer: str,
        consumer: str,
        reason: str,
    ) -> None:
        super().__init__(name, (plus, minus), producer=producer, consumer=consumer, reason=reason, expected_conserved=True)
        with torch.no_grad():
            self.count = int(self.values(params).numel())

    def _default_reason(self) -> str:  # pragma: no cover - the reason is always given
        return "difference law"

    def _sides(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        (a, fa), (b, fb) = self.readers
        return fa(params[a].to(F64)).reshape(-1), fb(params[b].to(F64)).reshape(-1)

    def values(self, params: Mapping[str, Tensor]) -> Tensor:
        a, b = self._sides(params)
        return a - b

    def first_order(self, before: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> Tensor:
        return self.values(delta)  # linear: the whole change

    def second_order(self, delta: Mapping[str, Tensor]) -> Tensor:
        return torch.zeros(self.count, dtype=F64, device=delta[self.readers[0][0]].device)

    def bilinear(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
        raise TypeError(f"{self.name}: a linear law has no bilinear form; use first_order")

    def scale(self, params: Mapping[str, Tensor]) -> Tensor:
        a, b = self._sides(params)
        return a.abs() + b.abs()
