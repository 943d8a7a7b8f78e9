"""`dpo-dist train`: run a recipe's stages in this process (or on each rank under a launcher)."""
from __future__ import annotations

def _train(args) -> int:
    from dpo_dist.training.run import main as train_main

    argv = [args.recipe, *args.overrides]
    argv += ["--profile", args.profile] if args.profile else []
    argv += ["--stage", args.stage] if args.stage else []
    argv += ["--resume"] if args.resume else []
    return train_main(argv)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run a recipe's stages in this process (or under a launcher)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--profile")
    p.add_argument("--stage")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=_train)
