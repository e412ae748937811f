"""Example inputs for the CLI: float tensors, token ids, dicts of tensors, or a Python factory.

* ``--input-shape 1,3,32,32`` — a random float tensor (the model's dtype);
* ``--input-shape 2,16 --vocab-size 50257`` — random token ids below the vocabulary size;
* ``--input-shape input_ids=2,16:50257 --input-shape attention_mask=2,16:2`` — keyword
  inputs (a dict); ``SHAPE:N`` gives integers in [0, N), a plain shape a float tensor;
* ``--input FILE.py:make_input`` — a function returning a tensor, a tuple of positional
  inputs or a dict of keyword inputs (called with the model when it takes an argument).

Example:
    >>> import argparse
    >>> from torch import nn
    >>> p = argparse.ArgumentParser(); add_input_arguments(p)
    >>> args = p.parse_args(["--input-shape", "input_ids=2,3:7"])
    >>> x = example_from_args(args, nn.Linear(2, 2))
    >>> sorted(x), x["input_ids"].dtype, bool((x["input_ids"] < 7).all())
    (['input_ids'], torch.int64, True)
"""

from __future__ import annotations

import argparse
import inspect as pyinspect
from typing import Any

import torch
from torch import nn

from ._target import load_target

__all__ = ["add_input_arguments", "example_from_args", "parse_shape"]


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--input-shape`` (repeatable), ``--vocab-size`` and ``--input``."""
    parser.add_argument(
        "--input-shape",
        action="append",
        default=None,
        help="shape of a random example input, e.g. 1,3,32,32 (needed when torch.fx cannot trace "
        "the model, and for the laws found from the op graph); NAME=SHAPE gives a keyword input "
        "(repeat the option for several), SHAPE:N integers in [0, N) such as token ids",
    )
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="make an unnamed --input-shape token ids below this vocabulary size")
    parser.add_argument("--input", default=None, dest="input_factory",
                        help="FILE.py:NAME, a function returning the example input (a tensor, a tuple or a dict)")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` → ``(1, 3, 32, 32)``.

    Example:
        >>> parse_shape("2, 5")
        (2, 5)
    """
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--input-shape must be comma-separated integers, got {text!r}") from None
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def _tensor(spec: str, high: int | None, dtype: torch.dtype) -> torch.Tensor:
    shape_text, sep, bound = spec.partition(":")
    if sep:
        try:
            high = int(bound)
        except ValueError:
            raise ValueError(f"--input-shape {spec!r}: the part after ':' must be an integer bound") from None
    shape = parse_shape(shape_text)
    if high is not None:
        if high < 1:
            raise ValueError(f"--input-shape {spec!r}: the integer bound must be positive")
        return torch.randint(0, high, shape)
    return torch.randn(shape, dtype=dtype)


def example_from_args(args: argparse.Namespace, model: nn.Module) -> Any:
    """The example input described by the options, or None when none is given."""
    factory = getattr(args, "input_factory", None)
    shapes = getattr(args, "input_shape", None) or []
    if factory and shapes:
        raise ValueError("give either --input FILE.py:NAME or --input-shape, not both")
    if factory:
        fn = load_target(factory, option="--input", kind="function")
        if not callable(fn):
            raise ValueError(f"--input: {factory} is not a function")
        takes_model = len(pyinspect.signature(fn).parameters) >= 1
        return fn(model) if takes_model else fn()
    if not shapes:
        return None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    vocab = getattr(args, "vocab_size", None)
    named = [s for s in shapes if "=" in s]
    if named and len(named) != len(shapes):
        raise ValueError("--input-shape: name every input (NAME=SHAPE) or none of them")
    if named:
        out = {}
        for s in named:
            name, _, spec = s.partition("=")
            if not name.isidentifier():
                raise ValueError(f"--input-shape {s!r}: {name!r} is not a keyword argument name")
            out[name] = _tensor(spec, None, dtype)
        return out
    tensors = tuple(_tensor(s, vocab, dtype) for s in shapes)
    return tensors[0] if len(tensors) == 1 else tensors
