"""Registration tables: which layers carry laws and which ops keep the rescaling symmetry.

Four tables drive the structure finder (:mod:`torch_conslaw.structure`):

* **layers** — module type → :class:`LayerSpec`: how many units it produces and consumes, on
  which axis, and how to read its *incoming* rows (one per unit, bias appended) and its
  *outgoing* rows (every weight that reads a unit), following the layout of
  :mod:`torch_conslaw.laws`. Normalization layers with affine parameters (BatchNorm1d/2d/3d,
  SyncBatchNorm, InstanceNorm1d/2d/3d, GroupNorm, LayerNorm and RMSNorm over one axis) are
  *producers only*: unit c leaves them
  as γ_c · normalized_c + β_c, so (γ_c, β_c) are its incoming weights, but they renormalize
  what comes in, so no law ends at them;
* **activations** — module type, function or tensor-method name → :class:`ActivationSpec`
  with the homogeneity degree k (σ(cz) = c^k σ(z) for c > 0), or ``None`` when σ is not
  positively homogeneous (the laws break, SCIENCE.md §5);
* **pass-through ops** — dropout, pooling, flatten: they keep per-unit rescaling; only the
  linear ones (average pooling, flatten, identity) also keep the channel mixing of the matrix law;
* **internal laws** — module type → function giving the matrix laws a module carries *inside*
  itself (:class:`InternalLaw`, :func:`register_internal_laws`): ``nn.MultiheadAttention``
  conserves, per head h, Q̃_h Q̃_hᵀ − K̃_h K̃_hᵀ and Ṽ_h Ṽ_hᵀ − W_O,hᵀ W_O,h. No law crosses
  such a module.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class ReLU2(nn.Module):
    ...     def forward(self, x):
    ...         return torch.relu(x) ** 2
    >>> register_activation(ReLU2, degree=2)
    >>> activation_spec(ReLU2()).degree
    2.0
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ActivationSpec",
    "LayerSpec",
    "PassSpec",
    "RowReader",
    "register_activation",
    "register_layer",
    "activation_spec",
    "layer_spec",
    "pass_spec",
    "barrier_reason",
    "is_catalogued_module",
    "InternalLaw",
    "register_internal_laws",
    "internal_laws_spec",
    "user_registrations",
    "scoped_registrations",
]

Axis = Literal["last", "channel"]
RowReader = tuple[str, Callable[[Tensor], Tensor]]
"""(parameter attribute name, map from that parameter to rows: one row per unit)."""


@dataclass(frozen=True)
class ActivationSpec:
    """An activation: ``degree`` k of positive homogeneity, or ``None`` if σ is not homogeneous.

    ``linear`` marks the identity, which also keeps the matrix law of linear hidden layers.
    """

    name: str
    degree: float | None
    linear: bool = False


@dataclass(frozen=True)
class PassSpec:
    """An op between two layers that keeps per-unit rescaling.

    ``mixing`` — it also commutes with an invertible mixing of the units (linear ops), so the
    matrix law of a linear hidden layer survives it. ``spatial`` — it acts on the spatial
    axes only (pooling): fine after a convolution, but it mixes units after a ``Linear``.
    """

    name: str
    kind: Literal["dropout", "maxpool", "avgpool", "flatten", "identity"]
    mixing: bool
    spatial: bool = False


@dataclass(frozen=True)
class LayerSpec:
    """How to read a parametrized layer as the incoming or the outgoing side of a unit group.

    * ``out_units(m)`` / ``in_units(m)`` — units produced / consumed;
    * ``out_axis`` / ``in_axis`` — ``"last"`` (features on the last axis, like ``Linear``)
      or ``"channel"`` (axis 1, like convolutions);
    * ``incoming(m)`` — readers giving one row per produced unit (bias as its own reader);
    * ``incoming`` may raise ``ValueError`` with the reason when the layer has no incoming
      weights to read (a normalization with ``affine=False``); the reason is a phrase that
      follows the layer's name (``"has no affine parameters (affine=False): ..."``);
    * ``outgoing(m, positions)`` — readers giving one row per consumed unit, where each unit
      spans ``positions`` consecutive input columns (``> 1`` after a flatten); raise
      ``ValueError`` with the reason when the layer cannot be read this way;
    * ``diagonal`` — each unit is produced by its own scale (and shift) parameters, like the
      affine part of a normalization: only per-unit rescalings are symmetries, so a linear
      hidden layer after it keeps one law per unit, not the matrix law;
    * ``flat_input`` — ``out_axis`` is ``"channel"`` but the layer also takes an ``(N, C)``
      input, whose channel axis is the last one (BatchNorm1d, GroupNorm): the finder uses
      the input rank it recorded, and without one it reads the units as features for a
      consumer of the last axis and as channels for a convolution;
    * ``barrier(m, display)`` — set for layers that never *consume* units (normalizations):
      why no law crosses them, given the display name of ``m``;
    * ``input_outgoing(m, positions, arg)`` — for a layer with several tensor inputs that is
      linear in each (``nn.Bilinear``): ``(units, readers)`` of the units arriving on input
      ``arg`` (replaces ``in_units`` / ``outgoing``); raise ``ValueError`` with the reason.
    """

    name: str
    out_units: Callable[[nn.Module], int]
    in_units: Callable[[nn.Module], int]
    out_axis: Axis
    in_axis: Axis
    incoming: Callable[[nn.Module], list[RowReader]]
    outgoing: Callable[[nn.Module, int], list[RowReader]]
    diagonal: bool = False
    flat_input: bool = False
    barrier: Callable[[nn.Module, str], str] | None = None
    input_outgoing: Callable[[nn.Module, int, int], tuple[int, list[RowReader]]] | None = None


@dataclass(frozen=True)
class InternalLaw:
    """A matrix law a module carries inside itself: the upper triangle of
    I Iᵀ − O Oᵀ, with I (``units`` rows) from the ``incoming`` readers and O from the
    ``outgoing`` readers, concatenated column-wise (the layout of :class:`~torch_conslaw.lawgroups.MatrixLaws`).

    ``label`` follows the module path in the group name (``"h0 q·k"`` → ``attn.h0 q·k``);
    reader attribute names are relative to the module (``"out_proj.weight"``); ``reason`` says
    which symmetry conserves the law. The module's forward alone must keep the symmetry, so a
    module called several times keeps its laws; frozen or shared parameters still skip them.
    """

    label: str
    units: int
    incoming: tuple[RowReader, ...]
    outgoing: tuple[RowReader, ...]
    reason: str


_LAYERS: dict[type, LayerSpec] = {}
_INTERNAL: dict[type, Callable[[nn.Module], list[InternalLaw]]] = {}
_ACT_MODULES: dict[type, ActivationSpec] = {}
_ACT_FUNCTIONS: dict[Any, ActivationSpec] = {}
_ACT_METHODS: dict[str, ActivationSpec] = {}
_PASS_MODULES: dict[type, PassSpec] = {}
_PASS_FUNCTIONS: dict[Any, PassSpec] = {}
_PASS_METHODS: dict[str, PassSpec] = {}


def register_activation(
    target: type[nn.Module] | Callable[..., Any] | str,
    degree: float | None,
    *,
    name: str | None = None,
    linear: bool = False,
) -> None:
    """Declare an activation and its degree of positive homogeneity (``None``: not homogeneous).

    ``target`` is a module class, a function (``torch.relu``) or a tensor-method name
    (``"relu"``). A degree-k activation gives the per-unit law ‖w_in‖² + b² − k‖w_out‖².

    Example:
        >>> import torch
        >>> register_activation(torch.square, degree=2, name="square")
    """
    if degree is not None:
        if isinstance(degree, bool) or not isinstance(degree, (int, float)):
            raise TypeError(
                f"register_activation: degree must be a number or None, got {type(degree).__name__}"
            )
        if not (math.isfinite(degree) and degree > 0):
            raise ValueError(
                "register_activation: degree must be a positive finite number k with "
                f"σ(cz) = c^k σ(z) for c > 0, or None for a non-homogeneous activation; got {degree}"
            )
        degree = float(degree)
    spec = ActivationSpec(name or _target_name(target), degree, linear)
    if isinstance(target, str):
        _ACT_METHODS[target] = spec
    elif isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"register_activation: {target.__name__} is not an nn.Module subclass")
        _ACT_MODULES[target] = spec
    elif callable(target):
        _ACT_FUNCTIONS[target] = spec
    else:
        raise TypeError(
            "register_activation: target must be an nn.Module class, a function or a tensor "
            f"method name, got {target!r}"
        )


def register_layer(
    layer_type: type[nn.Module],
    *,
    out_units: Callable[[nn.Module], int],
    in_units: Callable[[nn.Module], int],
    incoming: Callable[[nn.Module], list[RowReader]],
    outgoing: Callable[[nn.Module, int], list[RowReader]],
    out_axis: Axis = "last",
    in_axis: Axis = "last",
    name: str | None = None,
    diagonal: bool = False,
    flat_input: bool = False,
    barrier: Callable[[nn.Module, str], str] | None = None,
    input_outgoing: Callable[[nn.Module, int, int], tuple[int, list[RowReader]]] | None = None,
) -> None:
    """Declare a parametrized layer type; see :class:`LayerSpec` for the meaning of each field.

    Example:
        >>> from torch import nn
        >>> class Dense(nn.Linear):
        ...     pass
        >>> register_layer(Dense, out_units=lambda m: m.out_features,
        ...                in_units=lambda m: m.in_features,
        ...                incoming=lambda m: [("weight", lambda w: w)],
        ...                outgoing=lambda m, positions: [("weight", lambda w: w.T)])
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"register_layer: layer_type must be an nn.Module class, got {layer_type!r}")
    for axis_name, axis in (("out_axis", out_axis), ("in_axis", in_axis)):
        if axis not in ("last", "channel"):
            raise ValueError(f"register_layer: {axis_name} must be 'last' or 'channel', got {axis!r}")
    _LAYERS[layer_type] = LayerSpec(
        name or layer_type.__name__, out_units, in_units, out_axis, in_axis, incoming, outgoing,
        diagonal, flat_input, barrier, input_outgoing,
    )


