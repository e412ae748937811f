"""Packaging: typed public API, documented __all__, one version, extras, wheel contents."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import torch_conslaw

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"lightning", "hf", "tensorboard", "test", "all"}


def test_py_typed_is_shipped():
    assert (importlib.resources.files("torch_conslaw") / "py.typed").is_file()


def test_every_public_name_resolves_and_is_documented():
    for name in torch_conslaw.__all__:
        obj = getattr(torch_conslaw, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), f"torch_conslaw.{name} has no docstring"
    assert sorted(dir(torch_conslaw)) == sorted(torch_conslaw.__all__)


def test_integration_names_resolve_and_are_documented():
    from torch_conslaw import integrations

    for name in integrations.__all__:
        try:
            obj = getattr(integrations, name)
        except ImportError as err:  # extra not installed: the message says which one
            assert "pip install" in str(err)
            continue
        assert (obj.__doc__ or "").strip(), f"torch_conslaw.integrations.{name} has no docstring"


@pytest.mark.parametrize(
    "module",
    ["torch_conslaw.integrations", "torch_conslaw.integrations.export", "torch_conslaw.integrations.tensorboard",
     "torch_conslaw.distributed"],
)
def test_docstring_examples_run(module):
    import doctest

    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        pytest.skip(str(err))
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize(
    ("hidden", "module", "extra"),
    [
        ("lightning.pytorch", "torch_conslaw.integrations.lightning", "lightning"),
        ("transformers", "torch_conslaw.integrations.hf", "hf"),
        ("torch.utils.tensorboard", "torch_conslaw.integrations.tensorboard", "tensorboard"),
    ],
)
def test_missing_extra_names_the_pip_install_line(monkeypatch, hidden, module, extra):
    monkeypatch.setitem(sys.modules, hidden, None)  # makes `import hidden` fail
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=re.escape(f'pip install "torch_conslaw[{extra}]"')):
        importlib.import_module(module)


def test_version_lives_in_one_place():
    version = (ROOT / "torch_conslaw" / "_version.py").read_text()
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+.*"$', version, re.M)
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "torch_conslaw._version.__version__"}
    for path in (ROOT / "torch_conslaw").rglob("*.py"):
        if path.name != "_version.py":
            assert torch_conslaw.__version__ not in path.read_text(), f"version literal in {path}"
    try:
        assert importlib.metadata.version("torch_conslaw") == torch_conslaw.__version__
    except importlib.metadata.PackageNotFoundError:
        pass  # running from a source tree that is not installed


def test_wheel_from_a_clean_copy_ships_code_types_extras_and_cli(tmp_path):
    """Build from a copy holding only what a fresh clone holds (no build dirs in the repo)."""
    pytest.importorskip("setuptools")
    assert (ROOT / "README.md").is_file(), "pyproject.toml declares readme = README.md: it must exist"
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "torch_conslaw", src / "torch_conslaw", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("torch_conslaw-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(meta_name).decode()
        entry_points = archive.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    for path in ("py.typed", "integrations/__init__.py", "integrations/lightning.py", "integrations/hf.py",
                 "integrations/tensorboard.py", "integrations/export.py", "distributed.py", "monitor/monitor.py",
                 "monitor/recorders/live.py"):
        assert f"torch_conslaw/{path}" in names, path
    assert f"Version: {torch_conslaw.__version__}" in metadata
    assert EXTRAS <= set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
    assert re.search(r"^Requires-Dist: lightning.*extra == \"lightning\"", metadata, re.M)
    assert re.search(r"^Requires-Dist: transformers.*extra == \"hf\"", metadata, re.M)
    assert "conslaw = torch_conslaw.cli:main" in entry_points
