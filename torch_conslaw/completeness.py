"""Completeness report: are the laws the monitor tracks all the laws there are?

:func:`analyze` answers for any ``nn.Module``:

* **tracked**: how many independent laws the catalogue tracks — the rank of their gradients
  at θ, computed sparse and block by block (:mod:`torch_conslaw.tracked_rank`), so a
  ResNet-18 needs no dense 1920 × 6.3M Jacobian;
* **existing**: how many laws exist — for a plain chain of ``Linear`` layers the path-lifting
  count :func:`~torch_conslaw.lie.mlp_trace_dimension` (certified by the known laws), for any
  other model the data-driven count :func:`~torch_conslaw.count_laws` on a batch of random
  inputs shaped like ``example_input`` (SCIENCE.md §9), within a budget;
* **complete** when both agree; otherwise **where the missing laws live** (the share of the
  untracked law-gradient space in each parameter tensor, :mod:`torch_conslaw.missing_laws`)
  and, when those tensors are small, the missing **polynomial laws** themselves.

Example:
    >>> from torch import nn
    >>> report = analyze(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5)))
    >>> report.tracked_rank, report.lie_laws, report.complete
    (4, 4, True)
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .lawgroups import LawGroup, build_groups
from .lie import mlp_trace_dimension
from .lie.elementary import ElementaryOps
from .lie.modules import as_batch, map_tensors
from .lie.numerics import DEFAULT_RTOL, RankDecision
from .missing_laws import MissingSpace, SubmapFields, missing_space
from .nested import leaves
from .laws.verify import propose_and_check
from .structure import Skipped, Structure, find_structure, unwrap_model
from .tracked_rank import law_gradients, tracked_rank

__all__ = ["Analysis", "analyze", "random_inputs_like"]

_LIE_KINDS = {"relu": "relu", "leakyrelu": "leaky_relu", "leaky_relu": "leaky_relu", "identity": "linear"}
MAX_AUTO_INPUTS = 512
"""The automatic number of random inputs of the count never exceeds this (pass ``n_inputs``)."""
MAX_LINEAR_VARIABLES = 2000
"""Linear (degree-1) missing laws are searched on up to this many entries."""
_SHARE_SHOWN = 0.01
"""Tensors holding at least this share of the missing space are named one by one."""
_SHARE_TOUCHED = 1e-8
"""Tensors holding more than this share (rounding level) are searched for the missing laws."""


@dataclass
class Analysis:
    """What :func:`analyze` found; ``str(report)`` gives a readable summary.

    ``complete`` is True when the tracked laws span every law, False when some are missing,
    and None when the number of laws could not be computed (``lie_note`` says why).
    ``lie`` is the count itself (a :class:`~torch_conslaw.lie.LieResult`; for any model other
    than a plain MLP, the :class:`~torch_conslaw.lie.modules.ModuleLieResult` of
    :func:`~torch_conslaw.count_laws`, with its inputs, θ and evidence).
    ``missing_laws`` is how many independent laws are not tracked (None: not computed);
    ``missing`` where they live (:class:`~torch_conslaw.missing_laws.MissingSpace`, None
    without a law basis); ``polynomial_laws`` the polynomial laws on the tensors that hold
    them (None when not searched, ``polynomial_note`` says why), and ``polynomial_tracked``
    per law whether it is a function of tracked laws (its gradient at θ in their span: the
    search sees every law on those tensors, tracked ones included). ``shapes``: the shape of
    each trainable parameter. Missing laws that are single entries with zero gradient on every
    input of the count (embedding rows those inputs never read) are named in a note.
    """

    model: str
    structure: Structure
    groups: list[LawGroup]
    num_parameters: int
    tracked_laws: int
    tracked_rank: int
    rank_decision: RankDecision | None
    lie_laws: int | None
    lie_note: str
    complete: bool | None
    lie: Any = None
    missing_laws: int | None = None
    missing: MissingSpace | None = None
    polynomial_laws: Any = None
    polynomial_tracked: list[bool] | None = None
    polynomial_note: str = ""
    theta_source: str = "model"
    notes: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.model}: {self.num_parameters} trainable parameters (θ: {self.theta_source})"]
        lines.append(
            f"tracked: {len(self.groups)} law group(s), {self.tracked_laws} law function(s), "
            f"{self.tracked_rank} independent at θ"
            + (f" [{self.rank_decision.describe()}]" if self.rank_decision is not None else "")
        )
        for g in self.groups[:40]:
            lines.append(f"  {g.name:<20} {g.kind:<8} {g.count:>5} laws")
        if len(self.groups) > 40:
            lines.append(f"  ... and {len(self.groups) - 40} more groups")
        if self.lie_laws is not None:
            lines.append(f"existing laws (Lie-algebra count): {self.lie_laws} independent ({self.lie_note})")
        else:
            lines.append(f"existing laws (Lie-algebra count): not computed ({self.lie_note})")
        approximate = getattr(self.lie, "approximate_laws", 0)
        if approximate > 0:
            lines.append(f"  plus {approximate} that hold only up to a normalization eps (exact at eps = 0)")
        elif approximate < 0:  # more laws at eps > 0 than at eps = 0 cannot be: one count is off
            lines.append(
                f"  the count with every normalization eps = 0 found {-approximate} law(s) FEWER "
                f"({self.lie.n_laws_eps0}): one of the two counts is not reliable (see the notes on gaps)"
            )
        verdict = {True: "complete", False: "INCOMPLETE: some laws are not tracked", None: "unknown"}
        lines.append(f"tracked set: {verdict[self.complete]}")
        if self.missing_laws:
            lines.append(f"missing: {self.missing_laws} independent law(s) not tracked")
        if self.missing is not None and self.missing.dimension:
            lines.append("where the missing laws live (share of the untracked law space per tensor):")
            for name, share in self.missing.shares.items():
                if share >= _SHARE_SHOWN:
                    lines.append(f"  {name:<40} {100 * share:6.1f} %")
            small = sum(s for s in self.missing.shares.values() if s < _SHARE_SHOWN)
            if small > 0:
                lines.append(f"  {'(tensors below 1 % each)':<40} {100 * small:6.1f} %")
        if self.missing is not None and self.missing.inexact:
            labels = [lab for g in self.groups for lab in g.labels()]
            shown = ", ".join(f"{labels[i]} ({r:.1e})" for i, r in self.missing.inexact[:5])
            lines.append(
                f"tracked but not exact laws at θ on these inputs: {len(self.missing.inexact)} "
                f"(distance of the unit gradient to the law space): {shown}"
            )
        if self.polynomial_laws is not None:
            laws = list(self.polynomial_laws)
            tracked = self.polynomial_tracked or [False] * len(laws)
            lines.append(
                f"polynomial laws of degree ≤ {self.polynomial_laws.degree} on those tensors: {len(laws)}"
                + (f", of which {sum(tracked)} tracked (functions of tracked laws that read the same tensors)"
                   if any(tracked) else "")
            )
            lines.extend(f"  {law}" + ("    (tracked)" if known else "") for law, known in zip(laws[:30], tracked))
            if len(laws) > 30:
                lines.append(f"  ... and {len(laws) - 30} more")
            if self.polynomial_note:
                lines.append(f"  note: {self.polynomial_note}")
        elif self.polynomial_note:
            lines.append(f"polynomial laws: {self.polynomial_note}")
        lines.extend(f"skipped: {s}" for s in self.skipped[:20])
        if len(self.skipped) > 20:
            lines.append(f"skipped: ... and {len(self.skipped) - 20} more")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _checked_groups(
    model: nn.Module, structure: Structure, example_input: Any, families: bool
) -> tuple[list[LawGroup], list[Skipped], list[LawGroup], str]:
    """The exact law groups :func:`analyze` counts as tracked: with an example input, what the
    monitor tracks (layer pairs and the families beyond them, each verified numerically;
    :func:`~torch_conslaw.laws.verify.propose_and_check`) less the approximate ones, which are
    returned apart; without one (or with ``families=False``), the layer pairs, unverified (the
    note says so)."""
    pairs = build_groups(structure.pairs)
    if not families:
        return pairs, list(structure.skipped), [], "families=False: only the layer-pair laws count as tracked (unverified)"
    checked = propose_and_check(model, structure, example_input, pairs, list(structure.skipped), caller="analyze")
    exact = [g for g in checked.groups if g.expected_conserved and not getattr(g, "approximate", False)]
    approximate = [g for g in checked.groups if getattr(g, "approximate", False)]
    return exact, checked.skipped, approximate, checked.note


def analyze(
    model: nn.Module,
    example_input: Any = None,
    *,
    rtol: float = DEFAULT_RTOL,
    lie: bool = True,
    theta: str | None = None,
    seed: int = 0,
    n_inputs: int | None = None,
    max_lie_parameters: int = 20_000,
    max_seconds: float | None = 600.0,
    max_memory_gb: float = 8.0,
    polynomial_degree: int = 2,
    max_polynomial_variables: int = 40,
    max_jacobian_entries: int = 50_000_000,
    families: bool = True,
) -> Analysis:
    """Tracked laws against existing laws at θ, completeness, and where missing laws live.

    Args:
        model: any ``nn.Module`` (wrappers such as DDP/FSDP/compile are unwrapped).
        example_input: one batch the model accepts (a tensor, tuple or dict, first dimension =
            batch). Needed for the count of any model that is not a plain chain of Linear layers:
            the count runs on ``n_inputs`` random inputs shaped like it
            (:func:`random_inputs_like`).
        rtol: relative threshold of every rank decision.
        lie: False skips the count of existing laws (only the tracked rank).
        theta: None or "model": the model's parameters; "random": a well-conditioned random
            point of the same architecture (small initializations blur rank gaps, SCIENCE.md §9).
            Both the tracked rank and the count are taken at that θ.
        seed: seeds the random inputs, the random θ and the count.
        n_inputs: number of random inputs of the count (default: 2·D outputs' worth, at least
            16, doubled while the count still changes with the number of inputs, at most
            :data:`MAX_AUTO_INPUTS`).
        max_lie_parameters: models with more trainable entries get no count (a note says so).
        max_seconds, max_memory_gb: budget of the count (a note says when it ran out).
        polynomial_degree: degree of the missing polynomial laws searched.
        max_polynomial_variables: they are searched when the tensors holding the missing laws
            have at most this many entries.
        max_jacobian_entries: bound on the dense Jacobian of a law group whose readers are not
            plain rearrangements (the built-in ones all are: they need none).
        families: True (default): the tracked laws are those the monitor tracks: the layer-pair
            laws and, with an example input, the linear families beyond them (MHA key bias,
            LayerNorm centering, recurrent biases, ...), each verified numerically on
            ``example_input`` first (a group that fails is skipped with its residual);
            approximate laws (exact only at a normalization eps = 0) are named in a note and
            not counted. False: only the layer-pair laws, unverified (what the rescaling and
            linear-pair catalogue alone misses).

    Example:
        >>> from torch import nn
        >>> print(analyze(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))).complete)
        True
    """
    if not isinstance(families, bool):
        raise TypeError(f"analyze: families must be True or False, got {families!r}")
    if theta not in (None, "model", "random"):
        raise ValueError(f"theta must be None, 'model' or 'random', got {theta!r}")
    for name, value in (("max_lie_parameters", max_lie_parameters), ("max_polynomial_variables", max_polynomial_variables)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not isinstance(polynomial_degree, int) or polynomial_degree < 1:
        raise ValueError(f"polynomial_degree must be an integer ≥ 1, got {polynomial_degree!r}")
    if n_inputs is not None and (not isinstance(n_inputs, int) or n_inputs < 4):
        raise ValueError(f"n_inputs must be an integer ≥ 4 (the count compares n/4, n/2 and n inputs), got {n_inputs!r}")
    model = unwrap_model(model)
    structure = find_structure(model, example_input)
    groups, skipped, approximate, check_note = _checked_groups(model, structure, example_input, families)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    num_parameters = sum(p.numel() for p in trainable.values())
    layout, offset = {}, 0
    for n, p in trainable.items():
        layout[n] = (offset, p.numel())
        offset += p.numel()
    params = {n: p.detach().to(torch.float64) for n, p in trainable.items()}
    source = "model"
    notes: list[str] = []
    if theta == "random":
        params, source = _random_params(model, trainable, seed), "random"
        if lie and example_input is not None and 0 < num_parameters <= max_lie_parameters:
            params, note = _balanced_params(model, example_input, seed, n_inputs, num_parameters, params)
            notes += [note] if note else []
    tracked_laws = sum(g.count for g in groups)
    gradients = law_gradients(groups, params, layout, max_jacobian_entries=max_jacobian_entries)
    tracked = tracked_rank(groups, params, rtol=rtol, gradients=gradients)
    decision = tracked.decision if groups else None
    if decision is not None and not decision.clear:
        notes.append(f"no clear singular-value gap in the tracked laws: {decision.describe()}")
    notes += tracked.notes[:3]
    if approximate:
        notes.append(
            "approximate laws (exact only at a normalization eps = 0), verified but not counted as tracked: "
            + ", ".join(f"{g.name} ({g.count})" for g in approximate)
        )
    if check_note:
        notes.append(check_note)
    report = Analysis(
        model=type(model).__name__,
        structure=structure,
        groups=groups,
        num_parameters=num_parameters,
        tracked_laws=tracked_laws,
        tracked_rank=tracked.rank,
        rank_decision=decision,
        lie_laws=None,
        lie_note="disabled (lie=False)",
        complete=None,
        theta_source=source,
        notes=notes,
        skipped=skipped,
        shapes={n: tuple(p.shape) for n, p in trainable.items()},
    )
    if not lie:
        return report
    arch = _mlp_architecture(model, structure, trainable)
    if num_parameters == 0:
        report.lie_note = (
            f"{type(model).__name__} has no trainable parameters (none, or every one has "
            "requires_grad=False): there is nothing to count; unfreeze the parameters whose laws you want"
        )
        return report
    if num_parameters > max_lie_parameters:
        report.lie_note = (
            f"{num_parameters} trainable parameters > max_lie_parameters={max_lie_parameters}: raise "
            "max_lie_parameters (the count's time and memory grow with D), or analyze a narrower copy"
        )
        return report
    if not isinstance(arch, str) and theta in (None, "model"):
        _mlp_count(report, arch, rtol)
        return report
    if example_input is None:
        report.lie_note = (
            f"no example_input: the count of a model that is not a plain Linear chain ({arch}) runs "
            "on inputs; pass one batch the model accepts"
            if isinstance(arch, str)
            else "theta='random' counts on inputs: pass example_input"
        )
        return report
    report.notes += _unread_embedding_rows(model, example_input)
    _module_count(report, model, example_input, params, layout, gradients, seed, n_inputs, rtol,
                  max_seconds, max_memory_gb, polynomial_degree, max_polynomial_variables)
    return report


def _unread_embedding_rows(model: nn.Module, example_input: Any) -> list[str]:
    """A note for each embedding table with rows outside the range of the integer inputs: the
    count draws token ids over the example's range (:func:`random_inputs_like`), so rows it
    never reads are laws of those inputs (their entries get no gradient), not of the model."""
    tensors = example_input.values() if isinstance(example_input, Mapping) else (
        example_input if isinstance(example_input, (tuple, list)) else [example_input])
    ids = [t for t in tensors if isinstance(t, Tensor) and not t.is_floating_point() and not t.is_complex()
           and t.dtype != torch.bool and t.numel()]
    if not ids:
        return []
    lo, hi = min(int(t.min()) for t in ids), max(int(t.max()) for t in ids)
    read = _tables_reading(model, example_input, ids)
    return [
        f"the integer inputs span ids {lo}..{hi} and the count draws its inputs over that range, but "
        f"{name or type(module).__name__} has {module.num_embeddings} rows: the rows outside it are never "
        "read, so their entries count as (data-dependent) laws; pass an example whose ids span the vocabulary"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and (lo > 0 or hi < module.num_embeddings - 1)
        and (read is None or name in read)
    ]


def _tables_reading(model: nn.Module, example_input: Any, ids: list[Tensor]) -> set[str] | None:
    """The embedding modules whose lookup indices are the integer inputs themselves (the same
    storage: the tensor or a view of it), from one forward of a copy; the others look up ids
    the forward computes (T5's relative position buckets, BERT's ``position_ids`` buffer), whose
    range the example's ids do not set. None when the forward cannot be run."""
    probe = copy.deepcopy(model)
    inputs = {t.untyped_storage().data_ptr() for t in ids}
    seen: set[str] = set()

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            idx = args[0] if args else None
            if isinstance(idx, Tensor) and idx.untyped_storage().data_ptr() in inputs:
                seen.add(name)
        return pre

    for name, module in probe.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            module.register_forward_pre_hook(hook(name))
    try:
        with torch.no_grad():
            _call(probe, example_input)
    except Exception:  # noqa: BLE001 - every table keeps the note, as before
        return None
    return seen


