"""Integrations of the conservation monitor with training stacks and loggers.

Each integration lives in its own module and imports its framework only when that
module is imported, so ``import torch_conslaw`` never needs Lightning, transformers or
TensorBoard:

* :mod:`torch_conslaw.integrations.lightning` — :class:`ConservationCallback`, a
  Lightning 2.x ``Callback`` (extra ``[lightning]``);
* :mod:`torch_conslaw.integrations.hf` — :class:`ConservationTrainerCallback`, a
  Hugging Face ``TrainerCallback`` (extra ``[hf]``);
* :mod:`torch_conslaw.integrations.tensorboard` — :class:`TensorBoardLogger`, per-group
  drift scalars for a ``SummaryWriter`` (extra ``[tensorboard]``);
* :mod:`torch_conslaw.integrations.export` — :func:`export_csv` and
  :func:`export_jsonl`, the full history as files (no extra needed).

Example:
    >>> from torch_conslaw.integrations import export_jsonl  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

__all__ = [
    "ConservationCallback",
    "ConservationTrainerCallback",
    "TensorBoardLogger",
    "export_csv",
    "export_jsonl",
    "require",
]

_EXPORTS: dict[str, str] = {
    "ConservationCallback": "torch_conslaw.integrations.lightning",
    "ConservationTrainerCallback": "torch_conslaw.integrations.hf",
    "TensorBoardLogger": "torch_conslaw.integrations.tensorboard",
    "export_csv": "torch_conslaw.integrations.export",
    "export_jsonl": "torch_conslaw.integrations.export",
}


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or fail with the ``pip install`` line that provides it.

    Example:
        >>> require("json", "test").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this torch_conslaw integration needs {module!r}, which is not installed; "
            f'install it with: pip install "torch_conslaw[{extra}]"'
        ) from err


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torch_conslaw.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .export import export_csv, export_jsonl
    from .hf import ConservationTrainerCallback
    from .lightning import ConservationCallback
    from .tensorboard import TensorBoardLogger
