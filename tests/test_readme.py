"""The README's quick-start code runs as written and prints what the README says."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    text = README.read_text()
    block = text.split("## Quick start", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(block, "README quick start", "exec"), {})
    out = capsys.readouterr().out
    assert "[23, 26, 26] 11 11 True" in out  # the comment next to that print in the README
    assert "tracked set: complete" in out


def test_public_functions_are_not_shadowed_by_submodules():
    """Importing every submodule first must not turn a lazy export into a module object."""
    import importlib
    import pkgutil

    import torch_conslaw

    for info in pkgutil.iter_modules(torch_conslaw.__path__):
        importlib.import_module(f"torch_conslaw.{info.name}")
    for name in torch_conslaw.__all__:
        assert not isinstance(getattr(torch_conslaw, name), type(torch_conslaw)), name