def register_internal_laws(
    module_type: type[nn.Module], laws: Callable[[nn.Module], list[InternalLaw]]
) -> None:
    """Declare that modules of ``module_type`` (and subclasses) carry internal laws:
    ``laws(module)`` returns its :class:`InternalLaw` list, or raises ``ValueError`` with the
    reason (a phrase following the module's name) when it has none that can be tracked.
    Such a module is a leaf for the structure finder and no law crosses it.

    Example:
        >>> from torch import nn
        >>> class Bilinear(nn.Module):  # y = x aᵀ b keeps a → G a, b → G⁻ᵀ b
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(2, 3))
        ...     def forward(self, x):
        ...         return (x @ self.a.T) @ self.b
        >>> register_internal_laws(Bilinear, lambda m: [InternalLaw(
        ...     "a·b", 2, (("a", lambda w: w),), (("b", lambda w: w),), "a → G a, b → G⁻ᵀ b")])
        >>> internal_laws_spec(Bilinear()) is not None
        True
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_internal_laws: module_type must be an nn.Module class, got {module_type!r}")
    if not callable(laws):
        raise TypeError(f"register_internal_laws: laws must be callable, got {laws!r}")
    _INTERNAL[module_type] = laws


_USER_TABLES = ("_LAYERS", "_INTERNAL", "_ACT_MODULES", "_ACT_FUNCTIONS", "_ACT_METHODS")


def user_registrations() -> list[str]:
    """The entries of the layer, internal-law and activation tables that are not the built-in
    ones (added or replaced by ``register_*`` after import), e.g. ``['mul']``.

    The monitor warns when such entries exist and it cannot verify the laws (no example
    input): a wrong registration is only caught by the numerical check.

    Example:
        >>> isinstance(user_registrations(), list)
        True
    """
    out = []
    for table_name in _USER_TABLES:
        builtin = _BUILTIN_ENTRIES[table_name]
        for key, value in globals()[table_name].items():
            if key not in builtin or builtin[key] is not value:
                out.append(_target_name(key))
    return out


_ALL_TABLES = (*_USER_TABLES, "_PASS_MODULES", "_PASS_FUNCTIONS", "_PASS_METHODS")


@contextlib.contextmanager
def scoped_registrations() -> Iterator[None]:
    """Undo every ``register_*`` made inside the block when it exits (tests, experiments).

    Example:
        >>> import torch
        >>> with scoped_registrations():
        ...     register_activation(torch.nn.Softplus, degree=1)
        ...     "Softplus" in user_registrations()
        True
        >>> "Softplus" in user_registrations()
        False
    """
    saved = {name: dict(globals()[name]) for name in _ALL_TABLES}
    try:
        yield
    finally:
        for name, table in saved.items():
            globals()[name].clear()
            globals()[name].update(table)


def internal_laws_spec(module: nn.Module) -> Callable[[nn.Module], list[InternalLaw]] | None:
    """The registered internal-law function of a module (or of its closest base class)."""
    return _mro_lookup(_INTERNAL, module)


def _register_pass(targets: list[Any], spec: PassSpec) -> None:
    for target in targets:
        if isinstance(target, str):
            _PASS_METHODS[target] = spec
        elif isinstance(target, type):
            _PASS_MODULES[target] = spec
        else:
            _PASS_FUNCTIONS[target] = spec


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", type(target).__name__)


def _mro_lookup(table: dict[type, Any], module: nn.Module) -> Any:
    """The entry of the module's class or of its closest registered base, unless a class in
    between defines its own ``forward``: it computes something of its own (Nemotron's
    ``LayerNorm1P`` is an ``nn.LayerNorm`` that passes ``weight + 1``), which the base's entry
    does not describe; the op graph reads what it computes instead."""
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
        if "forward" in vars(cls):
            return None
    return None


def overridden_layer(module: nn.Module) -> type | None:
    """The registered layer class that ``module``'s class derives from while defining its own
    ``forward`` in between (so :func:`layer_spec` gives it no entry), or ``None``.

    Example:
        >>> class Shifted(nn.LayerNorm):
        ...     def forward(self, x):
        ...         return nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias)
        >>> overridden_layer(Shifted(3)).__name__, overridden_layer(nn.LayerNorm(3))
        ('LayerNorm', None)
    """
    own = None
    for cls in type(module).__mro__:
        if cls in _LAYERS:
            return cls if own is not None else None
        if own is None and "forward" in vars(cls):
            own = cls
    return None


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The registered :class:`LayerSpec` of a module (or of its closest base class)."""
    return _mro_lookup(_LAYERS, module)


