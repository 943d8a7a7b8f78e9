"""Every `dpo-dist` subcommand, one module each, registered the same way: the module's add_parser(sub) adds its
subparser(s) and sets `func`, which takes the parsed arguments and returns the exit status. A ConfigError raised by
`func` is one line on stderr and exit 2 (dpo_dist.cli.main)."""
from __future__ import annotations

import importlib

# In the order `dpo-dist --help` lists them.
COMMANDS = ("init", "train", "launch", "parity", "slurm", "validate", "prepare", "plan", "chat", "serve", "evaluate",
            "plot", "bench", "import_firefly", "doctor", "profiles", "demo", "merge")


def add_parsers(sub) -> None:
    for name in COMMANDS:
        importlib.import_module(f"dpo_dist.commands.{name}").add_parser(sub)
