"""Import the object named by ``path/to/file.py:NAME`` for the CLI (``--phi``, ``inspect``).

Example:
    >>> load_target("model.py:phi", option="--phi", kind="function")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any


def load_target(target: str, option: str, kind: str = "function") -> Any:
    """The attribute NAME of the Python file FILE in ``FILE.py:NAME``.

    ``option`` names the argument in error messages (e.g. ``"--phi"``), ``kind`` what NAME
    should be (``"function"``, ``"model"``).
    """
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise ValueError(f"{option} must look like path/to/file.py:{kind}, got {target!r}")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"{option}: no such file {path_text!r}")
    spec = importlib.util.spec_from_file_location(f"_conslaw_target_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{option}: cannot import {path_text!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # lets classes defined there be pickled and introspected
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ValueError(f"{option}: importing {path_text!r} failed with {type(err).__name__}: {err}") from err
    if not hasattr(module, name):
        raise ValueError(f"{option}: {path_text!r} defines no {kind} {name!r}")
    return getattr(module, name)