def activation_spec(target: Any) -> ActivationSpec | None:
    """The :class:`ActivationSpec` of a module instance, function or tensor-method name."""
    if isinstance(target, nn.Module):
        return _mro_lookup(_ACT_MODULES, target)
    if isinstance(target, str):
        return _ACT_METHODS.get(target)
    try:
        return _ACT_FUNCTIONS.get(target)
    except TypeError:  # unhashable callables are never registered
        return None


def pass_spec(target: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> PassSpec | None:
    """The :class:`PassSpec` of a module, function or method name, given its call arguments.

    Flattening counts only when it keeps the batch axis and flattens everything after it
    (``flatten(1)``, ``nn.Flatten()``, ``x.view(x.size(0), -1)``).
    """
    kwargs = kwargs or {}
    if isinstance(target, nn.Module):
        spec = _mro_lookup(_PASS_MODULES, target)
        if spec is not None and spec.kind == "flatten":
            if not (target.start_dim == 1 and target.end_dim == -1):
                return None
        return spec
    try:
        spec = _PASS_METHODS.get(target) if isinstance(target, str) else _PASS_FUNCTIONS.get(target)
    except TypeError:
        return None
    if spec is None or spec.kind != "flatten":
        return spec
    if target in ("view", "reshape"):
        shape = args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return spec if len(shape) == 2 and shape[1] == -1 and shape[0] != -1 else None
    start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
    end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
    return spec if start == 1 and end == -1 else None


_RMS_NORM: type[nn.Module] | None = getattr(nn, "RMSNorm", None)  # torch >= 2.4
_NORMS = tuple(
    t
    for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, _RMS_NORM)
    if t is not None
)
_NORM_FUNCTIONS = {
    f
    for f in (F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.normalize, getattr(F, "rms_norm", None))
    if f is not None
}
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__", "__radd__"}


