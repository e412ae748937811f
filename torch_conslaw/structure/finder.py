"""Find the hidden unit groups of an ``nn.Module``: pairs (incoming layer → consuming layer).

The model is traced with ``torch.fx`` (a custom forward with ``F.relu``, ``x.relu()``,
flatten, pooling and residual adds is fine); when tracing fails, one forward pass on
``example_input`` is recorded with module hooks and a ``TorchFunctionMode`` instead (in eval
mode, without gradients, with the RNG state restored, so training is unaffected).

From every registered layer, the finder follows the data through the ops that keep the
rescaling symmetry (see :mod:`torch_conslaw.catalogue`) up to the next layer. Where the
output splits, every arm is followed: when each arm reaches a layer through pass ops only
(dropout, identity, flatten, pooling), the units feed all of those layers and form one pair
(e.g. a normalization read by ``q_proj``, ``k_proj`` and ``v_proj``). Anything else — a
non-homogeneous activation, a normalization, a residual add, an arm that ends elsewhere, a
frozen or shared parameter — makes the pair *skipped*, with a readable reason. A
normalization layer with affine parameters (BatchNorm, SyncBatchNorm, InstanceNorm with
affine=True, GroupNorm, one-axis LayerNorm / RMSNorm) ends the laws of the layer before it
but starts its own: its γ_c (and β_c) are the incoming weights of unit c.

Example:
    >>> from torch import nn
    >>> s = find_structure(nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2)))
    >>> print(s.skipped[0])
    GELU between 0 (Linear) and 2 (Linear) is not positively homogeneous
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import catalogue
from ..catalogue import ActivationSpec, LayerSpec, PassSpec, RowReader
from .graph import _flat, _split_input, kept_buffers  # one walk over nested outputs and one calling convention for both graph builders
from .parametrized import is_parametrized, original_kinds, parametrization_names, parametrized_incoming

__all__ = ["Link", "Pair", "Skipped", "Structure", "find_structure", "unwrap_model"]

NodeKind = Literal["input", "output", "layer", "activation", "pass", "barrier"]


@dataclass
class _Node:
    name: str
    kind: NodeKind
    inputs: list[int]
    module_path: str | None = None
    spec: LayerSpec | ActivationSpec | PassSpec | None = None
    reason: str = ""
    users: list[int] = field(default_factory=list)
    in_ndim: int | None = None  # rank of the first tensor input, when recorded


@dataclass(frozen=True)
class Pair:
    """A usable hidden unit group between ``producer`` and ``consumer`` (module paths).

    ``kind`` is ``"unit"`` (units on the last axis: Linear, LayerNorm), ``"channel"``
    (units on axis 1: convolution or BatchNorm channels) or ``"matrix"`` (no nonlinearity in
    between: the matrix law of a linear hidden layer; never after a normalization, whose
    affine part only keeps per-unit rescalings).
    ``degree`` is the homogeneity k of the activations in between (their product).
    ``incoming`` / ``outgoing`` are (qualified parameter name, row reader) pairs.
    ``conserved`` is False for a candidate whose law is broken (``reason`` says why).
    ``op_kinds`` names each op in between by its catalogue entry (``relu``, ``identity``,
    ``dropout``, ``maxpool``, ...), e.g. to match the pair with the Lie calculator's kinds.

    A *branch* — the units feed several consuming layers, each through pass ops only, like
    a normalized tensor read by ``q_proj``, ``k_proj`` and ``v_proj`` — is one pair:
    ``consumers`` lists the module paths of the consumers, ``consumer`` joins them with
    ``+`` (``attn.q_proj+attn.k_proj+attn.v_proj``), ``outgoing`` holds the readers of all
    of them (the law sums ‖w_out‖² over the consumers), ``consumer_positions`` gives each
    one's columns per unit and ``positions`` the largest. ``ops`` lists the ops before the
    split, then those of each arm. For a single consumer ``consumers == (consumer,)``.

    ``shifts`` lists ``(parameter, c)`` for a parameter the model reads as ``θ + c`` (a
    scalar c on every entry): a gain γ used as ``1 + γ`` (Gemma's RMSNorm, Nemotron's
    ``LayerNorm1P``). The symmetry rescales γ + c, so the law reads γ + c where it would read
    γ: (1 + γ_u)² − k‖w_out,u‖².

    An *internal* law of a module (:func:`~torch_conslaw.catalogue.register_internal_laws`,
    e.g. one head of ``nn.MultiheadAttention``) is a ``"matrix"`` pair with ``producer ==
    consumer ==`` the module path, no ops, and a ``label`` that is its name
    (``attn.h0 q·k``); :attr:`internal` is True for it.
    """

    producer: str
    consumer: str
    ops: tuple[str, ...]
    kind: Literal["unit", "channel", "matrix"]
    degree: float
    units: int
    positions: int
    incoming: tuple[RowReader, ...]
    outgoing: tuple[RowReader, ...]
    conserved: bool = True
    reason: str = ""
    op_kinds: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    consumer_positions: tuple[int, ...] = ()
    label: str = ""
    shifts: tuple[tuple[str, float], ...] = ()

    @property
    def internal(self) -> bool:
        """True for an internal law of one module (no producer → consumer crossing)."""
        return bool(self.label)

    @property
    def branch(self) -> bool:
        """True when the units feed several consuming layers (``consumer`` joins their paths)."""
        return len(self.consumers) > 1

    @property
    def name(self) -> str:
        """Short label ``producer→consumer`` (the ``label`` of an internal law)."""
        return self.label or f"{self.producer}→{self.consumer}"

    @property
    def incoming_names(self) -> frozenset[str]:
        """Qualified names of the parameters the units' incoming readers read."""
        return frozenset(n for n, _ in self.incoming)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Qualified names of every parameter the group reads."""
        return tuple(n for n, _ in self.incoming) + tuple(n for n, _ in self.outgoing)


@dataclass(frozen=True)
class Skipped:
    """A pair (or a whole model) the finder cannot use; ``str()`` gives the reason.

    ``candidate`` holds the pair when only the law is broken (a non-homogeneous activation),
    so that its would-be law can still be tracked to show the breaking.
    """

    producer: str | None
    consumer: str | None
    reason: str
    candidate: Pair | None = None

    def __str__(self) -> str:
        return self.reason


def call_hint(example_input: Any, err: BaseException) -> str:
    """What to try when the model refused ``example_input``: a dict is passed as keyword
    arguments (``model(**example_input)``), so a model that takes one dict gets it as
    ``(example_input,)``. Empty when that is not the likely cause.

    Example:
        >>> call_hint({"x": 1}, TypeError("forward() got an unexpected keyword argument 'x'"))[:40]
        '; a dict example_input is passed as keyw'
    """
    if isinstance(example_input, dict) and isinstance(err, TypeError):
        return ("; a dict example_input is passed as keyword arguments, model(**example_input): to pass "
                "it as one positional argument, give (example_input,)")
    return ""


@dataclass(frozen=True)
class Link:
    """The output of the layer at ``producer`` is read by exactly one op: the registered layer
    at ``consumer``, or the model output itself (``consumer is None``). The families of laws
    beyond layer pairs start from these links (a bias right before a BatchNorm, a layer right
    before a LayerNorm, the output layer; :mod:`torch_conslaw.laws.families`)."""

    producer: str
    consumer: str | None


@dataclass
class Structure:
    """What :func:`find_structure` found: usable ``pairs``, ``skipped`` ones, the ``method``,
    the direct ``links`` from a layer to the one op that reads it (:class:`Link`), and
    ``graph_laws``: the linear and approximate law groups the op-graph rules propose on the
    example input (:class:`~torch_conslaw.structure.group_rules.GraphLawGroups`; None without
    an example input), and ``fallbacks``: the op graph's pairs set aside because a module-level
    pair reads the same incoming parameters differently (other units, other consumers); the
    numerical check tries them where that pair fails (a forward that writes into a layer's
    output in place, which the module-level finder does not see)."""

    pairs: list[Pair]
    skipped: list[Skipped]
    method: Literal["fx", "hooks", "none"]
    ops: list[str]
    links: list[Link] = field(default_factory=list)
    graph_laws: Any = None
    fallbacks: list[Pair] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"structure found with {self.method}: {len(self.ops)} ops"]
        lines.append("  " + " → ".join(self.ops) if self.ops else "  (no ops)")
        lines.append(f"usable pairs: {len(self.pairs)}")
        for p in self.pairs:
            if p.internal and p.producer != p.consumer:  # found on the op graph
                lines.append(f"  {p.name}: {p.units} {p.kind} row(s), degree {p.degree:g} (op graph)")
                continue
            if p.internal:
                lines.append(f"  {p.name}: internal {p.kind} law of {p.producer or 'the model'}, {p.units} rows")
                continue
            between = ", ".join(p.ops) if p.ops else "nothing"
            lines.append(
                f"  {p.name}: {p.units} {p.kind} group(s) through [{between}], degree {p.degree:g}"
                + (f", {p.positions} columns per channel" if p.positions > 1 and not p.branch else "")
                + (f", {len(p.consumers)} consuming layers" if p.branch else "")
                + (
                    f" ({', '.join(map(str, p.consumer_positions))} columns per channel)"
                    if p.branch and max(p.consumer_positions) > 1
                    else ""
                )
            )
        lines.append(f"skipped: {len(self.skipped)}")
        lines.extend(f"  {s.reason}" for s in self.skipped)
        return "\n".join(lines)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` and similar wrappers (``.module``) and
    inside ``torch.compile`` (``._orig_mod``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def find_structure(model: nn.Module, example_input: Any = None) -> Structure:
    """Find every usable hidden unit group of ``model`` and every pair it must skip.

    ``example_input`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments) is only needed when ``torch.fx`` cannot trace the model. When given, it also
    tells the input rank of BatchNorm1d / GroupNorm layers: their units are on axis 1, which
    is the last axis only for an ``(N, C)`` input. Without it, such a layer whose output
    reaches a ``Linear`` (no pooling in between) is read as taking ``(N, C)`` input — for an
    ``(N, C, L)`` input the Linear would read the L axis, which runs only when L = C.

    Example:
        >>> from torch import nn
        >>> s = find_structure(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        >>> [(p.name, p.kind, p.units) for p in s.pairs]
        [('0→2', 'unit', 3)]
    """
    model = unwrap_model(model)
    try:
        nodes = _graph_from_fx(model)
        method: Literal["fx", "hooks", "none"] = "fx"
        if example_input is not None:
            _record_input_ranks(model, nodes, example_input)
    except Exception as err:  # fx raises many error types on untraceable code
        if example_input is None:
            reason = (
                f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); pass example_input so the "
                "structure can be recorded with forward hooks"
            )
            pairs, skipped = _internal_pairs(model, [])
            return Structure(pairs, [Skipped(None, None, reason)] + skipped, "none", [])
        nodes = _graph_from_hooks(model, example_input)
        method = "hooks"
    pairs, skipped = _find_pairs(model, nodes)
    inner, inner_skipped = _internal_pairs(model, nodes)
    pairs += inner
    skipped += inner_skipped
    graph_laws = None
    fallbacks: list[Pair] = []
    if example_input is not None:
        pairs, skipped, graph_laws, fallbacks = _with_graph_laws(model, example_input, pairs, skipped)
    else:
        skipped += _overridden_layers(model)
    if not pairs and not skipped:
        skipped.append(
            Skipped(
                None,
                None,
                f"{type(model).__name__} has no two registered layers (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
                "or an affine normalization followed by one of these) connected through "
                "symmetry-preserving ops, so no law is known for it",
            )
        )
    ops = [n.name for n in nodes if n.kind not in ("input", "output")]
    return Structure(pairs, skipped, method, ops, _direct_links(nodes), graph_laws, fallbacks)


def _overridden_layers(model: nn.Module) -> list[Skipped]:
    """A note for every layer whose class derives from a registered one but computes its own
    forward (no law is assumed for it; the op graph, given an example input, reads it)."""
    notes = []
    for path, module in model.named_modules():
        base = catalogue.overridden_layer(module)
        if base is not None and any(p.requires_grad for p in module.parameters(recurse=False)):
            notes.append(Skipped(path or None, None, (
                f"{path or 'the model'} ({type(module).__name__}) derives from {base.__name__}, a registered "
                f"layer, but defines its own forward, so the laws of {base.__name__} are not assumed for it; "
                "pass example_input: the op graph reads what it computes")))
    return notes


def _direct_links(nodes: list[_Node]) -> list[Link]:
    """Every layer (called once in forward) whose output has exactly one live user that is a
    layer called once, or the output."""
    calls: dict[str, int] = {}
    for n in nodes:
        if n.kind == "layer" and n.module_path is not None:
            calls[n.module_path] = calls.get(n.module_path, 0) + 1
    links = []
    for n in nodes:
        if n.kind != "layer" or n.module_path is None or len(n.users) != 1 or calls[n.module_path] > 1:
            continue
        user = nodes[n.users[0]]
        if user.kind == "layer" and user.module_path is not None and calls[user.module_path] == 1:
            links.append(Link(n.module_path, user.module_path))
        elif user.kind == "output":
            links.append(Link(n.module_path, None))
    return links


def _with_graph_laws(
    model: nn.Module, example_input: Any, pairs: list[Pair], skipped: list[Skipped]
) -> tuple[list[Pair], list[Skipped], Any, list[Pair]]:
    """Add the laws that the op-graph rules (:mod:`torch_conslaw.structure.rules`) find on
    ``example_input`` to those of the module-level finder. A law whose incoming parameters a
    module-level pair already reads is left to that pair (unless the op graph saw the model read
one of them shifted, γ + c, where the module-level rule reads γ); for every producer the op graph
    saw, a module-level skip that stopped at an op the catalogue does not know is replaced by
    the op graph's reason (which names the op that breaks the symmetry and never advises
    registering a reshape or a product as an activation); other module-level skips stay. The
    law groups beyond pairs found on the same graph are returned as they are (the families
    merge them with the module-level ones, :mod:`torch_conslaw.laws.families.proposals`). The
    op graph's pairs left to a module-level pair that reads them differently are returned last
    (:attr:`Structure.fallbacks`)."""
    from .rules import StaleReadError, analyse_graph  # rules imports Pair / Skipped from here

    try:
        graph_pairs, graph_skipped, graph_laws = analyse_graph(model, example_input)
    except StaleReadError as err:  # neither graph follows the write: no law from either
        reason = (
            f"in {type(model).__name__}'s forward, {err.reads[0]} (a view taken before an in-place write to its "
            "base, or the reverse): the structure finders record values, not memory, and cannot tell what "
            "such a read sees, so no law is proposed for this model; write the op out of place "
            "(h = h + c instead of h.add_(c) / h += c) to have its laws found"
        )
        return [], [Skipped(p.producer, p.consumer, reason) for p in pairs] or [Skipped(None, None, reason)], None, []
    except Exception as err:  # the model itself ran on this input in the hooks path
        return pairs, skipped + [Skipped(None, None, (
            f"the op graph of {type(model).__name__} could not be captured on example_input "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{call_hint(example_input, err)}): "
            "only module-level structure is used"))], None, []
    # a layer the model reads as γ + c (a LayerNorm subclass passing weight + 1): its
    # module-level pair, which reads γ, gives way to the op graph's
    shifted = {p.incoming_names for p in graph_pairs if p.shifts}
    pairs = [p for p in pairs if p.incoming_names not in shifted]
    taken = {p.incoming_names: p for p in pairs}
    added = [p for p in graph_pairs if p.incoming_names not in taken]
    fallbacks = [p for p in graph_pairs if (q := taken.get(p.incoming_names)) is not None
                 and (p.units, {n for n, _ in p.outgoing}) != (q.units, {n for n, _ in q.outgoing})]
    seen = {p.producer for p in graph_pairs} | {s.producer for s in graph_skipped if s.producer}
    seen |= {c for p in graph_pairs for c in p.consumers}
    found = {name for p in added for name in p.producer.split("+")}  # a merged residual stream names each writer

    def superseded(s: Skipped) -> bool:
        # the op graph found a law there, or the module-level finder stopped at an op it did
        # not know or does not follow (a reshape, an indexing op, a product), which the op graph
        # follows and explains
        stopped = any(marker in s.reason for marker in catalogue.STOPS_THE_OP_GRAPH_FOLLOWS)
        return s.producer in found or (s.producer in seen and stopped)

    kept = [s for s in skipped if s.producer is None or not superseded(s)]
    covered = {p.producer for p in pairs} | {s.producer for s in kept}
    return pairs + added, kept + [s for s in graph_skipped if s.producer not in covered], graph_laws, fallbacks


# ---------------------------------------------------------------------------------------------
# Graph construction
# ---------------------------------------------------------------------------------------------

_META_METHODS = {"size", "dim", "numel", "nelement", "type", "ndimension", "get_device"}


def _classify(target: Any, display: str, args: tuple, kwargs: dict) -> tuple[NodeKind, Any, str]:
    if isinstance(target, nn.Module):
        spec = catalogue.layer_spec(target)
        if spec is not None:
            return "layer", spec, ""
    act = catalogue.activation_spec(target)
    if act is not None:
        return "activation", act, ""
    ps = catalogue.pass_spec(target, args, kwargs)
    if ps is not None:
        return "pass", ps, ""
    return "barrier", None, catalogue.barrier_reason(target, display)


def _display(target: Any, module_path: str | None) -> str:
    if module_path is not None:
        last = module_path.rsplit(".", 1)[-1]
        return f"{module_path} ({type(target).__name__})" if last.isdigit() else module_path
    if isinstance(target, str):
        return f".{target}()"
    return getattr(target, "__name__", repr(target))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return catalogue.is_catalogued_module(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        # a module wrapped by FSDP2's fully_shard: its pre-forward hook would initialize FSDP
        # on symbolic values (and fail), leaving the model unable to train; the structure
        # needs its forward alone
        if _sharded_by_fsdp(m) and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = m.forward
        return super().call_module(m, forward, args, kwargs)


def _sharded_by_fsdp(m: nn.Module) -> bool:
    """Whether ``fully_shard`` wrapped ``m`` (its class derives from FSDP2's ``FSDPModule``)."""
    return any(cls.__name__ == "FSDPModule" for cls in type(m).__mro__)


def _graph_from_fx(model: nn.Module) -> list[_Node]:
    with kept_buffers(model):
        graph = _Tracer().trace(model)
    index: dict[fx.Node, int] = {}
    meta: set[fx.Node] = set()
    nodes: list[_Node] = []
    for n in graph.nodes:
        tensor_inputs = [a for a in n.all_input_nodes if a not in meta and a.op != "get_attr"]
        if n.op == "get_attr":
            continue
        is_meta = (n.op == "call_method" and n.target in _META_METHODS) or (
            n.op == "call_function"
            and (n.target is getattr or (not tensor_inputs and n.target is not None))
        )
        if is_meta:
            meta.add(n)
            continue
        inputs = [index[a] for a in tensor_inputs]
        args = tuple(a for a in n.args)
        if n.op == "placeholder":
            node = _Node(n.name, "input", [])
        elif n.op == "output":
            node = _Node("output", "output", inputs)
        else:
            module_path = n.target if n.op == "call_module" else None
            target = model.get_submodule(n.target) if n.op == "call_module" else n.target
            display = _display(target, module_path)
            kind, spec, reason = _classify(target, display, args, dict(n.kwargs))
            node = _Node(display, kind, inputs, module_path, spec, reason)
        index[n] = len(nodes)
        nodes.append(node)
    _link_users(nodes)
    return nodes


class _Recorder(TorchFunctionMode):
    """Records every torch function called outside hooked leaf modules."""

    def __init__(self, nodes: list[_Node], ids: dict[int, int], keep: list[Any]) -> None:
        super().__init__()
        self.nodes, self.ids, self.keep = nodes, ids, keep
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and any(isinstance(o, torch.Tensor) for o in _flat(out)):
            name = getattr(func, "__name__", "")
            target: Any = name if getattr(torch.Tensor, name, None) is func else func
            if name == "__get__":  # property access such as x.shape / x.T
                target = repr(func)
            _record(self, target, None, args, kwargs, out)
        return out


def _record(rec: _Recorder, target: Any, module_path: str | None, args: tuple, kwargs: dict, out: Any) -> None:
    inputs = []
    for a in _flat((args, kwargs)):
        if isinstance(a, torch.Tensor) and id(a) in rec.ids and rec.ids[id(a)] not in inputs:
            inputs.append(rec.ids[id(a)])
    # plain-number arguments stand in for shapes (x.view(x.size(0), -1) → (x, n, -1))
    plain = tuple(None if isinstance(a, torch.Tensor) else a for a in args)
    display = _display(target, module_path)
    kind, spec, reason = _classify(target, display, plain, kwargs)
    ndim = next((a.dim() for a in _flat(args) if isinstance(a, torch.Tensor)), None)
    rec.nodes.append(_Node(display, kind, inputs, module_path, spec, reason, in_ndim=ndim))
    for o in _flat(out):
        if isinstance(o, torch.Tensor):
            rec.ids[id(o)] = len(rec.nodes) - 1
            rec.keep.append(o)


def _quiet_forward(model: nn.Module, args: tuple, kwargs: dict, mode: Any = None) -> Any:
    """One forward pass in eval mode, without gradients and with the RNG state restored, so
    training is unaffected (no running-statistics update); the train flags are put back.
    ``mode`` (a ``TorchFunctionMode`` such as the hooks recorder) is entered around the pass."""
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad(), kept_buffers(model):
            if mode is None:
                return model(*args, **kwargs)
            with mode:
                return model(*args, **kwargs)
    finally:
        for m, flag in training.items():
            m.train(flag)


def _record_input_ranks(model: nn.Module, nodes: list[_Node], example_input: Any) -> None:
    """Fill ``in_ndim`` of the layers whose unit axis depends on their input rank
    (BatchNorm1d, GroupNorm), from one quiet forward pass on ``example_input``. A failing
    pass leaves the ranks unknown: the rank only refines the axis the units are read on."""
    wanted = {
        n.module_path: n
        for n in nodes
        if n.kind == "layer" and isinstance(n.spec, LayerSpec) and n.spec.flat_input and n.module_path
    }
    if not wanted:
        return
    ranks: dict[str, int] = {}
    handles = []
    for path in wanted:
        def pre(module: nn.Module, inp: Any, path: str = path) -> None:
            first = next((a for a in _flat(inp) if isinstance(a, torch.Tensor)), None)
            if first is not None:
                ranks.setdefault(path, first.dim())

        handles.append(model.get_submodule(path).register_forward_pre_hook(pre))
    try:
        _quiet_forward(model, *_split_input(example_input))
    except Exception:  # the rank is a refinement: without it the finder still reads the layer
        ranks.clear()
    finally:
        for h in handles:
            h.remove()
    for path, rank in ranks.items():
        wanted[path].in_ndim = rank


def _graph_from_hooks(model: nn.Module, example_input: Any) -> list[_Node]:
    args, kwargs = _split_input(example_input)
    nodes: list[_Node] = []
    ids: dict[int, int] = {}
    keep: list[Any] = [args, kwargs]
    for a in _flat((args, kwargs)):
        if isinstance(a, torch.Tensor):
            ids[id(a)] = len(nodes)
            nodes.append(_Node(f"input{len(nodes)}", "input", []))
    rec = _Recorder(nodes, ids, keep)
    paths = {m: p for p, m in model.named_modules(remove_duplicate=False)}
    handles = []

    def pre(module: nn.Module, inp: Any) -> None:
        rec.depth += 1

    def post(module: nn.Module, inp: Any, out: Any) -> None:
        rec.depth -= 1
        if rec.depth == 0:
            _record(rec, module, paths[module], tuple(inp), {}, out)

    for module in model.modules():
        if module is not model and (catalogue.is_catalogued_module(module) or not list(module.children())):
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    try:
        out = _quiet_forward(model, args, kwargs, rec)
    finally:
        for h in handles:
            h.remove()
    outputs = [ids[id(o)] for o in _flat(out) if isinstance(o, torch.Tensor) and id(o) in ids]
    nodes.append(_Node("output", "output", outputs))
    _link_users(nodes)
    return nodes


def _link_users(nodes: list[_Node]) -> None:
    """Fill ``users`` with the ops that reach the output (dead code and conditions are ignored)."""
    live = {i for i, n in enumerate(nodes) if n.kind == "output"}
    for i in range(len(nodes) - 1, -1, -1):
        if i in live:
            live.update(nodes[i].inputs)
    for i, n in enumerate(nodes):
        if i in live:
            for j in n.inputs:
                nodes[j].users.append(i)


# ---------------------------------------------------------------------------------------------
# Pair finding
# ---------------------------------------------------------------------------------------------


def _find_pairs(model: nn.Module, nodes: list[_Node]) -> tuple[list[Pair], list[Skipped]]:
    calls: dict[str, int] = {}
    for n in nodes:
        if n.kind == "layer" and n.module_path is not None:
            calls[n.module_path] = calls.get(n.module_path, 0) + 1
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    params = dict(model.named_parameters(remove_duplicate=False))

    pairs: list[Pair] = []
    skipped: list[Skipped] = []
    for i, start in enumerate(nodes):
        if start.kind != "layer":
            continue
        found = _walk(nodes, i)
        if found is None:
            continue
        arms, ops, reason = found
        cname = _joint_name([nodes[c].module_path or nodes[c].name for c, _ in arms]) if arms else None
        if reason is not None:
            skipped.append(Skipped(start.module_path, cname, reason))
            continue
        pair_or_reason = _make_pair(model, nodes, i, arms, ops)
        if isinstance(pair_or_reason, str):
            skipped.append(Skipped(start.module_path, cname, pair_or_reason))
            continue
        pair = pair_or_reason
        problem = _parameter_problem(pair, [nodes[i]] + [nodes[c] for c, _ in arms], calls, params, names_of)
        if problem is not None:
            skipped.append(Skipped(start.module_path, cname, problem))
        elif not pair.conserved:
            skipped.append(Skipped(start.module_path, cname, pair.reason, candidate=pair))
        else:
            pairs.append(pair)
    return pairs, skipped


def _internal_pairs(model: nn.Module, nodes: list[_Node]) -> tuple[list[Pair], list[Skipped]]:
    """The internal laws of every module registered with
    :func:`~torch_conslaw.catalogue.register_internal_laws` (in ``named_modules`` order), or
    why they are skipped: a submodule called on its own in forward (its parameters then act
    outside the module's symmetry), a frozen or shared parameter, a ``ValueError`` of the
    registered function. They need no graph (``nodes`` may be empty: nothing to check)."""
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    called = {n.module_path for n in nodes if n.module_path is not None}
    pairs: list[Pair] = []
    skipped: list[Skipped] = []
    for path, module in model.named_modules():
        fn = catalogue.internal_laws_spec(module)
        if fn is None:
            continue
        kind = type(module).__name__
        display = f"{path} ({kind})" if path else kind
        prefix = f"{path}." if path else ""
        outside = sorted(c for c in called if c.startswith(prefix) and c != path)
        if outside:
            skipped.append(Skipped(path, path, (
                f"{outside[0]} is called on its own in forward, outside {display}: its internal "
                "laws do not hold"
            )))
            continue
        try:
            laws = fn(module)
        except ValueError as err:
            skipped.append(Skipped(path, path, f"{display} {err}"))
            continue
        for law in laws:
            pair = Pair(
                producer=path,
                consumer=path,
                ops=(),
                kind="matrix",
                degree=1.0,
                units=law.units,
                positions=1,
                incoming=tuple((f"{prefix}{a}", f) for a, f in law.incoming),
                outgoing=tuple((f"{prefix}{a}", f) for a, f in law.outgoing),
                reason=law.reason,
                consumers=(path,),
                consumer_positions=(1,),
                label=f"{path or kind}.{law.label}",
            )
            problem = _parameter_problem(pair, [], {}, params, names_of)
            if problem is not None:
                skipped.append(Skipped(path, path, problem))
            else:
                pairs.append(pair)
    return pairs, skipped


def _joint_name(paths: list[str]) -> str:
    """The consumer name of a pair: the module path, or the paths joined by ``+`` for a
    branch into several layers (``attn.q_proj+attn.k_proj+attn.v_proj``)."""
    return "+".join(paths)


Arm = tuple[int, list[int]]  # (consuming layer node, pass ops between the split and it)


def _walk(nodes: list[_Node], start: int) -> tuple[list[Arm], list[int], str | None] | None:
    """Follow single-user chains from ``start``; None when the output is never consumed.

    Returns (arms, ops before the consumer or the split, reason). Without a split there is
    one arm with no ops of its own. At a split every arm is followed through pass ops to the
    layer that ends it (:func:`_arms`); ``reason`` says why no law can be formed, if so.
    """
    ops: list[int] = []
    cur = start
    first_barrier: int | None = None
    reason: str | None = None
    while True:
        users = nodes[cur].users
        if not users or (len(users) == 1 and nodes[users[0]].kind == "output"):
            if reason is None:
                return None  # the last layer, or its result goes straight to the output
            return [], ops, reason
        if len(users) > 1:
            if reason is not None:
                return [], ops, reason
            names = ", ".join(nodes[u].name for u in users)
            after = f" (after {', '.join(nodes[o].name for o in ops)})" if ops else ""
            head = f"the output of {nodes[start].name}{after} is used by {len(users)} ops ({names})"
            arms, problem = _arms(nodes, users, [])
            if problem is not None:
                return [], ops, f"{head}: a branch or skip connection, so no law crosses it — {problem}"
            return arms, ops, None
        nxt = users[0]
        node = nodes[nxt]
        if node.kind == "layer":
            if first_barrier is None:
                return [(nxt, [])], ops, None
            return [(nxt, [])], ops, _barrier_text(nodes, start, first_barrier, nxt)
        if node.kind == "barrier" and first_barrier is None:
            first_barrier = nxt
            reason = _barrier_text(nodes, start, nxt, None)
        ops.append(nxt)
        cur = nxt


def _arms(nodes: list[_Node], users: list[int], prefix: list[int]) -> tuple[list[Arm], str | None]:
    """Follow each of ``users`` (the ops reading one tensor) through pass ops (dropout,
    identity, flatten, pooling) to the registered layer ending its arm; a further split is
    followed the same way. Returns the arms, or the reason naming the first arm that ends
    anywhere else (an addition, the model output, an activation after the split, another
    non-catalogued op) or a layer reached through two arms."""
    arms: list[Arm] = []
    for u in users:
        ops = list(prefix)
        cur = u
        while True:
            node = nodes[cur]
            path = " → ".join([nodes[o].name for o in ops] + [node.name])
            if node.kind == "layer":
                arms.append((cur, ops))
                break
            if node.kind == "output":
                where = f"the arm through {' → '.join(nodes[o].name for o in ops)}" if ops else "one arm"
                return [], f"{where} goes to the model output, not to a layer"
            if node.kind == "barrier":
                return [], f"the arm through {path} does not end in a layer: {node.reason}"
            if node.kind == "activation" and not (isinstance(node.spec, ActivationSpec) and node.spec.linear):
                return [], (
                    f"the arm through {path} has an activation after the split (only dropout, "
                    "identity, flatten and pooling may come between a split and its layers)"
                )
            ops.append(cur)
            if len(node.users) == 1:
                cur = node.users[0]
                continue
            if not node.users:
                return [], f"the arm through {path} is not used further"
            sub, problem = _arms(nodes, node.users, ops)
            if problem is not None:
                return [], problem
            arms.extend(sub)
            break
    seen: dict[str, int] = {}
    for c, _ in arms:
        key = nodes[c].module_path or str(c)
        seen[key] = seen.get(key, 0) + 1
    for key, count in seen.items():
        if count > 1:
            name = next(nodes[c].name for c, _ in arms if (nodes[c].module_path or str(c)) == key)
            return [], (
                f"{name} reads it through {count} arms (one layer reached several times, not "
                "several layers): no law is known for it"
            )
    return arms, None


def _barrier_text(nodes: list[_Node], start: int, barrier: int, consumer: int | None) -> str:
    node = nodes[barrier]
    where = f"between {nodes[start].name} and {nodes[consumer].name}" if consumer is not None else f"after {nodes[start].name}"
    return f"{where}: {node.reason}"


@dataclass
class _Layout:
    """Where the units of the producer sit as the ops between it and a consumer act on them."""

    layout: str  # "last", "channel", then "flat" after a flatten of channels
    may_be_last: bool  # units on axis 1 of a layer that may take (N, C) input
    mixing: bool  # every op so far keeps an invertible mixing of the units (matrix law)


def _through(
    model: nn.Module,
    nodes: list[_Node],
    prod: _Node,
    ops: list[int],
    state: _Layout,
    target: str,
    names: list[str],
    kinds: list[str],
    broken: list[str],
) -> tuple[float, str | None]:
    """Apply ``ops`` to ``state`` (in place); returns (degree of the activations, reason the
    layout is not supported or None). ``target`` names the consumer(s) in the reasons."""
    pspec = prod.spec
    assert isinstance(pspec, LayerSpec)
    rank = prod.in_ndim if pspec.flat_input else None
    degree = 1.0
    for k in ops:
        op = nodes[k]
        names.append(op.name)
        spec = op.spec
        kinds.append(spec.kind if isinstance(spec, PassSpec) else getattr(spec, "name", "?").lower())
        if isinstance(op.spec, ActivationSpec):
            if op.spec.degree is None:
                broken.append(op.spec.name if op.module_path is None else type(model.get_submodule(op.module_path)).__name__)
                continue
            if not op.spec.linear:
                degree *= op.spec.degree
                state.mixing = False
        elif isinstance(op.spec, PassSpec):
            state.mixing = state.mixing and op.spec.mixing
            if op.spec.kind == "flatten":
                if state.layout != "channel":
                    return degree, (
                        f"{op.name} between {prod.name} and {target} flattens the output of a "
                        f"{pspec.name} layer, whose units are not on axis 1: layout not supported"
                    )
                state.layout = "flat"  # (N, C) flattens to itself: one column per unit, also right
            elif op.spec.spatial and (state.layout != "channel" or rank == 2):
                return degree, (
                    f"{op.name} ({op.spec.name}) between {prod.name} and {target} pools over "
                    f"the units of {prod.name}, which mixes them: no law across it"
                )
            elif op.spec.spatial:
                state.may_be_last = False  # pooling needs spatial axes after the channels
    return degree, None


def _consumer_rows(
    model: nn.Module, nodes: list[_Node], prod: _Node, j: int, state: _Layout, units: int, pred: int | None = None
) -> tuple[tuple[RowReader, ...], int] | tuple[tuple[RowReader, ...], int, bool] | str:
    """The outgoing readers of consumer ``j`` and its columns per unit, or the reason why it
    cannot read the units of ``prod`` laid out as ``state`` says."""
    pspec, cons = prod.spec, nodes[j]
    cspec = cons.spec
    assert isinstance(pspec, LayerSpec) and isinstance(cspec, LayerSpec)
    cmod = model.get_submodule(cons.module_path)
    if cspec.barrier is not None:  # a normalization renormalizes what it consumes
        return f"between {prod.name} and {cons.name}: {cspec.barrier(cmod, cons.name)}"
    rank = prod.in_ndim if pspec.flat_input else None
    layout = state.layout
    if layout == "channel" and state.may_be_last and (cspec.in_axis == "last" or rank == 2):
        layout = "last"  # an (N, C) input: the channel axis is the last one
    positions = 1
    if layout == "flat":
        if cspec.in_axis != "last":
            return f"{_typed(cons, cspec)} cannot consume the flattened channels of {prod.name}"
        width = cspec.in_units(cmod)
        if width % units:
            return (
                f"{cons.name} reads {width} features, not a multiple of the {units} channels of "
                f"{prod.name}: cannot map channels to columns"
            )
        positions = width // units
    elif layout != cspec.in_axis:
        return (
            f"{_typed(cons, cspec)} reads axis '{cspec.in_axis}' but the units of "
            f"{_typed(prod, pspec)} are on axis '{layout}': no channel → column mapping"
            + (f" (its input is {rank}-D)" if rank is not None else "")
        )
    if cspec.input_outgoing is not None and layout == cspec.in_axis:  # several inputs, linear in each
        inputs = cons.inputs
        if pred is None or pred not in inputs or len(inputs) < 2:
            return (
                f"{cons.name} has several inputs and the units of {prod.name} reach it on an input the finder "
                "cannot tell apart (the same tensor on several inputs?): no law ends at it"
            )
        try:
            width, outgoing = cspec.input_outgoing(cmod, positions, inputs.index(pred))
        except ValueError as err:
            return f"{cons.name} cannot be read as the outgoing layer of {prod.name}: {err}"
        if width != units:
            return f"{cons.name} consumes {width} units on that input but {prod.name} produces {units}"
        state.layout = layout
        return tuple((f"{cons.module_path}.{a}", f) for a, f in outgoing), positions
    if layout != "flat" and layout == cspec.in_axis and cspec.in_units(cmod) != units:
        return f"{cons.name} consumes {cspec.in_units(cmod)} units but {prod.name} produces {units}"
    try:
        outgoing = cspec.outgoing(cmod, positions)
    except ValueError as err:
        return f"{cons.name} cannot be read as the outgoing layer of {prod.name}: {err}"
    computed = [a for a, _ in outgoing if is_parametrized(cmod, a)]
    if computed:  # W[:, j] of weight_norm / spectral_norm cannot be scaled alone through the originals
        scaling = [n for n, k in original_kinds(cmod, computed[0]) if k == "row-linear"] if len(computed) == 1 else []
        if scaling:  # ... but all of W can (weight_norm's g): one law for all the units together
            state.layout = layout
            whole = ((f"{cons.module_path}.parametrizations.{computed[0]}.{scaling[0]}", lambda t: t.reshape(1, -1)),)
            return whole, positions, True
        return (
            f"{cons.name} computes its {computed[0]} with a parametrization "
            f"({parametrization_names(cmod, computed[0])}), so the columns that read a unit of "
            f"{prod.name} cannot be scaled alone: no rescaling law ends at it"
        )
    state.layout = layout
    return tuple((f"{cons.module_path}.{a}", f) for a, f in outgoing), positions


def _make_pair(model: nn.Module, nodes: list[_Node], i: int, arms: list[Arm], ops: list[int]) -> Pair | str:
    """The pair from producer ``i`` through ``ops`` to the consumer(s) ending ``arms`` (one
    arm without ops: a plain pair; several: a branch whose units feed several layers, with
    the outgoing rows of all of them), or the reason it cannot be formed."""
    prod = nodes[i]
    pspec = prod.spec
    assert isinstance(pspec, LayerSpec)
    pmod = model.get_submodule(prod.module_path)
    branch = len(arms) > 1
    cnames = [nodes[j].name for j, _ in arms]
    target = " and ".join(cnames) if not branch else "{" + ", ".join(cnames) + "}"
    first = nodes[arms[0][0]]
    if not branch and isinstance(first.spec, LayerSpec) and first.spec.barrier is not None:
        return f"between {prod.name} and {first.name}: {first.spec.barrier(model.get_submodule(first.module_path), first.name)}"
    try:
        incoming = pspec.incoming(pmod)
        if is_parametrized(pmod):  # weight_norm: unit j is rescaled through g_j, not W[j]
            incoming = parametrized_incoming(pmod, incoming)
    except ValueError as err:  # e.g. a normalization without affine parameters
        return f"{prod.module_path} ({type(pmod).__name__}) {err}"
    rank = prod.in_ndim if pspec.flat_input else None
    shared = _Layout(pspec.out_axis, pspec.flat_input and rank in (None, 2), not pspec.diagonal)
    broken: list[str] = []
    names: list[str] = []
    kinds: list[str] = []
    degree, problem = _through(model, nodes, prod, ops, shared, target, names, kinds, broken)
    if problem is not None:
        return problem
    units = pspec.out_units(pmod)
    outgoing: list[RowReader] = []
    positions: list[int] = []
    layouts: set[str] = set()
    mixing = shared.mixing
    for j, arm_ops in arms:
        state = _Layout(shared.layout, shared.may_be_last, shared.mixing)
        _, problem = _through(model, nodes, prod, arm_ops, state, nodes[j].name, names, kinds, broken)
        pred = arm_ops[-1] if arm_ops else (ops[-1] if ops else i)  # the node that hands the units to j
        rows = problem if problem is not None else _consumer_rows(model, nodes, prod, j, state, units, pred)
        if isinstance(rows, str):
            if not branch:
                return rows
            after = f" (after {', '.join(nodes[o].name for o in ops)})" if ops else ""
            return (
                f"the output of {prod.name}{after} feeds {len(arms)} layers ({', '.join(cnames)}); "
                f"the arm to {nodes[j].name} breaks it: {rows}"
            )
        if len(rows) > 2 and rows[2]:  # a consumer scaled only as a whole (weight_norm's g)
            if branch:
                return (
                    f"the output of {prod.name} feeds {len(arms)} layers; {nodes[j].name} computes its weight with "
                    "a parametrization that scales only as a whole: not supported in a branch"
                )
            # every unit of the producer × λ and g ÷ λ^k: ‖W‖² + ‖b‖² − k‖g‖², one law for the layer
            incoming = [(a, lambda w, f=f: f(w).reshape(1, -1)) for a, f in incoming]
            units, mixing = 1, False
        outgoing.extend(rows[0])
        positions.append(rows[1])
        layouts.add("last" if state.layout == "last" else "channel")
        mixing = mixing and state.mixing
    if len(layouts) > 1:  # cannot happen with one producer; kept as a guard
        return f"the arms from {prod.name} read its units on different axes: not supported"
    kind: Literal["unit", "channel", "matrix"]
    kind = "matrix" if mixing and not broken else ("unit" if layouts == {"last"} else "channel")
    reason = ""
    if broken:
        reason = f"{', '.join(broken)} between {prod.name} and {target} is not positively homogeneous"
    consumers = tuple(nodes[j].module_path for j, _ in arms)
    return Pair(
        producer=prod.module_path,
        consumer=_joint_name(list(consumers)),
        ops=tuple(names),
        kind=kind,
        degree=degree,
        units=units,
        positions=max(positions),
        incoming=tuple((f"{prod.module_path}.{a}", f) for a, f in incoming),
        outgoing=tuple(outgoing),
        conserved=not broken,
        reason=reason,
        op_kinds=tuple(kinds),
        consumers=consumers,
        consumer_positions=tuple(positions),
    )


def _typed(node: _Node, spec: LayerSpec) -> str:
    """``name (Type)``, without repeating the type already in a numbered node's name."""
    kind = f"({spec.name})"
    return node.name if node.name.endswith(kind) else f"{node.name} {kind}"


def _parameter_problem(
    pair: Pair,
    layers: list[_Node],
    calls: dict[str, int],
    params: dict[str, nn.Parameter],
    names_of: dict[int, list[str]],
) -> str | None:
    """Why the group of ``pair`` cannot be read (``layers``: its producer, then its
    consumers): a layer called twice, a missing, frozen or shared parameter; else None."""
    for node in layers:
        if calls.get(node.module_path or "", 0) > 1:
            return (
                f"{node.name} is called {calls[node.module_path]} times in forward (a shared "
                f"layer), so the {pair.name} law does not hold"
            )
    for name in pair.parameter_names:
        p = params.get(name)
        if p is None:
            return f"{name} is not a parameter of the model: cannot read the {pair.name} group"
        if not p.requires_grad:
            return f"{name} is frozen (requires_grad=False): the {pair.name} law does not hold"
        others = [n for n in names_of[id(p)] if n != name]
        if others:
            return f"{name} is shared with {', '.join(others)}: the {pair.name} law does not hold"
    return None

