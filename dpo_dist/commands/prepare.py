"""`dpo-dist prepare RECIPE`: tokenize every stage's data into the cache (dpo_dist.training.prepare)."""
from __future__ import annotations

import sys

from dpo_dist.training.prepare import prepare_recipe


def run(args) -> int:
    """The `dpo-dist prepare` command, from parsed arguments."""
    from dpo_dist.data.cache import BuildFailed
    from dpo_dist.data.formats import DataError
    from dpo_dist.data.render import TemplateError
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.recipe import load_recipe

    from dpo_dist.config.preflight import check_recipe

    if args.show < 0:
        from dpo_dist.config.schema import ConfigError

        raise ConfigError(f"--show: must be >= 0, got {args.show}")
    recipe = load_recipe(args.recipe, args.overrides)  # ConfigError: exit 2
    load_profile(args.profile)  # checked, so the train command line works as it is; it changes no token
    check_recipe(recipe)
    try:
        return prepare_recipe(recipe, show=args.show)
    except (DataError, TemplateError, BuildFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize every stage's data into the cache, tokenizer only (no model): do "
                       "it once on a CPU node, then train reads it")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides (the same as for train)")
    p.add_argument("--profile", help="accepted so that train's command line works unchanged; a profile never "
                   "changes tokenization")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N tokenized training rows of "
                   "each stage, every token decoded (BOS, end of turn), the supervised ones «marked»")
    p.set_defaults(func=run)