UNKNOWN_OP = "is not in the catalogue of symmetry-preserving ops"  # marks a skip at an unknown op
NOT_FOLLOWED = "the finder does not follow"  # marks a skip at a reshape or an indexing op
PRODUCT_OP = "multiplies tensors"  # marks a skip at a product of two tensors
STOPS_THE_OP_GRAPH_FOLLOWS = (UNKNOWN_OP, NOT_FOLLOWED, PRODUCT_OP)
"""Markers of module-level skips at ops that the op-graph rules follow (their reasons replace these)."""


def barrier_reason(target: Any, display: str) -> str:
    """Why the op ``display`` (a module, function or method) blocks the laws across it."""
    if isinstance(target, nn.Module) and internal_laws_spec(target) is not None:
        kind = type(target).__name__
        named = display if display == kind or display.endswith(f"({kind})") else f"{display} ({kind})"
        return (
            f"{named} is not a per-unit symmetry-preserving op, so no law crosses it "
            "(its internal laws are tracked separately)"
        )
    if isinstance(target, nn.Module) and isinstance(target, _NORMS):
        kind = type(target).__name__
        named = display if display == kind or display.endswith(f"({kind})") else f"{display} ({kind})"
        if isinstance(target, nn.modules.batchnorm._BatchNorm) and not target.training and target.running_var is not None:
            # eval mode: no renormalization, γ_c (x − μ_c) / σ_c + β_c with the running statistics
            return (
                f"{named} is in eval mode: a fixed affine map per channel with its running statistics, "
                "γ_c (x − μ_c) / σ_c + β_c; scaling a channel's incoming weights by c and γ_c by 1/c "
                "keeps it only while the running mean μ_c is zero, and no law across it is tracked"
            )
        return f"{named} renormalizes the units, so the rescaling law does not hold across it"
    try:
        if target in _NORM_FUNCTIONS:
            return f"{display} renormalizes the units, so the rescaling law does not hold across it"
        if target in _ADDS:
            return f"{display} is an addition (a residual or skip connection): no law crosses it"
        # --- skip reasons that name the op and the broken symmetry (issue 8) ----------------
        if target in _PRODUCTS:
            return (
                f"{display} {PRODUCT_OP} (a product, not an activation): scaling a unit by c "
                "scales the product by c times whatever scales the other factor (c² for h·h, c for "
                "h·g(x)), so no per-unit rescaling law is known across it"
            )
        if target in _RESHAPES:
            return (
                f"{display} reshapes or permutes the tensor in a way {NOT_FOLLOWED} "
                "(only flatten(1) / view(N, -1) of whole channels is followed), so it cannot tell "
                "which entries belong to which unit: no law crosses it"
            )
        if target in _REDUCTIONS:
            return (
                f"{display} reduces over axes (a reduction, not an elementwise activation), so the "
                "units do not reach a layer one by one: no law crosses it"
            )
        if target in _INDEXING:
            return (
                f"{display} selects entries (indexing / gather), which {NOT_FOLLOWED} "
                "as a map of the units: no law crosses it"
            )
    except TypeError:
        pass
    if isinstance(target, nn.Module) and any(True for _ in target.parameters()):
        kind = type(target).__name__
        named = display if display == kind or display.endswith(f"({kind})") else f"{display} ({kind})"
        return (
            f"{named} has parameters but is not a registered layer, so the finder does not know "
            "how it maps the units and no law crosses it; if it computes a linear map of its "
            "input, describe it with torch_conslaw.register_layer"
        )
    return (
        f"{display} {UNKNOWN_OP}, so the finder cannot tell whether it keeps the "
        "per-unit rescaling: no law crosses it. Only an elementwise function σ of each unit "
        "alone with σ(cz) = c^k σ(z) for c > 0 may be declared with "
        "torch_conslaw.register_activation(..., degree=k); the monitor checks every "
        "declaration numerically on example_input"
    )


