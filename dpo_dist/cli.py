"""The `dpo-dist` command: one table of subcommands."""
from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from dpo_dist.train import main as train_main

    argv = [args.recipe, *args.overrides]
    argv += ["--profile", args.profile] if args.profile else []
    argv += ["--stage", args.stage] if args.stage else []
    argv += ["--resume"] if args.resume else []
    return train_main(argv)


def _demo(args) -> int:
    from dpo_dist.demo.run import run_demo

    run_demo(args.out, args.overrides)
    return 0


def _merge(args) -> int:
    from dpo_dist.merge import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out}")
    return 0


def _templates(args) -> int:
    from dpo_dist.templates import get_template, template_names

    for name in template_names():
        t = get_template(name)
        print(f"{name:<10} end-of-turn {t.end_of_turn or '<eos>':<16} default system: {t.default_system or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-dist", description="Fine-tune LLMs with SFT, DPO and pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe's stages in this process (or under a launcher)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--profile")
    p.add_argument("--stage")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="pretrain → SFT → DPO on a tiny model with bundled data; prints a table")
    p.add_argument("--out", default="demo-out", help="directory for the run directories (default: demo-out)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/recipes/demo.yaml")
    p.set_defaults(func=_demo)

    p = sub.add_parser("merge", help="merge a LoRA adapter into a full-precision copy of its base")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_merge)

    p = sub.add_parser("templates", help="list the chat templates")
    p.set_defaults(func=_templates)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # key=value overrides may follow options; argparse leaves them over
        extra = [a for a in rest if a.startswith("-")]
        if extra or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = list(args.overrides) + rest
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
