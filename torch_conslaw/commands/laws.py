"""``conslaw laws``: the polynomial conservation laws of an MLP or of a map φ from a file.

Example:
    $ conslaw laws --widths 3,2,2 --activations relu --degree 2
    $ conslaw laws --phi model.py:phi --dim 3 --degree 2 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from typing import Any

from ..polynomial import PolynomialLaws, format_law, polynomial_laws, polynomial_laws_of
from ._target import load_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``conslaw laws``."""
    source = parser.add_argument_group("what to analyse (give --widths or --phi)")
    source.add_argument("--widths", help="MLP layer widths, input to output, e.g. 3,2,2")
    source.add_argument(
        "--activations",
        help="hidden activations, one per hidden layer (e.g. linear,relu) or one name for all",
    )
    source.add_argument("--bias", action="store_true", help="the MLP layers have biases")
    source.add_argument("--phi", help="a map phi as path/to/file.py:function (flat tensor -> flat tensor)")
    source.add_argument("--dim", type=int, help="D, the size of phi's input (required with --phi)")
    parser.add_argument("--degree", type=int, default=2, help="largest degree of the laws (default 2)")
    parser.add_argument(
        "--all",
        action="store_true",
        help="print a basis of every law of degree <= k (products of laws included), not only independent ones",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampled equations")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="memory budget of the solver in GB (default 4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    """Find, verify and print the laws; returns the exit status."""
    options = dict(
        seed=args.seed,
        independent=not args.all,
        memory_budget=args.memory_gb * 1e9,
        progress=None,  # a bar on stderr when it is a terminal
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reported below, from laws.warnings
        laws = _find(args, options)
    for note in laws.warnings:
        print(f"conslaw laws: warning: {note}", file=sys.stderr)
    print(json.dumps(_as_json(laws)) if args.json else _as_text(laws))
    return 0


def _find(args: argparse.Namespace, options: dict[str, Any]) -> PolynomialLaws:
    """The laws of the MLP (--widths) or of the map (--phi) the arguments describe."""
    if (args.widths is None) == (args.phi is None):
        raise ValueError("give exactly one of --widths (an MLP) or --phi path/to/file.py:function")
    if args.phi is not None:
        if args.dim is None:
            raise ValueError("--phi needs --dim D, the size of phi's flat input")
        return polynomial_laws(load_function(args.phi), args.dim, args.degree, **options)
    from ..lie.generators import MLPGenerators

    widths = parse_widths(args.widths)
    if args.activations is None and len(widths) > 2:
        raise ValueError(f"--activations is required: one per hidden layer ({len(widths) - 2} for widths {args.widths})")
    activations = [a.strip() for a in (args.activations or "").split(",") if a.strip()]
    if len(activations) == 1:
        activations = activations[0]  # one name for every hidden layer
    return polynomial_laws_of(MLPGenerators(widths, activations, bias=args.bias), args.degree, **options)


def parse_widths(text: str) -> list[int]:
    """``"4,3,5"`` → ``[4, 3, 5]``, with a clear error otherwise.

    Example:
        >>> parse_widths("4,3,5")
        [4, 3, 5]
    """
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"--widths must be at least two comma-separated positive integers like 4,3,5, got {text!r}")
    return widths


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``function`` from ``path/to/file.py:function``.

    Example:
        >>> load_function("model.py:phi")  # doctest: +SKIP
    """
    function = load_target(spec, option="--phi")
    if not callable(function):
        raise ValueError(f"--phi: {spec!r} is not a function")
    return function


def _verification_summary(laws: PolynomialLaws) -> str:
    modes = sorted(set(laws.verified))
    return ", ".join(f"{laws.verified.count(m)} {m}" for m in modes) or "nothing to verify"


def _as_text(laws: PolynomialLaws) -> str:
    lines = [format_law(h, laws.symbols) for h in laws]
    kind = "independent " if laws.independent else ""
    lines.append(
        f"{len(laws)} {kind}polynomial laws of degree <= {laws.degree} in D = {laws.D} variables "
        f"(verified: {_verification_summary(laws)}); space of laws of degree <= {laws.degree}: "
        f"dim {laws.linear_dim}; {laws.n_unknowns} unknowns, {laws.n_equations} equations, "
        f"singular-value gap {_number(laws.gap[0])} (smallest kept) / {_number(laws.gap[1])} (largest called a law), "
        f"{laws.seconds:.2f} s"
    )
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.1e}"


def _as_json(laws: PolynomialLaws) -> dict[str, Any]:
    return {
        "D": laws.D,
        "degree": laws.degree,
        "n_laws": len(laws),
        "independent": laws.independent,
        "laws": [format_law(h, laws.symbols) for h in laws],
        "verified": laws.verified,
        "symbols": [str(s) for s in laws.symbols],
        "linear_dim": laws.linear_dim,
        "n_unknowns": laws.n_unknowns,
        "n_equations": laws.n_equations,
        "gap": {"smallest_accepted": laws.gap[0], "largest_rejected": laws.gap[1]},
        "warnings": laws.warnings,
        "seconds": laws.seconds,
    }