_PRODUCTS = {
    operator.mul, operator.imul, operator.matmul, operator.truediv, torch.mul, torch.matmul,
    torch.bmm, torch.mm, torch.einsum, torch.div, torch.baddbmm, F.scaled_dot_product_attention,
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "matmul", "__matmul__", "bmm", "mm",
    "div", "div_", "__truediv__", "einsum",
}
_RESHAPES = {
    torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.split, torch.chunk,
    torch.squeeze, torch.unsqueeze, torch.movedim, torch.swapaxes, torch.t, torch.cat,
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "contiguous", "split",
    "chunk", "squeeze", "unsqueeze", "expand", "t", "movedim", "swapaxes", "view_as",
}
_REDUCTIONS = {
    torch.sum, torch.mean, torch.amax, torch.amin, torch.max, torch.min, torch.norm, torch.logsumexp,
    torch.prod, "sum", "mean", "amax", "amin", "max", "min", "norm", "logsumexp", "prod",
}
_INDEXING = {operator.getitem, torch.gather, torch.index_select, "__getitem__", "gather", "index_select"}


def is_catalogued_module(module: nn.Module) -> bool:
    """True when the module is a registered layer, activation, pass-through op or module with
    internal laws (a leaf)."""
    return any(
        _mro_lookup(table, module) is not None
        for table in (_LAYERS, _ACT_MODULES, _PASS_MODULES, _INTERNAL)
    )


# ---------------------------------------------------------------------------------------------
# Built-in entries
# ---------------------------------------------------------------------------------------------


def _with_bias(module: nn.Module, weight_rows: Callable[[Tensor], Tensor]) -> list[RowReader]:
    readers: list[RowReader] = [("weight", weight_rows)]
    if getattr(module, "bias", None) is not None:
        readers.append(("bias", lambda b: b.unsqueeze(1)))
    return readers