def _random_params(model: nn.Module, trainable: Mapping[str, nn.Parameter], seed: int) -> dict[str, Tensor]:
    from .lie.modules import ParameterSlot, random_theta

    slots, offset = [], 0
    for n, p in trainable.items():
        slots.append(ParameterSlot(n, tuple(p.shape), offset, p.numel()))
        offset += p.numel()
    flat = random_theta(model, slots, torch.Generator().manual_seed(seed))
    return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in slots}


def _balanced_params(
    model: nn.Module, example: Any, seed: int, n_inputs: int | None, D: int, first: dict[str, Tensor]
) -> tuple[dict[str, Tensor], str]:
    """A random θ at which every ReLU-like unit is active on between ``BALANCED_SHARE`` and
    1 − ``BALANCED_SHARE`` of the count's first inputs, else the most balanced of
    ``RANDOM_DRAWS`` draws (the same draws as ``count_laws(theta="random")``; the first one is
    kept when it is balanced). A unit active on a few inputs only (a ReLU net without biases
    whose second-layer unit fires on 4 % of the inputs) makes joint activation patterns so rare
    that the count on a few dozen inputs misses them and keeps laws of those inputs only (a
    3-4-5-2 ReLU MLP without biases: 11 laws instead of the 9 of its hidden units), although
    the count looks stable as the inputs double."""
    from .lie.elementary import ActivationRecorder
    from .lie.modules import BALANCED_SHARE, _counting_copy, _load, _slots, _redraws

    try:
        n = n_inputs or int(min(MAX_AUTO_INPUTS, max(16, math.ceil(2 * D / _outputs_per_input(model, example)))))
        batch = as_batch(random_inputs_like(example, n, seed))
        work = _counting_copy(model)
        slots = _slots(work)

        def balance(flat: Tensor) -> tuple[float, bool]:
            _load(work, slots, flat)
            recorder = ActivationRecorder()
            with torch.no_grad(), recorder:
                work(*batch.args, **batch.kwargs)
            return recorder.balance, bool(recorder.calls)

        best = torch.cat([first[s.name].reshape(-1) for s in slots])
        score, has_units = balance(best)
        if not has_units or score >= BALANCED_SHARE:
            return first, ""
        draws, first_score = 1, score
        for candidate in _redraws(work, slots, seed):
            if score >= BALANCED_SHARE:
                break
            draws += 1
            trial, _ = balance(candidate)
            if trial > score:
                best, score = candidate, trial
    except Exception:  # the count reports what fails on the model; keep the first draw here
        return first, ""
    params = {s.name: best[s.offset : s.offset + s.numel].view(s.shape) for s in slots}
    return params, (
        f"θ: the first random draw had a ReLU-like unit active on only {100 * first_score:.1f} % (or all but that) of "
        f"the count's inputs (rare activation patterns leave laws of those inputs only); of {draws} draws the most "
        f"balanced one is used (every unit active on {100 * score:.1f}–{100 * (1 - score):.1f} % of them)"
    )


