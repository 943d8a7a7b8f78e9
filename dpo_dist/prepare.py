"""`dpo-dist prepare RECIPE [--profile P] [key=value ...]`: tokenize every stage's data into the cache.

Only the tokenizer is loaded, never a model, so this runs on a CPU node before a GPU job. Training on the same
recipe then reads the cache and tokenizes nothing: both go through `prepare_stage_data`, with the same tokenizer
(the recipe's model, for every stage, chained ones included), template, lengths and data options, so they compute
the same cache keys. An interrupted prepare leaves no half entry (dpo_dist.data.cache); running it again builds
what is missing.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

from dpo_dist.recipe import Recipe, StageConfig


@dataclass
class StageData:
    train: object  # dpo_dist.data.tokenize.Prepared
    eval: object | None


def data_tokenizer(recipe: Recipe, log: Callable = print):
    """(tokenizer, renderer) for the data of every stage: the recipe's own model and template. A chained stage
    trains on the previous stage's weights, whose saved tokenizer is this one. The template chosen, and why, is
    logged (and a warning when it replaces the tokenizer's own)."""
    from dpo_dist.data.render import Renderer
    from dpo_dist.models import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    renderer = Renderer(tokenizer, recipe.model.template)
    for line in template_lines(renderer):
        log(line)
    return tokenizer, renderer


def template_lines(renderer) -> list[str]:
    """What `prepare`, `train` and `validate` say about the chat template: the choice, and any warning."""
    choice = renderer.choice
    bos = f", BOS {renderer.bos}" if renderer.bos else ", no BOS"
    lines = [f"[data] chat template: {choice.name} ({choice.why}); end of turn {renderer.eot_token}{bos}"]
    if choice.warning:
        lines.append(f"warning: {choice.warning}")
    return lines


def prepare_stage_data(stage: StageConfig, tokenizer, renderer, log: Callable = print,
                       wait_log: Callable | None = None, show_progress: bool | None = None) -> StageData:
    """Tokenize (or read from the cache) one stage's data.train and data.eval."""
    from dpo_dist.data.tokenize import prepare_dataset

    data = stage.data

    def prepare(source):
        return prepare_dataset(stage.stage, source, tokenizer, renderer, max_length=stage.max_length,
                               max_prompt_length=stage.max_prompt_length, fmt=data.format,
                               on_bad_row=data.on_bad_row, split=data.split, max_rows=data.max_rows,
                               num_proc=data.num_proc, log=log, wait_log=wait_log, show_progress=show_progress)

    return StageData(prepare(data.train), prepare(data.eval) if data.eval else None)


def prepare_recipe(recipe: Recipe, log: Callable = print) -> int:
    """Tokenize every stage's data; one summary line per source (printed by prepare_dataset). Returns 0."""
    started = time.time()
    tokenizer, renderer = data_tokenizer(recipe, log)
    sources = 0
    for i, stage in enumerate(recipe.stages):
        log(f"[prepare] stage {i + 1}/{len(recipe.stages)}: {stage.name} ({stage.stage})")
        data = prepare_stage_data(stage, tokenizer, renderer, log=log)
        sources += 1 + (data.eval is not None)
    log(f"[prepare] {sources} source{'' if sources == 1 else 's'} ready in {time.time() - started:.1f} s; "
        "training on this recipe reads them from the cache")
    return 0


def run(args) -> int:
    """The `dpo-dist prepare` command, from parsed arguments."""
    from dpo_dist.data.cache import BuildFailed
    from dpo_dist.data.formats import DataError
    from dpo_dist.data.render import TemplateError
    from dpo_dist.profiles import load_profile
    from dpo_dist.recipe import load_recipe

    from dpo_dist.backends import check_sources

    recipe = load_recipe(args.recipe, args.overrides)  # ConfigError: exit 2
    load_profile(args.profile)  # checked, so the train command line works as it is; it changes no token
    check_sources(recipe)
    try:
        return prepare_recipe(recipe)
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
    p.set_defaults(func=run)