def _linear_outgoing(module: nn.Module, positions: int) -> list[RowReader]:
    if positions == 1:
        return [("weight", lambda w: w.T)]

    def rows(w: Tensor) -> Tensor:  # columns c*P .. (c+1)*P-1 belong to unit c
        return w.reshape(w.shape[0], -1, positions).transpose(0, 1).reshape(-1, w.shape[0] * positions)

    return [("weight", rows)]


def _grouped_rows(groups: int) -> Callable[[Tensor], Tensor]:
    """Rows of a weight ``(A, B/groups, *kernel)`` indexed by the B axis: entry (G·b_g + j)
    holds ``w[G·a_g:(G+1)·a_g, j]`` (group G, a_g = A/groups), the weights that touch channel
    G·b_g + j of the B side (for ``groups == 1``, ``w[:, j]``)."""

    def rows(w: Tensor) -> Tensor:
        a_g, b_g = w.shape[0] // groups, w.shape[1]
        return w.reshape(groups, a_g, b_g, -1).transpose(1, 2).reshape(groups * b_g, -1)

    return rows


def _conv_outgoing(module: nn.Module, positions: int) -> list[RowReader]:
    """Weight ``(out, in/groups, *k)``: input channel c is read by the out channels of its group."""
    if positions != 1:
        raise ValueError("a convolution cannot consume a flattened tensor")
    return [("weight", _grouped_rows(module.groups))]


def _conv_transpose_incoming(module: nn.Module) -> list[RowReader]:
    """Weight ``(in, out/groups, *k)``: output channel o is written by the in channels of its group."""
    return _with_bias(module, _grouped_rows(module.groups))


def _conv_transpose_outgoing(module: nn.Module, positions: int) -> list[RowReader]:
    """Input channel c is read by ``weight[c]`` (all out channels of its group)."""
    if positions != 1:
        raise ValueError("a transposed convolution cannot consume a flattened tensor")
    return [("weight", lambda w: w.flatten(1))]


def _norm_units(module: nn.Module) -> int:
    """Units of a normalization: its channels, or the size of its one normalized axis."""
    for attr in ("num_features", "num_channels"):  # BatchNorm*, GroupNorm
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return int(module.normalized_shape[-1])  # LayerNorm, RMSNorm


def _norm_incoming(module: nn.Module) -> list[RowReader]:
    """γ (and β) of a normalization, one row per unit: its affine part is the unit's producer."""
    if getattr(module, "weight", None) is None:
        flag = "elementwise_affine" if hasattr(module, "normalized_shape") else "affine"
        raise ValueError(f"has no affine parameters ({flag}=False): no law goes through it")
    shape = tuple(getattr(module, "normalized_shape", ()))
    if len(shape) > 1:
        raise ValueError(
            f"normalizes over {len(shape)} axes (normalized_shape={shape}): its affine "
            "parameters are one per element, not one per unit of one axis, so no law goes "
            "through it (not supported)"
        )
    return _with_bias(module, lambda g: g.unsqueeze(1))


def _norm_outgoing(module: nn.Module, positions: int) -> list[RowReader]:
    raise ValueError(barrier_reason(module, type(module).__name__))


def _register_norm(norm: type[nn.Module], axis: Axis, flat_input: bool) -> None:
    register_layer(
        norm,
        out_units=_norm_units,
        in_units=_norm_units,
        incoming=_norm_incoming,
        outgoing=_norm_outgoing,
        out_axis=axis,
        in_axis=axis,
        diagonal=True,
        flat_input=flat_input,
        barrier=barrier_reason,
    )


register_layer(
    nn.Linear,
    out_units=lambda m: m.out_features,
    in_units=lambda m: m.in_features,
    incoming=lambda m: _with_bias(m, lambda w: w),
    outgoing=_linear_outgoing,
)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(
        _conv,
        out_units=lambda m: m.out_channels,
        in_units=lambda m: m.in_channels,
        incoming=lambda m: _with_bias(m, lambda w: w.flatten(1)),
        outgoing=_conv_outgoing,
        out_axis="channel",
        in_axis="channel",
    )

for _conv in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(
        _conv,
        out_units=lambda m: m.out_channels,
        in_units=lambda m: m.in_channels,
        incoming=_conv_transpose_incoming,
        outgoing=_conv_transpose_outgoing,
        out_axis="channel",
        in_axis="channel",
    )

def _bilinear_outgoing(module: nn.Module, positions: int) -> list[RowReader]:
    raise ValueError(
        "nn.Bilinear reads two inputs, and a unit of one of them is read by a slice of its weight "
        "that depends on which input it arrives at (the finder could not tell which)"
    )


