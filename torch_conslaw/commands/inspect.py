"""``conslaw inspect FILE.py:FACTORY``: the structure, the law groups and the skipped pairs.

Example:
    $ conslaw inspect models.py:make_model --input-shape 1,3,32,32
    $ conslaw inspect models.py:make_model --input-shape 2,3,32,32 --analyze   # completeness
    $ conslaw inspect gpt.py:make_model --input-shape 1,16 --vocab-size 50257
    $ conslaw inspect vit.py:make_model --input inputs.py:make_input
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from ..lawgroups import build_groups
from ._inputs import add_input_arguments, example_from_args, parse_shape  # noqa: F401 (parse_shape re-exported)
from ._target import load_target
from ..structure import find_structure, unwrap_model
from ..structure.finder import _quiet_forward, _split_input


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``conslaw inspect``."""
    parser.add_argument("target", help="FILE.py:NAME, where NAME is an nn.Module or a function returning one")
    add_input_arguments(parser)  # --input-shape / --vocab-size / --input (commands/_inputs.py)
    # --- analyze options (completeness report, torch_conslaw.completeness) ---
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="also count the laws: tracked rank, Lie-algebra count on random inputs shaped like "
        "--input-shape, completeness, where missing laws live and their polynomial form when small",
    )
    parser.add_argument(
        "--theta",
        choices=("model", "random"),
        default="model",
        help="with --analyze: count at the model's parameters or at a well-conditioned random point",
    )
    parser.add_argument(
        "--max-lie-parameters",
        type=int,
        default=20_000,
        help="with --analyze: larger models get the tracked rank and no Lie count (default 20000)",
    )
    # --- end of analyze options ---


def load_model(target: str) -> nn.Module:
    """The model named by ``FILE.py:NAME`` (NAME is called when it is not a module).

    Example:
        >>> load_model("missing.py:make")  # doctest: +SKIP
    """
    obj = load_target(target, option="the target", kind="model")
    model = obj if isinstance(obj, nn.Module) else obj()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{target} gave a {type(model).__name__}, not an nn.Module")
    return unwrap_model(model)


def run(args: argparse.Namespace) -> int:
    """Print the structure, every law group with its count, and the skipped pairs."""
    model = load_model(args.target)
    example = example_from_args(args, model)  # tensor, token ids, dict or FILE.py:make_input
    if example is not None:
        _check_runs(model, example, args.target)
    structure = find_structure(model, example)
    groups = build_groups(structure.pairs)
    print(f"model: {type(model).__name__} from {args.target}")
    print(structure)
    print(f"law groups: {len(groups)} ({sum(g.count for g in groups)} laws)")
    for g in groups:
        print(f"  {g.name:<24} {g.kind:<8} {g.count:>6} laws   {g.reason}")
    if args.analyze:  # completeness report (torch_conslaw.completeness)
        from ..completeness import analyze

        theta = None if args.theta == "model" else args.theta
        print(analyze(model, example, theta=theta, max_lie_parameters=args.max_lie_parameters))
    return 0


def _describe(example: Any) -> str:
    if isinstance(example, torch.Tensor):
        return f"a {str(example.dtype).replace('torch.', '')} tensor of shape {tuple(example.shape)}"
    if isinstance(example, dict):
        return "keyword inputs " + ", ".join(f"{k}={_describe(v)}" for k, v in example.items())
    return "positional inputs (" + ", ".join(_describe(v) for v in example) + ")"


def _check_runs(model: nn.Module, example: Any, target: str) -> None:
    """One plain forward pass on the example input; a failure is an input error that names the
    input given and the options that describe other inputs, not a traceback from deep inside."""
    args, kwargs = _split_input(example)
    try:
        _quiet_forward(model, args, kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{target} cannot run on the example input ({_describe(example)}): {first}. Describe the "
            "input it takes: --vocab-size N for token ids, --input-shape NAME=SHAPE[:N] (repeated) "
            "for keyword inputs, or --input FILE.py:NAME for anything else"
        ) from err
