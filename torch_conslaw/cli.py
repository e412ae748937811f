"""The ``conslaw`` command line: one subcommand per module in :mod:`torch_conslaw.commands`.

Example:
    $ conslaw count --widths 4,3,5,2 --activations linear,relu --json
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, str] = {
    "count": "Count the conservation laws of an MLP (Lie-algebra calculator).",
    "laws": "Find the polynomial conservation laws of an MLP or of a map phi.",
    "demo": "Train the demo models, monitor their laws, print tables, write figures.",
    "inspect": "Show the layer structure and the law groups found in a model.",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``conslaw``; only ``command``'s module is imported (fast start-up)."""
    parser = argparse.ArgumentParser(
        prog="conslaw", description="Conservation laws of gradient flows (torch_conslaw)."
    )
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"torch_conslaw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"torch_conslaw.commands.{name}")
            module.add_arguments(cmd)
            cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``conslaw`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"conslaw {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