def _bilinear_input_outgoing(module: nn.Module, positions: int, arg: int) -> tuple[int, list[RowReader]]:
    """y_k = x1ᵀ A_k x2 + b_k is linear in each input: unit i of x1 is read by A[:, i, :], unit
    j of x2 by A[:, :, j]."""
    if positions != 1:
        raise ValueError("nn.Bilinear cannot consume a flattened tensor")
    if arg == 0:
        return int(module.in1_features), [("weight", lambda w: w.transpose(0, 1).flatten(1))]
    if arg == 1:
        return int(module.in2_features), [("weight", lambda w: w.permute(2, 0, 1).flatten(1))]
    raise ValueError(f"nn.Bilinear has two inputs, not an input {arg}")


# y_k = x1ᵀ A_k x2 + b_k: output unit k is produced by A_k (weight[k]) and b_k alone, so scaling
# them by λ scales unit k by λ (a producer like Linear); as a consumer it is linear in each input.
register_layer(
    nn.Bilinear,
    out_units=lambda m: m.out_features,
    in_units=lambda m: m.in1_features,
    incoming=lambda m: _with_bias(m, lambda w: w.flatten(1)),
    outgoing=_bilinear_outgoing,
    input_outgoing=_bilinear_input_outgoing,
)


def _embedding_incoming(module: nn.Module) -> list[RowReader]:
    """``nn.Embedding`` is ``one_hot(ids) @ E``, a Linear layer with weight Eᵀ and no bias: unit
    (feature) j is produced by column j of E. Options whose gradient is not the gradient of that
    map break the laws, so they are refused."""
    for attr, why in (
        ("padding_idx", "its padding row gets no gradient although the forward reads it"),
        ("max_norm", "the forward renormalizes the rows it reads, in place"),
    ):
        if getattr(module, attr, None) is not None:
            raise ValueError(f"has {attr}={getattr(module, attr)}: {why}, so no rescaling law starts at it")
    if getattr(module, "scale_grad_by_freq", False):
        raise ValueError("has scale_grad_by_freq=True: its gradient is rescaled per token, so no rescaling law starts at it")
    return [("weight", lambda w: w.T)]


def _embedding_outgoing(module: nn.Module, positions: int) -> list[RowReader]:
    raise ValueError("an embedding takes token indices, not units")


register_layer(
    nn.Embedding,
    out_units=lambda m: m.embedding_dim,
    in_units=lambda m: m.num_embeddings,
    incoming=_embedding_incoming,
    outgoing=_embedding_outgoing,
)

_register_norm(nn.BatchNorm1d, "channel", flat_input=True)  # (N, C) or (N, C, L)
_register_norm(nn.BatchNorm2d, "channel", flat_input=False)
_register_norm(nn.BatchNorm3d, "channel", flat_input=False)
_register_norm(nn.GroupNorm, "channel", flat_input=True)  # (N, C, *)
_register_norm(nn.SyncBatchNorm, "channel", flat_input=True)  # (N, C) or (N, C, *)
for _norm in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):  # affine=True only
    _register_norm(_norm, "channel", flat_input=False)
_register_norm(nn.LayerNorm, "last", flat_input=False)
if _RMS_NORM is not None:
    _register_norm(_RMS_NORM, "last", flat_input=False)

for _target, _name in ((nn.ReLU, "ReLU"), (nn.LeakyReLU, "LeakyReLU"), (nn.PReLU, "PReLU")):
    register_activation(_target, 1, name=_name)
for _target in (F.relu, torch.relu, F.relu_, torch.relu_, "relu", "relu_"):
    register_activation(_target, 1, name="relu")
for _target in (F.leaky_relu, F.leaky_relu_, "leaky_relu"):
    register_activation(_target, 1, name="leaky_relu")
register_activation(F.prelu, 1, name="prelu")
register_activation(nn.Identity, 1, name="Identity", linear=True)
for _target in (
    nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish,
    nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.LogSigmoid,
    nn.Tanhshrink, nn.Softmax, nn.LogSoftmax, nn.GLU,
):
    register_activation(_target, None)
for _target in (
    F.gelu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.silu, F.elu, F.selu, F.celu,
    F.softplus, F.mish, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.softsign,
    F.logsigmoid, F.softmax, F.log_softmax, F.glu, torch.softmax, torch.exp, torch.sin,
    "tanh", "tanh_", "sigmoid", "sigmoid_", "softmax", "log_softmax", "exp", "sin",
):
    register_activation(_target, None, name=_target if isinstance(_target, str) else None)

