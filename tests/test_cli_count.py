"""``conslaw count`` prints the count, the levels, the known-law rank and the certificate."""

from __future__ import annotations

import json

import pytest

from torch_conslaw.cli import main


def test_count_json(capsys):
    assert main(["count", "--widths", "4,3,5,2", "--activations", "linear,relu", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"D", "lie_dim", "n_laws", "levels", "known_laws", "certified", "seconds"} <= set(out)
    assert out["D"] == 4 * 3 + 3 * 5 + 5 * 2
    assert out["n_laws"] == out["known_laws"] == 6 + 5 and out["certified"] is True


def test_count_text_with_bias(capsys):
    assert main(["count", "--widths", "3,4,5", "--activations", "relu", "--bias", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "conservation laws     : 4" in out and "certified             : yes" in out


def test_count_bad_activation_exits_2(capsys):
    assert main(["count", "--widths", "3,4,5", "--activations", "gelu"]) == 2
    assert "unsupported activation 'gelu'" in capsys.readouterr().err


def test_count_bad_widths_is_an_argparse_error():
    with pytest.raises(SystemExit):
        main(["count", "--widths", "3,x,5", "--activations", "relu"])


def test_count_without_hidden_layers_is_strict_json(capsys):
    assert main(["count", "--widths", "3,2", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert out["n_laws"] == 0 and out["evidence"]["largest_rejected"] is None
