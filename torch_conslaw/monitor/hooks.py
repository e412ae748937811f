"""The optimizer-hook protocol and the parameter guard.

:class:`StepHooks` calls the monitor once before and once after every ``optimizer.step()``,
through torch's step pre/post hooks: an optimizer subclass whose ``step`` calls
``super().step()`` runs the hooks again inside the step (torch hooks both classes), and those
nested calls are ignored; with ``step(closure)`` (Lightning, L-BFGS) a recorder that reads θ
during the forward pass has the pre-step work run after the closure instead (the closure is
wrapped, its result returned unchanged). With an overhead budget, the hooks' time is measured
against the step time (:mod:`.budget`).

:class:`ParameterGuard` refuses to go on when a tracked layer or parameter was replaced or
resized after the monitor was built.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> calls = []
    >>> hooks = StepHooks(lambda: calls.append("pre"), lambda: calls.append("post"), lambda: False)
    >>> hooks.install(opt)
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> opt.step()
    >>> calls, hooks.attached
    (['pre', 'post'], True)
    >>> hooks.remove()
    >>> ParameterGuard(model, ["weight"]).check()  # the same layer: passes
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .budget import OverheadBudget

__all__ = ["StepHooks", "ParameterGuard", "steps_on_stack"]

_SHAPE = operator.attrgetter("shape")


def steps_on_stack(optimizer: torch.optim.Optimizer) -> int:
    """How many calls of ``optimizer``'s hooked ``step`` are running on this thread's stack."""
    count = 0
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "wrapper" and "optimizer" in code.co_filename and frame.f_locals.get("self") is optimizer:
            count += 1
        frame = frame.f_back
    return count


class StepHooks:
    """``pre_step()`` / ``post_step()`` once per ``optimizer.step()`` (see the module doc).

    ``defer_to_closure()`` is asked when a step has a closure: True means run ``pre_step``
    after the closure (the recorder reads θ during the forward pass inside it). ``budget``:
    time the hooks against it; ``next_step()`` gives the number of the step being finished.
    """

    def __init__(
        self,
        pre_step: Callable[[], None],
        post_step: Callable[[], None],
        defer_to_closure: Callable[[], bool],
        budget: OverheadBudget | None = None,
        next_step: Callable[[], int] | None = None,
    ) -> None:
        self._pre_step, self._post_step, self._defer = pre_step, post_step, defer_to_closure
        self._budget, self._next_step = budget, next_step
        self._handles: list[Any] = []
        self._in_step = False  # between the optimizer's pre- and post-step hooks
        self._nested = 0  # hook calls of an inner step() (a subclass calling super().step())

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed on an optimizer."""
        return bool(self._handles)

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the step pre/post hooks on ``optimizer``."""
        self._in_step, self._nested = False, 0
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        if self._in_step:
            if steps_on_stack(optimizer) > 1:
                self._nested += 1
                return None
            self._nested = 0  # the previous step raised before its post-step hook ran
        self._in_step = True
        if self._budget is not None:  # the monitor's time counts against the overhead budget
            with self._budget.timing():
                return self._before(args, kwargs)
        return self._before(args, kwargs)

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._nested:
            self._nested -= 1
            return
        self._in_step = False
        if self._budget is not None:
            assert self._next_step is not None
            self._budget.step_ended(self._next_step())
            with self._budget.timing():
                self._post_step()
            return
        self._post_step()

    def _before(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """The pre-step work, or, for a step with a closure whose forward pass the recorder
        reads during, a wrapped closure that does it after the closure (``args`` starts with
        the optimizer itself)."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None or not self._defer():
            self._pre_step()
            return None
        pre_step = self._pre_step

        def closure_then_wait(*a: Any, **k: Any) -> Any:
            result = closure(*a, **k)
            pre_step()  # the forward pass started the read; θ changes after this
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_wait}
        return (args[0], closure_then_wait, *args[2:]), kwargs


class ParameterGuard:
    """Checks that the tracked parameters ``names`` of ``model`` are still the same objects in
    the same layers, of the same shapes (a few identity checks per step)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        located = {n: _locate(model, n) for n in names}
        self.layout = {n: where + (where[3].shape,) for n, where in located.items()}
        edges, leaves = _fast_layout(model, self.layout)
        # (registry, key) → expected object: every module on the path to a tracked parameter
        # (parent._modules) and every tracked parameter (module._parameters)
        lookups = [(p._modules, k) for p, k, _ in edges] + [(m._parameters, a) for m, a, _, _ in leaves]
        self._registries = [registry for registry, _ in lookups]
        self._keys = [key for _, key in lookups]
        self._get = dict.get if all(type(r) is dict for r in self._registries) else _mapping_get
        self._expected = [c for *_, c in edges] + [p for _, _, p, _ in leaves]
        self._leaf_params = [p for _, _, p, _ in leaves]
        self._shapes = [shape for *_, shape in leaves]

    def modules(self, names: Sequence[str]) -> list[nn.Module]:
        """The layers that hold the parameters ``names``."""
        return [self.layout[n][2] for n in names]

    def check(self) -> None:
        """Refuse to go on when a tracked layer or parameter was replaced or resized."""
        # fast path (every step, in C loops: a step's hooks run from cold caches): the
        # registered children and parameters are still the same objects, of the same shapes;
        # anything else goes through the full check below
        found = map(self._get, self._registries, self._keys)
        if all(map(operator.is_, found, self._expected)) and list(map(_SHAPE, self._leaf_params)) == self._shapes:
            return
        for name, (path, attr, module, param, shape) in self.layout.items():
            try:
                now = self.model.get_submodule(path) if path else self.model
            except AttributeError:
                now = None
            current = getattr(now, attr, None) if now is not None else None
            if now is not module or current is not param or param.shape != shape:
                raise RuntimeError(
                    f"ConservationMonitor: parameter {name} was replaced, resized or its layer "
                    "swapped after the monitor was built; its laws no longer describe the model. "
                    "Build a new ConservationMonitor for the edited model"
                )


def _mapping_get(registry: Any, key: str) -> Any:
    return registry.get(key)


def _locate(model: nn.Module, name: str) -> tuple[str, str, nn.Module, Tensor]:
    """(module path, attribute, module, parameter) of a qualified parameter name."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    return path, attr, module, getattr(module, attr)


def _fast_layout(model: nn.Module, layout: dict[str, tuple]) -> tuple[list[tuple], list[tuple]]:
    """(parent, child name, child) of every module on the path to a tracked parameter, and
    (module, attribute, parameter, shape) of every tracked parameter (for the fast check)."""
    edges: dict[tuple[int, str], tuple] = {}
    for path, *_ in layout.values():
        parent = model
        for key in path.split(".") if path else []:
            child = parent._modules.get(key)
            edges[(id(parent), key)] = (parent, key, child)
            parent = child
    leaves = [(module, attr, param, shape) for _, attr, module, param, shape in layout.values()]
    return list(edges.values()), leaves
