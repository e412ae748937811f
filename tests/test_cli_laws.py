"""``conslaw laws``: output of an MLP and of a φ from a file, JSON, and bad input (exit status 2)."""

from __future__ import annotations

import json

import pytest
import torch

from torch_conslaw.cli import main


@pytest.fixture
def phi_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(
        "import torch\n"
        "def phi(t):\n"
        "    return t[0:1] * t[1:2] * t[2:3]\n"
        "def pairs(t):\n"
        "    return t.reshape(2, -1).prod(0)\n"
        "def square(t):\n"
        "    return torch.outer(t, t)\n"
    )
    return path


def test_mlp_laws_are_printed_one_per_line_with_a_summary(capsys):
    assert main(["laws", "--widths", "3,2,2", "--activations", "relu", "--bias"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:2] == [
        "W1[0,0]**2 + W1[0,1]**2 + W1[0,2]**2 + b1[0]**2 - W2[0,0]**2 - W2[1,0]**2",
        "W1[1,0]**2 + W1[1,1]**2 + W1[1,2]**2 + b1[1]**2 - W2[0,1]**2 - W2[1,1]**2",
    ]
    assert lines[2].startswith("2 independent polynomial laws of degree <= 2 in D = 14 variables (verified: 2 symbolic)")
    assert len(lines) == 3


def test_phi_from_a_file_with_json_output(capsys, phi_file):
    assert main(["laws", "--phi", f"{phi_file}:phi", "--dim", "3", "--degree", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["laws"] == ["x1**2 - x3**2", "x2**2 - x3**2"]
    assert report["verified"] == ["symbolic", "symbolic"]
    assert (report["D"], report["degree"], report["n_laws"], report["linear_dim"]) == (3, 2, 2, 2)
    assert report["n_unknowns"] == 9 and report["n_equations"] >= 2 * 9 + 20
    assert report["warnings"] == []


def test_all_prints_products_of_laws_too(capsys, phi_file):
    assert main(["laws", "--phi", f"{phi_file}:phi", "--dim", "3", "--degree", "4", "--all"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[-1].startswith("5 polynomial laws of degree <= 4")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--degree", "2"], "exactly one of --widths"),
        (["--widths", "3,2,2", "--activations", "relu", "--phi", "x.py:phi", "--dim", "3"], "exactly one of --widths"),
        (["--widths", "3,x,2", "--activations", "relu"], "--widths must be"),
        (["--widths", "3,2,2"], "--activations is required"),
        (["--widths", "3,2,2", "--activations", "gelu"], "unsupported activation 'gelu'"),
        (["--widths", "3,2,2", "--activations", "relu", "--degree", "0"], "degree must be >= 1"),
        (["--widths", "6,6,6", "--activations", "relu", "--degree", "3"], "67524 unknown coefficients"),
        (["--phi", "PHIFILE:phi"], "--phi needs --dim"),
        (["--phi", "PHIFILE", "--dim", "3"], "path/to/file.py:function"),
        (["--phi", "missing.py:phi", "--dim", "3"], "no such file 'missing.py'"),
        (["--phi", "PHIFILE:nothing", "--dim", "3"], "defines no function 'nothing'"),
        (["--phi", "PHIFILE:square", "--dim", "3"], "flat (1-D) tensor"),
        (["--phi", "PHIFILE:pairs", "--dim", "3"], "D matches"),
    ],
)
def test_bad_input_exits_with_status_2_and_says_what_to_change(argv, message, capsys, phi_file):
    argv = [a.replace("PHIFILE", str(phi_file)) for a in argv]
    assert main(["laws", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("conslaw laws: error: ") and message in captured.err
