"""``conslaw count``: the number of conservation laws of an MLP, from the Lie-algebra calculator.

Example:
    $ conslaw count --widths 4,3,5,2 --activations linear,relu --json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 4,3,5,2, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", type=_int_list, required=True, help="layer widths, input first: 4,3,5,2")
    parser.add_argument(
        "--activations",
        default=None,
        help="one per hidden layer (linear, relu, leaky_relu, abs), comma-separated; one name applies to all",
    )
    parser.add_argument("--bias", action="store_true", help="every layer has a bias")
    parser.add_argument("--no-output-bias", action="store_true", help="with --bias: no bias on the last layer")
    parser.add_argument("--method", choices=["auto", "dense", "complement"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..lie import RankGapWarning, mlp_trace_dimension

    n_hidden = len(args.widths) - 2
    if args.activations is None and n_hidden > 0:
        raise ValueError(f"--activations is required: one per hidden layer ({n_hidden} for widths {args.widths})")
    acts = [a.strip() for a in (args.activations or "").split(",") if a.strip()]
    if len(acts) == 1 and n_hidden > 1:
        acts = acts * n_hidden
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankGapWarning)  # reported in the output instead
        result = mlp_trace_dimension(
            args.widths,
            acts,
            bias=args.bias,
            seed=args.seed,
            output_bias=False if args.no_output_bias else None,
            method=args.method,
            progress=None if not args.no_progress else False,
        )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"architecture          : {'-'.join(map(str, args.widths))} ({', '.join(acts)}{', bias' if args.bias else ''})")
        print(result)
    if result.warnings:
        print(f"conslaw count: {len(result.warnings)} warning(s), see above", file=sys.stderr)
    return 0
