"""The number of conservation laws of any ``nn.Module`` on given inputs (SCIENCE.md §9).

For inputs x_1..x_N, every loss and every target drive gradient flow with fields in
W(θ) = span{∂_θ⟨u, f(θ, x_i)⟩}. :class:`ModuleGenerators` is that generator family: a key is
an output cotangent u over the whole batch, a field is a vjp of ``torch.func.functional_call``,
a bracket a jvp of vjps, and the Gram operator v ↦ Jᵀ(J v) (one jvp and one vjp over the batch)
gives the matrix-free complement of W_1(θ) at scale. :func:`count_laws` runs the level loop of
:mod:`torch_conslaw.lie.engine` on it and returns D − dim Lie(W)(θ) with its evidence.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(256, 3, generator=torch.Generator().manual_seed(0))
    >>> count_laws(net, x, theta="random").n_laws  # one law per hidden ReLU unit
    4
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from .elementary import EPS_ATTRIBUTES, ActivationRecorder, ConstantUnits, ElementaryOps
from .engine import LieResult, RankGapWarning, lie_trace
from .flows import flow_point, with_flow
from .generators import DTYPE
from .gram import ExactBlock
from .kronecker import input_patches, kronecker_blocks, kronecker_preconditioner, layer_calls
from .numerics import DEFAULT_RTOL
from ..nested import leaves

__all__ = ["count_laws", "ModuleLieResult", "ModuleGenerators", "ParameterSlot", "CountBudgetError", "map_rows"]

EPS_WELL_CONDITIONED = 1.0
"""The eps at which exact laws are recounted when the model's own eps blurs the rank gaps."""

RANDOM_DRAWS = 32
"""``theta="random"``: draws tried until no ReLU-like unit is dead or always active on the inputs."""

WORK_BYTES = 2e9
"""Default memory for the batched jvp/vjp work arrays (``max_memory_gb`` scales it)."""


class CountBudgetError(RuntimeError):
    """The count would exceed the time or memory budget given to :func:`count_laws`."""


UNBATCHABLE = (
    "Batching rule not implemented",
    "output dynamic shape",
    "differently shaped Tensor",
    "calling .item() on a Tensor",
    "data-dependent control flow",
    "inplace arithmetic",
    "doesn't match the broadcast shape",
)
"""Messages of ``torch.func.vmap`` for a model that cannot be evaluated as one stack (an op
without a batching rule, a shape or a branch that depends on the values: an MoE router's
``nonzero`` / ``where`` dispatch, ``.item()``, ``if x.any():``; an in-place write of a value
that depends on θ into a tensor made inside the forward, ``out = torch.zeros(...); out += f(x)``,
which vmap cannot batch). Row by row, a model with a real shape error raises it again. Random
ops are not among them: a model that draws numbers is refused, not looped."""


def unbatchable(err: BaseException) -> str | None:
    """The first line of a vmap error that a row-by-row evaluation avoids, else None
    (functorch names the op: "Batching rule not implemented for aten::x")."""
    text = str(err)
    if isinstance(err, RuntimeError) and any(m in text for m in UNBATCHABLE):
        return text.splitlines()[0]
    return None


def map_rows(fn: Callable[[Tensor], Tensor], rows: Tensor) -> Tensor:
    """``torch.stack([fn(r) for r in rows])``: one :func:`torch.func.vmap` call, or one call per
    row where vmap cannot batch ``fn`` (:func:`unbatchable`).

    Example:
        >>> map_rows(lambda r: r[torch.nonzero(r > 0).squeeze(-1)].sum(), torch.tensor([[1., -2.], [3., 4.]]))
        tensor([1., 7.])
    """
    try:
        return vmap(fn)(rows)
    except RuntimeError as err:
        if unbatchable(err) is None:
            raise
    return _row_by_row(fn, rows)


def _row_by_row(fn: Callable[[Tensor], Tensor], rows: Tensor) -> Tensor:
    return torch.stack([fn(row) for row in rows.unbind(0)])


class InputsRefusedError(ValueError):
    """The model raised on the inputs of the count (:func:`count_laws` calls it on them as given)."""


