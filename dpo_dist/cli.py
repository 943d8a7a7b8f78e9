"""The `dpo-dist` command: one table of subcommands."""
from __future__ import annotations

import argparse
import sys

from dpo_dist.config.schema import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from dpo_dist.commands import add_parsers

    parser = argparse.ArgumentParser(prog="dpo-dist", description="Fine-tune LLMs with SFT, DPO and pretraining.")
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' warnings (hidden by default)")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


_JSON_STDOUT = None  # the real stdout while a command writes JSON there (see main)


def json_stdout():
    """Where a command writes its JSON when asked for it on stdout (`--json`, `--json -`): the real stdout, also while
    main() sends everything else the command (or a library) prints to stderr."""
    return _JSON_STDOUT or sys.stdout


def _json_on_stdout(args) -> bool:
    value = getattr(args, "json", None)
    return value is True or value == "-"


def _run_for_json(func, args) -> int:
    """Run a command whose stdout must hold its JSON alone. Libraries print on import (DeepSpeed's logger binds
    sys.stdout when it is created: "Setting accelerator to CPU"), so while the command runs stdout is stderr; the JSON
    goes to json_stdout()."""
    import contextlib

    global _JSON_STDOUT
    _JSON_STDOUT = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return func(args)
    finally:
        _JSON_STDOUT = None


LIBRARIES = ("transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes", "torch", "datasets",
             "huggingface_hub")
LIBRARY_WARNINGS = r"(" + "|".join(LIBRARIES) + r")(\.|$)"


def quiet_libraries() -> None:
    """Keep the libraries' import-time warnings (FutureWarnings about gradient_checkpointing, the 4-bit kernels
    notice, DeepSpeed's accelerator line) off the console; `dpo-dist --verbose` shows them. dpo-dist's own warnings
    are printed lines, not these, so none of them is hidden."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=LIBRARY_WARNINGS)
    for name in LIBRARIES + ("DeepSpeed",):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # key=value overrides may follow options; argparse leaves them over
        extra = [a for a in rest if a.startswith("-")]
        if extra or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = list(args.overrides) + rest
    if not args.verbose:
        quiet_libraries()
    try:
        return _run_for_json(args.func, args) if _json_on_stdout(args) else args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m dpo_dist.cli`: run the module's importable copy, whose state (json_stdout) the commands import
    from dpo_dist.cli import main as _main

    sys.exit(_main())