def _mlp_count(report: Analysis, arch: tuple[list[int], list[str], bool, bool], rtol: float) -> None:
    widths, activations, bias, output_bias = arch
    result = mlp_trace_dimension(widths, activations, bias=bias, seed=0, output_bias=output_bias, rtol=rtol)
    report.lie = result
    report.lie_laws = int(result.n_laws)
    report.lie_note = (
        f"path-lifting count of the MLP widths {widths}, activations {activations}, bias={bias}, "
        f"output_bias={output_bias}"
    )
    report.missing_laws = max(report.lie_laws - report.tracked_rank, 0)
    report.complete = report.tracked_rank == report.lie_laws


def random_inputs_like(example: Any, n: int, seed: int = 0, per_position: bool = False) -> Any:
    """``n`` random inputs with the structure, trailing shapes and dtypes of ``example``.

    Floating tensors: Gaussian with the example's mean and standard deviation (0 and 1 when
    it has a single entry); integer tensors: uniform over the example's range (token ids), or
    with ``per_position`` over the range of each position along the trailing axes (a pair
    (user id, item id) that indexes two tables of different sizes); bool tensors: copied rows.
    Only tensors whose first dimension is the batch size are redrawn; other values are kept.

    Example:
        >>> x = random_inputs_like(torch.zeros(2, 3), 5)
        >>> x.shape
        torch.Size([5, 3])
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = _tensors(example)
    if not tensors:
        raise ValueError("example_input holds no tensor: pass one batch the model accepts (first dimension = batch)")
    batch = tensors[0].shape[0] if tensors[0].dim() else None

    def draw(v: Any) -> Any:
        if not isinstance(v, Tensor) or v.dim() == 0 or v.shape[0] != batch:
            return v
        shape = (n, *v.shape[1:])
        if v.is_floating_point():
            std = float(v.std()) if v.numel() > 1 and torch.isfinite(v).all() else 1.0
            mean = float(v.mean()) if v.numel() > 1 and torch.isfinite(v).all() else 0.0
            std = std if std > 0 else 1.0
            return (mean + std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(v.dtype)
        if v.dtype == torch.bool:
            return v[torch.randint(batch, (n,), generator=gen)]
        if per_position and v.dim() >= 2:
            lo, hi = v.min(0).values.to(torch.float64), v.max(0).values.to(torch.float64)
            return (lo + (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo + 1)).floor()).to(v.dtype)
        lo, hi = int(v.min()), int(v.max())
        return torch.randint(lo, hi + 1, shape, generator=gen, dtype=v.dtype)

    if isinstance(example, (Tensor, Mapping, tuple, list)):
        return map_tensors(example, draw)  # through nested tuples, lists and dicts
    raise TypeError(f"example_input must be a tensor, a tuple/list or a dict, got {type(example).__name__}")


def _tensors(value: Any) -> list[Tensor]:
    return [t for t in leaves(value) if isinstance(t, Tensor)]


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _outputs_per_input(model: nn.Module, example: Any) -> int:
    """Floating outputs per example, from one forward of a copy (the model is not touched)."""
    probe = copy.deepcopy(model)
    batch = _tensors(example)[0].shape[0] if _tensors(example) and _tensors(example)[0].dim() else 1
    try:
        with torch.no_grad():
            out = _call(probe, example)
    except Exception as err:
        raise ValueError(
            f"{type(model).__name__} raised {type(err).__name__}: {err} on example_input; pass one batch "
            "the model accepts (a tensor is called as model(x), a tuple as model(*x), a dict as model(**x))"
        ) from err
    total = sum(t.numel() for t in _tensors(out) if t.is_floating_point())
    if total == 0:
        raise ValueError(f"{type(model).__name__} returned no floating-point output on example_input")
    return max(1, total // max(batch, 1))


def _where_in_model(err: BaseException) -> str:
    """``, at file.py:line: source`` of the innermost frame of ``err`` outside torch, this
    package and Python's standard library (the model's own line that called the op), or ``""``."""
    import os
    import sysconfig
    import traceback

    skip = tuple(os.path.abspath(d) + os.sep for d in (
        os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)), sysconfig.get_paths()["stdlib"]))
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not os.path.abspath(f.filename).startswith(skip)]
    if not frames:
        return ""
    f = frames[-1]
    return f", at {os.path.basename(f.filename)}:{f.lineno}" + (f": {f.line.strip()}" if f.line else "")


def _functorch_refusal(err: RuntimeError) -> bool:
    """A RuntimeError raised because an op cannot run under torch.func transforms (a custom
    ``autograd.Function`` without ``setup_context`` or ``vmap``, as BLOOM's GELU)."""
    text = str(err)
    return "functorch" in text or "setup_context" in text or "vmap" in text


def _mixed_dtypes(model: nn.Module) -> str | None:
    """``"torch.float64: 12, torch.float32: 3 (e.g. gate.weight)"`` when the floating parameters
    of ``model`` are of several dtypes, else None."""
    by: dict[torch.dtype, list[str]] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point():
            by.setdefault(p.dtype, []).append(name)
    if len(by) < 2:
        return None
    order = sorted(by.items(), key=lambda kv: -len(kv[1]))
    return ", ".join(f"{dt}: {len(names)}" for dt, names in order) + f" (e.g. {order[-1][1][0]})"


def _in_place_refusal(err: BaseException) -> bool:
    """A RuntimeError raised because the forward writes a tensor in place that the count
    differentiates or batches (a parameter clamped under ``no_grad``, a buffer updated in
    ``forward``, ``F.embedding(..., max_norm=...)`` renormalizing its weight)."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        k in text for k in ("mutate a captured Tensor", "modified inplace", "modified by an inplace operation"))


def _in_place_note(model: nn.Module, err: BaseException) -> str:
    return (f"the forward of {type(model).__name__} writes a tensor in place that the count differentiates "
            f"(a parameter or a buffer written during forward: w.clamp_() under no_grad, a running buffer, "
            f"F.embedding(..., max_norm=...)), which torch.func refuses ({str(err).splitlines()[0][:160]})"
            f"{_where_in_model(err)}; to count, run the model with that write moved out of forward "
            "(e.g. clip the weights after optimizer.step())")


def _module_count(
    report: Analysis,
    model: nn.Module,
    example: Any,
    params: dict[str, Tensor],
    layout: dict[str, tuple[int, int]],
    gradients: Any,
    seed: int,
    n_inputs: int | None,
    rtol: float,
    max_seconds: float | None,
    max_memory_gb: float,
    degree: int,
    max_variables: int,
) -> None:
    from .lie.modules import CountBudgetError, InputsRefusedError, count_laws

    D = report.num_parameters
    per_input = _outputs_per_input(model, example)
    n = n_inputs or int(min(MAX_AUTO_INPUTS, max(16, math.ceil(2 * D / per_input))))
    flat = torch.cat([params[name].reshape(-1) for name in layout])
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    per_position, refused = False, None  # integer inputs drawn over each position's range after a refusal
    while True:
        inputs = random_inputs_like(example, n, seed, per_position)
        left = None if deadline is None else max(deadline - time.perf_counter(), 1e-9)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the count's caveats are kept in result.warnings
                result = count_laws(model, inputs, theta=flat, seed=seed, rtol=rtol, max_seconds=left,
                                    max_memory_gb=max_memory_gb)
        except CountBudgetError as err:
            report.lie_note = f"not computed within the budget: {err}"
            return
        except InputsRefusedError as err:  # the example ran (_outputs_per_input): the count's batch size did not
            cause = err.__cause__ if err.__cause__ is not None else err
            if not per_position and any(not t.is_floating_point() and t.dtype != torch.bool and t.dim() >= 2
                                        for t in _tensors(example)):
                per_position, refused = True, cause  # ids of several tables side by side: each in its own range
                continue
            report.lie_note = (
                f"not computed: the count calls {type(model).__name__} on {n} random inputs stacked along the "
                f"first axis of example_input (read as the batch axis), and it raised {type(cause).__name__} "
                f"({str(cause).splitlines()[0][:200] if str(cause) else ''}){_where_in_model(cause)}: a model "
                "whose inputs' first axis is not a batch of independent examples cannot be counted; give it "
                "a batch axis first (or wrap it so that it has one)"
            )
            return
        except (NotImplementedError, RuntimeError) as err:  # an op without a forward-mode derivative or a vmap rule
            if _in_place_refusal(err):
                report.lie_note = "not computed: " + _in_place_note(model, err)
                return
            if not isinstance(err, NotImplementedError) and not _functorch_refusal(err):
                mixed = _mixed_dtypes(model)
                if mixed is None or "dtype" not in str(err).lower():
                    raise  # (NotImplementedError is a RuntimeError: the count's own refusals are kept)
                report.lie_note = (
                    f"not computed: the parameters of {type(model).__name__} are of several dtypes ({mixed}), and the "
                    f"count evaluates the model at one θ of one dtype ({str(err).splitlines()[0]}){_where_in_model(err)}; "
                    "a forward that casts its own modules (module.to(dtype) inside forward, as Switch Transformers' "
                    "router does) makes them so: the count needs a model whose forward keeps one dtype"
                )
                return
            report.lie_note = (
                f"not computed: the count differentiates the model in forward mode (jvp) and batches "
                f"it with vmap, and an op of {type(model).__name__} does not support it "
                f"({str(err).splitlines()[0]}){_where_in_model(err)}"
            )
            return
        # a count that still falls with the number of inputs is for too few of them (ReLU units
        # need enough activation patterns): double them while the automatic size allows
        if result.stable or n_inputs is not None or 2 * n > MAX_AUTO_INPUTS:
            break
        n *= 2
    report.lie = result
    report.lie_laws = int(result.n_laws)
    report.lie_note = (
        f"count_laws on {result.n_inputs} random inputs shaped like example_input, method {result.method}, "
        f"laws by inputs {[c['n_laws'] for c in result.input_counts]} "
        f"({'stable' if result.stable else 'NOT stable: pass n_inputs larger'})"
    )
    if refused is not None:
        report.lie_note += (
            f"; integer inputs drawn over each position's own range (drawn over their whole range, the model raised "
            f"{type(refused).__name__}: {str(refused).splitlines()[0][:120] if str(refused) else ''})"
        )
    report.notes += [f"count: {w}" for w in result.warnings[:5]]
    basis = getattr(result, "law_basis", None)
    if basis is None and result.n_laws == 0:
        basis = torch.zeros(result.D, 0, dtype=torch.float64)
    if basis is None:
        report.missing_laws = max(report.lie_laws - report.tracked_rank, 0)
        report.complete = report.tracked_rank == report.lie_laws
        report.notes.append(
            "no basis of the law space (D × laws too large to keep): completeness assumes every tracked "
            "law is exact, and the missing laws are not located"
        )
        return
    order = {s.name: (s.offset, s.numel) for s in result.parameters}
    if order != layout:
        raise RuntimeError("count_laws laid out the parameters differently from named_parameters()")
    tracked = gradients.dense()
    gap = missing_space(basis, tracked, layout, rtol=rtol)
    report.missing = gap
    report.missing_laws = gap.dimension
    report.complete = gap.dimension == 0
    if gap.inexact:
        report.notes.append(
            f"{len(gap.inexact)} tracked law(s) are not exact laws at θ on these inputs (e.g. they hold only "
            "up to a normalization eps, or part of the forward runs below the precision of the parameters, "
            "as GPT-J's attention scores upcast to float32 in a float64 model, so the count sees that rounding): "
            "they do not count toward completeness"
        )
    if gap.dimension:
        span = _column_span(tracked, rtol)
        _unread_entries(report, basis, tracked, span, layout, rtol, _parameters_not_read(model, example, layout))
        _polynomial_search(report, model, inputs, result, gap, degree, max_variables)
        if report.polynomial_laws is not None:
            report.polynomial_tracked = _in_tracked_span(report.polynomial_laws, result, gap, span)


def _column_span(matrix: Tensor, rtol: float) -> Tensor:
    """An orthonormal basis (D × rank) of the span of the columns of ``matrix`` (D × n): the
    left singular vectors above ``rtol`` times the largest."""
    if not matrix.shape[1]:
        return matrix.new_zeros(matrix.shape[0], 0)
    u, sv, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, sv > rtol * sv[0]] if sv.numel() and sv[0] > 0 else u[:, :0]


def _in_tracked_span(laws: Any, result: Any, gap: MissingSpace, span: Tensor) -> list[bool]:
    """Per polynomial law found on the tensors that hold the missing laws: whether it is (a
    function of) tracked laws, i.e. its gradient at θ lies in ``span``, the span of the tracked
    laws' gradients (:func:`_column_span`) — the search sees every law on those tensors."""
    import sympy

    names = [name for name, share in gap.shares.items() if share >= _SHARE_TOUCHED]
    slots = {s.name: s for s in result.parameters}
    columns = torch.cat([torch.arange(slots[n].offset, slots[n].offset + slots[n].numel) for n in names])
    theta = result.theta.to(torch.float64)
    at = {symbol: float(theta[int(c)]) for symbol, c in zip(laws.symbols, columns)}
    position = {symbol: int(c) for symbol, c in zip(laws.symbols, columns)}
    flags = []
    for law in laws:
        grad = torch.zeros(theta.numel(), dtype=torch.float64)
        for symbol in law.free_symbols:
            grad[position[symbol]] = float(sympy.diff(law, symbol).subs(at))
        norm = float(grad.norm())
        rest = grad - span @ (span.T @ grad)
        flags.append(norm > 0 and float(rest.norm()) <= 1e-6 * norm)
    return flags


_DEAD = 1e-8
"""An entry θ_i is itself a law when its unit vector lies in the law space up to this."""


def _parameters_not_read(model: nn.Module, example: Any, layout: Mapping[str, tuple[int, int]]) -> set[str]:
    """Names of the trainable parameters the forward does not read at all on ``example`` (no
    autograd path from them to any floating output: a module the forward never calls, such as a
    head used only when asked for, or a token read only with another argument). One forward
    and backward of a copy (the model, its buffers and its gradients are not touched); an
    empty set when that fails."""
    try:
        probe = copy.deepcopy(model)
        named = {n: p for n, p in probe.named_parameters() if n in layout and p.requires_grad}
        with torch.enable_grad():
            outs = [t for t in _tensors(_call(probe, example)) if t.is_floating_point() and t.requires_grad]
            if not outs or not named:
                return set()
            total = sum(t.sum() for t in outs)
            grads = torch.autograd.grad(total, list(named.values()), allow_unused=True)
    except Exception:  # the note only loses its distinction; the count has run on this model already
        return set()
    return {n for n, g in zip(named, grads) if g is None}


def _unread_entries(report: Analysis, basis: Tensor, tracked: Tensor, span: Tensor,
                    layout: Mapping[str, tuple[int, int]], rtol: float, not_read: set[str] = frozenset()) -> None:
    """Say how many missing laws are single entries with zero gradient on every input of the
    count (embedding rows those inputs never look up, such as positions beyond their length; a
    ReLU unit inactive on all of them, as in a tiny OPT at a random θ): laws of inputs like these
    only, which the monitor does not track. Entries of parameters the forward does not read at
    all (``not_read``, :func:`_parameters_not_read`) are said apart: they are constant for every
    θ, not only at this one. ``span``: of the tracked laws' gradients (:func:`_column_span` of
    ``tracked``)."""
    dead = (1.0 - basis.square().sum(1)) <= _DEAD
    if tracked.shape[1]:  # an entry that is a tracked law already (a padding row, a key bias) is not missing
        dead &= (1.0 - span.to(basis.dtype).square().sum(1)) > _DEAD
    dead = dead.nonzero().squeeze(1)
    if not dead.numel():
        return
    units = torch.zeros(basis.shape[0], dead.numel(), dtype=basis.dtype)
    units[dead, torch.arange(dead.numel())] = 1.0
    left = missing_space(basis, torch.cat([tracked.to(basis.dtype), units], 1), layout, rtol=rtol).dimension
    explained = report.missing_laws - left
    if explained <= 0:
        return
    where, refused, unread, unread_entries = [], [], [], 0
    for name, (offset, numel) in layout.items():
        hit = dead[(dead >= offset) & (dead < offset + numel)] - offset
        if not hit.numel():
            continue
        if name in not_read and hit.numel() == numel:
            unread.append(name)
            unread_entries += numel
            continue
        where.append(f"{name} ({hit.numel()} entries{_rows_said(hit, name, report)})")
        module = name.rsplit(".", 1)[0]
        refused += [str(s.reason) for s in report.skipped  # a key bias refused for the precision of the model
                    if module in str(s.reason) and "key" in str(s.reason)
                    and ("below the precision" in str(s.reason) or "numerical check" in str(s.reason))]
    total = explained
    if unread:
        report.notes.append(
            f"{min(unread_entries, explained)} of the {report.missing_laws} missing laws are the entries of parameters "
            f"the forward does not read at all on inputs like example_input: {', '.join(unread[:6])}"
            f"{' ...' if len(unread) > 6 else ''} (no autograd path to the output: a module or token the forward "
            "never uses with these arguments, such as a head computed only on request). Every entry is constant "
            "for any θ while training on such inputs (no gradient reaches it); the monitor does not track them"
        )
        explained -= min(unread_entries, explained)
        if not where or explained <= 0:
            if report.missing_laws > unread_entries:
                report.notes[-1] += f"; {report.missing_laws - unread_entries} other(s) remain"
            return
    report.notes.append(
        f"{explained} of the {report.missing_laws} missing laws are single entries whose gradient is zero on every "
        f"input of the count: {', '.join(where[:6])}{' ...' if len(where) > 6 else ''}. They hold for inputs like "
        "example_input and this θ only (embedding rows these inputs never look up, such as positions beyond their "
        "length; a ReLU unit inactive on every input), so the monitor does not track them"
        + (f", or they are laws of the function in exact arithmetic that a rule refused for this model: {refused[0]}"
           if refused else "")
        + ("" if total == report.missing_laws else f"; {report.missing_laws - total} other(s) remain")
    )


def _rows_said(hit: Tensor, name: str, report: Analysis) -> str:
    """': rows a–b' when the entries are whole rows of a 2-D parameter (its shape from the model)."""
    shape = report.shapes.get(name) if report.shapes else None
    if shape is None or len(shape) != 2:
        return ""
    width = shape[1]
    rows = sorted(set((hit // width).tolist()))
    if len(rows) * width != hit.numel():
        return ""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return f": rows {rows[0]}–{rows[-1]}" if len(rows) > 1 else f": row {rows[0]}"
    return f": rows {', '.join(map(str, rows[:8]))}{' ...' if len(rows) > 8 else ''}"


def _polynomial_search(
    report: Analysis, model: nn.Module, inputs: Any, result: Any, gap: MissingSpace, degree: int, max_variables: int
) -> None:
    """Polynomial laws on the tensors that hold the missing space: degree 1 first (cheap, up to
    :data:`MAX_LINEAR_VARIABLES` entries), then degree ≤ ``degree`` when the linear ones do not
    account for every missing law and the tensors have at most ``max_variables`` entries."""
    from .polynomial import NonFiniteFields, polynomial_laws_of

    names = [name for name, share in gap.shares.items() if share >= _SHARE_TOUCHED]
    size = sum(s.numel for s in result.parameters if s.name in names)
    if not names or size > max(max_variables, MAX_LINEAR_VARIABLES):
        report.polynomial_note = (
            f"not searched: the tensors holding the missing laws ({', '.join(names)}) have {size} entries "
            f"> max_polynomial_variables={max_variables}"
        )
        return
    work = copy.deepcopy(model).to(torch.float64)
    for sub in work.modules():
        if isinstance(getattr(sub, "num_batches_tracked", None), Tensor):
            sub.num_batches_tracked = None
    batch = as_batch(inputs)  # floating tensors in float64, through nested containers
    sampler = SubmapFields(work, result.parameters, names, batch.args, batch.kwargs)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(), ElementaryOps():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            first = sampler.sample(sampler.random_point(gen), 4, gen)
        except RuntimeError as err:
            if not _in_place_refusal(err):
                raise
            report.polynomial_note = "not searched: " + _in_place_note(model, err)
            return
        if not first.any():
            report.polynomial_note = (
                f"every entry of {', '.join(names)} is itself a law: the outputs do not depend on them "
                "(their gradient is zero for every loss)"
            )
            return
        try:
            laws = polynomial_laws_of(sampler, 1)
            if len(laws) < gap.dimension and degree >= 2 and size <= max_variables:
                laws = polynomial_laws_of(sampler, degree)
        except NonFiniteFields as err:
            report.polynomial_note = f"not searched: {err}"
            return
        if len(laws) < gap.dimension and degree >= 2 and size > max_variables:
            report.polynomial_note = (
                f"degree 1 only: {len(laws)} linear law(s); degree {degree} not searched, the tensors "
                f"holding the missing laws have {size} entries > max_polynomial_variables={max_variables}"
            )
    report.polynomial_laws = laws
    if laws.warnings:
        report.polynomial_note = "; ".join(laws.warnings)


def _mlp_architecture(
    model: nn.Module, structure: Structure, trainable: dict[str, nn.Parameter]
) -> tuple[list[int], list[str], bool, bool] | str:
    """(widths, activations, hidden bias, output bias) when the model is a plain chain of
    Linear layers the Lie calculator can count; otherwise the reason why not."""
    linears = {path: m for path, m in model.named_modules() if type(m) is nn.Linear}
    inner = next((p for p in structure.pairs if p.internal), None)
    if inner is not None:
        return (
            f"{inner.producer or 'the model'} carries internal laws ({inner.name}, ...): the Lie "
            "calculator covers plain chains of Linear layers only"
        )
    branch = next((p for p in structure.pairs if p.branch), None)
    if branch is not None:
        return (
            f"{branch.producer} feeds several layers ({', '.join(branch.consumers)}): the Lie "
            "calculator covers plain chains only"
        )
    if structure.skipped:
        return "the structure has skipped pairs, so it is not a plain chain of layers"
    if not linears:
        return "no Linear layers: the Lie calculator covers fully connected chains only"
    owned = {f"{path}.{n}" for path, m in linears.items() for n, _ in m.named_parameters()}
    if set(trainable) != owned or any(not p.requires_grad for m in linears.values() for p in m.parameters()):
        return "parameters outside plain Linear layers (or frozen ones): not a plain MLP"
    nxt = {p.producer: p for p in structure.pairs}
    heads = set(nxt) - {p.consumer for p in structure.pairs}
    chain = [next(iter(heads))] if len(heads) == 1 else (list(linears)[:1] if not structure.pairs else [])
    if not chain:
        return "the layer pairs do not form a single chain"
    activations: list[str] = []
    while chain[-1] in nxt:
        pair = nxt[chain[-1]]
        kinds = [k for k in pair.op_kinds if k != "identity"]
        if len(kinds) > 1 or (kinds and kinds[0] not in _LIE_KINDS):
            return f"ops {pair.op_kinds} between {pair.producer} and {pair.consumer} are not in the Lie calculator's MLP kinds"
        activations.append(_LIE_KINDS[kinds[0]] if kinds else "linear")
        chain.append(pair.consumer)
    if sorted(chain) != sorted(linears):
        return "not every Linear layer lies on one chain of pairs"
    layers = [linears[p] for p in chain]
    widths = [layers[0].in_features] + [m.out_features for m in layers]
    hidden_bias = {m.bias is not None for m in layers[:-1]}
    if len(hidden_bias) > 1:
        return "some hidden layers have a bias and others not: not covered by the Lie calculator"
    bias = hidden_bias.pop() if hidden_bias else layers[-1].bias is not None
    return widths, activations, bias, layers[-1].bias is not None