@dataclass(frozen=True)
class ParameterSlot:
    """Where one trainable parameter tensor sits in the flat θ: ``theta[offset:offset+numel]``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass
class ModuleLieResult(LieResult):
    """:class:`~torch_conslaw.lie.engine.LieResult` of :func:`count_laws`, with what the count depends on.

    Attributes (besides those of LieResult: ``D``, ``dim``, ``n_laws``, ``levels``,
    ``decisions``, ``evidence``, ``method``, ``warnings``):
        theta_source: "model" (the module's own parameters), "random" (a well-conditioned draw
            of the same architecture, see :func:`random_theta`) or "given" (a flat tensor).
        theta: the flat float64 θ of the count (layout: ``parameters``).
        parameters: one :class:`ParameterSlot` (name, shape, offset, numel) per trainable
            tensor, in the order of ``model.named_parameters()``.
        law_basis: orthonormal basis (D × n_laws, float64) of Lie(W)(θ)^⊥, the span of the law
            gradients at θ (None when D × n_laws floats exceed ``law_basis_max_bytes``).
            ``law_basis[p.offset:p.offset+p.numel]`` are the rows of parameter ``p``.
        n_inputs: the number N of inputs of the count.
        input_counts: the evidence that N is enough: ``{"n_inputs", "n_laws", "levels"}`` for
            the first n inputs, n growing up to N (``stable``: the last two counts agree).
        n_laws_eps0: the count with every normalization eps set to 0 (None when the model has
            no eps); ``approximate_laws`` = n_laws_eps0 − n_laws hold only up to eps.
        eps_modules: the normalization eps attributes of the model ("<module>.<attr>").
        eps_counts: the count at each eps tried: "given" (the model's), "1.0" (the recount when
            the model's eps blurred the gaps, or the ``eps`` argument), "0.0" (= n_laws_eps0).
        constant_units: ReLU-like activation calls with units dead or always active on the
            inputs (each adds data-dependent laws: the count is for *these* inputs).
        elementary_check: relative difference between the native forward and the forward
            through elementary ops used by the count (normalizations, attention, dropout off).
    """

    theta_source: str = "model"
    theta: Tensor | None = None
    parameters: list[ParameterSlot] = field(default_factory=list)
    n_inputs: int = 0
    input_counts: list[dict[str, Any]] = field(default_factory=list)
    n_laws_eps0: int | None = None
    eps_modules: list[str] = field(default_factory=list)
    eps_counts: dict[str, int] = field(default_factory=dict)
    constant_units: list[ConstantUnits] = field(default_factory=list)
    elementary_check: float = 0.0

    @property
    def approximate_laws(self) -> int:
        """Laws that hold at eps = 0 only (normalization scale invariances): n_laws_eps0 − n_laws."""
        return 0 if self.n_laws_eps0 is None else self.n_laws_eps0 - self.n_laws

    @property
    def stable(self) -> bool:
        """True when the counts on the last two input sizes agree."""
        counts = [c["n_laws"] for c in self.input_counts]
        return len(counts) >= 2 and counts[-1] == counts[-2]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            {
                "theta_source": self.theta_source,
                "n_inputs": self.n_inputs,
                "input_counts": list(self.input_counts),
                "stable": self.stable,
                "n_laws_eps0": self.n_laws_eps0,
                "approximate_laws": self.approximate_laws,
                "eps_modules": list(self.eps_modules),
                "eps_counts": dict(self.eps_counts),
                "constant_units": [asdict(c) for c in self.constant_units],
                "elementary_check": self.elementary_check,
                "parameters": [asdict(p) for p in self.parameters],
            }
        )
        return out

    def __str__(self) -> str:
        lines = [super().__str__(), f"θ                     : {self.theta_source}"]
        counts = ", ".join(f"{c['n_inputs']}: {c['n_laws']}" for c in self.input_counts)
        lines.append(f"laws by inputs        : {counts} ({'stable' if self.stable else 'NOT stable'})")
        if self.n_laws_eps0 is not None:
            lines.append(f"laws at eps = 0       : {self.n_laws_eps0} ({self.approximate_laws} only up to eps)")
        for c in self.constant_units:
            lines.append(f"constant units        : {c.op} call {c.call}: {c.dead} dead, {c.always_active} always active of {c.units}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass
class _Batch:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    size: int

    def first(self, n: int) -> "_Batch":
        cut = lambda v: v[:n] if v.dim() > 0 and v.shape[0] == self.size else v  # noqa: E731
        return _Batch(map_tensors(self.args, cut), map_tensors(self.kwargs, cut), n)


def map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, through nested tuples (named ones
    too), lists and dicts: a model may take a dict or a list of tensors as one argument.

    Example:
        >>> map_tensors(({"x": torch.ones(2)}, [torch.zeros(1)], 3), lambda t: t + 1)
        ({'x': tensor([2., 2.])}, [tensor([1.])], 3)
    """
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def as_batch(inputs: Any) -> _Batch:
    """Example inputs as a call's positional and keyword arguments (a tensor: ``model(x)``, a
    tuple or list: ``model(*inputs)``, a dict: ``model(**inputs)``), every floating tensor in
    them, nested or not, detached and in float64; the batch size is the first dimension of the
    first tensor found."""
    def cast(v: Tensor) -> Tensor:
        return v.detach().to(DTYPE) if v.is_floating_point() else v

    if isinstance(inputs, Tensor):
        args, kwargs = (cast(inputs),), {}
    elif isinstance(inputs, Mapping):
        args, kwargs = (), map_tensors(dict(inputs), cast)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(map_tensors(list(inputs), cast)), {}
    else:
        raise TypeError(
            f"inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword inputs, "
            f"got {type(inputs).__name__}"
        )
    tensors: list[Tensor] = []
    map_tensors((args, kwargs), tensors.append)
    if not tensors:
        raise ValueError("inputs hold no tensor: pass a batch of example inputs (first dimension = batch)")
    first = tensors[0]
    return _Batch(args, kwargs, int(first.shape[0]) if first.dim() > 0 else 1)


def _flat_outputs(out: Any) -> list[Tensor]:
    return [t for t in leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]


def _flat(out: Any) -> Tensor:
    return torch.cat([t.reshape(-1) for t in _flat_outputs(out)])


# --------------------------------------------------------------------------------------
# The generator family


class ModuleGenerators:
    """Fields ∂_θ⟨u, f(θ, batch)⟩ of a float64 module on a batch (a :class:`GeneratorFamily`).

    ``module`` is evaluated with :func:`torch.func.functional_call` on the flat θ laid out by
    ``slots``, under :class:`~torch_conslaw.lie.elementary.ElementaryOps`. A key is a cotangent
    u of all outputs of the batch (``key_dim`` = their number).
    """

    def __init__(
        self,
        module: nn.Module,
        slots: Sequence[ParameterSlot],
        batch: _Batch,
        *,
        forward_numel: int,
        work_bytes: float = WORK_BYTES,
        deadline: float | None = None,
        budget_note: str = "",
        preconditioner: str = "kronecker",
        eliminate_output_layer: bool = True,
        unbatched: str | None = None,
    ):
        self.module = module
        self.preconditioner = preconditioner
        self.eliminate_output_layer = eliminate_output_layer
        self.work_bytes = work_bytes
        self.slots = list(slots)
        self.batch = batch
        self.D = sum(s.numel for s in slots)
        self.deadline = deadline
        self.budget_note = budget_note
        self.unbatched = unbatched
        with torch.no_grad():
            self.d = int(self.outputs(torch.zeros(self.D, dtype=DTYPE)).numel())
        self.key_dim = self.d
        per_vector = 8.0 * 4 * max(forward_numel, self.d, self.D)
        self.matvec_chunk = int(max(1, min(256, work_bytes // per_vector)))
        self.bracket_chunk = int(max(1, min(256, work_bytes // (4 * per_vector))))

    def outputs(self, theta: Tensor) -> Tensor:
        """All floating outputs of the module on the batch, flat, at the flat θ."""
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise CountBudgetError(self.budget_note)
        params = {s.name: theta[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots}
        with ElementaryOps():
            out = functional_call(self.module, params, self.batch.args, self.batch.kwargs, strict=False)
        return _flat(out)

    def psi_batch(self, thetas: Tensor, keys: Tensor) -> Tensor:
        return torch.einsum("bi,bi->b", self._rows(self.outputs)(thetas), keys)

    def _rows(self, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``fn`` over the rows of a stack: one :func:`torch.func.vmap` call, or one call per row
        once the model proved unbatchable (:func:`unbatchable`; the reason is kept in
        ``self.unbatched``): the same numbers, slower."""
        batched = vmap(fn)

        def apply(rows: Tensor) -> Tensor:
            if self.unbatched is None:
                try:
                    return batched(rows)
                except RuntimeError as err:
                    reason = unbatchable(err)
                    if reason is None:
                        raise
                    self.unbatched = reason
            return _row_by_row(fn, rows)

        return apply

    def sample_keys(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, self.key_dim, dtype=DTYPE, generator=generator)

    def random_point(self, generator: torch.Generator) -> Tensor:
        return random_theta(self.module, self.slots, generator)

    def sample(self, theta: Tensor, n: int, generator: torch.Generator) -> Tensor:
        _, pullback = vjp(self.outputs, theta)
        keys = self.sample_keys(n, generator)
        pull = self._rows(lambda u: pullback(u)[0])
        return torch.cat([pull(k) for k in keys.split(self.matvec_chunk)])

    def gram_matvec(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        """v ↦ Jᵀ(J v), J = ∂_θ f(θ, batch): one jvp and one vjp per row of v, in chunks."""
        _, pullback = vjp(self.outputs, theta)
        push = self._push(theta)
        pull = self._rows(lambda u: pullback(u)[0])

        def apply(v: Tensor) -> Tensor:
            return torch.cat([pull(push(chunk)) for chunk in v.split(self.matvec_chunk)])

        return apply

    def _push(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        """Rows v ↦ J v, batched jvps (one chunk at a time)."""
        return self._rows(lambda v: jvp(self.outputs, (theta,), (v,))[1])

    def jacobian_matvec(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        """Rows v ↦ J v (all outputs of the batch), one jvp per row, in chunks."""
        push = self._push(theta)
        return lambda v: torch.cat([push(chunk) for chunk in v.split(self.matvec_chunk)])

    def gram_exact_block(self, theta: Tensor) -> tuple[ExactBlock | None, str]:
        """The largest ``Linear``/``Conv2d`` weight on which G = JᵀJ is exactly I ⊗ PᵀP (an output
        layer, :class:`~torch_conslaw.lie.gram.ExactBlock`), checked on two random vectors to
        1e-10, when the dense Schur complement on the other parameters fits the work memory, with
        "" — or None and why not (``eliminate_output_layer=False``, no such layer, or too many
        other parameters)."""
        if not self.eliminate_output_layer:
            return None, "eliminate_output_layer=False"
        slot_of = {s.name: s for s in self.slots}
        _, layers = layer_calls(self.module, lambda: self.outputs(theta), list(slot_of))
        candidates = sorted(
            (
                (slot_of[weight], layer, x, output)
                for name, (layer, x, output) in layers.items()
                if (weight := f"{name}.weight" if name else "weight") in slot_of
            ),
            key=lambda c: -c[0].numel,
        )
        matvec = self.gram_matvec(theta)
        gen = torch.Generator().manual_seed(4244)
        reasons = []
        for slot, layer, x, output in candidates[:2]:
            bias = slot_of.get(slot.name[: -len("weight")] + "bias")
            block_numel = slot.numel + (bias.numel if bias is not None else 0)
            others = self.D - block_numel
            need = 8.0 * others * (block_numel + 3 * others)  # G_BB, G_BH (I ⊗ w), the eigensolver's copies
            if others == 0:
                reasons.append(f"{slot.name} holds every parameter")
                continue
            if need > self.work_bytes:
                reasons.append(
                    f"eliminating {slot.name} needs {need / 1e9:.1f} GB for the Schur complement on the "
                    f"{others} other parameters, beyond a quarter of max_memory_gb ({self.work_bytes / 1e9:.1f} GB)"
                )
                continue
            patches = input_patches(layer, x)
            out = slot.shape[0]
            if patches.shape[1] * out != slot.numel:
                reasons.append(f"{slot.name}: its input patches do not match the weight's shape (e.g. a grouped convolution)")
                continue
            index = torch.arange(slot.offset, slot.offset + slot.numel).view(out, -1)
            if bias is not None:  # [W | b] acts on patches [a | 1]
                patches = torch.cat([patches, patches.new_ones(patches.shape[0], 1)], 1)
                index = torch.cat([index, torch.arange(bias.offset, bias.offset + out)[:, None]], 1)
            index = index.reshape(-1)
            probe = torch.zeros(2, self.D, dtype=DTYPE)
            part = torch.randn(2, out, patches.shape[1], dtype=DTYPE, generator=gen)
            probe[:, index] = part.reshape(2, -1)
            got = matvec(probe)[:, index]
            expected = (part @ (patches.T @ patches)).reshape(2, -1)
            if bool(((got - expected).norm(dim=1) <= 1e-10 * expected.norm(dim=1)).all()):
                name = slot.name if bias is None else f"{slot.name}, {bias.name}"
                block = ExactBlock(name, index, out, patches)
                if 8.0 * others * (x.numel() + 3 * others) <= self.work_bytes:
                    block = self._through_layer_input(block, layer, x, output, theta, bias is not None)
                return block, ""
            reasons.append(f"{slot.name} is not an output layer (its Gram block is not I ⊗ PᵀP)")
        return None, "; ".join(reasons) or "no Linear or Conv2d layer (groups = 1, numeric zero padding) called once"

    def _through_layer_input(
        self, block: ExactBlock, layer: nn.Module, x: Tensor, output: Tensor, theta: Tensor, bias: bool
    ) -> ExactBlock:
        """``block`` with the map θ ↦ (the layer's input) and its patch maps, for the factored
        Schur route: the model runs with the layer's forward replaced by a constant of its output's
        shape (the layer's input is captured on the way), so no jvp goes through the layer."""
        template = torch.zeros_like(output.detach())

        def layer_input(point: Tensor) -> Tensor:
            captured: list[Tensor] = []
            handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
            own = layer.__dict__.get("forward")  # an instance's own forward, if it has one
            layer.forward = lambda *_args, **_kwargs: template
            try:
                self.outputs(point)
            finally:
                handle.remove()
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own
            return captured[0].reshape(-1)

        try:  # the model may not run with its output layer replaced by a constant
            with torch.no_grad():
                same = torch.equal(layer_input(theta), x.reshape(-1))
        except CountBudgetError:
            raise
        except Exception:
            same = False
        if not same:
            return block
        push = self._rows(lambda v: jvp(layer_input, (theta,), (v,))[1])
        shape = tuple(x.shape)
        if isinstance(layer, nn.Linear):
            adjoint = lambda e: e.reshape(e.shape[0], -1)  # noqa: E731
        else:
            conv = dict(kernel_size=layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)

            def adjoint(e: Tensor) -> Tensor:  # F.fold is the adjoint of the patches' F.unfold
                cols = e.reshape(e.shape[0] * shape[0], -1, e.shape[2]).transpose(1, 2)
                return torch.nn.functional.fold(cols, shape[2:], **conv).reshape(e.shape[0], -1)

        k = block.patches.shape[1] - int(bias)  # the layer's own patch length

        def unfold(t: Tensor) -> Tensor:  # the bias column of a tangent is 0: a does not move it
            p = input_patches(layer, t.reshape(-1, *shape[1:])).reshape(t.shape[0], -1, k)
            return torch.cat([p, p.new_zeros(*p.shape[:2], 1)], 2) if bias else p

        def fold(e: Tensor) -> Tensor:
            return adjoint(e[..., :-1].contiguous() if bias else e)

        return dataclasses.replace(
            block,
            input_tangents=lambda rows: torch.cat([push(chunk) for chunk in rows.split(self.matvec_chunk)]),
            unfold=unfold,
            fold=fold,
        )

    def gram_preconditioner(self, theta: Tensor, diag: Tensor, scale: Tensor) -> Callable[[Tensor], Tensor] | None:
        """Kronecker-factored blocks for every Linear/Conv2d weight (:mod:`~torch_conslaw.lie.kronecker`),
        or None (``preconditioner="jacobi"``, or no such layer)."""
        if self.preconditioner != "kronecker":
            return None
        point = theta.detach().requires_grad_(True)
        blocks = kronecker_blocks(
            self.module, lambda: self.outputs(point), [s.name for s in self.slots],
            generator=torch.Generator().manual_seed(4243),
        )
        return kronecker_preconditioner(blocks, {s.name: (s.offset, s.shape) for s in self.slots}, diag, scale)

    def gram_diagonal(self, theta: Tensor, samples: int = 32) -> Tensor:
        """An estimate of diag(JᵀJ) from random cotangents (a Jacobi scaling: any positive one is exact
        for the null space; entries are floored at 1e-6 of their tensor's mean, and entries below
        1e-20 of the largest are rounding noise, set to 0)."""
        _, pullback = vjp(self.outputs, theta)
        keys = self.sample_keys(samples, torch.Generator().manual_seed(4242))
        pull = self._rows(lambda u: pullback(u)[0])
        fields = torch.cat([pull(k) for k in keys.split(self.matvec_chunk)])
        diag = (fields * fields).mean(0)
        # rounding noise of an exactly zero gradient (a bias before BatchNorm) is ~1e-32 of the
        # largest entry: counted as zero (scale 1), not scaled up into a non-PSD operator
        diag[diag < 1e-20 * float(diag.max())] = 0.0
        for s in self.slots:
            part = diag[s.offset : s.offset + s.numel]
            part.clamp_(min=1e-6 * float(part.mean()))
        return diag


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


def _mixed_sign_rows(w: Tensor, generator: torch.Generator) -> Tensor:
    """Flip one random entry of every row whose entries share one sign (so that a unit fed by
    nonnegative, post-ReLU inputs is neither always active nor dead for every input)."""
    if w.shape[1] < 2:
        return w
    same = (w > 0).all(1) | (w < 0).all(1)
    cols = torch.randint(w.shape[1], (w.shape[0],), generator=generator)
    flip = torch.ones_like(w)
    flip[torch.arange(w.shape[0])[same], cols[same]] = -1.0
    return w * flip


def random_theta(module: nn.Module, slots: Sequence[ParameterSlot], generator: torch.Generator) -> Tensor:
    """A well-conditioned random θ of the module's architecture (float64, flat).

    Weights of rank ≥ 2: N(0, 1/fan_in) (fan_in = numel / rows), every row with entries of both
    signs; embeddings: N(0, 1);
    normalization weights 1 + N(0, 0.2²); every other vector (biases): N(0, 0.3²).
    Small-scale initializations (std 0.02) blur the rank gaps (SCIENCE.md §9).

    Example:
        >>> lin = torch.nn.Linear(4, 2)
        >>> slots = [ParameterSlot("weight", (2, 4), 0, 8), ParameterSlot("bias", (2,), 8, 2)]
        >>> random_theta(lin, slots, torch.Generator().manual_seed(0)).shape
        torch.Size([10])
    """
    chunks = []
    for s in slots:
        owner, leaf = _owner(module, s.name)
        draw = torch.randn(s.numel, dtype=DTYPE, generator=generator)
        if isinstance(owner, nn.Embedding) or len(s.shape) == 0:
            chunks.append(draw)
        elif len(s.shape) >= 2:
            chunks.append(_mixed_sign_rows(draw.reshape(s.shape[0], -1), generator).reshape(-1) / math.sqrt(s.numel / s.shape[0]))
        elif "norm" in type(owner).__name__.lower() and leaf == "weight":
            chunks.append(1.0 + 0.2 * draw)
        else:
            chunks.append(0.3 * draw)
    return torch.cat(chunks)


# --------------------------------------------------------------------------------------
# count_laws


def _slots(model: nn.Module) -> list[ParameterSlot]:
    slots, offset = [], 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            slots.append(ParameterSlot(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
    return slots


def _probe(work: nn.Module, batch: _Batch) -> tuple[Tensor, ActivationRecorder, float]:
    """Native forward (with the activation recorder) and the elementary-op forward; checks both."""
    recorder = ActivationRecorder()
    try:
        with torch.no_grad(), recorder:
            native = work(*batch.args, **batch.kwargs)
    except Exception as err:
        raise InputsRefusedError(
            f"the model raised {type(err).__name__}: {err} on `inputs`; pass inputs the model accepts "
            "(a tensor is called as model(x), a tuple as model(*inputs), a dict as model(**inputs); "
            "floating inputs are cast to float64)"
        ) from err
    flat_native = _flat_outputs(native)
    if not flat_native:
        raise ValueError(
            f"the model returned no floating-point tensor (got {type(native).__name__}); count_laws "
            "needs the model's outputs (a tensor, or tuples/dicts of tensors)"
        )
    native_flat = _flat(native)
    if not torch.isfinite(native_flat).all():
        raise ValueError(
            "the model's outputs on `inputs` are not finite (nan/inf) at this θ; pass finite inputs of "
            "a sensible scale, or theta='random' for a well-conditioned point"
        )
    ops = ElementaryOps()
    with torch.no_grad(), ops:
        elementary = _flat(work(*batch.args, **batch.kwargs))
    diff = float((elementary - native_flat).norm() / native_flat.norm().clamp_min(1e-300))
    recorder.kept_casts = sorted(ops.kept)  # casts below float64 the count runs in float64
    return native_flat, recorder, diff


def _n_constant(recorder: ActivationRecorder) -> int:
    return sum(c.dead + c.always_active for c in recorder.calls)


BALANCED_SHARE = 0.15
"""theta="random" also redraws while a ReLU-like unit is active on fewer than this share of the
inputs (or more than 1 − it): such a unit makes joint activation patterns so rare that a few
dozen inputs miss them, and the count keeps laws of those inputs only (a 3-4-5-2 ReLU MLP
without biases with a unit active on 4 % of the inputs: 11 or 12 laws instead of 9)."""


def _conditioning(recorder: ActivationRecorder) -> tuple[int, float]:
    """(constant units, shortfall of the least balanced unit below BALANCED_SHARE): (0, 0.0)
    is a well-conditioned draw; smaller is better."""
    return _n_constant(recorder), max(0.0, BALANCED_SHARE - recorder.balance) if recorder.calls else 0.0


def _redraws(work: nn.Module, slots: Sequence[ParameterSlot], seed: int) -> Iterator[Tensor]:
    """The points ``theta="random"`` tries after its first (from ``seed``), lazily: up to
    ``RANDOM_DRAWS`` − 1, each from its own generator. ``count_laws`` and ``analyze`` try the
    same ones."""
    for k in range(1, RANDOM_DRAWS):
        yield random_theta(work, slots, torch.Generator().manual_seed(seed + 7919 * k))


_DTYPE_EPS_NORMS = tuple(c for c in (getattr(nn, "RMSNorm", None),) if c is not None)
"""Modules whose ``eps=None`` means the machine epsilon of the input's dtype (``nn.RMSNorm``)."""


def _eps_value(sub: nn.Module, attr: str) -> float | None:
    """The eps a normalization adds (``None`` on an ``nn.RMSNorm`` is the machine epsilon of
    the count's float64), or None for an attribute that is no positive eps."""
    value = getattr(sub, attr, None)
    if value is None and attr == "eps" and isinstance(sub, _DTYPE_EPS_NORMS):
        return torch.finfo(DTYPE).eps
    return value if isinstance(value, float) and value > 0 else None


def _eps_sites(work: nn.Module) -> list[tuple[str, nn.Module, str]]:
    return [
        (name, sub, attr)
        for name, sub in work.named_modules()
        for attr in EPS_ATTRIBUTES
        if _eps_value(sub, attr) is not None
    ]


def _eps_names(work: nn.Module) -> list[str]:
    """The normalization eps attributes of the model ("<module>.<attr>")."""
    return [f"{name or type(sub).__name__}.{attr}" for name, sub, attr in _eps_sites(work)]


RECOUNT_EPS = (EPS_WELL_CONDITIONED, 0.1, 0.01)
"""The eps tried, in order, for the recount of a count whose gaps the model's eps blurs."""


TINY_EPS_RECOUNT = (*RECOUNT_EPS, 1e-3, 1e-4)
"""The eps tried, in order, for the count of a model whose normalization eps lies below the rank
threshold (each still far above it)."""


def _recount_eps(work: nn.Module, batch: "_Batch", recorder: ActivationRecorder,
                 candidates: tuple[float, ...] = RECOUNT_EPS) -> float | None:
    """The first eps of ``candidates`` at which the ReLU-like units are no worse conditioned
    (dead, always active, rarely active: :func:`_conditioning`) than at the model's eps, else
    None. A larger eps shrinks the normalized values, so units of γ·n + β after a normalization
    may stop changing sign (seen: LayerNorm(4) → ReLU, 1 dead and 2 always-active units at
    eps = 1 and none at the model's eps): the count there would keep laws of those inputs only."""
    for value in candidates:
        _, trial, _ = _probe(_with_eps(work, value), batch)
        if _conditioning(trial) <= _conditioning(recorder):
            return value
    return None


def _with_eps(work: nn.Module, value: float) -> nn.Module:
    """A copy of ``work`` with every normalization eps set to ``value``."""
    copied = copy.deepcopy(work)
    for _, sub, attr in _eps_sites(copied):
        setattr(sub, attr, value)
    return copied


def _resolve_theta(theta: Any, work: nn.Module, slots: list[ParameterSlot], seed: int) -> tuple[Tensor, str]:
    D = sum(s.numel for s in slots)
    if theta is None or (isinstance(theta, str) and theta == "model"):
        params = dict(work.named_parameters())
        return torch.cat([params[s.name].detach().reshape(-1).to(DTYPE) for s in slots]), "model"
    if isinstance(theta, str) and theta == "random":
        return random_theta(work, slots, torch.Generator().manual_seed(seed)), "random"
    if isinstance(theta, Tensor):
        if theta.numel() != D:
            raise ValueError(f"theta has {theta.numel()} entries but the model has D={D} trainable entries; pass a flat tensor of size D")
        flat = theta.detach().reshape(-1).to(DTYPE)
        if not torch.isfinite(flat).all():
            raise ValueError("theta has non-finite entries; pass a finite point")
        return flat, "given"
    raise ValueError(f"theta must be None or 'model' (the model's parameters), 'random', or a flat tensor of size D={D}; got {theta!r}")


def count_laws(
    model: nn.Module,
    inputs: Any,
    *,
    theta: str | Tensor | None = None,
    seed: int = 0,
    method: str = "auto",
    input_sizes: Sequence[int] | None = None,
    eps: float | None = None,
    eps_zero: bool = True,
    rtol: float = DEFAULT_RTOL,
    max_seconds: float | None = None,
    max_memory_gb: float = 8.0,
    law_basis_max_bytes: float = 2e8,
    progress: bool | None = False,
    flow: str = "gradient",
    tau: Any = None,
    potential: Any = None,
    preconditioner: str = "kronecker",
    eliminate_output_layer: bool = True,
) -> ModuleLieResult:
    """Number of independent conservation laws of ``model`` for every loss on ``inputs``.

    D − dim Lie(W)(θ) with W(θ) = span{∂_θ⟨u, f(θ, x_i)⟩} over the inputs x_i (SCIENCE.md §9):
    the number of independent functions of θ that gradient flow keeps constant for any loss and
    any targets on these inputs. The count is for *these* inputs: dead or always-active ReLU
    units add laws (listed in ``constant_units``); growing the inputs shows when it stabilizes.

    The model runs on a float64 copy (the model is not changed), through elementary ops:
    normalizations and attention written with elementary ops (fused kernels have wrong
    higher derivatives), dropout off. BatchNorm in train mode uses the statistics of the
    batch given (the sub-batch for the smaller counts).

    Args:
        model: any ``nn.Module``; its trainable parameters (``requires_grad``) are θ.
        inputs: a batch (first dimension = batch): a tensor (``model(x)``), a tuple/list
            (``model(*inputs)``) or a dict (``model(**inputs)``). Floating inputs become float64.
        theta: None or "model": the model's own parameters; "random": a well-conditioned random
            point of the same architecture (:func:`random_theta`, from ``seed``; redrawn, up to
            ``RANDOM_DRAWS`` times, while ReLU-like units are dead, always active or active on
            fewer than ``BALANCED_SHARE`` (or more than 1 − it) of the
            inputs, keeping the draw with the fewest such units); or a flat
            tensor of size D (layout: ``result.parameters``).
        seed: seeds the random θ and every random draw.
        method: "auto", "dense" (explicit basis of W_k(θ), D up to a few thousand) or
            "complement" (the complement of W_1(θ) from the Gram operator v ↦ Jᵀ(Jv), for
            large D with few laws).
        input_sizes: the numbers of inputs counted (the first n of the batch), growing, the
            last one the whole batch; default N/4, N/2, N. The count at N is the answer; the
            others are its evidence (``input_counts``, ``stable``).
        eps: None: count at the model's normalization eps, and again at eps = 1 when a rank
            decision there has no clear gap (the exact count is the same for every eps > 0 but
            isolated values; a small eps leaves directions of relative size ~eps that blur the
            gap); a float: count with every normalization eps set to it.
        eps_zero: also count with every normalization eps set to 0 (``n_laws_eps0``).
        rtol: relative singular values above this count as new directions.
        max_seconds: time budget; :class:`CountBudgetError` when it is spent.
        max_memory_gb: memory budget of the count's arrays (dense basis, batched jvp/vjp work).
        law_basis_max_bytes: keep ``law_basis`` (D × n_laws floats) when it fits in this.
        flow: "gradient" (default), or a flow with momentum or a mirror flow
            (:func:`torch_conslaw.lie.flows.with_flow`: "heavy_ball", "nesterov" in phase
            space (t, θ, v), where the count is 2D + 1 − dim; "mirror" with ``potential``).
            Other flows keep no law basis (it would live in phase space).
        tau, potential: the flow's friction and mirror potential (see ``with_flow``).
        progress: show a progress bar (None: only on a terminal).
        preconditioner: for ``method="complement"``, "kronecker" (default: Kronecker-factored
            blocks per Linear/Conv2d weight, :mod:`~torch_conslaw.lie.kronecker`) or "jacobi"
            (the diagonal scaling only). Both give the same null space; only the number of CG
            iterations (``null_space.cg_iterations``) differs.
        eliminate_output_layer: for ``method="complement"``, when an output layer (a
            ``Linear``/``Conv2d`` whose outputs are the model's) holds most parameters, find the
            complement of W_1(θ) without CG: its Gram block is exactly I ⊗ PᵀP (P its input
            patches; checked; its bias with it), so it is eliminated and the Schur complement on
            the other parameters is solved densely (:func:`~torch_conslaw.lie.gram.schur_null_space`;
            ``null_space.eliminated`` names the layer, ``null_space.schur_route`` how S was
            formed). Used when that dense part fits a quarter of ``max_memory_gb``; otherwise, or
            with False, CG (``null_space.not_eliminated`` says why).

    Returns:
        a :class:`ModuleLieResult` (a LieResult; see its attributes).

    Example:
        >>> conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 1, 3))
        >>> res = count_laws(conv, torch.randn(4, 1, 7, 7, generator=torch.Generator().manual_seed(0)), theta="random")
        >>> res.n_laws, res.stable  # one law per hidden channel
        (2, True)
    """
    # A phase-space family (momentum flows) wraps the ModuleGenerators built below; the count
    # itself (_count) takes any GeneratorFamily.
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    slots = _slots(model)
    if not slots:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (every parameter has requires_grad=False "
            "or there are none): unfreeze the parameters whose laws you want to count"
        )
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if preconditioner not in ("kronecker", "jacobi"):
        raise ValueError(f"preconditioner must be 'kronecker' or 'jacobi', got {preconditioner!r}")
    start = time.perf_counter()
    deadline = None if max_seconds is None else start + max_seconds
    batch = as_batch(inputs)
    work = _counting_copy(model)
    theta_flat, source = _resolve_theta(theta, work, slots, seed)
    _load(work, slots, theta_flat)
    _, recorder, elementary_diff = _probe(work, batch)
    for candidate in _redraws(work, slots, seed) if source == "random" else ():
        if _conditioning(recorder) <= (0, 0.0):
            break
        _load(work, slots, candidate)
        _, trial, diff = _probe(work, batch)
        if _conditioning(trial) < _conditioning(recorder):
            theta_flat, recorder, elementary_diff = candidate, trial, diff
    _load(work, slots, theta_flat)
    D = theta_flat.numel()
    if method == "dense" and 8.0 * D * D > max_memory_gb * 1e9:
        raise CountBudgetError(
            f"method='dense' needs a {D} × {D} float64 basis ({8e-9 * D * D:.1f} GB) beyond max_memory_gb={max_memory_gb}: "
            "raise max_memory_gb or use method='complement'"
        )
    sizes = _input_sizes(input_sizes, batch.size)
    budget_note = (
        f"count_laws ran out of its time budget max_seconds={max_seconds}: raise max_seconds, pass "
        "fewer inputs, fewer input_sizes, eps_zero=False, or a smaller model"
    )
    work_bytes = max_memory_gb * 1e9 / 4

    def count(module: nn.Module, n: int, basis_bytes: float) -> LieResult:
        try:
            return _count_on(module, n, basis_bytes)
        except RuntimeError as err:
            if "vmap: called random operation" in str(err):
                training = any(m.training for m in model.modules())
                raise NotImplementedError(
                    f"{type(model).__name__} draws random numbers in its forward pass ("
                    + ("a hand-written dropout or stochastic depth / drop path in training mode"
                       if training else "in eval mode: a random choice the model itself makes, such as a random "
                       "masking or shuffling of its input (ViT-MAE's patch masking)")
                    + "), and the count needs a deterministic model (its fields are evaluated many times at a "
                    "stack of parameter points); "
                    + ("set those drop rates to 0 or pass model.eval() (BatchNorm then uses its running statistics)"
                       if training else "pass that randomness as an input when the model takes one (ViT-MAE's "
                       "noise), or count a wrapper that fixes it")
                ) from err
            raise

    unbatched: list[str] = []  # why the model is evaluated one row at a time, once found

    def _count_on(module: nn.Module, n: int, basis_bytes: float) -> LieResult:
        family = ModuleGenerators(
            module,
            slots,
            batch.first(n),
            forward_numel=recorder.floating_numel * n // batch.size,
            work_bytes=work_bytes,
            deadline=deadline,
            budget_note=budget_note,
            preconditioner=preconditioner,
            eliminate_output_layer=eliminate_output_layer,
            unbatched=unbatched[0] if unbatched else None,
        )
        try:
            flowing = with_flow(family, flow, tau=tau, potential=potential)
            if flowing is family:
                return _count(family, theta_flat, method, rtol, seed, progress, max_memory_gb, basis_bytes)
            point = flow_point(flowing, theta_flat, torch.Generator().manual_seed(seed))
            return _count(flowing, point, method, rtol, seed, progress, max_memory_gb, 0.0)
        finally:
            if family.unbatched is not None and not unbatched:
                unbatched.append(family.unbatched)

    eps_modules = _eps_names(work)
    eps_counts: dict[str, int] = {}
    gap_notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankGapWarning)  # re-raised below, naming the count
        if eps is not None and eps_modules:
            work = _with_eps(work, float(eps))
        smallest = min((_eps_value(sub, attr) for _, sub, attr in _eps_sites(work)), default=None)
        tiny = eps is None and smallest is not None and smallest < rtol
        if tiny:
            # an eps below the rank threshold (BERT / ViT / DeiT LayerNorms: 1e-12) breaks the
            # scale invariances by less than any rank decision sees: those approximate laws would
            # be counted as exact. The exact count is the same for every eps > 0 (see below), so
            # it is taken at the first eps of TINY_EPS_RECOUNT where the ReLU-like units fire as
            # at the model's eps (the last one else: its normalized values are nearly the model's)
            taken = _recount_eps(work, batch, recorder, TINY_EPS_RECOUNT) or TINY_EPS_RECOUNT[-1]
            gap_notes.append(f"the smallest normalization eps ({smallest:g}) is below the rank threshold ({rtol:g}): "
                             f"laws that hold only up to eps would look exact, so the count is taken at eps = {taken:g}")
            work = _with_eps(work, taken)
        result = count(work, batch.size, law_basis_max_bytes)
        eps_counts[repr(float(taken)) if tiny else "given" if eps is None else repr(float(eps))] = result.n_laws
        unclear = any(not d.clear for ds in result.decisions for d in ds)
        if eps is None and eps_modules and unclear and not tiny:
            # the exact count is the same for every eps > 0 but isolated values (the outputs are
            # analytic in eps); a small eps blurs its gaps, so it is taken again at eps = 1 —
            # unless ReLU-like units after a normalization fire differently there (a unit of
            # γ·n + β dies when n shrinks): then at the largest of 0.1, 0.01 where they do not
            value = _recount_eps(work, batch, recorder)
            if value is None:
                gap_notes.append(
                    f"count at eps as given: {result.n_laws} laws without a clear gap; not recounted at a larger "
                    "eps: at eps = 1, 0.1 and 0.01 ReLU-like units after a normalization become dead or "
                    "always active on these inputs (their laws would be laws of those inputs only)"
                )
            else:
                note = f"count at eps as given: {result.n_laws} laws without a clear gap; recounted at eps = {value:g}"
                work = _with_eps(work, value)
                result = count(work, batch.size, law_basis_max_bytes)
                eps_counts[repr(value)] = result.n_laws
                gap_notes.append(note)
        gap_notes = list(result.warnings) + gap_notes
        input_counts = []
        for n in sizes[:-1]:
            sub = count(work, n, 0.0)
            input_counts.append({"n_inputs": n, "n_laws": sub.n_laws, "levels": list(sub.levels)})
            gap_notes += [f"count on {n} inputs: {w}" for w in sub.warnings]
        input_counts.append({"n_inputs": batch.size, "n_laws": result.n_laws, "levels": list(result.levels)})
        n_laws_eps0 = None
        if eps_zero and eps_modules:
            try:
                at_zero = count(_with_eps(work, 0.0), batch.size, 0.0)
            except ValueError as err:  # e.g. a normalization of a zero row (an embedding's padding row) at eps = 0: 0 / 0
                gap_notes.append(
                    f"no count at eps = 0: {err} (at eps = 0 a normalization divides by zero on these inputs at this θ, "
                    "e.g. of a zero embedding row; pass theta='random' for that count)"
                )
            else:
                n_laws_eps0 = eps_counts["0.0"] = at_zero.n_laws
                gap_notes += [f"count at eps = 0: {w}" for w in at_zero.warnings]
    notes = []
    if len(input_counts) >= 2 and input_counts[-1]["n_laws"] != input_counts[-2]["n_laws"]:
        notes.append(
            "the count still changes with the number of inputs "
            f"({', '.join(str(c['n_laws']) for c in input_counts)} laws on {', '.join(str(c['n_inputs']) for c in input_counts)} inputs): "
            "pass more (or more varied) inputs for the count of generic inputs"
        )
    if unbatched:
        notes.append(
            f"torch.func.vmap cannot batch the model ({unbatched[0]}; e.g. a data-dependent dispatch such as an MoE "
            "router's, or an in-place write into a tensor the forward made): the count evaluated it one parameter "
            "point and one cotangent at a time, the same "
            "count at a higher cost (raise max_seconds for a larger model)"
        )
    constant = [c for c in recorder.calls if c.dead or c.always_active]
    if constant:
        notes.append(
            f"{sum(c.dead for c in constant)} dead and {sum(c.always_active for c in constant)} always-active ReLU-like "
            "units on these inputs add data-dependent laws (see constant_units); use more varied inputs or theta='random' "
            "for the count of generic inputs"
        )
    for c in recorder.clipping:
        if c.never_clipped:
            notes.append(
                f"{c.never_clipped} of the {c.units} units of {c.op} (call {c.call}) never reach its bound "
                f"{c.bounds} on these inputs: there {c.op} acts as {c.acts_as}, and the laws that follow hold for such "
                "inputs only (data-dependent); use inputs (or a θ) that reach the bound for the count of generic inputs"
            )
    kept = getattr(recorder, "kept_casts", [])
    if kept:
        notes.append(
            f"the forward casts float64 values to a lower precision ({', '.join(kept)}, e.g. a softmax or a norm "
            "upcast to float32, as Hugging Face eager attention does): the count runs them in float64, the function "
            f"in exact arithmetic (relative difference to the native forward {elementary_diff:.1e})"
        )
    elif elementary_diff > 1e-8:
        notes.append(
            f"the forward through elementary ops differs from the native forward by {elementary_diff:.1e} (relative): "
            "a rerouted op (normalization/attention/dropout) does not match the model's"
        )
    for note in gap_notes:
        warnings.warn(note, RankGapWarning, stacklevel=2)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return ModuleLieResult(
        D=result.D,
        dim=result.dim,
        levels=result.levels,
        decisions=result.decisions,
        method=result.method,
        seconds=time.perf_counter() - start,
        warnings=gap_notes + notes,
        null_space=result.null_space,
        law_basis=result.law_basis,
        theta_source=source,
        theta=theta_flat,
        parameters=slots,
        n_inputs=batch.size,
        input_counts=input_counts,
        n_laws_eps0=n_laws_eps0,
        eps_modules=eps_modules,
        eps_counts=eps_counts,
        constant_units=constant,
        elementary_check=elementary_diff,
    )


def _counting_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of the model that a torch.func transform can run: the normalization
    counters that BatchNorm increments in place (``num_batches_tracked``) are dropped (the
    count never updates running statistics)."""
    work = copy.deepcopy(model).to(DTYPE)
    for sub in work.modules():
        if isinstance(getattr(sub, "num_batches_tracked", None), Tensor):
            sub.num_batches_tracked = None
    return work


def _load(work: nn.Module, slots: Sequence[ParameterSlot], theta: Tensor) -> None:
    """Write θ into the float64 copy (so that its plain forwards run at θ)."""
    params = dict(work.named_parameters())
    with torch.no_grad():
        for s in slots:
            params[s.name].copy_(theta[s.offset : s.offset + s.numel].view(s.shape))


def _input_sizes(sizes: Sequence[int] | None, n: int) -> list[int]:
    if sizes is None:
        return sorted({max(1, n // 4), max(1, n // 2), n})
    sizes = [int(s) for s in sizes]
    if not sizes or sorted(set(sizes)) != sizes or sizes[0] < 1 or sizes[-1] != n:
        raise ValueError(
            f"input_sizes must grow strictly, start at ≥ 1 and end with the batch size {n} (got {sizes})"
        )
    return sizes


def _count(
    family: ModuleGenerators,
    theta: Tensor,
    method: str,
    rtol: float,
    seed: int,
    progress: bool | None,
    max_memory_gb: float,
    law_basis_max_bytes: float,
) -> LieResult:
    return lie_trace(
        family,
        theta,
        method=method,
        rtol=rtol,
        seed=seed,
        progress=progress,
        max_vectors_bytes=max_memory_gb * 1e9 / 8,
        law_basis_max_bytes=law_basis_max_bytes,
    )