_register_pass(
    [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, F.dropout, F.dropout1d, F.dropout2d,
     F.dropout3d, torch.dropout],
    PassSpec("dropout", "dropout", mixing=False),
)
_register_pass(
    [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
     nn.AdaptiveMaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
     F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.max_pool1d, torch.max_pool2d,
     torch.max_pool3d],
    PassSpec("max pooling", "maxpool", mixing=False, spatial=True),
)
_register_pass(
    [nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
     nn.AdaptiveAvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
     F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.avg_pool1d, torch.adaptive_avg_pool1d],
    PassSpec("average pooling", "avgpool", mixing=True, spatial=True),
)
_register_pass([nn.Flatten, torch.flatten, "flatten", "view", "reshape"], PassSpec("flatten", "flatten", mixing=True))


def _mha_laws(m: nn.Module) -> list[InternalLaw]:
    """Per head h of ``nn.MultiheadAttention`` (head dim d): the scores X̃ Q̃_hᵀ K̃_h Ỹᵀ keep
    Q̃_h → A Q̃_h, K̃_h → A⁻ᵀ K̃_h and the head output keeps Ṽ_h → A Ṽ_h, W_O,h → W_O,h A⁻¹
    (A invertible, d × d), so gradient flow conserves Q̃_h Q̃_hᵀ − K̃_h K̃_hᵀ and
    Ṽ_h Ṽ_hᵀ − W_O,hᵀ W_O,h. Q̃_h = [W_Q,h | b_Q,h] (rows of ``in_proj_weight`` or
    ``q_proj_weight``, and of ``in_proj_bias``); ``bias_k`` / ``bias_v`` (``add_bias_kv``) are
    an extra key / value that transform with K̃_h / Ṽ_h, so they are one more column of them;
    ``add_zero_attn`` appends zeros, which every A keeps."""
    E, H = int(m.embed_dim), int(m.num_heads)
    d = E // H
    path_q, path_k, path_v, base = (
        ("in_proj_weight",) * 3 + ((0, E, 2 * E),)
        if m._qkv_same_embed_dim
        else ("q_proj_weight", "k_proj_weight", "v_proj_weight", (0, 0, 0))
    )

    def rows(start: int) -> Callable[[Tensor], Tensor]:
        return lambda w: w[start : start + d]

    def column(start: int) -> Callable[[Tensor], Tensor]:
        return lambda b: b.reshape(-1)[start : start + d].unsqueeze(1)

    def out_rows(start: int) -> Callable[[Tensor], Tensor]:
        return lambda w: w[:, start : start + d].T

    laws: list[InternalLaw] = []
    for h in range(H):
        s = h * d
        side: dict[str, list[RowReader]] = {}
        for key, name, off in zip("qkv", (path_q, path_k, path_v), base):
            side[key] = [(name, rows(off + s))]
            if m.in_proj_bias is not None:
                side[key].append(("in_proj_bias", column({"q": 0, "k": E, "v": 2 * E}[key] + s)))
        if getattr(m, "bias_k", None) is not None:
            side["k"].append(("bias_k", column(s)))
        if getattr(m, "bias_v", None) is not None:
            side["v"].append(("bias_v", column(s)))
        extra_k = " and bias_k" if getattr(m, "bias_k", None) is not None else ""
        extra_v = " and bias_v" if getattr(m, "bias_v", None) is not None else ""
        laws.append(InternalLaw(
            f"h{h} q·k", d, tuple(side["q"]), tuple(side["k"]),
            f"attention scores of head {h} keep Q̃ → A Q̃, K̃ → A⁻ᵀ K̃ (A invertible {d}×{d}, "
            f"K̃ with its bias{extra_k}): Q̃Q̃ᵀ − K̃K̃ᵀ, matrix law (upper triangle)",
        ))
        laws.append(InternalLaw(
            f"h{h} v·o", d, tuple(side["v"]), (("out_proj.weight", out_rows(s)),),
            f"output of head {h} keeps Ṽ → A Ṽ, W_O → W_O A⁻¹ (A invertible {d}×{d}, Ṽ with "
            f"its bias{extra_v}): ṼṼᵀ − W_OᵀW_O, matrix law (upper triangle)",
        ))
    return laws


register_internal_laws(nn.MultiheadAttention, _mha_laws)
# the built-in entries, to tell the user's registrations apart (see user_registrations)
_BUILTIN_ENTRIES = {name: dict(globals()[name]) for name in _USER_TABLES}
