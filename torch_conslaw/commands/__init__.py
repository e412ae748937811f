"""Subcommands of the ``conslaw`` CLI: each module has ``add_arguments(parser)`` and ``run(args)``."""
